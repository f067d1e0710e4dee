"""Nodes joining a running lab (`lab apply` of a v1 Node, aws-vpc profile): the "instance" gets the subnet's
next free address as its primary one (EC2 gives a launched instance an address of its subnet), then its
namespace, its eth0 on the underlay switch, sysctls and routes are made, idempotently. A Node the subnet has
no address for stays recorded, waiting (`kubenet-lab.io/waiting` says why): on EKS the node group keeps
failing to launch it with InsufficientFreeAddressesInSubnet. Every `lab apply`/`lab delete` runs `join`, so
a freed address, or a command killed halfway, converges on the next one.
"""
from __future__ import annotations

import contextlib
from ipaddress import IPv4Interface

from apiserver import state
from apiserver.desired import current_lab
from cni.vpc_ipamd import SUBNET_FULL
from cni.vpc_spec import IP_ANNOTATION, WAITING_ANNOTATION
from kubelet.pods import ipamd_file
from lab.plan import HOST_SYSCTLS
from topo import crash, names, netns
from topo.model import NODE_IFNAME, Lab
from topo.rtnl import NetlinkError
from topo.underlay import FLAT_SWITCH


def join(st: state.LabState) -> list[str]:
    """Give every waiting Node an address if the subnet has one (recorded before the kernel is touched), then
    make sure every joined node exists in the kernel. Returns report lines."""
    report = []
    waiting = [o for o in st.objects if o.get("kind") == "Node"
               and not (o["metadata"].get("annotations") or {}).get(IP_ANNOTATION)]
    if waiting:
        lab = current_lab(st)
        books = ipamd_file(lab).read()
        assert lab.underlay.subnet is not None
        free = books.free(lab.underlay.subnet)
        for obj in waiting:
            notes = obj["metadata"].setdefault("annotations", {})
            if not free:
                why = f"{SUBNET_FULL}: subnet {lab.underlay.subnet} has no free address for the instance's primary ENI"
                notes[WAITING_ANNOTATION] = why
                report.append(f"node {obj['metadata']['name']} cannot join: {why}")
                continue
            notes[IP_ANNOTATION] = str(free.pop(0))
            notes.pop(WAITING_ANNOTATION, None)
        st.record()
        crash.point("node-recorded")
    lab = current_lab(st)
    joined = {o["metadata"]["name"] for o in st.objects if o.get("kind") == "Node"}
    for node in lab.nodes:
        if node.name in joined and _ensure(lab, node.name):
            report.append(f"node {node.name} joined ({node.instance_type}, {node.ip}, max pods {node.max_pods})")
    if joined:
        with ipamd_file(lab).locked() as books:  # its ipamd starts: the primary ENI and the warm pool
            for name in joined:
                if name in books.nodes:
                    books.top_up(books.nodes[name])
    return report


def _ensure(lab: Lab, name: str) -> bool:
    """The node's namespace, eth0 on the flat underlay switch, addresses, sysctls and service route; True
    when something had to be made."""
    node = lab.node(name)
    ns = lab.node_netns(name)
    made = False
    if not netns.exists(ns):
        netns.create(ns)
        made = True
    crash.point("node-netns")
    switch_ns = names.underlay_netns(lab.name, FLAT_SWITCH)
    # not ul-ethN (external hosts' ports are numbered after the spec's nodes): one name per node, whatever joins
    port = f"{FLAT_SWITCH}-{names.short_hash(lab.name, name, length=8)}"
    with netns.rtnl_in(ns) as host:
        if host.link(NODE_IFNAME) is None:
            fd = netns.open_fd(switch_ns)
            try:
                with contextlib.suppress(NetlinkError):  # a port left by a killed run goes with a retry below
                    with netns.rtnl_in(switch_ns) as sw:
                        stale = sw.link(port)
                        if stale is not None:
                            sw.del_link(stale.index)
                host.add_veth(NODE_IFNAME, port, fd, node.link.mtu or lab.network.mtu)
            finally:
                import os

                os.close(fd)
            made = True
        eth0 = host.link(NODE_IFNAME)
        assert eth0 is not None
        host.add_addr(eth0.index, IPv4Interface(f"{node.ip}/{lab.underlay.subnet.prefixlen}"))  # type: ignore
        host.set_link(eth0.index, up=True)
        lo = host.link("lo")
        if lo is not None and not lo.up:
            host.set_link(lo.index, up=True)
        host.replace_route(lab.cluster.service_cidr, oif=eth0.index)
        if lab.vpc.custom_network is not None:
            host.replace_route(lab.vpc.custom_network, oif=eth0.index)
    with netns.rtnl_in(switch_ns) as sw:
        bridge, link = sw.link(FLAT_SWITCH), sw.link(port)
        assert bridge is not None and link is not None
        if link.master != bridge.index or not link.up:
            sw.set_link(link.index, up=True, master=bridge.index)
    with netns.entered(ns):
        for key, value in HOST_SYSCTLS + ((f"net/ipv4/neigh/{NODE_IFNAME}/proxy_delay", "0"),):
            with open(f"/proc/sys/{key}", "w") as fh:
                fh.write(value)
    return made
