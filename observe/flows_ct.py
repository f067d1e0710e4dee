"""Flow sources of the flannel and calico profiles: the kernel's own hooks, read without changing what the
dataplane does.

- **Conntrack events** (ctnetlink, group NFNLGRP_CONNTRACK_NEW, one netlink socket per node namespace): the
  kernel announces a connection when its first packet has passed every netfilter hook (the entry is
  confirmed), so a NEW event is a FORWARDED flow; its reply tuple says where NAT sent it: a destination
  that changed is kube-proxy's Service DNAT (TRANSLATED, the Service named from its ClusterIP and the
  backend picked), a source that changed is a SNAT (masquerade to the node's address). A connection that
  the policy dropped is never confirmed, so it never shows up here as forwarded.
- **NFLOG** (nfnetlink_log, the calico profile's drop rules): cni/network_policy.py gives its counted drop
  rules `log group 1` (to a workload) / `log group 2` (from a workload), as Calico's felix uses NFLOG groups 1
  and 2, with the rule's comment as the prefix: "NS/POD ingress: no policy allows it (NS/POL, ...)".
  A DROPPED flow thus carries the policies that isolated the pod, read from the rule that dropped it. With
  no listener bound the kernel logs nothing and the drop costs what it did; only one listener per group
  and namespace can bind (a second observer is told so and shows no drops).

Bounded: each socket's receive buffer is the per-node ring (4 MiB); when it overflows the kernel drops the
events, never the packets (no NETLINK_BROADCAST_ERROR: conntrack never waits for a listener), and the
socket says ENOBUFS: counted and reported as lost. Closing the sockets (Ctrl-C) unbinds everything.
"""
from __future__ import annotations

import contextlib
import errno
import re
import socket
import struct

from observe.flow import DROPPED, FORWARDED, TRANSLATED, TYPE_DROP, TYPE_TRACE, Flow
from observe.flows import Names, now, tcp_flag_names
from topo import netns
from topo.rtnl import parse_attrs

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK, NFNL_SUBSYS_ULOG = 1, 4
IPCTNL_MSG_CT_NEW = 0
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFNLGRP_CONNTRACK_NEW = 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 2, 3, 4
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_PF_BIND = 1, 3
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO = 1, 2, 3, 4
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE, TCP_CONNTRACK_SYN_SENT = 1, 1, 1
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
IPS_SRC_NAT, IPS_DST_NAT = 1 << 4, 1 << 5
NFLOG_INGRESS, NFLOG_EGRESS = 1, 2  # Calico's NFLOG groups: to a workload (ingress), from one (egress)
PROTO_NAMES = {6: "TCP", 17: "UDP", 1: "ICMPv4"}
RCVBUF = 4 << 20
COPY_RANGE = 96  # bytes of a dropped packet copied to us: IPv4 and TCP/UDP headers
# The drop rules' comments (cni/network_policy.py): "NS/POD DIRECTION: what (policies)".
_PREFIX_RE = re.compile(r"(?P<pod>\S+) (?P<dir>ingress|egress): (?P<what>[^(]*)(?:\((?P<pols>.*))?")
_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")


def messages(data: bytes):
    """(type, flags, payload after nlmsghdr) of each netlink message in one datagram."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            break
        yield kind, flags, data[offset + _NLMSG.size:offset + length]
        offset += (length + 3) & ~3


def _tuple(raw: bytes) -> tuple[str, str, int, int, int]:
    top = parse_attrs(raw)
    ip, proto = parse_attrs(top.get(CTA_TUPLE_IP, b"")), parse_attrs(top.get(CTA_TUPLE_PROTO, b""))
    src = socket.inet_ntoa(ip[CTA_IP_V4_SRC]) if len(ip.get(CTA_IP_V4_SRC, b"")) == 4 else ""
    dst = socket.inet_ntoa(ip[CTA_IP_V4_DST]) if len(ip.get(CTA_IP_V4_DST, b"")) == 4 else ""
    num = proto.get(CTA_PROTO_NUM, b"\0")[0]
    sport = struct.unpack("!H", proto[CTA_PROTO_SRC_PORT])[0] if CTA_PROTO_SRC_PORT in proto else 0
    dport = struct.unpack("!H", proto[CTA_PROTO_DST_PORT])[0] if CTA_PROTO_DST_PORT in proto else 0
    return src, dst, num, sport, dport


def ct_flow(payload: bytes, node: str, names: Names) -> Flow | None:
    """A NEW conntrack event -> a flow (None: not IPv4 TCP/UDP/ICMP, or between nodes only)."""
    if len(payload) < _NFGEN.size or payload[0] != socket.AF_INET:
        return None
    top = parse_attrs(payload, _NFGEN.size)
    if CTA_TUPLE_ORIG not in top or CTA_TUPLE_REPLY not in top:
        return None
    src, dst, proto, sport, dport = _tuple(top[CTA_TUPLE_ORIG])
    rsrc, rdst, _p, rsport, rdport = _tuple(top[CTA_TUPLE_REPLY])
    status = struct.unpack("!I", top[CTA_STATUS])[0] if CTA_STATUS in top else 0
    if proto not in PROTO_NAMES or not src or not (names.is_lab(src) or names.is_lab(dst) or names.is_lab(rsrc)):
        return None  # node-to-node traffic (BGP, tunnels' outer packets) and non-IP: not a lab flow
    name = PROTO_NAMES[proto]
    verdict, service, orig, extra = FORWARDED, None, "", {}
    backend, backend_port = dst, dport
    if status & IPS_DST_NAT or (rsrc, rsport) != (dst, dport):
        backend, backend_port = rsrc, rsport
        service = names.service(dst, dport, name)
        orig, verdict = f"{dst}:{dport}", TRANSLATED
    if status & IPS_SRC_NAT or (rdst, rdport) != (src, sport):
        extra["snat"] = f"{rdst}:{rdport}"  # masquerade: the source the destination sees
        verdict = TRANSLATED
    flags: tuple[str, ...] = ()
    if proto == 6:  # the state conntrack gave it: SYN_SENT for a connection's SYN (a mid-stream pickup is not)
        info = parse_attrs(parse_attrs(top.get(CTA_PROTOINFO, b"")).get(CTA_PROTOINFO_TCP, b""))
        state = info.get(CTA_PROTOINFO_TCP_STATE, b"")
        flags = ("SYN",) if state[:1] == bytes([TCP_CONNTRACK_SYN_SENT]) else ()
    summary = f"conntrack new{' dnat to ' + backend + ':' + str(backend_port) if orig else ''}" \
              f"{' snat to ' + extra['snat'] if 'snat' in extra else ''}"
    return Flow(now(), verdict, TYPE_TRACE, node, names.endpoint(src), names.endpoint(backend), name,
                sport, backend_port, flags, service, orig,
                trace_observation_point="to-stack" if backend not in names.pods else "to-endpoint",
                summary=summary, extra=extra)


def nflog_flow(payload: bytes, node: str, names: Names) -> Flow | None:
    """An NFLOG packet from a calico drop rule -> a DROPPED flow naming the policies (None: unreadable)."""
    if len(payload) < _NFGEN.size:
        return None
    top = parse_attrs(payload, _NFGEN.size)
    packet = top.get(NFULA_PAYLOAD, b"")
    prefix = top.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode(errors="replace")
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    proto = packet[9]
    src, dst = socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20])
    sport = dport = flags = 0
    l4 = packet[ihl:]
    if proto in (6, 17) and len(l4) >= 4:
        sport, dport = struct.unpack("!HH", l4[:4])
        if proto == 6 and len(l4) >= 14:
            flags = l4[13]
    direction, reason, policies = rule_of(prefix)
    return Flow(now(), DROPPED, TYPE_DROP, node, names.endpoint(src), names.endpoint(dst),
                PROTO_NAMES.get(proto, str(proto)), sport, dport, tcp_flag_names(flags),
                drop_reason_desc=reason, policies=policies, traffic_direction=direction,
                summary=prefix)


def rule_of(prefix: str) -> tuple[str, str, tuple[str, ...]]:
    """(INGRESS/EGRESS, Hubble's drop reason, policies) from a drop rule's log prefix."""
    m = _PREFIX_RE.fullmatch(prefix)
    if not m:
        return "", "Policy denied", ()
    direction = m.group("dir").upper()
    if "invalid" in m.group("what"):
        return direction, "Invalid packet", ()
    listed = (m.group("pols") or "").rstrip(")")
    if listed.endswith("..."):  # a prefix cut at nftables' 127 bytes: the last name may be cut too
        listed = listed[:-3].rsplit(",", 1)[0]
    pols = tuple(p.strip() for p in listed.split(",") if p.strip() and "/" in p)
    return direction, "Policy denied", pols


class NetlinkSource:
    """One netlink socket in one node's namespace; `read` turns what is queued into flows."""

    def __init__(self, node: str, ns: str, kind: str, names: Names) -> None:
        self.node, self.kind, self.names = node, kind, names
        self.lost = 0
        self.note = ""
        with netns.entered(ns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE: we are root
        try:
            if kind == "conntrack":
                self.sock.bind((0, 1 << (NFNLGRP_CONNTRACK_NEW - 1)))
            else:
                self.sock.bind((0, 0))
                for group in (NFLOG_INGRESS, NFLOG_EGRESS):
                    self._config(group)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def _config(self, group: int) -> None:
        """NFULNL_CFG_CMD_BIND to the group, copy mode PACKET with COPY_RANGE bytes, every packet sent at
        once (queue threshold 1, flush timeout 10 ms: the kernel's default batches for a second); ack checked."""
        cmd = struct.pack("=HHB3x", 5, NFULA_CFG_CMD, NFULNL_CFG_CMD_BIND)
        mode = struct.pack("=HHIBx2x", 10, NFULA_CFG_MODE, socket.htonl(COPY_RANGE), NFULNL_COPY_PACKET)
        timing = struct.pack("=HHI", 8, NFULA_CFG_TIMEOUT, socket.htonl(1)) + \
            struct.pack("=HHI", 8, NFULA_CFG_QTHRESH, socket.htonl(1))
        for body in (cmd, mode + timing):
            payload = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(group)) + body
            kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
            self.sock.send(_NLMSG.pack(_NLMSG.size + len(payload), kind, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + payload)
            data = self.sock.recv(4096)
            for mtype, _flags, body_ in messages(data):
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body_)[0]
                    if code:
                        raise OSError(code, f"NFLOG group {group}: {errno.errorcode.get(code, code)}")

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, budget: int = 512) -> list[Flow]:
        out: list[Flow] = []
        for _ in range(budget):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped events: count, carry on
                    self.lost += 1
                    continue
                raise
            for kind, _flags, payload in messages(data):
                subsys = kind >> 8
                if subsys == NFNL_SUBSYS_CTNETLINK and kind & 0xFF == IPCTNL_MSG_CT_NEW:
                    flow = ct_flow(payload, self.node, self.names)
                elif subsys == NFNL_SUBSYS_ULOG and kind & 0xFF == NFULNL_MSG_PACKET:
                    flow = nflog_flow(payload, self.node, self.names)
                else:
                    continue
                if flow is not None:
                    out.append(flow)
        return out

    def describe(self) -> str:
        return f"{self.kind} on {self.node}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def open_sources(nodes: dict[str, str], names: Names, drops: bool) -> tuple[list[NetlinkSource], list[str]]:
    """Conntrack (and, with `drops`, NFLOG) sockets in every node's namespace; what could not be opened
    is returned as notes (e.g. another observer holds the NFLOG groups)."""
    sources, notes = [], []
    for node, ns in nodes.items():
        for kind in ("conntrack", "nflog") if drops else ("conntrack",):
            try:
                sources.append(NetlinkSource(node, ns, kind, names))
            except OSError as exc:
                why = "another observer holds them" if exc.errno == errno.EBUSY else exc.strerror or str(exc)
                notes.append(f"{node}: no {kind} events ({why})")
    return sources, notes
