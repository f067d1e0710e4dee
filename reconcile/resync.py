"""Bringing what is derived from a lab's objects in line with its desired state after a change: every node's
service rules (kube-proxy), NetworkPolicy rules (the CNI's policy agent), the cluster DNS records and the
ingress controller's routes.

`lab apply -f`, `lab delete` and a fault that changes a pod's labels all end with `resync`, as the
controllers of a cluster react to any change of pods or services.
"""
from __future__ import annotations

from dataclasses import dataclass

from apiserver import state
from apiserver.desired import current_lab
from cni import network_policy
from kubelet import runtime
from kubelet.pods import running_pods
from reconcile import nodelocal, recover
from services import addons, kube_proxy
from services.endpoints import RunningPod
from topo import process
from topo.model import Lab


@dataclass(frozen=True)
class Delta:
    """What one command changed among the pods, for a resync that looks only there: the namespace and labels
    of every pod made, removed or relabelled (a relabelled pod's old labels too). `base_in_step`: whether
    everything derived was in line with the desired state when the command started (`in_step`); only then
    is the rest known to be as it was last synced."""

    labels: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    base_in_step: bool


def resync(st: state.LabState, alive: dict[str, bool] | None = None,
           delta: Delta | None = None) -> kube_proxy.SyncReport | None:
    """Bring everything derived from the lab's objects up to date after a change of pods or services:
    every node's service rules, the NetworkPolicy rules, the cluster DNS's records, the ingress
    controller's routes. Each layer compares what it wants with what it last loaded, so running this
    again after a crash finishes what the crash interrupted, and a layer that is in line costs nothing.
    `alive`: whether each pod's sandbox lives, when the caller has just looked (`kubelet.pods.alive_sandboxes`).

    With a `delta` from a lab that was in step, service rules are synced only when a service selects one of
    the pods that changed (kube-proxy itself reacts to the EndpointSlices that changed, not to every pod):
    a pod no service selects costs no rule work at 10,000 pods. Returns None when the rules were not looked at.
    Once every layer is in line, the generation is marked in step (`in_step`)."""
    lab = current_lab(st)
    running = running_pods(st, lab, alive)
    report = None
    if delta is None or not _delta_ok(lab, delta) or _selected(lab, delta):
        if lab.cni.profile == "cilium":  # no kube-proxy: the agent's service maps
            from cilium import agent  # only here (kubelet/pods.py in_pod_cgroup says why)

            cilium_report = agent.sync(lab, running)
            report = kube_proxy.SyncReport(cilium_report.nodes, cilium_report.frontends, cilium_report.backends,
                                           cilium_report.seconds)
        else:
            report = kube_proxy.sync(lab, running, state.kube_proxy_dir(st.name))
    sync_policies(lab, running, st.name)
    run_dir = state.lab_dir(st.name)
    addons.write_configs(lab, running, run_dir)
    if "restart" in reload_addons(st, lab).values():
        state.save(st)  # a restarted container's new pid (the caller saved everything else before; a SIGHUP changes nothing)
    nodelocal.sync(lab)
    mark_in_step(st)
    return report


IN_STEP = "in-step"  # in the lab's folder: the generation every derived layer was last brought in line with


def in_step(st: state.LabState) -> bool:
    """Whether the service rules, policies, records and routes were brought in line with the desired state
    as recorded now (the last command's resync ran to its end, and nothing recorded a change since), and every
    running pod's pause process is still there. A command killed before its resync ended, or a pod that died
    on its own, makes this False: then the next command resyncs every pod."""
    try:
        if int((state.lab_dir(st.name) / IN_STEP).read_text()) != st.generation:
            return False
    except (OSError, ValueError):
        return False
    return all(state.pid_alive(ps.pause_pid) for ps in st.pods.values() if ps.phase == "Running")  # 4 ms at 10,000


def mark_in_step(st: state.LabState) -> None:
    recover.stamp_leases(st)  # the lease files as this generation leaves them (the next recover's shortcut)
    path = state.lab_dir(st.name) / IN_STEP
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(st.generation))
    tmp.replace(path)


def quick_alive(st: state.LabState) -> dict[str, bool]:
    """Every running pod alive: what a command on a lab found `in_step` (which saw each pause process a moment
    ago) passes for `alive`, instead of `kubelet.pods.alive_sandboxes`' two stats a pod (0.13 s at 10,000)."""
    return {key: True for key, ps in st.pods.items() if ps.phase == "Running"}


def _delta_ok(lab: Lab, delta: Delta) -> bool:
    """Whether a delta may stand for the change: the lab was in step, and its rules depend on pods only
    through the services selecting them. Not with the cilium profile (identities follow labels), nor where
    policies are enforced (a new pod is a peer of every policy naming its labels), nor with aws-vpc (ipamd's
    reconcile may start pods that waited for an address)."""
    return delta.base_in_step and lab.cni.profile not in ("cilium", "aws-vpc") and not lab.cni.enforces_policy


def _selected(lab: Lab, delta: Delta) -> bool:
    """Whether any service selects a pod that changed (with its labels before or after)."""
    return any(service.namespace == namespace and service.selects(dict(labels))
               for namespace, labels in delta.labels for service in lab.services)


ADDON_PODS = {"dns": f"{addons.DNS_NAMESPACE}/{addons.DNS_POD}",
              "ingress": f"{addons.INGRESS_NAMESPACE}/{addons.INGRESS_POD}"}


def reload_addons(st: state.LabState, lab: Lab) -> dict[str, str]:
    """Make each running addon daemon serve its configuration as written now (restart or SIGHUP), then
    record that it did: "written but not loaded" never outlives a command. Returns what was done."""
    run_dir = state.lab_dir(st.name)
    done = {}
    for addon, action in addons.pending(run_dir).items():
        key = ADDON_PODS[addon]
        ps = st.pods.get(key)
        if ps is None or ps.phase != "Running" or not runtime.sandbox_alive(ps.netns, ps.pause_pid):
            continue  # not running: it reads the files as they are when it starts
        if action == "restart":
            _restart_container(st, lab, key)
        else:
            for pid in ps.containers.values():
                if runtime.in_pod(pid, ps.netns):
                    addons.hangup(pid)
        addons.mark_loaded(addon, run_dir)
        done[addon] = action
    return done


def sync_policies(lab: Lab, running: list[RunningPod], name: str) -> network_policy.SyncReport:
    """Every node's NetworkPolicy rules for the pods running now (ready or not: a pod keeps its isolation
    while it starts, as Calico programs a workload's policy before it is ready)."""
    if lab.cni.profile == "cilium":  # identities, ipcache and endpoint policy maps (cilium/policy.py)
        from cilium import policy as cilium_policy  # only here (kubelet/pods.py in_pod_cgroup says why)

        report = cilium_policy.sync(lab, running, state.lab_dir(name) / "cilium")
        return network_policy.SyncReport(report.nodes, len(lab.network_policies), report.seconds, True)
    workloads = [network_policy.Workload(r.pod, r.ip) for r in running]
    return network_policy.sync(lab, workloads, state.lab_dir(name) / "network-policy")


def _restart_container(st: state.LabState, lab: Lab, key: str) -> None:
    """Stop a pod's containers and start them again (dnsmasq reads its records only at start)."""
    ps = st.pods.get(key)
    pod = next((p for p in lab.pods if p.key == key), None)
    if ps is None or pod is None:
        return
    process.kill_all([pid for pid in ps.containers.values() if runtime.in_pod(pid, ps.netns)])
    ps.containers = runtime.start_pod_containers(pod, ps.netns, ps.pause_pid, state.log_dir(lab.name), lab.name)
