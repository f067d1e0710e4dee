"""`lab trace`'s packet decoding: the IPv4 packets a capture socket hands over, as far as a trace needs them.

Ethernet (VLAN tags skipped), IPv4, TCP, UDP and ICMP, with the encapsulations a lab uses decoded so the
inner packet can be followed through a tunnel: VXLAN (UDP 8472/4789, with its VNI and inner destination
MAC), IP-in-IP (Calico's tunl0, proto 4) and the packet an ICMP error quotes. Pure functions of bytes:
the unit tests feed them hand-built frames.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

from routing import vxlan

ETH_P_ALL, ETH_P_IP, ETH_P_8021Q = 0x0003, 0x0800, 0x8100
IPPROTO_IPIP = 4
VXLAN_PORTS = (vxlan.PORT, 4789)
UDP_MARK = b"echo kubenet-trace-"  # a UDP probe's payload: agnhost netexec answers "echo X" with X
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
ICMP_ECHO_REPLY, ICMP_UNREACH, ICMP_ECHO, ICMP_TIME_EXCEEDED = 0, 3, 8, 11
UNREACH = {0: "network unreachable", 1: "host unreachable", 2: "protocol unreachable", 3: "port unreachable",
           4: "fragmentation needed", 9: "network administratively prohibited",
           10: "host administratively prohibited", 13: "communication administratively prohibited"}


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
    mac_dst: str | None = None  # the Ethernet destination it was captured with (None: no Ethernet header, tunl0)

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
    packet = parse_ip(frame[offset + 2:], depth)
    # Whom the frame was for tells a bridge's forwarding (another port's MAC) from the node's routing (its own).
    return replace(packet, mac_dst=_mac(frame[:6])) if packet is not None else None


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
