"""DNS flows for every profile: a packet socket on the cluster DNS pod's eth0 (what tcpdump would open;
it changes nothing the pod does), each query and each answer one flow with Hubble's l7.dns fields (query,
qtypes, ips, rcode), so the ndots:5 search-list expansion of one lookup shows as it happens, its NXDOMAIN
answers included. The messages are parsed by observe/dnswire.py (shared with `lab dns-count`).

Seen there, a query's source is the asking pod (kube-proxy's DNAT and the socket LB change only the
destination), and the DNS pod's own forwarding to the upstream (external) DNS shows too. A classic BPF
filter keeps only port-53 frames in the socket's queue (4 MiB: the ring); frames the kernel had to drop
are counted (PACKET_STATISTICS) and reported as lost.
"""
from __future__ import annotations

import contextlib
import socket
import struct

from observe.capture import _JEQ_K, _JSET_K, _LD_B_ABS, _LD_H_ABS, _LD_H_IND, _RET_K, SKF_AD_OFF, SKF_AD_PROTOCOL, \
    attach_filter
from observe.dnswire import _udp_dns, parse
from observe.flow import FORWARDED, TYPE_DNS, Dns, Flow
from observe.flows import Names, now
from topo import netns
from topo.model import POD_IFNAME

ETH_P_ALL, PACKET_OUTGOING = 0x0003, 4
SOL_PACKET, PACKET_STATISTICS = 263, 6
RCODE_NUMBERS = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5}


def dns_filter() -> list[tuple[int, int, int, int]]:
    """IPv4, first fragment, UDP or TCP, source or destination port 53; anything else stays out."""
    ldx_msh = 0xB1  # BPF_LDX|BPF_B|BPF_MSH: X = 4 * (byte & 0xf), the IPv4 header length
    return [
        (_LD_H_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_PROTOCOL) & 0xFFFFFFFF),
        (_JEQ_K, 0, 11, 0x0800),
        (_LD_B_ABS, 0, 0, 23),  # IP protocol (Ethernet: eth0 of a pod)
        (_JEQ_K, 1, 0, 17),
        (_JEQ_K, 0, 8, 6),
        (_LD_H_ABS, 0, 0, 20),
        (_JSET_K, 6, 0, 0x1FFF),
        (ldx_msh, 0, 0, 14),
        (_LD_H_IND, 0, 0, 14),
        (_JEQ_K, 2, 0, 53),
        (_LD_H_IND, 0, 0, 16),
        (_JEQ_K, 0, 1, 53),
        (_RET_K, 0, 0, 0x40000),
        (_RET_K, 0, 0, 0),
    ]


def dns_flow(frame: bytes, outgoing: bool, node: str, names: Names) -> Flow | None:
    found = _udp_dns(frame)
    if found is None:
        return None
    src, dst, sport, dport, proto, payload = found
    msg = parse(payload)
    if msg is None:
        return None
    dns = Dns(msg["name"] + ".", (msg["qtype"],), tuple(msg["answers"]),
              RCODE_NUMBERS.get(msg["rcode"], 0) if msg["response"] else 0, msg["response"])
    summary = f"DNS {'Answer' if msg['response'] else 'Query'} {msg['name']}. {msg['qtype']}" + \
        (f" {msg['rcode']}" if msg["response"] else "")
    return Flow(now(), FORWARDED, TYPE_DNS, node, names.endpoint(src), names.endpoint(dst), proto.upper(),
                sport, dport, dns=dns, is_reply=msg["response"], traffic_direction="EGRESS" if outgoing else "INGRESS",
                trace_observation_point="", summary=summary, extra={"dns_id": str(msg["id"])})


class DnsSource:
    def __init__(self, pod_netns: str, node: str, names: Names) -> None:
        self.node, self.names, self.lost, self.note = node, names, 0, ""
        with netns.entered(pod_netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                      socket.htons(ETH_P_ALL))
        try:
            attach_filter(self.sock, dns_filter())
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
            self.sock.bind((POD_IFNAME, 0))
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, budget: int = 1024) -> list[Flow]:
        out = []
        for _ in range(budget):
            try:
                data, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                break
            flow = dns_flow(data, addr[2] == PACKET_OUTGOING, self.node, self.names)
            if flow is not None:
                out.append(flow)
        with contextlib.suppress(OSError):
            _packets, drops = struct.unpack("=II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
            self.lost += drops  # the counters reset on every read
        return out

    def describe(self) -> str:
        return f"DNS packets at the cluster DNS pod on {self.node}"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
