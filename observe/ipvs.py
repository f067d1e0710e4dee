"""IPVS as the kernel lists it (/proc/net/ip_vs, read inside a node's namespace: no process at all), for
`lab graph` and `lab trace` in kube-proxy's IPVS mode: each virtual server with its scheduler and real
servers, and the services table every mode is compared by.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address

from topo import netns

ServiceKey = tuple[str, str, int]  # (cluster IP, protocol lower case, port): how every mode's table is keyed


@dataclass(frozen=True)
class VirtualServer:
    """One IPVS virtual server as the kernel lists it: kube-proxy's IPVS mode makes one per ClusterIP port
    (and per node address and NodePort), its real servers the endpoints."""

    protocol: str  # lower case: tcp, udp, sctp
    ip: str
    port: int
    scheduler: str
    reals: tuple[tuple[str, str], ...]  # (ip:port, forwarding method: Masq, Route, Tunnel, Local)

    @property
    def key(self) -> ServiceKey:
        return (self.ip, self.protocol, self.port)


_VS_LINE = re.compile(r"(TCP|UDP|SCTP)\s+([0-9A-Fa-f.]+):([0-9A-Fa-f]+)\s+(\S+)")
_RS_LINE = re.compile(r"\s+->\s+([0-9A-Fa-f.]+):([0-9A-Fa-f]+)\s+(\S+)")


def _ipvs_address(ip: str, port: str) -> str:
    """ip:port from either notation: dotted with a decimal port (ipvsadm -Ln), or 8 hex digits with a hex
    port (/proc/net/ip_vs prints `%08X:%04X`)."""
    if "." in ip:
        return f"{ip}:{int(port)}"
    return f"{IPv4Address(int(ip, 16))}:{int(port, 16)}"


def parse_ip_vs(text: str) -> list[VirtualServer]:
    """The IPVS table as the kernel prints it in /proc/net/ip_vs (`TCP  0A600064:0050 rr`, then
    `  -> 0AF40102:1F90      Masq    1      0          0`) or as `ipvsadm -Ln` prints it (the same layout,
    dotted addresses and decimal ports). Firewall-mark and IPv6 services are left out (kube-proxy makes
    neither here)."""
    out: list[VirtualServer] = []
    current: tuple[str, str, int, str] | None = None
    reals: list[tuple[str, str]] = []
    for line in text.splitlines() + [""]:
        rs = _RS_LINE.match(line)
        if rs and current is not None:
            reals.append((_ipvs_address(rs.group(1), rs.group(2)), rs.group(3)))
            continue
        if current is not None and not line.startswith(" "):
            out.append(VirtualServer(*current, tuple(reals)))
            current = None
        vs = _VS_LINE.match(line)
        if vs:
            ip, port = _ipvs_address(vs.group(2), vs.group(3)).rsplit(":", 1)
            current, reals = (vs.group(1).lower(), ip, int(port), vs.group(4)), []
    return out


def ipvs_servers(ns: str) -> list[VirtualServer]:
    """A node's IPVS table, read from /proc inside its namespace (IPVS is per namespace; no ipvsadm
    process needed). Empty on a kernel without IPVS."""
    with netns.entered(ns):
        try:
            with open("/proc/thread-self/net/ip_vs") as f:  # the netns of this thread, not the process
                text = f.read()
        except OSError:
            return []
    return parse_ip_vs(text)


def ipvs_services(servers: list[VirtualServer]) -> dict[ServiceKey, list[str]]:
    """Address:port -> real servers, as iptables_services and nft_services answer for their modes."""
    return {vs.key: [real for real, _fwd in vs.reals] for vs in servers}
