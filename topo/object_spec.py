"""What every Kubernetes object of a lab shares: metadata, labels, namespaces, and the record a reader returns.

Objects (`spec.objects`, or a file given to `lab apply -f`) are read kind by kind, each by its layer's reader
(a `Reader`, registered in `apiserver.spec.KINDS`). A reader checks one object's own rules and returns a
`Parsed` record, which carries what the later, cross-object checks need: a Pod's template, a Service's or an
Ingress's draft, a NetworkPolicy. Object names and namespaces are DNS-1123 labels, because they become parts
of network namespace names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, Field

from topo import names
from topo.model import Container, DnsConfig, Ingress, IngressBackend, NetworkPolicy, Service
from topo.schema import Issues, Loc, StrictModel, short, validate, written_at

# Namespaces every cluster has before any object is created.
SYSTEM_NAMESPACES = ("default", "kube-system")


@dataclass(frozen=True)
class PodTemplate:
    """What a Pod, or every replica of a Deployment, runs: the part of a Pod that does not depend on placement."""

    labels: tuple[tuple[str, str], ...]
    containers: tuple[Container, ...]
    node_name: str | None
    node_loc: Loc  # where nodeName is (or would be) written, for messages
    dns_policy: str = "ClusterFirst"
    dns_config: DnsConfig | None = None
    hostname: str | None = None
    subdomain: str | None = None


@dataclass
class Parsed:
    """One object after its own checks, before the checks that involve other objects or the lab."""

    api_version: str
    kind: str
    loc: Loc
    manifest: dict[str, Any]
    name: str
    namespace: str | None  # None for cluster-scoped kinds (Namespace)
    labels: dict[str, str]
    template: PodTemplate | None = None  # objects that make pods
    replicas: int | None = None  # None: one pod named like the object (a bare Pod)
    service: ServiceDraft | None = None  # Services
    ingress: IngressDraft | None = None  # Ingresses
    policy: NetworkPolicy | None = None  # NetworkPolicies


@dataclass(frozen=True)
class IngressDraft:
    """An Ingress after its own checks; its backends and routes are checked against the lab's services and the
    other Ingresses later, so each is kept with where it is written."""

    ingress: Ingress
    backends: tuple[tuple[Loc, IngressBackend], ...]
    routes: tuple[tuple[Loc, str | None, str, str], ...]  # (where, host, path, pathType) of every path


@dataclass(frozen=True)
class ServiceDraft:
    """A Service after its own checks, before the lab gives it what was left out: its `service` holds the
    clusterIP and nodePorts as given (None: to be allocated, unless `headless`)."""

    service: Service
    headless: bool


# A reader validates one object and returns it parsed (or None after recording issues in the Issues it is given).
Reader = Callable[[Any, Loc, Issues], "Parsed | None"]


# ---------------------------------------------------------------------------- metadata


class ObjectMetaIn(StrictModel):
    name: str = Field(examples=["name: web"])
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", re.ASCII)  # matched in full
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", re.ASCII)
_LABEL_MAX = 63
_SUBDOMAIN_MAX = 253


def label_key_problem(key: str) -> str | None:
    """Kubernetes label key syntax: [prefix/]name, prefix a DNS-1123 subdomain, name at most 63 characters."""
    parts = key.split("/")
    if len(parts) > 2:
        return f"label key {short(repr(key), 60)} has more than one '/': write [prefix/]name, e.g. app.kubernetes.io/name"
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix or len(prefix) > _SUBDOMAIN_MAX or not _DNS_SUBDOMAIN.fullmatch(prefix):
            return (f"label key prefix {short(repr(prefix), 60)} is not a DNS subdomain: use lower-case letters, "
                    "digits, '-' and '.', e.g. example.com/")
    name = parts[-1]
    if not name or len(name) > _LABEL_MAX or not _LABEL_NAME.fullmatch(name):
        return (f"label key {short(repr(key), 60)} is not valid: the name part must be 1..63 letters, digits, '-', "
                "'_' or '.', starting and ending with a letter or digit")
    return None


def label_value_problem(value: str) -> str | None:
    if value == "" or (len(value) <= _LABEL_MAX and _LABEL_NAME.fullmatch(value)):
        return None
    return (f"label value {short(repr(value), 60)} is not valid: use at most 63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit (or leave it empty)")


def check_labels(labels: dict[str, str] | None, loc: Loc, issues: Issues) -> bool:
    ok = True
    for key, value in (labels or {}).items():
        problem = label_key_problem(key) or label_value_problem(value)
        if problem:
            issues.add(loc + (key,), problem)
            ok = False
    return ok


def check_meta(meta: ObjectMetaIn, loc: Loc, issues: Issues, name_max: int = names.DNS1123_LABEL_MAX,
               name_problem: Callable[[str], str | None] | None = None) -> bool:
    """Object names and namespaces are DNS-1123 labels: they become parts of network namespace names.
    A kind whose names are stricter gives its own `name_problem` (Services' names are DNS-1035 labels, see
    `services.spec.service_name_problem`)."""
    ok = True
    problem = name_problem(meta.name) if name_problem is not None else names.dns_label_problem(meta.name, name_max)
    if problem:
        issues.add(loc + ("name",), problem)
        ok = False
    if meta.namespace is not None:
        problem = names.dns_label_problem(meta.namespace)
        if problem:
            issues.add(loc + ("namespace",), problem)
            ok = False
    return check_labels(meta.labels, loc + ("labels",), issues) and ok


def normalized_manifest(model: BaseModel) -> dict[str, Any]:
    """The normalized manifest: what was given, in Kubernetes' spelling, without nulls."""
    return model.model_dump(by_alias=True, exclude_none=True)


# ---------------------------------------------------------------------------- namespaces


class _NamespaceIn(StrictModel):
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: ObjectMetaIn = Field(examples=["metadata: {name: shop}"])


def read_namespace(obj: Any, loc: Loc, issues: Issues) -> Parsed | None:
    model = validate(_NamespaceIn, obj, loc, issues)
    if model is None:
        return None
    ok = check_meta(model.metadata, loc + ("metadata",), issues)
    if model.metadata.namespace is not None:
        issues.add(loc + ("metadata", "namespace"), "a Namespace is not inside a namespace: remove metadata.namespace")
        ok = False
    if not ok:
        return None
    return Parsed(model.api_version, model.kind, loc, normalized_manifest(model), model.metadata.name, None,
                  dict(model.metadata.labels or {}))


def lab_namespaces(parsed: list[Parsed], existing: dict[str, dict[str, str]],
                   issues: Issues) -> dict[str, dict[str, str]]:
    """Lab.namespaces: the ones every cluster has, those already in the lab, and the Namespace objects."""
    result: dict[str, dict[str, str]] = {name: {} for name in SYSTEM_NAMESPACES}
    result.update({name: dict(labels) for name, labels in existing.items()})
    defined: dict[str, Loc] = {}
    for obj in parsed:
        if (obj.api_version, obj.kind) != ("v1", "Namespace"):
            continue
        if obj.name in defined:
            issues.add(obj.loc + ("metadata", "name"), f"Namespace {obj.name} is already defined at "
                                                       f"{written_at(defined[obj.name], issues)}: remove one")
            continue
        defined[obj.name] = obj.loc
        result.setdefault(obj.name, {}).update(obj.labels)
    return result
