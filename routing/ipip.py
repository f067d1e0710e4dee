"""Calico's IP-in-IP mode: pod packets between nodes wrapped in one more IPv4 header, through `tunl0`,
with BGP telling every node where each PodCIDR lives.

The conventions are Calico's (the `ipipMode` of its IPPool, felix's tunl0, BIRD's routes):
- every node's `tunl0` is the kernel's ipip fallback device (any local, any remote: one device reaches
  every peer, the outer destination is each route's next hop), up, MTU 1480 (1500 minus the 20-byte
  outer IPv4 header), holding a tunnel address from the node's own block: here the PodCIDR's first
  address as a /32 (10.244.1.0/32; Calico's IPAM gives the tunnel the first free address of the node's
  block, and `.1` is cni0's here). Node-originated packets to remote pods leave with it as source.
- routes to other nodes' PodCIDRs are `10.244.3.0/24 via 192.168.2.10 dev tunl0 onlink`: the next hop
  is the other node's own IP, which the ipip device uses as the outer destination; `onlink` because no
  address on tunl0 covers it.
- `ipipMode: Always` encapsulates towards every node; `CrossSubnet` only towards nodes whose IP is
  outside this node's own subnet (another rack): same-rack routes are plain `via NODE-IP dev eth0`, as
  Calico's BIRD installs them, so only traffic between racks pays the 20 bytes and the encapsulation.

Who installs those routes. In Calico, BIRD learns the routes over BGP and its kernel export sets the
device to tunl0 (Calico's patched `krt_tunnel` attribute). FRR has no such knob: zebra always installs a
BGP route through whatever route resolves its next hop (and would send cross-rack pod traffic unwrapped
to the rack's router, which has no pod routes). So here bgpd learns the routes as usual, zebra is told
not to install any BGP route (`ip protocol bgp route-map KUBENET-IPIP`, a deny-all route map that
routing/bgp.py writes, since it renders the speakers' zebra.conf), and the
lab plays BIRD's kernel-export part: once each node's bgpd has learned its peers' PodCIDRs, it reads the
best path and next hop of each (`show bgp ipv4 unicast json`) and installs the route itself, through
tunl0 or eth0 as the mode says, as `proto bgp`. zebra ignores routes of its own protocol that it did not
make, and `ip nht resolve-via-default` lets bgpd accept next hops in other racks (reachable only through
the default route), as BIRD does. The routes are read once, when `lab up` waits for BGP: a lab's nodes
do not come and go afterwards, so unlike BIRD nothing follows later withdrawals.
"""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from routing import frr
from routing.bgp import Speaker
from topo import netns
from topo.errors import ApplyError
from topo.model import DEFAULT_MTU, IPIP_OVERHEAD, NODE_IFNAME, Lab, Node
from topo.rtnl import Rtnl

DEVICE = "tunl0"  # the ipip module's fallback device, which Calico uses
POLL = 0.1  # seconds between two reads of a node's BGP table while waiting
# Set in every ipip node. Here the nodes' BGP mesh crosses the racks, and at `lab down` the routers' zebra
# withdraws the routes between racks as it stops: a node's closed BGP socket then retransmits its FIN into
# the void (8 times by default, about a minute), and the open socket keeps the node's namespace, and `lab
# down`, waiting. One retry lets an orphaned socket go in about a second; live connections are unaffected.
NODE_SYSCTLS = (("net/ipv4/tcp_orphan_retries", "1"),)


@dataclass(frozen=True)
class Tunnel:
    """A node's tunl0: its address (from the node's PodCIDR) and MTU."""

    node: str
    address: IPv4Interface
    mtu: int


@dataclass(frozen=True)
class IpipRoute:
    """A route to another node's PodCIDR, as BIRD would install it: via that node's IP, through tunl0
    (onlink) when encapsulated, else straight out of eth0."""

    node: str  # whose table
    dst: IPv4Network
    via: IPv4Address
    encap: bool

    @property
    def dev(self) -> str:
        return DEVICE if self.encap else NODE_IFNAME

    def __str__(self) -> str:
        return f"{self.dst} via {self.via} dev {self.dev}{' onlink' if self.encap else ''}"


def tunnel(node: Node) -> Tunnel:
    underlay_mtu = node.link.mtu or DEFAULT_MTU
    return Tunnel(node.name, IPv4Interface(f"{node.pod_cidr.network_address}/32"), underlay_mtu - IPIP_OVERHEAD)


def encapsulates(lab: Lab, node: Node, peer_ip: IPv4Address) -> bool:
    """Calico's rule: Always, or CrossSubnet when the peer's IP is outside this node's own subnet."""
    return lab.network.ipip_mode == "Always" or peer_ip not in lab.node_subnet(node)


def routes(lab: Lab, node: Node, learned: dict[IPv4Network, IPv4Address]) -> list[IpipRoute]:
    """What to install in `node` for the PodCIDRs its BGP speaker learned (prefix -> next hop). Only pod
    routes: Calico's export installs routes of its IP pools, nothing else the node may hear."""
    return [IpipRoute(node.name, dst, via, encapsulates(lab, node, via))
            for dst, via in sorted(learned.items())
            if dst.subnet_of(lab.cluster.pod_cidr) and dst != node.pod_cidr]


def expected_routes(lab: Lab) -> list[IpipRoute]:
    """Every node's routes once BGP has converged: each other node's PodCIDR via that node's IP."""
    return [r for node in lab.nodes
            for r in routes(lab, node, {p.pod_cidr: p.ip for p in lab.nodes if p.name != node.name})]


def learned_routes(show_bgp_json: str) -> dict[IPv4Network, IPv4Address]:
    """prefix -> next hop of every valid best path bgpd learned from a peer, from `show bgp ipv4 unicast
    json` (locally originated networks have next hop 0.0.0.0 and are left out)."""
    try:
        data = json.loads(show_bgp_json or "{}")
    except ValueError:
        return {}
    out = {}
    for prefix, paths in (data.get("routes") or {}).items():
        for path in paths:
            if not (path.get("valid") and path.get("bestpath")):
                continue
            hops = [h.get("ip") for h in path.get("nexthops", []) if h.get("ip") not in (None, "0.0.0.0")]
            if hops:
                out[IPv4Network(prefix)] = IPv4Address(hops[0])
    return out


# ---- apply -------------------------------------------------------------------------------------


def apply_tunnel(host: Rtnl, ns: str, t: Tunnel) -> None:
    """Bring up tunl0 as felix does: MTU, the tunnel address, up. The ipip module gives every namespace a
    tunl0; one without (net.core.fb_tunnels_only_for_init_net) gets an any/any ipip device of that name."""
    dev = host.link(DEVICE)
    if dev is None:
        proc = subprocess.run(["ip", "-n", ns, "link", "add", DEVICE, "type", "ipip"], capture_output=True,
                              text=True)
        dev = host.link(DEVICE)
        if dev is None:
            raise ApplyError(f"cannot create {DEVICE} in {ns}: {proc.stderr.strip() or 'no ipip support'}")
    host.add_addr(dev.index, t.address)
    host.set_link(dev.index, up=True, mtu=t.mtu)
    with netns.entered(ns):
        for key, value in NODE_SYSCTLS:
            Path("/proc/sys", key).write_text(value)


def install(host: Rtnl, node_routes: list[IpipRoute]) -> None:
    index = {dev: host.link(dev) for dev in (DEVICE, NODE_IFNAME)}
    for r in node_routes:
        link = index[r.dev]
        if link is None:
            raise ApplyError(f"node {r.node} has no {r.dev}")
        host.replace_route(r.dst, gateway=r.via, oif=link.index, protocol=frr.RTPROT_BGP, onlink=r.encap)


def program(lab: Lab, speakers: tuple[Speaker, ...], handles: dict[str, Rtnl], folders: dict[str, Path],
            timeout: float) -> float:
    """Wait until every node's bgpd has learned each PodCIDR it should, then install the routes it learned
    (BIRD's kernel export, see the module doc). Returns the seconds it took; a timeout names the nodes and
    the prefixes they lack."""
    started = time.monotonic()
    pending = {s.name: s for s in speakers}
    learned: dict[str, dict[IPv4Network, IPv4Address]] = {}
    while pending:
        for name, speaker in list(pending.items()):
            learned[name] = learned_routes(frr.vtysh(folders[name], "show bgp ipv4 unicast json"))
            if all(net in learned[name] for net in speaker.expected):
                install(handles[speaker.netns], routes(lab, lab.node(name), learned[name]))
                del pending[name]
        if not pending:
            break
        if time.monotonic() - started > timeout:
            lacking = "; ".join(f"{n} lacks {', '.join(str(x) for x in s.expected if x not in learned.get(n, {}))}"
                                for n, s in pending.items())
            raise ApplyError(f"BGP did not converge in {timeout:.0f} s: {lacking}")
        time.sleep(POLL)
    return time.monotonic() - started
