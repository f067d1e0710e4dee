"""The aws-vpc profile's CNI plugin: a pod gets an address of the VPC subnet from ipamd's warm pool
(`cni.vpc_ipamd`) and is routed, not bridged, the way the Amazon VPC CNI wires it:

- in the pod: the address as a /32 on eth0, a link route to 169.254.1.1, the default route via 169.254.1.1,
  and a permanent ARP entry for 169.254.1.1 pointing at the host veth (the VPC CNI's fixed gateway trick);
- on the node: the host veth (no address, no bridge), a route `POD/32 dev VETH scope link`, and a neighbour
  proxy entry for the pod IP on the node's underlay interface (eth0).

That last one is the lab's stand-in for the VPC fabric knowing which ENI holds which secondary address: other
nodes, routers and hosts of the subnet ARP for the pod IP and the node answers for it, so the underlay delivers
pod traffic with no overlay and no per-node pod routes. A proxy entry per pod was chosen over `proxy_arp` on
eth0, which would answer for every address the node routes elsewhere (docs/vpc-ipam.md has the measurement).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from cni.plugin import CONTAINER_UNKNOWN, INVALID_ENV, PLUGIN_ERROR, CniArgs, CniError, ifname_problem, routed_veth
from cni.vpc_ipamd import Ipamd, IpamdExhausted
from topo import netns
from topo.errors import ApplyError, LabError
from topo.model import NODE_IFNAME
from topo.rtnl import NetlinkError, Rtnl

GATEWAY = IPv4Address("169.254.1.1")  # the VPC CNI's link-local gateway inside every pod
TRY_AGAIN = 11  # CNI "try again later": kubelet retries the sandbox, the pod stays ContainerCreating

IpamdSession = Callable[[], AbstractContextManager[Ipamd]]


class VpcPlugin:
    """One node's plugin instance (`host`: a netlink handle in the node namespace); `ipam` opens ipamd's books."""

    def __init__(self, node: str, host: Rtnl, ipam: IpamdSession, mtu: int = 1500) -> None:
        self.node = node
        self.host = host
        self.ipam = ipam
        self.mtu = mtu
        self._eth0: int | None = None

    def ensure_bridge(self) -> int:
        """No bridge: the node's underlay interface is what the plugin needs (answering ARP on it at once)."""
        if self._eth0 is None:
            link = self.host.link(NODE_IFNAME)
            if link is None:
                raise ApplyError(f"node {self.node} has no {NODE_IFNAME}")
            self._eth0 = link.index
        return self._eth0

    def add(self, args: CniArgs) -> dict[str, Any]:
        problem = ifname_problem(args.ifname)
        if problem:
            raise CniError(INVALID_ENV, f"invalid CNI_IFNAME: {problem}")
        try:
            with netns.rtnl_in(args.netns) as pod:
                if pod.link(args.ifname) is not None:
                    raise CniError(PLUGIN_ERROR, f"container veth name provided ({args.ifname}) already exists")
        except OSError as exc:
            raise CniError(CONTAINER_UNKNOWN, f"CNI_NETNS {args.netns}: no such network namespace") from exc
        eth0 = self.ensure_bridge()
        try:
            with self.ipam() as ipamd:
                ip = ipamd.assign(self.node, args.container_id)
        except IpamdExhausted as exc:
            # The VPC CNI answers ADD with this message; kubelet reports FailedCreatePodSandBox and retries.
            raise VpcAssignError(exc) from exc
        try:
            return self._wire(args, eth0, ip)
        except Exception as exc:
            self._unwire(args, ip)
            with self.ipam() as ipamd:
                ipamd.release(self.node, args.container_id)
            if isinstance(exc, LabError):
                raise
            raise ApplyError(f"CNI ADD for {args.pod or args.container_id} failed: {exc}") from exc

    def _wire(self, args: CniArgs, eth0: int, ip: IPv4Address) -> dict[str, Any]:
        host_if = args.host_ifname
        host_link, pod_link = routed_veth(self.host, args, self.mtu, ip, GATEWAY, pin_gateway=True)
        address = IPv4Interface(f"{ip}/32")
        self.host.add_proxy_neigh(eth0, ip)
        return {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": host_if, "mac": host_link.mac},
                           {"name": args.ifname, "mac": pod_link.mac, "sandbox": args.netns}],
            "ips": [{"address": str(address), "gateway": str(GATEWAY), "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": str(GATEWAY)}],
            "dns": {},
        }

    def delete(self, args: CniArgs) -> None:
        """Unwire a pod and give its address back to the warm pool; what is gone already is not an error."""
        with self.ipam() as ipamd:
            ip = ipamd.release(self.node, args.container_id)
        self._unwire(args, ip)

    def _unwire(self, args: CniArgs, ip: IPv4Address | None) -> None:
        link = self.host.link(args.host_ifname)
        if link is not None:
            with contextlib.suppress(NetlinkError):
                self.host.del_link(link.index)
        if ip is not None:
            with contextlib.suppress(NetlinkError, ApplyError):
                self.host.del_proxy_neigh(self.ensure_bridge(), ip)


class VpcAssignError(CniError):
    """CNI ADD without an address: the Amazon VPC CNI's "failed to assign an IP address to container"."""

    def __init__(self, exc: IpamdExhausted) -> None:
        super().__init__(TRY_AGAIN, str(exc), exc.why)
        self.why = exc.why


@contextlib.contextmanager
def memory_session(ipamd: Ipamd) -> Iterator[Ipamd]:
    yield ipamd
