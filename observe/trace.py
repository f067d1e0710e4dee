"""`lab trace FROM TO[:PORT]`: send one real packet and report every hop the kernel took with it.

Nothing here predicts a path: the path is what the kernel did, read back from it.

- **Captures on every interface of the lab's path.** Before the probe leaves, a packet socket (what
  tcpdump uses, AF_PACKET) is opened inside each namespace the packet may cross: the source, every node
  (up to MAX_NODES; beyond that the nodes of the source and destinations) and their pods, every underlay
  switch and router, the destination pods (up to MAX_ENDPOINTS of a service's; MAX_PODS pods in all). A
  socket belongs to the namespace it was created in, so all of them are opened from this process (setns
  in, socket, setns back) and read afterwards. Each carries a classic BPF filter (ICMP, the probe's
  protocol, tunnels carrying them; TCP only with SYN or RST), so busy traffic does not fill its queue;
  reading is bounded in frames and time, and a socket that dropped frames is reported, never taken for
  a drop on the path. A packet seen leaving towards a place nobody watched is said so. The journey is put
  in order from the cables, not from timestamps: a namespace's sightings come in its socket's order, and
  a packet that left by one end of a veth is next seen at the other end. Outer VXLAN and IP-in-IP
  (tunl0, proto 4) headers are decoded, so the inner packet is followed through the tunnel and the
  encapsulation hop is named (outer addresses, VNI or proto 4).
- **Which packets are the probe's.** A token in the payload (ICMP, UDP), the TCP initial sequence
  number (NAT never touches it), and for answers the reverse of a forward form, the token echoed back,
  or an ICMP error quoting a forward form. NAT therefore does not lose the trail: the packet seen before
  and after a node is the same packet, and the difference is the translation.
- **Why the kernel did it.** Between a packet entering and leaving a namespace the kernel routed it:
  `ip route get fibmatch DST from SRC iif DEV` (rtnetlink, in that namespace) names the table entry it
  used. A destination that changed is a DNAT; it is named from the rules (iptables: the packet counters
  of `iptables-legacy-save -c` before and after the probe give KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP; nft:
  the live `service-ips` map element and the endpoint chain with that `dnat to`, since kube-proxy's nft
  rules carry no counters; IPVS: the virtual server and real server from the node's IPVS table).
  kube-proxy's iptables mode here runs on iptables-legacy, which `nft monitor trace` cannot see;
  counters work for both.
- **Drops.** The last place the packet was seen, then the reason, in order: an ICMP error on the wire
  (fragmentation needed: MTU; unreachable: no route or a REJECT), a DROP/REJECT rule whose counter moved
  in that namespace (its comment names, e.g., the NetworkPolicy; a NetworkPolicy chain only if it is one
  of the probe's own pods'), no route (`ip route get` fails there), a frame larger than the next link's
  MTU (a switch drops it silently), a next hop that never answered ARP. A drop counter that moved
  elsewhere (other traffic) is only a "possibly", and the route analysis still runs.
- **Names.** Pods and hosts are resolved as checks name them (lab/targets.py); `svc/[NS/]NAME` and
  `pod/[NS/]NAME` say which is meant, an address in the service CIDR is its Service, and a bare name that
  is both a Service and a pod or host is refused.

Bounded: the probe waits `timeout` (default 1 s, at most 4 s) and the whole trace takes well under 5 s.
"""
from __future__ import annotations

import ctypes
import errno
import os
import random
import select
import socket
import struct
import time
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from lab import observe, state, targets
from lab.observe import NsView, RouteView, Rule
from cni import network_policy
from routing import ipip, vxlan
from topo import names, netns, underlay
from topo.errors import StateError
from topo.model import BRIDGE, Lab

ETH_P_ALL, ETH_P_IP, ETH_P_8021Q = 0x0003, 0x0800, 0x8100
ARPHRD_ETHER, ARPHRD_TUNNEL, ARPHRD_LOOPBACK = 1, 768, 772  # Ethernet, IP-in-IP (tunl0: no link header), lo
PACKET_OUTGOING = 4
SOL_PACKET, PACKET_STATISTICS = 263, 6
SO_ATTACH_FILTER, SO_RCVBUFFORCE = 26, 33
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2
IPPROTO_IPIP = 4
MAX_TIMEOUT = 4.0
GRACE = 0.03  # after the answer arrived: the captures of its last hops are already queued; a little slack
CAPTURE_BUFFER = 4 << 20  # per socket, forced past net.core.rmem_max (SO_RCVBUFFORCE: we are root)
MAX_NODES = 16  # capture in every node of a lab up to this size
MAX_PODS = 64  # and in up to this many pods (the source, the destinations, the watched nodes' pods)
MAX_ENDPOINTS = 16  # of a service's endpoints (those on the source's node first)
MAX_FRAMES = 20000  # read at most this many captured frames in all ...
READ_BUDGET = 0.5  # ... and for at most this long (seconds): sustained traffic cannot make a trace spin
VXLAN_PORTS = (vxlan.PORT, 4789)
POLICY_WHERE = f"nft {network_policy.FAMILY} {network_policy.TABLE} "  # Rule.where of a NetworkPolicy rule
POLICY_CHAINS = ("cali-tw-", "cali-fw-")  # + a pod's host veth: its ingress and egress chains
UDP_MARK = b"echo kubenet-trace-"  # a UDP probe's payload: agnhost netexec answers "echo X" with X
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
ICMP_ECHO_REPLY, ICMP_UNREACH, ICMP_ECHO, ICMP_TIME_EXCEEDED = 0, 3, 8, 11
UNREACH = {0: "network unreachable", 1: "host unreachable", 2: "protocol unreachable", 3: "port unreachable",
           4: "fragmentation needed", 9: "network administratively prohibited",
           10: "host administratively prohibited", 13: "communication administratively prohibited"}


# ------------------------------------------------------------------------------------------ packets

@dataclass(frozen=True)
class Packet:
    """An IPv4 packet as far as a trace needs it; `inner` is what a VXLAN frame, an IP-in-IP packet or an
    ICMP error carries."""

    src: str
    dst: str
    proto: str  # tcp, udp, icmp, or the protocol number
    length: int  # the IP total length
    sport: int | None = None
    dport: int | None = None
    flags: int = 0  # TCP flags
    seq: int = 0
    ack: int = 0
    icmp_type: int | None = None
    icmp_code: int | None = None
    icmp_id: int | None = None
    icmp_mtu: int | None = None  # next-hop MTU of a "fragmentation needed"
    payload: bytes = b""
    inner: Packet | None = None
    vni: int | None = None
    inner_mac: str | None = None  # destination MAC of the frame inside VXLAN
    encap: str | None = None  # "vxlan" or "ipip": `inner` is the packet this one carries through a tunnel

    @property
    def form(self) -> tuple:
        """The tuple NAT rewrites: (proto, src, sport, dst, dport); an ICMP echo's id stands for both ports."""
        if self.proto == "icmp" and self.icmp_type in (ICMP_ECHO, ICMP_ECHO_REPLY):
            return ("icmp", self.src, self.icmp_id, self.dst, self.icmp_id)
        return (self.proto, self.src, self.sport, self.dst, self.dport)

    def flow(self) -> str:
        if self.sport is not None:
            return f"{self.src}:{self.sport} > {self.dst}:{self.dport}"
        return f"{self.src} > {self.dst}"

    def summary(self) -> str:
        if self.proto == "tcp":
            names_ = [n for bit, n in ((TCP_SYN, "SYN"), (TCP_ACK, "ACK"), (TCP_RST, "RST"), (TCP_FIN, "FIN"))
                      if self.flags & bit]
            return f"TCP {self.flow()} [{'-'.join(names_) or '.'}]"
        if self.proto == "udp":
            return f"UDP {self.flow()} len {self.length}"
        if self.proto == "icmp":
            if self.icmp_type == ICMP_ECHO:
                return f"ICMP echo request {self.flow()} len {self.length}"
            if self.icmp_type == ICMP_ECHO_REPLY:
                return f"ICMP echo reply {self.flow()}"
            return f"ICMP {icmp_error(self)} {self.flow()}"
        if self.encap == "ipip":
            return f"IPIP {self.flow()} (proto 4)"
        return f"IP proto {self.proto} {self.flow()}"


def icmp_error(p: Packet) -> str:
    if p.icmp_type == ICMP_UNREACH:
        text = UNREACH.get(p.icmp_code or 0, f"unreachable code {p.icmp_code}")
        return f"{text} (mtu {p.icmp_mtu})" if p.icmp_code == 4 else text
    if p.icmp_type == ICMP_TIME_EXCEEDED:
        return "time exceeded"
    return f"type {p.icmp_type} code {p.icmp_code}"


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def parse_frame(frame: bytes, depth: int = 0) -> Packet | None:
    """An Ethernet frame (VLAN tags skipped) holding IPv4, or None."""
    if len(frame) < 14:
        return None
    offset, ethertype = 12, struct.unpack_from("!H", frame, 12)[0]
    while ethertype == ETH_P_8021Q and len(frame) >= offset + 6:
        offset += 4
        ethertype = struct.unpack_from("!H", frame, offset)[0]
    if ethertype != ETH_P_IP:
        return None
    return parse_ip(frame[offset + 2:], depth)


def parse_ip(data: bytes, depth: int = 0) -> Packet | None:
    """An IPv4 packet; tolerates truncation (an ICMP error quotes only the header and 8 bytes)."""
    if len(data) < 20 or data[0] >> 4 != 4:
        return None
    ihl = (data[0] & 0x0F) * 4
    length = struct.unpack_from("!H", data, 2)[0]
    proto_num = data[9]
    src, dst = str(IPv4Address(data[12:16])), str(IPv4Address(data[16:20]))
    l4 = data[ihl:length] if length >= ihl else data[ihl:]
    if proto_num == 6 and len(l4) >= 8:
        sport, dport, seq = struct.unpack_from("!HHI", l4)
        ack, flags = (struct.unpack_from("!I", l4, 8)[0], l4[13]) if len(l4) >= 14 else (0, 0)
        offset = (l4[12] >> 4) * 4 if len(l4) >= 13 else len(l4)
        return Packet(src, dst, "tcp", length, sport, dport, flags, seq, ack, payload=bytes(l4[offset:offset + 64]))
    if proto_num == 17 and len(l4) >= 8:
        sport, dport = struct.unpack_from("!HH", l4)
        payload = bytes(l4[8:])
        inner, vni, inner_mac = None, None, None
        if dport in VXLAN_PORTS and len(payload) >= 8 + 14 and payload[0] & 0x08 and depth == 0:
            vni = int.from_bytes(payload[4:7], "big")
            inner = parse_frame(payload[8:], depth + 1)
            inner_mac = _mac(payload[8:14])
        return Packet(src, dst, "udp", length, sport, dport, payload=payload[:64], inner=inner, vni=vni,
                      inner_mac=inner_mac, encap="vxlan" if vni is not None else None)
    if proto_num == IPPROTO_IPIP and depth == 0:
        # IP-in-IP (Calico's tunl0): the whole inner IPv4 packet follows the outer header.
        inner = parse_ip(l4, depth + 1)
        return Packet(src, dst, "ipip", length, inner=inner, encap="ipip" if inner is not None else None)
    if proto_num == 1 and len(l4) >= 8:
        itype, code = l4[0], l4[1]
        ident, seq_ = struct.unpack_from("!HH", l4, 4)
        if itype in (ICMP_ECHO, ICMP_ECHO_REPLY):
            return Packet(src, dst, "icmp", length, icmp_type=itype, icmp_code=code, icmp_id=ident,
                          payload=bytes(l4[8:72]))
        mtu = seq_ if itype == ICMP_UNREACH and code == 4 else None
        quoted = parse_ip(l4[8:], depth + 1) if depth < 2 else None
        return Packet(src, dst, "icmp", length, icmp_type=itype, icmp_code=code, icmp_mtu=mtu, inner=quoted)
    return Packet(src, dst, str(proto_num), length)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, ident, 1)
    return struct.pack("!BBHHH", ICMP_ECHO, 0, _checksum(header + payload), ident, 1) + payload


# ------------------------------------------------------------------------------------------ filter

# Classic BPF (linux/filter.h), so each capture socket's queue holds only frames a trace can use.
_LD_H_ABS, _LD_B_ABS, _LD_H_IND, _LD_B_IND, _LD_MEM, _ST = 0x28, 0x30, 0x48, 0x50, 0x60, 0x02
_AND_K, _LSH_K, _ADD_X, _TAX = 0x54, 0x64, 0x0C, 0x07
_JEQ_K, _JSET_K, _RET_K = 0x15, 0x45, 0x06
SKF_AD_OFF, SKF_AD_PROTOCOL = -0x1000, 0  # ancillary load: skb->protocol
SKF_NET_OFF = -0x100000  # loads relative to the network header, whatever the link layer (tunl0 has none)
KEEP = 0x40000  # bytes of a kept frame (all of it)

Insn = tuple[int, int, int, int]  # (code, jt, jf, k) as struct sock_filter


def capture_filter(protocol: str) -> list[Insn]:
    """A classic BPF program keeping the IPv4 frames that can be the probe or its answer: ICMP (echo, and
    every error, which quotes the packet it is about), the probe's protocol (for TCP only segments with SYN
    or RST: the handshake, never the data of a busy connection), and VXLAN (UDP 8472/4789) or IP-in-IP
    (proto 4) packets whose inner packet passes the same test. ARP, IPv6 and everything else stay out."""
    prog: list[Any] = []  # instructions (code, k, jt label, jf label) and label strings

    def op(code: int, k: int = 0, jt: str | None = None, jf: str | None = None) -> None:
        prog.append((code, k, jt, jf))

    def transport(base: int, tag: str) -> None:
        """A = IP protocol; X + base = offset of its transport header from the network header."""
        op(_JEQ_K, 1, "keep")
        op(_JEQ_K, 6, f"{tag}tcp")
        op(_JEQ_K, 17, f"{tag}udp", "drop")
        prog.append(f"{tag}tcp")
        if protocol == "tcp":
            op(_LD_B_IND, SKF_NET_OFF + base + 13)  # TCP flags
            op(_JSET_K, TCP_SYN | TCP_RST, "keep", "drop")
        else:
            op(_RET_K, 0)
        prog.append(f"{tag}udp")

    def inner(base: int, tag: str) -> None:
        """An inner IPv4 header at X + base: X becomes outer plus inner header length."""
        op(_LD_B_IND, SKF_NET_OFF + base + 9)
        op(_ST, 0)
        op(_LD_B_IND, SKF_NET_OFF + base)
        op(_AND_K, 0x0F)
        op(_LSH_K, 2)
        op(_ADD_X)
        op(_TAX)
        op(_LD_MEM, 0)
        transport(base, tag)
        op(_RET_K, KEEP if protocol == "udp" else 0)

    op(_LD_H_ABS, SKF_AD_OFF + SKF_AD_PROTOCOL)
    op(_JEQ_K, ETH_P_IP, None, "drop")
    op(_LD_B_ABS, SKF_NET_OFF)  # X = the IPv4 header's length
    op(_AND_K, 0x0F)
    op(_LSH_K, 2)
    op(_TAX)
    op(_LD_B_ABS, SKF_NET_OFF + 9)
    op(_JEQ_K, IPPROTO_IPIP, "ipip")
    transport(0, "")
    op(_LD_H_IND, SKF_NET_OFF + 2)  # UDP destination port
    for port in VXLAN_PORTS:
        op(_JEQ_K, port, "vxlan")
    op(_RET_K, KEEP if protocol == "udp" else 0)
    prog.append("vxlan")
    op(_LD_H_IND, SKF_NET_OFF + 8 + 8 + 12)  # UDP, VXLAN headers, then the inner frame's EtherType
    op(_JEQ_K, ETH_P_IP, None, "drop")
    inner(8 + 8 + 14, "vx")
    prog.append("ipip")
    inner(0, "ip")
    prog.append("keep")
    op(_RET_K, KEEP)
    prog.append("drop")
    op(_RET_K, 0)
    labels: dict[str, int] = {}
    for item in prog:
        if isinstance(item, str):
            labels[item] = sum(1 for x in prog[:prog.index(item)] if not isinstance(x, str))
    code = [x for x in prog if not isinstance(x, str)]
    out: list[Insn] = []
    for i, (c, k, jt, jf) in enumerate(code):
        out.append((c, labels[jt] - i - 1 if jt else 0, labels[jf] - i - 1 if jf else 0, k & 0xFFFFFFFF))
    return out


def attach_filter(sock: socket.socket, program: list[Insn]) -> None:
    """SO_ATTACH_FILTER: the kernel copies the program (struct sock_fprog: length, pointer)."""
    blob = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(blob, len(blob))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", len(program), ctypes.addressof(buf)))


# ------------------------------------------------------------------------------------------ places

@dataclass(frozen=True)
class Place:
    """A namespace a probe can be seen in, as the learner names it."""

    netns: str
    name: str  # node1, node1-pod1, switch ul, tor-rack1, external-web
    kind: str  # pod, node, switch, router, external
    ip: IPv4Address | None = None
    node: str | None = None  # a pod's node


@dataclass(frozen=True)
class Target:
    kind: str  # pod, node, router, external, service, ip
    name: str
    ip: IPv4Address
    port: int | None
    protocol: str
    service: Any = None  # the ServicePortEndpoints behind a service target
    places: tuple[Place, ...] = ()  # where arriving means delivered (the pod, or the service's endpoints)


def _pod_label(key: str) -> str:
    namespace, name = key.split("/", 1)
    return name if namespace == "default" else key


class Lookup:
    """Names of a running lab: pods, nodes, routers, external hosts, services, switch ports, veths."""

    def __init__(self, st: state.LabState, lab: Lab, running: list, sps: list) -> None:
        self.st, self.lab, self.running, self.sps = st, lab, running, sps
        self.names = targets.Lookup(st, lab)  # pods and hosts by name, as checks and faults name them
        self.plan = underlay.plan(lab)
        self.places: dict[str, Place] = {}
        for host in self.plan.hosts:
            kind = "router" if host.router else "external" if host.external else "node"
            ip = next((l.address.ip for l in self.plan.links if l.host == host.name), None)
            if kind == "node":
                ip = lab.node(host.name).ip
            self.places[host.netns] = Place(host.netns, host.name, kind, ip)
        for seg in self.plan.segments:
            self.places[seg.netns] = Place(seg.netns, f"switch {seg.switch}", "switch")
        self.pods: dict[str, Place] = {}
        for key, ps in st.pods.items():
            place = Place(ps.netns, _pod_label(key), "pod", IPv4Address(ps.ip), ps.node)
            self.places[ps.netns] = place
            self.pods[key] = place
        self.veths = {names.host_veth(names.sandbox_id(lab.name, *key.split("/", 1))): key for key in st.pods}
        self.veth_of = {st.pods[key].netns: veth for veth, key in self.veths.items()}  # pod netns -> its veth
        self.ports: dict[tuple[str, str], str] = {}  # (switch netns, port) -> host
        seg_ns = {s.switch: s.netns for s in self.plan.segments}
        for link in self.plan.links:
            if link.segment is not None and link.port is not None:
                self.ports[(seg_ns[link.segment], link.port)] = link.host
        self.by_ip: dict[str, Place] = {str(p.ip): p for p in self.places.values() if p.ip is not None}
        for node in lab.nodes:  # a node also answers from its cni0 address (ICMP errors to its pods)
            self.by_ip.setdefault(str(node.gateway.ip), self.places[lab.node_netns(node.name)])
        # Both ends of every cable: a pod's eth0 and its veth on the node, a host's NIC and its switch port
        # (or the other end of a point-to-point link).
        self.peers: Peers = {}
        host_ns = {h.name: h.netns for h in self.plan.hosts}
        for veth, key in self.veths.items():
            ps = st.pods[key]
            self._cable((ps.netns, "eth0"), (lab.node_netns(ps.node), veth))
        for link in self.plan.links:
            if link.segment is not None and link.port is not None:
                self._cable((host_ns[link.host], link.intf), (seg_ns[link.segment], link.port))
            elif link.peer is not None and link.peer_intf is not None:
                self._cable((host_ns[link.host], link.intf), (host_ns[link.peer], link.peer_intf))

    def _cable(self, a: tuple[str, str], b: tuple[str, str]) -> None:
        self.peers[a] = b
        self.peers[b] = a

    def known(self) -> str:
        hosts = [p.name for p in self.places.values() if p.kind in ("node", "router", "external")]
        return ", ".join(hosts + sorted(p.name for p in self.pods.values()) +
                         sorted({sp.service.name for sp in self.sps}))

    def source(self, text: str) -> Place:
        """Where the probe starts: a node, router or external host by name, or a pod (`pod/[NS/]NAME`, or
        a bare name no host has), alive."""
        kind, name = _form(text)
        if kind == "service":
            raise StateError(f"{text}: a trace starts in a pod, node or external host, not in a service")
        found = self.names.pod(name) if kind == "pod" else self.names.host(name) or self.names.pod(name)
        if found is None or found.netns not in self.places:
            raise StateError(f"no pod, node or external host named {name} in lab {self.st.name} "
                             f"(known: {self.known()})")
        self.names.require_alive(found)
        return self.places[found.netns]

    def target(self, text: str, protocol: str | None) -> Target:
        """Where the probe goes: `svc/[NS/]NAME` (or `service/...`), `pod/[NS/]NAME`, an IPv4 address (a
        ClusterIP is its Service), or a bare name; each optionally with :PORT. A bare name that is both a
        Service and a pod or host is refused: guessing would send the probe somewhere else than meant."""
        name, port = text, None
        if text.count(":") == 1 and text.rsplit(":", 1)[1].isdigit():
            name, port_text = text.rsplit(":", 1)
            port = int(port_text)
            if not 0 < port < 65536:
                raise StateError(f"port {port} is out of range (1-65535)")
        kind, rest = _form(name)
        if kind == "service":
            svc = self.names.service(name)
            return self._service_target([sp for sp in self.sps if sp.service.key == svc.key], name, port, protocol)
        if kind == "pod":
            pod = self.names.pod(rest)
            if pod is None:
                raise StateError(f"no pod {rest} in lab {self.st.name}")
            return self._place_target(self.pods[pod.key], port, protocol, name)
        try:
            return self._ip_target(IPv4Address(name), port, protocol)
        except ValueError:
            pass
        host = self.names.host(name)
        pod = self.names.pod(name) if host is None else None
        services = self._services_named(name)
        if services and (host or pod):
            svc = services[0].service
            what = f"pod {pod.key}" if pod else f"{host.kind} {name}"
            ref = f"svc/{svc.name if svc.namespace == 'default' else svc.key}"
            raise StateError(f"{name} is both the {what} and the service {svc.key}: give {ref} for the service"
                             + (f" or pod/{name} for the pod" if pod else ""))
        if host or pod:
            return self._place_target(self.places[host.netns] if host else self.pods[pod.key], port, protocol, name)
        if services:
            return self._service_target(services, name, port, protocol)
        raise StateError(f"no pod, node, external host or service named {name} in lab {self.st.name} "
                         f"(known: {self.known()})")

    def _place_target(self, place: Place, port: int | None, protocol: str | None, name: str) -> Target:
        if place.ip is None:
            raise StateError(f"{name} has no address to send to")
        return Target(place.kind, place.name, place.ip, port, _protocol(protocol, port, name), None, (place,))

    def _ip_target(self, ip: IPv4Address, port: int | None, protocol: str | None) -> Target:
        """An address. One in the service CIDR is a ClusterIP: the Service with that IP and port, built
        from the Service itself (never from a name, which a pod may share). A bare ClusterIP without a
        port is pinged as given, as the explainer's learner would (no kube-proxy rule matches ICMP)."""
        if ip in self.lab.cluster.service_cidr and (port is not None or protocol not in (None, "icmp")):
            fits = [sp for sp in self.sps if sp.service.cluster_ip == ip and (port is None or sp.port.port == port)
                    and (protocol is None or sp.protocol == protocol)]
            if fits:
                return self._from_service(fits[0], port, protocol)
        owner = self.by_ip.get(str(ip))
        return Target("ip", str(ip), ip, port, _protocol(protocol, port, str(ip)), None, (owner,) if owner else ())

    def _from_service(self, sp: Any, port: int | None, protocol: str | None) -> Target:
        eps = tuple(self.pods[e.pod] for e in sp.endpoints if e.pod in self.pods)
        return Target("service", sp.name, sp.service.cluster_ip, port or sp.port.port, protocol or sp.protocol, sp,
                      eps)

    def _services_named(self, name: str) -> list[Any]:
        """The service ports of the service NAME (any namespace, if only one has it) or NAMESPACE/NAME."""
        namespace, _, short = name.rpartition("/")
        found = [sp for sp in self.sps if sp.service.name == short and (not namespace or sp.service.namespace == namespace)]
        if len({sp.service.key for sp in found}) > 1:
            raise StateError(f"service {name} is in several namespaces "
                             f"({', '.join(sorted({sp.service.key for sp in found}))}): give svc/NAMESPACE/NAME")
        return found

    def _service_target(self, found: list[Any], name: str, port: int | None, protocol: str | None) -> Target:
        if not found:
            raise StateError(f"service {name} has no ports to trace")
        if found[0].service.cluster_ip is None:
            raise StateError(f"service {found[0].service.key} is headless (no ClusterIP): trace one of its pods")
        fits = [sp for sp in found if (port is None or sp.port.port == port) and
                (protocol is None or sp.protocol == protocol)]
        if not fits:
            ports = ", ".join(f"{sp.port.port}/{sp.protocol}" for sp in found)
            raise StateError(f"service {name} has no port {port or ''}{'/' + protocol if protocol else ''} "
                             f"(it has {ports})")
        return self._from_service(fits[0], port, protocol)

    def describe_dev(self, place: Place, dev: str) -> str:
        if place.kind == "switch":
            host = self.ports.get((place.netns, dev))
            return f"port to {host}" if host else "port"
        if place.kind == "node":
            if dev in self.veths:
                return f"{_pod_label(self.veths[dev])}'s veth on {BRIDGE}"
            gateway = f"bridge, gateway {self.lab.node(place.name).gateway.ip}"
            return {BRIDGE: gateway, vxlan.DEVICE: f"VXLAN VNI {vxlan.VNI}", ipip.DEVICE: "IP-in-IP tunnel",
                    "eth0": "underlay NIC"}.get(dev, "")
        return ""


def _form(text: str) -> tuple[str | None, str]:
    """kubectl's TYPE/NAME forms: ("service", text) for svc/... and service/..., ("pod", rest) for
    pod/[NS/]NAME, (None, text) for a bare name."""
    if text.startswith(targets.SERVICE_PREFIXES):
        return "service", text
    if text.startswith("pod/"):
        return "pod", text[len("pod/"):]
    return None, text


def _protocol(given: str | None, port: int | None, name: str) -> str:
    if given:
        if given != "icmp" and port is None:
            raise StateError(f"--protocol {given} needs a port: {name}:PORT")
        return given
    return "tcp" if port is not None else "icmp"


# ------------------------------------------------------------------------------------------ capture

@dataclass(frozen=True)
class Sighting:
    place: Place
    dev: str
    outgoing: bool
    packet: Packet  # as on the wire (outer, for VXLAN and IP-in-IP)

    @property
    def eff(self) -> Packet:
        """The probe's own packet: the inner one of a VXLAN frame or an IP-in-IP packet."""
        return self.packet.inner if self.packet.encap and self.packet.inner is not None else self.packet


class Captures:
    """Packet sockets opened inside namespaces, read after the probe.

    Bounded and honest: each socket keeps only what `capture_filter` lets through, its queue is forced to
    CAPTURE_BUFFER (SO_RCVBUFFORCE, set from inside the lab namespace; net.core.rmem_max is not touched),
    reading stops after MAX_FRAMES frames or READ_BUDGET seconds, and frames the kernel could not queue
    (PACKET_STATISTICS drops) are reported: a capture that lost frames must not pass for a drop."""

    def __init__(self, places: list[Place], protocol: str) -> None:
        self.socks: list[tuple[Place, socket.socket]] = []
        self.lost: dict[str, str] = {}  # place name -> what the capture there missed
        program = capture_filter(protocol)
        for place in places:
            try:
                with netns.entered(place.netns):
                    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, CAPTURE_BUFFER)
                    except OSError:  # without CAP_NET_ADMIN: whatever rmem_max allows
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CAPTURE_BUFFER)
            except OSError:
                continue  # the namespace vanished: nothing to see there
            try:
                attach_filter(sock, program)
            except OSError:
                pass  # unfiltered still works, only less bounded
            sock.setblocking(False)
            self.socks.append((place, sock))
        # Frames queued between a socket's creation and its filter are someone else's, and harmless.

    def read(self, budget: float = READ_BUDGET, limit: int = MAX_FRAMES) -> list[Sighting]:
        """Every frame seen, namespace by namespace, each namespace's in the order the kernel handed them
        over (a socket's queue is first in, first out). The sockets were opened just before the probe, so
        nothing older is in them. Kernel timestamps are not used to order namespaces against each other:
        a forwarded TCP segment keeps its sender's departure time (a monotonic clock) across namespaces."""
        out = []
        deadline = time.monotonic() + budget
        frames = 0
        for place, sock in self.socks:
            missed = []
            while True:
                if frames >= limit or time.monotonic() >= deadline:
                    missed.append(f"not read to the end (a trace reads at most {limit} frames, for {budget:g} s)")
                    break
                try:
                    data, addr = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                frames += 1
                if addr[3] == ARPHRD_TUNNEL:  # tunl0: the IP header comes first
                    packet = parse_ip(data)
                elif addr[3] in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
                    packet = parse_frame(data)
                else:
                    continue
                if packet is not None:
                    out.append(Sighting(place, addr[0], addr[2] == PACKET_OUTGOING, packet))
            dropped = _socket_drops(sock)
            if dropped:
                missed.insert(0, f"{dropped} frame{'s' if dropped != 1 else ''} dropped (capture buffer full)")
            if missed:
                self.lost[place.name] = ", ".join(missed)
        return out

    def close(self) -> None:
        for _, sock in self.socks:
            sock.close()


def _socket_drops(sock: socket.socket) -> int:
    """Frames the kernel had for this socket but could not queue (struct tpacket_stats.tp_drops)."""
    try:
        _packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    except OSError:
        return 0
    return drops


# ------------------------------------------------------------------------------------------ probe

@dataclass
class Probe:
    protocol: str
    dst: IPv4Address
    port: int | None
    sport: int
    token: bytes
    ident: int
    sent_at: float = 0.0  # time.monotonic(), as answered_at: only their difference (the RTT) is shown
    answer: str = ""  # what the source socket got: connected, refused, reply, an error text, or ""
    answered_at: float | None = None
    refused_locally: str = ""  # the source's own kernel would not send it (EMSGSIZE, no route)


def _bind_random(sock: socket.socket) -> int:
    for _ in range(20):
        port = random.randint(33000, 60999)
        try:
            sock.bind(("", port))
            return port
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    sock.bind(("", 0))
    return sock.getsockname()[1]


def send_probe(source: Place, target: Target, size: int, timeout: float) -> Probe:
    """One probe from inside the source's namespace; returns when answered or after `timeout`."""
    token = os.urandom(6).hex().encode()
    proto = target.protocol
    with netns.entered(source.netns):
        if proto == "icmp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        elif proto == "tcp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)  # DF: MTU problems show
        ident = random.randint(1, 0xFFFF)
        dst = str(target.ip)
        if proto == "icmp":
            probe = Probe(proto, target.ip, None, ident, token, ident)
            payload = (b"kubenet-trace " + token).ljust(max(size, 0), b".")
            probe.sent_at = time.monotonic()
            sock.sendto(echo_request(ident, payload), (dst, 0))
            _wait_icmp(sock, probe, timeout)
        elif proto == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
            probe = Probe(proto, target.ip, target.port, _bind_random(sock), token, 0)
            probe.sent_at = time.monotonic()
            sock.connect_ex((dst, target.port or 0))
            _, writable, _ = select.select([], [sock], [], timeout)
            if writable:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                probe.answer = "connected" if err == 0 else "refused" if err == errno.ECONNREFUSED else os.strerror(err)
                probe.answered_at = time.monotonic()
        else:
            probe = Probe(proto, target.ip, target.port, _bind_random(sock), token, 0)
            payload = (UDP_MARK + token).ljust(max(size, 0), b".")
            sock.connect((dst, target.port or 0))
            probe.sent_at = time.monotonic()
            try:
                sock.send(payload)
                readable, _, _ = select.select([sock], [], [], timeout)
                if readable:
                    sock.recv(65535)
                    probe.answer, probe.answered_at = "reply", time.monotonic()
            except OSError as exc:
                probe.answer = "refused" if exc.errno == errno.ECONNREFUSED else os.strerror(exc.errno or 0)
                probe.answered_at = time.monotonic()
        return probe
    except OSError as exc:
        # The source's own kernel refused to send (a DF packet above the route's MTU, no route): a verdict
        # as much as a drop on the way is.
        refused = Probe(proto, target.ip, target.port, 0, token, 0, time.monotonic())
        refused.refused_locally = os.strerror(exc.errno) if exc.errno else str(exc)
        return refused
    finally:
        sock.close()


def _wait_icmp(sock: socket.socket, probe: Probe, timeout: float) -> None:
    deadline = probe.sent_at + timeout
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            return
        try:
            data = sock.recv(65535)
        except OSError:
            return
        p = parse_ip(data)
        if p is None or p.proto != "icmp":
            continue
        if p.icmp_type == ICMP_ECHO_REPLY and probe.token in p.payload:
            probe.answer, probe.answered_at = "reply", time.monotonic()
            return
        if p.icmp_type not in (ICMP_ECHO, ICMP_ECHO_REPLY) and p.inner is not None and p.inner.icmp_id == probe.ident:
            probe.answer, probe.answered_at = icmp_error(p), time.monotonic()
            return


# ------------------------------------------------------------------------------------------ analysis

def classify(sightings: list[Sighting], probe: Probe, source: Place) -> tuple[list[Sighting], list[Sighting]]:
    """(forward, reply) sightings of this probe, each up to its first complete journey."""
    isn = None
    if probe.protocol == "tcp":
        # The SYN as it left the source. A node's own connection to a ClusterIP may already be masqueraded
        # (another source port) when first seen, so the port is preferred, not required.
        syns = [s.eff for s in sightings if s.place == source and s.outgoing and s.eff.proto == "tcp" and
                s.eff.flags & TCP_SYN and not s.eff.flags & TCP_ACK]
        best = next((p for p in syns if p.sport == probe.sport), None) or \
            next((p for p in syns if p.dport == probe.port or p.dst == str(probe.dst)), None) or \
            (syns[0] if syns else None)
        isn = best.seq if best is not None else None

    def is_forward(p: Packet) -> bool:
        if probe.protocol == "icmp":
            return p.proto == "icmp" and p.icmp_type == ICMP_ECHO and probe.token in p.payload
        if probe.protocol == "udp":  # the answer echoes the token too, without the "echo " command
            return p.proto == "udp" and p.payload.startswith(UDP_MARK) and probe.token in p.payload
        return p.proto == "tcp" and isn is not None and p.seq == isn and bool(p.flags & TCP_SYN) and \
            not p.flags & TCP_ACK

    forward = [s for s in sightings if is_forward(s.eff)]
    forms = {s.eff.form for s in forward}
    reverse = {(f[0], f[3], f[4], f[1], f[2]) for f in forms}

    def is_reply(p: Packet) -> bool:
        if p.proto == "icmp" and p.icmp_type not in (ICMP_ECHO, ICMP_ECHO_REPLY, None):
            q = p.inner
            if q is None:
                return False
            if q.proto == "tcp":
                return isn is not None and q.seq == isn and q.form in forms
            return q.form in forms or (q.proto == "icmp" and q.icmp_id == probe.ident)
        if probe.protocol == "icmp":
            return p.proto == "icmp" and p.icmp_type == ICMP_ECHO_REPLY and probe.token in p.payload
        if probe.protocol == "tcp":  # the ISN is random: acknowledging it is proof enough, in any NAT form
            return p.proto == "tcp" and isn is not None and p.ack == (isn + 1) & 0xFFFFFFFF and \
                bool(p.flags & (TCP_SYN | TCP_RST))
        as_sent = p.src == str(probe.dst) and p.sport == probe.port and p.dport == probe.sport  # back at the source
        return p.proto == "udp" and (p.form in reverse or as_sent) and not p.payload.startswith(UDP_MARK)

    reply = [s for s in sightings if is_reply(s.eff)]
    return forward, reply


Peers = dict[tuple[str, str], tuple[str, str]]  # (netns, dev) -> (netns, dev) at the other end of its cable


def walk(sightings: list[Sighting], start: str, peers: Peers) -> list[Sighting]:
    """The packet's journey, in order: a namespace's sightings in their queue order, and from an
    interface it left by, on to the In sighting at the other end of that cable. The first repeat of an
    (namespace, interface, direction) ends it: a retransmission, or a loop."""
    queues: dict[str, list[Sighting]] = {}
    for s in sightings:
        queues.setdefault(s.place.netns, []).append(s)
    pos = dict.fromkeys(queues, 0)
    path: list[Sighting] = []
    seen: set[tuple[str, str, bool]] = set()
    ns = start
    while ns in queues and pos[ns] < len(queues[ns]):
        s = queues[ns][pos[ns]]
        pos[ns] += 1
        key = (ns, s.dev, s.outgoing)
        if key in seen:
            break
        seen.add(key)
        path.append(s)
        if s.outgoing and (ns, s.dev) in peers:
            other, dev = peers[(ns, s.dev)]
            queue = queues.get(other, [])
            j = next((k for k in range(pos.get(other, 0), len(queue))
                      if not queue[k].outgoing and queue[k].dev == dev), None)
            if j is not None:
                pos[other], ns = j, other
    return path


def origin(reply: list[Sighting], preferred: list[Place], peers: Peers | None = None) -> str | None:
    """Where an answer was born: a namespace whose first sighting of it is outgoing; failing that (it was
    born somewhere not watched), where it first came in from a cable whose other end was not watched."""
    firsts: dict[str, Sighting] = {}
    for s in reply:
        firsts.setdefault(s.place.netns, s)
    born = [ns for ns, s in firsts.items() if s.outgoing]
    if not born and peers is not None:
        born = [ns for ns, s in firsts.items() if peers.get((ns, s.dev), ("", ""))[0] not in firsts]
    for place in preferred:
        if place.netns in born:
            return place.netns
    return born[0] if born else None


@dataclass
class Hop:
    place: str
    kind: str  # send, in, out, route, dnat, snat, un-nat, encap, decap, bridge, deliver, drop, error
    text: str
    dev: str = ""
    packet: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class TraceResult:
    lab: str
    source: str
    destination: str
    protocol: str
    port: int | None
    hops: list[Hop] = field(default_factory=list)
    reply: list[Hop] = field(default_factory=list)
    delivered: bool = False
    answered: bool = False
    reached: str = ""  # the place it was delivered to
    verdict: str = ""
    dropped_at: str = ""
    dropped_by: str = ""
    seconds: float = 0.0
    watched: list[str] = field(default_factory=list)
    capture_lost: list[str] = field(default_factory=list)  # "node1: 3 frames dropped (...)": the path may lack hops

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Kernel:
    """Read-only questions to the namespaces of the path, asked after the probe (cached per namespace)."""

    def __init__(self) -> None:
        self._views: dict[str, NsView | None] = {}

    def view(self, ns: str) -> NsView | None:
        if ns not in self._views:
            self._views[ns] = observe.read_namespace(ns)
        return self._views[ns]

    def route(self, ns: str, dst: str, src: str | None, iif: str | None, fibmatch: bool = True) -> RouteView | str:
        view = self.view(ns)
        if view is None:
            return "namespace gone"
        names_ = {link.index: link.name for link in view.links.values()}
        index = view.links[iif].index if iif and iif in view.links else None
        try:
            handle = netns.rtnl_in(ns)
        except OSError as exc:
            return str(exc)
        try:
            return observe.route_get(handle, IPv4Address(dst), IPv4Address(src) if src and index else None,
                                     index, names_, fibmatch)
        finally:
            handle.close()


    def source_address(self, ns: str, dst: str) -> str | None:
        """The address the kernel gives a socket that does not choose one (`ip route get DST`'s src)."""
        try:
            handle = netns.rtnl_in(ns)
        except OSError:
            return None
        try:
            got = observe.route_get(handle, IPv4Address(dst), fibmatch=False)
        finally:
            handle.close()
        return str(got.src) if not isinstance(got, str) and got.src else None


def _counters(spaces: list[str]) -> dict[str, dict[str, Rule]]:
    """Every counted rule of each namespace, read in parallel (setns is per thread; the savers are
    separate processes, so threads overlap their waits)."""
    from concurrent.futures import ThreadPoolExecutor

    netns.home_fd()  # opened once, here, in the namespace every worker thread returns to
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(spaces)))) as pool:
        return dict(zip(spaces, pool.map(observe.rule_counters, spaces)))


def _diff(before: dict[str, Rule], after: dict[str, Rule]) -> list[Rule]:
    """Rules whose packet counter moved during the probe, in ruleset order."""
    return [r for w, r in after.items() if r.packets is not None and r.packets > (before.get(w).packets or 0
                                                                                  if before.get(w) else 0)]


def dnat_chain(ns: str, mode: str, hit: list[Rule], before_dst: tuple, after_dst: str) -> str:
    """Name the rules that translated `before_dst` (ip, proto, port) to `after_dst` (ip:port)."""
    if mode == "iptables":
        by_chain: dict[str, list[Rule]] = {}
        for r in hit:
            if r.where.startswith("iptables nat "):
                by_chain.setdefault(r.chain, []).append(r)
        path: list[Rule] = []

        def walk(chain: str) -> bool:
            for r in by_chain.get(chain, []):
                if r.verdict == "DNAT" and r.dnat == after_dst:
                    path.append(r)
                    return True
                if (r.verdict or "").startswith(("jump:", "goto:")):
                    path.append(r)
                    if walk(r.verdict.split(":", 1)[1]):
                        return True
                    path.pop()
            return False

        for start in ("PREROUTING", "OUTPUT"):
            if walk(start):
                chains = [r.chain for r in path if r.chain not in ("PREROUTING", "OUTPUT")]
                comment = next((r.comment for r in reversed(path) if r.comment), "")
                return f"{' -> '.join(chains)} ({comment})" if comment else " -> ".join(chains)
        rules = observe.iptables_rules(ns, "nat")  # counters did not move (a reused conntrack entry)
        for key, targets in observe.iptables_services(rules).items():
            if key == before_dst and after_dst in targets:
                return "KUBE-SERVICES -> KUBE-SVC-... -> KUBE-SEP-... (rule structure; counters did not move)"
        return "a DNAT rule (not found in the kube-proxy chains)"
    if mode == "nftables":
        rules, maps = observe.nft_rules(ns, "kube-proxy")
        ip, proto, port = before_dst
        verdict = maps.get("ip kube-proxy service-ips", {}).get(f"{ip} . {proto} . {port}") or \
            maps.get("ip kube-proxy service-nodeports", {}).get(f"{proto} . {port}")
        mapname = "service-ips" if maps.get("ip kube-proxy service-ips", {}).get(f"{ip} . {proto} . {port}") \
            else "service-nodeports"
        if verdict is None:
            return "a dnat rule (no kube-proxy map element for it)"
        chain = verdict.split(" ", 1)[1]
        by_chain: dict[str, list[Rule]] = {}
        for r in rules:
            by_chain.setdefault(r.chain, []).append(r)
        seen = {chain}
        todo = [chain]
        while todo:
            current = todo.pop()
            for r in by_chain.get(current, []):
                target = (r.verdict or "").split(":", 1)[1] if ":" in (r.verdict or "") else None
                if target and target.startswith("endpoint-"):
                    if any(x.dnat == after_dst for x in by_chain.get(target, [])):
                        return f"map {mapname} element {{{ip} . {proto} . {port} : {verdict}}} -> {target}"
                elif target and target not in seen and target.startswith(("service-", "external-", "local-")):
                    seen.add(target)
                    todo.append(target)
        return f"map {mapname} -> {chain}"
    if mode == "ipvs":
        # IPVS translates in its own hook (LOCAL_IN: kube-ipvs0 makes the ClusterIP local), not by a rule.
        ip, proto, port = before_dst
        for vs in observe.ipvs_servers(ns):
            if vs.key == (ip, proto, port):
                fwd = next((f for real, f in vs.reals if real == after_dst), None)
                what = f"real server {after_dst} ({fwd})" if fwd else f"{after_dst}, not one of its real servers"
                return f"IPVS virtual server {proto.upper()} {ip}:{port} ({vs.scheduler}) -> {what}"
        return "IPVS (no virtual server for it: an older connection entry?)"
    return "DNAT"


def _snat_rule(hit: list[Rule], ns: str) -> str:
    rules = [r for r in hit if r.verdict in ("MASQUERADE", "SNAT", "masquerade", "snat")]
    if rules:
        r = rules[0]
        return f"{r.chain}" + (f" ({r.comment})" if r.comment else "") + f" [{r.where}]"
    nft, _ = observe.nft_rules(ns)
    masq = sorted({r.where.rsplit(" handle", 1)[0] for r in nft if r.verdict == "masquerade"})
    return f"masquerade ({', '.join(masq)})" if masq else "masquerade"


class Tracer:
    def __init__(self, lookup: Lookup, kernel: Kernel, source: Place, target: Target, probe: Probe,
                 hits: dict[str, list[Rule]]) -> None:
        self.lookup, self.kernel, self.source, self.target, self.probe = lookup, kernel, source, target, probe
        self.hits = hits

    def _capture_hop(self, s: Sighting, show_packet: bool) -> Hop:
        desc = self.lookup.describe_dev(s.place, s.dev)
        direction = "out" if s.outgoing else "in"
        text = f"{s.dev} {direction}" + (f" ({desc})" if desc else "")
        packet = s.eff.summary() if show_packet else ""
        detail: dict[str, Any] = {}
        if s.packet.encap == "vxlan":
            detail = {"outer_src": s.packet.src, "outer_dst": s.packet.dst, "outer_sport": s.packet.sport,
                      "outer_dport": s.packet.dport, "vni": s.packet.vni}
            packet = f"VXLAN {s.packet.src}:{s.packet.sport} > {s.packet.dst}:{s.packet.dport} VNI {s.packet.vni}" \
                     f" carrying {s.eff.summary()}"
        elif s.packet.encap == "ipip":
            detail = {"outer_src": s.packet.src, "outer_dst": s.packet.dst, "proto": IPPROTO_IPIP}
            packet = f"IPIP {s.packet.src} > {s.packet.dst} (proto 4) carrying {s.eff.summary()}"
        return Hop(s.place.name, direction, text, s.dev, packet, detail)

    def _route_hop(self, place: Place, dst: str, src: str | None, iif: str | None) -> Hop:
        got = self.kernel.route(place.netns, dst, src, iif)
        if isinstance(got, str):
            return Hop(place.name, "route", f"route to {dst}: {got}", detail={"error": got})
        return Hop(place.name, "route", f"route {got.text()}", got.dev or "",
                   detail={"dst": str(got.dst), "via": str(got.via) if got.via else None, "dev": got.dev,
                           "proto": got.proto, "type": got.type})

    def _nat_hops(self, place: Place, before: Packet, after: Packet, reply: bool) -> tuple[list[Hop], list[Hop]]:
        """(before routing, after routing): a destination rewrite happens in PREROUTING/OUTPUT, a source
        rewrite in POSTROUTING; on the reply path conntrack undoes them at the same two points."""
        pre: list[Hop] = []
        post: list[Hop] = []
        hit = self.hits.get(place.netns, [])
        if (before.dst, before.dport) != (after.dst, after.dport):
            old, new = _endpoint(before.dst, before.dport), _endpoint(after.dst, after.dport)
            if reply:
                pre.append(Hop(place.name, "un-nat", f"un-SNAT (conntrack reverses the masquerade): destination "
                                                     f"{old} -> {new}", detail={"from": old, "to": new}))
            else:
                rule = dnat_chain(place.netns, self.lookup.lab.kube_proxy.mode, hit,
                                  (before.dst, before.proto, before.dport), new)
                pre.append(Hop(place.name, "dnat", f"DNAT {old} -> {new} by {rule}",
                               detail={"from": old, "to": new, "rule": rule}))
        if (before.src, before.sport) != (after.src, after.sport):
            old, new = _endpoint(before.src, before.sport), _endpoint(after.src, after.sport)
            if reply:
                post.append(Hop(place.name, "un-nat", f"un-DNAT (conntrack reverses the DNAT): source {old} -> {new}",
                                detail={"from": old, "to": new}))
            else:
                rule = _snat_rule(hit, place.netns)
                post.append(Hop(place.name, "snat", f"SNAT {old} -> {new} by {rule}",
                                detail={"from": old, "to": new, "rule": rule}))
        return pre, post

    def _encap_hop(self, place: Place, inner_out: Sighting, outer_out: Sighting) -> Hop:
        p = outer_out.packet
        if p.encap == "ipip":
            return Hop(place.name, "encap", f"{inner_out.dev} encapsulates: outer {p.src} > {p.dst} IP proto 4 "
                                            "(IP-in-IP; the outer destination is the route's next hop)",
                       inner_out.dev, detail={"outer_src": p.src, "outer_dst": p.dst, "proto": IPPROTO_IPIP})
        fdb = ""
        view = self.kernel.view(place.netns)
        if view is not None and p.inner_mac:
            entry = next((e for e in view.fdb if e.dev == inner_out.dev and e.mac == p.inner_mac), None)
            if entry is not None:
                fdb = f"; FDB {entry.mac} -> {entry.dst}"
        return Hop(place.name, "encap", f"{inner_out.dev} encapsulates: outer {p.src} > {p.dst} UDP {p.dport}, "
                                        f"VNI {p.vni}{fdb}", inner_out.dev,
                   detail={"outer_src": p.src, "outer_dst": p.dst, "port": p.dport, "vni": p.vni})

    def hops(self, sightings: list[Sighting], reply: bool) -> list[Hop]:
        out: list[Hop] = []
        last_packet = ""
        for i, s in enumerate(sightings):
            prev = sightings[i - 1] if i else None
            same_place = prev is not None and prev.place == s.place
            if not reply and i == 0 and s.place == self.source:
                if s.outgoing:
                    route = self._route_hop(s.place, s.eff.dst, None, None)
                    pre, post = [], []
                    src = str(self.source.ip) if self.source.kind == "pod" else \
                        self.kernel.source_address(self.source.netns, str(self.probe.dst))
                    sent = Packet(src or s.eff.src, str(self.probe.dst), s.eff.proto, s.eff.length,
                                  self.probe.sport or s.eff.sport, self.probe.port if self.probe.protocol != "icmp" else None)
                    if self.probe.protocol != "icmp":
                        pre, post = self._nat_hops(s.place, sent, s.eff, reply)
                    out += pre + [route] + post
            if same_place and prev is not None:
                out += self._between(prev, s, reply)
            summary = s.packet.summary() + (s.eff.summary() if s.packet.encap else "")
            hop = self._capture_hop(s, summary != last_packet)
            last_packet = summary
            out.append(hop)
        return out

    def _between(self, a: Sighting, b: Sighting, reply: bool) -> list[Hop]:
        """What the kernel did inside one namespace between two sightings there."""
        place = a.place
        if a.packet.encap == "vxlan" and not a.outgoing and not b.outgoing:
            return [Hop(place.name, "decap", f"UDP {a.packet.dport} is the VXLAN socket: {b.dev} "
                                             f"(VNI {a.packet.vni}) takes the inner packet out",
                        b.dev, detail={"vni": a.packet.vni, "outer_src": a.packet.src, "outer_dst": a.packet.dst})]
        if a.packet.encap == "ipip" and not a.outgoing and not b.outgoing:
            return [Hop(place.name, "decap", f"IP proto 4 to this node: {b.dev} (IP-in-IP) takes the inner "
                                             "packet out", b.dev,
                        detail={"proto": IPPROTO_IPIP, "outer_src": a.packet.src, "outer_dst": a.packet.dst})]
        if a.outgoing and b.outgoing and b.packet.encap and not a.packet.encap:
            route = self._route_hop(place, b.packet.dst, None, None)
            route.text = "outer " + route.text
            return [self._encap_hop(place, a, b), route]
        view = self.kernel.view(place.netns)
        links = view.links if view else {}
        a_port, b_port = links.get(a.dev), links.get(b.dev)
        bridged = place.kind == "switch" or bool(a_port and b_port and a_port.master and a_port.master == b_port.master)
        out: list[Hop] = []
        if bridged and not a.outgoing and b.outgoing:
            bridge = a_port.master if a_port and a_port.master else "the bridge"
            out.append(Hop(place.name, "bridge", f"{bridge} forwards the frame {a.dev} -> {b.dev} (layer 2, "
                                                 "no routing)", detail={"bridge": bridge}))
        pre, post = self._nat_hops(place, a.eff, b.eff, reply)
        out += pre
        if not bridged and not a.outgoing and b.outgoing and place.kind in ("node", "router", "external", "pod"):
            # In transit through a tunnel (a router between racks), the kernel routes the outer packet.
            x, y = (a.packet, b.packet) if a.packet.encap and b.packet.encap else (a.eff, b.eff)
            out.append(self._route_hop(place, y.dst, x.src, a.dev))
        return out + post


def _endpoint(ip: str, port: int | None) -> str:
    return f"{ip}:{port}" if port is not None else ip


def _holds(kernel: Kernel, place: Place, ip: str) -> bool:
    view = kernel.view(place.netns)
    return view is not None and any(str(a.ip) == ip for addrs in view.addrs.values() for a in addrs)


def _workload_chain(rule: Rule) -> bool:
    """A NetworkPolicy chain of one pod (cni/network_policy.py: cali-tw-VETH for what goes to the pod,
    cali-fw-VETH for what it sends, in table ip calico): its counter moves for any traffic of that pod."""
    return rule.where.startswith(POLICY_WHERE) and rule.chain.startswith(POLICY_CHAINS)


def own_chains(lookup: Lookup, pods: list[Place | None]) -> set[str]:
    """The NetworkPolicy chains of the probe's own pods (its source, its destinations)."""
    veths = {lookup.veth_of[p.netns] for p in pods if p is not None and p.netns in lookup.veth_of}
    return {prefix + veth for veth in veths for prefix in POLICY_CHAINS}


def attribute_drops(hits: dict[str, list[Rule]], spaces: set[str],
                    own: set[str]) -> tuple[list[tuple[str, Rule]], list[tuple[str, Rule]]]:
    """(drops that are the probe's, drops that only may be). A counter moves for every packet a rule
    catches, the probe's or not, so a drop counts only where the packet was last seen (`spaces`), and a
    NetworkPolicy drop only in the chain of one of the probe's own pods. Any other drop counter that moved
    during the trace (other traffic, another pod's policy) is a maybe."""
    sure: list[tuple[str, Rule]] = []
    maybe: list[tuple[str, Rule]] = []
    for ns, rules in hits.items():
        for r in rules:
            if r.drops:
                ours = ns in spaces and (r.chain in own if _workload_chain(r) else True)
                (sure if ours else maybe).append((ns, r))
    return sure, maybe


def _drop_text(lookup: Lookup, drops: list[tuple[str, Rule]]) -> str:
    out = []
    for ns, r in drops:
        place = lookup.places.get(ns)
        out.append(f"{r.where} in {place.name if place else ns}: {r.comment or r.text}")
    return "; ".join(out)


def _beyond(lookup: Lookup, last: Sighting | None, watched: set[str]) -> str | None:
    """The place at the other end of the cable the packet was last seen leaving by, when it was not watched
    (a pod or node beyond the capture's bounds): the packet went on where nobody looked."""
    if last is None or not last.outgoing:
        return None
    peer = lookup.peers.get((last.place.netns, last.dev))
    if peer is None or peer[0] in watched:
        return None
    place = lookup.places.get(peer[0])
    return place.name if place else peer[0]


def verdict(result: TraceResult, tracer: Tracer, forward: list[Sighting], reply: list[Sighting],
            kernel: Kernel, hits: dict[str, list[Rule]], watched: set[str] | None = None) -> None:
    """Delivered (where, and what came back), or dropped: where it was last seen, and by what. A capture
    that lost frames, or a packet that left for a place nobody watched, is said so, never a drop."""
    target, probe, source, lookup = tracer.target, tracer.probe, tracer.source, tracer.lookup
    lost = "; ".join(result.capture_lost)
    # Delivered: it entered a namespace holding its destination address (as translated by then). A node
    # that DNATs a NodePort holds the address too, so the last such arrival counts, and a pod's first.
    arrived = [s for s in forward if not s.outgoing and s.place.kind != "switch" and _holds(kernel, s.place, s.eff.dst)]
    pods = [s for s in arrived if s.place.kind == "pod"]
    arrived = pods[:1] or arrived[-1:]
    errors = [s for s in reply if s.eff.proto == "icmp" and s.eff.icmp_type not in (ICMP_ECHO, ICMP_ECHO_REPLY)]
    answer_back = [s for s in reply if s.place == source and not s.outgoing]
    result.answered = bool(answer_back) and not errors
    last = forward[-1] if forward else None
    own = own_chains(lookup, [source, *target.places, lookup.by_ip.get(last.eff.dst) if last else None])
    if arrived:
        s = arrived[0]
        result.delivered = True
        result.reached = s.place.name
        at = f"{s.eff.dst}:{s.eff.dport}" if s.eff.dport else s.eff.dst
        tail = ""
        if probe.protocol == "tcp":
            flags = next((r.eff.flags for r in reply if r.eff.proto == "tcp"), 0)
            tail = ", answered SYN-ACK" if flags & TCP_SYN else \
                f", but nothing listens on port {s.eff.dport} (RST)" if flags & TCP_RST else ", no answer came back"
        elif errors:
            tail = f", answered {icmp_error(errors[0].eff)} by {errors[0].eff.src}"
        elif reply:
            tail = ", answered"
        else:
            tail = ", no answer came back"
        rtt = f"; round trip {(probe.answered_at - probe.sent_at) * 1000:.2f} ms" \
            if probe.answered_at and result.answered else ""
        if not result.answered:
            # The answer was last seen where its journey ends, or never left the destination's node.
            spaces = {reply[-1].place.netns} if reply else \
                {s.place.netns} | ({lookup.lab.node_netns(s.place.node)} if s.place.node else set())
            sure, maybe = attribute_drops(hits, spaces, own)
            if sure:
                tail += f"; the answer was dropped by {_drop_text(lookup, sure)}"
            elif maybe:
                tail += f"; possibly the answer was dropped by {_drop_text(lookup, maybe)}"
        result.verdict = f"delivered to {s.place.name} ({at}){tail}{rtt}"
        if lost:
            result.verdict += f" (the capture lost frames, so hops may be missing: {lost})"
        return
    beyond = _beyond(lookup, last, watched or set())
    if probe.answer in ("connected", "reply"):
        # The source got its answer: delivered, whatever the capture missed.
        result.delivered = result.answered = True
        result.reached = beyond or ""
        why = f"it left {last.place.name} by {last.dev} towards {beyond}, which was not watched" if beyond else \
            f"the capture lost frames: {lost}" if lost else "the capture did not see it arrive"
        result.verdict = f"delivered: the source got an answer ({probe.answer}), but {why}"
        return
    # Not delivered: where it was last seen, and by what.
    where = f"{last.place.name} after {last.dev} {'out' if last.outgoing else 'in'}" if last else \
        f"{source.name}: it never left"
    reasons: list[str] = []
    if errors:
        e = errors[0].eff
        sender = lookup.by_ip.get(e.src)
        who = f"{sender.name} ({e.src})" if sender else e.src
        what = icmp_error(e)
        if e.icmp_code == 4:
            link = ""
            if sender is not None and last is not None and last.place == sender:
                got = kernel.route(sender.netns, last.eff.dst, last.eff.src, None if last.outgoing else last.dev)
                view = kernel.view(sender.netns)
                if not isinstance(got, str) and view is not None and got.dev in view.links:
                    link = f" {got.dev} (MTU {view.links[got.dev].mtu}, route {got.text()})"
            reasons.append(f"MTU: {who} answered '{what}': the packet ({last.eff.length if last else '?'} "
                           f"bytes, Don't Fragment) is larger than its next link{link}")
        elif e.icmp_code in (9, 10, 13):
            reasons.append(f"rejected: {who} answered '{what}' (a REJECT rule)")
        elif e.icmp_code in (0, 1):
            reasons.append(f"no route: {who} answered '{what}'")
        else:
            reasons.append(f"{who} answered '{what}'")
    sure, maybe = attribute_drops(hits, {last.place.netns if last else source.netns}, own)
    reasons += [f"dropped by {_drop_text(lookup, [d])}" for d in sure]
    if last is not None and not sure:
        reasons += _path_problems(tracer, last)
    if maybe and not sure:
        reasons.append(f"possibly dropped by {_drop_text(lookup, maybe)} (a drop counter moved during the "
                       "trace, for this packet or for other traffic)")
    if not forward:
        reasons += _refused_at_source(tracer)
    dropped_by = "; ".join(reasons) or "no rule counter moved and the route exists: dropped without a trace"
    if beyond and not errors and not sure:
        result.verdict = (f"NOT ANSWERED: last seen leaving {where} towards {beyond}, which was not watched "
                          f"(a trace watches at most {MAX_NODES} nodes and {MAX_PODS} pods)")
        return
    if lost and not errors and not sure:
        result.dropped_by = dropped_by
        result.verdict = (f"NOT ANSWERED: last seen at {where}, but the capture lost frames ({lost}), so it may "
                          f"have gone further; {dropped_by}")
        return
    result.dropped_at, result.dropped_by = where, dropped_by
    result.verdict = f"DROPPED at {where}: {dropped_by}"


def _path_problems(tracer: Tracer, last: Sighting) -> list[str]:
    """Why a packet last seen at `last` went no further, when no rule of its own dropped it: no route, an
    unanswered next hop, a link too small for it."""
    kernel, lookup = tracer.kernel, tracer.lookup
    reasons: list[str] = []
    # A packet in a tunnel that is not for this place is routed as the outer packet.
    p = last.packet if last.packet.encap and not _holds(kernel, last.place, last.packet.dst) else last.eff
    if last.place.kind in ("node", "router", "external", "pod") and not last.outgoing:
        got = kernel.route(last.place.netns, p.dst, p.src, last.dev)
        if isinstance(got, str):
            reasons.append(f"no route in {last.place.name}: ip route get {p.dst} from {p.src} iif {last.dev}: {got}")
        else:
            reasons += _next_hop_problem(kernel, last.place, got, p, lookup.lab.cluster.service_cidr)
    view = kernel.view(last.place.netns)
    if view is not None:
        size = last.packet.length
        small = [l for l in view.links.values() if l.name != last.dev and l.mtu and l.mtu < size
                 and l.name != "lo" and (last.place.kind == "switch" or l.kind in ("vxlan", "ipip", "veth", "bridge"))]
        if small:
            link = small[0]
            peer = lookup.describe_dev(last.place, link.name)
            silent = " (a switch sends no ICMP: a black hole)" if last.place.kind == "switch" else ""
            reasons.append(f"MTU: the {size}-byte packet does not fit {link.name}"
                           f"{' (' + peer + ')' if peer else ''}, MTU {link.mtu}{silent}")
    return reasons


def _refused_at_source(tracer: Tracer) -> list[str]:
    """Why a probe never left: no route at the source, or its own kernel refused to send it."""
    kernel, source, target, probe = tracer.kernel, tracer.source, tracer.target, tracer.probe
    reasons = []
    got = kernel.route(source.netns, str(target.ip), None, None)
    if isinstance(got, str):
        reasons.append(f"no route in {source.name} to {target.ip}: {got}")
    if probe.refused_locally:
        mtu = ""
        view = kernel.view(source.netns)
        if not isinstance(got, str) and view is not None and got.dev in view.links:
            mtu = f" ({got.dev} has MTU {view.links[got.dev].mtu})"
        what = "MTU: " if probe.refused_locally == os.strerror(errno.EMSGSIZE) else ""
        cached = kernel.route(source.netns, str(target.ip), None, None, fibmatch=False)
        if what and not isinstance(cached, str) and cached.mtu:
            mtu = (f" (the path MTU it learned for {target.ip} is {cached.mtu}: an earlier ICMP 'fragmentation "
                   "needed' is cached for about 10 minutes)")
        reasons.append(f"{what}{source.name}'s own kernel refused to send it: {probe.refused_locally}{mtu}")
    return reasons


def _next_hop_problem(kernel: Kernel, place: Place, route: RouteView, packet: Packet,
                      service_cidr: IPv4Network) -> list[str]:
    """A route exists but the packet never left: an unresolved next hop (nobody answers ARP)."""
    if route.type != "unicast":
        return [f"{route.type} route in {place.name}: {route.text()}"]
    hop = str(route.via) if route.via else packet.dst
    view = kernel.view(place.netns)
    entry = next((n for n in view.neigh if str(n.ip) == hop), None) if view else None
    if entry is not None and entry.state in ("incomplete", "failed"):
        clusterip = route.via is None and hop == packet.dst and IPv4Address(hop) in service_cidr
        return [f"{place.name} routes it by {route.text()}, but nobody answers ARP for {hop} "
                f"(neighbour {entry.state})" + (": a ClusterIP is only a rule, and no rule matches this packet"
                                                 if clusterip else "")]
    return []


def places_to_watch(lookup: Lookup, source: Place, target: Target) -> list[Place]:
    """Every switch and router, the nodes (all of them in a lab of up to MAX_NODES), the source and the
    destinations (a service's endpoints, up to MAX_ENDPOINTS: those on the source's node first), and the
    watched nodes' other pods, up to MAX_PODS pods in all."""
    spots = [p for p in lookup.places.values() if p.kind in ("switch", "router")]
    home = source.node or source.name
    dests = sorted(target.places, key=lambda p: p.kind == "pod" and p.node != home)  # stable: near ones first
    dests = dests[:MAX_ENDPOINTS]
    nodes = [p for p in lookup.places.values() if p.kind == "node"]
    if len(nodes) > MAX_NODES:
        wanted = {home, target.name} | {p.node for p in dests if p.node} | {p.name for p in dests}
        nodes = [n for n in nodes if n.name in wanted]
    spots += nodes
    spots += [source] + dests
    # The pods of the watched nodes too (up to the bound): a NodePort or a wrong route may lead anywhere.
    watched_nodes = {n.name for n in nodes}
    budget = max(0, MAX_PODS - sum(1 for p in spots if p.kind == "pod"))
    spots += [p for p in lookup.pods.values() if p.node in watched_nodes and p not in spots][:budget]
    spots += [p for p in lookup.places.values() if p.kind == "external" and (p == source or p.name == target.name)]
    seen: dict[str, Place] = {}
    for p in spots:
        seen.setdefault(p.netns, p)
    return list(seen.values())


def run(lab_name: str | None, source_text: str, target_text: str, protocol: str | None = None, size: int = 0,
        timeout: float = 1.0) -> TraceResult:
    """Trace one probe from `source_text` to `target_text` in a running lab."""
    from lab.objects import current_lab, running_pods
    from services import endpoints

    started = time.monotonic()
    if not 0 < timeout <= MAX_TIMEOUT:
        raise StateError(f"--timeout must be between 0 and {MAX_TIMEOUT:.0f} seconds")
    if not 0 <= size <= 65000:
        raise StateError("--size must be between 0 and 65000 bytes")
    st = state.resolve(lab_name)
    lab = current_lab(st)
    running = running_pods(st, lab)
    sps = endpoints.resolve(lab.services, running)
    lookup = Lookup(st, lab, running, sps)
    source = lookup.source(source_text)
    target = lookup.target(target_text, protocol)
    if target.kind == "service" and not target.places:
        raise StateError(f"service {target.name} has no endpoints: nothing to reach (kube-proxy rejects it)")
    watch = places_to_watch(lookup, source, target)
    counted = [p.netns for p in watch if p.kind in ("node", "router", "external")]  # where rules live
    before = _counters(counted)
    captures = Captures(watch, target.protocol)
    try:
        probe = send_probe(source, target, size, timeout)
        if probe.answered_at is not None:
            time.sleep(GRACE)  # an unanswered probe already waited the whole timeout
        sightings = captures.read()
    finally:
        captures.close()
    after = _counters(counted)
    hits = {ns: moved for ns in counted if (moved := _diff(before[ns], after[ns]))}
    kernel = Kernel()
    forward, reply = classify(sightings, probe, source)
    forward = walk(forward, source.netns, lookup.peers)
    start = origin(reply, list(target.places) + [p for p in (lookup.places.get(s.place.netns) for s in forward) if p],
                   lookup.peers)
    reply = walk(reply, start, lookup.peers) if start else []
    tracer = Tracer(lookup, kernel, source, target, probe, hits)
    port = f":{target.port}" if target.port else ""
    dest = f"{target.name} ({target.ip}{port}/{target.protocol})" if target.name != str(target.ip) else \
        f"{target.ip}{port}/{target.protocol}"
    result = TraceResult(st.name, source.name, dest, target.protocol, target.port)
    result.hops = tracer.hops(forward, reply=False)
    result.reply = tracer.hops(reply, reply=True)
    result.watched = sorted(p.name for p in watch)
    result.capture_lost = [f"{name}: {what}" for name, what in captures.lost.items()]
    verdict(result, tracer, forward, reply, kernel, hits, {p.netns for p in watch})
    if not forward:
        result.hops.insert(0, tracer._route_hop(source, str(target.ip), None, None))
    result.seconds = round(time.monotonic() - started, 3)
    return result


# ------------------------------------------------------------------------------------------ text

def render(result: TraceResult) -> str:
    lines = [f"lab trace {result.lab}: {result.source} -> {result.destination}"]
    lines += _hop_lines(result.hops)
    if result.reply:
        lines.append("reply:")
        lines += _hop_lines(result.reply)
    lines.append(("✓ " if result.delivered else "✗ ") + result.verdict)
    if result.capture_lost:
        lines.append(f"capture lost frames: {'; '.join(result.capture_lost)}")
    lines.append(f"(watched {len(result.watched)} namespaces: {', '.join(result.watched)}; {result.seconds:.2f} s)")
    return "\n".join(lines)


def _hop_lines(hops: list[Hop]) -> list[str]:
    width = max((len(h.place) for h in hops), default=8)
    out = []
    n = 0
    for h in hops:
        if h.kind in ("in", "out"):
            n += 1
            line = f"{n:>3}  {h.place:<{width}}  {h.text}"
            if h.packet:
                line += f"   {h.packet}"
        else:
            line = f"{'':>3}  {h.place:<{width}}    -> {h.text}"
        out.append(line)
    return out

