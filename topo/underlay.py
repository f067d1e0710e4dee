"""The physical side of the lab: Kubernetes nodes (and routers) as Mininet hosts on Mininet LinuxBridge
switches.

Mininet builds what a datacenter would have: machines with an `eth0` on a shared segment, or, for a
routed underlay, racks (a segment each) behind top-of-rack routers joined by a spine or by one shared
fabric segment. The lab then pins every host's namespace under /run/netns and lets Mininet's shells go,
so the lab outlives the command that built it and every later step works from the root mount namespace.

Every switch lives in a namespace of its own (Mininet puts switches in the root namespace by default):
nothing of the lab, not even a port name, can collide with another lab or touch the machine's real
uplink, and the host's own firewall and bridge-netfilter settings never see lab traffic.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from topo import names, netns
from topo.errors import ApplyError, FeatureMissing
from topo.model import NODE_IFNAME, SPINE, Lab, LinkSpec
from topo.rtnl import Rtnl

FLAT_SWITCH = "ul"  # Mininet's LinuxBridge only enslaves ports whose names contain the switch's name
FABRIC = "fabric"
SHELL_THREADS = 4  # node shells started at once (see build); 2-8 do about as well on 2 cores


@dataclass(frozen=True)
class Segment:
    """One L2 segment: a LinuxBridge (named `switch`, short, unique in the lab) in its own namespace."""

    switch: str
    netns: str


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    router: bool = False
    gateway: IPv4Address | None = None  # default route (nodes of a routed underlay: their ToR)
    external: bool = False  # a machine outside the cluster (the explainer's "External Web")


@dataclass(frozen=True)
class Link:
    """A host interface wired either to a segment's switch (`segment`) or straight to another host."""

    host: str
    intf: str
    address: IPv4Interface
    segment: str | None = None  # switch name
    port: str | None = None  # the switch's port name
    peer: str | None = None  # host at the other end of a point-to-point link
    peer_intf: str | None = None
    peer_address: IPv4Interface | None = None
    spec: LinkSpec = LinkSpec()


@dataclass(frozen=True)
class UnderlayPlan:
    segments: tuple[Segment, ...]
    hosts: tuple[Host, ...]
    links: tuple[Link, ...]

    @property
    def switch_netns(self) -> tuple[str, ...]:
        return tuple(s.netns for s in self.segments)

    def cables(self) -> dict[tuple[str, str], tuple[str, str]]:
        """Both ends of every cable of the underlay, each way: (netns, device) of a host's NIC -> its switch
        port or the other end of its point-to-point link, and back."""
        seg_ns = {s.switch: s.netns for s in self.segments}
        host_ns = {h.name: h.netns for h in self.hosts}
        ends: dict[tuple[str, str], tuple[str, str]] = {}
        for link in self.links:
            if link.segment is not None and link.port is not None:
                other = (seg_ns[link.segment], link.port)
            elif link.peer is not None and link.peer_intf is not None:
                other = (host_ns[link.peer], link.peer_intf)
            else:
                continue
            ends[(host_ns[link.host], link.intf)] = other
            ends[other] = (host_ns[link.host], link.intf)
        return ends


def plan(lab: Lab) -> UnderlayPlan:
    return _routed(lab) if lab.underlay.routed else _flat(lab)


def _flat(lab: Lab) -> UnderlayPlan:
    segment = Segment(FLAT_SWITCH, names.underlay_netns(lab.name, FLAT_SWITCH))
    hosts = [Host(n.name, lab.node_netns(n.name)) for n in lab.nodes]
    links = [Link(n.name, NODE_IFNAME, lab.node_interface(n), FLAT_SWITCH, f"{FLAT_SWITCH}-eth{n.index}",
                  spec=n.link) for n in lab.nodes]
    prefix = lab.underlay.subnet.prefixlen if lab.underlay.subnet else 24
    for i, ext in enumerate(lab.external):
        hosts.append(Host(ext.name, lab.external_netns(ext.name), external=True))
        links.append(Link(ext.name, NODE_IFNAME, IPv4Interface(f"{ext.ip}/{prefix}"), FLAT_SWITCH,
                          f"{FLAT_SWITCH}-eth{len(lab.nodes) + i}", spec=lab.underlay.link))
    return UnderlayPlan((segment,), tuple(hosts), tuple(links))


@dataclass(frozen=True)
class FabricLink:
    """A ToR's uplink: the ToR's address and, with a spine, the spine's end of their /30."""

    tor: str
    tor_ip: IPv4Interface
    spine_ip: IPv4Interface | None  # None with a direct fabric (one shared segment)


def fabric_links(lab: Lab) -> list[FabricLink]:
    """Spine: one /30 per rack (spine .1, ToR .2). Direct: every ToR on one segment, rack i's ToR at host i+1."""
    fabric = lab.underlay.fabric
    if fabric is None:
        return []
    if fabric.mode == "spine":
        blocks = list(fabric.cidr.subnets(new_prefix=30))
        return [FabricLink(r.router, IPv4Interface(f"{blocks[r.index].network_address + 2}/30"),
                           IPv4Interface(f"{blocks[r.index].network_address + 1}/30")) for r in lab.underlay.racks]
    prefix = fabric.cidr.prefixlen
    return [FabricLink(r.router, IPv4Interface(f"{fabric.cidr.network_address + r.index + 1}/{prefix}"), None)
            for r in lab.underlay.racks]


def _routed(lab: Lab) -> UnderlayPlan:
    """A segment per rack with its ToR on it, and the ToRs' uplinks to a spine or a fabric segment."""
    fabric = lab.underlay.fabric
    assert fabric is not None
    segments = [Segment(f"r{r.index}", names.underlay_netns(lab.name, r.name)) for r in lab.underlay.racks]
    hosts = [Host(n.name, lab.node_netns(n.name), gateway=lab.underlay.rack(n.rack).router_ip)  # type: ignore[arg-type]
             for n in lab.nodes]
    hosts += [Host(r.router, lab.router_netns(r.router), router=True) for r in lab.underlay.racks]
    ports: dict[str, int] = {}

    def port(switch: str) -> str:
        ports[switch] = ports.get(switch, -1) + 1
        return f"{switch}-eth{ports[switch]}"

    links = []
    for n in lab.nodes:
        rack = lab.underlay.rack(n.rack)  # type: ignore[arg-type]
        links.append(Link(n.name, NODE_IFNAME, lab.node_interface(n), f"r{rack.index}", port(f"r{rack.index}"),
                          spec=n.link))
    for ext in lab.external:
        rack = lab.underlay.rack(ext.rack)  # type: ignore[arg-type]
        hosts.append(Host(ext.name, lab.external_netns(ext.name), external=True, gateway=rack.router_ip))
        links.append(Link(ext.name, NODE_IFNAME, IPv4Interface(f"{ext.ip}/{rack.subnet.prefixlen}"),
                          f"r{rack.index}", port(f"r{rack.index}"), spec=lab.underlay.link))
    for r in lab.underlay.racks:
        links.append(Link(r.router, "eth0", IPv4Interface(f"{r.router_ip}/{r.subnet.prefixlen}"), f"r{r.index}",
                          port(f"r{r.index}"), spec=lab.underlay.link))
    uplinks = fabric_links(lab)
    if fabric.mode == "spine":
        hosts.append(Host(SPINE, lab.router_netns(SPINE), router=True))
        for up, r in zip(uplinks, lab.underlay.racks):
            links.append(Link(up.tor, "eth1", up.tor_ip, peer=SPINE, peer_intf=f"eth{r.index}",
                              peer_address=up.spine_ip, spec=lab.underlay.link))
    else:
        segments.append(Segment("fab", names.underlay_netns(lab.name, FABRIC)))
        for up in uplinks:
            links.append(Link(up.tor, "eth1", up.tor_ip, "fab", port("fab"), spec=lab.underlay.link))
    return UnderlayPlan(tuple(segments), tuple(hosts), tuple(links))


def configure(up: UnderlayPlan, handle_of) -> None:  # handle_of: netns name -> topo.rtnl.Rtnl
    """Addresses, MTUs and default routes of every underlay interface, by netlink, after `build`."""
    hosts = {h.name: h for h in up.hosts}
    seg_ns = {s.switch: s.netns for s in up.segments}
    for link in up.links:
        ends = [(hosts[link.host].netns, link.intf, link.address)]
        if link.peer is not None:
            ends.append((hosts[link.peer].netns, link.peer_intf, link.peer_address))
        else:
            ends.append((seg_ns[link.segment], link.port, None))  # type: ignore[index]
        for ns, intf, address in ends:
            rt = handle_of(ns)
            dev = rt.link(intf)
            assert dev is not None, (ns, intf)
            if address is not None:
                rt.add_addr(dev.index, address)
            rt.set_link(dev.index, up=True, mtu=link.spec.mtu)
    widest: dict[str, int] = {}  # each switch's largest port MTU
    for link in up.links:
        if link.segment is not None:
            widest[link.segment] = max(widest.get(link.segment, 0), link.spec.mtu or DEFAULT_PORT_MTU)
    for link in up.links:
        if link.segment is not None and (link.spec.mtu or DEFAULT_PORT_MTU) < widest[link.segment]:
            wire_sized(seg_ns[link.segment], link.port)  # type: ignore[arg-type]
    for h in up.hosts:
        lo = handle_of(h.netns).link("lo")
        handle_of(h.netns).set_link(lo.index, up=True)
        if h.gateway is not None:
            handle_of(h.netns).replace_route(IPv4Network("0.0.0.0/0"), gateway=h.gateway)


DEFAULT_PORT_MTU = 1500  # a veth's MTU when none is set (Mininet's links and the kernel's default)
# What a host's NIC receives from its wire are frames no bigger than the sender's MTU: the sender's NIC cuts
# what TCP handed down as one large packet (TSO). The lab's wires are veths, which pass such a packet whole
# and check the MTU of their other end only for packets that are not one (the kernel's is_skb_forwardable),
# and a bridge forwards it whole too: a host whose link has a smaller MTU than the rest of its segment would
# still receive bulk TCP, where a NIC drops the frames (a black hole). So the cable's other end takes no
# segmentation-offloaded packet: the kernel cuts them into wire-sized frames before they cross, and those
# too big for the host are dropped as a NIC drops them.
SEGMENTATION_OFFLOADS = ("tso", "gso", "tx-udp_tnl-segmentation", "tx-udp_tnl-csum-segmentation")


def wire_sized(netns_name: str, dev: str) -> None:
    """Make `dev` send only wire-sized frames (above). One ethtool a device, for the few cables with a smaller
    MTU than their segment's (a spec's `link.mtu`, a `link-mtu` fault): not a hot path."""
    argv = ["ip", "netns", "exec", netns_name, "ethtool", "-K", dev,
            *(word for feature in SEGMENTATION_OFFLOADS for word in (feature, "off"))]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=10)
    if proc.returncode != 0:
        raise ApplyError(f"{' '.join(argv)} failed: {proc.stdout.strip() or f'exit {proc.returncode}'}")


def tc_params(spec: LinkSpec) -> dict:
    """Mininet TCLink parameters for a link's shaping and impairment. TCLink configures both ends of the
    veth pair alike, each shaping what it sends: HTB (`bw`) at the root and, under it, a netem qdisc
    (`delay`, `jitter`, `loss`), so traffic in EACH direction gets the bandwidth, the delay and the loss:
    a 50 ms link adds 100 ms to a round trip across it, and 1 % loss drops 1 % of the packets each way."""
    params: dict = {}
    if spec.bandwidth_mbit:
        params["bw"] = spec.bandwidth_mbit
    if spec.delay_ms:
        params["delay"] = f"{spec.delay_ms * 1000:.0f}us"
        if spec.jitter_ms:
            params["jitter"] = f"{spec.jitter_ms * 1000:.0f}us"
    if spec.loss_percent:
        params["loss"] = spec.loss_percent
    return params


def require_mininet() -> None:
    if shutil.which("mnexec") is None:
        raise FeatureMissing("mnexec not found: install Debian's 'mininet' package (./install.sh does)")
    try:
        with _stdlib_distutils():
            import mininet.net  # noqa: F401
    except ImportError as exc:
        raise FeatureMissing(f"the Mininet Python module is not importable ({exc}): run ./install.sh") from exc


@contextlib.contextmanager
def _stdlib_distutils() -> Iterator[None]:
    """Mininet imports `distutils.version` (mininet/node.py). In an environment with setuptools (a venv of
    Python 3.11 has it), setuptools' distutils shim, put on the import path by its .pth file at start-up,
    answers that import with setuptools' own copy and imports all of setuptools and pkg_resources for it:
    0.12 of Mininet's 0.14 s import, in every `lab up`. Python before 3.12 has distutils in its standard
    library, which serves Mininet the same; the shim is set aside for that one import (setuptools' own
    switch for it, SETUPTOOLS_USE_DISTUTILS=stdlib, is read only at interpreter start-up)."""
    shims = [f for f in sys.meta_path if type(f).__module__ == "_distutils_hack"] \
        if sys.version_info < (3, 12) and "distutils" not in sys.modules else []
    for shim in shims:
        sys.meta_path.remove(shim)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # distutils' own notice of its removal in 3.12
            yield
    finally:
        sys.meta_path[0:0] = shims


def build(up: UnderlayPlan) -> None:
    """Create hosts, switches and links with Mininet, pin their namespaces, end Mininet's shells."""
    require_mininet()
    from mininet.link import Link as MnLink
    from mininet.link import TCIntf, TCLink
    from mininet.log import setLogLevel
    from mininet.net import Mininet
    from mininet.nodelib import LinuxBridge

    setLogLevel("critical")  # Mininet's bridge-nf warnings concern root-namespace switches, not ours
    # Mininet's one-time init raises the ROOT namespace's sysctls (socket buffers, neighbour tables) and
    # never restores them; a lab must not touch the machine's own network settings, so skip it.
    Mininet.inited = True
    TCIntf.bwParamMax = 100_000  # Mininet silently ignores rates above 1 Gbit/s; the spec allows 100
    # Mininet configures what it builds through each node's shell, a command and a read per step (`ip link
    # add`, `ifconfig up` of both ends and of lo, `brctl addif`: 250 of them, 1.1 s, at 50 nodes). The veths
    # and bridge ports are made here by netlink from inside the nodes' namespaces instead; bringing links
    # up is left to `configure`, which does it by netlink anyway. Mininet still makes the hosts and switches
    # (its shells hold their namespaces until they are pinned) and shapes links with tc (TCLink).
    handles = _ShellHandles()

    class NetlinkPair:
        @classmethod
        def makeIntfPair(cls, intfname1, intfname2, addr1=None, addr2=None, node1=None, node2=None,  # noqa: N802
                         deleteIntfs=True):  # noqa: N803 (Mininet's names)
            if node1 is None or node2 is None:  # Mininet's slow path (links made outside any node): unused here
                return super().makeIntfPair(intfname1, intfname2, addr1, addr2, node1, node2, deleteIntfs)
            fd = netns.open_fd(f"/proc/{node2.pid}/ns/net")
            try:
                handles.get(node1).add_veth(intfname1, intfname2, fd, None, mac=addr1, peer_mac=addr2)
            finally:
                os.close(fd)
            return None

    class Link(NetlinkPair, MnLink):
        pass

    class ShapedLink(NetlinkPair, TCLink):
        pass

    class Bridge(LinuxBridge):
        """LinuxBridge, started by netlink: the bridge made when the switch was (see below), its ports added."""

        def start(self, controllers):
            if self.stp:
                return super().start(controllers)
            rt = handles.get(self)
            bridge = rt.link(self.name)
            assert bridge is not None, self.name
            for intf in self.intfList():
                if self.name in intf.name:  # LinuxBridge's rule: its ports carry its name
                    port = rt.link(intf.name)
                    assert port is not None, intf.name
                    rt.set_link(port.index, master=bridge.index)
            return None

    net = Mininet(topo=None, switch=Bridge, controller=None, build=False, autoSetMacs=False,
                  autoStaticArp=False, waitConnected=False)
    net.configHosts = lambda: None  # only `ifconfig lo up` for hosts without addresses: `configure` does it
    try:
        # Mininet's shells (mnexec -n) each get a mount namespace copied from the one they start in: the
        # machine's holds a mount per pinned namespace (10,000 with a 10,000-pod lab running: 44 ms a shell,
        # 11 ms from the template), so they start from the template, and the pins are made back home.
        with netns.in_mount_template():
            switches = {}
            for i, seg in enumerate(up.segments):
                switches[seg.switch] = sw = net.addSwitch(seg.switch, inNamespace=True, dpid=str(i + 1))
                # A veth whose ifindex equals its peer's counts as a non-urgent link event, and the kernel
                # then reports its carrier up to a second late. Switch ports and hosts' eth0 would both be
                # index 2 in their fresh namespaces; the bridge, made first, takes index 2 and shifts the ports'.
                handles.get(sw).add_bridge(seg.switch, None)
            # Each node shell is three execs (mnexec, env, bash) and a prompt to wait for, then `stty`: about
            # 9 ms a node, one after the other in Mininet. From a few threads they overlap on both cores (50
            # nodes: this function 0.54 -> 0.37-0.44 s). The threads end before the block leaves the template
            # namespace, which needs this process single-threaded again.
            with ThreadPoolExecutor(max_workers=SHELL_THREADS) as pool:
                made = list(pool.map(lambda h: net.addHost(h.name, ip=None), up.hosts))
            net.hosts[:] = made  # the spec's order, not the threads' (only hosts were added here)
            hosts = {h.name: node for h, node in zip(up.hosts, made)}
            for link in up.links:
                params = tc_params(link.spec)
                cls = ShapedLink if params else Link
                if link.segment is not None:
                    net.addLink(hosts[link.host], switches[link.segment], intfName1=link.intf, intfName2=link.port,
                                cls=cls, up=None, **params)
                else:
                    assert link.peer is not None
                    net.addLink(hosts[link.host], hosts[link.peer], intfName1=link.intf, intfName2=link.peer_intf,
                                cls=cls, up=None, **params)
            net.build()
            net.start()
        for h in up.hosts:
            netns.pin_pid(h.netns, hosts[h.name].pid)
        for seg in up.segments:
            netns.pin_pid(seg.netns, switches[seg.switch].pid)
    finally:
        handles.close()
        for node in net.hosts + net.switches:
            node.terminate()


class _ShellHandles:
    """Netlink handles in the namespaces of Mininet's node shells, one per node, closed together."""

    def __init__(self) -> None:
        self._open: dict[int, Rtnl] = {}

    def get(self, node) -> Rtnl:  # node: a Mininet Node, whose shell (node.pid) holds its namespace
        if node.pid not in self._open:
            self._open[node.pid] = netns.rtnl_in(f"/proc/{node.pid}/ns/net")
        return self._open[node.pid]

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()
