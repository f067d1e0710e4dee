"""Flannel's vxlan backend: every node a VTEP on `flannel.1`, pod packets wrapped in UDP between node IPs.

The conventions are Flannel's: device `flannel.1`, VNI 1, UDP port 8472 (the Linux kernel's historical
VXLAN port, not IANA's 4789), source address the node IP, learning off because every entry is programmed
up front, MTU 50 bytes below the underlay (outer Ethernet, IP, UDP and VXLAN headers) so an encapsulated
frame still fits a 1500-byte underlay. Like Flannel, the VTEP holds the network address of its node's
PodCIDR (10.244.1.0/32), and each remote node gets three entries: a route to its PodCIDR via its VTEP
address on flannel.1 (onlink), an ARP entry for that address, and an FDB entry sending that MAC to its
node IP.
"""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from topo import names
from topo.model import DEFAULT_MTU, NODE_IFNAME, VXLAN_OVERHEAD, Lab, Node
from topo.rtnl import RTPROT_STATIC, Rtnl

DEVICE = "flannel.1"  # Flannel names the device after the VNI
VNI = 1
PORT = 8472


@dataclass(frozen=True)
class Vtep:
    node: str
    ip: IPv4Address  # the node's underlay IP: outer source address
    mac: str
    address: IPv4Interface  # on flannel.1: the PodCIDR's network address, /32
    pod_cidr: IPv4Network
    mtu: int


@dataclass(frozen=True)
class VxlanPlan:
    vtep: Vtep
    peers: tuple[Vtep, ...]


def vtep_mac(lab: str, node: str) -> str:
    """A stable, locally administered unicast MAC, so every node's entries are known before any exists."""
    raw = names.short_hash("vtep", lab, node, length=10)
    return "0e:" + ":".join(raw[i:i + 2] for i in range(0, 10, 2))


def vtep(lab: Lab, node: Node) -> Vtep:
    underlay_mtu = node.link.mtu or DEFAULT_MTU
    return Vtep(node=node.name, ip=node.ip, mac=vtep_mac(lab.name, node.name),
                address=IPv4Interface(f"{node.pod_cidr.network_address}/32"), pod_cidr=node.pod_cidr,
                mtu=underlay_mtu - VXLAN_OVERHEAD)


def plan(lab: Lab) -> list[VxlanPlan]:
    vteps = [vtep(lab, n) for n in lab.nodes]
    return [VxlanPlan(v, tuple(p for p in vteps if p.node != v.node)) for v in vteps]


def apply(host: Rtnl, p: VxlanPlan) -> None:
    """Create flannel.1 in a node and program every remote VTEP (idempotent: replace, not add)."""
    if host.link(DEVICE) is None:
        eth0 = host.link(NODE_IFNAME)
        assert eth0 is not None
        host.add_vxlan(DEVICE, VNI, p.vtep.ip, PORT, eth0.index, p.vtep.mtu, p.vtep.mac)
    dev = host.link(DEVICE)
    assert dev is not None
    host.add_addr(dev.index, p.vtep.address)
    host.set_link(dev.index, up=True)
    for peer in p.peers:
        host.replace_neigh(dev.index, peer.address.ip, peer.mac)
        host.replace_fdb(dev.index, peer.mac, peer.ip)
        host.replace_route(peer.pod_cidr, gateway=peer.address.ip, oif=dev.index, protocol=RTPROT_STATIC,
                           onlink=True)
