"""Bringing what is derived from a lab's objects in line with its desired state after a change: every node's
service rules (kube-proxy), NetworkPolicy rules (the CNI's policy agent), the cluster DNS records and the
ingress controller's routes.

`lab apply -f`, `lab delete` and a fault that changes a pod's labels all end with `resync`, as the
controllers of a cluster react to any change of pods or services.
"""
from __future__ import annotations

from apiserver import state
from apiserver.desired import current_lab
from cilium import agent
from cilium import policy as cilium_policy
from cni import network_policy
from kubelet import runtime
from kubelet.pods import running_pods
from reconcile import nodelocal
from services import addons, kube_proxy
from services.endpoints import RunningPod
from topo import process
from topo.model import Lab


def resync(st: state.LabState, alive: dict[str, bool] | None = None) -> kube_proxy.SyncReport:
    """Bring everything derived from the lab's objects up to date after a change of pods or services:
    every node's service rules, the NetworkPolicy rules, the cluster DNS's records, the ingress
    controller's routes. Each layer compares what it wants with what it last loaded, so running this
    again after a crash finishes what the crash interrupted, and a layer that is in line costs nothing.
    `alive`: whether each pod's sandbox lives, when the caller has just looked (`kubelet.pods.alive_sandboxes`)."""
    lab = current_lab(st)
    running = running_pods(st, lab, alive)
    if lab.cni.profile == "cilium":  # no kube-proxy: the agent's service maps
        cilium_report = agent.sync(lab, running)
        report = kube_proxy.SyncReport(cilium_report.nodes, cilium_report.frontends, cilium_report.backends,
                                       cilium_report.seconds)
    else:
        report = kube_proxy.sync(lab, running, state.lab_dir(st.name) / "kube-proxy")
    sync_policies(lab, running, st.name)
    run_dir = state.lab_dir(st.name)
    addons.write_configs(lab, running, run_dir)
    if "restart" in reload_addons(st, lab).values():
        state.save(st)  # a restarted container's new pid (the caller saved everything else before; a SIGHUP changes nothing)
    nodelocal.sync(lab)
    return report


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
