"""Admission: read a lab spec or Kubernetes objects, run every layer's checks, build the `topo.model.Lab`.

This is where the layers' checks are composed; each layer checks its own part (`topo`: cluster, nodes, links,
workloads; `routing`: backends, BGP, racks; `services`: Services, kube-proxy, DNS, ingress, external hosts;
`cni`: the CNI profile and NetworkPolicies). Checking happens in three passes, and each pass collects every
problem it finds before the whole lot is raised as one `SpecError`:

1. YAML -> plain data, remembering the line of every field (`topo.schema`), so each message points at a line.
2. Structure: types, required and unknown fields, by the pydantic models composed here from each layer's.
3. Meaning: addresses, names, PodCIDR allocation, racks and their routers, whether the pod backend can
   cross the underlay, link shaping, kube-proxy's mode, the cluster DNS and ingress controller addons,
   external hosts (and the DNS names they serve), object references, pod placement and capacity, pods' DNS
   settings, Services' cluster IPs and node ports (given ones checked, the rest allocated), and Ingresses'
   backends (Services of their namespace, and ports those Services have).

Kubernetes objects (`spec.objects`, or a file given to `lab apply -f`) are read through `KINDS`, a registry
from (apiVersion, kind) to a reader (Namespace, Pod, Deployment, Service, Ingress, NetworkPolicy), so later
layers add kinds in one place. Images sit above the topology layer, so the pod checks get the built-in
images' argument checks from here (`IMAGE_ARGS`).
"""
from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import Field

from apiserver.files import SPEC_MISSING, read_manifest
from cni.spec import CniIn, check_cni, network_policies_against_lab, profile_of, read_network_policy
from cni.vpc_spec import (check_vpc, not_in_a_spec, read_aws_node, read_node, vpc_against_lab, vpc_nodes,
                           vpc_objects_against_lab)
from routing.spec import (FabricIn, NetworkIn, RackIn, check_host_names, check_network, check_routed, check_routing,
                          host_names)
from services.addons import addon_pods
from services.dns_spec import DnsIn, check_dns, check_reserved_names
from services.external_spec import ExternalIn, check_external
from services.ingress_spec import IngressControllerIn, check_ingress_controller, ingresses_against_lab, read_ingress
from services.spec import KubeProxyIn, check_kube_proxy, read_service, services_against_lab
from topo import names
from topo.cluster_spec import ClusterIn, NodeIn, check_cluster, check_disjoint, check_flat_underlay, check_nodes
from topo.errors import SpecError, SpecIssue
from topo.link_spec import LinkIn, check_link
from topo.model import CILIUM_ROUTING_MODES, CNI_PROFILES, Cni, Cluster, Ingress, KubeProxy, Lab, Network, NetworkPolicy, Pod, Service, Underlay
from topo.object_spec import Parsed, Reader, lab_namespaces, read_namespace
from topo.placement_spec import pods_against_lab
from topo.schema import (MAX_NODES, MAX_OBJECTS, Issues, Loc, Source, StrictModel, compose, describe, meant_field,
                         short, unknown_field, validate, wrong_type)
from topo.workload_spec import ArgsCheck, read_deployment, read_pod

API_VERSION = "kubenet-lab/v1alpha1"
LAB_KIND = "Lab"
SPEC_FILE = "lab.yaml"  # what an exercise folder under labs/ holds

DEFAULTS = Cluster(), Underlay(), Network()

INTERNAL_ERROR = "please report this as a bug of kubenet-lab"


# ---------------------------------------------------------------------------- public API


def load_spec(path: str | Path) -> Lab:
    """Read a lab from a YAML file, or from an exercise folder holding lab.yaml.

    Messages name the file as the caller gave it; Lab.source and Lab.exercise are absolute, so a lab's
    recorded origin stays valid whatever the current directory is later.
    """
    given = Path(path)
    file = str(given)
    exercise: Path | None = None
    try:
        if given.is_dir():
            exercise = given
            given = given / SPEC_FILE
            file = str(given)
            if not given.is_file() and not given.is_symlink():
                raise _file_error(str(exercise), f"a folder without {SPEC_FILE}: give a lab spec file or an "
                                                 f"exercise folder such as labs/00-seed")  # named as given
        text = read_manifest(given, SPEC_MISSING)
        lab = parse_spec_text(text, file)
        lab.source = str(given.resolve())
        lab.exercise = str(exercise.resolve()) if exercise is not None else None
        return lab
    except SpecError:
        raise
    except OSError as exc:
        raise _file_error(file, f"cannot read the file: {exc.strerror or exc}") from None
    except Exception as exc:  # the promise: only SpecError leaves this module
        raise _internal(file, exc) from exc


def parse_spec_text(text: str, file: str | None = None) -> Lab:
    """Validate a lab spec given as text; `file` is only used in messages and as Lab.source."""
    with _only_spec_errors(file, "be a lab spec"):
        lab = _parse_lab(text, file)
        lab.text = text
        return lab


def parse_objects(text: str, lab: Lab, file: str | None = None) -> list[dict]:
    """Validate Kubernetes manifests for `lab apply -f FILE` against the object rules and the running lab.

    The file holds one or more YAML documents (separated by ---), each an object or a `kind: List` with
    `items`. Returns the normalized manifests (defaults filled in), in file order, List items flattened.
    """
    with _only_spec_errors(file, "hold Kubernetes objects"):
        source = Source()
        issues = Issues(source)
        entries = _object_documents(text, source, issues)
        if len(entries) > MAX_OBJECTS:
            issues.add((), _count_problem(len(entries), MAX_OBJECTS, "objects"))
            issues.raise_if_any(file)
        if not issues and not entries:
            issues.add((), "the file holds no objects: give one or more Kubernetes manifests "
                            "(apiVersion, kind, metadata, spec), separated by ---")
        parsed = _read_objects(entries, issues)
        _objects_against_lab(parsed, lab, issues)
        issues.raise_if_any(file)
        return [p.manifest for p in parsed]  # with allocated cluster IPs and node ports filled in


def pods_from_objects(objects: list[dict], lab: Lab, file: str | None) -> list[Pod]:
    """The pods that `objects` add to `lab`: Pods as they are, Deployments expanded into replicas.

    Shared by spec loading and `lab apply`, so a pod is named and placed the same way both times.
    Existing pods of `lab` count when placing new ones, and their names may not be reused.
    Issues name the objects as `objects[i]`, since manifests carry no line numbers.
    """
    return _of_kind(objects, lab, file, "pods")  # type: ignore[return-value]


def services_from_objects(objects: list[dict], lab: Lab, file: str | None) -> list[Service]:
    """The Services that `objects` add to `lab`, with their cluster IPs and node ports.

    Shared by spec loading and `lab apply`, so a service gets its addresses the same way both times.
    What a manifest leaves out is allocated against the services already in `lab.services` (the next
    free cluster IP and node port), and their names, cluster IPs and node ports may not be reused.
    Issues name the objects as `objects[i]`, since manifests carry no line numbers.
    """
    return _of_kind(objects, lab, file, "services")  # type: ignore[return-value]


def ingresses_from_objects(objects: list[dict], lab: Lab, file: str | None) -> list[Ingress]:
    """The Ingresses that `objects` add to `lab`, for `lab apply` (spec loading fills Lab.ingresses itself).

    Backends are checked against the Services among `objects` and those in `lab.services`; names and routes
    may not clash with `lab.ingresses` (drop an Ingress being replaced from the lab first). Issues name the
    objects as `objects[i]`, since manifests carry no line numbers.
    """
    return _of_kind(objects, lab, file, "ingresses")  # type: ignore[return-value]


def network_policies_from_objects(objects: list[dict], lab: Lab, file: str | None) -> list[NetworkPolicy]:
    """The NetworkPolicies that `objects` add to `lab`, for `lab apply` (spec loading fills
    Lab.network_policies itself). Their names may not clash with `lab.network_policies` (drop a policy being
    replaced from the lab first). Issues name the objects as `objects[i]`, since manifests carry no lines."""
    try:
        issues = Issues(Source())
        parsed = _read_objects([(("objects", i), obj) for i, obj in enumerate(objects)], issues)
        found = network_policies_against_lab(parsed, lab, set(lab_namespaces(parsed, lab.namespaces, issues)), issues)
        issues.raise_if_any(file)
        return found
    except SpecError:
        raise
    except Exception as exc:
        raise _internal(file, exc) from exc


def _of_kind(objects: list[dict], lab: Lab, file: str | None, kind: str) -> list:
    """Read manifests and check one kind of object they make against the lab ("pods", "services",
    "ingresses"); the other kinds are read but not checked against the lab."""
    try:
        issues = Issues(Source())
        if not isinstance(objects, (list, tuple)):
            issues.add((), "objects must be a list of Kubernetes manifests")
            issues.raise_if_any(file)
        parsed = _read_objects([(("objects", i), obj) for i, obj in enumerate(objects)], issues)
        made = _objects_against_lab(parsed, lab, issues, pods=kind == "pods", services=kind == "services",
                                    ingresses=kind == "ingresses")
        issues.raise_if_any(file)
        return made[("pods", "services", "ingresses").index(kind)]
    except SpecError:
        raise
    except RecursionError:
        raise SpecError(file, [SpecIssue("", "an object is nested too deeply")]) from None
    except Exception as exc:
        raise _internal(file, exc) from exc


def _file_error(file: str, message: str) -> SpecError:
    return SpecError(file, [SpecIssue("", message)])


@contextlib.contextmanager
def _only_spec_errors(file: str | None, what: str) -> Iterator[None]:
    """The promise of this module: only SpecError leaves it (deep YAML and our own bugs included)."""
    try:
        yield
    except SpecError:
        raise
    except RecursionError:
        raise SpecError(file, [SpecIssue("", f"the YAML is nested too deeply to {what}")]) from None
    except Exception as exc:
        raise _internal(file, exc) from exc


def _internal(file: str | None, exc: BaseException) -> SpecError:
    """Last resort: a bug of ours still reaches the user as a SpecError, with a pointer to report it."""
    detail = short(" ".join(f"{type(exc).__name__}: {exc}".split()), 200)
    return SpecError(file, [SpecIssue("", f"kubenet-lab could not check this spec ({detail}); {INTERNAL_ERROR}")])


# ---------------------------------------------------------------------------- structure: the lab's input models


class _LabMetaIn(StrictModel):
    name: str = Field(examples=["name: seed"])


class _UnderlayIn(StrictModel):
    """One flat segment (subnet, the topology layer's) or racks joined by a fabric (routing's)."""

    subnet: str | None = None
    link: LinkIn | None = None
    racks: list[RackIn] | None = None
    fabric: FabricIn | None = None


class _SpecIn(StrictModel):
    cluster: ClusterIn | None = None
    underlay: _UnderlayIn | None = None
    network: NetworkIn | None = None
    kube_proxy: KubeProxyIn | None = Field(None, alias="kubeProxy")
    dns: DnsIn | None = None
    ingress_controller: IngressControllerIn | None = Field(None, alias="ingressController")
    cni: CniIn | None = None
    nodes: list[NodeIn] = Field(examples=["nodes: [{name: node1, ip: 192.168.1.10}]"])
    external: list[ExternalIn] | None = None
    objects: list[Any] | None = None


class _LabIn(StrictModel):
    api_version: str = Field(alias="apiVersion", examples=[f"apiVersion: {API_VERSION}"])
    kind: str = Field(examples=[f"kind: {LAB_KIND}"])
    metadata: _LabMetaIn = Field(examples=["metadata: {name: mylab}"])
    spec: _SpecIn = Field(examples=["spec: {nodes: [{name: node1, ip: 192.168.1.10}]}"])


# ---------------------------------------------------------------------------- meaning: the lab spec


def _parse_lab(text: str, file: str | None) -> Lab:
    source = Source()
    issues = Issues(source)
    documents = compose(text, source, issues, None)
    issues.raise_if_any(file)
    if not documents:
        issues.add((), f"the file is empty: a lab spec needs apiVersion: {API_VERSION}, kind: {LAB_KIND}, "
                        "metadata and spec (see labs/00-seed/lab.yaml)")
        issues.raise_if_any(file)
    data = documents[0]
    if not isinstance(data, dict):
        issues.add((), f"the top level must be a mapping (apiVersion: {API_VERSION}, kind: {LAB_KIND}, "
                        f"metadata, spec), not {describe(data)}")
        issues.raise_if_any(file)
    if _not_a_lab(data, issues) or _too_many(data, issues):
        issues.raise_if_any(file)
    lab_in = validate(_LabIn, data, (), issues)
    if lab_in is None:
        _read_raw_objects(data, issues)  # structure errors elsewhere do not hide the objects' own problems
        issues.raise_if_any(file)
    assert lab_in is not None
    lab = _build_lab(lab_in, issues)
    issues.raise_if_any(file)
    lab.source = file
    return lab


def _too_many(data: dict[str, Any], issues: Issues) -> bool:
    """More nodes or objects than any real lab has: refused before any of them is checked."""
    spec = data.get("spec")
    for key, limit in (("nodes", MAX_NODES), ("objects", MAX_OBJECTS)):
        items = spec.get(key) if isinstance(spec, dict) else None
        if isinstance(items, list) and len(items) > limit:
            issues.add(("spec", key), _count_problem(len(items), limit, key))
    return bool(issues)


def _count_problem(count: int, limit: int, what: str) -> str:
    return (f"{count} {what}; a lab holds at most {limit} (far more than any exercise): split the lab, or use a "
            "Deployment's replicas instead of many copies" if what == "objects" else
            f"{count} {what}; a lab holds at most {limit} (far more than any exercise): use fewer")


def _not_a_lab(data: dict[str, Any], issues: Issues) -> bool:
    """A file whose kind is not Lab (say, a Pod manifest) gets one clear message, not a field-by-field list."""
    kind = data.get("kind")
    if not isinstance(kind, str) or kind == LAB_KIND:
        return False
    hint = ""
    if data.get("apiVersion") != API_VERSION:
        hint = (": this looks like a Kubernetes manifest; put it under spec.objects of a lab spec, or give it to "
                "a running lab with `lab apply -f`")
    issues.add(("kind",), f"must be {LAB_KIND}, got {short(repr(kind), 40)}{hint}")
    return True


def _read_raw_objects(data: dict[str, Any], issues: Issues) -> None:
    spec = data.get("spec")
    objects = spec.get("objects") if isinstance(spec, dict) else None
    if isinstance(objects, list):
        _read_objects([(("spec", "objects", i), obj) for i, obj in enumerate(objects)], issues)


def _build_lab(lab_in: _LabIn, issues: Issues) -> Lab:
    """Semantic checks of a structurally valid spec, then the model with its pods."""
    if lab_in.api_version != API_VERSION:
        issues.add(("apiVersion",), f"must be {API_VERSION} (the version this tool reads), got "
                                    f"{short(repr(lab_in.api_version), 40)}")
    name_problem = names.dns_label_problem(lab_in.metadata.name, names.LAB_NAME_MAX)
    if name_problem:
        issues.add(("metadata", "name"), name_problem)
    spec = lab_in.spec
    underlay_in = spec.underlay or _UnderlayIn()
    network_in = spec.network or NetworkIn()
    cni = check_cni(spec.cni, issues)
    if cni is not None and cni.profile == "cilium":
        check_cilium_backend(cni, network_in, issues)
    vpc = check_vpc(spec.cni, cni.profile if cni is not None else None, network_in.backend, spec.nodes, issues)
    if cni is not None and network_in.backend is None:  # a profile sets the backend's default only
        backend = CILIUM_ROUTING_MODES[cni.routing_mode] if cni.routing_mode else CNI_PROFILES[cni.profile][0]
        network_in = network_in.model_copy(update={"backend": backend})
    racks = _rack_names(underlay_in)
    cluster = check_cluster(spec.cluster or ClusterIn(), issues)
    underlay = _check_underlay(underlay_in, issues)
    network = check_network(network_in, underlay, issues)
    if cluster is not None and underlay is not None:
        fabric_cidr = underlay_in.fabric.cidr if underlay_in.fabric is not None else None
        check_disjoint(spec.cluster or ClusterIn(), cluster, underlay, underlay_in.subnet, fabric_cidr, issues)
    nodes = check_nodes(spec.nodes, cluster, underlay, racks, issues)
    if nodes is not None and vpc is not None:
        nodes = vpc_nodes(nodes, spec.nodes, vpc)
    check_host_names(spec.nodes, underlay_in.racks, underlay_in.fabric, issues)
    if network is not None:
        check_routing(network_in, network, spec.nodes, racks, issues)
    kube_proxy = check_kube_proxy(spec.kube_proxy or KubeProxyIn(), issues)
    dns = check_dns(spec.dns or DnsIn(), spec.nodes, cluster, issues)
    controller = check_ingress_controller(spec.ingress_controller or IngressControllerIn(), spec.nodes, issues)
    taken_names = host_names(spec.nodes, underlay_in.racks, underlay_in.fabric)
    external = check_external(spec.external or [], spec.nodes, taken_names, underlay, racks, dns, issues)
    entries = [(("spec", "objects", i), obj) for i, obj in enumerate(spec.objects or [])]
    parsed = _read_objects(entries, issues)
    not_in_a_spec(parsed, issues)
    namespaces = lab_namespaces(parsed, {}, issues)
    lab = Lab(name=lab_in.metadata.name, cluster=cluster or DEFAULTS[0], underlay=underlay or DEFAULTS[1],
              network=network or DEFAULTS[2], nodes=tuple(nodes or ()), namespaces=namespaces,
              kube_proxy=kube_proxy or KubeProxy(), external=tuple(external or ()), dns=dns,
              ingress_controller=controller)
    check_reserved_names(parsed, lab, issues)
    service_cidr = cluster.service_cidr if cluster is not None else None
    lab.services = tuple(services_against_lab(parsed, lab, service_cidr, set(namespaces), issues))
    lab.ingresses = tuple(ingresses_against_lab(parsed, lab, set(namespaces), issues, running=False))
    lab.cni = cni or profile_of(lab.network.backend)
    if vpc is not None:
        lab.vpc = vpc
        vpc_against_lab(lab, issues)
    lab.network_policies = tuple(network_policies_against_lab(parsed, lab, set(namespaces), issues))
    lab.objects = tuple(p.manifest for p in parsed)  # after services_against_lab: it fills in allocated IPs and ports
    lab.pods = tuple(pods_against_lab(parsed, lab, set(namespaces), issues, place=nodes is not None and not issues,
                                      reserved=addon_pods(lab)))  # the addons' pods take addresses too
    return lab


def check_cilium_backend(cni: Cni, network_in: NetworkIn, issues: Issues) -> None:
    """The cilium profile routes in tunnel mode (backend vxlan) or native mode (backend host-gw)."""
    backend = network_in.backend
    if backend is None:
        return
    modes = {b: m for m, b in CILIUM_ROUTING_MODES.items()}
    if backend not in modes:
        issues.add(("spec", "network", "backend"), f"cni.profile cilium routes with routingMode tunnel (backend "
                                                   f"vxlan) or native (backend host-gw), not {short(repr(backend), 20)}")
    elif cni.routing_mode is not None and CILIUM_ROUTING_MODES[cni.routing_mode] != backend:
        issues.add(("spec", "network", "backend"), f"backend {backend} contradicts cni.routingMode "
                                                   f"{cni.routing_mode} (which means backend "
                                                   f"{CILIUM_ROUTING_MODES[cni.routing_mode]}): give one of them")


def _check_underlay(underlay_in: _UnderlayIn, issues: Issues) -> Underlay | None:
    """A flat segment (subnet) or a routed underlay (racks), with the default link of every node."""
    link = check_link(underlay_in.link, ("spec", "underlay", "link"), issues)
    if underlay_in.racks is None:
        if underlay_in.fabric is not None:
            issues.add(("spec", "underlay", "fabric"), "fabric joins top-of-rack routers: it needs underlay.racks; "
                                                       "remove fabric for a flat underlay")
        underlay = check_flat_underlay(underlay_in.subnet, issues)
    else:
        if underlay_in.subnet is not None:
            issues.add(("spec", "underlay", "subnet"),
                       "give either subnet (one flat segment for every node) or racks (a subnet per rack, behind its "
                       "top-of-rack router), not both: remove subnet, or remove racks")
        underlay = check_routed(underlay_in.racks, underlay_in.fabric, issues)
    if underlay is None or link is None:
        return None
    return replace(underlay, link=link)


def _rack_names(underlay_in: _UnderlayIn) -> tuple[str, ...] | None:
    """The racks as written (None: a flat underlay), so nodes can be checked even when a rack is wrong."""
    return None if underlay_in.racks is None else tuple(r.name for r in underlay_in.racks)


# ---------------------------------------------------------------------------- Kubernetes objects


def _object_documents(text: str, source: Source, issues: Issues) -> list[tuple[Loc, Any]]:
    """The objects of an apply file: each document, or each item of a `kind: List` document."""
    documents = compose(text, source, issues, lambda i, n: ("documents", i) if n > 1 else ())
    if documents is None:
        return []
    entries: list[tuple[Loc, Any]] = []
    for index, doc in enumerate(documents):
        base: Loc = ("documents", index) if len(documents) > 1 else ()
        if isinstance(doc, dict) and doc.get("kind") == "List":
            items = doc.get("items")
            if not isinstance(items, list):
                issues.add(base + ("items",), "a kind: List document needs items: a list of objects")
                continue
            entries.extend((base + ("items", i), item) for i, item in enumerate(items))
        else:
            entries.append((base, doc))
    return entries


def _read_objects(entries: list[tuple[Loc, Any]], issues: Issues) -> list[Parsed]:
    """Each object's own checks, through the KINDS registry; objects with problems are left out."""
    parsed = []
    for loc, obj in entries:
        result = _read_object(obj, loc, issues)
        if result is not None:
            parsed.append(result)
    return parsed


def _read_object(obj: Any, loc: Loc, issues: Issues) -> Parsed | None:
    if not isinstance(obj, dict):
        issues.add(loc, f"an object must be a mapping with apiVersion, kind, metadata (and spec), not {describe(obj)}")
        return None
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    ok = True
    for key, value, example in (("apiVersion", api_version, "apiVersion: v1"), ("kind", kind, "kind: Pod")):
        if key not in obj:
            typo = next((k for k in obj if isinstance(k, str) and meant_field(k, (key,))), None)
            if typo is not None:  # one mistake, said where it is (not "missing" and then "unknown field")
                issues.add(loc + (typo,), unknown_field(typo, (key,)))
            else:
                issues.add(loc + (key,), f"missing; every object needs apiVersion and kind, e.g. {example}")
            ok = False
        elif not isinstance(value, str):
            issues.add(loc + (key,), wrong_type("a string", value, issues.source.raw.get(loc + (key,))))
            ok = False
    if not ok:
        return None
    reader = KINDS.get((api_version, kind))
    if reader is None and (api_version, kind) == (API_VERSION, LAB_KIND):
        issues.add(loc + ("kind",), "a Lab is a kubenet-lab spec, not a Kubernetes object: bring it up as a lab "
                                    "(lab up FILE); only Kubernetes objects go here")
        return None
    if reader is None:
        wrong_version = any(known == kind for _, known in KINDS)
        issues.add(loc + ("apiVersion" if wrong_version else "kind",), _unsupported_kind(api_version, kind))
        return None
    result = reader(obj, loc, issues)
    if result is None:
        meta = obj.get("metadata")
        if isinstance(meta, dict) and isinstance(meta.get("name"), str):
            namespace = meta.get("namespace")
            issues.refused.add((kind, namespace if isinstance(namespace, str) else "default", meta["name"]))
    return result


def _unsupported_kind(api_version: str, kind: str) -> str:
    supported = ", ".join(f"{a} {k}" for a, k in KINDS)
    for known_api, known_kind in KINDS:
        if known_kind == kind:
            return f"kind {kind} is served by apiVersion {known_api} here, not {short(api_version, 40)}: set apiVersion: {known_api}"
    close = difflib.get_close_matches(kind.lower(), [k.lower() for _, k in KINDS], n=1, cutoff=0.8)
    if close:
        match = next(k for _, k in KINDS if k.lower() == close[0])
        return f"unknown kind {short(repr(kind), 40)} (did you mean {match}?)"
    return (f"kind {short(kind, 40)} ({short(api_version, 40)}) is not supported by this version of kubenet-lab "
            f"(supported: {supported})")


# ---------------------------------------------------------------------------- the kinds, built-in images' args


def _agnhost_args(args: tuple[str, ...]) -> tuple[Loc, str | None]:
    """Check agnhost args with the stand-in's own rules, so a typo fails at validation, not inside a pod.
    A failure of the stand-in's own check accepts the args unchecked rather than refuse every lab."""
    if not args:
        return ("args",), "agnhost needs a subcommand as its first arg, e.g. args: [netexec, --http-port=8080]"
    from images import agnhost  # here: the stand-in's HTTP server modules cost every `lab` command 9 ms
    try:
        if args[0] not in agnhost.SUBCOMMANDS:
            known = sorted(str(s) for s in agnhost.SUBCOMMANDS)
            close = difflib.get_close_matches(args[0], known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; supported: {', '.join(known)}"
            return ("args", 0), f"agnhost has no subcommand {short(repr(args[0]), 40)}{hint}"
        problem = agnhost.validate_args(list(args))
    except Exception:
        return ("args",), None
    return ("args",), (short(problem, 200) if isinstance(problem, str) and problem else None)


# The built-in images whose args are checked by the image's own rules: the pod checks (topology layer) get
# them from here, as images sit above that layer.
IMAGE_ARGS: dict[str, ArgsCheck] = {"agnhost": _agnhost_args}

# Registry of the object kinds a lab understands: (apiVersion, kind) -> reader (a `topo.object_spec.Reader`).
# A reader validates one object and returns it as a `Parsed` (or None), recording each problem in the Issues
# it is given. Later layers add kinds here.
KINDS: dict[tuple[str, str], Reader] = {
    ("v1", "Namespace"): read_namespace,
    ("v1", "Pod"): partial(read_pod, image_args=IMAGE_ARGS),
    ("apps/v1", "Deployment"): partial(read_deployment, image_args=IMAGE_ARGS),
    ("v1", "Service"): read_service,
    ("networking.k8s.io/v1", "Ingress"): read_ingress,
    ("networking.k8s.io/v1", "NetworkPolicy"): read_network_policy,
    ("apps/v1", "DaemonSet"): read_aws_node,  # kube-system/aws-node only: the aws-vpc profile's settings
    ("v1", "Node"): read_node,  # an instance joining an aws-vpc lab (lab apply)
}


def _objects_against_lab(parsed: list[Parsed], lab: Lab, issues: Issues, pods: bool = True,
                         services: bool = True,
                         ingresses: bool = True) -> tuple[list[Pod], list[Service], list[Ingress]]:
    """The checks of objects that involve each other and the lab: the pods they make (placed on nodes), the
    services (with what is allocated to them) and the ingresses, each only if asked for."""
    namespaces = lab_namespaces(parsed, lab.namespaces, issues)
    place = bool(lab.nodes) and not issues

    def wanted(obj: Parsed) -> bool:
        if pods and services and ingresses:
            return True  # every kind, those added to KINDS later too
        return ((pods and obj.template is not None) or (services and obj.service is not None)
                or (ingresses and obj.ingress is not None))

    check_reserved_names(parsed, lab, issues, wanted)
    found_services = (services_against_lab(parsed, lab, lab.cluster.service_cidr, set(namespaces), issues)
                      if services else [])
    found_ingresses = ingresses_against_lab(parsed, lab, set(namespaces), issues, running=True) if ingresses else []
    found_pods = pods_against_lab(parsed, lab, set(namespaces), issues, place=place) if pods else []
    if pods and services and ingresses:  # every kind: NetworkPolicies, aws-node and Nodes too
        network_policies_against_lab(parsed, lab, set(namespaces), issues)
        vpc_objects_against_lab(parsed, lab, issues)
    return found_pods, found_services, found_ingresses
