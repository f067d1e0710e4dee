"""The CNI plugin of the cilium profile: pods wired the way Cilium wires them, routed, with no bridge.

Each pod's node-side veth is `lxc` + 8 hex digits of its sandbox id (Cilium: `lxc` + a hash of the
endpoint); it has no address and belongs to no bridge. The node holds one /32 route per local pod
(`10.244.1.5 dev lxc1a2b3c4d scope link`), and the router address the pods use as their gateway sits on
`cilium_host`, one end of the node's `cilium_host`/`cilium_net` veth pair (Cilium allocates that address
from the PodCIDR too; here it is the PodCIDR's `.1`, which IPAM already keeps back). A pod holds its
address as a /32, a link route to the router and a default route through it; the node answers the pod's
ARP for the router on the lxc veth because the router address is one of its own (Linux answers ARP for
any local address on any interface). Cilium answers that ARP from its BPF program instead: same reply,
one program fewer here (docs/cilium.md lists the simplifications).
"""
from __future__ import annotations

import contextlib
import os
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from cni.plugin import CHECK_FAILED, BridgePlugin, CniArgs, CniError
from topo import netns
from topo.errors import ApplyError
from topo.rtnl import NetlinkError

CILIUM_HOST, CILIUM_NET = "cilium_host", "cilium_net"
LXC_PREFIX = "lxc"
DEFAULT = IPv4Network("0.0.0.0/0")


def host32(ip: IPv4Address) -> IPv4Network:
    return IPv4Network(f"{ip}/32")


class LxcPlugin(BridgePlugin):
    """One node's plugin instance in the cilium profile (same ADD/DEL/CHECK/GC contract as the bridge's)."""

    @property
    def router(self) -> IPv4Address:
        return self.conf.gateway.ip

    def ensure_bridge(self) -> int:
        """cilium_host/cilium_net (a veth pair in the node), cilium_host holding the router address as a /32."""
        if self._bridge_index is not None:
            return self._bridge_index
        if self.host.link(CILIUM_HOST) is None:
            with contextlib.suppress(NetlinkError):  # made meanwhile by a concurrent ADD: fine
                self.host.add_veth(CILIUM_HOST, CILIUM_NET, None, self.conf.mtu)
        for name in (CILIUM_NET, CILIUM_HOST):
            link = self.host.link(name)
            if link is None:
                raise ApplyError(f"node {self.conf.node}: {name} could not be made")
            if not link.up:
                self.host.set_link(link.index, up=True)
        host = self.host.link(CILIUM_HOST)
        assert host is not None
        self.host.add_addr(host.index, IPv4Interface(f"{self.router}/32"))
        self._bridge_index = host.index
        return host.index

    def _wire(self, args: CniArgs, bridge: int, address: IPv4Interface) -> dict[str, Any]:
        host_if = args.host_ifname
        fd = netns.open_fd(args.netns)
        try:
            self.host.add_veth(host_if, args.ifname, fd, self.conf.mtu)
        finally:
            os.close(fd)
        host_link = self.host.link(host_if)
        assert host_link is not None
        self.host.set_link(host_link.index, up=True)
        pod_address = IPv4Interface(f"{address.ip}/32")
        with netns.rtnl_in(args.netns) as pod:
            pod_link = pod.link(args.ifname)
            if pod_link is None:
                raise ApplyError(f"{host_if} was made but {args.ifname} is not in {args.netns}")
            pod.set_link(pod_link.index, up=True)
            lo = pod.link("lo")
            if lo is not None and not lo.up:
                pod.set_link(lo.index, up=True)
            pod.add_addr(pod_link.index, pod_address)
            pod.replace_route(host32(self.router), oif=pod_link.index)
            pod.replace_route(DEFAULT, gateway=self.router, oif=pod_link.index)
        self.host.replace_route(host32(address.ip), oif=host_link.index)
        return {
            "cniVersion": self.conf.cni_version,
            "interfaces": [{"name": host_if, "mac": host_link.mac},
                           {"name": args.ifname, "mac": pod_link.mac, "sandbox": args.netns}],
            "ips": [{"address": str(pod_address), "gateway": str(self.router), "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": str(self.router)}],
            "dns": {},
        }

    def check(self, args: CniArgs, prev_result: dict[str, Any] | None) -> None:
        """The lease, the lxc veth, its /32 route, and the pod's address and default route."""
        if not prev_result:
            raise CniError(7, "CHECK needs prevResult")
        try:
            want = IPv4Interface(prev_result["ips"][0]["address"])
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise CniError(7, "prevResult has no usable ips[0].address") from exc
        with self.ipam() as ipam:
            leased = ipam.lookup(args.container_id, args.ifname)
        if leased != want.ip:
            raise CniError(CHECK_FAILED, f"IPAM lease of {args.container_id} is {leased}, prevResult says {want.ip}")
        link = self.host.link(args.host_ifname)
        if link is None:
            raise CniError(CHECK_FAILED, f"{args.host_ifname} is missing")
        if not any(r.dst == host32(want.ip) and r.oif == link.index for r in self.host.routes()):
            raise CniError(CHECK_FAILED, f"no route {want.ip}/32 dev {args.host_ifname} on the node")
        with netns.rtnl_in(args.netns) as pod:
            eth = pod.link(args.ifname)
            if eth is None or want not in [a for _i, a in pod.addrs(eth.index)]:
                raise CniError(CHECK_FAILED, f"{args.ifname} in {args.netns} does not hold {want}")
            if not any(r.dst.prefixlen == 0 and r.gateway == self.router for r in pod.routes()):
                raise CniError(CHECK_FAILED, f"no default route via {self.router} in {args.netns}")
