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
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from cni.plugin import CHECK_FAILED, BridgePlugin, CniArgs, CniError, routed_veth
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
        host_link, pod_link = routed_veth(self.host, args, self.conf.mtu, address.ip, self.router)
        pod_address = IPv4Interface(f"{address.ip}/32")
        host_if = args.host_ifname
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
        want = self._leased_as(args, prev_result)
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
