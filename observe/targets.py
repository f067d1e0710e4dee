"""The things of a running lab that checks and faults name: nodes, routers, external hosts and pods.

A check says `on: node1`, `from: web-1` or `to: service/web`; this module turns such a name into the
namespace to enter, the address it stands for, and whether it is alive. Liveness matters for honest
grading: a check that expects something to be absent (a route, a connection) must never pass because the
thing it looks at is missing altogether, so every probe first asks `require_alive`.
"""
from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address

from apiserver import state
from kubelet import execute, runtime
from topo import netns
from topo.errors import StateError
from topo.model import Lab, Service

SERVICE_PREFIXES = ("service/", "svc/")  # kubectl's TYPE/NAME forms, long and short


@dataclass(frozen=True)
class Target:
    name: str  # as given
    kind: str  # node, router, external, pod
    netns: str
    pause_pid: int | None  # pods only
    key: str  # pods: namespace/name; others: the name
    ip: IPv4Address | None


class Lookup:
    """Names of one running lab, resolved against its state and model (both read once per command)."""

    def __init__(self, st: state.LabState, lab: Lab) -> None:
        self.st = st
        self.lab = lab

    def target(self, name: str) -> Target:
        ns, pause_pid = execute.find_target(self.st, name)
        if pause_pid is not None:
            key = name if "/" in name else next(k for k in self.st.pods if k.split("/", 1)[1] == name)
            return Target(name, "pod", ns, pause_pid, key, IPv4Address(self.st.pods[key].ip))
        return self.host(name) or Target(name, "router", ns, None, name, None)

    def host(self, name: str) -> Target | None:
        """A node, router or external host by name (None: no such host). Unlike `target`, never a pod."""
        for node in self.lab.nodes:
            if node.name == name:
                return Target(name, "node", self.lab.node_netns(name), None, name, node.ip)
        for rack in self.lab.underlay.racks:
            if rack.router == name:
                return Target(name, "router", self.lab.router_netns(name), None, name, rack.router_ip)
        for ext in self.lab.external:
            if ext.name == name:
                return Target(name, "external", self.lab.external_netns(name), None, name, ext.ip)
        if name in self.lab.routers:  # the spine: no single address
            return Target(name, "router", self.lab.router_netns(name), None, name, None)
        return None

    def pod(self, name: str) -> Target | None:
        """A pod by NAMESPACE/NAME, or by a name only one namespace has (None: no such pod)."""
        if "/" in name:
            key = name if name in self.st.pods else None
        else:
            matches = [k for k in self.st.pods if k.split("/", 1)[1] == name]
            if len(matches) > 1:
                raise StateError(f"pod name {name} is in several namespaces ({', '.join(sorted(matches))}): "
                                 "give it as NAMESPACE/NAME")
            key = matches[0] if matches else None
        if key is None:
            return None
        ps = self.st.pods[key]
        return Target(name, "pod", ps.netns, ps.pause_pid, key, IPv4Address(ps.ip))

    def service(self, value: str) -> Service:
        """The Service `service/[NS/]NAME` or `svc/[NS/]NAME` names (no NS: the default namespace, as
        kubectl)."""
        prefix = next((p for p in SERVICE_PREFIXES if value.startswith(p)), None)
        parts = value[len(prefix):].split("/") if prefix else []
        if not 1 <= len(parts) <= 2 or not all(parts):
            raise StateError(f"{value}: give a service as service/[NAMESPACE/]NAME or svc/[NAMESPACE/]NAME")
        namespace, name = (parts[0], parts[1]) if len(parts) == 2 else ("default", parts[0])
        for svc in self.lab.services:
            if svc.namespace == namespace and svc.name == name:
                return svc
        raise StateError(f"no service {namespace}/{name} in lab {self.st.name}")

    def address(self, value: str) -> IPv4Address:
        """An IPv4 address as given, a target's address, or a Service's ClusterIP (service/[NS/]NAME)."""
        try:
            return IPv4Address(value)
        except ValueError:
            pass
        if value.startswith("service/"):
            svc = self.service(value)
            if svc.cluster_ip is None:
                raise StateError(f"no service {svc.key} with a cluster IP in lab {self.st.name}")
            return svc.cluster_ip
        target = self.target(value)
        if target.ip is None:
            raise StateError(f"{value} has no single address")
        return target.ip

    def require_alive(self, target: Target) -> None:
        """A pod whose pause process runs; a host whose namespace is pinned and has an interface up."""
        if target.kind == "pod":
            if target.pause_pid is None or not runtime.sandbox_alive(target.netns, target.pause_pid):
                raise StateError(f"pod {target.key} is not running")
            return
        if netns.inode(target.netns) is None:
            raise StateError(f"{target.name}'s network namespace is gone")
        with netns.rtnl_in(target.netns) as rt:
            if not any(link.name != "lo" and link.up for link in rt.links()):
                raise StateError(f"{target.name} has no interface up: not a live lab host")

    def live(self, name: str) -> Target:
        target = self.target(name)
        self.require_alive(target)
        return target

    def popen(self, target: Target, argv: list[str]) -> subprocess.Popen[str]:
        """Start argv where `lab exec TARGET` would, in the background (a short-lived server); output
        discarded. The caller stops it."""
        exe = shutil.which(argv[0])
        if exe is None:
            raise StateError(f"command {argv[0]!r} not found on this machine")
        st_name = self.st.name
        return subprocess.Popen([exe, *argv[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, text=True,
                                preexec_fn=lambda: execute.enter(st_name, target.name, target.netns, target.pause_pid))

    def run(self, target: Target, argv: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        """Run argv (never through a shell) where `lab exec TARGET -- argv` would: the same namespaces,
        the pod's own resolv.conf, the node's own /sys and FRR. Output is stdout and stderr together."""
        exe = shutil.which(argv[0])
        if exe is None:
            raise StateError(f"command {argv[0]!r} not found on this machine")
        st_name = self.st.name

        def enter() -> None:
            execute.enter(st_name, target.name, target.netns, target.pause_pid)

        try:
            return subprocess.run([exe, *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout, preexec_fn=enter, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            return subprocess.CompletedProcess(argv, 124, out + f"\n(timed out after {timeout:g} s)")


def host_veth(lookup: Lookup, pod: Target) -> str:
    """The node-side end of a pod's eth0 veth pair, as the kernel says: the link on the pod's node whose
    index is the peer index of the pod's eth0 (what `ip link` inside the pod prints as `eth0@ifN`)."""
    import json

    proc = lookup.run(pod, ["ip", "-j", "link", "show", "dev", "eth0"])
    try:
        peer = json.loads(proc.stdout)[0]["link_index"]
    except (ValueError, LookupError, TypeError):
        raise StateError(f"pod {pod.key} has no veth eth0") from None
    node = lookup.st.pods[pod.key].node
    with netns.rtnl_in(lookup.lab.node_netns(node)) as rt:
        for link in rt.links():
            if link.index == peer:
                return link.name
    raise StateError(f"the peer of pod {pod.key}'s eth0 (index {peer}) is not on node {node}")


@contextlib.contextmanager
def socket_lb_of(lookup: Lookup, target: Target) -> Iterator[None]:
    """Sockets made inside this block go through the target's socket load balancer, as its own processes'
    do (a cilium lab's pods and nodes: the cgroup a socket is created in decides which connect4 program
    runs). Elsewhere, and for routers and external hosts, nothing changes."""
    node = lookup.st.pods[target.key].node if target.kind == "pod" else target.name if target.kind == "node" else None
    if lookup.lab.cni.profile != "cilium" or node is None:
        yield
        return
    from cilium import agent

    with agent.spawning_in(lookup.st.name, node):
        yield
