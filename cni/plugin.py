"""The lab's CNI plugin: bridge + host-local semantics, behind the CNI spec's ADD / CHECK / DEL.

Kubelet wires a pod by handing a CNI plugin a network config and the pod's namespace; the plugin answers
with a result (interfaces, ips, routes). This module is that plugin, called in-process by the lab for
speed (one netlink handle per node, no process per pod) and by `cni/main.py` when driven as an
executable like the reference plugins. It always runs in the node's namespace (the CNI "host" side).
"""
from __future__ import annotations

import contextlib
import errno
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
from topo.rtnl import (LOOPBACK_IFINDEX, Link, NetlinkError, Rtnl, add_addr_msg, get_link_msg, parse_link_reply,
                       replace_route_msg, set_link_msg)
from topo.errors import ApplyError, LabError

CNI_VERSION = "1.1.0"  # the newest version spoken: VERSION's cniVersion, error objects
# CNI SPEC.md "Version considerations": a result is written in the config's cniVersion; 1.0.0 and 1.1.0
# results have the same shape, 1.1.0 adds the STATUS and GC verbs ("CNI operations").
SUPPORTED_VERSIONS = ("1.0.0", "1.1.0")
PLUGIN_TYPE = "kubenet-bridge"
VALID_ATTACHMENTS = "cni.dev/valid-attachments"  # CNI 1.1.0 GC: the attachments the runtime still uses


def gateway_mac(ip: IPv4Address) -> str:
    """cni0's MAC: 0a:58 and the gateway's IPv4 address, the locally administered "hardware address from
    IP" scheme the CNI plugins and kubenet used for pod interfaces (unique per node, stable across runs)."""
    return "0a:58:" + ":".join(f"{b:02x}" for b in ip.packed)
CHECK_FAILED = 100  # the spec leaves codes 100+ to plugins; 11 ("try again later") is for transient trouble
# CNI SPEC.md "Error" well-known codes used here: 1 incompatible version, 3 container unknown or does not exist
# (nothing to clean up, retrying will not help), 4 invalid necessary environment variables (the message names
# them), 6 failed to decode content, 7 invalid network config, 11 try again later, 50 plugin not available
# (1.1.0, STATUS). 999 is what libcni's skel reports for a plain plugin error (the reference plugins' "already
# exists"), in the plugin-specific range (100+).
CONTAINER_UNKNOWN, INVALID_ENV, NOT_AVAILABLE, PLUGIN_ERROR = 3, 4, 50, 999


def ifname_problem(name: str) -> str | None:
    """Why `name` cannot be CNI_IFNAME, or None. CNI SPEC.md "Parameters": CNI_IFNAME must be a valid Linux
    interface name (the reference skel's rule: not empty, at most 15 characters (IFNAMSIZ - 1), not `.` or
    `..`, no `/`, `:` or whitespace)."""
    if not name:
        return "interface name is empty"
    if len(name) > names.IFNAMSIZ:
        return f"interface name {name!r} is too long ({len(name)} characters; at most {names.IFNAMSIZ})"
    if name in (".", ".."):
        return f"interface name {name!r} is . or .."
    if any(c == "/" or c == ":" or c.isspace() for c in name):
        return f"interface name {name!r} contains / or : or whitespace characters"
    return None


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
    cni_version: str = "1.0.0"  # the config's cniVersion: results are written in it
    # "bridge" (cni0, Flannel and Calico profiles) or "cilium" (routed lxc veths, cilium_host: cni/lxc.py)
    mode: str = "bridge"

    @property
    def gateway(self) -> IPv4Interface:
        return gateway_of(self.subnet)

    def lease_file(self) -> LeaseFile:
        return LeaseFile(Path(self.data_dir) / f"{self.node}.json", self.node, self.subnet)

    def to_json(self) -> dict[str, Any]:
        return {
            "cniVersion": self.cni_version, "name": self.name, "type": PLUGIN_TYPE, "bridge": self.bridge,
            "isGateway": True, "hairpinMode": self.hairpin, "mtu": self.mtu, "mode": self.mode,
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
                       hairpin=bool(data.get("hairpinMode", True)), name=str(data.get("name", "kubenet")),
                       mode=str(data.get("mode", "bridge")),
                       cni_version=str(data["cniVersion"]))
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
    host_prefix: str = "veth"  # the node-side veth's name prefix: "lxc" in the cilium profile

    @property
    def pod(self) -> str:
        return f"{self.pod_namespace}/{self.pod_name}" if self.pod_name else ""

    @property
    def host_ifname(self) -> str:
        """Derived from the sandbox (container id), not the pod: a recreated sandbox of the same pod
        gets its own veth, and a late DEL of the old one cannot touch the new one's."""
        return names.host_veth(self.container_id, self.ifname, self.host_prefix)


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
        self._bridge: Link | None = None  # cached by _bridge_link once its MAC is known to be fixed
        # Set by `lab up`, which makes each pod's namespace (and the node) moments before its ADD: no interface
        # can exist there yet, so ADD skips looking (two lookups and a namespace switch a pod); should a name be
        # taken after all, the veth's exclusive creation fails and ADD refuses as it would have.
        self.new_sandboxes = False

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
        """Wire a pod; a failed ADD undoes what it made.

        CNI SPEC.md 1.0.0 "ADD: Add container to network": "If an interface of the requested name already
        exists in the container, the CNI plugin MUST return with an error." So ADD is not idempotent: a
        second ADD of the same attachment fails (as the reference `bridge` plugin: "container veth name
        provided (eth0) already exists") and leaves the first one working. A namespace that does not exist
        is code 3 (container unknown: nothing to clean up, and retrying will not make it appear)."""
        problem = ifname_problem(args.ifname)
        if problem:
            raise CniError(INVALID_ENV, f"invalid CNI_IFNAME: {problem}")
        if not self.new_sandboxes:
            self._refuse_existing(args)
        bridge = self.ensure_bridge()
        with self.ipam() as ipam:
            leased_before = ipam.lookup(args.container_id, args.ifname) is not None
            cursor = ipam.last_reserved
            address = ipam.allocate(args.container_id, args.ifname, args.pod)
        try:
            return self._wire(args, bridge, address)
        except Exception as exc:
            if isinstance(exc, NetlinkError) and exc.errno == errno.EEXIST:  # only the veth is made exclusively
                if not leased_before:  # a name is taken: nothing was made, and the links there are not ours
                    with self.ipam() as ipam:  # as if never asked (a refusal before IPAM moves no cursor)
                        ipam.release(args.container_id, args.ifname)
                        ipam.last_reserved = cursor
                self._refuse_existing(args)  # says which, as the reference plugin does
                raise ApplyError(f"CNI ADD for {args.pod or args.container_id} failed: {exc}") from exc
            self._unwire(args)
            with self.ipam() as ipam:
                ipam.release(args.container_id, args.ifname)
            if isinstance(exc, LabError):
                raise
            raise ApplyError(f"CNI ADD for {args.pod or args.container_id} failed: {exc}") from exc

    def _refuse_existing(self, args: CniArgs) -> None:
        try:
            pod = netns.rtnl_in(args.netns)
        except OSError as exc:
            raise CniError(CONTAINER_UNKNOWN, f"CNI_NETNS {args.netns}: no such network namespace",
                           f"{type(exc).__name__}: {exc.strerror or exc}") from exc
        with pod:
            if pod.link(args.ifname) is not None:
                raise CniError(PLUGIN_ERROR, f"container veth name provided ({args.ifname}) already exists")
        if self.host.link(args.host_ifname) is not None:
            raise CniError(PLUGIN_ERROR, f"host veth name {args.host_ifname} for container {args.container_id} "
                                         f"interface {args.ifname} already exists")

    def _wire(self, args: CniArgs, bridge: int, address: IPv4Interface) -> dict[str, Any]:
        """The veth (node end up and on the bridge from the start, its index and MAC from the kernel's echo),
        hairpin, then the pod's side in one batch: its end and lo up (lo is index 1 in every namespace), the
        address, the default route, and a look at its end for the result. Three round trips a pod (five with
        the checks in `add`) instead of sixteen (a thousand pods spent 1.2 s in 16,000 netlink requests)."""
        host_if = args.host_ifname
        fd = netns.open_fd(args.netns)
        try:
            host_link = self.host.add_veth(host_if, args.ifname, fd, self.conf.mtu, master=bridge, up=True)
        finally:
            os.close(fd)
        if self.conf.hairpin:
            self.host.set_hairpin(host_link.index)
        peer = host_link.peer_index
        with netns.rtnl_in(args.netns) as pod:
            if peer is None:  # no IFLA_LINK in the echo: look the pod's end up by name
                found = pod.link(args.ifname)
                peer = found.index if found is not None else 0
            up, _lo, addr, route, got = pod.batch([
                set_link_msg(peer, up=True), set_link_msg(LOOPBACK_IFINDEX, up=True), add_addr_msg(peer, address),
                replace_route_msg(IPv4Network("0.0.0.0/0"), gateway=self.conf.gateway.ip), get_link_msg(index=peer)])
            pod_link = None if isinstance(got, NetlinkError) else parse_link_reply(got)
            if pod_link is None or pod_link.name != args.ifname:
                raise ApplyError(f"{host_if} was made but {args.ifname} is not in {args.netns}")
            for result in (up, _lo, route):
                if isinstance(result, NetlinkError):
                    raise result
            if isinstance(addr, NetlinkError) and addr.errno != errno.EEXIST:
                raise addr
        return self._result(args, address, self._bridge_link(), host_link, pod_link)

    def _bridge_link(self) -> Link | None:
        """The bridge as the result reports it. Its MAC is fixed when this plugin made it (or found it with the
        address it would have given it), so it is looked up once; a bridge made elsewhere is looked up each time
        (without a fixed MAC its address follows its ports)."""
        if self._bridge is not None:
            return self._bridge
        bridge = self.host.link(self.conf.bridge)
        if bridge is not None and bridge.mac == gateway_mac(self.conf.gateway.ip):
            self._bridge = bridge
        return bridge

    def _result(self, args: CniArgs, address: IPv4Interface, bridge: Link | None, host: Link, pod: Link
                ) -> dict[str, Any]:
        return {
            "cniVersion": self.conf.cni_version,
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

    # ---- STATUS and GC (CNI 1.1.0) -----------------------------------------------------------
    def status(self) -> None:
        """CNI SPEC.md 1.1.0 "STATUS: Check plugin status": succeed when the plugin could serve an ADD now,
        else error 50 ("the plugin is not available, i.e. cannot service ADD requests"): the lease store
        cannot be read or written, or every address of the PodCIDR is leased. Changes nothing."""
        lease_file = self.conf.lease_file()
        folder = lease_file.path.parent
        if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
            raise CniError(NOT_AVAILABLE, "plugin not available", f"IPAM data directory {folder} is not writable")
        try:
            ipam = lease_file.read()
        except (OSError, ValueError, KeyError) as exc:
            raise CniError(NOT_AVAILABLE, "plugin not available", f"IPAM leases {lease_file.path}: {exc}") from exc
        if len(ipam.leases) >= ipam.capacity:
            raise CniError(NOT_AVAILABLE, "plugin not available",
                           f"PodCIDR {self.conf.subnet} is full: all {ipam.capacity} pod IPs are leased")

    def gc(self, valid: Any) -> list[tuple[str, str]]:
        """CNI SPEC.md 1.1.0 "GC: Clean up any stale resources": release every lease of this network whose
        attachment (container id, interface name) is not in `cni.dev/valid-attachments`, and delete its
        node-side veth (which takes the pod end with it); nothing else is touched. Returns what was
        removed."""
        if not isinstance(valid, list) or not all(
                isinstance(a, dict) and isinstance(a.get("containerID"), str) and isinstance(a.get("ifname"), str)
                for a in valid):
            raise CniError(7, f"GC needs {VALID_ATTACHMENTS}: a list of {{containerID, ifname}} objects")
        keep = {(a["containerID"], a["ifname"]) for a in valid}
        with self.ipam() as ipam:
            stale = [(lease.container_id, lease.ifname) for lease in ipam.leases.values()
                     if (lease.container_id, lease.ifname) not in keep]
            for container_id, ifname in stale:
                ipam.release(container_id, ifname)
        for container_id, ifname in stale:
            self._unwire(CniArgs(container_id, "", ifname))
        return stale

    # ---- CHECK -------------------------------------------------------------------------------
    def _leased_as(self, args: CniArgs, prev_result: dict[str, Any] | None) -> IPv4Interface:
        """CHECK's first step for every wiring: prevResult's address, which IPAM must still lease to the
        container (CNI SPEC 1.0.0, CHECK: code 7 for an unusable prevResult)."""
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
        return want

    def check(self, args: CniArgs, prev_result: dict[str, Any] | None) -> None:
        """Verify the pod is still wired as `prev_result` says; raise CniError naming what differs."""
        want = self._leased_as(args, prev_result)
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


def routed_veth(host: Rtnl, args: CniArgs, mtu: int, ip: IPv4Address, gateway: IPv4Address,
                pin_gateway: bool = False) -> tuple[Link, Link]:
    """A pod wired by a routed veth, as Cilium wires its lxc devices and the Amazon VPC CNI its pods: no
    bridge; the pod holds `ip`/32 with an on-link route to `gateway` and a default route via it, and the
    node routes `ip`/32 to the host end. `pin_gateway`: also a static neighbour entry for the gateway at the
    host end's MAC (the VPC CNI's). Returns (host end, pod end)."""
    fd = netns.open_fd(args.netns)
    try:
        host.add_veth(args.host_ifname, args.ifname, fd, mtu)
    finally:
        os.close(fd)
    host_link = host.link(args.host_ifname)
    assert host_link is not None
    host.set_link(host_link.index, up=True)
    with netns.rtnl_in(args.netns) as pod:
        pod_link = pod.link(args.ifname)
        if pod_link is None:
            raise ApplyError(f"{args.host_ifname} was made but {args.ifname} is not in {args.netns}")
        pod.set_link(pod_link.index, up=True)
        lo = pod.link("lo")
        if lo is not None and not lo.up:
            pod.set_link(lo.index, up=True)
        pod.add_addr(pod_link.index, IPv4Interface(f"{ip}/32"))
        pod.replace_route(IPv4Network(f"{gateway}/32"), oif=pod_link.index)
        pod.replace_route(IPv4Network("0.0.0.0/0"), gateway=gateway, oif=pod_link.index)
        if pin_gateway:
            pod.replace_neigh(pod_link.index, gateway, host_link.mac)
    host.replace_route(IPv4Network(f"{ip}/32"), oif=host_link.index)
    return host_link, pod_link
