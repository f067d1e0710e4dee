"""From the validated model to the list of kernel objects a lab consists of, without touching the kernel.

The plan is where every per-pod and per-node decision (IP, interface names, routes, sysctls) is made,
so it can be unit-tested without root; `lab/apply.py` only carries it out.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

from cni import vpc_ipamd
from cni.ipam import NodeIpam
from cni.plugin import CniArgs, NetConf
from kubelet.pods import cni_args, netconf
from routing import bgp, host_gw, ipip, vxlan
from topo import underlay
from topo.model import Lab, Pod

# Set inside every node and router namespace (never in the root one). A new namespace starts with
# forwarding off, and a node that routes for its pods must forward; rp_filter off so replies on asymmetric
# paths pass. bridge-nf-call-iptables stays 1 so bridged pod-to-pod traffic meets the service rules of
# later layers.
HOST_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv4/conf/all/route_localnet", "1"),  # kube-proxy sets it: NodePorts answer on 127.0.0.1 too
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
)


# Set in every underlay switch namespace. A switch is L2 only; with bridge netfilter on (the default in a
# new namespace) the kernel would defragment and refragment IPv4 crossing the bridge, quietly rescuing
# the MTU mismatches a real switch turns into black holes.
SWITCH_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net/bridge/bridge-nf-call-iptables", "0"),
    ("net/bridge/bridge-nf-call-ip6tables", "0"),
    ("net/bridge/bridge-nf-call-arptables", "0"),
)


@dataclass(frozen=True)
class NodeOps:
    name: str
    netns: str
    netconf: NetConf
    routes: tuple[host_gw.Route, ...]  # host-gw
    vxlan: vxlan.VxlanPlan | None = None  # vxlan
    ipip: ipip.Tunnel | None = None  # ipip: tunl0 (its routes come from BGP, see routing/ipip.py)
    # A route covering the service CIDR, so connections a node itself opens to a ClusterIP get past the
    # route lookup to the DNAT rules (a real node has a default route for that; a flat lab's do not).
    service_route: IPv4Network | None = None
    vpc: bool = False  # aws-vpc profile: pods routed from eth0 (neighbour proxy), no cni0
    onlink: tuple[IPv4Network, ...] = ()  # aws-vpc custom networking: the pod subnet, reachable on eth0


@dataclass(frozen=True)
class PodOps:
    pod: Pod
    netns: str
    node: str
    args: CniArgs
    address: IPv4Interface


@dataclass(frozen=True)
class Plan:
    lab: Lab
    underlay: underlay.UnderlayPlan
    nodes: tuple[NodeOps, ...]
    pods: tuple[PodOps, ...]
    ipam: dict[str, NodeIpam]
    routers: tuple[bgp.Speaker, ...] = ()  # the fabric's BGP speakers (routed underlays)
    speakers: tuple[bgp.Speaker, ...] = ()  # the nodes' BGP speakers (backend bgp)
    ipamd: vpc_ipamd.Ipamd | None = None  # aws-vpc profile: ipamd's books, every pod's address drawn from them
    waiting: tuple[tuple[Pod, str], ...] = ()  # aws-vpc: pods no address was left for, with the CNI's message


def pod_ops(lab: Lab, pod: Pod, ipam: NodeIpam) -> PodOps:
    args = cni_args(lab, pod.namespace, pod.name)
    address = ipam.allocate(args.container_id, args.ifname, args.pod)
    return PodOps(pod=pod, netns=lab.pod_netns(pod), node=pod.node, args=args, address=address)


def build(lab: Lab, ipam_dir: Path) -> Plan:
    backend = lab.network.backend
    cilium = lab.cni.profile == "cilium"
    routes = host_gw.routes(lab) if backend == "host-gw" else []
    # cilium's tunnel is cilium_vxlan and its tunnel map (cilium/agent.py), not Flannel's flannel.1
    tunnels = {p.vtep.node: p for p in vxlan.plan(lab)} if backend == "vxlan" and not cilium else {}
    # No route for the service CIDR in the cilium profile: ClusterIPs are translated at the socket, before
    # any route lookup, and a ping to one goes nowhere.
    service_route = None if lab.underlay.routed or cilium else lab.cluster.service_cidr
    nodes = tuple(NodeOps(name=n.name, netns=lab.node_netns(n.name), netconf=netconf(lab, n.name, ipam_dir),
                          routes=tuple(r for r in routes if r.node == n.name), vxlan=tunnels.get(n.name),
                          service_route=service_route, ipip=ipip.tunnel(n) if backend == "ipip" else None)
                  for n in lab.nodes)
    ipam = {n.name: NodeIpam(n.name, n.pod_cidr) for n in lab.nodes}
    ipamd, waiting = None, []
    if lab.cni.profile == "aws-vpc":
        onlink = (lab.vpc.custom_network,) if lab.vpc.custom_network is not None else ()
        nodes = tuple(replace(n, vpc=True, onlink=onlink) for n in nodes)
        ipamd = vpc_ipamd.fresh(lab)
        pods = []
        for pod in lab.pods:
            args = cni_args(lab, pod.namespace, pod.name)
            try:
                ip = ipamd.assign(pod.node, args.container_id)
            except vpc_ipamd.IpamdExhausted as exc:
                waiting.append((pod, str(exc)))
                continue
            pods.append(PodOps(pod=pod, netns=lab.pod_netns(pod), node=pod.node, args=args,
                               address=IPv4Interface(f"{ip}/32")))
        # the CNI ADD of each planned pod finds its address already assigned to its sandbox in these books
    else:
        pods = [pod_ops(lab, pod, ipam[pod.node]) for pod in lab.pods]
    return Plan(lab=lab, underlay=underlay.plan(lab), nodes=nodes, pods=tuple(pods), ipam=ipam,
                routers=tuple(bgp.router_speakers(lab)), speakers=tuple(bgp.node_speakers(lab)),
                ipamd=ipamd, waiting=tuple(waiting))
