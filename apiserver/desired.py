"""The desired state of a running lab, as the API server would serve it: its model re-derived from the stored
spec text and the objects applied since (`current_lab`), or from the spec alone (`model_of`), and the lab
spec a command names (`resolve_spec`).

Every layer above reads a lab's model through here, so none of them needs the CLI's modules to know what a
lab should look like.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pickle
from pathlib import Path

from apiserver import state
from services import addons
from topo.model import Container, ContainerPort, Lab, Pod

REPO = Path(__file__).resolve().parent.parent
DEFAULT_LAB = REPO / "labs" / "00-seed"


def resolve_spec(spec: str | None) -> Path:
    """A file, a folder holding lab.yaml, or the name of an exercise folder under labs/."""
    if spec is None:
        return DEFAULT_LAB
    path = Path(spec)
    if not path.exists() and (REPO / "labs" / spec).exists():
        return REPO / "labs" / spec
    return path


SPEC_CACHE = "spec.pickle"  # the validated spec model, next to the state it was derived from
# The packages whose code turns spec text into a model: a cached model is used only while they are unchanged.
_PARSERS = ("topo", "apiserver", "cni", "services", "routing", "images")


@functools.lru_cache(maxsize=4)
def _parsed(name: str, text: str, file: str | None) -> Lab:
    """The spec's model, validated once per lab: read back from the lab's cache when it was derived from this
    same text by this same code, else parsed (the cache is written by `remember_spec`, under the lab's lock).
    At 10,000 pods validating the spec cost 0.1-0.5 s of every command, and loading the validator (pydantic)
    0.1 s more; unpickling the model costs 0.05 s."""
    key = _cache_key(text, file)
    try:
        with open(state.lab_dir(name) / SPEC_CACHE, "rb") as fh:
            if fh.read(len(key)) == key:
                lab = pickle.load(fh)
                if isinstance(lab, Lab):
                    return lab
    except (OSError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, pickle.UnpicklingError):
        pass  # no cache, or one this code cannot read: parse
    from apiserver.spec import parse_spec_text

    return parse_spec_text(text, file)


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """Names, sizes and times of the parsers' source files: any edit or upgrade changes it."""
    parts = []
    for package in _PARSERS:
        with os.scandir(REPO / package) as entries:
            for entry in entries:
                if entry.name.endswith(".py"):
                    info = entry.stat()
                    parts.append(f"{package}/{entry.name}:{info.st_size}:{info.st_mtime_ns}")
    return "\n".join(sorted(parts))


def _cache_key(text: str, file: str | None) -> bytes:
    digest = hashlib.sha256("\0".join((text, file or "", _code_version())).encode()).hexdigest()
    return f"kubenet-lab spec {digest}\n".encode()


def remember_spec(st: state.LabState) -> None:
    """Write the lab's spec model to its cache if it is not there yet. Call with the lab's lock held (`lab up`
    once built, `lab apply`/`lab delete`), so the cache never outlives the lab's folder (`lab down` removes
    it, under the same lock). Written atomically; a failure only costs later commands a parse."""
    folder = state.lab_dir(st.name)
    key = _cache_key(st.spec_text, st.spec_file)
    path = folder / SPEC_CACHE
    try:
        with open(path, "rb") as fh:
            if fh.read(len(key)) == key:
                return
    except OSError:
        pass
    lab = spec_of(st)
    tmp = path.with_suffix(".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
            pickle.dump(lab, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def spec_of(st: state.LabState) -> Lab:
    """The lab's spec as validated once per process: a command derives the lab's model several times (before
    and after a change, for status and for resync), and the model is immutable, so the parse is shared."""
    return _parsed(st.name, st.spec_text, st.spec_file)


def model_of(st: state.LabState) -> Lab:
    """The model of a running lab, re-derived from the spec text it was built from (with its addons), and the
    nodes that joined it since (`lab apply` of a Node: the infrastructure, not an object the spec describes)."""
    return addons.with_addons(with_joined_nodes(spec_of(st), st),
                              state.lab_dir(st.name))


def with_joined_nodes(lab: Lab, st: state.LabState) -> Lab:
    nodes = [o for o in st.objects if o.get("kind") == "Node"]
    if not nodes:
        return lab
    from cni.vpc_spec import applied_nodes

    return dataclasses.replace(lab, nodes=lab.nodes + tuple(applied_nodes(lab, nodes)))


def object_key(obj: dict) -> str:
    """`Kind/namespace/name` of a manifest (namespace "default" when it gives none)."""
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')}/{meta.get('namespace', 'default')}/{meta.get('name')}"


def current_lab(st: state.LabState) -> Lab:
    """The lab's model as it runs now: the spec's objects, overridden and extended by applied ones, minus
    deleted ones; pods as they run (node and labels from their state); addons for what is there now.

    Applied services and ingresses are read back from their stored manifests, whose cluster IPs and node
    ports were pinned when they were applied, against the spec's surviving objects, so they come out the
    same every time.

    A command asks for this several times (before and after its change, for recovery, resync, policies):
    the part made of objects is derived once per set of objects, and only the pods, which change, are
    put together again, reusing each spec pod's model where it runs as the spec placed it.
    """
    objects = _objects_model(st.name, st.spec_text, st.spec_file, json.dumps(st.objects, sort_keys=True),
                             tuple(st.deleted))
    lab, templates = objects
    addon_pods = [p for p in lab.pods if p.key not in st.pods]  # an addon that has just become enabled
    pods = []
    for key, ps in st.pods.items():
        known = templates.get(key)
        if known is not None:
            labels = tuple(sorted(ps.labels.items()))
            pods.append(known if known.node == ps.node and known.labels == labels
                        else dataclasses.replace(known, node=ps.node, labels=labels))
            continue
        namespace, name = key.split("/", 1)
        labels = tuple(sorted(ps.labels.items()))
        ports = tuple(ContainerPort(number, proto, port_name) for port_name, number, proto in ps.ports)
        pods.append(Pod(name=name, namespace=namespace, node=ps.node, labels=labels,
                        containers=(Container("ports", None, (), ports),) if ports else (), owner=ps.owner,
                        hostname=ps.hostname, subdomain=ps.subdomain))
    return dataclasses.replace(lab, pods=tuple(pods + addon_pods))


@functools.lru_cache(maxsize=8)
def _objects_model(name: str, spec_text: str, spec_file: str | None, objects_json: str,
                   deleted: tuple[str, ...]) -> tuple[Lab, dict[str, Pod]]:
    """`current_lab` without its pods (addon pods aside), and the pod templates by key (spec and addon pods)."""
    st = state.LabState(name=name, phase="up", pid=0, spec_file=spec_file, spec_text=spec_text,
                        objects=json.loads(objects_json), deleted=list(deleted))
    if st.objects:  # the validator (pydantic) is loaded only for a lab that has applied objects
        from apiserver.spec import ingresses_from_objects, network_policies_from_objects, services_from_objects
        from cni.vpc_spec import with_aws_node
    spec = with_joined_nodes(spec_of(st), st)
    replaced = {object_key(o) for o in st.objects} | set(st.deleted)
    namespaces = dict(spec.namespaces)
    for obj in st.objects:
        if obj.get("kind") == "Namespace":
            # an applied Namespace replaces its labels, as kubectl apply does (a label left out is removed);
            # kubernetes.io/metadata.name is never stored: it is added wherever labels are matched
            meta = obj.get("metadata", {})
            namespaces[meta["name"]] = dict(meta.get("labels") or {})
    lab = dataclasses.replace(
        spec, namespaces=namespaces,
        services=tuple(s for s in spec.services if f"Service/{s.key}" not in replaced),
        ingresses=tuple(i for i in spec.ingresses if f"Ingress/{i.key}" not in replaced),
        network_policies=tuple(p for p in spec.network_policies if f"NetworkPolicy/{p.key}" not in replaced))
    if st.objects:
        for obj in st.objects:
            if obj.get("kind") == "DaemonSet":  # kube-system/aws-node: the aws-vpc profile's warm pool settings
                lab = dataclasses.replace(lab, vpc=with_aws_node(lab.vpc, obj))
        applied = [o for o in st.objects if o.get("kind") == "Service"]
        lab = dataclasses.replace(lab, services=lab.services + tuple(services_from_objects(applied, lab, None)))
        applied = [o for o in st.objects if o.get("kind") == "Ingress"]
        lab = dataclasses.replace(lab, ingresses=lab.ingresses + tuple(ingresses_from_objects(applied, lab, None)))
        applied = [o for o in st.objects if o.get("kind") == "NetworkPolicy"]
        lab = dataclasses.replace(lab, network_policies=lab.network_policies + tuple(
            network_policies_from_objects(applied, lab, None)))
    lab = addons.with_addons(dataclasses.replace(lab, pods=()), state.lab_dir(st.name))
    return lab, {p.key: p for p in spec.pods + lab.pods}  # containers of spec pods and addon pods
