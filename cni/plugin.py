"""The lab's CNI plugin: bridge + host-local semantics, behind the CNI spec's ADD / CHECK / DEL.

Kubelet wires a pod by handing a CNI plugin a network config and the pod's namespace; the plugin answers
with a result (interfaces, ips, routes). This module is that plugin, called in-process by the lab for
speed (one netlink handle per node, no process per pod) and by `cni/main.py` when driven as an
executable like the reference plugins. It always runs in the node's namespace (the CNI "host" side).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from cni.ipam import LeaseFile, NodeIpam
from topo import names, netns
from topo.model import gateway_of
from topo.rtnl import Link, NetlinkError, Rtnl
from topo.errors import ApplyError, LabError

CNI_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("1.0.0",)  # results are written in 1.0.0's format only
PLUGIN_TYPE = "kubenet-bridge"


def gateway_mac(ip: IPv4Address) -> str:
    """cni0's MAC: 0a:58 and the gateway's IPv4 address, the locally administered "hardware address from
    IP" scheme the CNI plugins and kubenet used for pod interfaces (unique per node, stable across runs)."""
    return "0a:58:" + ":".join(f"{b:02x}" for b in ip.packed)
CHECK_FAILED = 100  # the spec leaves codes 100+ to plugins; 11 ("try again later") is for transient trouble


class CniError(LabError):
    """A CNI operation failed; `code` is the CNI spec's error code (7 = invalid config, 11 = try later)."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def to_json(self) -> dict[str, Any]:
        return {"cniVersion": CNI_VERSION, "code": self.code, "msg": self.msg, "details": self.details}


@dataclass(frozen=True)
class NetConf:
    """The network configuration a node's kubelet would read from /etc/cni/net.d."""

    node: str
    subnet: IPv4Network  # the node's PodCIDR
    data_dir: str  # where host-local keeps leases
    bridge: str = "cni0"
    mtu: int = 1500
    hairpin: bool = True  # Flannel's default bridge config sets hairpinMode, so a pod reaches itself via its service
    name: str = "kubenet"

    @property
    def gateway(self) -> IPv4Interface:
        return gateway_of(self.subnet)

    def lease_file(self) -> LeaseFile:
        return LeaseFile(Path(self.data_dir) / f"{self.node}.json", self.node, self.subnet)

    def to_json(self) -> dict[str, Any]:
        return {
            "cniVersion": CNI_VERSION, "name": self.name, "type": PLUGIN_TYPE, "bridge": self.bridge,
            "isGateway": True, "hairpinMode": self.hairpin, "mtu": self.mtu,
            "ipam": {"type": "host-local", "subnet": str(self.subnet), "gateway": str(self.gateway.ip),
                     "dataDir": self.data_dir, "node": self.node},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetConf:
        try:
            if data.get("cniVersion") not in SUPPORTED_VERSIONS:
                raise CniError(1, f"incompatible CNI version {data.get('cniVersion')!r}",
                               f"supported: {', '.join(SUPPORTED_VERSIONS)}")
            ipam = data["ipam"]
            conf = cls(node=str(ipam["node"]), subnet=IPv4Network(ipam["subnet"]), data_dir=str(ipam["dataDir"]),
                       bridge=str(data.get("bridge", "cni0")), mtu=int(data.get("mtu", 1500)),
                       hairpin=bool(data.get("hairpinMode", True)), name=str(data.get("name", "kubenet")))
        except CniError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CniError(7, "invalid network configuration", f"{type(exc).__name__}: {exc}") from exc
        if not names.is_dns_label(conf.node) or len(conf.bridge) > names.IFNAMSIZ:
            raise CniError(7, "invalid network configuration", "bad node or bridge name")
        return conf


@dataclass(frozen=True)
class CniArgs:
    container_id: str
    netns: str  # path of the pod's network namespace
    ifname: str = "eth0"
    pod_namespace: str = ""
    pod_name: str = ""

    @property
    def pod(self) -> str:
        return f"{self.pod_namespace}/{self.pod_name}" if self.pod_name else ""

    @property
    def host_ifname(self) -> str:
        """Derived from the sandbox (container id), not the pod: a recreated sandbox of the same pod
        gets its own veth, and a late DEL of the old one cannot touch the new one's."""
        return names.host_veth(self.container_id, self.ifname)


IpamSession = Callable[[], AbstractContextManager[NodeIpam]]


class BridgePlugin:
    """One node's plugin instance. `host` is a netlink handle (`topo.rtnl.Rtnl`) in the node namespace.

    `ipam` opens a lease session: by default the node's lease file under a lock; `lab up` passes an
    in-memory one and writes the file once at the end.
    """

    def __init__(self, conf: NetConf, host: Rtnl, ipam: IpamSession | None = None) -> None:
        self.conf = conf
        self.host = host
        self.ipam = ipam or conf.lease_file().locked
        self._bridge_index: int | None = None

    # ---- the bridge --------------------------------------------------------------------------
    def ensure_bridge(self) -> int:
        """cni0 holds the gateway address of the PodCIDR; created on first use, as the bridge plugin does."""
        if self._bridge_index is not None:
            return self._bridge_index
        bridge = self.host.link(self.conf.bridge)
        if bridge is None:
            # A fixed MAC: a bridge without one takes the lowest MAC of its ports, so deleting a pod could
            # change the gateway's MAC under the node's other pods and cut them off until their neighbour
            # entries age out (kubernetes#30783, flannel#1381; the reference bridge plugin pins it too).
            self.host.add_bridge(self.conf.bridge, self.conf.mtu, mac=gateway_mac(self.conf.gateway.ip))
            bridge = self.host.link(self.conf.bridge)
        assert bridge is not None
        self.host.add_addr(bridge.index, self.conf.gateway)
        if not bridge.up or bridge.mtu != self.conf.mtu:
            self.host.set_link(bridge.index, up=True, mtu=self.conf.mtu)
        self._bridge_index = bridge.index
        return bridge.index

    # ---- ADD ---------------------------------------------------------------------------------
    def add(self, args: CniArgs) -> dict[str, Any]:
        """Wire a pod. Repeating ADD for a wired pod returns the same result; a failed ADD undoes itself."""
        bridge = self.ensure_bridge()
        with self.ipam() as ipam:
            address = ipam.allocate(args.container_id, args.ifname, args.pod)
        created = self.host.link(args.host_ifname) is None
        try:
            return self._wire(args, bridge, address)
        except Exception as exc:
            if created:  # undo only what this call made, never a veth an earlier ADD left working
                self._unwire(args)
                with self.ipam() as ipam:
                    ipam.release(args.container_id, args.ifname)
            if isinstance(exc, LabError):
                raise
            raise ApplyError(f"CNI ADD for {args.pod or args.container_id} failed: {exc}") from exc

    def _wire(self, args: CniArgs, bridge: int, address: IPv4Interface) -> dict[str, Any]:
        host_if = args.host_ifname
        host_link = self.host.link(host_if)
        if host_link is None:
            fd = netns.open_fd(args.netns)
            try:
                self.host.add_veth(host_if, args.ifname, fd, self.conf.mtu, master=bridge)
            finally:
                os.close(fd)
            host_link = self.host.link(host_if)
            assert host_link is not None
            self.host.set_link(host_link.index, up=True)
        elif host_link.master != bridge or not host_link.up:
            self.host.set_link(host_link.index, up=True, master=bridge)
        if self.conf.hairpin:
            self.host.set_hairpin(host_link.index)
        with netns.rtnl_in(args.netns) as pod:
            pod_link = pod.link(args.ifname)
            if pod_link is None:
                raise ApplyError(f"{host_if} exists but {args.ifname} is not in {args.netns}")
            if not pod_link.up:
                pod.set_link(pod_link.index, up=True)
            lo = pod.link("lo")
            if lo is not None and not lo.up:
                pod.set_link(lo.index, up=True)
            pod.add_addr(pod_link.index, address)
            pod.replace_route(IPv4Network("0.0.0.0/0"), gateway=self.conf.gateway.ip)
        return self._result(args, address, self.host.link(self.conf.bridge), host_link, pod_link)

    def _result(self, args: CniArgs, address: IPv4Interface, bridge: Link | None, host: Link, pod: Link
                ) -> dict[str, Any]:
        return {
            "cniVersion": CNI_VERSION,
            "interfaces": [
                {"name": self.conf.bridge, "mac": bridge.mac if bridge else ""},
                {"name": args.host_ifname, "mac": host.mac},
                {"name": args.ifname, "mac": pod.mac, "sandbox": args.netns},
            ],
            "ips": [{"address": str(address), "gateway": str(self.conf.gateway.ip), "interface": 2}],
            "routes": [{"dst": "0.0.0.0/0", "gw": str(self.conf.gateway.ip)}],
            "dns": {},
        }

    # ---- DEL ---------------------------------------------------------------------------------
    def delete(self, args: CniArgs) -> None:
        """Unwire a pod. Whatever is already gone (veth, namespace, lease, the lease file) is not an error."""
        self._unwire(args)
        if self.ipam == self.conf.lease_file().locked and not self.conf.lease_file().path.exists():
            return  # nothing was ever leased here: do not create lease files (e.g. after `lab down`)
        with self.ipam() as ipam:
            ipam.release(args.container_id, args.ifname)

    def _unwire(self, args: CniArgs) -> None:
        link = self.host.link(args.host_ifname)
        if link is not None:
            with contextlib.suppress(NetlinkError):
                self.host.del_link(link.index)

    # ---- CHECK -------------------------------------------------------------------------------
    def check(self, args: CniArgs, prev_result: dict[str, Any] | None) -> None:
        """Verify the pod is still wired as `prev_result` says; raise CniError naming what differs."""
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
        host = self.host.link(args.host_ifname)
        bridge = self.host.link(self.conf.bridge)
        if host is None or bridge is None or host.master != bridge.index:
            raise CniError(CHECK_FAILED, f"{args.host_ifname} is missing or not attached to {self.conf.bridge}")
        try:
            pod = netns.rtnl_in(args.netns)
        except OSError as exc:
            raise CniError(CHECK_FAILED, f"pod namespace {args.netns} is gone") from exc
        with pod:
            link = pod.link(args.ifname)
            if link is None:
                raise CniError(CHECK_FAILED, f"{args.ifname} is missing in {args.netns}")
            if want not in [a for _i, a in pod.addrs(link.index)]:
                raise CniError(CHECK_FAILED, f"{args.ifname} in {args.netns} does not hold {want}")
            gw = self.conf.gateway.ip
            if not any(r.dst.prefixlen == 0 and r.gateway == gw for r in pod.routes()):
                raise CniError(CHECK_FAILED, f"no default route via {gw} in {args.netns}")


@contextlib.contextmanager
def memory_session(ipam: NodeIpam) -> Iterator[NodeIpam]:
    yield ipam
