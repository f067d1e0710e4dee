"""Carry out a plan on the kernel, and take a lab apart again.

Thin on purpose: every decision is already in the plan. What is here is the order of operations and the
speed tricks: one netlink handle per node reused for all its pods, namespaces entered in-process.
"""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from apiserver import state
from cni import network_policy
from cilium import agent
from cilium import policy as cilium_policy
from cni import vpc_ipamd, vpc_plugin
from cni.plugin import BridgePlugin, memory_session
from kubelet import cgroups, runtime
from kubelet.pods import in_pod_cgroup, plugin_for
from lab import progress
from reconcile import nodelocal
from lab.plan import HOST_SYSCTLS, SWITCH_SYSCTLS, NodeOps, Plan, PodOps
from routing import bgp, frr, ipip, vxlan
from services import addons, dns, kube_proxy
from services.endpoints import RunningPod
from topo import crash, names, netns, process, underlay
from topo.errors import ApplyError
from topo.model import NODE_IFNAME, Lab
from topo.rtnl import IF_OPER_UNKNOWN, IF_OPER_UP, RTPROT_STATIC, Link, NetlinkError, Rtnl, replace_route_msg


class NodeHandles:
    """Open netlink handles, one per node namespace, closed together (an open handle pins a namespace)."""

    def __init__(self) -> None:
        self._handles: dict[str, Rtnl] = {}

    def get(self, ns: str) -> Rtnl:
        if ns not in self._handles:
            self._handles[ns] = netns.rtnl_in(ns)
        return self._handles[ns]

    def close(self) -> None:
        for handle in self._handles.values():
            with contextlib.suppress(Exception):
                handle.close()
        self._handles.clear()


@contextlib.contextmanager
def node_handles() -> Iterator[NodeHandles]:
    handles = NodeHandles()
    try:
        yield handles
    finally:
        handles.close()


def write_sysctls(ns: str, values: tuple[tuple[str, str], ...]) -> None:
    """/proc/sys/net shows the namespace of the thread that opens it, so write from inside."""
    with netns.entered(ns):
        for key, value in values:
            with open(f"/proc/sys/{key}", "w") as fh:
                fh.write(value)


def setup_node(node: NodeOps, handles: NodeHandles, ipamd=None) -> BridgePlugin | vpc_plugin.VpcPlugin:
    host = handles.get(node.netns)
    plugin: BridgePlugin | vpc_plugin.VpcPlugin
    if node.vpc:
        plugin = vpc_plugin.VpcPlugin(node.name, host, lambda: vpc_plugin.memory_session(ipamd), node.netconf.mtu)
        # answer ARP for the node's pods at once (the kernel delays proxy replies by up to 0.8 s otherwise)
        write_sysctls(node.netns, ((f"net/ipv4/neigh/{NODE_IFNAME}/proxy_delay", "0"),))
        for subnet in node.onlink:
            host.replace_route(subnet, oif=plugin.ensure_bridge())
    else:
        plugin = plugin_for(node.netconf, host)
    plugin.ensure_bridge()
    devices: dict[str, int] = {}
    for route in node.routes:
        if route.dev not in devices:
            link = host.link(route.dev)
            if link is None:
                raise ApplyError(f"node {node.name} has no {route.dev}")
            devices[route.dev] = link.index
    # one batch a node: host-gw at 50 nodes is 2,450 routes, each a round trip before
    for failed in host.batch([replace_route_msg(route.dst, gateway=route.via, oif=devices[route.dev],
                                                protocol=RTPROT_STATIC) for route in node.routes]):
        if isinstance(failed, NetlinkError):
            raise failed
    if node.vxlan is not None:
        vxlan.apply(host, node.vxlan)
    if node.ipip is not None:
        ipip.apply_tunnel(host, node.netns, node.ipip)
    if node.service_route is not None:
        host.replace_route(node.service_route, oif=host.link(NODE_IFNAME).index)
    return plugin


POD_BATCH = 50  # pods whose namespaces are made before their sandboxes start (see add_pods); 25-200 do as well


def add_pods(lab: Lab, ops: tuple[PodOps, ...], plugins: dict[str, BridgePlugin | vpc_plugin.VpcPlugin],
             pause: tuple[str, ...], logs: Path) -> Iterator[state.PodState]:
    """Make pods in batches, each step for a whole batch before the next: files and network namespaces,
    then the pause processes, then CNI ADD and containers pod by pod. A process started right after a
    network namespace was made costs twice as much or more (measured, 400 pods: 4.5 ms a spawn alternating,
    2.3-2.6 ms in batches of 25-50, 1.9 ms in batches of 200), so `lab up` does not alternate them. Yields each pod's record once it is
    made, in order; a failure leaves the rest to the caller's teardown (the lab is still building). The
    folder of the pods' folders is the caller's to make (`add_pods_split`, once for both processes)."""
    for start in range(0, len(ops), POD_BATCH):
        batch = ops[start:start + POD_BATCH]
        for op in batch:
            # The plan has the pod's address already: its hosts file is written once, final (`lab apply`
            # writes it before the CNI ADD without the address, and again after).
            runtime.write_pod_files(state.pod_dir(lab.name, op.pod), addons.pod_resolv_conf(lab, op.pod),
                                    addons.pod_hosts(op.pod, op.address.ip, lab.dns.domain))
            netns.create(op.netns)
        sandboxes = {}
        for op in batch:
            with in_pod_cgroup(lab, op.node):
                sandboxes[op.pod.key] = runtime.start_sandbox(op.netns, addons.pod_hostname(op.pod), pause,
                                                              state.pod_dir(lab.name, op.pod),
                                                              runtime.needs_sysfs(op.pod))
        for op in batch:
            yield finish_pod(lab, op, plugins[op.node], sandboxes[op.pod.key], logs)


SPLIT_MIN = 100  # pods below which one process makes them all (a fork costs 2-5 ms, and a small lab's up is short)


def add_pods_split(lab: Lab, ops: tuple[PodOps, ...], plugins: dict[str, BridgePlugin | vpc_plugin.VpcPlugin],
                   pause: tuple[str, ...], logs: Path) -> Iterator[tuple[str, state.PodState]]:
    """`add_pods` in two processes, every other node's pods in a forked copy of this one; yields (pod key,
    record) as either makes a pod. Kubelets make pods on all nodes at once; here the machine's two cores do
    (600 namespaces and veths: 0.40 s in one process, 0.24-0.27 s in two; the kernel serializes only part
    of it): the rules loaded by the kube-proxy worker take the second core for the first half of `lab up`,
    and it stays idle after. Bridge plugins only: they keep nothing the parent needs (the addresses are
    the plan's, leased before), and each node's plugin and netlink handle are used by one process only."""
    def keyed(part: tuple[PodOps, ...]) -> Iterator[tuple[str, state.PodState]]:
        return ((op.pod.key, record) for op, record in zip(part, add_pods(lab, part, plugins, pause, logs)))

    if ops:  # once, before any fork
        runtime.make_pods_folder(state.pod_dir(lab.name, ops[0].pod).parent)
    nodes = sorted({op.node for op in ops})
    if len(ops) < SPLIT_MIN or len(nodes) < 2 or not all(isinstance(p, BridgePlugin) for p in plugins.values()):
        yield from keyed(ops)
        return
    theirs = set(nodes[1::2])
    worker = process.fork_call(lambda: keyed(tuple(op for op in ops if op.node in theirs)))
    try:
        for item in keyed(tuple(op for op in ops if op.node not in theirs)):
            yield item
            yield from worker.ready()
        yield from worker.wait()
    except BaseException:
        worker.stop()  # a failure here or there: the caller removes the lab, and no copy may go on adding pods
        raise


def finish_pod(lab: Lab, op: PodOps, plugin: BridgePlugin | vpc_plugin.VpcPlugin, pause_pid: int,
               logs: Path) -> state.PodState:
    """CNI ADD and the containers of a pod whose sandbox runs."""
    result = plugin.add(op.args)
    got = result["ips"][0]["address"].split("/")[0]  # the cilium profile's pods hold a /32
    if got != str(op.address.ip):
        raise ApplyError(f"pod {op.pod.key}: CNI gave {got}, the plan said {op.address.ip}")
    with in_pod_cgroup(lab, op.node):
        containers = runtime.start_pod_containers(op.pod, op.netns, pause_pid, logs, lab.name)
    return state.pod_state(op.pod, str(op.address.ip), op.netns, pause_pid, containers)


def start_external(lab: Lab) -> None:
    """What the external hosts serve: `http` is agnhost netexec on port 80, whose /clientip shows the
    source address a request arrived with (a node's IP, for pods behind their node's masquerade)."""
    for ext in lab.external:
        log = str(state.log_dir(lab.name) / f"{ext.name}.log")
        if "http" in ext.serves:
            argv = [sys.executable, "-m", "images.agnhost", "netexec", "--http-port=80"]
            process.spawn_in(lab.external_netns(ext.name), argv, log)
        if "dns" in ext.serves:
            folder = state.lab_dir(lab.name) / "upstream-dns"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "dnsmasq.conf").write_text(dns.upstream_conf(list(lab.external), folder / "queries.log"))
            process.spawn_in(lab.external_netns(ext.name), dns.dnsmasq_argv(folder / "dnsmasq.conf"), log)


def start_bgp(speakers: tuple[bgp.Speaker, ...], lab: str) -> None:
    for speaker in speakers:
        frr.start(speaker, frr.frr_folder(state.lab_dir(lab), speaker.name))


def load_br_netfilter() -> None:
    """The net/bridge sysctls every lab writes exist only once br_netfilter is loaded. This project's CI
    kernel has it built in; a modular kernel (Debian's stock one) loads it only when asked, which is why
    kubeadm's prerequisites say `modprobe br_netfilter`."""
    if not os.path.isdir("/proc/sys/net/bridge"):
        with contextlib.suppress(OSError):  # no modprobe: the check below says what is missing
            subprocess.run(["modprobe", "br_netfilter"], capture_output=True)
    if not os.path.isdir("/proc/sys/net/bridge"):
        raise ApplyError("bridge netfilter is missing (CONFIG_BRIDGE_NETFILTER; `modprobe br_netfilter` failed)")


def apply(plan: Plan, st: state.LabState) -> float | None:
    """Build the lab; returns how long BGP took to converge (None without BGP)."""
    if plan.routers or plan.speakers:
        frr.require_frr()
    load_br_netfilter()
    netns.ensure_dir()
    underlay.build(plan.underlay)
    pause = runtime.pause_binary(state.RUN_DIR / state.BIN)
    logs = state.log_dir(plan.lab.name)
    with node_handles() as handles:
        underlay.configure(plan.underlay, handles.get)
        for host in plan.underlay.hosts:
            if not host.external:
                write_sysctls(host.netns, HOST_SYSCTLS)
        for ns in plan.underlay.switch_netns:
            write_sysctls(ns, SWITCH_SYSCTLS)
        start_bgp(plan.routers, plan.lab.name)
        plugins: dict[str, BridgePlugin | vpc_plugin.VpcPlugin] = {}
        for node in plan.nodes:
            plugins[node.name] = setup_node(node, handles, plan.ipamd)
            if plan.lab.cni.profile == "cilium":
                agent.setup_node(plan.lab, node.name)
        for node_name, plugin in plugins.items():
            ipam = plan.ipam[node_name]
            if isinstance(plugin, BridgePlugin):
                plugin.ipam = lambda ipam=ipam: memory_session(ipam)
                plugin.new_sandboxes = True  # add_pods makes each pod's namespace right before its ADD
        for pod, message in plan.waiting:  # aws-vpc: no address left for these; the next reconcile retries
            st.pods[pod.key] = state.waiting_pod(pod, plan.lab.pod_netns(pod), message)
        running = [RunningPod(op.pod, op.address.ip) for op in plan.pods]
        addons.write_configs(plan.lab, running, state.lab_dir(plan.lab.name))
        # Policy first: the plan knows every pod's IP, so each pod starts isolated as its policies say (Calico
        # drops a workload's traffic until felix has programmed its policy: no pod runs unprotected).
        network_policy.sync(plan.lab, [network_policy.Workload(r.pod, r.ip) for r in running],
                            state.lab_dir(plan.lab.name) / "network-policy")
        # kube-proxy is a daemon of its own on every node, which loads the rules of the services and their
        # endpoints as the API server reports them, whatever kubelet is doing meanwhile: here the plan knows
        # every endpoint, so the rules load in a forked copy of this process (on the other core) while this
        # one makes the pods (1,000 pods behind one Service: 1.4 s of rules no longer in series). Not with
        # the cilium profile: its service maps and policy need the pods' devices (sync_services below).
        proxy = process.fork_call(lambda: sync_services(plan.lab, running)) \
            if plan.lab.cni.profile != "cilium" else None
        try:
            try:
                with progress.bar(f"lab up {plan.lab.name}: pods", len(plan.pods)) as advance:
                    for key, record in add_pods_split(plan.lab, plan.pods, plugins, pause, logs):
                        st.pods[key] = record
                        crash.point("up-pod")
                        advance(1)
            finally:
                for node in plan.nodes:
                    node.netconf.lease_file().write(plan.ipam[node.name])
                if plan.ipamd is not None:
                    vpc_ipamd.IpamdFile(state.ipam_dir(plan.lab.name) / vpc_ipamd.IPAMD_FILE,
                                        plan.lab).write(plan.ipamd)
            for addon in ("dns", "ingress"):  # their daemons have just started with the files as written
                addons.mark_loaded(addon, state.lab_dir(plan.lab.name))
            start_external(plan.lab)
        except BaseException:
            if proxy is not None:
                proxy.stop()  # the caller removes the lab: no copy may go on loading rules into it
            raise
        if proxy is not None:
            proxy.wait()
        else:
            sync_services(plan.lab, running)
        nodelocal.sync(plan.lab)  # NodeLocal DNSCache, when the spec asks for it
        start_bgp(plan.speakers, plan.lab.name)
        wait_carrier([handles.get(h.netns) for h in plan.underlay.hosts] +
                     [handles.get(ns) for ns in plan.underlay.switch_netns])
        speakers = plan.routers + plan.speakers
        if speakers:
            folders = {s.name: frr.frr_folder(state.lab_dir(plan.lab.name), s.name) for s in speakers}
            rtnl = {s.netns: handles.get(s.netns) for s in speakers}
            # ipip: zebra installs no BGP route; the lab installs what bgpd learned, through tunl0
            programmed = ipip.program(plan.lab, plan.speakers, rtnl, folders, BGP_TIMEOUT) \
                if plan.lab.network.backend == "ipip" else 0.0
            return programmed + frr.wait_converged(list(speakers), rtnl, folders, timeout=BGP_TIMEOUT)
    return None


def sync_services(lab: Lab, running: list[RunningPod]) -> None:
    """kube-proxy's rules, or in the cilium profile (no kube-proxy at all) the agent's service maps."""
    if lab.cni.profile == "cilium":
        agent.sync(lab, running)
        cilium_policy.sync(lab, running, state.lab_dir(lab.name) / "cilium")  # endpoints just attached
    else:
        kube_proxy.sync(lab, running, state.kube_proxy_dir(lab.name))


BGP_TIMEOUT = 30.0  # a few seconds is normal here; thirty means something is broken


def wait_carrier(handles: list[Rtnl], timeout: float = 5.0) -> None:
    """Return once every link is operationally up.

    The kernel reports a new veth's carrier asynchronously (link watch, up to a second later) and a
    bridge forwards on a port only after that, so a lab used the moment `lab up` returns would drop its
    first packets. Waiting here makes the first ping after `lab up` succeed.
    """
    deadline = time.monotonic() + timeout
    pending = list(handles)
    while pending and time.monotonic() < deadline:
        pending = [h for h in pending if _awaiting_carrier(h.links())]
        if pending:
            time.sleep(0.01)


def _awaiting_carrier(links: list[Link]) -> bool:
    """Whether a namespace has a link whose carrier is still to come. Not: `lo`, a link set down (it stays
    down), and a bridge without ports, whose carrier follows its ports' (a node without pods has a cni0
    at NO-CARRIER until its first pod's veth joins it: waiting for it cost such a `lab up` the whole timeout)."""
    masters = {link.master for link in links if link.master is not None}
    return any(link.operstate not in (IF_OPER_UP, IF_OPER_UNKNOWN) and link.name != "lo" and link.up
               and not (link.kind == "bridge" and link.index not in masters) for link in links)


# ---- teardown -------------------------------------------------------------------------------

def lab_namespaces(lab: str) -> list[str]:
    return netns.list_names(f"{names.NETNS_PREFIX}{lab}{names.SEP}")


def teardown(lab: str, wait: bool = True) -> list[str]:
    """Remove every namespace, link and process of a lab, found by name and namespace (crash-safe).

    With `wait`, return only once the kernel has removed the lab's links (seen as the switch's ports to the
    nodes disappearing: a node's veths, its pods' among them, go with it), so a lab of the same name can be
    built again at once. The kernel goes on freeing the emptied pod namespaces for a while (at 10,000 pods,
    a few seconds on one core), as after `ip netns delete`; nothing of the lab is left to see by then.
    """
    spaces = lab_namespaces(lab)
    inodes = [i for ns in spaces if (i := netns.inode(ns)) is not None]
    process.kill_all(process.pids_in_netns(inodes))
    cgroups.remove_lab(lab)
    crash.point("down-processes")
    kinds = {"p": [], "n": [], "u": []}  # type: dict[str, list[str]]
    for ns in spaces:
        kind = ns[len(names.NETNS_PREFIX) + len(lab) + 1:].split(names.SEP, 1)[0]
        kinds.setdefault(kind, []).append(ns)
    # Nodes, pods and every other namespace of the lab go together, watched from the underlay switch (its
    # ports, <switch>-eth<N>, vanish with the nodes; a pod's veth goes with its node). Together, because the
    # kernel, for each namespace it destroys, looks for that namespace's id in every namespace still alive
    # (net/core/net_namespace.c, unhash_nsid), and each node holds an id for each of its pods: pods destroyed
    # while their nodes lived cost pods x pods (at 10,000 pods, ~8 of the kernel's ~16 s). The nodes are let
    # go a moment before the pods (`_held`). Meanwhile (the kernel works alone) the pods' files go.
    others = [ns for kind, spaces_of in kinds.items() if kind not in ("p", "n", "u") for ns in spaces_of]
    files = lambda: remove_tree(state.lab_dir(lab) / "pods")  # noqa: E731
    if kinds["u"]:
        _delete_watched(kinds["n"] + others + kinds["p"], kinds["u"], "-eth", wait, meanwhile=files,
                        lead=len(kinds["n"]) + len(others))
    else:  # no switch to watch from: pods watched from their nodes, then the nodes gone unwatched
        _delete_watched(kinds["p"], kinds["n"], "veth", wait, meanwhile=files)
        _delete_watched(kinds["n"] + others, [], "-eth", wait)
    for ns in kinds["u"]:
        netns.delete(ns)
    agent.remove(lab)  # the cilium profile's cgroups and bpffs pins (programs go with them and the devices)
    return spaces


# Namespaces unpinned at once: each unmount waits for an RCU grace period after the kernel's mount lock is
# released (fs/namespace.c, namespace_unlock), so unmounts in parallel threads overlap those waits (3,000
# pins: 0.52 s one by one, 0.2 s in 8 threads). Folders removed at once, likewise (ext4 unlink waits).
UNPIN_THREADS = 8
REMOVE_THREADS = 4


def _delete_watched(doomed: list[str], watchers: list[str], peer_mark: str, wait: bool,
                    timeout: float = 30.0, meanwhile: Callable[[], None] | None = None, lead: int = 0) -> None:
    """Unpin `doomed` and wait until the links whose names hold `peer_mark` (their veth peers) vanish from
    `watchers`; `meanwhile` runs in a thread alongside (it must not touch the kernel objects involved). The
    first `lead` namespaces are let go a moment before the rest (`_held`).

    Each namespace is held open while all of them are unpinned, then all are let go together: the kernel
    destroys namespaces in batches (net/core/net_namespace.c, cleanup_net: one pass of every exit hook, one
    unregister of all their devices, per batch), and a namespace freed while others are still being
    unpinned starts a batch of one, whose grace periods the unmounts then wait behind."""
    side = None
    try:
        if not doomed:
            return
        with node_handles() as handles:
            before = {}
            if wait:
                for ns in watchers:
                    with contextlib.suppress(OSError):
                        before[ns] = _peer_count(handles.get(ns), peer_mark)
            with _held(doomed, lead), progress.bar("removing namespaces", len(doomed)) as advance, \
                    ThreadPoolExecutor(UNPIN_THREADS) as pool:
                side = _in_thread(meanwhile)  # once the namespaces are held: their descriptors in one run
                for _ in pool.map(_unpin, doomed):
                    advance(1)
            # Peers never come back, so a watcher seen empty is not looked at again; and each look is a dump
            # the kernel answers only between its batches (it holds the RTNL lock), parsed here while the
            # kernel needs the CPU: the pause between looks grows with the wait (at most a tenth of it).
            pending = [ns for ns, count in before.items() if count]
            started = time.monotonic()
            while wait and pending and time.monotonic() < started + timeout:
                pending = [ns for ns in pending if _peer_count(handles.get(ns), peer_mark)]
                if pending:
                    time.sleep(min(0.25, max(0.02, (time.monotonic() - started) / 10)))
    finally:
        if side is None:  # nothing held, or a failure before: the files go all the same
            side = _in_thread(meanwhile)
        if side is not None:
            side.join()


def _unpin(ns: str) -> None:
    netns.delete(ns)
    crash.point("down-namespace")


# How long the kernel's cleanup worker is given to take the namespaces let go first as a batch of their own
# before the rest follow (`_held`); it wakes within microseconds on an idle core.
LEAD_SETTLE = 0.005


@contextlib.contextmanager
def _held(spaces: list[str], lead: int = 0) -> Iterator[None]:
    """Each namespace held by an open descriptor until the block ends (as many as the open-files limit
    allows; the rest are freed as they are unpinned). A crash closes them all: the kernel frees them then.

    They are let go by close_range(2), a call per run of consecutive descriptors, not a close(2) each: the
    kernel's cleanup worker starts on the other core at the first namespace freed and takes what has been
    freed so far as its batch, and for each namespace of a batch it walks every namespace still alive
    (net/core/net_namespace.c, unhash_nsid). Closed one by one from Python, 10,000 namespaces went in many
    small batches (that walk: 7 % of a `lab down`'s CPU, in the one worker every other step waits for); a
    close_range defers each release to the end of the call, and they follow each other in microseconds.

    Even so, 10,000 releases take 80 ms, and a batch of a few namespaces 35 ms: the worker took the first
    releases, then 45 % of the pods while 55 % still lived (each walked them: 18 s of work, not 14). So the first
    `lead` (the nodes: destroying one removes its pods' veths, a batch far longer than the pods' releases) go
    first, and the pods while the worker is busy with them: the pods then make one batch, walking nothing."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, len(spaces) + 1024)
    if want > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    room = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 512  # left for everything else of this process
    groups: tuple[list[int], list[int]] = ([], [])
    try:
        for i, ns in enumerate(spaces[:max(0, room)]):
            with contextlib.suppress(OSError):
                groups[i >= lead].append(os.open(netns.path(ns), os.O_RDONLY | os.O_CLOEXEC))
        yield
    finally:
        for fds in groups:
            if fds is groups[1] and groups[0] and fds:
                time.sleep(LEAD_SETTLE)
            for first, last in _runs(sorted(fds)):
                os.closerange(first, last + 1)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _runs(numbers: list[int]) -> Iterator[tuple[int, int]]:
    """(first, last) of each run of consecutive numbers in a sorted list: [3, 4, 5, 9] -> (3, 5), (9, 9)."""
    start = 0
    for i in range(1, len(numbers) + 1):
        if i == len(numbers) or numbers[i] != numbers[i - 1] + 1:
            yield numbers[start], numbers[i - 1]
            start = i


def _in_thread(work: Callable[[], None] | None) -> threading.Thread | None:
    if work is None:
        return None
    thread = threading.Thread(target=work, name="teardown-files", daemon=True)
    thread.start()
    return thread


def remove_tree(folder: Path) -> None:
    """`rm -rf folder`, its subfolders removed in parallel threads (a folder per pod: 10,000 of them)."""
    try:
        with os.scandir(folder) as entries:
            parts = [entry.path for entry in entries]
    except OSError:
        return
    with ThreadPoolExecutor(REMOVE_THREADS) as pool:
        list(pool.map(lambda part: shutil.rmtree(part, ignore_errors=True), parts))
    shutil.rmtree(folder, ignore_errors=True)


def _peer_count(handle: Rtnl, mark: str) -> int:
    return sum(1 for link in handle.links() if mark in link.name)
