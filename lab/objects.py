"""`lab apply -f` and `lab delete`: change the objects of a running lab, as kubectl changes a cluster.

A pod added later goes through exactly the path a pod of `lab up` takes (sandbox, CNI ADD with the
node's persisted IPAM leases, containers); a deleted pod through CNI DEL, so its IP returns to the pool.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from ipaddress import IPv4Address

from cni.plugin import BridgePlugin
from lab import addons, apply, plan, runtime, state
from lab.status import model_of
from services import kube_proxy
from services.endpoints import RunningPod
from topo import netns, process
from topo.errors import SpecError, SpecIssue, StateError
from topo.model import Container, ContainerPort, Lab, Pod
from topo.spec import ingresses_from_objects, parse_objects, pods_from_objects, services_from_objects


def current_lab(st: state.LabState) -> Lab:
    """The lab's model as it runs now: spec pods plus applied minus deleted, spec and applied namespaces."""
    base = model_of(st)
    namespaces = dict(base.namespaces)
    for obj in st.objects:
        if obj.get("kind") == "Namespace":
            meta = obj.get("metadata", {})
            namespaces.setdefault(meta["name"], {}).update(meta.get("labels") or {})
    by_key = {p.key: p for p in base.pods}
    pods = []
    for key, ps in st.pods.items():
        namespace, name = key.split("/", 1)
        known = by_key.get(key)
        ports = tuple(ContainerPort(number, proto, port_name) for port_name, number, proto in ps.ports)
        pods.append(known if known is not None else
                    Pod(name=name, namespace=namespace, node=ps.node, labels=tuple(sorted(ps.labels.items())),
                        containers=(Container("ports", None, (), ports),) if ports else (), owner=ps.owner))
    applied = [o for o in st.objects if o.get("kind") == "Service"]
    services = [svc for svc in list(base.services) + services_from_objects(applied, base, None)
                if f"Service/{svc.key}" not in st.deleted]
    with_services = dataclasses.replace(base, pods=tuple(pods), namespaces=namespaces, services=tuple(services))
    applied_ingresses = [o for o in st.objects if o.get("kind") == "Ingress"]
    ingresses = [ing for ing in list(base.ingresses) + ingresses_from_objects(applied_ingresses, base, None)
                 if f"Ingress/{ing.key}" not in st.deleted]
    return dataclasses.replace(with_services, ingresses=tuple(ingresses))


def running_pods(st: state.LabState, lab: Lab) -> list[RunningPod]:
    """The lab's pods with their IPs, ready while their sandbox lives (what the endpoints controller sees)."""
    out = []
    for pod in lab.pods:
        ps = st.pods[pod.key]
        out.append(RunningPod(pod, IPv4Address(ps.ip), runtime.sandbox_alive(ps.netns, ps.pause_pid)))
    return out


def resync(st: state.LabState) -> kube_proxy.SyncReport:
    """Bring everything derived from the lab's objects up to date after a change of pods or services:
    every node's service rules, the cluster DNS's records, the ingress controller's routes."""
    lab = current_lab(st)
    running = running_pods(st, lab)
    report = kube_proxy.sync(lab, running, state.lab_dir(st.name) / "kube-proxy")
    todo = addons.write_configs(lab, running, state.lab_dir(st.name))
    dns_key = f"{addons.DNS_NAMESPACE}/{addons.DNS_POD}"
    if todo.get("dns") == "restart":
        _restart_container(st, lab, dns_key)
    for key, action in ((dns_key, todo.get("dns")), (f"{addons.INGRESS_NAMESPACE}/{addons.INGRESS_POD}",
                                                     todo.get("ingress"))):
        if action == "hup" and key in st.pods:
            for pid in st.pods[key].containers.values():
                addons.hangup(pid)
    state.save(st)
    return report


def _restart_container(st: state.LabState, lab: Lab, key: str) -> None:
    """Stop a pod's containers and start them again (dnsmasq reads its records only at start)."""
    ps = st.pods.get(key)
    pod = next((p for p in lab.pods if p.key == key), None)
    if ps is None or pod is None:
        return
    process.kill_all(list(ps.containers.values()))
    ps.containers = runtime.start_pod_containers(pod, ps.netns, ps.pause_pid, state.log_dir(lab.name))


def _service_key(obj: dict) -> str:
    meta = obj.get("metadata", {})
    return f"{meta.get('namespace', 'default')}/{meta.get('name')}"


def _object_key(obj: dict) -> tuple[str, str, str]:
    meta = obj.get("metadata", {})
    return obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")


def _remember(st: state.LabState, objects: list[dict]) -> list[str]:
    """Keep applied manifests (the newest of each object); report namespaces that are new."""
    known = {_object_key(o): i for i, o in enumerate(st.objects)}
    report = []
    for obj in objects:
        key = _object_key(obj)
        if key in known:
            st.objects[known[key]] = obj
        else:
            known[key] = len(st.objects)
            st.objects.append(obj)
            if key[0] == "Namespace":
                report.append(f"namespace {key[2]} created")
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
        lab = current_lab(st)
        existing = {p.key: p for p in lab.pods}
        # Re-applying a manifest is not a name clash (kubectl reports it unchanged): validate the file
        # against the lab without the pods it names, so capacity and placement still count the rest.
        bare = dataclasses.replace(lab, pods=(), services=())
        named = {p.key for p in pods_from_objects(parse_objects(text, bare, file), bare, file)}
        parsed = parse_objects(text, bare, file)
        named_services = {_service_key(o) for o in parsed if o.get("kind") == "Service"}
        named_ingresses = {_service_key(o) for o in parsed if o.get("kind") == "Ingress"}
        others = dataclasses.replace(lab, pods=tuple(p for p in lab.pods if p.key not in named),
                                     services=tuple(s for s in lab.services if s.key not in named_services),
                                     ingresses=tuple(i for i in lab.ingresses if i.key not in named_ingresses))
        objects = parse_objects(text, others, file)
        wanted = pods_from_objects(objects, others, file)
        new = [p for p in wanted if p.key not in existing]
        report = _apply_services(st, lab, objects, file)
        report += [f"ingress {i.key} {'configured' if i.key in named_ingresses & {x.key for x in lab.ingresses} else 'created'}"
                   for i in ingresses_from_objects([o for o in objects if o.get("kind") == "Ingress"], others, file)]
        st.deleted = [d for d in st.deleted if not (d.startswith("Ingress/") and d.split("/", 1)[1] in named_ingresses)]
        report += _remember(st, objects)
        report += [f"pod {p.key} unchanged" for p in wanted if p.key in existing]
        lab = dataclasses.replace(lab, namespaces=current_lab(st).namespaces, pods=lab.pods + tuple(new))
        try:
            for key in _scaled_away(objects, wanted, st):
                _delete_pod(st, lab, key)
                report.append(f"pod {key} deleted (scaled down)")
            for pod in new:
                _add_pod(st, lab, pod)
                report.append(f"pod {pod.key} created ({pod.node}, {st.pods[pod.key].ip})")
        finally:
            state.save(st)  # whatever happened so far, the state says so
            resync(st)
    return report


def _apply_services(st: state.LabState, lab: Lab, objects: list[dict], file: str) -> list[str]:
    """Allocate ClusterIPs and NodePorts for the file's new services and write them into the stored
    manifests, so a service keeps its addresses whatever is applied or deleted later."""
    keys = {_service_key(o) for o in objects if o.get("kind") == "Service"}
    if not keys:
        return []
    st.deleted = [d for d in st.deleted if d.split("/", 1)[1] not in keys or not d.startswith("Service/")]
    others = dataclasses.replace(lab, services=tuple(s for s in lab.services if s.key not in keys))
    report = []
    for svc in services_from_objects([o for o in objects if o.get("kind") == "Service"], others, file):
        manifest = next(o for o in objects if o.get("kind") == "Service" and _service_key(o) == svc.key)
        spec = manifest.setdefault("spec", {})
        spec["clusterIP"] = str(svc.cluster_ip) if svc.cluster_ip is not None else "None"
        for port_manifest, port in zip(spec.get("ports", []), svc.ports):
            if port.node_port is not None:
                port_manifest["nodePort"] = port.node_port
        before = next((s for s in lab.services if s.key == svc.key), None)
        verb = "created" if before is None else ("unchanged" if before == svc else "configured")
        report.append(f"service {svc.key} {verb} ({svc.cluster_ip or 'headless'})")
    return report


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


def _add_pod(st: state.LabState, lab: Lab, pod: Pod) -> None:
    """One pod the way `lab up` makes it; a failure removes what was made of it."""
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
            containers = runtime.start_pod_containers(pod, ns, pause_pid, state.log_dir(lab.name))
        except BaseException:
            apply.remove_namespace(ns)
            plugin.delete(args)  # the lease (and veth) of an ADD that succeeded before a later step failed
            raise
        apply.wait_carrier([host])
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
        kind = kind.lower().rstrip("s")
        if kind in ("pod", "po"):
            keys = [f"{namespace}/{target}"]
            if keys[0] not in st.pods:
                raise StateError(f"no pod {keys[0]} in lab {st.name}")
        elif kind in ("service", "svc"):
            svc_key = f"{namespace}/{target}"
            if not any(s.key == svc_key for s in lab.services):
                raise StateError(f"no service {svc_key} in lab {st.name}")
            st.objects = [o for o in st.objects if not (o.get("kind") == "Service" and _service_key(o) == svc_key)]
            if any(s.key == svc_key for s in model_of(st).services):
                st.deleted.append(f"Service/{svc_key}")
            state.save(st)
            resync(st)
            return [f"service {svc_key} deleted"]
        elif kind in ("deployment", "deploy"):
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


