"""`lab apply -f` and `lab delete`: change the objects of a running lab, as kubectl changes a cluster.

Every change starts with `reconcile.recover` (finishing what a killed command left), records what it wants
before touching the kernel (objects, pods `Pending` or `Terminating`), makes or removes pods through the
path every pod takes (kubelet/pods.py: sandbox, CNI ADD with the node's persisted IPAM leases, containers;
CNI DEL returns the IP to the pool), and ends with `resync` (reconcile/resync.py), which brings every
node's service rules, the policies, the DNS records and the ingress routes in line and makes the daemons
load them. docs/architecture.md, "Changes converge", has the whole protocol.
"""
from __future__ import annotations

import dataclasses
import time
from ipaddress import IPv4Address
from pathlib import Path

from apiserver import state
from apiserver.desired import object_key, current_lab, model_of, remember_spec, spec_of
from apiserver.files import read_manifest
from apiserver.spec import parse_objects, pods_from_objects
from cni import network_policy
from kubelet import pods as kubelet
from kubelet.pods import running_pods
from lab import progress
from reconcile.recover import recover
from reconcile.resync import Delta, in_step, quick_alive, resync, sync_policies
from services import addons, kube_proxy
from services.endpoints import RunningPod
from topo import crash, names
from topo.security_spec import root_warning
from topo.errors import SpecError, SpecIssue, StateError
from topo.model import Lab, Pod
from cni.vpc_plugin import VpcAssignError


def _remember(st: state.LabState, objects: list[dict], before: Lab) -> list[str]:
    """Keep applied manifests (the newest of each object, overriding the spec's); report what changed."""
    known = {object_key(o): i for i, o in enumerate(st.objects)}
    existing = {f"Service/{s.key}": s for s in before.services} | {f"Ingress/{i.key}": i for i in before.ingresses} | {
        f"NetworkPolicy/{p.key}": p for p in before.network_policies}
    report = []
    before_nodes = {n.name for n in before.nodes} | {object_key(o).rsplit("/", 1)[1] for o in st.objects
                                                     if o.get("kind") == "Node"}
    owners = {f"Deployment/{p.namespace}/{p.owner}" for p in before.pods if p.owner} if any(
        o.get("kind") == "Deployment" for o in objects) else set()  # the spec's too; a pass over every pod
    for obj in objects:
        key = object_key(obj)
        if key in st.deleted:
            st.deleted.remove(key)
        same = False  # kubectl's "unchanged": the stored manifest (addresses pinned as on its first apply) is this one
        existed = key in known or key in owners
        if key in known:
            if obj.get("kind") == "Node":  # a running instance keeps its address (and its waiting note)
                obj["metadata"]["annotations"] = dict(st.objects[known[key]]["metadata"].get("annotations") or {})
            same = st.objects[known[key]] == obj
            st.objects[known[key]] = obj
        else:
            known[key] = len(st.objects)
            st.objects.append(obj)
        kind, namespace, name = key.split("/", 2)
        if kind == "Namespace":
            verb = "created" if name not in before.namespaces else "unchanged" if same else "configured"
            report.append(f"namespace {name} {verb}")
        elif kind == "Node":
            report.append(f"node/{name} {'unchanged' if name in before_nodes else 'created'}")
        elif kind == "DaemonSet":
            report.append(f"daemonset.apps {namespace}/{name} unchanged" if same else
                          f"daemonset.apps {namespace}/{name} configured (ipamd's warm pool settings)")
        elif kind in ("Service", "Ingress", "NetworkPolicy"):
            report.append(f"{kind.lower()} {namespace}/{name} "
                          f"{'unchanged' if same else 'configured' if key in existing else 'created'}")
        elif kind == "Deployment":  # kubectl's line for it; its pods' own lines follow
            report.append(f"deployment.apps {namespace}/{name} "
                          f"{'unchanged' if same else 'configured' if existed else 'created'}")
    return report


def apply_file(name: str | None, file: str) -> list[str]:
    """Create what the manifests add; report each object as created, configured, unchanged, moved or scaled.

    Desired state first: the objects and every pod about to be made or removed (`Pending`, `Terminating`)
    are recorded before the kernel is touched, and each pod's record is completed once it runs, so a command
    killed at any step leaves a record that `reconcile.recover` can finish from (the same `lab apply` run
    again converges)."""
    text = _read(file)
    name = state.resolve_name(name)
    with state.locked(name):
        st = state.load_running(name)
        remember_spec(st)
        base_in_step = in_step(st)
        found = current_lab(st)
        recovery = recover(st, found)
        report = recovery.lines()
        before = current_lab(st) if recovery.changed else found
        # each pod's sandbox looked at once, for every endpoints pass below
        alive = quick_alive(st) if base_in_step else kubelet.alive_sandboxes(st)
        existing = {p.key: p for p in before.pods}
        # Re-applying an object is not a name clash (kubectl reports it unchanged or configured): validate
        # the file against the lab without the objects it names, so capacity, placement and addresses
        # still count everything else.
        named = _named(text)
        deployments = {k.split("/", 1)[1] for k in named if k.startswith("Deployment/")}
        pod_keys = {k.split("/", 1)[1] for k in named if k.startswith("Pod/")} | {
            key for key, ps in st.pods.items() if f"{key.split('/', 1)[0]}/{ps.owner}" in deployments}
        others = dataclasses.replace(
            before, pods=tuple(p for p in before.pods if p.key not in pod_keys),
            services=tuple(s for s in before.services
                           if f"Service/{s.key}" not in named and s.key not in addons.SERVICES),
            ingresses=tuple(i for i in before.ingresses if f"Ingress/{i.key}" not in named),
            network_policies=tuple(p for p in before.network_policies if f"NetworkPolicy/{p.key}" not in named))
        objects = parse_objects(text, others, file)
        _pin_addresses(objects, before)
        wanted = pods_from_objects(objects, others, file)
        # A pod's node cannot change in place (Kubernetes refuses the update: spec.nodeName is immutable);
        # re-applying a Pod that names another node moves it: delete, then create there.
        given = _given_nodes(objects)
        moved = [p for p in wanted if p.key in existing and given.get(p.key) not in (None, existing[p.key].node)]
        _refuse_new_specs(objects, st, {p.key for p in moved}, file)
        new = [p for p in wanted if p.key not in existing or p in moved]
        report += _remember(st, objects, before)
        scaled_away = _scaled_away(objects, wanted, st)
        touched = [(p.namespace, p.labels) for p in wanted] + [
            (key.split("/", 1)[0], tuple(sorted(st.pods[key].labels.items())))
            for key in {p.key for p in wanted} | set(scaled_away) if key in st.pods]
        relabelled = [_relabel(st, p) for p in wanted if p.key in existing and p not in moved]
        report += relabelled
        after = current_lab(st)
        enabled = [p for p in after.pods if p.key not in st.pods and p.key not in {n.key for n in new}]  # addons
        new += enabled
        lab = dataclasses.replace(after, pods=after.pods + tuple(p for p in new if p not in after.pods))
        doomed = scaled_away + [p.key for p in moved]
        for key in doomed:
            st.pods[key].phase = "Terminating"
        for pod in new:
            st.pods.setdefault(pod.key, _pending(lab, pod))
        started = time.monotonic()
        st.record()
        saver = _Saver(st, time.monotonic() - started)
        crash.point("objects-recorded")
        # The DNS and ingress configurations as they must be before the new pods start (an addon just enabled
        # reads them at start; a pod going away leaves the records first). A file of only new pods changes
        # neither (pods count once running): then the resync below writes them, and this pass over every pod
        # (0.1-0.3 s at 10,000 pods) is skipped.
        if enabled or doomed or any(line.endswith("(labels)") for line in relabelled) or any(
                o.get("kind") not in ("Pod", "Deployment") for o in objects):
            addons.write_configs(lab, running_pods(st, after, alive), state.lab_dir(st.name))
        for key in doomed:
            alive.pop(key, None)
            _delete_pod(st, lab, key)
            saver.maybe()
            if key not in {p.key for p in moved}:
                report.append(f"pod {key} deleted (scaled down)")
        with progress.bar(f"lab apply: pods of {Path(file).name}", len(new)) as advance:
            for pod in new:
                st.pods[pod.key] = _pending(lab, pod)
                if not _make(st, lab, pod, alive):
                    report.append(f"pod {pod.key} created ({pod.node}), Pending: {st.pods[pod.key].message}")
                    advance(1)
                    continue
                saver.maybe()
                crash.point("pod-recorded")
                verb = "moved to" if pod in moved else "created"
                report.append(f"pod {pod.key} {verb} ({pod.node}, {st.pods[pod.key].ip})")
                advance(1)
        report += converge_vpc(st, alive)
        state.save(st)
        crash.point("resync")
        only_pods = all(o.get("kind") in ("Pod", "Deployment") for o in objects) and not enabled
        resync(st, alive, Delta(tuple(touched), base_in_step) if only_pods else None)
        policies = any(o.get("kind") == "NetworkPolicy" for o in objects)  # else the model is not derived again
        warning = network_policy.not_enforced_warning(current_lab(st)) if policies else None
    if warning:
        report.append(warning)  # "Warning: ..." lines go to stderr (lab/cli.py), as kubectl prints warnings
    root = root_warning(dataclasses.replace(lab, pods=tuple(new)))
    if root:
        report.append("W" + root[1:])  # the containers this file starts as root on the machine
    return report


def _make(st: state.LabState, lab: Lab, pod: Pod, alive: dict[str, bool]) -> bool:
    """Make one pod; False when the CNI had no address for it (aws-vpc: the subnet ran dry). Such a pod is
    recorded Pending with reason ContainerCreating and the CNI's message, not rolled back: it is still wanted,
    and the next `lab apply`/`lab delete` retries it (kubelet retries a failed sandbox the same way)."""
    try:
        st.pods[pod.key] = kubelet.add_pod(st, lab, pod, lambda p, ip: _protect(st, lab, p, ip, alive))
        alive[pod.key] = True
        return True
    except VpcAssignError as exc:
        st.pods[pod.key] = state.waiting_pod(pod, lab.pod_netns(pod), exc.msg)
        return False


def converge_vpc(st: state.LabState, alive: dict[str, bool]) -> list[str]:
    """aws-vpc: ipamd's reconcile loop (every node's pool against the current settings, releasing or
    growing), then nodes waiting for a primary address, then pods waiting for one."""
    if spec_of(st).cni.profile != "aws-vpc":  # the profile is the spec's: no need to derive the whole model
        return []
    lab = current_lab(st)
    with kubelet.ipamd_file(lab).locked() as ipamd:
        for pool in ipamd.nodes.values():
            ipamd.top_up(pool)
    from lab import nodes  # here: it imports how nodes are built (routing, tunnels), which no other change needs

    report = nodes.join(st)
    return report + retry_waiting(st, current_lab(st), alive)


def retry_waiting(st: state.LabState, lab: Lab, alive: dict[str, bool]) -> list[str]:
    """Give every pod waiting for an address another try, oldest first; report those that got one. The record
    stays "waiting" while it is tried, so a crash in the middle leaves it waiting (recover removes what was made
    of it) rather than forgotten."""
    out = []
    for key, ps in list(st.pods.items()):
        if not ps.waiting:
            continue
        pod = next((p for p in lab.pods if p.key == key), None)
        if pod is None:
            continue
        state.save(st)
        if _make(st, lab, pod, alive):
            out.append(f"pod {key} got an address and started ({pod.node}, {st.pods[key].ip})")
    return out


def _read(file: str) -> str:
    """The manifest file, read the one way every spec file is (size limit, symlink loops, devices refused)."""
    return read_manifest(file)


def _pending(lab: Lab, pod: Pod) -> state.PodState:
    """The record of a pod about to be made: enough for `recover` to find and remove whatever exists of it."""
    record = state.pod_state(pod, "", lab.pod_netns(pod), 0, {})
    record.phase = "Pending"
    return record


class _Saver:
    """Writes the state after pods are made or removed, at most every SAVE_EVERY seconds, and never more than
    a tenth of the time (a save of 10,000 pods takes 50 ms): a record per pod would rewrite the whole file
    once per pod (quadratic in a large apply). Between writes the `Pending` and `Terminating` records already
    on file say what was under way, so nothing is lost by waiting."""

    SAVE_EVERY = 0.25

    def __init__(self, st: state.LabState, cost: float = 0.0) -> None:
        self.st = st
        self.last = time.monotonic()
        self.cost = cost  # what the last save took

    def maybe(self) -> None:
        now = time.monotonic()
        if now - self.last >= max(self.SAVE_EVERY, 10 * self.cost):
            state.save(self.st)
            self.last = time.monotonic()
            self.cost = self.last - now


def _given_nodes(objects: list[dict]) -> dict[str, str]:
    """`namespace/name` -> spec.nodeName of the Pods in a file that name their node."""
    out = {}
    for obj in objects:
        if obj.get("kind") == "Pod" and (obj.get("spec") or {}).get("nodeName"):
            meta = obj.get("metadata") or {}
            out[f"{meta.get('namespace', 'default')}/{meta.get('name')}"] = obj["spec"]["nodeName"]
    return out


def _refuse_new_specs(objects: list[dict], st: state.LabState, moved: set[str], file: str) -> None:
    """A running pod re-applied with another spec (a dnsConfig, a container's args) is refused, as the API
    server refuses such a pod update ("pod updates may not change fields other than ..."): the pod runs as
    it was made, and "unchanged" would say otherwise. Its labels may change (`_relabel`), its node moves it."""
    stored = {object_key(o): o for o in st.objects if o.get("kind") == "Pod"}
    issues = []
    for i, obj in enumerate(objects):
        key = object_key(obj)
        old = stored.get(key)
        pod_key = key.split("/", 1)[1]
        if old is None or pod_key in moved or pod_key not in st.pods:
            continue
        if _spec_in_place(obj) != _spec_in_place(old):
            namespace, name = pod_key.split("/", 1)
            issues.append(SpecIssue(f"objects[{i}].spec", f"pod {pod_key} runs with another spec, and a pod's spec "
                                    "cannot change in place (Kubernetes refuses the update): delete it first "
                                    f"(lab delete pod {name} -n {namespace}), then apply"))
    if issues:
        raise SpecError(file, issues)


def _spec_in_place(manifest: dict) -> dict:
    """A Pod manifest's spec without its node (another node moves the pod: delete, then create there)."""
    return {k: v for k, v in (manifest.get("spec") or {}).items() if k != "nodeName"}


def _relabel(st: state.LabState, pod: Pod) -> str:
    """A re-applied pod whose labels changed gets the new labels in place, without a restart (as the API
    server updates a pod's metadata); the resync after it moves it into and out of services and policies.
    Anything else that changed in a running pod is left as it runs (Kubernetes refuses most such updates)."""
    ps = st.pods[pod.key]
    if ps.labels == pod.label_map:
        return f"pod {pod.key} unchanged"
    ps.labels = pod.label_map
    return f"pod {pod.key} configured (labels)"


def _named(text: str) -> set[str]:
    """`Kind/ns/name` of every object a manifest file names (a lenient read; errors are parse_objects')."""
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    except yaml.YAMLError:
        return set()
    items = [i for d in docs for i in (d.get("items") or [] if d.get("kind") == "List" else [d]) if isinstance(i, dict)]
    return {object_key(i) for i in items if isinstance(i.get("metadata"), dict)}


def _pin_addresses(objects: list[dict], before: Lab) -> None:
    """A re-applied Service that leaves out its clusterIP or nodePorts keeps the ones it has, as the API
    server keeps them on an update; only a new service gets new addresses."""
    running = {f"Service/{s.key}": s for s in before.services}
    for obj in objects:
        svc = running.get(object_key(obj)) if obj.get("kind") == "Service" else None
        if svc is None or svc.type == "ExternalName":
            continue  # an ExternalName service has no addresses to keep (and may not be given a clusterIP)
        spec = obj.setdefault("spec", {})
        spec["clusterIP"] = str(svc.cluster_ip) if svc.cluster_ip is not None else "None"
        by_port = {(p.port, p.protocol): p.node_port for p in svc.ports}
        for port in spec.get("ports") or []:
            old = by_port.get((port.get("port"), port.get("protocol", "TCP")))
            if old is not None and spec.get("type") == "NodePort":
                port["nodePort"] = old


def _backends(ingress) -> set[str]:
    found = {p.backend.service for r in ingress.rules for p in r.paths}
    return found | ({ingress.default_backend.service} if ingress.default_backend else set())


def _scaled_away(objects: list[dict], wanted: list[Pod], st: state.LabState) -> list[str]:
    keep = {p.key for p in wanted}
    doomed = []
    for obj in objects:
        if obj.get("kind") != "Deployment":
            continue
        meta = obj.get("metadata", {})
        owner, namespace = meta.get("name"), meta.get("namespace", "default")
        doomed += [key for key, ps in st.pods.items()
                   if ps.owner == owner and key.startswith(f"{namespace}/") and key not in keep]
    return doomed


def _protect(st: state.LabState, lab: Lab, pod: Pod, ip: IPv4Address, alive: dict[str, bool]) -> None:
    """A new pod's NetworkPolicy rules, loaded once it has its IP and before its containers start: it starts
    isolated if a policy selects it, and the rules naming it as a peer hold its address. (Calico drops a
    workload's traffic until felix has programmed its policy, so no pod ever runs unprotected.)"""
    if not lab.cni.enforces_policy:
        return  # nothing to program (sync_policies would return at once): skip gathering every pod
    sync_policies(lab, running_pods(st, lab, alive) + [RunningPod(pod, ip, False)], st.name)


def _delete_pod(st: state.LabState, lab: Lab, key: str) -> None:
    """Remove one pod and forget it: its record, its manifest, its UDP conntrack entries on every node."""
    ps = st.pods[key]
    kubelet.remove_pod(lab, key, ps.node)
    del st.pods[key]
    st.objects = [o for o in st.objects if object_key(o) != f"Pod/{key}"]
    crash.point("pod-deleted")
    pod = next((p for p in lab.pods if p.key == key), None)
    if ps.ip and pod is not None:
        kube_proxy.forget_endpoint(lab, RunningPod(pod, IPv4Address(ps.ip)))


ALIASES = {"pods": "pod", "po": "pod", "deployments": "deployment", "deploy": "deployment",
           "services": "service", "svc": "service", "ingresses": "ingress", "ing": "ingress",
           "networkpolicies": "networkpolicy", "netpol": "networkpolicy", "namespaces": "namespace", "ns": "namespace"}
KIND_NAMES = {"pod": "Pod", "deployment": "Deployment", "service": "Service", "ingress": "Ingress",
              "networkpolicy": "NetworkPolicy", "namespace": "Namespace"}


def delete(name: str | None, kind: str, target: str, namespace: str = "default") -> list[str]:
    """`lab delete KIND NAME`: a pod, a deployment and its pods, a service, an ingress, a network policy or an
    applied namespace that holds no pods."""
    kind = ALIASES.get(kind.lower(), kind.lower())
    if kind not in KIND_NAMES:
        raise StateError(f"lab delete: kind {kind} is not supported (pod, deployment, service, ingress, "
                         "networkpolicy, namespace)")
    return _delete_objects(name, [(KIND_NAMES[kind], "default" if kind == "namespace" else namespace, target)],
                           missing_ok=False)


def delete_file(name: str | None, file: str) -> list[str]:
    """`lab delete -f FILE`: remove every object the file declares, as `kubectl delete -f --ignore-not-found`
    does: objects that are not there are reported as such, so the same command run twice converges."""
    keys = sorted(_named(_read(file)), key=lambda k: ("Namespace" == k.split("/")[0], k))
    if not keys:
        raise SpecError(file, [SpecIssue("", "declares no object (apiVersion, kind and metadata.name)")])
    wanted = []
    for key in keys:
        kind, namespace, target = key.split("/", 2)
        if kind not in KIND_NAMES.values():
            raise SpecError(file, [SpecIssue("", f"lab delete -f: kind {kind} is not supported")])
        wanted.append((kind, namespace, target))
    return _delete_objects(name, wanted, missing_ok=True)


def _delete_objects(name: str | None, wanted: list[tuple[str, str, str]], missing_ok: bool) -> list[str]:
    name = state.resolve_name(name)
    with state.locked(name):
        st = state.load_running(name)
        remember_spec(st)
        base_in_step = in_step(st)
        report = recover(st, current_lab(st)).lines()
        lab = current_lab(st)
        spec_keys = _spec_keys(st)
        pods, missing = [], []
        for kind, namespace, target in wanted:
            key = f"{kind}/{namespace}/{target}"
            if kind == "Pod":
                found = [f"{namespace}/{target}"] if f"{namespace}/{target}" in st.pods else []
            elif kind == "Deployment":
                found = [k for k, ps in st.pods.items() if ps.owner == target and k.startswith(f"{namespace}/")]
            elif kind == "Namespace":
                found = [key] if any(object_key(o) == key for o in st.objects) else []
                busy = [k for k in st.pods if k.startswith(f"{target}/") and k not in pods]
                if found and busy:
                    raise StateError(f"namespace {target} still has pods ({', '.join(sorted(busy)[:3])}): "
                                     "delete them first")
            else:
                known = {"Service": lab.services, "Ingress": lab.ingresses}.get(kind, lab.network_policies)
                found = [key] if any(f"{kind}/{o.key}" == key for o in known) else []
                users = [i.key for i in lab.ingresses if i.namespace == namespace and target in _backends(i)
                         and f"Ingress/{i.key}" not in {f"{k}/{n}/{t}" for k, n, t in wanted}]
                if found and kind == "Service" and users:
                    raise StateError(f"service {namespace}/{target} is a backend of ingress {', '.join(users)}: "
                                     "delete or change the ingress first")
            applied = kind == "Deployment" and any(object_key(o) == key for o in st.objects)  # even with no pods
            if not found and not applied:
                missing.append(f"{kind.lower()} {names.shown(namespace)}/{names.shown(target)}" if kind != "Namespace"
                               else f"namespace {names.shown(target)}")
                continue
            if kind in ("Pod", "Deployment"):
                pods += found
                report += [f"pod {k} deleted" for k in found]
                if applied:
                    report.append(f"deployment.apps {namespace}/{target} deleted")  # kubectl's name for the kind
            else:
                report.append(f"{kind.lower()} {namespace}/{target} deleted" if kind != "Namespace"
                              else f"namespace {target} deleted")
            st.objects = [o for o in st.objects if object_key(o) != key]
            if key in spec_keys and key not in st.deleted:
                st.deleted.append(key)  # a spec object stays deleted; an applied one is simply forgotten
        if missing and not missing_ok:
            raise StateError(f"no {missing[0]} in lab {st.name}")
        for key in pods:
            st.pods[key].phase = "Terminating"
        st.record()
        crash.point("objects-recorded")
        touched = [(key.split("/", 1)[0], tuple(sorted(st.pods[key].labels.items()))) for key in pods]
        with progress.bar("lab delete: pods", len(pods)) as advance:
            for key in pods:
                _delete_pod(st, lab, key)
                advance(1)
        alive = quick_alive(st) if base_in_step else kubelet.alive_sandboxes(st)
        report += converge_vpc(st, alive)
        state.save(st)
        crash.point("resync")
        only_pods = all(kind in ("Pod", "Deployment") for kind, _namespace, _target in wanted)
        resync(st, alive, Delta(tuple(touched), base_in_step) if only_pods else None)
    # Like `kubectl delete -f --ignore-not-found`: running the same delete again (after it was killed, or
    # after it succeeded) converges instead of failing on what is already gone.
    report += [f"{m} not found (nothing to delete)" for m in missing]
    return report


def _spec_keys(st: state.LabState) -> set[str]:
    """`Kind/ns/name` of the objects the lab's spec declares (deleting one must be remembered)."""
    spec = model_of(st)
    return ({f"Service/{s.key}" for s in spec.services} | {f"Ingress/{i.key}" for i in spec.ingresses}
            | {f"NetworkPolicy/{p.key}" for p in spec.network_policies})
