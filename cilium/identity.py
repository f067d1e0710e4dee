"""Cilium's identity-based NetworkPolicy, the pure part: security identities, the ipcache, each endpoint's
policy map, and the layouts of those maps (struct definitions in cilium/bpf/policy.h). No kernel here.

- A security identity is a number for a set of labels: a pod's own labels, its namespace and its
  namespace's labels (Cilium's `k8s:` and `k8s:io.cilium.k8s.namespace.labels.` sources). Pods with the
  same set share one identity. Cluster identities are allocated from 256 upward, CIDR identities (the
  prefixes of ipBlock peers) from 2^24 + 1 upward (Cilium's local scope), reserved ones keep Cilium's
  numbers (1 host, 2 world, 6 remote-node). Once given, a number stays with its label set while any pod
  holds it (`Allocation` is recorded by the agent), so relabelling one pod changes that pod's identity only.
- Policies are selected and their peers evaluated by the calico profile's validated model
  (cni/network_policy.py: `ingress_policies`, `peer_workloads`, `named_port`): the same semantics, turned
  into (identity, direction, protocol, port prefix) keys instead of nftables rules.
- Each NetworkPolicy also gets a number (`policy_id`), written into the policy map entries it allows and
  so into flow events; the agent records the numbering next to the identities (cilium/events.py says
  where the observer reads it).
"""
from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from cilium import events
from cni.network_policy import (NAMESPACE_NAME_LABEL, Workload, egress_policies, ingress_policies, named_port,
                                peer_workloads)
from topo.model import IPBlock, Lab, NetworkPolicy, Pod

# Cilium's reserved identities (pkg/identity/numericidentity.go)
ID_UNKNOWN, ID_HOST, ID_WORLD, ID_UNMANAGED, ID_HEALTH, ID_INIT, ID_REMOTE_NODE = 0, 1, 2, 3, 4, 5, 6
RESERVED = events.RESERVED_IDENTITIES
CLUSTER_MIN = 256  # Cilium's first cluster-local identity
LOCAL_SCOPE = 1 << 24  # Cilium's IdentityScopeLocal: CIDR identities live above it
WORLD = IPv4Network("0.0.0.0/0")

INGRESS, EGRESS = 0, 1  # policy_key.egress
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
EP_F_INGRESS_ENFORCED, EP_F_EGRESS_ENFORCED = 1, 2

LXC, IPCACHE, POLICY_MAPS, POLICY_CT = "cilium_lxc", "cilium_ipcache", "kubenet_policy_maps", "kubenet_ct4_policy"
ENDPOINT_KEY = struct.Struct("=4sBBH")  # ip4, family, key, cluster_id
ENDPOINT_INFO = struct.Struct("=IHHIIII")  # ifindex, unused, lxc_id, flags, sec_id, isolated_by[ingress, egress]
IPCACHE_KEY = struct.Struct("=IHBB4s")  # prefixlen (32 + address bits), cluster_id, pad, family, ip4
IPCACHE_VALUE = struct.Struct("=I4sHBBI")  # sec_identity, tunnel_endpoint, pad, key, flags, cidr_identity
POLICY_KEY = struct.Struct("=IIBB2s")  # prefixlen, sec_label, egress, protocol, dport (be)
POLICY_ENTRY = struct.Struct("=2sBBIQQ")  # proxy_port, deny, auth_type, policy_id, packets, bytes
POLICY_CT_KEY = struct.Struct("=4s4s2s2sBBH")
POLICY_CT_VALUE = struct.Struct("=QIB3xQ")
POLICY_FULL_PREFIX = 64  # identity 32 + direction 8 + protocol 8 + port 16
POLICY_MAX_ENTRIES = 16384
SIZES = {LXC: (ENDPOINT_KEY.size, ENDPOINT_INFO.size), IPCACHE: (IPCACHE_KEY.size, IPCACHE_VALUE.size),
         POLICY_CT: (POLICY_CT_KEY.size, POLICY_CT_VALUE.size), POLICY_MAPS: (4, 4)}
FAMILY_IPV4 = 1


def policy_map_name(endpoint: int) -> str:
    """cilium_policy_NNNNN, as Cilium pins its per-endpoint policy maps (zero-padded endpoint id)."""
    return f"cilium_policy_{endpoint:05d}"


def identity_labels(pod: Pod, namespace_labels: dict[str, str]) -> tuple[str, ...]:
    """The labels that make a pod's identity, in Cilium's notation (source:key=value)."""
    ns_labels = {**namespace_labels, NAMESPACE_NAME_LABEL: pod.namespace}
    return tuple(sorted([f"k8s:{k}={v}" for k, v in pod.label_map.items()]
                        + [f"k8s:io.cilium.k8s.namespace.labels.{k}={v}" for k, v in ns_labels.items()]
                        + [f"k8s:io.kubernetes.pod.namespace={pod.namespace}"]))


@dataclass
class Allocation:
    """Identities and policy numbers handed out, kept across syncs (the agent stores it as JSON). Numbers
    are never reused while the lab lives: a counter per kind only grows."""

    labels: dict[tuple[str, ...], int] = field(default_factory=dict)
    cidrs: dict[IPv4Network, int] = field(default_factory=dict)
    policies: dict[str, int] = field(default_factory=dict)
    next_cluster: int = CLUSTER_MIN
    next_local: int = LOCAL_SCOPE + 1
    next_policy: int = 1

    def identity(self, labels: tuple[str, ...]) -> int:
        if labels not in self.labels:
            self.labels[labels] = self.next_cluster
            self.next_cluster += 1
        return self.labels[labels]

    def cidr(self, net: IPv4Network) -> int:
        if net == WORLD:
            return ID_WORLD
        if net not in self.cidrs:
            self.cidrs[net] = self.next_local
            self.next_local += 1
        return self.cidrs[net]

    def policy(self, key: str) -> int:
        if key not in self.policies:
            self.policies[key] = self.next_policy
            self.next_policy += 1
        return self.policies[key]

    def keep_only(self, labels: Iterable[tuple[str, ...]], cidrs: Iterable[IPv4Network], policies: Iterable[str]) -> None:
        """Forget what no pod, prefix or policy uses any more (Cilium's identity garbage collection)."""
        keep_l, keep_c, keep_p = set(labels), set(cidrs), set(policies)
        self.labels = {k: v for k, v in self.labels.items() if k in keep_l}
        self.cidrs = {k: v for k, v in self.cidrs.items() if k in keep_c}
        self.policies = {k: v for k, v in self.policies.items() if k in keep_p}

    def to_json(self) -> dict[str, Any]:
        return {"identities": [{"id": v, "labels": list(k)} for k, v in sorted(self.labels.items(), key=lambda kv: kv[1])],
                "cidrs": {str(k): v for k, v in sorted(self.cidrs.items(), key=lambda kv: kv[1])},
                "policies": dict(sorted(self.policies.items(), key=lambda kv: kv[1])),
                "next": {"cluster": self.next_cluster, "local": self.next_local, "policy": self.next_policy}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Allocation:
        nxt = data.get("next", {})
        return cls({tuple(e["labels"]): int(e["id"]) for e in data.get("identities", [])},
                   {IPv4Network(k): int(v) for k, v in data.get("cidrs", {}).items()},
                   {str(k): int(v) for k, v in data.get("policies", {}).items()},
                   int(nxt.get("cluster", CLUSTER_MIN)), int(nxt.get("local", LOCAL_SCOPE + 1)),
                   int(nxt.get("policy", 1)))


@dataclass
class Model:
    """Every identity the lab's pods and policies need right now, allocated in `alloc`."""

    alloc: Allocation
    of_pod: dict[str, int]  # pod key -> identity
    prefixes: list[IPv4Network]  # every ipBlock CIDR and except, most specific first
    # a rule's keys (or peers) computed once per sync, not once per endpoint it selects
    rules: dict[tuple[str, int, int], Any] = field(default_factory=dict)
    peers: dict[tuple[str, int, int], Any] = field(default_factory=dict)


def policy_prefixes(lab: Lab) -> list[IPv4Network]:
    found: set[IPv4Network] = set()
    for pol in lab.network_policies:
        for rule in pol.ingress + pol.egress:
            for peer in rule.peers:
                if peer.ip_block is not None:
                    found.add(peer.ip_block.cidr)
                    found.update(peer.ip_block.excepts)
    found.discard(WORLD)
    return sorted(found, key=lambda n: (-n.prefixlen, n))


def build(lab: Lab, workloads: list[Workload], alloc: Allocation) -> Model:
    """Identities for every running pod, CIDR identities for every ipBlock prefix, numbers for every policy;
    what nothing uses any more is forgotten."""
    of_pod, used = {}, []
    for w in sorted(workloads, key=lambda w: w.pod.key):
        labels = identity_labels(w.pod, lab.namespaces.get(w.pod.namespace, {}))
        used.append(labels)
        of_pod[w.pod.key] = alloc.identity(labels)
    prefixes = policy_prefixes(lab)
    for net in sorted(prefixes):
        alloc.cidr(net)
    for pol in sorted(lab.network_policies, key=lambda p: p.key):
        alloc.policy(pol.key)
    alloc.keep_only(used, prefixes, [p.key for p in lab.network_policies])
    return Model(alloc, of_pod, prefixes)


def cidr_identity(model: Model, ip: IPv4Address) -> int:
    """The identity of the longest policy prefix holding `ip` (world when none does)."""
    return next((model.alloc.cidr(n) for n in model.prefixes if ip in n), ID_WORLD)


# ---- the ipcache ------------------------------------------------------------------------------

def ipcache_key(net: IPv4Network) -> bytes:
    return IPCACHE_KEY.pack(32 + net.prefixlen, 0, 0, FAMILY_IPV4, net.network_address.packed)


def ipcache_value(identity: int, cidr_id: int, tunnel: IPv4Address | None = None) -> bytes:
    return IPCACHE_VALUE.pack(identity, (tunnel or IPv4Address(0)).packed, 0, 0, 0, cidr_id)


def unpack_ipcache(key: bytes, value: bytes) -> tuple[IPv4Network, int, int, IPv4Address]:
    plen, _c, _p, _f, ip = IPCACHE_KEY.unpack(key)
    ident, tunnel, _pad, _k, _fl, cidr_id = IPCACHE_VALUE.unpack(value)
    return IPv4Network(f"{IPv4Address(ip)}/{plen - 32}"), ident, cidr_id, IPv4Address(tunnel)


def ipcache_entries(lab: Lab, node: str, workloads: list[Workload], model: Model) -> dict[bytes, bytes]:
    """What a node's ipcache holds: the world, every policy prefix, every node's addresses (this node's as
    host, the others as remote-node) and every pod IP with its identity (the same on every node)."""
    out = {ipcache_key(WORLD): ipcache_value(ID_WORLD, ID_WORLD)}
    for net in model.prefixes:
        out[ipcache_key(net)] = ipcache_value(model.alloc.cidr(net), model.alloc.cidr(net))
    for n in lab.nodes:
        ident = ID_HOST if n.name == node else ID_REMOTE_NODE
        router = next(iter(n.pod_cidr.hosts()))  # cilium_host's address, the PodCIDR's .1
        for ip in (n.ip, router):
            out[ipcache_key(IPv4Network(f"{ip}/32"))] = ipcache_value(ident, cidr_identity(model, ip))
    nodes = {n.name: n.ip for n in lab.nodes}
    for w in workloads:
        tunnel = nodes.get(w.pod.node) if w.pod.node != node else None
        out[ipcache_key(IPv4Network(f"{w.ip}/32"))] = ipcache_value(model.of_pod[w.pod.key],
                                                                   cidr_identity(model, w.ip), tunnel)
    return out


# ---- endpoints and their policy maps ---------------------------------------------------------------

def endpoint_key(ip: IPv4Address) -> bytes:
    return ENDPOINT_KEY.pack(ip.packed, FAMILY_IPV4, 0, 0)


def endpoint_info(endpoint: int, flags: int, identity: int, isolated_by: tuple[int, int] = (0, 0)) -> bytes:
    return ENDPOINT_INFO.pack(endpoint, 0, endpoint, flags, identity, *isolated_by)


def enforcement(lab: Lab, pod: Pod) -> int:
    """EP_F_* bits: which directions a policy selects the pod for (Cilium's policy enforcement state)."""
    return ((EP_F_INGRESS_ENFORCED if ingress_policies(lab, pod) else 0)
            | (EP_F_EGRESS_ENFORCED if egress_policies(lab, pod) else 0))


def isolated_by(lab: Lab, pod: Pod, alloc: Allocation) -> tuple[int, int]:
    """Per direction (ingress, egress), the number of the first policy (by name) isolating the pod, 0 when
    none does: what a drop event of its default deny names (Kubernetes policies only allow, so a drop is
    decided by the policies that isolate the pod; the first stands for them)."""
    return tuple(alloc.policy(found[0].key) if found else 0  # type: ignore[return-value]
                 for found in (ingress_policies(lab, pod), egress_policies(lab, pod)))


def port_prefixes(low: int, high: int) -> list[tuple[int, int]]:
    """[low, high] as aligned (port, prefix bits) blocks, the way an LPM key covers a range (Cilium splits
    endPort ranges the same way)."""
    out = []
    while low <= high:
        size = low & -low if low else 1 << 16
        while low + size - 1 > high:
            size //= 2
        out.append((low, 16 - size.bit_length() + 1))
        low += size
    return out


@dataclass(frozen=True, order=True)
class PolicyKey:
    identity: int  # 0: any peer (Cilium's wildcard)
    direction: int  # INGRESS / EGRESS
    protocol: int  # 0 with prefixlen 40: every protocol
    port: int
    prefixlen: int  # 40: any protocol; 48: any port; 48 + bits: a port block

    def pack(self) -> bytes:
        return POLICY_KEY.pack(self.prefixlen, self.identity, self.direction, self.protocol, self.port.to_bytes(2, "big"))

    @classmethod
    def unpack(cls, raw: bytes) -> PolicyKey:
        plen, ident, direction, proto, port = POLICY_KEY.unpack(raw)
        return cls(ident, direction, proto, int.from_bytes(port, "big"), plen)

    def ports(self) -> str:
        if self.prefixlen <= 40:
            return "ANY"
        if self.prefixlen == 48:
            return "ANY"
        bits = self.prefixlen - 48
        end = self.port + (1 << (16 - bits)) - 1
        return str(self.port) if end == self.port else f"{self.port}-{end}"


def policy_entry(policy_id: int) -> bytes:
    return POLICY_ENTRY.pack(b"\0\0", 0, 0, policy_id, 0, 0)


def _keys(identity: int, direction: int, proto: int | None, low: int | None, high: int | None) -> list[PolicyKey]:
    if proto is None:
        return [PolicyKey(identity, direction, 0, 0, 40)]
    if low is None:
        return [PolicyKey(identity, direction, proto, 0, 48)]
    return [PolicyKey(identity, direction, proto, port, 48 + bits) for port, bits in port_prefixes(low, high or low)]


def _block_identities(model: Model, block: IPBlock) -> set[int]:
    """The CIDR identities (and world) standing only for addresses inside the block and outside its excepts."""
    nets = model.prefixes + [WORLD]
    return {model.alloc.cidr(n) for n in nets
            if n.subnet_of(block.cidr) and not any(n.subnet_of(e) for e in block.excepts)}


def _within(ip: IPv4Address, block: IPBlock) -> bool:
    return ip in block.cidr and not any(ip in e for e in block.excepts)


def _alternatives(lab: Lab, pol: NetworkPolicy, rule: Any, workloads: list[Workload], model: Model
                  ) -> list[tuple[set[int], list[Workload] | None]]:
    """Each peer of a rule as (identities, the pods they stand for); no peers: any (identity 0)."""
    out: list[tuple[set[int], list[Workload] | None]] = []
    if not rule.peers:
        out.append(({0}, None))
    for peer in rule.peers:
        if peer.ip_block is not None:
            inside = [w for w in workloads if _within(w.ip, peer.ip_block)]
            out.append((_block_identities(model, peer.ip_block), inside))
        else:
            pods = peer_workloads(lab, pol, peer, workloads)
            if pods:
                out.append(({model.of_pod[w.pod.key] for w in pods}, pods))
    return out


def _rule_keys(lab: Lab, pol: NetworkPolicy, rule: Any, index: int, direction: int, me: Workload,
               workloads: list[Workload], model: Model) -> list[PolicyKey]:
    """A rule's keys, the same for every endpoint the policy selects unless an ingress port is named (the
    endpoint's own number): computed once per sync then."""
    own = direction == INGRESS and any(isinstance(p.port, str) for p in rule.ports)
    slot = (pol.key, direction, index)
    if not own and slot in model.rules:
        return model.rules[slot]  # type: ignore[no-any-return]
    out: list[PolicyKey] = []
    if slot not in model.peers:
        model.peers[slot] = _alternatives(lab, pol, rule, workloads, model)
    for identities, pods in model.peers[slot]:
        for port in rule.ports or (None,):
            if port is None:
                out += [k for i in identities for k in _keys(i, direction, None, None, None)]
                continue
            proto = PROTOCOLS[port.protocol]
            if port.port is None:
                out += [k for i in identities for k in _keys(i, direction, proto, None, None)]
            elif isinstance(port.port, str):
                # a named port is the number the destination pod gives the name: this endpoint for ingress;
                # for egress each peer pod's own (so keyed by that pod's identity, not by a CIDR's)
                if direction == INGRESS:
                    n = named_port(me.pod, port.port, port.protocol)
                    if n is not None:
                        out += [k for i in identities for k in _keys(i, direction, proto, n, n)]
                else:
                    targets = pods if pods is not None else workloads
                    for w in targets:
                        n = named_port(w.pod, port.port, port.protocol)
                        if n is not None:
                            out += _keys(model.of_pod[w.pod.key], direction, proto, n, n)
            else:
                out += [k for i in identities for k in _keys(i, direction, proto, port.port, port.end_port)]
    if not own:
        model.rules[slot] = out
    return out


def endpoint_policy(lab: Lab, me: Workload, workloads: list[Workload], model: Model) -> dict[PolicyKey, int]:
    """The endpoint's policy map: key -> the number of the policy allowing it (the first by name when
    several do; 0 for a direction no policy selects the pod for, which allows everything there)."""
    out: dict[PolicyKey, int] = {}
    for direction, policies in ((INGRESS, ingress_policies(lab, me.pod)), (EGRESS, egress_policies(lab, me.pod))):
        if not policies:
            out[PolicyKey(0, direction, 0, 0, 40)] = 0
            continue
        if direction == INGRESS:  # the node's own traffic to its pods (Cilium's allow-localhost default)
            out[PolicyKey(ID_HOST, INGRESS, 0, 0, 40)] = 0
        for pol in policies:
            pid = model.alloc.policy(pol.key)
            for index, rule in enumerate(pol.ingress if direction == INGRESS else pol.egress):
                for key in _rule_keys(lab, pol, rule, index, direction, me, workloads, model):
                    out.setdefault(key, pid)
    return out
