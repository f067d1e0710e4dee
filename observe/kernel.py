"""What the kernel holds for a running lab, read without changing anything.

`lab graph` draws a lab from this, not from its spec, so a route someone deleted or a BGP session that is
down shows up as such; `lab trace` asks the same kernel which route it picks and which rule fired. Links,
addresses, routes, neighbours and the VXLAN forwarding database come from rtnetlink, one handle per
namespace entered in-process (topo.netns), so reading a whole lab costs milliseconds. BGP state comes
from each FRR instance (vtysh, through the instance's own socket folder), service rules from the same
loaders' counterparts that kube-proxy uses (`iptables-save` of the lab's backend, `nft -j`), one process per node, and
in IPVS mode the node's IPVS table (/proc/net/ip_vs, read inside the namespace: no process at all).

The parsers (iptables-save text, nft JSON, the IPVS table) are pure so they are unit-tested without root.
"""
from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from observe.ipvs import ServiceKey, ipvs_servers, ipvs_services
from topo import netns
from topo.rtnl import (AF_BRIDGE, NDA_DST, NDA_LLADDR, NDMSG, RTA_DST, RTA_GATEWAY, RTA_OIF, RTA_TABLE,
                       RTM_GETNEIGH, RTM_GETROUTE, RTM_NEWNEIGH, RTM_NEWROUTE, RTMSG, RTNH_F_ONLINK, NetlinkError,
                       Rtnl, parse_attrs)

RTA_IIF, RTA_SRC, RTA_PREFSRC, RTA_METRICS, RTA_MULTIPATH = 3, 2, 7, 8, 9
RTAX_MTU = 2
RTM_F_FIB_MATCH = 0x2000  # `ip route get fibmatch`: answer with the table entry that matched
RTNEXTHOP = struct.Struct("=HBBi")
RT_TABLE_MAIN = 254

# rtnetlink's protocol numbers, named as `ip route` names them (/etc/iproute2/rt_protos).
PROTOCOLS = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 11: "zebra", 12: "bird",
             16: "dhcp", 186: "bgp", 187: "isis", 188: "ospf", 189: "rip", 192: "eigrp"}
ROUTE_TYPES = {1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole",
               7: "unreachable", 8: "prohibit", 9: "throw"}
NUD_STATES = {0x01: "incomplete", 0x02: "reachable", 0x04: "stale", 0x08: "delay", 0x10: "probe", 0x20: "failed",
              0x40: "noarp", 0x80: "permanent"}
IF_OPER_UP, IF_OPER_UNKNOWN = 6, 0


# --------------------------------------------------------------------------------------- netlink views

@dataclass(frozen=True)
class LinkView:
    name: str
    kind: str | None  # veth, bridge, vxlan, ... (None: a plain device such as lo)
    up: bool  # administratively (IFF_UP)
    carrier: bool  # operationally up (or "unknown", as lo and some virtual devices report)
    mtu: int
    master: str | None = None  # the bridge it is enslaved to
    mac: str = ""
    index: int = 0


@dataclass(frozen=True)
class RouteView:
    dst: IPv4Network
    via: IPv4Address | None
    dev: str | None
    proto: str
    type: str = "unicast"
    onlink: bool = False
    src: IPv4Address | None = None  # preferred source (route get answers)
    mtu: int | None = None  # a route's own MTU, or the path MTU a route get answer has cached


    def text(self) -> str:
        """As `ip route` prints it (the parts the lab uses)."""
        dst = "default" if self.dst.prefixlen == 0 else str(self.dst)
        head = dst if self.type == "unicast" else f"{self.type} {dst}"
        parts = [head]
        if self.via is not None:
            parts.append(f"via {self.via}")
        if self.dev:
            parts.append(f"dev {self.dev}")
        if self.proto not in ("boot", "unspec"):
            parts.append(f"proto {self.proto}")
        if self.onlink:
            parts.append("onlink")
        return " ".join(parts)


@dataclass(frozen=True)
class FdbEntry:
    """A forwarding entry of a VXLAN device: frames for `mac` go to the VTEP at `dst`."""

    dev: str
    mac: str
    dst: IPv4Address | None


@dataclass(frozen=True)
class NeighEntry:
    dev: str
    ip: IPv4Address
    mac: str
    state: str


@dataclass
class NsView:
    """One network namespace as the kernel holds it."""

    name: str
    links: dict[str, LinkView] = field(default_factory=dict)
    addrs: dict[str, list[IPv4Interface]] = field(default_factory=dict)
    routes: list[RouteView] = field(default_factory=list)
    fdb: list[FdbEntry] = field(default_factory=list)
    neigh: list[NeighEntry] = field(default_factory=list)

    def route_to(self, dst: IPv4Network) -> RouteView | None:
        return next((r for r in self.routes if r.dst == dst), None)

    def has_addr(self, dev: str, ip: IPv4Address) -> bool:
        return any(a.ip == ip for a in self.addrs.get(dev, []))


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def read_links(handle: Rtnl) -> dict[int, LinkView]:
    raw = handle.links()
    names = {link.index: link.name for link in raw}
    return {link.index: LinkView(name=link.name, kind=link.kind, up=link.up,
                                 carrier=link.operstate in (IF_OPER_UP, IF_OPER_UNKNOWN, None), mtu=link.mtu,
                                 master=names.get(link.master) if link.master else None, mac=link.mac,
                                 index=link.index)
            for link in raw}


def _route_of(payload: bytes, names: dict[int, str]) -> tuple[RouteView, int]:
    """One RTM_NEWROUTE message as a RouteView (first next hop of a multipath route), and its table."""
    _fam, dst_len, _src_len, _tos, tbl, proto, _scope, rtype, flags = RTMSG.unpack_from(payload)
    attrs = parse_attrs(payload, RTMSG.size)
    table = struct.unpack("=I", attrs[RTA_TABLE])[0] if RTA_TABLE in attrs else tbl
    dst = IPv4Address(attrs[RTA_DST]) if RTA_DST in attrs else IPv4Address(0)
    gateway = attrs.get(RTA_GATEWAY)
    oif = struct.unpack("=I", attrs[RTA_OIF])[0] if RTA_OIF in attrs else None
    if RTA_MULTIPATH in attrs and len(attrs[RTA_MULTIPATH]) >= RTNEXTHOP.size:
        length, nh_flags, _hops, ifindex = RTNEXTHOP.unpack_from(attrs[RTA_MULTIPATH])
        nested = parse_attrs(attrs[RTA_MULTIPATH][:length], RTNEXTHOP.size)
        gateway, oif, flags = nested.get(RTA_GATEWAY, gateway), ifindex, flags | nh_flags
    prefsrc = attrs.get(RTA_PREFSRC)
    metrics = parse_attrs(attrs.get(RTA_METRICS, b""))
    mtu = struct.unpack("=I", metrics[RTAX_MTU])[0] if RTAX_MTU in metrics else None
    return RouteView(dst=IPv4Network(f"{dst}/{dst_len}", strict=False),
                     via=IPv4Address(gateway) if gateway else None,
                     dev=names.get(oif) if oif is not None else None,
                     proto=PROTOCOLS.get(proto, str(proto)), type=ROUTE_TYPES.get(rtype, str(rtype)),
                     onlink=bool(flags & RTNH_F_ONLINK),
                     src=IPv4Address(prefsrc) if prefsrc else None, mtu=mtu), table


def read_routes(handle: Rtnl, names: dict[int, str]) -> list[RouteView]:
    """The main table, every route type (a blackhole a learner added is a route too)."""
    body = RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
    out = []
    for kind, payload in handle.request(RTM_GETROUTE, body, dump=True):
        if kind == RTM_NEWROUTE:
            route, table = _route_of(payload, names)
            if table == RT_TABLE_MAIN:
                out.append(route)
    return out


def read_neighbours(handle: Rtnl, names: dict[int, str]) -> tuple[list[NeighEntry], list[FdbEntry]]:
    """IPv4 neighbours (ARP) and the forwarding entries of VXLAN devices (bridge FDB of bridges is left out)."""
    neigh: list[NeighEntry] = []
    fdb: list[FdbEntry] = []
    for family in (socket.AF_INET, AF_BRIDGE):
        for kind, payload in handle.request(RTM_GETNEIGH, NDMSG.pack(family, 0, 0, 0, 0), dump=True):
            if kind != RTM_NEWNEIGH:
                continue
            _fam, ifindex, state, _flags, _type = NDMSG.unpack_from(payload)
            attrs = parse_attrs(payload, NDMSG.size)
            dev = names.get(ifindex, str(ifindex))
            if family == socket.AF_INET and NDA_DST in attrs:
                neigh.append(NeighEntry(dev, IPv4Address(attrs[NDA_DST]), _mac(attrs.get(NDA_LLADDR, b"")),
                                        NUD_STATES.get(state, hex(state))))
            elif family == AF_BRIDGE and NDA_DST in attrs and len(attrs[NDA_DST]) == 4:
                fdb.append(FdbEntry(dev, _mac(attrs.get(NDA_LLADDR, b"")), IPv4Address(attrs[NDA_DST])))
    return neigh, fdb


def read_namespace(ns: str, full: bool = True) -> NsView | None:
    """Everything rtnetlink tells about a namespace (`full=False`: links, addresses); None when it is gone."""
    if not netns.exists(ns):
        return None
    try:
        handle = netns.rtnl_in(ns)
    except OSError:
        return None
    try:
        links = read_links(handle)
        names = {i: link.name for i, link in links.items()}
        view = NsView(name=ns, links={link.name: link for link in links.values()})
        for index, address in handle.addrs():
            view.addrs.setdefault(names.get(index, str(index)), []).append(address)
        if not full:
            return view
        view.routes = read_routes(handle, names)
        view.neigh, view.fdb = read_neighbours(handle, names)
        return view
    finally:
        handle.close()


def route_get(handle: Rtnl, dst: IPv4Address, src: IPv4Address | None = None, iif: int | None = None,
              names: dict[int, str] | None = None, fibmatch: bool = True) -> RouteView | str:
    """The kernel's own routing decision (`ip route get [fibmatch] DST [from SRC iif DEV]`).

    With `fibmatch` the answer is the table entry that matched (prefix, next hop, protocol), which is what
    a learner finds again in `ip route`. Returns the kernel's error text when it has no route.
    """
    src_len = 32 if src is not None else 0
    body = RTMSG.pack(socket.AF_INET, 32, src_len, 0, 0, 0, 0, 0, RTM_F_FIB_MATCH if fibmatch else 0)
    body += struct.pack("=HH", 8, RTA_DST) + dst.packed
    if src is not None:
        body += struct.pack("=HH", 8, RTA_SRC) + src.packed
    if iif is not None:
        body += struct.pack("=HHI", 8, RTA_IIF, iif)
    try:
        replies = handle.request(RTM_GETROUTE, body)
    except NetlinkError as exc:
        return exc.strerror or str(exc)
    for kind, payload in replies:
        if kind == RTM_NEWROUTE:
            return _route_of(payload, names or {})[0]
    return "no answer"


# --------------------------------------------------------------------------------------- rule views

@dataclass(frozen=True)
class Rule:
    """One firewall rule with its packet counter (None when it has none), in either iptables or nftables.

    `where` names it the way a learner finds it again: `iptables nat KUBE-SVC-X #2` or
    `nft ip kube-proxy service-... handle 46`.
    """

    where: str
    chain: str
    text: str
    packets: int | None
    verdict: str | None  # DNAT, DROP, REJECT, ACCEPT, MASQUERADE, jump:CHAIN, goto:CHAIN, ...
    comment: str | None = None
    dnat: str | None = None  # ip:port a DNAT rule translates to

    @property
    def drops(self) -> bool:
        return self.verdict in ("DROP", "REJECT", "drop", "reject")


_COMMENT = re.compile(r'-m comment --comment (?:"((?:[^"\\]|\\.)*)"|(\S+))')
_TARGET = re.compile(r"(?:^| )-([jg]) (\S+)")
_DNAT_TO = re.compile(r"--to-destination (\S+)")


def parse_iptables_save(text: str) -> list[Rule]:
    """`iptables-save -c` output as rules in order, with built-in chains' policies as rules too (their
    counter is what the policy caught: a chain policy DROP is a drop like any rule)."""
    declared: set[tuple[str, str]] = set()
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            declared.add((table, line[1:].split(" ", 1)[0]))
    rules: list[Rule] = []
    index: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            table, index = line[1:].strip(), {}
        elif line.startswith(":"):
            m = re.match(r":(\S+) (\S+) \[(\d+):(\d+)\]", line)
            if m and m.group(2) != "-":
                rules.append(Rule(f"iptables {table} {m.group(1)} policy", m.group(1), f"policy {m.group(2)}",
                                  int(m.group(3)), m.group(2)))
        else:
            m = re.match(r"(?:\[(\d+):(\d+)\] )?-A (\S+) ?(.*)", line)
            if not m:
                continue
            chain, spec = m.group(3), m.group(4)
            index[chain] = index.get(chain, 0) + 1
            target = _TARGET.search(spec)
            verdict = None
            if target:
                name = target.group(2)
                verdict = f"{'jump' if target.group(1) == 'j' else 'goto'}:{name}" if (table, name) in declared \
                    else name
            comment = _COMMENT.search(spec)
            dnat = _DNAT_TO.search(spec) if verdict == "DNAT" else None
            rules.append(Rule(f"iptables {table} {chain} #{index[chain]}", chain, f"-A {chain} {spec}",
                              int(m.group(1)) if m.group(1) is not None else None, verdict,
                              (comment.group(1) or comment.group(2)) if comment else None,
                              dnat.group(1) if dnat else None))
    return rules


def _nft_value(v: Any) -> str:
    if isinstance(v, dict):
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        if "range" in v:
            return "-".join(_nft_value(x) for x in v["range"])
        if "set" in v:
            return "{ " + ", ".join(_nft_value(x) for x in v["set"]) + " }"
        if "concat" in v:
            return " . ".join(_nft_value(x) for x in v["concat"])
        if "payload" in v:
            p = v["payload"]
            return f"{p.get('protocol', '')} {p.get('field', '')}".strip()
        if "meta" in v:
            return f"meta {v['meta'].get('key')}"
        if "ct" in v:
            return f"ct {v['ct'].get('key')}"
        if "fib" in v:
            return f"fib {' . '.join(v['fib'].get('flags', []))} {v['fib'].get('result')}"
        return json.dumps(v, separators=(",", ":"))
    if isinstance(v, list):
        return "{ " + ", ".join(_nft_value(x) for x in v) + " }"
    return str(v)


def _nft_statement(expr: dict[str, Any]) -> str:
    """A readable rendering of one nft JSON statement, close to `nft list` syntax."""
    (key, value), = expr.items()
    if key == "match":
        op = value.get("op", "==")
        left, right = _nft_value(value["left"]), _nft_value(value["right"])
        return f"{left} {right}" if op in ("==", "in") else f"{left} {op} {right}"
    if key in ("jump", "goto"):
        return f"{key} {value['target']}"
    if key == "counter":
        return f"counter packets {value.get('packets', 0)}" if isinstance(value, dict) else "counter"
    if key == "dnat":
        port = f":{value['port']}" if "port" in value else ""
        return f"dnat to {value.get('addr', '')}{port}"
    if key == "vmap":
        return f"{_nft_value(value['key'])} vmap {value['data'] if isinstance(value['data'], str) else '{...}'}"
    if key in ("accept", "drop", "return", "continue", "masquerade"):
        return key
    if key == "reject":
        return "reject" + (f" with {value['type']}" if isinstance(value, dict) and "type" in value else "")
    if key == "log":
        return "log"
    return key


def parse_nft_json(data: dict[str, Any]) -> tuple[list[Rule], dict[str, dict[str, str]]]:
    """`nft -j list ruleset` (or one table) as rules and the verdict maps' elements (map -> key -> verdict)."""
    rules: list[Rule] = []
    maps: dict[str, dict[str, str]] = {}
    for obj in data.get("nftables", []):
        if "map" in obj:
            m = obj["map"]
            elements: dict[str, str] = {}
            for elem in m.get("elem", []):
                if isinstance(elem, list) and len(elem) == 2:
                    verdict = elem[1]
                    if isinstance(verdict, dict):
                        (vkey, vval), = verdict.items()
                        verdict = f"{vkey} {vval['target']}" if isinstance(vval, dict) and "target" in vval else vkey
                    elements[_nft_value(elem[0])] = str(verdict)
            maps[f"{m['family']} {m['table']} {m['name']}"] = elements
        elif "rule" in obj:
            r = obj["rule"]
            exprs = r.get("expr", [])
            packets = None
            verdict = None
            dnat = None
            for e in exprs:
                if "counter" in e and isinstance(e["counter"], dict):
                    packets = int(e["counter"].get("packets", 0))
                for word in ("drop", "reject", "accept", "masquerade", "snat", "return"):
                    if word in e:
                        verdict = word
                if "dnat" in e:
                    verdict = "dnat"
                    dnat = f"{e['dnat'].get('addr')}" + (f":{e['dnat']['port']}" if "port" in e["dnat"] else "")
                for word in ("jump", "goto"):
                    if word in e:
                        verdict = f"{word}:{e[word]['target']}"
            text = " ".join(_nft_statement(e) for e in exprs)
            comment = r.get("comment")
            if comment:
                text += f' comment "{comment}"'
            rules.append(Rule(f"nft {r['family']} {r['table']} {r['chain']} handle {r['handle']}", r["chain"], text,
                              packets, verdict, comment, dnat))
    return rules, maps


def _run_in(ns: str, argv: list[str], timeout: float = 5) -> str:
    """Run a read-only tool inside a namespace (entered in-process: no `ip netns exec` per call)."""
    with netns.entered(ns):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return ""
    return proc.stdout if proc.returncode == 0 else ""


def iptables_rules(ns: str, table: str | None = None, backend: str | None = None) -> list[Rule]:
    """A namespace's iptables rules with their counters, from `backend` ("nft" or "legacy"); None: the
    backend that holds rules there, the machine's own `iptables` first (a lab loads kube-proxy's rules
    into that one unless spec.kubeProxy.iptables says otherwise)."""
    from services.kube_proxy import host_iptables_backend, iptables_save

    tail = ["-c"] + (["-t", table] if table else [])
    if backend is not None:
        return parse_iptables_save(_run_in(ns, iptables_save(backend) + tail))
    first = host_iptables_backend()
    rules = parse_iptables_save(_run_in(ns, iptables_save(first) + tail))
    if rules:
        return rules
    return parse_iptables_save(_run_in(ns, iptables_save("legacy" if first == "nft" else "nft") + tail))


def nft_rules(ns: str, table: str | None = None) -> tuple[list[Rule], dict[str, dict[str, str]]]:
    argv = ["nft", "-j", "list"] + (["table", "ip", table] if table else ["ruleset"])
    text = _run_in(ns, argv)
    try:
        return parse_nft_json(json.loads(text)) if text else ([], {})
    except ValueError:
        return [], {}


def rule_counters(ns: str) -> dict[str, Rule]:
    """Every counted rule of a namespace (iptables, whichever backend holds them, and nftables), keyed by where it is."""
    rules = iptables_rules(ns) + nft_rules(ns)[0]
    return {r.where: r for r in rules if r.packets is not None}


# --------------------------------------------------------------------------------------- services



def iptables_services(rules: list[Rule]) -> dict[ServiceKey, list[str]]:
    """ClusterIP:port -> DNAT targets, followed KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP -> DNAT."""
    by_chain: dict[str, list[Rule]] = {}
    for r in rules:
        if r.where.startswith("iptables nat "):
            by_chain.setdefault(r.chain, []).append(r)
    out: dict[ServiceKey, list[str]] = {}
    for r in by_chain.get("KUBE-SERVICES", []):
        m = re.search(r"-d (\S+?)(?:/32)? -p (\w+) .*--dport (\d+)", r.text)
        if not m or not (r.verdict or "").startswith("jump:"):
            continue
        targets = []
        for svc_rule in by_chain.get(r.verdict.split(":", 1)[1], []):
            if (svc_rule.verdict or "").startswith("jump:KUBE-SEP-"):
                for sep_rule in by_chain.get(svc_rule.verdict.split(":", 1)[1], []):
                    if sep_rule.dnat and sep_rule.dnat not in targets:
                        targets.append(sep_rule.dnat)
        out[(m.group(1), m.group(2), int(m.group(3)))] = targets
    return out


def nft_services(rules: list[Rule], maps: dict[str, dict[str, str]]) -> dict[ServiceKey, list[str]]:
    """ClusterIP:port -> DNAT targets, followed service-ips map -> service chain -> endpoint chains -> dnat."""
    by_chain: dict[str, list[Rule]] = {}
    for r in rules:
        if r.where.startswith("nft ip kube-proxy "):
            by_chain.setdefault(r.chain, []).append(r)
    out: dict[ServiceKey, list[str]] = {}
    for key, verdict in maps.get("ip kube-proxy service-ips", {}).items():
        parts = key.split(" . ")
        if len(parts) != 3 or not verdict.startswith(("goto ", "jump ")):
            continue
        targets = []
        for rule in by_chain.get(verdict.split(" ", 1)[1], []):
            if (rule.verdict or "").startswith(("goto:endpoint-", "jump:endpoint-")):
                for ep_rule in by_chain.get(rule.verdict.split(":", 1)[1], []):
                    if ep_rule.dnat and ep_rule.dnat not in targets:
                        targets.append(ep_rule.dnat)
        out[(parts[0], parts[1], int(parts[2]))] = targets
    return out


def services_in(ns: str, mode: str) -> dict[ServiceKey, list[str]]:
    """The services a node's kernel actually translates, and to which endpoints."""
    if mode == "nftables":
        return nft_services(*nft_rules(ns, "kube-proxy"))
    if mode == "iptables":
        return iptables_services(iptables_rules(ns, "nat"))
    if mode == "ipvs":
        return ipvs_services(ipvs_servers(ns))
    return {}


# --------------------------------------------------------------------------------------- a whole lab

@dataclass
class Observation:
    """What the kernel and the daemons of one lab hold right now."""

    namespaces: dict[str, NsView | None] = field(default_factory=dict)  # netns name -> view (None: gone)
    bgp: dict[str, dict[str, str]] = field(default_factory=dict)  # speaker -> peer name -> BGP state
    services: dict[str, dict[ServiceKey, list[str]]] = field(default_factory=dict)  # node -> programmed
    tunnels: dict[str, dict[str, str]] = field(default_factory=dict)  # cilium: node -> PodCIDR -> node IP


def observe(lab: Any, pod_namespaces: list[str], frr_folder: Any) -> Observation:
    """Read every namespace of a lab (nodes, routers, external hosts, switches, the given pods), every FRR
    instance's sessions and every node's service rules. `frr_folder(name)` is an instance's folder."""
    from concurrent.futures import ThreadPoolExecutor

    from routing import bgp, frr
    from topo import underlay

    plan = underlay.plan(lab)
    spaces = [h.netns for h in plan.hosts] + list(plan.switch_netns)
    obs = Observation(namespaces={ns: read_namespace(ns) for ns in spaces})  # pods: links, addresses (graph.py)
    obs.namespaces.update({ns: read_namespace(ns, full=False) for ns in pod_namespaces})
    speakers = bgp.node_speakers(lab) + bgp.router_speakers(lab)
    if speakers:
        # vtysh does not need the namespace (it talks to the instance's socket): ask all at once.
        with ThreadPoolExecutor(max_workers=min(8, len(speakers))) as pool:
            states = pool.map(lambda s: frr.peer_states(frr_folder(s.name)) if frr_folder(s.name).is_dir() else {},
                              speakers)
            obs.bgp = {s.name: st for s, st in zip(speakers, states)}
    for node in lab.nodes:
        ns = lab.node_netns(node.name)
        if obs.namespaces.get(ns) is not None:
            obs.services[node.name] = services_in(ns, lab.kube_proxy.mode)
    return obs
