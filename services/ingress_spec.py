"""The ingress controller addon and Ingress objects: hosts, paths, and backends that are Services of the lab.

An Ingress's own rules are checked per object; its backends (a Service of its namespace and one of its
ports) and its routes (a host and path go to one backend) are checked against the lab's Services and the
other Ingresses.
"""
from __future__ import annotations

import re
from typing import Any

from pydantic import Field

from services.spec import addon_node, service_name_problem
from topo.cluster_spec import NodeIn
from topo.model import (Ingress, IngressBackend, IngressController, IngressPath, IngressRule, Lab, NODE_PORT_RANGE,
                        Service)
from topo.object_spec import IngressDraft, ObjectMetaIn, Parsed, check_meta, normalized_manifest
from topo.schema import Issues, Loc, StrictModel, close_match, short, show, validate, written_at
from topo.workload_spec import dns_name_problem, port_name_problem

PATH_TYPES = ("Prefix", "Exact", "ImplementationSpecific")
# Kubernetes refuses these in Prefix and Exact paths (they would let a path escape its prefix once normalized).
_BAD_PATH_PARTS = ("//", "/./", "/../", "%2f", "%2F")
_BAD_PATH_ENDINGS = ("/..", "/.")
# The characters ingress-nginx's strict path check allows: what a controller can match without escaping.
_INGRESS_PATH = re.compile(r"/[A-Za-z0-9._~/-]*", re.ASCII)  # matched in full
_INGRESS_PATH_MAX = 1024


class IngressControllerIn(StrictModel):
    """The ingress controller addon; enabled left out: it runs when the lab has Ingress objects."""

    enabled: bool | None = None
    node: str | None = None
    node_port: int | None = Field(None, alias="nodePort")


class _IngressPortIn(StrictModel):
    """A backend's service port: `number` or `name` (one of the two, as Kubernetes' ServiceBackendPort)."""

    number: int | None = None
    name: str | None = None


class _IngressServiceIn(StrictModel):
    name: str = Field(examples=["name: web"])
    port: _IngressPortIn = Field(examples=["port: {number: 80}"])


class _IngressBackendIn(StrictModel):
    """A backend is a Service of the Ingress's namespace; `resource` backends (a custom object) are read so the
    message can say they are not supported, rather than calling the field unknown."""

    service: _IngressServiceIn | None = None
    resource: Any = None


class _IngressPathIn(StrictModel):
    path: str | None = None
    path_type: str = Field(alias="pathType", examples=["pathType: Prefix"])
    backend: _IngressBackendIn = Field(examples=["backend: {service: {name: web, port: {number: 80}}}"])


class _IngressHttpIn(StrictModel):
    paths: list[_IngressPathIn] = Field(examples=["paths: [{path: /, pathType: Prefix, backend: {service: "
                                                  "{name: web, port: {number: 80}}}}]"])


class _IngressRuleIn(StrictModel):
    host: str | None = None
    http: _IngressHttpIn | None = None


class _IngressSpecIn(StrictModel):
    """The v1 Ingress spec. tls is read as Any only to refuse it with a clear message."""

    ingress_class_name: str | None = Field(None, alias="ingressClassName")
    default_backend: _IngressBackendIn | None = Field(None, alias="defaultBackend")
    rules: list[_IngressRuleIn] | None = None
    tls: Any = None


class _IngressIn(StrictModel):
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: ObjectMetaIn = Field(examples=["metadata: {name: web}"])
    spec: _IngressSpecIn = Field(examples=["spec: {rules: [{host: web.example.com, http: {paths: [...]}}]}"])


# ---------------------------------------------------------------------------- the ingress controller


def check_ingress_controller(controller_in: IngressControllerIn, nodes_in: list[NodeIn],
                             issues: Issues) -> IngressController:
    """The ingress controller addon (ingress-nginx's role): one pod, reached on a node port of every node.
    enabled left out (None) means it runs exactly when the lab has Ingress objects."""
    loc = ("spec", "ingressController")
    default = IngressController()
    addon_node(controller_in.node, nodes_in, loc + ("node",), "the ingress controller pod", "the first node",
               issues)
    port = controller_in.node_port if controller_in.node_port is not None else default.node_port
    low, high = NODE_PORT_RANGE
    if not low <= port <= high:
        issues.add(loc + ("nodePort",), f"nodePort {show(port)} is outside the node port range {low}-{high} "
                                        "(kube-apiserver's --service-node-port-range), where the controller's node "
                                        f"port comes from like a NodePort service's: pick one in it, e.g. "
                                        f"{default.node_port}")
        port = default.node_port
    return IngressController(enabled=controller_in.enabled, node=controller_in.node, node_port=port)


# ---------------------------------------------------------------------------- an Ingress's own rules


def read_ingress(obj: Any, loc: Loc, issues: Issues) -> Parsed | None:
    """A networking.k8s.io/v1 Ingress's own rules; whether its backends exist is `ingresses_against_lab`'s check."""
    model = validate(_IngressIn, obj, loc, issues)
    if model is None:
        return None
    before = len(issues)
    meta, spec, sloc = model.metadata, model.spec, loc + ("spec",)
    check_meta(meta, loc + ("metadata",), issues)
    if spec.ingress_class_name is not None:
        problem = dns_name_problem(spec.ingress_class_name, "ingressClassName", "nginx")
        if problem:
            issues.add(sloc + ("ingressClassName",), problem)
    if spec.tls is not None and spec.tls != []:
        issues.add(sloc + ("tls",), "tls is not supported by kubenet-lab: its ingress controller serves plain HTTP on "
                                    "its node port and terminates no TLS; remove tls and reach the hosts with http://")
    backends: list[tuple[Loc, IngressBackend]] = []
    routes: list[tuple[Loc, str | None, str, str]] = []
    default = None
    if spec.default_backend is not None:
        default = _ingress_backend(spec.default_backend, sloc + ("defaultBackend",), backends, issues)
    rules = [_ingress_rule(rule, sloc + ("rules", index), backends, routes, issues)
             for index, rule in enumerate(spec.rules or [])]
    if not spec.rules and spec.default_backend is None:
        # Kubernetes' rule: an Ingress routes nothing without one of the two.
        issues.add(sloc, "an Ingress needs rules or a defaultBackend (Kubernetes refuses one with neither): add "
                         "rules: [{host: web.example.com, http: {paths: [{path: /, pathType: Prefix, backend: "
                         "{service: {name: web, port: {number: 80}}}}]}}], or defaultBackend: {service: {name: web, "
                         "port: {number: 80}}}")
    if len(issues) > before:
        return None
    namespace = meta.namespace or "default"
    manifest = normalized_manifest(model)
    manifest["metadata"].setdefault("namespace", "default")
    ingress = Ingress(name=meta.name, namespace=namespace, rules=tuple(r for r in rules if r is not None),
                      default_backend=default, class_name=spec.ingress_class_name)
    return Parsed(model.api_version, model.kind, loc, manifest, meta.name, namespace, dict(meta.labels or {}),
                  ingress=IngressDraft(ingress, tuple(backends), tuple(routes)))


def _ingress_rule(rule: _IngressRuleIn, loc: Loc, backends: list[tuple[Loc, IngressBackend]],
                  routes: list[tuple[Loc, str | None, str, str]], issues: Issues) -> IngressRule | None:
    host = rule.host or None  # "" is no host, as in Kubernetes: the rule matches every host
    if host is not None:
        problem = dns_name_problem(host, "host", "web.example.com", wildcard=True)
        if problem:
            issues.add(loc + ("host",), problem)
    if rule.http is None:
        # Kubernetes accepts a rule without http, but it routes nothing: most likely http was forgotten.
        issues.add(loc + ("http",), "missing; a rule routes the HTTP paths of its host: add http: {paths: [{path: /, "
                                    "pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}]}")
        return None
    if not rule.http.paths:
        issues.add(loc + ("http", "paths"), "no paths: a rule needs at least one (Kubernetes requires it), e.g. paths: "
                                            "[{path: /, pathType: Prefix, backend: {service: {name: web, port: "
                                            "{number: 80}}}}]")
    paths = []
    for index, path_in in enumerate(rule.http.paths):
        ploc = loc + ("http", "paths", index)
        path_type = _path_type(path_in.path_type, ploc + ("pathType",), issues)
        path = _ingress_path(path_in.path, path_type, ploc + ("path",), issues)
        backend = _ingress_backend(path_in.backend, ploc + ("backend",), backends, issues)
        if path_type is None or path is None or backend is None:
            continue
        routes.append((ploc, host, path, path_type))
        paths.append(IngressPath(path=path, path_type=path_type, backend=backend))
    return IngressRule(host=host, paths=tuple(paths))


def _path_type(value: str, loc: Loc, issues: Issues) -> str | None:
    """pathType is required in networking.k8s.io/v1 (v1beta1 defaulted it)."""
    if value in PATH_TYPES:
        return value
    close = close_match(value, PATH_TYPES)
    hint = f" (did you mean {close}?)" if close else ""
    issues.add(loc, f"pathType must be one of {', '.join(PATH_TYPES)}, got {short(repr(value), 40)}{hint}")
    return None


def _ingress_path(path: str | None, path_type: str | None, loc: Loc, issues: Issues) -> str | None:
    """An HTTP path: absolute (Kubernetes requires it of Prefix and Exact paths, and of any path given), free of
    the sequences Kubernetes refuses, and of characters a controller would have to escape."""
    if path is None or path == "":
        if path_type == "ImplementationSpecific":
            return "/"  # Kubernetes allows it empty; ingress-nginx reads it as /
        issues.add(loc, f"missing; pathType {path_type or 'Prefix'} needs a path starting with '/', e.g. path: /")
        return None
    shown = short(repr(path), 60)
    if not path.startswith("/"):
        issues.add(loc, f"path {shown} must start with '/' (an absolute URL path): write /{short(path, 58)}")
        return None
    if len(path) > _INGRESS_PATH_MAX:
        issues.add(loc, f"path {shown} is {len(path)} characters; at most {_INGRESS_PATH_MAX} are allowed here")
        return None
    bad = next((part for part in _BAD_PATH_PARTS if part in path), None)
    if bad is None:
        bad = next((end for end in _BAD_PATH_ENDINGS if path.endswith(end)), None)
    if bad is not None:
        issues.add(loc, f"path {shown} contains {bad!r}, which Kubernetes refuses in an Ingress path: write the path "
                        "without empty, '.' or '..' segments")
        return None
    if not _INGRESS_PATH.fullmatch(path):
        issues.add(loc, f"path {shown} may only hold letters, digits and '/', '-', '_', '.', '~' (the characters "
                        "ingress-nginx's strict path check allows): remove the others")
        return None
    return path


def _ingress_backend(backend_in: _IngressBackendIn, loc: Loc, backends: list[tuple[Loc, IngressBackend]],
                     issues: Issues) -> IngressBackend | None:
    """A backend: a Service of the Ingress's namespace and one of its ports, by number or by name."""
    example = "service: {name: web, port: {number: 80}}"
    if backend_in.resource is not None:
        issues.add(loc + ("resource",), f"resource backends are not supported by kubenet-lab (its controller routes "
                                        f"to Services only): remove resource and give {example}")
        return None
    if backend_in.service is None:
        issues.add(loc + ("service",), f"missing; a backend names a Service of the Ingress's namespace, e.g. {example}")
        return None
    service, sloc = backend_in.service, loc + ("service",)
    ok = True
    problem = service_name_problem(service.name)
    if problem:
        issues.add(sloc + ("name",), problem)
        ok = False
    number, name = service.port.number, service.port.name
    port: int | str | None = None
    if number is not None and name is not None:
        issues.add(sloc + ("port",), "give the service port's number or its name, not both (Kubernetes refuses both): "
                                     f"e.g. port: {{number: {show(number)}}}")
    elif number is not None:
        if 1 <= number <= 65535:
            port = number
        else:
            issues.add(sloc + ("port", "number"), f"{show(number)} is not a port number: use 1..65535, the port of "
                                                  "the service (not its targetPort)")
    elif name is not None:
        problem = port_name_problem(name)
        if problem:
            issues.add(sloc + ("port", "name"), problem + " (it names a port of the service)")
        else:
            port = name
    else:
        issues.add(sloc + ("port",), "missing the port: give the service port's number or name, e.g. port: "
                                     "{number: 80} or port: {name: http}")
    if not ok or port is None:
        return None
    backend = IngressBackend(service=service.name, port=port)
    backends.append((loc, backend))
    return backend


# ---------------------------------------------------------------------------- Ingresses against the lab


def ingresses_against_lab(parsed: list[Parsed], lab: Lab, namespaces: set[str], issues: Issues,
                          running: bool) -> list[Ingress]:
    """The Ingresses among `parsed`, checked against each other, the lab's Ingresses and the Services they send
    to: those of the lab (lab.services) and those among `parsed`. `running`: `lab` is a running lab that the
    objects are applied to (its services were there before)."""
    objs = [p for p in parsed if p.ingress is not None]
    if not objs:
        return []
    services = {s.key: s for s in lab.services}
    for obj in parsed:
        if obj.service is not None:
            services.setdefault(f"{obj.namespace}/{obj.name}", obj.service.service)
    defined = {i.key: f"ingress {i.key}, already in lab {lab.name}" for i in lab.ingresses}
    routes: dict[tuple[str, str, str], str] = {}
    default_owner: str | None = None
    for ingress in lab.ingresses:
        where = f"ingress {ingress.key}, already in lab {lab.name}"
        for rule in ingress.rules:
            for path in rule.paths:
                routes.setdefault(_route_key(rule.host, path.path, path.path_type), where)
        if ingress.default_backend is not None and default_owner is None:
            default_owner = where
    found = []
    for obj in objs:
        assert obj.ingress is not None and obj.namespace is not None
        key = f"{obj.namespace}/{obj.name}"
        if obj.namespace not in namespaces:
            issues.add(obj.loc + ("metadata", "namespace"),
                       f"namespace {obj.namespace} does not exist: add a v1 Namespace object named {obj.namespace}")
        if key in defined:
            issues.add(obj.loc + ("metadata", "name"), f"ingress {key} clashes with {defined[key]}: rename one")
        defined.setdefault(key, f"the ingress at {written_at(obj.loc, issues)}")
        for loc, backend in obj.ingress.backends:
            _check_ingress_backend(backend, obj.namespace, services, loc, issues)
        for loc, host, path, path_type in obj.ingress.routes:
            route = _route_key(host, path, path_type)
            if route in routes:
                owner = f"host {host}" if host else "any host"
                issues.add(loc, f"{path_type} path {path} of {owner} is already routed by {routes[route]}: a host and "
                                "path go to one backend; remove one, or change the path")
            routes.setdefault(route, written_at(loc, issues))
        if obj.ingress.ingress.default_backend is not None:
            if default_owner is not None:
                issues.add(obj.loc + ("spec", "defaultBackend"),
                           f"the default backend is already given by {default_owner}: the ingress controller has one "
                           "default backend (for requests no rule matches); remove one of them")
            default_owner = default_owner or f"the ingress at {written_at(obj.loc, issues)}"
        found.append(obj.ingress.ingress)
    if running:
        _controller_starts(objs, lab, issues)
    return found


def _route_key(host: str | None, path: str, path_type: str) -> tuple[str, str, str]:
    """Routes that match the same requests: ImplementationSpecific is read as Prefix (as ingress-nginx does),
    and a Prefix path matches with or without its trailing '/' (Kubernetes' prefix matching is by segment)."""
    if path_type == "Exact":
        return host or "", path, "Exact"
    return host or "", path.rstrip("/") or "/", "Prefix"


def _check_ingress_backend(backend: IngressBackend, namespace: str, services: dict[str, Service], loc: Loc,
                           issues: Issues) -> None:
    """An Ingress sends to a Service of its own namespace (Kubernetes has no cross-namespace backends), on
    one of the Service's ports: by number, its `port` (not the targetPort), or by the port's name."""
    key = f"{namespace}/{backend.service}"
    service = services.get(key)
    if service is None:
        if ("Service", namespace, backend.service) in issues.refused:
            return  # the Service has problems of its own, reported where it is written
        there = sorted(s.name for s in services.values() if s.namespace == namespace)
        listed = f"services there: {', '.join(there)}" if there else "it has no services"
        issues.add(loc + ("service", "name"), f"service {key} does not exist: a backend must be a Service in the "
                                              f"Ingress's namespace {namespace} ({listed}); add the Service, or fix "
                                              "the name")
        return
    ports = ", ".join(f"{p.port}/{p.protocol}" + (f" named {p.name}" if p.name else "") for p in service.ports)
    ports = f"its ports: {ports}" if ports else "it has no ports"
    if isinstance(backend.port, int):
        matching = [p for p in service.ports if p.port == backend.port]
        where, what = loc + ("service", "port", "number"), f"port {backend.port}"
    else:
        matching = [p for p in service.ports if p.name and p.name == backend.port]
        where, what = loc + ("service", "port", "name"), f"port named {backend.port}"
    if not matching:
        fix = "use one of them" if service.ports else "add ports to the Service"
        issues.add(where, f"service {key} has no {what} ({ports}): {fix}; an Ingress backend names the Service's "
                          "port, not its targetPort")
    elif not any(p.protocol == "TCP" for p in matching):
        issues.add(where, f"{what} of service {key} is {matching[0].protocol}, but an Ingress sends HTTP, over TCP "
                          f"({ports}): use a TCP port")


def _controller_starts(objs: list[Parsed], lab: Lab, issues: Issues) -> None:
    """Applied to a running lab whose controller is automatic and not running yet, the first Ingress starts it:
    its node port must still be free of the lab's services."""
    controller = lab.ingress_controller
    if controller.enabled is not None or lab.ingresses:
        return
    for service in lab.services:
        if any(p.node_port == controller.node_port for p in service.ports):
            issues.add(objs[0].loc + ("metadata", "name"),
                       f"this lab's first Ingress starts the ingress controller, which listens on node port "
                       f"{controller.node_port} of every node (spec.ingressController.nodePort), but service "
                       f"{service.key} already uses that node port: delete that service (or give it another node "
                       "port) first, or bring the lab up with another ingressController.nodePort")
            return
