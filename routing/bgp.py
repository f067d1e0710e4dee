"""Who speaks BGP to whom: Calico's BGP mode for the nodes, and the datacenter fabric for the routers.

Nodes (backend bgp), as Calico does with BIRD, here with FRR:
- `peering: mesh`: iBGP full mesh in AS 64512, each node announcing its PodCIDR. Pod routes land in
  every node's kernel with the other node's IP as next hop: no encapsulation at all.
- `peering: tor` (Calico's "AS per rack" model): each node peers only with its rack's router by iBGP, in
  the rack's AS, the router acting as route reflector, so the "datacenter routers" learn every pod route.
- backend ipip (Calico's IP-in-IP): the same mesh, but the nodes' zebra installs nothing; the routes go
  through tunl0 and the lab installs them from what bgpd learned (routing/ipip.py says why).

Routers (routed underlays, whatever the pod backend): each top-of-rack router announces its rack subnet
by eBGP to the spine (or, with a `direct` fabric, to every other ToR), which is how node IPs of different
racks reach each other. Routes a ToR learns by eBGP are passed to its node clients with itself as next
hop; routes between nodes of one rack keep the node as next hop, so same-rack pod traffic does not
hairpin through the router.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from topo.model import SPINE, Lab
from topo.underlay import fabric_links

# Fast, deterministic convergence for a lab: keepalive 1 s / hold 3 s, reconnect after 1 s, and no
# update coalescing delay (FRR's default start-up wait dominated cold convergence when measured here).
KEEPALIVE, HOLD, CONNECT_RETRY = 1, 3, 1
IPIP_ROUTE_MAP = "KUBENET-IPIP"  # backend ipip: the deny-all route map that keeps zebra from installing BGP routes


@dataclass(frozen=True)
class Neighbor:
    ip: IPv4Address
    remote_as: int
    name: str  # who it is, for messages and `show bgp summary` descriptions
    rr_client: bool = False
    next_hop_self: bool = False


@dataclass(frozen=True)
class Speaker:
    name: str  # node or router name
    netns: str
    asn: int
    router_id: IPv4Address
    neighbors: tuple[Neighbor, ...]
    networks: tuple[IPv4Network, ...] = ()  # announced (a node's PodCIDR)
    redistribute_connected: bool = False  # routers announce their connected subnets
    expected: tuple[IPv4Network, ...] = field(default=())  # routes it must have learned once converged
    zebra: tuple[str, ...] = ()  # extra zebra.conf lines (backend ipip: keep BGP routes out of the kernel)


def ipip_zebra_lines() -> list[str]:
    """zebra.conf lines of a node in ipip mode: bgpd's routes are learned, never installed by zebra (the
    lab installs them, through tunl0: routing/ipip.py), and next hops reachable only by the default route
    count."""
    return [f"route-map {IPIP_ROUTE_MAP} deny 10", "!", f"ip protocol bgp route-map {IPIP_ROUTE_MAP}",
            "ip nht resolve-via-default", "!"]


def node_speakers(lab: Lab) -> list[Speaker]:
    if lab.network.backend not in ("bgp", "ipip"):
        return []
    if lab.network.bgp.peering == "tor":
        return [_tor_client(lab, n.name) for n in lab.nodes]
    asn = lab.network.bgp.asn
    zebra = tuple(ipip_zebra_lines()) if lab.network.backend == "ipip" else ()
    speakers = []
    for node in lab.nodes:
        peers = tuple(Neighbor(p.ip, asn, p.name) for p in lab.nodes if p.name != node.name)
        speakers.append(Speaker(node.name, lab.node_netns(node.name), asn, node.ip, peers, (node.pod_cidr,),
                                expected=tuple(p.pod_cidr for p in lab.nodes if p.name != node.name), zebra=zebra))
    return speakers


def _tor_client(lab: Lab, name: str) -> Speaker:
    node = lab.node(name)
    assert node.rack is not None
    rack = lab.underlay.rack(node.rack)
    return Speaker(node.name, lab.node_netns(node.name), rack.asn, node.ip,
                   (Neighbor(rack.router_ip, rack.asn, rack.router),), (node.pod_cidr,),
                   expected=tuple(p.pod_cidr for p in lab.nodes if p.name != node.name))


def router_speakers(lab: Lab) -> list[Speaker]:
    fabric = lab.underlay.fabric
    if fabric is None:
        return []
    links = {link.tor: link for link in fabric_links(lab)}
    racks = lab.underlay.racks
    tor_peering = lab.network.backend == "bgp" and lab.network.bgp.peering == "tor"
    all_pods = tuple(n.pod_cidr for n in lab.nodes) if tor_peering else ()
    speakers = []
    for rack in racks:
        if fabric.mode == "spine":
            spine_ip = links[rack.router].spine_ip
            assert spine_ip is not None
            up = (Neighbor(spine_ip.ip, fabric.spine_asn, SPINE),)
        else:
            up = tuple(Neighbor(links[o.router].tor_ip.ip, o.asn, o.router) for o in racks if o.name != rack.name)
        clients = tuple(Neighbor(n.ip, rack.asn, n.name, rr_client=True, next_hop_self=True)
                        for n in lab.nodes if n.rack == rack.name) if tor_peering else ()
        others = tuple(o.subnet for o in racks if o.name != rack.name)
        speakers.append(Speaker(rack.router, lab.router_netns(rack.router), rack.asn, rack.router_ip, up + clients,
                                redistribute_connected=True, expected=others + all_pods))
    if fabric.mode == "spine":
        spine_peers = tuple(Neighbor(links[r.router].tor_ip.ip, r.asn, r.router) for r in racks)
        router_id = links[racks[0].router].spine_ip
        assert router_id is not None
        speakers.append(Speaker(SPINE, lab.router_netns(SPINE), fabric.spine_asn, router_id.ip,
                                spine_peers, expected=tuple(r.subnet for r in racks) + all_pods))
    return speakers


def render_zebra(speaker: Speaker) -> str:
    """zebra's configuration for one speaker."""
    return "\n".join([f"hostname {speaker.name}", "!", *speaker.zebra, ""])


def render(speaker: Speaker) -> str:
    """bgpd's configuration for one speaker (FRR syntax)."""
    lines = [
        "frr defaults datacenter",
        f"hostname {speaker.name}",
        "!",
        f"router bgp {speaker.asn}",
        f" bgp router-id {speaker.router_id}",
        " no bgp ebgp-requires-policy",  # FRR refuses eBGP routes without a policy unless told otherwise
        " no bgp network import-check",
        " bgp bestpath as-path multipath-relax",
        f" timers bgp {KEEPALIVE} {HOLD}",
        " coalesce-time 0",
    ]
    for peer in speaker.neighbors:
        lines += [f" neighbor {peer.ip} remote-as {peer.remote_as}",
                  f" neighbor {peer.ip} description {peer.name}",
                  f" neighbor {peer.ip} timers connect {CONNECT_RETRY}"]
    lines += [" !", " address-family ipv4 unicast"]
    lines += [f"  network {net}" for net in speaker.networks]
    if speaker.redistribute_connected:
        lines.append("  redistribute connected")
    for peer in speaker.neighbors:
        if peer.rr_client:
            lines.append(f"  neighbor {peer.ip} route-reflector-client")
        if peer.next_hop_self:
            lines.append(f"  neighbor {peer.ip} next-hop-self")
    lines += [" exit-address-family", "exit", "!", ""]
    return "\n".join(lines)
