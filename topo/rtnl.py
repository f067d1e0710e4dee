"""A small rtnetlink client for the lab's hot path: links, addresses and routes, packed by hand.

Building a thousand pods means about ten netlink requests each. pyroute2 spends most of its time
encoding and decoding messages in Python (measured here: 12.9 s for 1,000 pods, against a floor of
about 2 s), and its `link_lookup` dumps every link of a namespace to find one. The handful of message
types the lab needs are simple fixed structs plus attributes, so they are packed here directly, every
request is a single round trip, and links are looked up by name in the kernel.

A socket belongs to the namespace it was opened in: open an `Rtnl` while inside a namespace
(`topo.netns.rtnl_in`) and it keeps working there after the thread leaves.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_ECHO = 0x1, 0x2, 0x4, 0x8
NLM_F_DUMP, NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x300, 0x100, 0x200, 0x400
NLM_F_ACK_TLVS = 0x200  # on an error message: extended-ack attributes follow
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
NLMSGERR_ATTR_MSG = 1
NLA_F_NESTED = 0x8000

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER = 1, 3, 4, 5, 10
IFLA_PROTINFO, IFLA_OPERSTATE, IFLA_LINKINFO, IFLA_NET_NS_FD, IFLA_EXT_MASK = 12, 16, 18, 28, 29
IFLA_NUM_TX_QUEUES, IFLA_NUM_RX_QUEUES = 31, 32
RTEXT_FILTER_SKIP_STATS = 1 << 3  # a link lookup without its ~1 kB of counters (which the lab never reads)
LOOPBACK_IFINDEX = 1  # the kernel registers lo first in every network namespace (include/net/flow.h)
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFLA_BRPORT_MODE = 4  # hairpin
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFLA_VXLAN_ID, IFLA_VXLAN_LINK, IFLA_VXLAN_LOCAL, IFLA_VXLAN_LEARNING, IFLA_VXLAN_PORT = 1, 3, 4, 7, 15
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
NTF_PROXY = 0x08
RTNH_F_ONLINK = 0x4
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
IFF_UP = 0x1
AF_BRIDGE = 7
RT_TABLE_MAIN, RTPROT_BOOT, RTPROT_STATIC, RTN_UNICAST = 254, 3, 4, 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
IF_OPER_UNKNOWN, IF_OPER_UP = 0, 6

NLHDR = struct.Struct("=IHHII")
IFINFO = struct.Struct("=BxHiII")
IFADDR = struct.Struct("=BBBBI")
RTMSG = struct.Struct("=BBBBBBBBI")
NDMSG = struct.Struct("=BxxxiHBB")


class NetlinkError(OSError):
    """A request the kernel refused; carries the kernel's own extended-ack text when it gave one."""


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _str(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        attrs[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return attrs


def _mac(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode()


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    flags: int
    mac: str
    mtu: int
    master: int | None
    kind: str | None
    operstate: int | None
    peer_index: int | None = None  # IFLA_LINK: a veth's peer's index (in the peer's namespace)

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @classmethod
    def parse(cls, payload: bytes) -> Link:
        _family, _type, index, flags, _change = IFINFO.unpack_from(payload)
        attrs = parse_attrs(payload, IFINFO.size)
        info = parse_attrs(attrs.get(IFLA_LINKINFO, b""))
        master = attrs.get(IFLA_MASTER)
        oper = attrs.get(IFLA_OPERSTATE)
        lower = attrs.get(IFLA_LINK)
        return cls(index=index, name=_cstr(attrs.get(IFLA_IFNAME, b"")), flags=flags,
                   mac=":".join(f"{b:02x}" for b in attrs.get(IFLA_ADDRESS, b"")),
                   mtu=struct.unpack("=I", attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else 0,
                   master=struct.unpack("=I", master)[0] if master else None,
                   kind=_cstr(info[IFLA_INFO_KIND]) if IFLA_INFO_KIND in info else None,
                   operstate=oper[0] if oper else None,
                   peer_index=struct.unpack("=I", lower)[0] if lower else None)


Message = tuple[int, bytes, int]  # (type, body, flags): one request, for `Rtnl.batch`


def get_link_msg(name: str | None = None, index: int = 0) -> Message:
    """Look a link up by name or index, without its statistics."""
    return (RTM_GETLINK, IFINFO.pack(0, 0, index, 0, 0) + (_str(IFLA_IFNAME, name) if name is not None else b"") +
            _u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS), 0)


def set_link_msg(index: int, up: bool | None = None, master: int | None = None, mtu: int | None = None) -> Message:
    flags = IFF_UP if up else 0
    change = IFF_UP if up is not None else 0
    body = IFINFO.pack(0, 0, index, flags, change) + \
        (_u32(IFLA_MASTER, master) if master is not None else b"") + \
        (_u32(IFLA_MTU, mtu) if mtu is not None else b"")
    return (RTM_NEWLINK, body, 0)


def add_addr_msg(index: int, address: IPv4Interface) -> Message:
    packed = address.ip.packed
    body = IFADDR.pack(socket.AF_INET, address.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index) + \
        _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
    return (RTM_NEWADDR, body, NLM_F_CREATE | NLM_F_EXCL)


def replace_route_msg(dst: IPv4Network, gateway: IPv4Address | None = None, oif: int | None = None,
                      protocol: int = RTPROT_BOOT, onlink: bool = False) -> Message:
    scope = RT_SCOPE_UNIVERSE if gateway is not None else RT_SCOPE_LINK
    flags = RTNH_F_ONLINK if onlink else 0
    body = RTMSG.pack(socket.AF_INET, dst.prefixlen, 0, 0, RT_TABLE_MAIN, protocol, scope, RTN_UNICAST, flags)
    if dst.prefixlen:
        body += _attr(RTA_DST, dst.network_address.packed)
    if gateway is not None:
        body += _attr(RTA_GATEWAY, gateway.packed)
    if oif is not None:
        body += _u32(RTA_OIF, oif)
    return (RTM_NEWROUTE, body, NLM_F_CREATE | NLM_F_REPLACE)


def hairpin_msg(index: int, on: bool = True) -> Message:
    body = IFINFO.pack(AF_BRIDGE, 0, index, 0, 0) + _nest(IFLA_PROTINFO, _attr(IFLA_BRPORT_MODE, bytes([int(on)])))
    return (RTM_SETLINK, body, 0)


def parse_link_reply(replies: list[tuple[int, bytes]]) -> Link | None:
    return next((Link.parse(p) for kind, p in replies if kind == RTM_NEWLINK), None)


@dataclass(frozen=True)
class Route:
    dst: IPv4Network
    gateway: IPv4Address | None
    oif: int | None
    protocol: int
    table: int


class Rtnl:
    """One NETLINK_ROUTE socket, in the namespace that was current when it was opened."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport ---------------------------------------------------------------------------
    def request(self, mtype: int, body: bytes, flags: int = 0, dump: bool = False) -> list[tuple[int, bytes]]:
        """Send one request; return the reply messages. Raises NetlinkError on a kernel error."""
        result = self.batch([(mtype, body, flags | (NLM_F_DUMP if dump else 0))])[0]
        if isinstance(result, NetlinkError):
            raise result
        return result

    def batch(self, requests: list[tuple[int, bytes, int]]) -> list[list[tuple[int, bytes]] | NetlinkError]:
        """Send several requests (type, body, flags) in one datagram, then read every answer: one system call
        each way instead of one round trip per request (the kernel still carries them out one by one, in
        order, and a failed one does not stop the next). Returns, per request, its reply messages or the
        NetlinkError the kernel answered it with. A get request with NLM_F_DUMP in its flags is a dump (at most
        one a batch: the kernel runs one dump at a time per socket)."""
        if not requests:
            return []
        datagram = []
        pending: dict[int, int] = {}
        for i, (mtype, body, flags) in enumerate(requests):
            self.seq += 1
            pending[self.seq] = i
            dump = flags & NLM_F_DUMP == NLM_F_DUMP and mtype & 3 == 2  # RTM_GET*: 0x300 is REPLACE|EXCL elsewhere
            flags |= NLM_F_REQUEST | (0 if dump else NLM_F_ACK)
            datagram.append(NLHDR.pack(NLHDR.size + len(body), mtype, flags, self.seq, 0) + body)
        self.sock.send(b"".join(datagram))
        results: list[list[tuple[int, bytes]] | NetlinkError] = [[] for _ in requests]
        while pending:
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + NLHDR.size <= len(data):
                length, kind, mflags, mseq, _pid = NLHDR.unpack_from(data, offset)
                payload = data[offset + NLHDR.size:offset + length]
                offset += (length + 3) & ~3
                i = pending.get(mseq)
                if i is None:
                    continue
                if kind == NLMSG_DONE:
                    del pending[mseq]
                elif kind == NLMSG_ERROR:
                    del pending[mseq]
                    code = -struct.unpack_from("=i", payload)[0]
                    if code != 0:
                        results[i] = self._error(code, payload, mflags)
                else:
                    results[i].append((kind, payload))  # type: ignore[union-attr]
        return results

    @staticmethod
    def _error(code: int, payload: bytes, flags: int) -> NetlinkError:
        text = os.strerror(code)
        if flags & NLM_F_ACK_TLVS:
            attrs = parse_attrs(payload, 4 + NLHDR.size)
            if NLMSGERR_ATTR_MSG in attrs:
                text = f"{text} ({_cstr(attrs[NLMSGERR_ATTR_MSG])})"
        return NetlinkError(code, text)

    # ---- links -------------------------------------------------------------------------------
    def link(self, name: str) -> Link | None:
        """One link by name, looked up by the kernel (no dump)."""
        try:
            replies = self.request(*get_link_msg(name=name))
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return Link.parse(replies[0][1]) if replies else None

    def links(self) -> list[Link]:
        return [Link.parse(p) for kind, p in self.request(RTM_GETLINK, IFINFO.pack(0, 0, 0, 0, 0), dump=True)
                if kind == RTM_NEWLINK]

    def add_bridge(self, name: str, mtu: int | None, mac: str | None = None) -> None:
        """A bridge, up; with `mac` its address is fixed (otherwise the kernel gives it the lowest MAC of its
        ports, which changes as ports come and go). `mtu` None: the kernel's default, following its ports."""
        body = IFINFO.pack(0, 0, 0, IFF_UP, IFF_UP) + _str(IFLA_IFNAME, name) + \
            (_u32(IFLA_MTU, mtu) if mtu is not None else b"") + \
            (_attr(IFLA_ADDRESS, _mac(mac)) if mac else b"") + \
            _nest(IFLA_LINKINFO, _str(IFLA_INFO_KIND, "bridge"))
        self.request(RTM_NEWLINK, body, NLM_F_CREATE | NLM_F_EXCL)

    def add_veth(self, name: str, peer: str, peer_netns_fd: int | None, mtu: int | None, master: int | None = None,
                 up: bool = False, mac: str | None = None, peer_mac: str | None = None) -> Link:
        """Create a veth pair, this end enslaved to `master`, the peer already in another namespace; return this
        end as the kernel echoes it (its index, its MAC, and in `peer_index` the peer's index), so no lookup
        follows.

        With `up`, this end is up from the start. The peer cannot be (the kernel opens the peer before the
        pair is joined: ENOTCONN), so `set_link(up=True)` on it follows, in its namespace. `mtu` None: the
        kernel's default (1500); `mac`, `peer_mac` None: random addresses, chosen by the kernel.
        """
        # One TX and one RX queue on each end, said up front: without them the kernel gives a veth a queue
        # per possible CPU and then cuts the real number down to one (veth_init_queues), and that cut waits
        # for an expedited RCU grace period, twice a pair, under the RTNL lock (1-2 ms a pod on this VM);
        # the device is the same either way (one queue in use), as `ip link add ... numtxqueues 1` makes it.
        queues = _u32(IFLA_NUM_TX_QUEUES, 1) + _u32(IFLA_NUM_RX_QUEUES, 1)
        peer_msg = IFINFO.pack(0, 0, 0, 0, 0) + _str(IFLA_IFNAME, peer) + queues + \
            (_u32(IFLA_MTU, mtu) if mtu is not None else b"") + \
            (_attr(IFLA_ADDRESS, _mac(peer_mac)) if peer_mac else b"") + \
            (_u32(IFLA_NET_NS_FD, peer_netns_fd) if peer_netns_fd is not None else b"")  # None: this namespace
        flag = IFF_UP if up else 0
        body = IFINFO.pack(0, 0, 0, flag, flag) + _str(IFLA_IFNAME, name) + queues + \
            (_u32(IFLA_MTU, mtu) if mtu is not None else b"") + \
            (_attr(IFLA_ADDRESS, _mac(mac)) if mac else b"") + \
            (_u32(IFLA_MASTER, master) if master is not None else b"") + \
            _nest(IFLA_LINKINFO, _str(IFLA_INFO_KIND, "veth"),
                  _nest(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_msg)))
        made = parse_link_reply(self.request(RTM_NEWLINK, body, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ECHO))
        if made is None:  # a kernel that does not echo (before 5.x): look it up
            made = self.link(name)
            if made is None:
                raise NetlinkError(errno.ENODEV, f"veth {name} was made but is not there")
        return made

    def add_vxlan(self, name: str, vni: int, local: IPv4Address, port: int, underlay_index: int, mtu: int,
                  mac: str, learning: bool = False) -> None:
        """A VXLAN device (a VTEP): frames sent to it leave as UDP datagrams from `local` to `port`."""
        data = _u32(IFLA_VXLAN_ID, vni) + _u32(IFLA_VXLAN_LINK, underlay_index) + \
            _attr(IFLA_VXLAN_LOCAL, local.packed) + _attr(IFLA_VXLAN_LEARNING, bytes([int(learning)])) + \
            _attr(IFLA_VXLAN_PORT, struct.pack("!H", port))
        body = IFINFO.pack(0, 0, 0, 0, 0) + _str(IFLA_IFNAME, name) + _u32(IFLA_MTU, mtu) + \
            _attr(IFLA_ADDRESS, _mac(mac)) + \
            _nest(IFLA_LINKINFO, _str(IFLA_INFO_KIND, "vxlan"), _nest(IFLA_INFO_DATA, data))
        self.request(RTM_NEWLINK, body, NLM_F_CREATE | NLM_F_EXCL)

    def set_link(self, index: int, up: bool | None = None, master: int | None = None,
                 mtu: int | None = None) -> None:
        self.request(*set_link_msg(index, up, master, mtu))

    def set_hairpin(self, index: int, on: bool = True) -> None:
        """Let a bridge port send a frame back out the port it came in on (what `bridge link set hairpin on` does)."""
        self.request(*hairpin_msg(index, on))

    def del_link(self, index: int) -> None:
        self.request(RTM_DELLINK, IFINFO.pack(0, 0, index, 0, 0))

    # ---- addresses ---------------------------------------------------------------------------
    def add_addr(self, index: int, address: IPv4Interface) -> None:
        """Add an IPv4 address; an address already there is fine."""
        try:
            self.request(*add_addr_msg(index, address))
        except NetlinkError as exc:
            if exc.errno != errno.EEXIST:
                raise

    def addrs(self, index: int | None = None) -> list[tuple[int, IPv4Interface]]:
        out = []
        for kind, payload in self.request(RTM_GETADDR, IFADDR.pack(socket.AF_INET, 0, 0, 0, 0), dump=True):
            if kind != RTM_NEWADDR:
                continue
            _family, prefixlen, _flags, _scope, ifindex = IFADDR.unpack_from(payload)
            attrs = parse_attrs(payload, IFADDR.size)
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw and (index is None or ifindex == index):
                out.append((ifindex, IPv4Interface(f"{IPv4Address(raw)}/{prefixlen}")))
        return out

    # ---- neighbours and forwarding database ---------------------------------------------------
    def replace_neigh(self, index: int, ip: IPv4Address, mac: str) -> None:
        """A permanent ARP entry: what `ip neigh replace IP lladdr MAC dev DEV nud permanent` makes."""
        body = NDMSG.pack(socket.AF_INET, index, NUD_PERMANENT, 0, 0) + _attr(NDA_DST, ip.packed) + \
            _attr(NDA_LLADDR, _mac(mac))
        self.request(RTM_NEWNEIGH, body, NLM_F_CREATE | NLM_F_REPLACE)

    def add_proxy_neigh(self, index: int, ip: IPv4Address) -> None:
        """A neighbour proxy entry: answer ARP for `ip` on this link (`ip neigh replace proxy IP dev DEV`)."""
        body = NDMSG.pack(socket.AF_INET, index, 0, NTF_PROXY, 0) + _attr(NDA_DST, ip.packed)
        self.request(RTM_NEWNEIGH, body, NLM_F_CREATE | NLM_F_REPLACE)

    def del_proxy_neigh(self, index: int, ip: IPv4Address) -> None:
        """Remove a neighbour proxy entry; one that is not there is fine."""
        body = NDMSG.pack(socket.AF_INET, index, 0, NTF_PROXY, 0) + _attr(NDA_DST, ip.packed)
        try:
            self.request(RTM_DELNEIGH, body)
        except NetlinkError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESRCH):
                raise

    def replace_fdb(self, index: int, mac: str, dst: IPv4Address) -> None:
        """A VXLAN forwarding entry: frames for `mac` go to the VTEP at `dst` (`bridge fdb replace ... self`)."""
        body = NDMSG.pack(AF_BRIDGE, index, NUD_PERMANENT, NTF_SELF, 0) + _attr(NDA_LLADDR, _mac(mac)) + \
            _attr(NDA_DST, dst.packed)
        self.request(RTM_NEWNEIGH, body, NLM_F_CREATE | NLM_F_REPLACE)

    # ---- routes ------------------------------------------------------------------------------
    def replace_route(self, dst: IPv4Network, gateway: IPv4Address | None = None, oif: int | None = None,
                      protocol: int = RTPROT_BOOT, onlink: bool = False) -> None:
        self.request(*replace_route_msg(dst, gateway, oif, protocol, onlink))

    def routes(self, table: int = RT_TABLE_MAIN) -> list[Route]:
        out = []
        body = RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        for kind, payload in self.request(RTM_GETROUTE, body, dump=True):
            if kind != RTM_NEWROUTE:
                continue
            _fam, dst_len, _src_len, _tos, tbl, proto, _scope, rtype, _flags = RTMSG.unpack_from(payload)
            attrs = parse_attrs(payload, RTMSG.size)
            rt_table = struct.unpack("=I", attrs[RTA_TABLE])[0] if RTA_TABLE in attrs else tbl
            if rt_table != table or rtype != RTN_UNICAST:
                continue
            dst = IPv4Address(attrs[RTA_DST]) if RTA_DST in attrs else IPv4Address(0)
            out.append(Route(dst=IPv4Network(f"{dst}/{dst_len}"),
                             gateway=IPv4Address(attrs[RTA_GATEWAY]) if RTA_GATEWAY in attrs else None,
                             oif=struct.unpack("=I", attrs[RTA_OIF])[0] if RTA_OIF in attrs else None,
                             protocol=proto, table=rt_table))
        return out
