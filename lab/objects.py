"""`lab apply -f` and `lab delete`: change the objects of a running lab, as kubectl changes a cluster.

A pod added later goes through exactly the path a pod of `lab up` takes (sandbox, CNI ADD with the
node's persisted IPAM leases, containers); a deleted pod through CNI DEL, so its IP returns to the pool.
After any change, every node's service rules, the DNS records and the ingress routes are brought up to
date (`resync`, reconcile/resync.py).
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

from apiserver import state
from apiserver.desired import _key, current_lab
from cni import network_policy
from cni.plugin import BridgePlugin
from kubelet import runtime
from kubelet.pods import running_pods
from lab import apply, plan
from reconcile.resync import resync, sync_policies
from services import addons, kube_proxy
from services.endpoints import RunningPod
from topo import netns
from topo.errors import SpecError, SpecIssue, StateError
from topo.model import Lab, Pod
from apiserver.spec import parse_objects, pods_from_objects


def _remember(st: state.LabState, objects: list[dict], before: Lab) -> list[str]:
    """Keep applied manifests (the newest of each object, overriding the spec's); report what changed."""
    known = {_key(o): i for i, o in enumerate(st.objects)}
    existing = {f"Service/{s.key}": s for s in before.services} | {f"Ingress/{i.key}": i for i in before.ingresses} | {
        f"NetworkPolicy/{p.key}": p for p in before.network_policies}
    report = []
    for obj in objects:
        key = _key(obj)
        if key in st.deleted:
            st.deleted.remove(key)
        if key in known:
            st.objects[known[key]] = obj
        else:
            known[key] = len(st.objects)
            st.objects.append(obj)
        kind, namespace, name = key.split("/", 2)
        if kind == "Namespace" and name not in before.namespaces:
            report.append(f"namespace {name} created")
        elif kind in ("Service", "Ingress", "NetworkPolicy"):
            report.append(f"{kind.lower()} {namespace}/{name} {'configured' if key in existing else 'created'}")
    return report


def _locked_state(st: state.LabState) -> state.LabState:
    """The lab's state re-read under the lock: it may have gone down while we waited."""
    fresh = state.load(st.name)
    if fresh is None or fresh.phase != "up":
        raise StateError(f"lab {st.name} is not running any more")
    return fresh


def apply_file(name: str | None, file: str) -> list[str]:
    """Create what the manifests add; report each object as created, unchanged or scaled."""
    try:
        text = Path(file).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(file, [SpecIssue("", f"cannot read: {exc}")]) from exc
    st = state.resolve(name)
    with state.locked():
        st = _locked_state(st)
        before = current_lab(st)
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
        new = [p for p in wanted if p.key not in existing]
        report = _remember(st, objects, before)
        report += [_relabel(st, p) for p in wanted if p.key in existing]
        after = current_lab(st)
        new += [p for p in after.pods if p.key not in st.pods and p.key not in {n.key for n in new}]  # addons
        lab = dataclasses.replace(after, pods=after.pods + tuple(p for p in new if p not in after.pods))
        try:
            addons.write_configs(lab, running_pods(st, after), state.lab_dir(st.name))  # before their pods start
            for key in _scaled_away(objects, wanted, st):
                _delete_pod(st, lab, key)
                report.append(f"pod {key} deleted (scaled down)")
            for pod in new:
                _add_pod(st, lab, pod, lambda p, ip: _protect(st, lab, p, ip))
                report.append(f"pod {pod.key} created ({pod.node}, {st.pods[pod.key].ip})")
        finally:
            state.save(st)  # whatever happened so far, the state says so
        resync(st)
        warning = network_policy.not_enforced_warning(current_lab(st))
    if warning and any(o.get("kind") == "NetworkPolicy" for o in objects):
        report.append(warning)  # "Warning: ..." lines go to stderr (lab/cli.py), as kubectl prints warnings
    return report


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
    return {_key(i) for i in items if isinstance(i.get("metadata"), dict)}


def _pin_addresses(objects: list[dict], before: Lab) -> None:
    """A re-applied Service that leaves out its clusterIP or nodePorts keeps the ones it has, as the API
    server keeps them on an update; only a new service gets new addresses."""
    running = {f"Service/{s.key}": s for s in before.services}
    for obj in objects:
        svc = running.get(_key(obj)) if obj.get("kind") == "Service" else None
        if svc is None:
            continue
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


def _plugin(lab: Lab, node: str, host) -> BridgePlugin:  # host: topo.rtnl.Rtnl
    return BridgePlugin(plan.netconf(lab, node, state.ipam_dir(lab.name)), host)


def _protect(st: state.LabState, lab: Lab, pod: Pod, ip: IPv4Address) -> None:
    """A new pod's NetworkPolicy rules, loaded once it has its IP and before its containers start: it starts
    isolated if a policy selects it, and the rules naming it as a peer hold its address. (Calico drops a
    workload's traffic until felix has programmed its policy, so no pod ever runs unprotected.)"""
    sync_policies(lab, running_pods(st, lab) + [RunningPod(pod, ip, False)], st.name)


def _add_pod(st: state.LabState, lab: Lab, pod: Pod,
             before_start: Callable[[Pod, IPv4Address], None] | None = None) -> None:
    """One pod the way `lab up` makes it; a failure removes what was made of it. `before_start` runs once
    the pod has its IP, before its containers start."""
    ns = lab.pod_netns(pod)
    args = plan.cni_args(lab, pod)
    pause = runtime.pause_binary(state.RUN_DIR / state.BIN)
    files = state.pod_dir(lab.name, pod)
    runtime.write_pod_files(files, addons.pod_resolv_conf(lab, pod), addons.pod_hosts(pod, None))
    with netns.rtnl_in(lab.node_netns(pod.node)) as host:
        plugin = _plugin(lab, pod.node, host)
        netns.create(ns)
        try:
            pause_pid = runtime.start_sandbox(ns, pod.name, pause, files)
            result = plugin.add(args)
            runtime.write_pod_files(files, addons.pod_resolv_conf(lab, pod),
                                    addons.pod_hosts(pod, result["ips"][0]["address"].split("/")[0]))
            if before_start is not None:
                before_start(pod, IPv4Address(result["ips"][0]["address"].split("/")[0]))
            containers = runtime.start_pod_containers(pod, ns, pause_pid, state.log_dir(lab.name))
        except BaseException:
            apply.remove_namespace(ns)
            plugin.delete(args)  # the lease (and veth) of an ADD that succeeded before a later step failed
            raise
        apply.wait_link(host, args.host_ifname)
    st.pods[pod.key] = state.pod_state(pod, result["ips"][0]["address"].split("/")[0], ns, pause_pid, containers)


def _delete_pod(st: state.LabState, lab: Lab, key: str) -> None:
    ps = st.pods.get(key)
    if ps is None:
        raise StateError(f"no pod {key} in lab {st.name}")
    namespace, name = key.split("/", 1)
    pod = Pod(name=name, namespace=namespace, node=ps.node)
    args = plan.cni_args(lab, pod)
    apply.remove_namespace(ps.netns)
    shutil.rmtree(state.pod_dir(lab.name, pod), ignore_errors=True)
    with netns.rtnl_in(lab.node_netns(ps.node)) as host:
        _plugin(lab, ps.node, host).delete(args)
        # A deleted veth's name stays taken for a few tens of ms; wait so the pod can come back at once.
        deadline = time.monotonic() + 2.0
        while host.link(args.host_ifname) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
    del st.pods[key]
    kube_proxy.forget_endpoint(lab, ps.ip)


def delete(name: str | None, kind: str, target: str, namespace: str = "default") -> list[str]:
    """`lab delete pod NAME` / `lab delete deployment NAME` (its replicas)."""
    st = state.resolve(name)
    with state.locked():
        st = _locked_state(st)
        lab = current_lab(st)
        aliases = {"pods": "pod", "po": "pod", "deployments": "deployment", "deploy": "deployment",
                   "services": "service", "svc": "service", "ingresses": "ingress", "ing": "ingress",
                   "networkpolicies": "networkpolicy", "netpol": "networkpolicy"}
        kind = aliases.get(kind.lower(), kind.lower())
        if kind == "pod":
            keys = [f"{namespace}/{target}"]
            if keys[0] not in st.pods:
                raise StateError(f"no pod {keys[0]} in lab {st.name}")
        elif kind in ("service", "ingress", "networkpolicy"):
            kind_name = {"networkpolicy": "NetworkPolicy"}.get(kind, kind.capitalize())
            key = f"{kind_name}/{namespace}/{target}"
            known = {"Service": lab.services, "Ingress": lab.ingresses}.get(kind_name, lab.network_policies)
            if not any(f"{kind_name}/{o.key}" == key for o in known):
                raise StateError(f"no {kind_name.lower()} {namespace}/{target} in lab {st.name}")
            users = [i.key for i in lab.ingresses if i.namespace == namespace and target in _backends(i)]
            if kind_name == "Service" and users:
                raise StateError(f"service {namespace}/{target} is a backend of ingress {', '.join(users)}: "
                                 "delete or change the ingress first")
            st.objects = [o for o in st.objects if _key(o) != key]
            st.deleted.append(key)
            state.save(st)
            resync(st)
            return [f"{kind_name.lower()} {namespace}/{target} deleted"]
        elif kind == "deployment":
            keys = [k for k, ps in st.pods.items() if ps.owner == target and k.startswith(f"{namespace}/")]
            if not keys:
                raise StateError(f"no deployment {namespace}/{target} in lab {st.name}")
        else:
            raise StateError(f"lab delete: kind {kind} is not supported (pod, deployment)")
        try:
            for key in keys:
                _delete_pod(st, lab, key)
        finally:
            state.save(st)
            resync(st)
    return [f"pod {k} deleted" for k in keys]


