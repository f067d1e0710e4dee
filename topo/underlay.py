"""The physical side of the lab: Kubernetes nodes as Mininet hosts on one Mininet LinuxBridge switch.

Mininet builds what a datacenter would have (machines with an `eth0` and an IP on a shared segment);
the lab then pins each node's namespace under /run/netns and lets Mininet's shells go, so the lab
outlives the command that built it and every later step works from the root mount namespace.

The switch itself also lives in a namespace of its own (not in the root namespace, where Mininet puts
switches by default): nothing of the lab, not even a port name, can collide with another lab or touch
the machine's real uplink, and the host's own firewall and bridge-netfilter settings never see lab
traffic.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass

from topo import netns
from topo.errors import FeatureMissing
from topo.model import NODE_IFNAME, Lab

SWITCH = "ul"  # Mininet's LinuxBridge only enslaves ports whose names contain the switch's name


@dataclass(frozen=True)
class UnderlayPlan:
    switch_netns: str
    nodes: tuple[tuple[str, str, str, str], ...]  # (node name, node netns, eth0 address/prefix, switch port)


def plan(lab: Lab) -> UnderlayPlan:
    return UnderlayPlan(
        switch_netns=lab.underlay_netns(),
        nodes=tuple((n.name, lab.node_netns(n.name), str(lab.node_interface(n)), f"{SWITCH}-eth{n.index}")
                    for n in lab.nodes),
    )


def require_mininet() -> None:
    if shutil.which("mnexec") is None:
        raise FeatureMissing("mnexec not found: install Debian's 'mininet' package (./install.sh does)")
    try:
        import mininet.net  # noqa: F401
    except ImportError as exc:
        raise FeatureMissing(f"the Mininet Python module is not importable ({exc}): run ./install.sh") from exc


def build(up: UnderlayPlan) -> list[str]:
    """Create nodes and switch with Mininet, pin their namespaces, end Mininet's shells.

    Returns the namespaces pinned, so a caller can undo a half-built lab.
    """
    require_mininet()
    from mininet.log import setLogLevel
    from mininet.net import Mininet
    from mininet.nodelib import LinuxBridge

    setLogLevel("critical")  # Mininet's bridge-nf warnings concern its root-namespace switches, not ours
    net = Mininet(topo=None, switch=LinuxBridge, controller=None, build=False, autoSetMacs=False,
                  autoStaticArp=False, waitConnected=False)
    pinned: list[str] = []
    try:
        switch = net.addSwitch(SWITCH, inNamespace=True, dpid="1")
        # A veth whose ifindex equals its peer's counts as a non-urgent link event, and the kernel then
        # reports its carrier up to a second late. Switch ports and node eth0s would both be index 2
        # in their fresh namespaces; a placeholder link taken first shifts the ports' indexes. (The
        # bridge is re-created by LinuxBridge.start.)
        switch.cmd(f"ip link add {SWITCH} type bridge")
        hosts = []
        for name, _ns, address, port in up.nodes:
            host = net.addHost(name, ip=address)
            net.addLink(host, switch, intfName1=NODE_IFNAME, intfName2=port)
            hosts.append(host)
        net.build()
        net.start()
        for host, (_name, ns, _address, _port) in zip(hosts, up.nodes):
            netns.pin_pid(ns, host.pid)
            pinned.append(ns)
        netns.pin_pid(up.switch_netns, switch.pid)
        pinned.append(up.switch_netns)
    finally:
        for node in net.hosts + net.switches:
            node.terminate()
    return pinned
