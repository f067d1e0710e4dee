"""`lab trace`'s sockets: the packet sockets (AF_PACKET, what tcpdump uses) opened inside every watched
namespace before the probe leaves, their classic BPF filter, and the probe itself, sent from inside the
source's namespace.

Bounded and honest: each capture keeps only frames a trace can use, is read for a bounded number of frames
and time, and reports the frames it could not queue, so a capture that lost frames never passes for a drop.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import select
import socket
import struct
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from observe.packets import (ETH_P_ALL, ETH_P_IP, ICMP_ECHO, ICMP_ECHO_REPLY, IPPROTO_IPIP, TCP_RST, TCP_SYN,
                             UDP_MARK, VXLAN_PORTS, Packet, echo_request, icmp_error, parse_frame, parse_ip)
from observe.places import Place, Target
from topo import netns

ARPHRD_ETHER, ARPHRD_TUNNEL, ARPHRD_LOOPBACK = 1, 768, 772  # Ethernet, IP-in-IP (tunl0: no link header), lo
PACKET_OUTGOING = 4
SOL_PACKET, PACKET_STATISTICS = 263, 6
SO_ATTACH_FILTER, SO_RCVBUFFORCE = 26, 33
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2
SO_COOKIE = 57  # the socket's cookie: the key the socket-LB programs file their reverse NAT under
CAPTURE_BUFFER = 4 << 20  # per socket, forced past net.core.rmem_max (SO_RCVBUFFORCE: we are root)
MAX_FRAMES = 20000  # read at most this many captured frames in all ...
READ_BUDGET = 0.5  # ... and for at most this long (seconds): sustained traffic cannot make a trace spin

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
    refused_locally: str = ""  # the source's own kernel would not send it (EMSGSIZE, no route, a socket LB's EPERM)
    refused_errno: int = 0
    cookie: int = 0  # SO_COOKIE of the probe's socket
    hook: str = ""  # the socket call a cgroup sock_addr program could run at: connect4 or sendmsg4
    peer: str = ""  # the peer the application saw (getpeername, or recvfrom's address): ADDR:PORT


DNS_PORT = 53
PROBE_LABEL = b"kubenet-trace-"


def dns_query(token: bytes, domain: str) -> bytes:
    """A DNS query (RFC 1035: id, RD, one question, type A) for kubenet-trace-TOKEN.DOMAIN: a UDP probe to
    port 53 that a DNS server really answers (NXDOMAIN, the question echoed), carrying the token."""
    labels = [PROBE_LABEL + token, *(part.encode() for part in domain.strip(".").split(".") if part)]
    qname = b"".join(bytes([len(l)]) + l for l in labels) + b"\0"
    return struct.pack("!HHHHHH", int(token[:4], 16), 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def is_dns_query(payload: bytes, token: bytes) -> bool:
    """The probe's own DNS query (QR clear, its first question label kubenet-trace-TOKEN), not the answer."""
    label = PROBE_LABEL + token
    return len(payload) > 12 and not payload[2] & 0x80 and payload[12:13 + len(label)] == bytes([len(label)]) + label


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


def send_probe(source: Place, target: Target, size: int, timeout: float,
               socket_lb: Callable[[], AbstractContextManager[Any]] | None = None,
               before_close: Callable[[Probe], None] | None = None, dns_domain: str = "cluster.local") -> Probe:
    """One probe from inside the source's namespace; returns when answered or after `timeout`.

    `socket_lb`: a context in which the socket is created, so the cgroup programs of the source's own
    processes apply to it (the cilium profile: the node's cgroup decides which connect4/sendmsg4 runs).
    There UDP goes out by sendto() (sendmsg4; recvmsg4 translates the answer's source back), as a
    resolver's query does; to port 53 it is a real DNS query (dns_query). `before_close` reads state while the connection is still open (a NodePort
    connection's CT entries go with its RST)."""
    token = os.urandom(6).hex().encode()
    proto = target.protocol
    unconnected = socket_lb is not None and proto == "udp"
    with netns.entered(source.netns), (socket_lb or nullcontext)():
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
            probe.hook = "connect4"
            code = sock.connect_ex((dst, target.port or 0))
            if code not in (0, errno.EINPROGRESS):  # refused before any packet (a socket LB's EPERM)
                raise OSError(code, os.strerror(code))
            _, writable, _ = select.select([], [sock], [], timeout)
            if writable:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                probe.answer = "connected" if err == 0 else "refused" if err == errno.ECONNREFUSED else os.strerror(err)
                probe.answered_at = time.monotonic()
                if err == 0:
                    probe.peer = "%s:%d" % sock.getpeername()  # through getpeername4, where a socket LB is
        else:
            probe = Probe(proto, target.ip, target.port, _bind_random(sock), token, 0)
            payload = dns_query(token, dns_domain) if target.port == DNS_PORT else \
                (UDP_MARK + token).ljust(max(size, 0), b".")
            probe.hook = "sendmsg4" if unconnected else "connect4"
            if not unconnected:
                sock.connect((dst, target.port or 0))
            probe.sent_at = time.monotonic()
            try:
                if unconnected:
                    sock.sendto(payload, (dst, target.port or 0))
                else:
                    sock.send(payload)
                readable, _, _ = select.select([sock], [], [], timeout)
                if readable:
                    _, peer = sock.recvfrom(65535)
                    probe.peer = "%s:%d" % peer[:2]  # through recvmsg4, where a socket LB is
                    probe.answer, probe.answered_at = "reply", time.monotonic()
            except OSError as exc:
                probe.answer = "refused" if exc.errno == errno.ECONNREFUSED else os.strerror(exc.errno or 0)
                probe.answered_at = time.monotonic()
        with contextlib.suppress(OSError):
            probe.cookie = struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
        if before_close is not None:
            before_close(probe)
        return probe
    except OSError as exc:
        # The source's own kernel refused to send (a DF packet above the route's MTU, no route, a socket
        # LB without a backend): a verdict as much as a drop on the way is.
        refused = Probe(proto, target.ip, target.port, 0, token, 0, time.monotonic())
        refused.refused_locally = os.strerror(exc.errno) if exc.errno else str(exc)
        refused.refused_errno = exc.errno or 0
        refused.hook = "sendmsg4" if unconnected else "connect4"
        with contextlib.suppress(OSError):
            refused.cookie = struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
        if before_close is not None:
            before_close(refused)
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
