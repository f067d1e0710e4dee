"""`lab dns-count POD NAME [--resolver R]`: what one name lookup in a pod costs the cluster DNS.

The pod resolves the name with a real resolver run inside the pod, so it reads the pod's own resolv.conf
with its search list and ndots: glibc's `getent` (the default), musl's getaddrinfo (Alpine's C library),
Node.js's dns.lookup or dns.resolve4/resolve6 (c-ares) (images/dnsclient.py). The queries the DNS servers
logged meanwhile from that pod are counted and listed: the ndots:5 search-list expansion, seen for real.
The pod's own side is captured too (observe/dnswire.py): every query in the order sent, which were in
flight together, each answer, and how long the lookup took on the wire.

With NodeLocal DNSCache the pod asks the cache on its node: the cache's log is counted from the pod's
address, and the cluster DNS's, which only sees the cache asking, like the upstream's: the pod's own
questions, each once. A cache hit never reaches the cluster DNS.

What counts, so that the number is the same every time (graders compare it with a learner's answer):
- at the cluster DNS, the questions the pod asked (its log names the asking pod's IP, so other pods'
  lookups at the same moment do not count), each (type, name) once: a resolver's retransmission of an
  unanswered question is the same query asked again, not a step of the search list;
- at the upstream DNS, which only sees the cluster DNS asking, the forwarded questions that are among the
  pod's own (same type and name), each once: another pod's lookup of other names does not count.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from apiserver import state
from apiserver.desired import current_lab
from images import dnsclient
from kubelet.execute import find_target
from observe import dnswire
from reconcile import nodelocal as nodelocal_sync
from services import addons, dns
from topo.errors import FeatureMissing, StateError

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Count:
    pod: str
    pod_ip: str
    name: str
    resolv_conf: str
    answer: list[str]
    cluster: list[dns.Query] = field(default_factory=list)
    upstream: list[dns.Query] = field(default_factory=list)
    # "TYPE name" -> what the cluster DNS did with the pod's question: "NXDOMAIN", "is 10.96.0.100",
    # "forwarded to 192.168.1.200", ... in the order its log said it (lab ui plays these one by one)
    outcomes: dict[str, list[str]] = field(default_factory=dict)
    resolver: str = "glibc"
    wire: list[dnswire.Exchange] = field(default_factory=list)  # what the pod sent and got, in order
    node_cache: list[dns.Query] | None = None  # NodeLocal DNSCache: the queries its cache received
    cache_hits: int = 0

    @property
    def duration_ms(self) -> float:
        """First query sent to last answer received, on the pod's wire."""
        ends = [q.answered for q in self.wire if q.answered is not None]
        return round(max(ends) * 1000, 3) if ends else 0.0

    def to_json(self) -> dict:
        out = {"pod": self.pod, "podIP": self.pod_ip, "name": self.name, "resolvConf": self.resolv_conf,
               "resolver": self.resolver, "answer": self.answer, "clusterQueries": [q.__dict__ for q in self.cluster],
               "upstreamQueries": [q.__dict__ for q in self.upstream], "outcomes": self.outcomes,
               "podQueries": [q.to_json() for q in self.wire], "durationMs": self.duration_ms,
               "steps": max((q.step for q in self.wire), default=0), "dnsSpecVersion": dns.DNS_SCHEMA_VERSION}
        if self.node_cache is not None:
            out["nodeCacheQueries"] = [q.__dict__ for q in self.node_cache]
            out["nodeCacheHits"] = self.cache_hits
        return out


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def log_tail(path: Path, offset: int) -> str:
    """What a log file gained since `offset` (its size before the lookup): the lines of this lookup only."""
    if not path.exists():
        return ""
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def count(lab_name: str | None, target: str, name: str, family: str = "any", resolver: str = "glibc",
          timeout: float = 60.0) -> Count:
    """One lookup of `name` from inside the pod, as its own resolver does it, and the queries it cost where.
    `timeout`: how long the lookup may take; a resolver waiting out its timeouts (a DNS it cannot reach) is
    stopped then, and that is an error saying so."""
    st = state.resolve(lab_name)
    _ns, pause_pid = find_target(st, target)
    if pause_pid is None:
        raise StateError(f"{target} is not a pod: dns-count resolves from inside a pod")
    key = target if "/" in target else next(k for k in st.pods if k.split("/", 1)[1] == target)
    pod_ip = st.pods[key].ip
    run_dir = state.lab_dir(st.name)
    lab = current_lab(st)
    cache_log = None
    if lab.dns.node_local:
        cache_log = nodelocal_sync.log_file(st.name, st.pods[key].node)
    logs = [addons.dns_dir(run_dir) / "queries.log", run_dir / "upstream-dns" / "queries.log"]
    if cache_log is not None:
        logs.append(cache_log)
    if not logs[0].parent.exists():
        raise StateError(f"lab {st.name} has no cluster DNS (spec.dns.enabled is false)")
    offsets = [_size(p) for p in logs]
    if resolver == "glibc":
        argv = ["getent", {"any": "ahosts", "inet": "ahostsv4", "inet6": "ahostsv6"}[family], name]
    elif family != "any":
        raise StateError(f"--family {family} is only for --resolver glibc (getent ahostsv4/ahostsv6)")
    else:
        try:
            argv = dnsclient.once_argv(resolver, name)
        except dnsclient.ClientMissing as exc:
            raise FeatureMissing(str(exc)) from exc
    capture = dnswire.Capture(st.pods[key].netns)
    try:
        proc = subprocess.run([sys.executable, "-m", "lab.cli", "exec", "--lab", st.name, key, "--", *argv],
                              capture_output=True, text=True, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # `lab exec` is the resolver itself (exec): stopping it stops that
        capture.close()
        raise StateError(f"resolving {name} in {key} gave no answer within {timeout:g} s (its resolver was still "
                         f"waiting: can {key} reach the cluster DNS, and is it running?)") from exc
    if proc.returncode not in (0, 2):  # getent and the C client: 2 = the name does not exist, an answer too
        capture.close()
        raise StateError(f"could not resolve in {key}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    answer = dnsclient.addresses(resolver, proc.stdout)
    _settle(logs)  # dnsmasq writes its log asynchronously
    wire = capture.read()
    if cache_log is not None:
        seen_log = log_tail(logs[2], offsets[2])  # the pod asked the node's cache; what it did is in its log
        cached = dns.parse_log(seen_log)
        node_cache = _distinct(q for q in cached if q.source == pod_ip)
        asked = {(q.qtype, q.name.lower()) for q in node_cache}
        cluster = _distinct(q for q in dns.parse_log(log_tail(logs[0], offsets[0])) if (q.qtype, q.name.lower()) in asked)
        hits = log_tail(logs[2], offsets[2]).count(" cached ")
    else:
        node_cache, hits = None, 0
        seen_log = log_tail(logs[0], offsets[0])
        cluster = _distinct(q for q in dns.parse_log(seen_log) if q.source == pod_ip)
        asked = {(q.qtype, q.name.lower()) for q in cluster}
    upstream = _distinct(q for q in dns.parse_log(log_tail(logs[1], offsets[1])) if (q.qtype, q.name.lower()) in asked)
    resolv = (state.pod_dir_of(st.name, key) / "resolv.conf").read_text()
    return Count(key, pod_ip, name, resolv, answer, cluster, upstream, outcomes(seen_log, pod_ip), resolver, wire,
                 node_cache, hits)


_QUERY_LINE = re.compile(r"\bquery\[(?P<qtype>[^\]]+)\] (?P<name>\S+) from (?P<source>\S+)\Z")
_OUTCOME_LINE = re.compile(r"\b(?P<what>config|reply|cached|forwarded) (?P<name>\S+) (?P<verb>is|to) (?P<value>.+)\Z")


def outcomes(log: str, pod_ip: str) -> dict[str, list[str]]:
    """What dnsmasq did with each of the pod's questions ("TYPE name" -> its lines after the question:
    "NXDOMAIN", "is 10.96.0.100", "forwarded to 192.168.1.200", "reply is 192.168.1.101").

    dnsmasq's outcome lines name the question's name, not its type; glibc asks A and AAAA at once, so an
    answer goes to the pod's pending question of that name whose type the value fits (an IPv4 address or
    NODATA-IPv4: A; an IPv6 address or NODATA-IPv6: AAAA), anything else (a forward) to its latest question
    of that name."""
    out: dict[str, list[str]] = {}
    pending: dict[str, dict[str, str]] = {}  # name -> qtype -> "TYPE name", the pod's open questions
    for line in log.splitlines():
        line = line.rstrip()
        q = _QUERY_LINE.search(line)
        if q:
            if q["source"] == pod_ip:
                key = f"{q['qtype']} {q['name']}"
                asked = pending.setdefault(q["name"].lower(), {})
                asked.pop(q["qtype"], None)
                asked[q["qtype"]] = key  # the latest last
                out.setdefault(key, [])
            continue
        o = _OUTCOME_LINE.search(line)
        asked = pending.get(o["name"].lower()) if o else None
        if not o or not asked:
            continue
        value = o["value"].strip()
        fits = None if o["what"] == "forwarded" else "A" if re.match(r"^(\d+\.){3}\d+$|NODATA-IPv4", value) else \
            "AAAA" if (":" in value and " " not in value) or "NODATA-IPv6" in value else None
        key = asked.get(fits or "", list(asked.values())[-1])
        text = value if o["what"] == "config" and value.startswith(("NXDOMAIN", "NODATA")) else \
            f"{o['what']} {o['verb']} {value}" if o["what"] != "config" else f"is {value}"
        if text not in out[key]:
            out[key].append(text)
    return out


def _distinct(queries) -> list[dns.Query]:
    """Each (type, name) once, in the order first asked (see the module docstring)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for q in queries:
        if (q.qtype, q.name.lower()) not in seen:
            seen.add((q.qtype, q.name.lower()))
            out.append(q)
    return out


def _settle(paths: list[Path], quiet: float = 0.15, timeout: float = 2.0) -> None:
    """Wait until the logs stop growing for a moment."""
    deadline = time.monotonic() + timeout
    sizes = [_size(p) for p in paths]
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.03)
        now = [_size(p) for p in paths]
        if now != sizes:
            sizes, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= quiet:
            return


def _n(count: int, one: str, many: str) -> str:
    """"1 query", "0 queries": the output is read by people, and "1 steps" read as a mistake."""
    return f"{count} {one if count == 1 else many}"


def render(c: Count) -> str:
    options = " ".join(line for line in c.resolv_conf.splitlines() if line.startswith(("search", "options")))
    lines = [f"{c.pod} ({c.pod_ip}) resolved {c.name} with {c.resolver} -> {', '.join(c.answer) or 'no answer'}",
             f"  with: {options}"]
    if c.wire:
        steps = max(q.step for q in c.wire)
        lines.append(f"{_n(len(c.wire), 'query', 'queries')} sent by the pod in {_n(steps, 'step', 'steps')}, "
                     f"{c.duration_ms:.1f} ms (step: queries in flight together; ms sent -> answered):")
        for q in c.wire:
            got = (f"{q.answered * 1000:7.1f}  {q.rcode} {' '.join(q.answers)}".rstrip()
                   if q.answered is not None else "     no answer")
            lines.append(f"  {q.step:>2}  {q.sent * 1000:7.1f} -> {got:<24} {q.qtype:5} {q.name} "
                         f"({q.proto} :{q.port} -> {q.server})")
    if c.node_cache is not None:
        lines.append(f"{_n(len(c.node_cache), 'query', 'queries')} at the node's cache (NodeLocal DNSCache), "
                     f"{c.cache_hits} answered from its cache")
    lines += [f"{_n(len(c.cluster), 'query', 'queries')} at the cluster DNS (dnsmasq, Kubernetes DNS "
              f"specification {dns.DNS_SCHEMA_VERSION}: TXT dns-version.<zone>):"]
    lines += [f"  {q.qtype:5} {q.name}" for q in c.cluster]
    if c.upstream:
        lines.append(f"{len(c.upstream)} forwarded to the upstream DNS:")
        lines += [f"  {q.qtype:5} {q.name}" for q in c.upstream]
    return "\n".join(lines)
