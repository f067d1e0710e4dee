"""The record layout of the ringbuf `cilium_events` (struct flow_event in cilium/bpf/events.h), unpacked.
Pure: reading the ring itself (mmap of the pinned map) belongs to the reader in the observe layer.

Cilium's numbers are kept for message types, observation points, translation points and drop reasons
(pkg/monitor/api: MessageTypeDrop=1, Trace=4, PolicyVerdict=5, TraceSock=7; the drop reason texts are
Cilium's own wording from pkg/monitor/api/drop.go) so flows can be named the way Hubble names them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

EVENTS, EVENTS_LOST = "cilium_events", "cilium_events_lost"

EVENT_DROP, EVENT_TRACE, EVENT_POLICY_VERDICT, EVENT_TRACE_SOCK = 1, 4, 5, 7

TRACE_POINTS = {0: "to-endpoint", 3: "to-stack", 4: "to-overlay", 5: "from-endpoint", 8: "from-stack",
                9: "from-overlay", 10: "from-network", 11: "to-network"}  # Hubble's TraceObservationPoint
XLATE_POINTS = {1: "pre-xlate-fwd", 2: "post-xlate-fwd", 3: "pre-xlate-rev", 4: "post-xlate-rev"}

DROP_POLICY, DROP_NO_SERVICE, DROP_POLICY_DENY = 133, 158, 181
DROP_REASONS = {DROP_POLICY: "Policy denied", DROP_NO_SERVICE: "Service backend not found",
                DROP_POLICY_DENY: "Policy denied by denylist"}

FLOW_F_INGRESS, FLOW_F_REPLY, FLOW_F_ALLOWED = 1, 2, 4

# ktime, type, subtype, proto, tcp_flags, ifindex, saddr, daddr, sport, dport, orig_daddr, orig_dport,
# rev_nat_index, src_identity, dst_identity, policy_id, len, cookie, flags
FLOW_EVENT = struct.Struct("=QBBBBI4s4s2s2s4s2sHIIII4xQB7x")  # 72 bytes, as the C struct


@dataclass(frozen=True)
class RawEvent:
    """One record of the ring, with addresses and ports already in host form."""
    ktime_ns: int
    type: int
    subtype: int
    proto: int
    tcp_flags: int
    ifindex: int
    saddr: IPv4Address
    daddr: IPv4Address
    sport: int
    dport: int
    orig_daddr: IPv4Address | None
    orig_dport: int
    rev_nat_index: int
    src_identity: int
    dst_identity: int
    policy_id: int
    length: int
    cookie: int
    flags: int


def unpack(record: bytes) -> RawEvent:
    """One ring record -> RawEvent (ValueError if it is not a flow_event: the ring holds only those)."""
    if len(record) < FLOW_EVENT.size:
        raise ValueError(f"flow event of {len(record)} bytes, want {FLOW_EVENT.size}")
    (ktime, type_, subtype, proto, tcp_flags, ifindex, saddr, daddr, sport, dport, orig, orig_port, rev_nat,
     src_id, dst_id, policy_id, length, cookie, flags) = FLOW_EVENT.unpack_from(record)
    orig_addr = IPv4Address(orig) if orig != b"\0\0\0\0" else None
    return RawEvent(ktime, type_, subtype, proto, tcp_flags, ifindex, IPv4Address(saddr), IPv4Address(daddr),
                    int.from_bytes(sport, "big"), int.from_bytes(dport, "big"), orig_addr,
                    int.from_bytes(orig_port, "big"), rev_nat, src_id, dst_id, policy_id, length, cookie, flags)


# ---- policy verdicts (cil_from_container / cil_to_container, cilium/bpf/policy.h) ----------------------
# Sent for the FIRST packet of a connection only (no kubenet_ct4_policy entry yet), never for the packets a
# CT entry lets through, so a busy connection costs the ring nothing:
# - EVENT_POLICY_VERDICT, flags FLOW_F_ALLOWED set or not, FLOW_F_INGRESS when judged at the destination
#   endpoint (its ingress policy; else the source's egress policy); subtype DROP_POLICY when denied;
# - and, when denied, EVENT_DROP with subtype DROP_POLICY ("Policy denied").
# ifindex is the pod's lxc veth (its endpoint id), src_identity/dst_identity the security identities
# (Cilium's numbers: 1 host, 2 world, 6 remote-node, 256+ pods' label sets, 2^24+ ipBlock CIDRs).
# policy_id is the agent's number of a NetworkPolicy: the one whose rule allowed the connection, or, for a
# drop, the first (by name) of the policies isolating the endpoint in that direction (Kubernetes policies
# only allow: a drop is the isolating policies' default deny); 0 when no policy is involved (a direction no
# policy selects the pod for). The numbering, with the identities' labels, is what cilium/policy.py records
# in the lab's state folder (apiserver.state.lab_dir(LAB) / POLICY_RECORD):
#   {"identities": [{"id": 256, "labels": ["k8s:app=a", ...]}], "cidrs": {"10.0.0.0/8": 16777217},
#    "policies": {"x/deny": 1}, "next": {...}}
POLICY_RECORD = "cilium/identities.json"
RESERVED_IDENTITIES = {1: "reserved:host", 2: "reserved:world", 3: "reserved:unmanaged", 4: "reserved:health",
                       5: "reserved:init", 6: "reserved:remote-node"}


def policy_names(record: dict) -> dict[int, str]:
    """policy_id -> "namespace/name", from the parsed POLICY_RECORD."""
    return {int(number): str(key) for key, number in record.get("policies", {}).items()}


def identity_labels(record: dict) -> dict[int, list[str]]:
    """security identity -> its labels (reserved ones, pods' label sets, `cidr:PREFIX`), from POLICY_RECORD."""
    out = {i: [name] for i, name in RESERVED_IDENTITIES.items()}
    out.update({int(e["id"]): list(e["labels"]) for e in record.get("identities", [])})
    out.update({int(n): [f"cidr:{prefix}"] for prefix, n in record.get("cidrs", {}).items()})
    return out
