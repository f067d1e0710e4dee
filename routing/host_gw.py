"""Flannel's host-gw backend: no tunnel, one plain route per remote node's PodCIDR via that node's IP.

It only works when nodes share an L2 segment (the next hop must be on-link), which is why Flannel
refuses host-gw across routers; the flat underlay of a lab satisfies it.
"""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from topo.model import NODE_IFNAME, Lab


@dataclass(frozen=True)
class Route:
    node: str  # the node whose table gets the route
    dst: IPv4Network
    via: IPv4Address
    dev: str = NODE_IFNAME


def routes(lab: Lab) -> list[Route]:
    return [Route(node.name, peer.pod_cidr, peer.ip)
            for node in lab.nodes for peer in lab.nodes if peer.name != node.name]
