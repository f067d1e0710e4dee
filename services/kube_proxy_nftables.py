"""kube-proxy's nftables mode for one node: its `table ip kube-proxy`, built as data, rendered whole or as
the difference from the ruleset the node already holds.

The structure and names are kube-proxy's (pkg/proxy/nftables/proxier.go): one table `kube-proxy`; base
chains `filter-input`/`filter-forward`/`filter-output` (priority -110), `nat-prerouting`/`nat-output`
(-100, dstnat) and `nat-postrouting` (100, srcnat); the `services` chain looks the packet up ONCE in the
`service-ips` verdict map (`ip daddr . meta l4proto . th dport`), and local addresses in the
`service-nodeports` map (`meta l4proto . th dport`), each element a `goto` to the service port's own
chain: constant-time lookup however many services there are. Per service port: `service-<HASH>-ns/name/
proto/port` (Cluster policy: every endpoint), `local-...` (externalTrafficPolicy Local: this node's
endpoints), `external-...` (NodePort entry), and per endpoint `endpoint-<HASH>-ns/name/proto/port__ip/port`
and, with ClientIP affinity, a set `affinity-...` with the affinity timeout. HASH is kube-proxy's: the
first 8 characters of base32(sha256(the rest of the name)). Masquerading is kube-proxy's: chains jump to
`mark-for-masquerade` (mark |= 0x4000), `masquerading` in postrouting masquerades marked packets with
`fully-random`. Services without endpoints are REJECTed through `no-endpoint-services` /
`no-endpoint-nodeports` (verdict maps in `endpoints-check`, reached from the filter hooks for new
connections); a NodePort with externalTrafficPolicy Local and no local endpoint is DROPped there.

The one deliberate difference: kube-proxy picks an endpoint with an anonymous map per service
(`numgen random mod N vmap { 0 : goto A, 1 : goto B }`). nft 1.0.6 loads that shape quadratically (82 s
at 10,000 services, see /work/shared/kernel-notes.md). Here a service chain picks with N-1 plain rules,
`numgen random mod (N-i) == 0 goto endpoint-i` for i = 0..N-2, then `goto` the last endpoint: each rule
draws a fresh random number, rule i is reached with probability (N-i)/N and taken with 1/(N-i), so every
endpoint gets exactly 1/N (iptables' `statistic --probability` ladder, exact with integers).

Measured here (nft 1.0.6, kernel 6.18, 2 cores), `nft -f` in a fresh `unshare -n` namespace, 2 endpoints
per service; "+1" is one new service applied as a delta to the loaded table:

    endpoint pick                              1,000    4,000    10,000 services   +1 service
    anonymous vmap per service (kube-proxy)    0.25 s   2.5 s    82 s (notes)      0.04 s at 4,000
    one named map per service                  0.22 s   1.4 s    6.6 s             0.13 s at 10,000
    one global map, key addr.proto.port.numgen 0.36 s   3.8 s    24 s              18.5 s at 10,000
    rule ladder in the service chain (chosen)  0.15 s   0.64 s   1.5-1.8 s         0.10 s at 10,000

This module's own output at 10,000 services x 2 endpoints: full load 1.66-1.80 s (Python build + render
0.4 s more); deltas at 10,000: one service added 0.10-0.13 s, one endpoint changed 0.11-0.12 s, one
service deleted 0.07 s (mostly nft reading the table back for its cache; the partial sync now sends its
deltas over netlink instead, services/nft_netlink.py: one service added 0.03-0.05 s, the kernel's
commit). ClientIP affinity keeps kube-proxy's shape, one dynamic set per endpoint, and named sets load
like named maps: 10,000 services ALL with ClientIP took 37 s (1,000: 0.45 s; 4,000: 5.2 s), deltas
0.26 s. A real dataplane check (3,000 new UDP flows to a 3-endpoint service) counted 1030 / 999 / 971.

The pod egress NAT (Flannel's convention, which a CNI owns, not kube-proxy) is a separate small table,
`ip kubenet-egress`, chain `postrouting` (nat, priority 100): pod to pod RETURN; pod to anything else but
multicast MASQUERADE; outside the cluster to this node's pods RETURN (a NodePort with policy Local keeps
the client IP); outside the cluster to other nodes' pods MASQUERADE. `render_full` replaces both tables
in one transaction; `render_delta` rewrites the egress table only if it changed.

Apply with `nft -f -` inside the node's namespace (services/kube_proxy.py); partial syncs send their
delta as one netlink batch (services/nft_netlink.py, kube_proxy_nft_sync.py). Pure: nothing here touches
the kernel.
"""
from __future__ import annotations

import base64
import functools
import hashlib
from dataclasses import dataclass
from ipaddress import IPv4Network
from itertools import compress, repeat
from operator import is_
from typing import Any

from services.endpoints import Endpoint, ServicePortEndpoints
from topo.model import Cluster, Node

TABLE = "kube-proxy"
EGRESS_TABLE = "kubenet-egress"
FORMAT = 1  # to_json's layout version
MASQ_MARK = "0x4000"  # kube-proxy's --masquerade-bit 14

# chain and map names, as in kube-proxy's proxier.go
SERVICES = "services"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
ENDPOINTS_CHECK = "endpoints-check"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
REJECT_CHAIN = "reject-chain"
MARK_MASQ = "mark-for-masquerade"
MASQUERADING = "masquerading"

NAME_BASE_MAX = 240  # kube-proxy's chainNameBaseLengthMax (nft names hold 256 bytes, prefixes up to 16)
NODEPORT_MATCH = "fib daddr type local ip daddr != 127.0.0.0/8"  # every local address except loopback


@dataclass(frozen=True)
class Chain:
    name: str
    rules: tuple[str, ...]
    hook: str = ""  # a base chain's declaration, e.g. "type nat hook output priority -100; policy accept;"


@dataclass(frozen=True)
class Map:
    name: str
    type: str  # e.g. "ipv4_addr . inet_proto . inet_service : verdict"
    comment: str
    elements: tuple[tuple[str, str], ...]  # (key, verdict), e.g. ("10.96.0.10 . udp . 53", "goto service-...")


@dataclass(frozen=True)
class Set:
    """A dynamic set (ClientIP affinity): the dataplane fills it; only its declaration is ours."""

    name: str
    declaration: str  # e.g. "type ipv4_addr; flags dynamic,timeout; timeout 10800s;"


@dataclass(frozen=True)
class Ruleset:
    """One node's `table ip kube-proxy` (chains, maps, sets) plus the `table ip kubenet-egress` chains."""

    chains: tuple[Chain, ...]
    maps: tuple[Map, ...]
    sets: tuple[Set, ...] = ()
    egress: tuple[Chain, ...] = ()

    def chain(self, name: str) -> Chain:
        for chain in self.chains:
            if chain.name == name:
                return chain
        raise KeyError(name)

    def map(self, name: str) -> Map:
        for m in self.maps:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def chain_rules(self) -> dict[str, tuple[str, ...]]:
        return {c.name: c.rules for c in self.chains}


# --- names -----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1 << 17)  # a long-running sync recomputes the same names every time
def hash_and_truncate(name: str) -> str:
    """kube-proxy's hashAndTruncate: 8 base32 characters of the name's sha256, '-', the name."""
    digest = base64.b32encode(hashlib.sha256(name.encode()).digest()[:5]).decode()  # 5 bytes: 8 characters
    name = f"{digest}-{name}"
    return name if len(name) <= NAME_BASE_MAX else name[:NAME_BASE_MAX - 3] + "..."


def _port_base(sp: ServicePortEndpoints) -> str:
    return f"{sp.service.namespace}/{sp.service.name}/{sp.protocol}/{sp.port.name}"


def service_chain(sp: ServicePortEndpoints) -> str:
    return "service-" + hash_and_truncate(_port_base(sp))


def local_chain(sp: ServicePortEndpoints) -> str:
    return "local-" + hash_and_truncate(_port_base(sp))


def external_chain(sp: ServicePortEndpoints) -> str:
    return "external-" + hash_and_truncate(_port_base(sp))


def _endpoint_base(sp: ServicePortEndpoints, ep: Endpoint) -> str:
    return hash_and_truncate(f"{_port_base(sp)}__{ep.ip}/{ep.port}")


def endpoint_chain(sp: ServicePortEndpoints, ep: Endpoint) -> str:
    return "endpoint-" + _endpoint_base(sp, ep)


def affinity_set(sp: ServicePortEndpoints, ep: Endpoint) -> str:
    return "affinity-" + _endpoint_base(sp, ep)


# --- build -----------------------------------------------------------------------------------------

def _base(kind: str, hook: str, priority: int) -> str:
    return f"type {kind} hook {hook} priority {priority}; policy accept;"


def _static_chains() -> list[Chain]:
    verdict_lookup = "ip daddr . meta l4proto . th dport vmap @"
    nodeport_lookup = f"{NODEPORT_MATCH} meta l4proto . th dport vmap @"
    check = (f"ct state new jump {ENDPOINTS_CHECK}",)
    return [
        Chain("filter-input", check, _base("filter", "input", -110)),
        Chain("filter-forward", check, _base("filter", "forward", -110)),
        Chain("filter-output", check, _base("filter", "output", -110)),
        Chain("nat-prerouting", (f"jump {SERVICES}",), _base("nat", "prerouting", -100)),
        Chain("nat-output", (f"jump {SERVICES}",), _base("nat", "output", -100)),
        Chain("nat-postrouting", (f"jump {MASQUERADING}",), _base("nat", "postrouting", 100)),
        Chain(ENDPOINTS_CHECK, (verdict_lookup + NO_ENDPOINT_SERVICES, nodeport_lookup + NO_ENDPOINT_NODEPORTS)),
        Chain(REJECT_CHAIN, ("reject",)),
        Chain(SERVICES, (verdict_lookup + SERVICE_IPS, nodeport_lookup + SERVICE_NODEPORTS)),
        Chain(MARK_MASQ, (f"meta mark set meta mark or {MASQ_MARK}",)),
        Chain(MASQUERADING, (f"meta mark and {MASQ_MARK} == 0 return",
                             f"meta mark set meta mark xor {MASQ_MARK}",
                             "masquerade fully-random")),
    ]


def _egress(node: Node, cluster: Cluster) -> tuple[Chain, ...]:
    """Flannel's masquerade rules, in nft: pods leaving the pod network are NATed to the node."""
    pods, mine = cluster.pod_cidr, node.pod_cidr
    return (Chain("postrouting", (
        f"ip saddr {pods} ip daddr {pods} return",
        f"ip saddr {pods} ip daddr != 224.0.0.0/4 masquerade fully-random",
        f"ip saddr != {pods} ip daddr {mine} return",
        f"ip saddr != {pods} ip daddr {pods} masquerade fully-random",
    ), _base("nat", "postrouting", 100)),)


def _pick(eps: list[tuple[str, str]], affinity: bool) -> list[str]:
    """Affinity first (a known client goes back to its endpoint), then a uniform random pick.

    `eps` holds (endpoint chain, affinity set) pairs."""
    rules = [f"ip saddr @{aff} goto {chain}" for chain, aff in eps] if affinity else []
    n = len(eps)
    for i, (chain, _) in enumerate(eps[:-1]):
        rules.append(f"numgen random mod {n - i} == 0 goto {chain}")
    rules.append(f"goto {eps[-1][0]}")
    return rules


@dataclass(frozen=True)
class _PortRules:
    """What one service port contributes: map elements, chains and affinity sets."""

    elements: tuple[tuple[str, str, str], ...]  # (map, key, verdict)
    chains: tuple[Chain, ...]
    sets: tuple[Set, ...]


@functools.lru_cache(maxsize=1 << 16)
def _port_rules(sp: ServicePortEndpoints, node_name: str, pods: IPv4Network) -> _PortRules:
    elements: list[tuple[str, str, str]] = []
    chains: dict[str, Chain] = {}
    sets: dict[str, Set] = {}
    svc, port = sp.service, sp.port
    proto = sp.protocol
    node_port = port.node_port if svc.type in ("NodePort", "LoadBalancer") else None
    ext_local = node_port is not None and svc.external_traffic_policy == "Local"
    affinity = svc.session_affinity == "ClientIP"
    all_eps = sp.endpoints
    local_eps = sp.local(node_name)
    has_eps = bool(all_eps)
    has_ext_eps = has_eps and (bool(local_eps) or not ext_local)
    port_base = hash_and_truncate(_port_base(sp))
    cluster_ch, local_ch, ext_ch = f"service-{port_base}", f"local-{port_base}", f"external-{port_base}"

    key = f"{svc.cluster_ip} . {proto} . {port.port}"
    if has_eps:
        elements.append((SERVICE_IPS, key, f"goto {cluster_ch}"))
    else:
        elements.append((NO_ENDPOINT_SERVICES, key, f"goto {REJECT_CHAIN}"))
    if node_port is not None:
        np_key = f"{proto} . {node_port}"
        if has_eps:
            elements.append((SERVICE_NODEPORTS, np_key, f"goto {ext_ch}"))
        if not has_ext_eps:
            elements.append((NO_ENDPOINT_NODEPORTS, np_key, "drop" if has_eps else f"goto {REJECT_CHAIN}"))
    if not has_eps:
        return _PortRules(tuple(elements), (), ())

    named: dict[Endpoint, tuple[str, str]] = {}  # endpoint -> (its chain, its affinity set)
    for ep in all_eps:  # endpoint chains first: the chains below jump to them
        ip = str(ep.ip)
        ep_base = hash_and_truncate(f"{_port_base(sp)}__{ip}/{ep.port}")
        chain, aff = named[ep] = f"endpoint-{ep_base}", f"affinity-{ep_base}"
        rules = [f"ip saddr {ip} jump {MARK_MASQ}"]  # hairpin: an endpoint reaching itself
        if affinity:
            sets[aff] = Set(aff, f"type ipv4_addr; flags dynamic,timeout; timeout {svc.affinity_timeout}s;")
            rules.append(f"update @{aff} {{ ip saddr }}")
        rules.append(f"meta l4proto {proto} dnat to {ip}:{ep.port}")
        chains[chain] = Chain(chain, tuple(rules))

    # from outside the pod network (a node, an external host): masquerade, like --cluster-cidr
    rules = [f"ip daddr {svc.cluster_ip} {proto} dport {port.port} ip saddr != {pods} jump {MARK_MASQ}"]
    chains[cluster_ch] = Chain(cluster_ch, tuple(rules + _pick([named[e] for e in all_eps], affinity)))
    if ext_local and local_eps:
        chains[local_ch] = Chain(local_ch, tuple(_pick([named[e] for e in local_eps], affinity)))
    if node_port is not None:
        if not ext_local:
            rules = [f"jump {MARK_MASQ}", f"goto {cluster_ch}"]
        else:
            rules = [f"ip saddr {pods} goto {cluster_ch}",  # pods are not subject to the policy
                     f"fib saddr type local jump {MARK_MASQ}",  # the node itself: masquerade
                     f"fib saddr type local goto {cluster_ch}"]
            if local_eps:
                rules.append(f"goto {local_ch}")
        chains[ext_ch] = Chain(ext_ch, tuple(rules))
    return _PortRules(tuple(elements), tuple(chains.values()), tuple(sets.values()))


_BY_ID: dict[tuple, tuple] = {}  # (node name, pods) -> (service ports, kept alive; {their id: their part})
_NO_ADDRESS = _PortRules((), (), ())  # a service port without a ClusterIP (headless) contributes nothing


def parts(node: Node, sps: list[ServicePortEndpoints], cluster: Cluster) -> list[_PortRules]:
    """Each service port's contribution, in order. The service port objects of the last call for this node
    are looked up by identity (a pointer lookup, not hashing each one whole; done with map() so 10,000
    ports cost about a millisecond), the others in _port_rules' cache: a long-running sync after one change
    computes that change only."""
    key = (node.name, cluster.pod_cidr)
    kept = list(sps)
    ids = list(map(id, kept))
    last = _BY_ID.get(key)
    out: list = list(map(last[1].get, ids)) if last is not None else [None] * len(ids)
    for n in compress(range(len(out)), map(is_, out, repeat(None))):  # identity tests at C speed
        sp = kept[n]
        out[n] = (_port_rules(sp, node.name, cluster.pod_cidr) if sp.service.cluster_ip is not None
                  else _NO_ADDRESS)
    if len(_BY_ID) > 1024:  # nodes seen by this process
        _BY_ID.clear()
    _BY_ID[key] = (kept, dict(zip(ids, out)))
    if any(map(is_, out, repeat(_NO_ADDRESS))):
        return [p for p in out if p is not _NO_ADDRESS]
    return out


def assemble(node: Node, cluster: Cluster, port_parts: list[_PortRules]) -> Ruleset:
    """The node's whole kube-proxy table made of these contributions (and the fixed chains, maps, egress)."""
    chains: dict[str, Chain] = {c.name: c for c in _static_chains()}
    sets: dict[str, Set] = {}
    elements: dict[str, dict[str, str]] = {m: {} for m in (SERVICE_IPS, SERVICE_NODEPORTS,
                                                           NO_ENDPOINT_SERVICES, NO_ENDPOINT_NODEPORTS)}
    for part in port_parts:
        for map_name, key, verdict in part.elements:
            elements[map_name][key] = verdict
        for chain in part.chains:
            chains[chain.name] = chain
        for aff in part.sets:
            sets[aff.name] = aff

    verdict_map = "ipv4_addr . inet_proto . inet_service : verdict"
    nodeport_map = "inet_proto . inet_service : verdict"
    maps = (
        Map(NO_ENDPOINT_SERVICES, verdict_map, "vmap to drop or reject packets to services with no endpoints",
            tuple(elements[NO_ENDPOINT_SERVICES].items())),
        Map(NO_ENDPOINT_NODEPORTS, nodeport_map,
            "vmap to drop or reject packets to service nodeports with no endpoints",
            tuple(elements[NO_ENDPOINT_NODEPORTS].items())),
        Map(SERVICE_IPS, verdict_map, "ClusterIP traffic", tuple(elements[SERVICE_IPS].items())),
        Map(SERVICE_NODEPORTS, nodeport_map, "NodePort traffic", tuple(elements[SERVICE_NODEPORTS].items())),
    )
    return Ruleset(tuple(chains.values()), maps, tuple(sets.values()), _egress(node, cluster))


def build(node: Node, sps: list[ServicePortEndpoints], cluster: Cluster) -> Ruleset:
    """The node's whole kube-proxy table for these service ports (kube-proxy's syncProxyRules).

    Each service port's rules are computed once and reused while it is unchanged, so a sync in a
    long-running process after one change costs little more than that change.
    """
    return assemble(node, cluster, parts(node, sps, cluster))


# --- render ----------------------------------------------------------------------------------------

def _chain_block(chain: Chain, indent: str = "\t") -> str:
    lines = [f"{indent}chain {chain.name} {{"]
    if chain.hook:
        lines.append(f"{indent}\t{chain.hook}")
    lines.extend(f"{indent}\t{rule}" for rule in chain.rules)
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def _elements(m: Map, pairs: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> str:
    body = ",\n\t".join(f"{k} : {v}" for k, v in pairs)
    return f"add element ip {TABLE} {m.name} {{\n\t{body}\n}}"


def _replace_table(name: str, body: list[str]) -> list[str]:
    """`add` then `delete` then the new table: an atomic replace whether or not the table existed."""
    return [f"add table ip {name}", f"delete table ip {name}", f"table ip {name} {{", *body, "}"]


def _egress_script(rs: Ruleset) -> list[str]:
    return _replace_table(EGRESS_TABLE, [_chain_block(c) for c in rs.egress]) if rs.egress else []


def render_full(rs: Ruleset) -> str:
    """An `nft -f` script replacing the node's kube-proxy (and egress) tables in one transaction."""
    body = ['\tcomment "rules for kube-proxy"']
    for m in rs.maps:
        body.append(f"\tmap {m.name} {{\n\t\ttype {m.type}\n\t\tcomment \"{m.comment}\"\n\t}}")
    for s in rs.sets:
        body.append(f"\tset {s.name} {{\n\t\t{s.declaration}\n\t}}")
    body.extend(_chain_block(c) for c in rs.chains)
    lines = _replace_table(TABLE, body)
    lines.extend(_elements(m, m.elements) for m in rs.maps if m.elements)  # after the chains they name
    lines.extend(_egress_script(rs))
    return "\n".join(lines) + "\n"


def _skeleton(rs: Ruleset) -> tuple:
    """What a delta cannot change in place: base chain hooks, map names and types."""
    return (tuple((c.name, c.hook) for c in rs.chains if c.hook), tuple((m.name, m.type) for m in rs.maps))


def render_delta(old: Ruleset, new: Ruleset) -> str:
    """The script that turns a kernel holding `old` into one holding `new`, touching only what changed.

    Order matters: map elements that name a chain go first (deleted) and last (added); chains that go
    away are flushed (dropping their own references) and deleted only once nothing refers to them;
    new chains exist before any rule or element names them; an affinity set that must be re-created is
    re-created while no rule references it. Empty when nothing changed.
    """
    if _skeleton(old) != _skeleton(new):
        return render_full(new)
    t = f"ip {TABLE}"
    old_chains, new_chains = old.chain_rules, new.chain_rules
    old_sets = {s.name: s.declaration for s in old.sets}
    new_sets = {s.name: s.declaration for s in new.sets}
    gone_sets = [n for n in old_sets if n not in new_sets]
    redone_sets = [n for n in new_sets if n in old_sets and old_sets[n] != new_sets[n]]
    added_sets = [n for n in new_sets if n not in old_sets]

    added = [n for n in new_chains if n not in old_chains]
    deleted = [n for n in old_chains if n not in new_chains]
    refs = tuple(f"@{n} " for n in redone_sets)
    changed = [n for n in new_chains if n in old_chains and (
        old_chains[n] != new_chains[n] or (refs and any(r in rule + " " for rule in old_chains[n] for r in refs)))]

    lines: list[str] = []
    element_adds: list[str] = []
    for om, nm in zip(old.maps, new.maps):
        was, now = dict(om.elements), dict(nm.elements)
        drop = [k for k, v in was.items() if now.get(k) != v]
        put = [(k, v) for k, v in now.items() if was.get(k) != v]
        if drop:
            lines.append(f"delete element {t} {om.name} {{ {', '.join(drop)} }}")
        if put:
            element_adds.append(_elements(nm, put))
    lines.extend(f"add chain {t} {n}" for n in added)
    lines.extend(f"flush chain {t} {n}" for n in changed + deleted)
    lines.extend(f"delete set {t} {n}" for n in gone_sets + redone_sets)
    lines.extend(f"add set {t} {n} {{ {new_sets[n]} }}" for n in added_sets + redone_sets)
    for n in added + changed:
        lines.extend(f"add rule {t} {n} {rule}" for rule in new_chains[n])
    lines.extend(f"delete chain {t} {n}" for n in deleted)
    lines.extend(element_adds)
    if old.egress != new.egress:
        lines.extend(_egress_script(new) or [f"add table ip {EGRESS_TABLE}", f"delete table ip {EGRESS_TABLE}"])
    return "\n".join(lines) + "\n" if lines else ""


# --- persistence -----------------------------------------------------------------------------------

def _chain_json(c: Chain) -> dict[str, Any]:
    out: dict[str, Any] = {"name": c.name, "rules": list(c.rules)}
    if c.hook:
        out["hook"] = c.hook
    return out


def _chain_from(d: dict[str, Any]) -> Chain:
    return Chain(d["name"], tuple(d["rules"]), d.get("hook", ""))


def to_json(rs: Ruleset) -> dict[str, Any]:
    return {"format": FORMAT,
            "chains": [_chain_json(c) for c in rs.chains],
            "maps": [{"name": m.name, "type": m.type, "comment": m.comment,
                      "elements": [list(e) for e in m.elements]} for m in rs.maps],
            "sets": [{"name": s.name, "declaration": s.declaration} for s in rs.sets],
            "egress": [_chain_json(c) for c in rs.egress]}


def from_json(data: dict[str, Any]) -> Ruleset:
    if data.get("format") != FORMAT:
        raise ValueError(f"unknown kube-proxy nftables state format {data.get('format')!r}")
    return Ruleset(tuple(_chain_from(c) for c in data["chains"]),
                   tuple(Map(m["name"], m["type"], m["comment"], tuple((k, v) for k, v in m["elements"]))
                         for m in data["maps"]),
                   tuple(Set(s["name"], s["declaration"]) for s in data["sets"]),
                   tuple(_chain_from(c) for c in data["egress"]))
