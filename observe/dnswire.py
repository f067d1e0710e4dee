"""What a pod's resolver put on the wire during one lookup: every DNS query it sent, when, from which
port, to which server, and the answer that came back (rcode, addresses), read from a packet socket on the
pod's eth0 (the pod's side of the veth: exactly what the resolver sent and received, before any DNAT).

From the times, `steps` says which queries were sent in parallel: a query sent before every earlier one
was answered runs in parallel with them (glibc sends A and AAAA together from one socket; musl sends
every search-list candidate's A and AAAA at once, then waits).
"""
from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass, field

from topo import netns
from topo.model import POD_IFNAME

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35
QTYPES = {1: "A", 5: "CNAME", 12: "PTR", 16: "TXT", 28: "AAAA", 33: "SRV", 65: "HTTPS"}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


@dataclass
class Exchange:
    sent: float  # seconds since the first query of the lookup
    qtype: str
    name: str
    server: str
    port: int  # the resolver's source port
    proto: str = "udp"
    answered: float | None = None
    rcode: str | None = None
    answers: list[str] = field(default_factory=list)
    step: int = 0  # queries of one step were in flight together

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _name(data: bytes, offset: int) -> tuple[str, int]:
    labels, jumped, end = [], False, offset
    for _ in range(128):
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if not jumped:
                end = offset + 2
            offset, jumped = ((length & 0x3F) << 8) | data[offset + 1], True
            continue
        if length == 0:
            return ".".join(labels), (end if jumped else offset + 1)
        labels.append(data[offset + 1:offset + 1 + length].decode(errors="replace"))
        offset += 1 + length
    raise ValueError("name too long")


def parse(payload: bytes) -> dict | None:
    """A DNS message: id, whether it is a response, rcode, the question, and the A/AAAA answers."""
    try:
        ident, flags, qd, an = struct.unpack("!HHHH", payload[:8])
        if qd != 1:
            return None
        name, offset = _name(payload, 12)
        qtype = struct.unpack("!H", payload[offset:offset + 2])[0]
        offset += 4
        answers = []
        for _ in range(an):
            _, offset = _name(payload, offset)
            rtype, _cls, _ttl, size = struct.unpack("!HHIH", payload[offset:offset + 10])
            rdata = payload[offset + 10:offset + 10 + size]
            if rtype == 1 and size == 4:
                answers.append(socket.inet_ntop(socket.AF_INET, rdata))
            elif rtype == 28 and size == 16:
                answers.append(socket.inet_ntop(socket.AF_INET6, rdata))
            offset += 10 + size
    except (struct.error, IndexError, ValueError):
        return None
    return {"id": ident, "response": bool(flags & 0x8000), "rcode": RCODES.get(flags & 0xF, str(flags & 0xF)),
            "name": name, "qtype": QTYPES.get(qtype, f"type={qtype}"), "answers": answers}


class Capture:
    """A packet socket on a pod's eth0, opened before the lookup and read after it."""

    def __init__(self, pod_netns: str) -> None:
        with netns.entered(pod_netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self.sock.bind((POD_IFNAME, 0))
        self.sock.setblocking(False)

    def read(self) -> list[Exchange]:
        frames = []
        while True:
            try:
                data, anc, _flags, addr = self.sock.recvmsg(65535, 64)
            except BlockingIOError:
                break
            stamp = next((struct.unpack("qq", d[:16]) for lvl, typ, d in anc
                          if lvl == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS), (0, 0))
            frames.append((stamp[0] + stamp[1] / 1e9, addr[2] == PACKET_OUTGOING, data))
        self.sock.close()
        return exchanges(frames)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _udp_dns(frame: bytes) -> tuple[str, str, int, int, str, bytes] | None:
    """(src, dst, sport, dport, proto, DNS payload) of an IPv4 UDP or TCP frame to or from port 53."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    proto = ip[9]
    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    l4 = ip[ihl:]
    sport, dport = struct.unpack("!HH", l4[:4])
    if 53 not in (sport, dport):
        return None
    if proto == 17:
        return src, dst, sport, dport, "udp", l4[8:]
    if proto == 6:
        off = (l4[12] >> 4) * 4
        body = l4[off:]
        return (src, dst, sport, dport, "tcp", body[2:]) if len(body) > 2 else None  # one message per segment
    return None


def exchanges(frames: list[tuple[float, bool, bytes]]) -> list[Exchange]:
    """Queries in the order sent, each with its answer (matched by server, port, id and question);
    a retransmission of the same question from the same port counts once (its first sending)."""
    out: list[Exchange] = []
    pending: dict[tuple, Exchange] = {}
    start = None
    for when, outgoing, frame in sorted(frames, key=lambda f: f[0]):
        parsed_frame = _udp_dns(frame)
        if parsed_frame is None:
            continue
        src, dst, sport, dport, proto, payload = parsed_frame
        msg = parse(payload)
        if msg is None:
            continue
        if outgoing and not msg["response"] and dport == 53:
            start = when if start is None else start
            key = (dst, sport, msg["id"], msg["qtype"], msg["name"].lower())
            if key in pending:
                continue
            ex = Exchange(when - start, msg["qtype"], msg["name"], dst, sport, proto)
            pending[key] = ex
            out.append(ex)
        elif not outgoing and msg["response"] and sport == 53 and start is not None:
            ex = pending.get((src, dport, msg["id"], msg["qtype"], msg["name"].lower()))
            if ex is not None and ex.answered is None:
                ex.answered, ex.rcode, ex.answers = when - start, msg["rcode"], msg["answers"]
    steps(out)
    return out


def steps(queries: list[Exchange]) -> None:
    """Number the steps: a query joins the current step when some query of that step is still
    unanswered when it is sent; otherwise it opens the next step."""
    step, open_until = 0, -1.0
    for q in queries:
        if q.sent > open_until:
            step += 1
            open_until = -1.0
        q.step = step
        open_until = max(open_until, q.answered if q.answered is not None else float("inf"))
