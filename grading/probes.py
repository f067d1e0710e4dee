"""The probes of checks.yaml: each looks at the running lab and says pass or fail, and why.

One function per probe kind, `(Context, probe model) -> Result`. They only look: a reachability probe
opens a connection, an iperf probe starts a short-lived server and removes it, nothing else is changed.
Every probe first checks that what it looks at is alive (`Lookup.live`), so a check that expects an
absence (a route gone, a connection blocked) fails on a dead or empty lab instead of passing by accident;
and no failure passes for another: "blocked" is a drop (a timeout), not "Network is unreachable" or a
refusal, a command that fails matches nothing, a DNS check needs the cluster DNS to have seen the lookup.
What a live but broken source can still fake, checks guard with `needs` (grading/grade.py).
Any error while probing (a pod that is gone, a command that times out) is a failed check with the reason
as its detail, never a crash of the grading run.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from apiserver import state
from grading import schema
from grading.answers import answer
from grading.probe_base import Context, Result, get, sent_queries
from grading.fields import route_protocol
from observe import targets
from routing import frr
from topo import netns
from topo import schema as topo_schema
from topo.errors import StateError

assert schema.ROUTE_PROTOCOLS["bgp"] == frr.RTPROT_BGP  # the number zebra installs BGP routes with
DROPPED, REFUSED = "timeout", "refused"  # observe.probe.connect's details for a silent drop and an active refusal


def _connect(st: state.LabState, source: str, dest_ip: str, port: int, protocol: str, timeout: float):
    """The one reachability primitive, observe/probe.py's (a ProbeResult: allowed, detail, source_ip)."""
    from observe.probe import connect

    return connect(st, source, dest_ip, port, protocol, timeout)


# ---------------------------------------------------------------------------- traffic


def reach(ctx: Context, p: schema.ReachIn) -> Result:
    src = ctx.lookup.live(p.source)
    _live_if_named(ctx, p.to)
    dest = ctx.lookup.address(p.to)
    got = _connect(ctx.st, src.key, str(dest), p.port, p.protocol, p.timeout)
    seen = _outcome(got.allowed, got.detail)
    where = f"{src.key} -> {dest}:{p.port}/{p.protocol}: {seen}" + (f" ({got.detail})" if got.detail != seen else "")
    if p.expect != "allowed":
        # Only the outcome asked for: a drop is a timeout, a refusal an RST or ICMP port unreachable.
        # Anything else ("Network is unreachable": the source's own eth0 is down) proves nothing.
        if seen == p.expect:
            return Result(True, where)
        why = {"blocked": "expected it dropped (a timeout)", "refused": "expected it refused (RST or ICMP port "
               "unreachable)"}[p.expect]
        return Result(False, f"{where}; {why}")
    if not got.allowed:
        return Result(False, where)
    if p.source_ip is not None:
        wanted = str(ctx.lookup.address(p.source_ip))
        saw = got.source_ip or "not reported by the server"
        return Result(saw == wanted, f"{where}; source IP seen: {saw}, expected {wanted}")
    return Result(True, where)


UNREACHABLE = ("Network is unreachable", "No route to host")  # ENETUNREACH, EHOSTUNREACH: no path, told at once


def _outcome(allowed: bool, detail: str) -> str:
    """What happened to a connection, in the words of docs/exercises.md: allowed, blocked (dropped: it timed
    out), refused (RST or ICMP port unreachable), unreachable (no route, told at once), failed (anything
    else, e.g. EPERM from a socket LB). Only a timeout is "blocked": observe.probe calls every failure
    blocked, as the upstream tooling's truth tables do, but a why line must say which one it was."""
    if allowed:
        return "allowed"
    if detail == DROPPED:
        return "blocked"
    if detail == REFUSED:
        return "refused"
    return "unreachable" if detail in UNREACHABLE else "failed"


def _live_if_named(ctx: Context, value: str) -> None:
    """A destination given by name must be alive too (an IP may be anything, e.g. a ClusterIP)."""
    try:
        IPv4Address(value)
        return
    except ValueError:
        pass
    if not value.startswith("service/"):
        ctx.lookup.live(value)


def http(ctx: Context, p: schema.HttpIn) -> Result:
    src = ctx.lookup.live(p.source)
    _live_if_named(ctx, p.to)
    dest = str(ctx.lookup.address(p.to))
    if p.spread:
        from grading.probes_lb import spread

        return spread(ctx, p, src, dest)
    return get(ctx, p, src, dest)[0]


def dns(ctx: Context, p: schema.DnsIn) -> Result:
    from observe import dnscount

    src = ctx.lookup.live(p.source)
    if src.kind != "pod":
        return Result(False, f"{p.source} is not a pod: DNS is looked up from inside a pod")
    # A working DNS answers a pod's whole search list in well under a second; one it cannot reach makes glibc
    # wait 5 s a name (the capstone's first grade spent 20 s in one check), so the lookup gets a few seconds.
    got = dnscount.count(ctx.st.name, src.key, p.name, p.family, timeout=DNS_CHECK_TIMEOUT)
    sent = sent_queries(got)
    cache = "" if got.node_cache is None else f"{len(sent)} sent to the node's cache, {got.cache_hits} answered from it, "
    where = (f"{src.key} resolved {p.name} -> {', '.join(got.answer) or 'nothing'} "
             f"({cache}{len(got.cluster)} queries at the cluster DNS)")
    if not sent:  # "does not resolve" and "at most N queries" say nothing when the DNS is down
        server = "the cluster DNS" if got.node_cache is None else "the node's DNS cache"
        return Result(False, f"{where}; {server} logged no query from {src.key}: is it reachable and running?")
    if p.resolves is False and any(q.answered is None for q in got.wire):  # no answer is not "no such name"
        return Result(False, f"{where}; a query of the pod's got no answer: not resolving is no proof here")
    if p.resolves is not None and bool(got.answer) != p.resolves:
        return Result(False, f"{where}; expected it {'to resolve' if p.resolves else 'not to resolve'}")
    if p.answer is not None:
        wanted = sorted(str(ctx.lookup.address(a)) for a in p.answer)
        if sorted(got.answer) != wanted:
            return Result(False, f"{where}; expected {', '.join(wanted)}")
    if p.queries is not None:
        n = len(got.cluster)
        if (p.queries.min is not None and n < p.queries.min) or (p.queries.max is not None and n > p.queries.max):
            return Result(False, f"{where}; expected {_bounds(p.queries)} queries")
    if p.sent is not None:
        n = len(sent)
        if (p.sent.min is not None and n < p.sent.min) or (p.sent.max is not None and n > p.sent.max):
            return Result(False, f"{where}; {n} queries sent, expected {_bounds(p.sent)}")
    return Result(True, where)


DNS_CHECK_TIMEOUT = 5.0  # seconds a dns check's lookup may take


def _bounds(b: Any) -> str:
    if b.min is not None and b.max is not None:
        return f"{b.min} to {b.max}" if b.min != b.max else f"exactly {b.min}"
    return f"at least {b.min}" if b.min is not None else f"at most {b.max}"


def iperf(ctx: Context, p: schema.IperfIn) -> Result:
    mbit, detail = _iperf_path(ctx, p.source, p.to, p.port, p.seconds)
    where = f"{p.source} -> {p.to}: {detail}"
    if p.min_mbit is not None and mbit < p.min_mbit:
        return Result(False, f"{where}; expected at least {p.min_mbit:g} Mbit/s")
    if p.min_fraction is not None and p.baseline is not None:
        base, base_detail = _iperf_path(ctx, p.baseline.source, p.baseline.to, p.port, p.seconds)
        fraction = mbit / base if base > 0 else 0.0
        where += f"; baseline {p.baseline.source} -> {p.baseline.to}: {base_detail}; ratio {fraction:.2f}"
        if base <= 0:
            return Result(False, f"{where}: the baseline path carries nothing")
        if fraction < p.min_fraction:
            return Result(False, f"{where}, expected at least {p.min_fraction:g}")
    return Result(True, where)


def _iperf_path(ctx: Context, source: str, to: str, port: int, seconds: float) -> tuple[float, str]:
    """Mbit/s of one TCP stream from `source` to `to` (a pod or host: a server is started there for this
    measurement only and stopped afterwards)."""
    src = ctx.lookup.live(source)
    dst = ctx.lookup.live(_by_ip(ctx, to))
    assert dst.ip is not None
    server = ctx.lookup.popen(dst, ["iperf3", "-s", "-1", "-p", str(port)])
    try:
        argv = ["iperf3", "-c", str(dst.ip), "-p", str(port), "-t", f"{seconds:g}", "-J", "--connect-timeout", "1000"]
        deadline = time.monotonic() + 3
        while True:
            proc = ctx.lookup.run(src, argv, timeout=seconds + 6)
            if "Connection refused" not in proc.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # the server is not listening yet
    finally:
        server.kill()
        server.wait()
    try:
        data = json.loads(proc.stdout)
        if data.get("error"):
            return 0.0, f"iperf3: {data['error']}"
        mbit = data["end"]["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError, TypeError):
        return 0.0, f"iperf3 gave no result ({' '.join(proc.stdout.split())[-120:]})"
    return mbit, f"{mbit:.0f} Mbit/s"


def _by_ip(ctx: Context, to: str) -> str:
    """A pod given by its IP, as a target name (iperf needs a place to start its server)."""
    try:
        ip = str(IPv4Address(to))
    except ValueError:
        return to
    for key, ps in ctx.st.pods.items():
        if ps.ip == ip:
            return key
    raise StateError(f"{to} is no pod of lab {ctx.st.name}: name the pod or node to measure to")


# ---------------------------------------------------------------------------- kernel state


def route(ctx: Context, p: schema.RouteIn) -> Result:
    target = ctx.lookup.live(p.on)
    dst = IPv4Network(p.to)
    with netns.rtnl_in(target.netns) as rt:
        links = {link.index: link.name for link in rt.links()}
        found = [r for r in rt.routes() if r.dst == dst]
    via = ctx.lookup.address(p.via) if p.via is not None else None
    proto = None if p.proto is None else route_protocol(p.proto)

    def misses(r: Any) -> list[str]:
        """The properties the check gives that this route does not have (as `ip route` names them)."""
        return [name for name, ok in (("via", via is None or r.gateway == via),
                                      ("dev", p.dev is None or links.get(r.oif) == p.dev),
                                      ("proto", proto is None or r.protocol == proto)) if not ok]

    owner = next((f" ({n.name}'s PodCIDR)" for n in ctx.lookup.lab.nodes if n.pod_cidr == dst), "")
    shown = f"{target.name}: routes to {dst}{owner}: " + "; ".join(_route_text(r, links) for r in found)
    matching = [r for r in found if not misses(r)]
    # A failure says what is wrong, never the route the check wants: that route is the task's answer (04's
    # "expected 10.244.2.0/24 via 192.168.1.11 dev eth0", on a fresh lab, was the whole fix).
    if not found:
        return Result(not p.present, f"{target.name}: no route to {dst}{owner}")
    if p.present:
        if matching:
            return Result(True, shown)
        wrong = sorted({m for r in found for m in misses(r)}, key=("via", "dev", "proto").index)
        return Result(False, f"{shown}; not the expected {', '.join(wrong)}")
    return Result(not matching, f"{shown}; " + ("expected it gone" if matching else "not the one that must be gone"))


def _route_text(r: Any, links: dict[int, str]) -> str:
    names = {v: k for k, v in schema.ROUTE_PROTOCOLS.items()}
    parts = [str(r.dst)] + ([f"via {r.gateway}"] if r.gateway else []) + \
        ([f"dev {links.get(r.oif, r.oif)}"] if r.oif else []) + [f"proto {names.get(r.protocol, r.protocol)}"]
    return " ".join(parts)


def bgp(ctx: Context, p: schema.BgpIn) -> Result:
    target = ctx.lookup.live(p.on)
    folder = state.lab_dir(ctx.st.name) / "frr" / target.name
    try:
        summary = json.loads(frr.vtysh(folder, "show bgp ipv4 unicast summary json", timeout=5) or "{}")
    except (ValueError, OSError) as exc:
        return Result(False, f"{target.name}: no BGP speaker answers ({exc})")
    peers = summary.get("peers") or {}
    if not peers:
        return Result(False, f"{target.name}: no BGP speaker answers, or it has no peers")
    states = {ip: (info.get("desc") or "", info.get("state", "?")) for ip, info in peers.items()}
    if p.peer is not None:
        wanted = _peer_address(ctx, p.peer)
        states = {ip: v for ip, v in states.items() if ip == wanted or v[0] == p.peer}
        if not states:
            return Result(False, f"{target.name}: no BGP peer {p.peer} (peers: {', '.join(peers)})")
    shown = ", ".join(f"{desc or ip} {st}" for ip, (desc, st) in states.items())
    bad = [ip for ip, (_, st) in states.items() if st != p.state]
    if bad:
        return Result(False, f"{target.name}: sessions {shown}; expected {p.state}")
    if p.prefixes:
        try:
            table = json.loads(frr.vtysh(folder, "show bgp ipv4 unicast json", timeout=5) or "{}")
        except (ValueError, OSError):
            table = {}
        have = set((table.get("routes") or {}).keys())
        missing = [x for x in p.prefixes if str(IPv4Network(x)) not in have]
        if missing:
            return Result(False, f"{target.name}: sessions {shown}; BGP table lacks {', '.join(missing)}")
    return Result(True, f"{target.name}: sessions {shown}" + (f"; has {', '.join(p.prefixes)}" if p.prefixes else ""))


def _peer_address(ctx: Context, peer: str) -> str | None:
    try:
        return str(ctx.lookup.address(peer))
    except StateError:
        return None


def rule(ctx: Context, p: schema.RuleIn) -> Result:
    """A rule (or chain) present or absent. Absence needs the chain (or table) itself to exist, so an
    empty ruleset never passes for "this rule was removed"."""
    target = ctx.lookup.live(p.on)
    pattern = re.compile(p.match) if p.match else None
    if p.tool == "iptables":
        from services.kube_proxy import iptables_backend, iptables_save

        out = ctx.lookup.run(target, iptables_save(iptables_backend(ctx.lookup.lab.kube_proxy)) + ["-t", p.table]).stdout
        rows = out.splitlines()
        chain_exists = any(l.startswith("-A ") for l in rows) if p.chain is None else \
            any(l.startswith(f":{p.chain} ") for l in rows)
        lines = [l for l in out.splitlines() if l.startswith(f"-A {p.chain} " if p.chain else "-A ")]
        where = f"{target.name}: iptables -t {p.table}" + (f" chain {p.chain}" if p.chain else "")
    else:
        from grading.faults import nft_table

        family, table = nft_table(p.table)
        proc = ctx.lookup.run(target, ["nft", "list", "table", family, table])
        out = proc.stdout if proc.returncode == 0 else ""
        blocks = _nft_chains(out)
        chain_exists = p.chain in blocks if p.chain else bool(blocks)
        lines = blocks.get(p.chain, []) if p.chain else [l for b in blocks.values() for l in b]
        where = f"{target.name}: nft table {family} {table}" + (f" chain {p.chain}" if p.chain else "")
    hits = [l for l in lines if pattern is None or pattern.search(l)]
    what = f"a rule matching {p.match!r}" if p.match else "the chain"
    if p.present:
        ok = chain_exists and (bool(hits) if pattern else True)
        return Result(ok, f"{where}: {'has' if ok else 'lacks'} {what}" + (f" ({hits[0].strip()[:100]})" if ok and hits else ""))
    if not chain_exists:
        return Result(False, f"{where}: the {'chain' if p.chain else 'table'} itself is missing")
    if pattern is None:
        return Result(False, f"{where}: the chain exists")
    return Result(not hits, f"{where}: " + (f"still has {hits[0].strip()[:100]}" if hits else f"no rule matches {p.match!r}"))


def _nft_chains(text: str) -> dict[str, list[str]]:
    """Chain name -> its rule lines, from `nft list table` output."""
    chains: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        match = re.match(r"^chain (\S+) \{$", stripped)
        if match:
            current = match.group(1)
            chains[current] = []
        elif stripped == "}":
            current = None
        elif current is not None and stripped and not stripped.startswith(("type ", "policy ")):
            chains[current].append(stripped)
    return chains


def link(ctx: Context, p: schema.LinkIn) -> Result:
    if p.host_veth_of is not None:
        pod = ctx.lookup.live(p.host_veth_of)
        dev = targets.host_veth(ctx.lookup, pod)
        target = ctx.lookup.live(ctx.st.pods[pod.key].node)
    else:
        assert p.on is not None and p.dev is not None
        target, dev = ctx.lookup.live(p.on), p.dev
    with netns.rtnl_in(target.netns) as rt:
        links = {l.index: l for l in rt.links()}
    found = next((l for l in links.values() if l.name == dev), None)
    where = f"{target.name}: {dev}"
    if not p.present:
        return Result(found is None, f"{where}: {'present' if found else 'absent'}")
    if found is None:
        return Result(False, f"{where}: no such interface")
    master = links[found.master].name if found.master in links else None
    have: dict[str, Any] = {"mtu": found.mtu, "master": master, "type": found.kind, "up": found.up}
    shown = f"mtu {found.mtu}, master {master or 'none'}, type {found.kind or 'none'}, {'up' if found.up else 'down'}"
    if p.hairpin is not None:
        have["hairpin"] = _hairpin(ctx, target, dev) if master is not None else None
        shown += f", hairpin {'not a bridge port' if have['hairpin'] is None else 'on' if have['hairpin'] else 'off'}"
    def said(key: str, value: Any) -> str:
        """A property as `shown` words it: none for no master or type, never Python's None."""
        if value is None:
            return "not a bridge port" if key == "hairpin" else "none"
        words = {"up": ("up", "down"), "hairpin": ("on", "off")}
        return (words[key][0] if value else words[key][1]) if isinstance(value, bool) else str(value)

    wrong = [f"{k} {said(k, have[k])} (expected {said(k, v)})" for k, v in
             (("mtu", p.mtu), ("master", p.master), ("type", p.type), ("up", p.up), ("hairpin", p.hairpin))
             if v is not None and have[k] != v]
    return Result(not wrong, f"{where}: {shown}" + (f"; wrong: {', '.join(wrong)}" if wrong else ""))


def _hairpin(ctx: Context, target: targets.Target, dev: str) -> bool | None:
    """A bridge port's hairpin mode, as `bridge -d link` reports it (None: not a bridge port)."""
    proc = ctx.lookup.run(target, ["bridge", "-d", "-j", "link", "show", "dev", dev])
    try:
        port = json.loads(proc.stdout)[0]
    except (ValueError, LookupError, TypeError):
        return None
    return bool(port["hairpin"]) if "hairpin" in port else None


def command(ctx: Context, p: schema.CommandIn) -> Result:
    target = ctx.lookup.live(p.on)
    proc = ctx.lookup.run(target, p.argv, timeout=p.timeout)
    out = proc.stdout
    shown = " ".join(out.split())[:120]
    where = f"{target.name}: {' '.join(p.argv)}: exit {proc.returncode}, output {shown!r}"
    expected_rc = p.exit_code if p.exit_code is not None else 0  # a command that fails matches nothing honestly
    if proc.returncode != expected_rc:
        return Result(False, f"{where}; expected exit {expected_rc}")
    if p.match is not None and re.search(p.match, out, re.MULTILINE) is None:
        return Result(False, f"{where}; expected a match for {p.match!r}")
    hit = re.search(p.not_match, out, re.MULTILINE) if p.not_match is not None else None
    if hit is not None:  # the line that fails it, not the output's first 120 characters (another line, cut)
        line = " ".join(out[out.rfind("\n", 0, hit.start()) + 1:].split("\n", 1)[0].split())
        return Result(False, f"{target.name}: {' '.join(p.argv)}: the line {topo_schema.short(line, 240)!r} "
                             f"matches {p.not_match!r}, which it must not")
    return Result(True, where)


def pods(ctx: Context, p: schema.PodsIn) -> Result:
    from kubelet import runtime

    chosen = []
    for key, ps in sorted(ctx.st.pods.items()):
        namespace, name = key.split("/", 1)
        if namespace != p.namespace or (p.name is not None and name != p.name):
            continue
        if p.selector is not None and any(ps.labels.get(k) != v for k, v in p.selector.items()):
            continue
        if runtime.sandbox_alive(ps.netns, ps.pause_pid):
            running = sum(1 for pid in ps.containers.values() if runtime.in_pod(pid, ps.netns))
            chosen.append((key, running))
    what = p.name or ",".join(f"{k}={v}" for k, v in (p.selector or {}).items())
    where = f"{len(chosen)} running pods {what} in {p.namespace}"
    n = len(chosen)
    if (p.running.min is not None and n < p.running.min) or (p.running.max is not None and n > p.running.max):
        return Result(False, f"{where}; expected {_bounds(p.running)}")
    if p.containers is not None:
        short = [f"{key} ({running})" for key, running in chosen if running < p.containers]
        if short:
            return Result(False, f"{where}; fewer than {p.containers} running containers: {', '.join(short)}")
    return Result(True, where)


RUNNERS: dict[str, Callable[[Context, Any], Result]] = {
    "reach": reach, "http": http, "dns": dns, "route": route, "bgp": bgp, "rule": rule, "link": link,
    "command": command, "iperf": iperf, "pods": pods, "answer": answer, "lbmap": lambda ctx, p: _lbmap(ctx, p),
}


def _lbmap(ctx: Context, p: schema.LbMapIn) -> Result:
    from grading.probes_lb import lbmap

    return lbmap(ctx, p)
assert set(RUNNERS) == set(schema.PROBES)
