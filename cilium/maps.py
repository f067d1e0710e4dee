"""The layouts of the Cilium profile's maps (the structs of `cilium/bpf/maps.h`, packed in Python) and the
entries a node's maps should hold for the lab's services and nodes. Pure: no kernel here.

Names follow Cilium's (cilium_lb4_services_v2, cilium_lb4_backends_v3, cilium_lb4_reverse_nat,
cilium_tunnel_map, ...): the contract a learner reads with bpftool. A service port is a frontend
(address, port, protocol) with slot 0 saying how many backends it has and slots 1..N naming them by
backend id; ids (backends) and reverse-NAT indexes (service frontends) are allocated once and kept, as
Cilium's agent keeps them, so a change rewrites only the entries it touches.
"""
from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from services.endpoints import RunningPod, resolve
from topo.model import Lab

SERVICES, BACKENDS, REVNAT = "cilium_lb4_services_v2", "cilium_lb4_backends_v3", "cilium_lb4_reverse_nat"
REVERSE_SK, AFFINITY, TUNNEL, CT = "cilium_lb4_reverse_sk", "cilium_lb4_affinity", "cilium_tunnel_map", "cilium_ct4_global"
CONFIG = "kubenet_node_config"  # kubenet-lab's own: what Cilium compiles into each node's programs
ALL_MAPS = (SERVICES, BACKENDS, REVNAT, REVERSE_SK, AFFINITY, TUNNEL, CT, CONFIG)

SVC_FLAG_NODEPORT, SVC_FLAG_LOCAL, SVC_FLAG_AFFINITY = 1 << 1, 1 << 2, 1 << 4
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTOCOL_NAMES = {v: k.upper() for k, v in PROTOCOLS.items()}
VNI = 2  # Cilium carries the source's security identity in the VNI; without identities, one fixed value

LB4_KEY = struct.Struct("=4s2sHBB2x")  # address, dport (both network order), slot, proto, scope
LB4_SERVICE = struct.Struct("=IHHBB2x")  # backend_id (or affinity timeout in slot 0), count, rev_nat, flags, flags2
LB4_BACKEND = struct.Struct("=4s2sBBHBx")  # address, port (be), proto, flags, cluster_id, zone
REV_NAT_KEY = struct.Struct("=H")
REV_NAT = struct.Struct("=4s2s2x")
BACKEND_KEY = struct.Struct("=I")
TUNNEL_KEY = struct.Struct("=4s12xB3x")
TUNNEL_VALUE = struct.Struct("=4s12xBB2x")
NODE_CONFIG = struct.Struct("=4s4sI4x")
CONFIG_KEY = struct.Struct("=I")
REVERSE_SK_KEY = struct.Struct("=Q4s2s2x")
REVERSE_SK_VALUE = struct.Struct("=4s2sH")
CT_KEY = struct.Struct("=4s4s2s2sBB2x")
CT_VALUE = struct.Struct("=Q4s2sH4s2sBxQQ")
TUPLE_F_OUT, TUPLE_F_IN = 0, 1  # a CT entry's direction: as the client sent it / as the backend replies
SIZES = {SERVICES: (LB4_KEY.size, LB4_SERVICE.size), BACKENDS: (BACKEND_KEY.size, LB4_BACKEND.size),
         REVNAT: (REV_NAT_KEY.size, REV_NAT.size), TUNNEL: (TUNNEL_KEY.size, TUNNEL_VALUE.size),
         REVERSE_SK: (REVERSE_SK_KEY.size, REVERSE_SK_VALUE.size), AFFINITY: (16, 16),
         CT: (CT_KEY.size, CT_VALUE.size), CONFIG: (CONFIG_KEY.size, NODE_CONFIG.size)}


def be16(port: int) -> bytes:
    return port.to_bytes(2, "big")


def port_of(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


@dataclass(frozen=True, order=True)
class Frontend:
    address: IPv4Address
    port: int
    proto: int

    def __str__(self) -> str:
        return f"{self.address}:{self.port}/{PROTOCOL_NAMES.get(self.proto, self.proto)}"


@dataclass(frozen=True, order=True)
class Backend:
    address: IPv4Address
    port: int
    proto: int

    def __str__(self) -> str:
        return f"{self.address}:{self.port}/{PROTOCOL_NAMES.get(self.proto, self.proto)}"


@dataclass(frozen=True)
class ServiceEntry:
    """One frontend as the datapath sees it: its backends in slot order, its reverse-NAT index, flags."""

    frontend: Frontend
    backends: tuple[Backend, ...]
    flags: int = 0
    affinity_timeout: int = 0
    name: str = ""  # ns/name:port, for the debug CLI


def lb4_key(fe: Frontend, slot: int) -> bytes:
    return LB4_KEY.pack(fe.address.packed, be16(fe.port), slot, fe.proto, 0)


def unpack_lb4_key(raw: bytes) -> tuple[Frontend, int]:
    addr, port, slot, proto, _scope = LB4_KEY.unpack(raw)
    return Frontend(IPv4Address(addr), port_of(port), proto), slot


def lb4_service(backend_id: int, count: int, rev_nat: int, flags: int) -> bytes:
    return LB4_SERVICE.pack(backend_id, count, rev_nat, flags, 0)


def lb4_backend(be: Backend) -> bytes:
    return LB4_BACKEND.pack(be.address.packed, be16(be.port), be.proto, 0, 0, 0)


def unpack_backend(raw: bytes) -> Backend:
    addr, port, proto, _flags, _cluster, _zone = LB4_BACKEND.unpack(raw)
    return Backend(IPv4Address(addr), port_of(port), proto)


def tunnel_key(cidr: IPv4Network) -> bytes:
    return TUNNEL_KEY.pack(cidr.network_address.packed, 1)


def tunnel_value(node_ip: IPv4Address) -> bytes:
    return TUNNEL_VALUE.pack(node_ip.packed, 1, 0)


def node_config(lab: Lab, node: str) -> bytes:
    me = lab.node(node)
    return NODE_CONFIG.pack(me.pod_cidr.netmask.packed, me.ip.packed, VNI)


def services_of(lab: Lab, running: list[RunningPod], node: str) -> list[ServiceEntry]:
    """Every frontend a node's socket LB and NodePort program serve: each service port's ClusterIP, and for
    NodePort services the node port on every node's IP (externalTrafficPolicy Local: only this node's
    endpoints, flagged so the NodePort program keeps the client's address)."""
    out = []
    for spe in resolve(lab.services, running):
        proto = PROTOCOLS.get(spe.protocol)
        if proto is None or spe.service.cluster_ip is None:
            continue  # SCTP: not modelled in the cilium profile
        backends = tuple(Backend(e.ip, e.port, proto) for e in spe.endpoints)
        affinity = spe.service.session_affinity == "ClientIP"
        flags = SVC_FLAG_AFFINITY if affinity else 0
        timeout = spe.service.affinity_timeout if affinity else 0
        out.append(ServiceEntry(Frontend(spe.service.cluster_ip, spe.port.port, proto), backends, flags, timeout,
                                spe.name))
        if spe.service.type == "NodePort" and spe.port.node_port:
            local = spe.service.external_traffic_policy == "Local"
            chosen = tuple(Backend(e.ip, e.port, proto) for e in spe.local(node)) if local else backends
            for n in lab.nodes:
                out.append(ServiceEntry(Frontend(n.ip, spe.port.node_port, proto),
                                        chosen if n.name == node else backends,
                                        flags | SVC_FLAG_NODEPORT | (SVC_FLAG_LOCAL if local else 0),
                                        timeout, spe.name))
    return out


@dataclass
class Ids:
    """Backend ids and reverse-NAT indexes, as found in the maps and allocated for what is new."""

    backends: dict[Backend, int] = field(default_factory=dict)
    frontends: dict[Frontend, int] = field(default_factory=dict)
    _top: dict[str, int] = field(default_factory=dict)  # the highest id handed out or found, per kind

    def backend(self, be: Backend) -> int:
        if be not in self.backends:
            self.backends[be] = self._next("backends", self.backends.values(), 0xFFFFFFFF)
        return self.backends[be]

    def frontend(self, fe: Frontend) -> int:
        if fe not in self.frontends:
            self.frontends[fe] = self._next("frontends", self.frontends.values(), 0xFFFF)
        return self.frontends[fe]

    def _next(self, kind: str, used: Iterable[int], limit: int) -> int:
        """One above the highest id (kept as it grows: 10,000 new frontends cost no 10,000 scans), or the
        lowest free one once the highest is at the limit."""
        if kind not in self._top:
            self._top[kind] = max(used, default=0)
        if self._top[kind] < limit:
            self._top[kind] += 1
            return self._top[kind]
        return _lowest_free(used, limit)


def _lowest_free(used: Iterable[int], limit: int = 0xFFFFFFFF) -> int:
    taken = set(used)
    nxt = max(taken, default=0) + 1
    if nxt <= limit:
        return nxt
    return next(i for i in range(1, limit + 1) if i not in taken)


def contribution(entry: ServiceEntry, ids: Ids) -> tuple[dict[bytes, bytes], dict[bytes, bytes], dict[bytes, bytes]]:
    """What one frontend puts in the three service maps: its slots (0 and one per backend), its backends' entries
    and its reverse-NAT entry (ids allocated in `ids`). The agent's incremental sync writes only the
    contributions of the frontends that changed."""
    rev = ids.frontend(entry.frontend)
    fe = entry.frontend
    services = {lb4_key(fe, 0): lb4_service(entry.affinity_timeout, len(entry.backends), rev, entry.flags)}
    backends: dict[bytes, bytes] = {}
    for slot, be in enumerate(entry.backends, 1):
        bid = ids.backend(be)
        backends[BACKEND_KEY.pack(bid)] = lb4_backend(be)
        services[lb4_key(fe, slot)] = lb4_service(bid, 0, rev, entry.flags)
    return services, backends, {REV_NAT_KEY.pack(rev): REV_NAT.pack(fe.address.packed, be16(fe.port))}


def desired(entries: list[ServiceEntry], ids: Ids) -> dict[str, dict[bytes, bytes]]:
    """The exact contents of the three service maps for these frontends (ids allocated in `ids`)."""
    services: dict[bytes, bytes] = {}
    backends: dict[bytes, bytes] = {}
    revnat: dict[bytes, bytes] = {}
    for entry in entries:
        s, b, r = contribution(entry, ids)
        services.update(s)
        backends.update(b)
        revnat.update(r)
    return {SERVICES: services, BACKENDS: backends, REVNAT: revnat}


def ids_from(current: dict[str, dict[bytes, bytes]]) -> Ids:
    """The ids the maps hold now (the kernel is the record: nothing else to lose in a crash)."""
    ids = Ids()
    for key, value in current.get(BACKENDS, {}).items():
        ids.backends[unpack_backend(value)] = BACKEND_KEY.unpack(key)[0]
    for key, value in current.get(SERVICES, {}).items():
        if key[6:8] == b"\0\0":  # slot 0 (the key's u16 at offset 6): one per frontend, the others skipped unparsed
            ids.frontends[unpack_lb4_key(key)[0]] = LB4_SERVICE.unpack(value)[2]
    return ids


def tunnel_entries(lab: Lab, node: str) -> dict[bytes, bytes]:
    """Every other node's PodCIDR -> its underlay IP (the tunnel endpoint)."""
    return {tunnel_key(n.pod_cidr): tunnel_value(n.ip) for n in lab.nodes if n.name != node}
