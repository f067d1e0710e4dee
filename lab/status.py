"""What a running lab consists of, as a table for people and JSON for scripts."""
from __future__ import annotations

from typing import Any

from apiserver import state
from apiserver.desired import current_lab
from kubelet import runtime
from kubelet.pods import alive_sandboxes, running_pods
from services import endpoints, kube_proxy
from topo import names


def pod_status(pod: state.PodState, alive: bool | None = None, running: bool | None = None) -> str:
    """The STATUS column as `kubectl get pods` words it where the lab knows as much: Pending while its
    command makes it, Terminating while one removes it, Running while a container (or, for a pod of only
    the pause image, its sandbox) runs, Terminated once every container has exited (the lab does not keep
    exit codes, so it cannot say Completed or Error), Dead when the sandbox itself is gone."""
    if pod.waiting:  # Pending on purpose, e.g. no address left (aws-vpc): kubectl shows the waiting reason
        return pod.reason or "Pending"
    if pod.phase != "Running":
        return pod.phase
    if not (runtime.sandbox_alive(pod.netns, pod.pause_pid) if alive is None else alive):
        return "Dead"
    if running is None:
        running = not pod.containers or any(runtime.in_pod(pid, pod.netns) for pid in pod.containers.values())
    if not running:
        return "Terminated"
    return "Running"


def kernel_view(name: str, problem: str) -> dict[str, Any]:
    """What `lab status NAME` can still say when the lab's state is missing or damaged: the namespaces the
    kernel holds under the lab's prefix (the truth of last resort), and what is wrong."""
    from lab import apply

    spaces = apply.lab_namespaces(name)
    kinds: dict[str, list[str]] = {}
    for space in spaces:
        kind = space[len(names.NETNS_PREFIX) + len(name) + 1:].split(names.SEP, 1)[0]
        kinds.setdefault({"n": "nodes", "p": "pods", "u": "switches"}.get(kind, "other"), []).append(space)
    return {"name": name, "phase": "unknown", "problem": problem, "namespaces": kinds}


def describe(st: state.LabState, reveal: bool = False) -> dict[str, Any]:
    """The lab as JSON-able data. Random faults (`lab break --random`, a capstone's) are a puzzle: only
    their seed is shown, unless `reveal` (the details stay in the lab's faults.json for graders)."""
    lab = current_lab(st)  # the lab as it runs now (services too); its nodes are the spec's and those joined
    vpc = lab.cni.profile == "aws-vpc"  # no PodCIDR, no cni0: pods take subnet addresses (`lab ipam`)
    nodes = [{"name": n.name, "ip": str(n.ip), "podCIDR": "-" if vpc else str(n.pod_cidr),
              "gateway": "-" if vpc else str(n.gateway.ip), "netns": lab.node_netns(n.name),
              "instanceType": n.instance_type, "maxPods": n.max_pods} for n in lab.nodes]
    pods = []
    # Each running pod's sandbox is looked at once, for its STATUS and for the services' endpoints.
    # (a batch of two stats a pod: at 10,000 pods, looking at them one by one was a third of the command).
    alive = alive_sandboxes(st)
    containers = runtime.sandboxes_alive({(key, c): (pod.netns, pid) for key, pod in st.pods.items()
                                          if alive.get(key) for c, pid in pod.containers.items()})
    running = {key for key, _ in (k for k, up in containers.items() if up)}
    for key, pod in sorted(st.pods.items(), key=lambda kv: (kv[1].node, kv[0])):
        namespace, name = key.split("/", 1)
        status = pod_status(pod, alive.get(key), not pod.containers or key in running)
        pods.append({"namespace": namespace, "name": name, "node": pod.node, "ip": pod.ip,
                     "netns": pod.netns, "status": status, "containers": pod.containers,
                     "message": pod.message if pod.waiting else None})
    services = []
    if lab.services:
        for sp in endpoints.resolve(lab.services, running_pods(st, lab, alive)):
            services.append({"namespace": sp.service.namespace, "name": sp.service.name, "type": sp.service.type,
                             "clusterIP": str(sp.service.cluster_ip), "port": sp.port.port,
                             "protocol": sp.port.protocol, "nodePort": sp.port.node_port,
                             "endpoints": [str(e) for e in sp.endpoints]})
    faults = [{"fault": f.fault, "params": f.params, "detail": f.detail, "seed": f.seed}
              if reveal or f.seed is None else {"fault": None, "params": None, "detail": None, "seed": f.seed}
              for f in _recorded_faults(st.name)]
    waiting_nodes = [{"name": o["metadata"]["name"], "message": (o["metadata"].get("annotations") or {}).get(
        "kubenet-lab.io/waiting", "")} for o in st.objects if o.get("kind") == "Node"
        and o["metadata"]["name"] not in {n.name for n in lab.nodes}]
    return {"name": st.name, "phase": st.phase, "waitingNodes": waiting_nodes, "spec": st.spec_file,
            "exercise": st.exercise, "faults": faults,
            "backend": lab.network.backend, "mtu": lab.network.mtu, "kubeProxy": kube_proxy.mode_label(lab),
            "cni": lab.cni.profile,
            "services": services, "external": [{"name": e.name, "ip": str(e.ip)} for e in lab.external],
            "underlay": str(lab.underlay.subnet), "podCIDR": str(lab.cluster.pod_cidr),
            "serviceCIDR": str(lab.cluster.service_cidr), "nodes": nodes, "pods": pods}


def _recorded_faults(name: str) -> list:
    """The faults applied to the lab (grading/faults.py), read only when there are any: that module loads the
    spec validator (pydantic), a tenth of a second `lab status` does not need otherwise."""
    if not (state.lab_dir(name) / "faults.json").exists():  # grading.faults.FAULTS_FILE
        return []
    from grading.faults import recorded

    return recorded(name)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


ENDPOINTS_SHOWN = 3  # kubectl get endpoints prints three, then "+ N more..." (its printers' endpoint column)


def _endpoints(endpoints: list[str]) -> str:
    """A service port's endpoints as `kubectl get endpoints` shows them: a 10,000-pod service is one short
    cell, not 150 KB of one line (`lab status --json` keeps every one)."""
    if not endpoints:
        return "<none>"
    shown = ",".join(endpoints[:ENDPOINTS_SHOWN])
    more = len(endpoints) - ENDPOINTS_SHOWN
    return f"{shown} + {more} more..." if more > 0 else shown


def render(info: dict[str, Any]) -> str:
    head = (f"lab {info['name']} ({info['phase']}): backend {info['backend']}, MTU {info['mtu']}, "
            f"kube-proxy {info['kubeProxy']}, "
            f"underlay {info['underlay']}, pods {info['podCIDR']}, services {info['serviceCIDR']}")
    if info["backend"] == "vpc":  # aws-vpc: no PodCIDR or cni0; the instance sizes the node (lab ipam: its ENIs)
        nodes = [["NODE", "IP", "INSTANCE", "MAX-PODS", "STATUS"]] + [
            [n["name"], n["ip"], n.get("instanceType") or "", str(n.get("maxPods")), "Ready"] for n in info["nodes"]]
    else:
        gateway = "CILIUM_HOST" if info.get("cni") == "cilium" else "CNI0"
        nodes = [["NODE", "IP", "PODCIDR", gateway]] + [
            [n["name"], n["ip"], n["podCIDR"], n["gateway"]] for n in info["nodes"]]
    pods = [["POD", "NAMESPACE", "NODE", "IP", "STATUS"]] + [
        [p["name"], p["namespace"], p["node"], p["ip"], p["status"]] for p in info["pods"]]
    if info.get("waitingNodes"):  # Node objects the subnet had no address for (aws-vpc)
        nodes += [[n["name"], "<none>", "", "", "NotReady: cannot join: " + n["message"]] for n in info["waitingNodes"]]
    parts = [head, table(nodes), table(pods) if info["pods"] else "(no pods)"]
    waiting = [p for p in info["pods"] if p.get("message")]
    if waiting:  # kubelet's event for a sandbox that could not be made, as `kubectl describe pod` shows it
        parts.append("EVENTS\n" + "\n".join(f"  {p['namespace']}/{p['name']}: FailedCreatePodSandBox: {p['message']}"
                                            for p in waiting))
    if info["services"]:
        parts.append(table([["SERVICE", "NAMESPACE", "TYPE", "CLUSTER-IP", "PORT", "ENDPOINTS"]] + [
            [s["name"], s["namespace"], s["type"], s["clusterIP"],
             f"{s['port']}{':' + str(s['nodePort']) if s['nodePort'] else ''}/{s['protocol']}",
             _endpoints(s["endpoints"])] for s in info["services"]]))
    if info["external"]:
        parts.append(table([["EXTERNAL", "IP"]] + [[e["name"], e["ip"]] for e in info["external"]]))
    if info.get("faults"):  # `lab break` and an exercise's faults; random ones stay a puzzle
        shown = [f"  a random fault (seed {f['seed']})" if f["detail"] is None else
                 f"  {f['detail']}" + (f" (random, seed {f['seed']})" if f["seed"] is not None else "")
                 for f in info["faults"]]
        parts.append("FAULTS APPLIED\n" + "\n".join(shown))
    return "\n\n".join(parts)
