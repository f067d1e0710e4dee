"""What a running lab consists of, as a table for people and JSON for scripts."""
from __future__ import annotations

from typing import Any

from apiserver import state
from apiserver.desired import current_lab
from kubelet import runtime
from kubelet.pods import alive_sandboxes, running_pods
from services import endpoints, kube_proxy
from topo import names
from topo.model import Lab


def pod_status(pod: state.PodState, alive: bool | None = None, running: int | None = None) -> str:
    """The STATUS column as `kubectl get pods` words it where the lab knows as much: Pending while its
    command makes it, Terminating while one removes it, Running while its containers (or, for a pod of only
    the pause image, its sandbox) run, NotReady while some of them have exited and others run (kubectl's
    word for a running pod that is not ready), Terminated once every container has exited (the lab keeps no
    exit codes, so it cannot say Completed or Error), Dead when the sandbox itself is gone. `running`: how
    many of the pod's container processes live (looked at here when not given)."""
    if pod.waiting:  # Pending on purpose, e.g. no address left (aws-vpc): kubectl shows the waiting reason
        return pod.reason or "Pending"
    if pod.phase != "Running":
        return pod.phase
    if not (runtime.sandbox_alive(pod.netns, pod.pause_pid) if alive is None else alive):
        return "Dead"
    if not pod.containers:
        return "Running"
    if running is None:
        running = sum(runtime.in_pod(pid, pod.netns) for pid in pod.containers.values())
    return "Terminated" if running == 0 else "NotReady" if running < len(pod.containers) else "Running"


def ready(pod: state.PodState, alive: bool | None, running: int) -> str:
    """kubectl's READY column: containers running of those the lab runs as processes (a pause-image container
    has none: a pod of only the pause image counts its sandbox, 1/1)."""
    if not pod.containers:
        return f"{int(bool(alive) and pod.phase == 'Running' and not pod.waiting)}/1"
    return f"{running if alive and pod.phase == 'Running' else 0}/{len(pod.containers)}"


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
    """The lab as JSON-able data. Random faults (`lab break --random`, a capstone's) and an exercise's own
    faults are a puzzle: only that they were applied (and the seed) is shown, unless `reveal` (the details
    stay in the lab's faults.json for graders)."""
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
    running: dict[str, int] = {}
    for (key, _), up in containers.items():
        running[key] = running.get(key, 0) + up
    for key, pod in sorted(st.pods.items(), key=lambda kv: (kv[1].node, kv[0])):
        namespace, name = key.split("/", 1)
        status = pod_status(pod, alive.get(key), running.get(key, 0))
        pods.append({"namespace": namespace, "name": name, "node": pod.node, "ip": pod.ip,
                     "netns": pod.netns, "ready": ready(pod, alive.get(key), running.get(key, 0)),
                     "status": status, "containers": pod.containers,
                     "message": pod.message if pod.waiting else None})
    services = []
    if lab.services:
        for sp in endpoints.resolve(lab.services, running_pods(st, lab, alive)):
            services.append({"namespace": sp.service.namespace, "name": sp.service.name, "type": sp.service.type,
                             "clusterIP": str(sp.service.cluster_ip), "port": sp.port.port,
                             "protocol": sp.port.protocol, "nodePort": sp.port.node_port,
                             "endpoints": [str(e) for e in sp.endpoints]})
    faults = [{"fault": f.fault, "params": f.params, "detail": f.detail, "seed": f.seed, "exercise": f.exercise}
              if reveal or not f.secret else
              {"fault": None, "params": None, "detail": None, "seed": f.seed, "exercise": f.exercise}
              for f in _recorded_faults(st.name)]
    waiting_nodes = [{"name": o["metadata"]["name"], "message": (o["metadata"].get("annotations") or {}).get(
        "kubenet-lab.io/waiting", "")} for o in st.objects if o.get("kind") == "Node"
        and o["metadata"]["name"] not in {n.name for n in lab.nodes}]
    return {"name": st.name, "phase": st.phase, "waitingNodes": waiting_nodes, "spec": st.spec_file,
            "exercise": st.exercise, "faults": faults,
            "backend": lab.network.backend, "mtu": lab.network.mtu, "kubeProxy": kube_proxy.mode_label(lab),
            "cni": lab.cni.profile,
            "services": services, "external": [{"name": e.name, "ip": str(e.ip)} for e in lab.external],
            "underlay": _underlay(lab), "podCIDR": _pod_addresses(lab),
            "serviceCIDR": str(lab.cluster.service_cidr), "nodes": nodes, "pods": pods}


def _underlay(lab: Lab) -> str:
    """The underlay's subnet, or with racks each rack's (a routed underlay has no one subnet)."""
    if lab.underlay.subnet is not None:
        return str(lab.underlay.subnet)
    return ", ".join(f"{r.name} {r.subnet}" for r in lab.underlay.racks)


def _pod_addresses(lab: Lab) -> str:
    """Where pods get addresses: the cluster's pod CIDR, or with the aws-vpc profile the VPC subnet(s) (custom
    networking: the ENIConfig's subnet), as the Amazon VPC CNI gives pods addresses of the VPC."""
    if lab.cni.profile != "aws-vpc":
        return str(lab.cluster.pod_cidr)
    return str(lab.vpc.custom_network) if lab.vpc.custom_network is not None else _underlay(lab)


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
    pods = [["POD", "NAMESPACE", "NODE", "IP", "READY", "STATUS"]] + [
        [p["name"], p["namespace"], p["node"], p["ip"], p["ready"], p["status"]] for p in info["pods"]]
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
        shown = [(f"  a random fault (seed {f['seed']})" if f["seed"] is not None else
                  "  a fault of the exercise: find it") if f["detail"] is None else
                 f"  {f['detail']}" + (f" (random, seed {f['seed']})" if f["seed"] is not None else
                                       " (the exercise's)" if f.get("exercise") else "")
                 for f in info["faults"]]
        parts.append("FAULTS APPLIED\n" + "\n".join(shown))
    return "\n\n".join(parts)
