"""A node's kubelet for one pod at a time: make it (sandbox, CNI ADD, pod files, containers), remove it (CNI
DEL, sandbox), and report the pods it runs (what the endpoints controller reads for services, DNS and
policies).

`lab up` makes its pods in bulk (lab/apply.py, with leases planned up front); `lab apply`, `lab delete` and
the recovery after a crash (reconcile/recover.py) go through here, one pod at a time, so every way a pod
comes or goes takes the same path. Removing is idempotent: whatever is already gone (namespace, veth,
lease, pod folder) is not an error, which is what lets a killed command be run again.
"""
from __future__ import annotations

import contextlib
import itertools
import shutil
import socket
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

from apiserver import state
from cni.lxc import LXC_PREFIX, LxcPlugin
from cni.plugin import BridgePlugin, CniArgs, NetConf
from cni.vpc_ipamd import IPAMD_FILE, IpamdFile
from cni.vpc_plugin import VpcPlugin
from kubelet import cgroups, runtime
from services import addons
from services.endpoints import RunningPod
from topo import crash, names, netns
from topo.model import POD_IFNAME, Lab, Pod
from topo.rtnl import IF_OPER_UNKNOWN, IF_OPER_UP, Rtnl


def running_pods(st: state.LabState, lab: Lab, alive: dict[str, bool] | None = None) -> list[RunningPod]:
    """The lab's pods with their IPs, ready while their sandbox lives (what the endpoints controller sees).
    A pod still being made or being removed is not an endpoint. `alive`: whether each pod's sandbox lives,
    when the caller has just looked (`alive_sandboxes`); a pod it does not name is looked at here."""
    states, known = st.pods, alive or {}
    pods, unknown = [], {}
    for pod in lab.pods:  # one pass, locals only: 10,000 pods are gathered by every change
        key = pod.key
        ps = states.get(key)
        if ps is None or ps.phase != "Running":
            continue
        pods.append((key, pod, ps))
        if key not in known:
            unknown[key] = (ps.netns, ps.pause_pid)
    if unknown:
        known = {**known, **runtime.sandboxes_alive(unknown)}
    out, cache, address = [], _running, _address
    for key, pod, ps in pods:
        ready, ip = known[key], address(ps.ip)
        seen = cache.get(key)
        if seen is None or seen.pod is not pod or seen.ready != ready or seen.ip is not ip:
            seen = cache[key] = RunningPod(pod, ip, ready)
        out.append(seen)
    return out


# Each pod's RunningPod, kept for the next call in this process: a command gathers the endpoints two or three
# times, mostly of the same pod objects (apiserver.desired reuses them), and each is a frozen dataclass.
_running: dict[str, RunningPod] = {}


_addresses: dict[str, IPv4Address] = {}


def _address(text: str) -> IPv4Address:
    """A recorded pod IP as an address, parsed once per process (a command gathers the endpoints several
    times, and ipaddress's parser cost 10 us a pod: a tenth of a second at 10,000 pods, each time)."""
    found = _addresses.get(text)
    if found is None:
        try:  # inet_pton is as strict as ipaddress (four decimal octets, no leading zeros), and 10x faster
            found = IPv4Address(int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big"))
        except OSError:
            found = IPv4Address(text)  # raises ipaddress's own error
        _addresses[text] = found
    return found


def alive_sandboxes(st: state.LabState) -> dict[str, bool]:
    """Whether each running pod's sandbox lives, looked at once (a command that needs the endpoints several
    times passes this to `running_pods`, and marks the pods it makes or removes itself)."""
    return runtime.sandboxes_alive({key: (ps.netns, ps.pause_pid) for key, ps in st.pods.items()
                                    if ps.phase == "Running"})


def netconf(lab: Lab, node: str, ipam_dir: Path) -> NetConf:
    """The network configuration a node's kubelet hands the CNI plugin (bridge, PodCIDR, MTU, lease folder)."""
    return NetConf(node=node, subnet=lab.node(node).pod_cidr, data_dir=str(ipam_dir), mtu=lab.network.mtu,
                   mode="cilium" if lab.cni.profile == "cilium" else "bridge")


def cni_args(lab: Lab, namespace: str, name: str) -> CniArgs:
    """What kubelet would pass the plugin for this pod (CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS)."""
    return CniArgs(container_id=names.sandbox_id(lab.name, namespace, name),
                   netns=netns.path(names.pod_netns(lab.name, namespace, name)), ifname=POD_IFNAME,
                   pod_namespace=namespace, pod_name=name,
                   host_prefix=LXC_PREFIX if lab.cni.profile == "cilium" else "veth")


def ipamd_file(lab: Lab) -> IpamdFile:
    """The aws-vpc profile's ipamd books (every node's ENIs and the subnets'), next to the lease files."""
    return IpamdFile(state.ipam_dir(lab.name) / IPAMD_FILE, lab)


def plugin(lab: Lab, node: str, host: Rtnl) -> BridgePlugin | VpcPlugin:
    if lab.cni.profile == "aws-vpc":
        return VpcPlugin(node, host, ipamd_file(lab).locked, lab.network.mtu)
    return plugin_for(netconf(lab, node, state.ipam_dir(lab.name)), host)


def plugin_for(conf: NetConf, host: Rtnl) -> BridgePlugin:
    """The CNI plugin a node's kubelet calls: the bridge (cni0) or, in the cilium profile, routed lxc veths."""
    return LxcPlugin(conf, host) if conf.mode == "cilium" else BridgePlugin(conf, host)


def in_pod_cgroup(lab: Lab, node: str) -> contextlib.AbstractContextManager[None]:
    """Where a pod's processes start: in the cilium profile, the node's cgroup (its socket LB)."""
    if lab.cni.profile != "cilium":
        return contextlib.nullcontext()
    from cilium import agent  # here, not at the top: libbpf's bindings are 20 ms of every other lab's command

    return agent.spawning_in(lab.name, node)


def add_pod(st: state.LabState, lab: Lab, pod: Pod,
            before_start: Callable[[Pod, IPv4Address], None] | None = None) -> state.PodState:
    """One pod the way `lab up` makes it; a failure removes what was made of it. `before_start` runs once
    the pod has its IP, before its containers start. Returns the pod's record (the caller stores it)."""
    ns = lab.pod_netns(pod)
    args = cni_args(lab, pod.namespace, pod.name)
    pause = runtime.pause_binary(state.RUN_DIR / state.BIN)
    files = state.pod_dir(lab.name, pod)
    runtime.write_pod_files(files, addons.pod_resolv_conf(lab, pod), addons.pod_hosts(pod, None))
    runtime.template_from_sandboxes(itertools.islice(
        ((ps.netns, ps.pause_pid) for ps in st.pods.values() if ps.phase == "Running"), 3))
    with netns.rtnl_in(lab.node_netns(pod.node)) as host:
        cni = plugin(lab, pod.node, host)
        netns.create(ns)
        crash.point("pod-netns")
        try:
            with in_pod_cgroup(lab, pod.node):
                pause_pid = runtime.start_sandbox(ns, addons.pod_hostname(pod), pause, files,
                                                  runtime.needs_sysfs(pod))
            result = cni.add(args)
            crash.point("pod-cni-added")
            ip = result["ips"][0]["address"].split("/")[0]
            runtime.write_pod_files(files, addons.pod_resolv_conf(lab, pod), addons.pod_hosts(pod, ip, lab.dns.domain))
            if before_start is not None:
                before_start(pod, IPv4Address(ip))
            with in_pod_cgroup(lab, pod.node):
                containers = runtime.start_pod_containers(pod, ns, pause_pid, state.log_dir(lab.name), lab.name)
            crash.point("pod-started")
        except BaseException:
            runtime.remove_sandbox(ns)
            cni.delete(args)  # the lease (and veth) of an ADD that succeeded before a later step failed
            raise
        wait_link(host, args.host_ifname)
    return state.pod_state(pod, ip, ns, pause_pid, containers)


def remove_pod(lab: Lab, key: str, node: str | None) -> None:
    """Everything of one pod, whatever is left of it: processes and namespace, the veth, the lease (from
    every node's pool when the node is not known, as for a namespace nobody recorded), the pod's files and
    its containers' logs. Waits until the veth's name is free again, so the pod can come back at once."""
    namespace, name = key.split("/", 1)
    args = cni_args(lab, namespace, name)
    runtime.remove_sandbox(names.pod_netns(lab.name, namespace, name))
    cgroups.remove_pod(lab.name, names.pod_netns(lab.name, namespace, name))
    shutil.rmtree(state.pod_dir_of(lab.name, key), ignore_errors=True)
    for log in state.log_dir(lab.name).glob(f"{namespace}_{name}_*.log"):
        with contextlib.suppress(OSError):
            log.unlink()
    for where in [node] if node is not None else [n.name for n in lab.nodes]:
        with netns.rtnl_in(lab.node_netns(where)) as host:
            plugin(lab, where, host).delete(args)
            # A deleted veth's name stays taken for a few tens of ms.
            deadline = time.monotonic() + 2.0
            while host.link(args.host_ifname) is not None and time.monotonic() < deadline:
                time.sleep(0.01)


def wait_link(handle: Rtnl, name: str, timeout: float = 5.0) -> None:
    """Return once a new pod's host veth is operationally up (or gone): a bridge forwards on a port only
    after the kernel has seen its carrier, so the pod's first packets would otherwise be dropped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        link = handle.link(name)
        if link is None or link.operstate in (IF_OPER_UP, IF_OPER_UNKNOWN):
            return
        time.sleep(0.01)
