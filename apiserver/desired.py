"""The desired state of a running lab, as the API server would serve it: its model re-derived from the stored
spec text and the objects applied since (`current_lab`), or from the spec alone (`model_of`), and the lab
spec a command names (`resolve_spec`).

Every layer above reads a lab's model through here, so none of them needs the CLI's modules to know what a
lab should look like.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from apiserver import state
from cni.vpc_spec import applied_nodes, with_aws_node
from services import addons
from topo.model import Container, ContainerPort, Lab, Pod
from apiserver.spec import ingresses_from_objects, network_policies_from_objects, parse_spec_text, services_from_objects

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


@functools.lru_cache(maxsize=4)
def _parsed(text: str, file: str | None) -> Lab:
    return parse_spec_text(text, file)


def spec_of(st: state.LabState) -> Lab:
    """The lab's spec as validated once per process: a command derives the lab's model several times (before
    and after a change, for status and for resync), and the model is immutable, so the parse is shared."""
    return _parsed(st.spec_text, st.spec_file)


def model_of(st: state.LabState) -> Lab:
    """The model of a running lab, re-derived from the spec text it was built from (with its addons), and the
    nodes that joined it since (`lab apply` of a Node: the infrastructure, not an object the spec describes)."""
    return addons.with_addons(with_joined_nodes(spec_of(st), st),
                              state.lab_dir(st.name))


def with_joined_nodes(lab: Lab, st: state.LabState) -> Lab:
    nodes = [o for o in st.objects if o.get("kind") == "Node"]
    if not nodes:
        return lab
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
