"""kube-proxy's iptables mode, rendered for one node as a complete `iptables-restore` input.

Pure: no kernel, no root. `render()` (or `plan().text()`) returns the text a full sync loads with
`iptables-restore` (without --noflush) into a node's namespace, replacing its `nat` and `filter` tables
atomically. Later syncs are kube-proxy's partial ones (`--noflush`, only what changed, stale chains
deleted with `-X`), computed from two Plans by services/kube_proxy_partial.py; `render_delta` is the same
on two full texts.

Layout, chain names and comments are those of kube-proxy's `pkg/proxy/iptables/proxier.go` (current,
EndpointSlice-era versions), written in the form `iptables-save` prints, so a learner running
`iptables-save` in a lab node sees what a real node shows:

  nat      PREROUTING, OUTPUT -> KUBE-SERVICES ("kubernetes service portals")
           KUBE-SERVICES:  one rule per service port with endpoints: ClusterIP:port -> KUBE-SVC-X,
                           and last, addrtype LOCAL -> KUBE-NODEPORTS
           KUBE-NODEPORTS: NodePort -> KUBE-EXT-X
           KUBE-SVC-X:     masquerade off-cluster sources, then (ClientIP affinity "recent" checks and)
                           one random-probability jump per endpoint -> KUBE-SEP-Y
           KUBE-EXT-X:     externalTrafficPolicy Cluster: mark for masquerade, -> KUBE-SVC-X;
                           Local: pods and the node itself short-circuit to KUBE-SVC-X, everyone
                           else -> KUBE-SVL-X (this node's endpoints only, client IP kept)
           KUBE-SEP-Y:     hairpin masquerade, then DNAT to the endpoint
           POSTROUTING -> KUBE-POSTROUTING (MASQUERADE what KUBE-MARK-MASQ marked), then the CNI's
                           own egress NAT (Flannel's FLANNEL-POSTRTG, see egress_masquerade)
  filter   KUBE-SERVICES / KUBE-EXTERNAL-SERVICES: REJECT for service ports with no endpoints at all,
           DROP for a Local NodePort on a node without a local endpoint; KUBE-FORWARD, KUBE-FIREWALL.

Two spellings differ from what `iptables-save` prints back, on purpose: they are the values kube-proxy
itself writes into iptables-restore. `MARK --or-mark 0x4000` and `--xor-mark 0x4000` come back as
`--set-xmark 0x4000/0x4000` and `--set-xmark 0x4000/0x0`; a probability written as `%0.10f` of 1/n
(`0.3333333333`) comes back as the kernel's 31-bit fixed-point value printed with 11 decimals
(`0.33333333349`).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from services.endpoints import Endpoint, ServicePortEndpoints
from services.iptables_text import (FILTER_BUILTINS, KUBE_EXTERNAL_SERVICES, KUBE_NODEPORTS, KUBE_SERVICES,  # noqa: F401
                                    NAT_BUILTINS, TARGETS, chains, check_jumps, delta_tables, render_delta, tables)
from topo.model import Cluster, Node

MASQ_MARK = "0x4000"  # kube-proxy's default --iptables-masquerade-bit 14

KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_FIREWALL = "KUBE-FIREWALL"  # kubelet's chain; kube-proxy keeps a copy of its localnet rule
EGRESS_CHAIN = "FLANNEL-POSTRTG"

PROBABILITY_DIGITS = 10  # kube-proxy formats 1/n with %0.10f
# kube-proxy's largeClusterEndpointsThreshold: above this many endpoints in all, it leaves the comments out of
# the KUBE-SEP rules and of the KUBE-SVC/KUBE-SVL jumps to them ("large cluster mode": a smaller restore input
# and, here, a smaller x_tables blob for the legacy backend to replace on every change).
LARGE_CLUSTER_ENDPOINTS = 1000


# ------------------------------------------------------------------------------------------ names


@functools.lru_cache(maxsize=1 << 17)  # a long-running sync recomputes the same names every time
def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """16 characters of base32(sha256(name + protocol)): short enough for iptables' 28-character chain
    names. `service_port_name` is kube-proxy's ServicePortName string (`ns/name` or `ns/name:port`),
    `protocol` lower case (`tcp`, `udp`, `sctp`)."""
    digest = hashlib.sha256((service_port_name + protocol).encode()).digest()
    return base64.b32encode(digest).decode()[:16]


def service_chain(service_port_name: str, protocol: str) -> str:
    """KUBE-SVC-X: dispatch to all endpoints (Cluster traffic policy)."""
    return "KUBE-SVC-" + port_proto_hash(service_port_name, protocol)


def local_chain(service_port_name: str, protocol: str) -> str:
    """KUBE-SVL-X: dispatch to this node's endpoints only (Local traffic policy)."""
    return "KUBE-SVL-" + port_proto_hash(service_port_name, protocol)


def external_chain(service_port_name: str, protocol: str) -> str:
    """KUBE-EXT-X: where NodePort (and external/LB IP) traffic enters before its traffic policy."""
    return "KUBE-EXT-" + port_proto_hash(service_port_name, protocol)


def endpoint_chain(service_port_name: str, protocol: str, endpoint: str) -> str:
    """KUBE-SEP-Y: one endpoint (`ip:port`) of one service port; the same hash with the endpoint appended."""
    digest = hashlib.sha256((service_port_name + protocol + endpoint).encode()).digest()
    return "KUBE-SEP-" + base64.b32encode(digest).decode()[:16]


def probability(n: int) -> str:
    """The --probability of the rule choosing among the n endpoints still left: 1/n, as kube-proxy prints it."""
    return f"{1.0 / n:0.{PROBABILITY_DIGITS}f}"


# ------------------------------------------------------------------------------------ rule text

_SAFE = frozenset("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _quote(text: str) -> str:
    """A string argument as iptables-save writes it: bare when only [A-Za-z0-9_-], else double-quoted."""
    if text and all(c in _SAFE for c in text):
        return text
    escaped = "".join("\\" + c if c in "\"\\'" else c for c in text)
    return f'"{escaped}"'


def _c(text: str) -> str:
    return f"-m comment --comment {_quote(text)}"


class _Table:
    """One table of the restore input: its chains (built-ins first) and their rules, in order."""

    def __init__(self, name: str, builtins: tuple[str, ...]) -> None:
        self.name = name
        self.builtins = builtins
        self.rules: dict[str, list[str]] = {chain: [] for chain in builtins}

    def chain(self, *names: str) -> None:
        for name in names:
            self.rules.setdefault(name, [])

    def add(self, chain: str, spec: str) -> None:
        if chain not in self.rules:
            raise KeyError(f"{self.name}: chain {chain} used before it was declared")
        self.rules[chain].append(spec)

    def add_line(self, line: str) -> None:
        """Add a `-A CHAIN spec` line (what egress_masquerade returns)."""
        flag, chain, spec = line.split(" ", 2)
        assert flag == "-A", line
        self.add(chain, spec)

    def lines(self) -> list[str]:
        # iptables-save's order: built-in chains in hook order, then user chains by name; the rules
        # chain by chain in that same order.
        user = sorted(c for c in self.rules if c not in self.builtins)
        out = [f"*{self.name}"]
        out += [f":{chain} ACCEPT [0:0]" for chain in self.builtins]
        out += [f":{chain} - [0:0]" for chain in user]
        for chain in (*self.builtins, *user):
            out += [f"-A {chain} {spec}" for spec in self.rules[chain]]
        out.append("COMMIT")
        return out


# ------------------------------------------------------------------------------------ rendering


def egress_masquerade(pod_cidr: IPv4Network, node_pod_cidr: IPv4Network | None = None) -> list[str]:
    """The CNI's own egress NAT, as Flannel's `MasqRules` installs it (comment "flanneld masq"): the
    POSTROUTING jump and the rules of FLANNEL-POSTRTG, as `-A` lines (the caller declares the chain).

    Traffic kube-proxy marked is left to KUBE-POSTROUTING; pod to pod (anywhere in the cluster's pod
    CIDR) is never NATed; pods reaching anything else, except multicast, leave with the node's address.
    With `node_pod_cidr` (this node's PodCIDR) Flannel's two host rules follow: traffic from outside the
    pod network to this node's own pods keeps its source (an external client of a Local NodePort keeps
    its IP), and the node's own traffic to other nodes' pods is masqueraded.

    Service IPs need no exception here: POSTROUTING runs after the DNAT of PREROUTING/OUTPUT, so a pod's
    connection to a ClusterIP is already addressed to a pod IP and meets the pod-to-pod RETURN.
    """
    n = str(pod_cidr)
    masq = _c("flanneld masq")
    lines = [
        f"-A POSTROUTING {masq} -j {EGRESS_CHAIN}",
        f"-A {EGRESS_CHAIN} -m mark --mark {MASQ_MARK}/{MASQ_MARK} {masq} -j RETURN",
        f"-A {EGRESS_CHAIN} -s {n} -d {n} {masq} -j RETURN",
        f"-A {EGRESS_CHAIN} -s {n} ! -d 224.0.0.0/4 {masq} -j MASQUERADE --random-fully",
    ]
    if node_pod_cidr is not None:
        lines += [
            f"-A {EGRESS_CHAIN} ! -s {n} -d {node_pod_cidr} {masq} -j RETURN",
            f"-A {EGRESS_CHAIN} ! -s {n} -d {n} {masq} -j MASQUERADE --random-fully",
        ]
    return lines


def _skeleton(filt: _Table, nat: _Table) -> None:
    """The chains kube-proxy always creates and the jumps into them. kube-proxy prepends each jump, so
    in a built-in chain they end up in the reverse of the order it ensures them."""
    filt.chain(KUBE_EXTERNAL_SERVICES, KUBE_FIREWALL, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL,
               KUBE_SERVICES)
    new = "-m conntrack --ctstate NEW"
    lb_firewall = f"{new} {_c('kubernetes load balancer firewall')} -j {KUBE_PROXY_FIREWALL}"
    external = f"{new} {_c('kubernetes externally-visible service portals')} -j {KUBE_EXTERNAL_SERVICES}"
    portals = f"{new} {_c('kubernetes service portals')} -j {KUBE_SERVICES}"
    filt.add("INPUT", lb_firewall)
    filt.add("INPUT", f"{_c('kubernetes health check service ports')} -j {KUBE_NODEPORTS}")
    filt.add("INPUT", external)
    filt.add("INPUT", f"-j {KUBE_FIREWALL}")
    filt.add("FORWARD", lb_firewall)
    filt.add("FORWARD", f"{_c('kubernetes forwarding rules')} -j {KUBE_FORWARD}")
    filt.add("FORWARD", portals)
    filt.add("FORWARD", external)
    filt.add("OUTPUT", lb_firewall)
    filt.add("OUTPUT", portals)
    filt.add("OUTPUT", f"-j {KUBE_FIREWALL}")
    # route_localnet makes NodePorts answer on 127.0.0.1 (kube-proxy's default); this rule keeps other
    # hosts from reaching the node's loopback services through it.
    filt.add(KUBE_FIREWALL, f"! -s 127.0.0.0/8 -d 127.0.0.0/8 {_c('block incoming localnet connections')} "
                            "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP")

    nat.chain(KUBE_MARK_MASQ, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_SERVICES, EGRESS_CHAIN)
    nat.add("PREROUTING", f"{_c('kubernetes service portals')} -j {KUBE_SERVICES}")
    nat.add("OUTPUT", f"{_c('kubernetes service portals')} -j {KUBE_SERVICES}")
    nat.add("POSTROUTING", f"{_c('kubernetes postrouting rules')} -j {KUBE_POSTROUTING}")
    nat.add(KUBE_POSTROUTING, f"-m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN")
    # Clear the mark so a packet that traverses the stack again is not masqueraded twice.
    nat.add(KUBE_POSTROUTING, f"-j MARK --xor-mark {MASQ_MARK}")
    nat.add(KUBE_POSTROUTING, f"{_c('kubernetes service traffic requiring SNAT')} -j MASQUERADE --random-fully")
    nat.add(KUBE_MARK_MASQ, f"-j MARK --or-mark {MASQ_MARK}")


def _forward_rules(filt: _Table) -> None:
    filt.add(KUBE_FORWARD, "-m conntrack --ctstate INVALID -j DROP")
    # Forward what kube-proxy marked (NodePort traffic) even where FORWARD's policy is DROP.
    filt.add(KUBE_FORWARD, f"{_c('kubernetes forwarding rules')} -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT")
    filt.add(KUBE_FORWARD, f"{_c('kubernetes forwarding conntrack rule')} "
                           "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")


def _cl(text: str, large: bool) -> str:
    """A comment kube-proxy leaves out in large cluster mode (its appendServiceCommentLocked), with the space."""
    return "" if large else _c(text) + " "


def _to_endpoints(nat: _Table, sp: ServicePortEndpoints, chain: str, endpoints: tuple[Endpoint, ...],
                  large: bool = False) -> None:
    """A KUBE-SVC or KUBE-SVL chain's jumps: affinity first, then 1/n, 1/(n-1), ... and a last sure one."""
    name, proto = sp.name, sp.protocol
    if sp.service.session_affinity == "ClientIP":
        for e in endpoints:
            sep = endpoint_chain(name, proto, str(e))
            nat.add(chain, f"{_cl(f'{name} -> {e}', large)}-m recent --rcheck --seconds {sp.service.affinity_timeout} "
                           f"--reap --name {sep} --mask 255.255.255.255 --rsource -j {sep}")
    n = len(endpoints)
    for i, e in enumerate(endpoints):
        sep = endpoint_chain(name, proto, str(e))
        chance = f"-m statistic --mode random --probability {probability(n - i)} " if i < n - 1 else ""
        nat.add(chain, f"{_cl(f'{name} -> {e}', large)}{chance}-j {sep}")


def _service_port(filt: _Table, nat: _Table, node: Node, sp: ServicePortEndpoints, cluster: Cluster,
                  large: bool = False) -> None:
    service, port = sp.service, sp.port
    name, p = sp.name, sp.protocol
    vip = f"{service.cluster_ip}/32"
    node_port = port.node_port if service.type != "ClusterIP" else None
    local_policy = node_port is not None and service.external_traffic_policy == "Local"
    endpoints = sp.endpoints
    local = sp.local(node.name)
    svc, svl, ext = service_chain(name, p), local_chain(name, p), external_chain(name, p)

    if not endpoints:
        # No endpoints anywhere: no nat chains at all, and a filter REJECT so clients fail fast
        # ("connection refused") instead of waiting for a timeout.
        refused = _c(f"{name} has no endpoints")
        filt.add(KUBE_SERVICES, f"-d {vip} -p {p} {refused} -m {p} --dport {port.port} "
                                "-j REJECT --reject-with icmp-port-unreachable")
        if node_port is not None:
            filt.add(KUBE_EXTERNAL_SERVICES, f"-p {p} {refused} -m addrtype --dst-type LOCAL -m {p} "
                                             f"--dport {node_port} -j REJECT --reject-with icmp-port-unreachable")
        return

    nat.add(KUBE_SERVICES, f"-d {vip} -p {p} {_c(f'{name} cluster IP')} -m {p} --dport {port.port} -j {svc}")
    if node_port is not None:
        nat.add(KUBE_NODEPORTS, f"-p {p} {_c(name)} -m {p} --dport {node_port} -j {ext}")
        if local_policy and not local:
            # Traffic that the EXT chain did not short-circuit finds no DNAT and is dropped here.
            filt.add(KUBE_EXTERNAL_SERVICES, f"-p {p} {_c(f'{name} has no local endpoints')} "
                                             f"-m addrtype --dst-type LOCAL -m {p} --dport {node_port} -j DROP")

    nat.chain(svc)
    # Masquerade a ClusterIP connection from outside the pod network (the node itself, or a host routed
    # to the service range), since its endpoint may be on another node.
    nat.add(svc, f"! -s {cluster.pod_cidr} -d {vip} -p {p} {_c(f'{name} cluster IP')} -m {p} "
                 f"--dport {port.port} -j {KUBE_MARK_MASQ}")

    if node_port is not None:
        nat.chain(ext)
        if not local_policy:
            nat.add(ext, f"{_c(f'masquerade traffic for {name} external destinations')} -j {KUBE_MARK_MASQ}")
            nat.add(ext, f"-j {svc}")
        else:
            # Pods and the node itself are not "external": they use the whole service, as if they had
            # gone out to a load balancer and come back in.
            nat.add(ext, f"-s {cluster.pod_cidr} {_c(f'pod traffic for {name} external destinations')} -j {svc}")
            nat.add(ext, f"{_c(f'masquerade LOCAL traffic for {name} external destinations')} "
                         f"-m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}")
            nat.add(ext, f"{_c(f'route LOCAL traffic for {name} external destinations')} "
                         f"-m addrtype --src-type LOCAL -j {svc}")
            if local:
                nat.add(ext, f"-j {svl}")

    _to_endpoints(nat, sp, svc, endpoints, large)
    if local_policy and local:
        nat.chain(svl)
        _to_endpoints(nat, sp, svl, local, large)

    for e in endpoints:
        sep = endpoint_chain(name, p, str(e))
        nat.chain(sep)
        # Hairpin: a pod reaching itself through its service must see another source address, or its
        # reply would skip the reverse NAT.
        nat.add(sep, f"-s {e.ip}/32 {_cl(name, large)}-j {KUBE_MARK_MASQ}")
        sticky = ""
        if service.session_affinity == "ClientIP":
            sticky = f"-m recent --set --name {sep} --mask 255.255.255.255 --rsource "
        nat.add(sep, f"-p {p} {_cl(name, large)}{sticky}-m {p} -j DNAT --to-destination {e}")


class _Recorder:
    """Stands in for a _Table while one service port is rendered: records (table, chain, spec or None for a
    chain declaration), so the rules of an unchanged service port are computed once per process."""

    def __init__(self, name: str, ops: list) -> None:
        self.name, self.ops = name, ops

    def chain(self, *names: str) -> None:
        self.ops += [(self.name, chain, None) for chain in names]

    def add(self, chain: str, spec: str) -> None:
        self.ops.append((self.name, chain, spec))


_RULES_CACHE: dict[tuple, tuple] = {}


def _service_port_rules(node: Node, sp: ServicePortEndpoints, cluster: Cluster, large: bool = False) -> tuple:
    """One service port's rules as (table, chain, spec) records, memoized by what they depend on: the service
    port with its endpoints, the cluster, and the node only through its local endpoints where the traffic
    policy is Local. So a sync after one change renders only the changed service ports (kube-proxy's partial
    sync), and one sync renders a service port once for all the nodes whose rules for it are the same, not
    once per node. The cache is dropped when it outgrows a large cluster's worth of service ports."""
    service = sp.service
    local_policy = service.type != "ClusterIP" and service.external_traffic_policy == "Local"
    found = None if local_policy else _shared(sp, cluster, large)
    if found is not None:
        return found
    with _RENDERING:
        found = None if local_policy else _shared(sp, cluster, large)  # rendered meanwhile by another node's thread
        if found is not None:
            return found
        key = (sp, cluster, tuple(sp.local(node.name)) if local_policy else None, large)
        found = _RULES_CACHE.get(key)
        if found is None:
            ops: list = []
            _service_port(_Recorder("filter", ops), _Recorder("nat", ops), node, sp, cluster, large)  # type: ignore[arg-type]
            if len(_RULES_CACHE) > 1 << 16:
                _RULES_CACHE.clear()
            found = _RULES_CACHE[key] = tuple(ops)
        if not local_policy:
            if len(_SHARED) > 1 << 16:
                _SHARED.clear()
            _SHARED[id(sp)] = (sp, cluster, large, found)  # holds sp: its id stays its own while the entry lives
    return found


def _shared(sp: ServicePortEndpoints, cluster: Cluster, large: bool) -> tuple | None:
    """The records of a service port whose rules are the same on every node, found by identity (no hashing)."""
    hit = _SHARED.get(id(sp))
    return hit[3] if hit is not None and hit[0] is sp and hit[1] is cluster and hit[2] == large else None


# Nodes sync in parallel threads (services/kube_proxy.py): the first to miss a memo renders, the others wait for
# it and share the result instead of each rendering the same 10,000-endpoint service port again.
_RENDERING = threading.RLock()
# id(service port) -> (it, cluster, large, its records): the first plan of each of 100 nodes hashed a
# 10,000-endpoint service port whole (10-15 ms a node) to find records another node had already made.
_SHARED: dict[int, tuple] = {}


def aws_snat(node_ip: IPv4Address, vpc_cidrs: list[IPv4Network], outside: list[IPv4Address]) -> list[str]:
    """The Amazon VPC CNI's egress SNAT with AWS_VPC_K8S_CNI_EXTERNALSNAT=false (its chain names): traffic
    to the VPC's own CIDRs keeps the pod's source address; anything else leaves with the node's primary address,
    as it would through the instance's primary ENI. `outside`: the lab's external hosts, which stand for the
    internet even though they sit on the node segment, so they are sent to SNAT before the VPC RETURN."""
    snat = _c("AWS, SNAT")
    lines = [f"-A POSTROUTING {_c('AWS SNAT CHAIN')} -j {AWS_SNAT_0}"]
    lines += [f"-A {AWS_SNAT_0} -d {ip}/32 {_c('kubenet-lab: external host, outside the VPC')} -j {AWS_SNAT_1}"
              for ip in outside]
    lines += [f"-A {AWS_SNAT_0} -d {cidr} {_c('AWS SNAT CHAIN')} -j RETURN" for cidr in vpc_cidrs]
    lines += [f"-A {AWS_SNAT_0} {_c('AWS SNAT CHAIN')} -j {AWS_SNAT_1}",
              f"-A {AWS_SNAT_1} ! -o vlan+ -m addrtype ! --dst-type LOCAL {snat} -j SNAT --to-source {node_ip} "
              "--random-fully"]
    return lines


AWS_SNAT_0, AWS_SNAT_1 = "AWS-SNAT-CHAIN-0", "AWS-SNAT-CHAIN-1"


@dataclass
class Plan:
    """One node's rules as one sync computes them: what does not depend on services (node, cluster, the CNI's
    egress NAT) and one record per service port (_service_port_rules, shared while the port is unchanged),
    in KUBE-SERVICES order. `text()` is the full restore input; services/kube_proxy_partial.py compares two
    plans record by record, so a sync after one change looks at that change only."""

    node: Node
    cluster: Cluster
    egress: tuple[str, ...] | None
    parts: list[tuple]

    def fixed(self) -> tuple:
        return (self.node, self.cluster, self.egress)

    def text(self) -> str:
        """The full restore input. What does not depend on the node (the skeleton, every service port's rules,
        the filter table whole) is rendered once per set of records and cluster (_body) and shared by every
        node's text; only the header and the egress NAT lines are the node's own. At 10,000 endpoints that
        is 2-3 ms a node instead of 20-25 ms (services/kube_proxy.py loads 100 such nodes at `lab up`)."""
        filt_text, nat_decls, nat_order, nat_blocks, nat_index = _body(self.parts, self.cluster)
        egress, node = self.egress, self.node
        lines = egress if egress is not None else egress_masquerade(self.cluster.pod_cidr, node.pod_cidr)
        own: dict[str, list[str]] = {}
        for line in lines:
            chain = line.split(" ", 2)[1]
            own.setdefault(chain, []).append(line)
        fresh = sorted(c for c in own if c not in nat_index and c not in NAT_BUILTINS)
        if fresh:  # another CNI's egress chains (aws-vpc): declared among the user chains, in name order
            users = sorted({*nat_order[len(NAT_BUILTINS):], *fresh})
            nat_order = [*NAT_BUILTINS, *users]
            nat_decls = "".join(f":{c} ACCEPT [0:0]\n" for c in NAT_BUILTINS) + "".join(f":{c} - [0:0]\n" for c in users)
            blocks = [nat_blocks[nat_index[c]] if c in nat_index else "" for c in nat_order]
            index = {c: i for i, c in enumerate(nat_order)}
        else:
            blocks, index = list(nat_blocks), nat_index
        for chain, extra in own.items():
            blocks[index[chain]] += "".join(line + "\n" for line in extra)
        header = f"# kubenet-lab: kube-proxy (iptables mode) and flannel egress NAT for node {node.name}\n"
        return "".join([header, filt_text, "*nat\n", nat_decls, *blocks, "COMMIT\n"])


_BODIES: dict[tuple, tuple] = {}  # (id(cluster), ids of the records) -> (what holds those ids alive, rendered body)


def _body(parts: list[tuple], cluster: Cluster) -> tuple:
    """The node-independent part of Plan.text(): the filter table's text, the nat table's chain declarations,
    its chains in iptables-save order with their `-A` lines rendered one block per chain (the egress NAT lines
    of a node are appended to their chains' blocks), and where each chain is. The key holds identities only;
    the entry keeps those objects alive, so an id in a key cannot stand for another object."""
    key = (id(cluster), *map(id, parts))
    found = _BODIES.get(key)
    if found is not None:
        return found[1]
    with _RENDERING:
        found = _BODIES.get(key)
        return found[1] if found is not None else _render_body(key, parts, cluster)


def _render_body(key: tuple, parts: list[tuple], cluster: Cluster) -> tuple:
    filt = _Table("filter", FILTER_BUILTINS)
    nat = _Table("nat", NAT_BUILTINS)
    _skeleton(filt, nat)
    for part in parts:
        for table, chain, spec in part:
            target = filt if table == "filter" else nat
            if spec is None:
                target.chain(chain)
            else:
                target.add(chain, spec)
    nat.add(KUBE_SERVICES, NODEPORTS_JUMP)
    _forward_rules(filt)
    users = sorted(c for c in nat.rules if c not in NAT_BUILTINS)
    order = [*NAT_BUILTINS, *users]
    decls = "".join(f":{c} ACCEPT [0:0]\n" for c in NAT_BUILTINS) + "".join(f":{c} - [0:0]\n" for c in users)
    blocks = ["".join(f"-A {c} {spec}\n" for spec in nat.rules[c]) for c in order]
    body = ("\n".join(filt.lines()) + "\n", decls, order, blocks, {c: i for i, c in enumerate(order)})
    if len(_BODIES) > 8:  # the bodies of the last few syncs (one per cluster object and set of records)
        _BODIES.clear()
    _BODIES[key] = ((cluster, list(parts)), body)
    return body


NODEPORTS_JUMP = (f"{_c('kubernetes service nodeports; NOTE: this must be the last rule in this chain')} "
                  f"-m addrtype --dst-type LOCAL -j {KUBE_NODEPORTS}")
_BY_ID: dict[tuple, tuple] = {}  # (node, id(cluster), large) -> (service ports, kept alive; their ids; records)


def forget() -> None:
    """Drop every memo of this module (a benchmark's cold start: the next plan and text render everything)."""
    for memo in (_RULES_CACHE, _SHARED, _BODIES, _BY_ID):
        memo.clear()


def plan(node: Node, sps: list[ServicePortEndpoints], cluster: Cluster, egress: list[str] | None = None) -> Plan:
    """The node's rules for these service ports (see render). The service port objects of the last plan made
    for this node with the same cluster object are looked up by identity, so a long-running sync costs a
    pointer lookup per unchanged service port rather than hashing it whole (0.1 s at 10,000)."""
    live = [sp for sp in sps if sp.service.cluster_ip is not None]
    large = sum(len(sp.endpoints) for sp in live) > LARGE_CLUSTER_ENDPOINTS
    key = (node, id(cluster), large)
    ids = list(map(id, live))
    last = _BY_ID.get(key)
    if last is not None and last[3] is cluster:
        known = dict(zip(last[1], last[2]))
        parts = [known.get(i) for i in ids]
    else:
        parts = [None] * len(live)
    for n, part in enumerate(parts):
        if part is None:
            parts[n] = _service_port_rules(node, live[n], cluster, large)
    if len(_BY_ID) > 1024:  # nodes x clusters seen by this process
        _BY_ID.clear()
    _BY_ID[key] = (live, ids, parts, cluster)
    return Plan(node, cluster, tuple(egress) if egress is not None else None, list(parts))


def render(node: Node, sps: list[ServicePortEndpoints], cluster: Cluster, egress: list[str] | None = None) -> str:
    """The complete iptables-restore input (filter and nat) programming `node` as kube-proxy would.

    Service ports come in the order given (that is the order of their rules in KUBE-SERVICES and
    KUBE-NODEPORTS), endpoints likewise; headless services (no ClusterIP) are skipped. Above
    LARGE_CLUSTER_ENDPOINTS endpoints in all, kube-proxy's large cluster mode drops the endpoint comments.
    """
    return plan(node, sps, cluster, egress).text()
