"""Services in a spec: their own rules, then their cluster IPs and node ports; kube-proxy's mode.

A Service's own rules (types, ports, targetPort, session affinity, traffic policies) are checked per object;
what depends on the lab is checked against the other Services: a given cluster IP or node port is checked,
a missing one allocated deterministically, and written into the normalized manifest as kube-apiserver stores
it. The addons (the cluster DNS, `services.dns_spec`; the ingress controller, `services.ingress_spec`) and
external hosts (`services.external_spec`) are checked in modules of their own.
"""
from __future__ import annotations

import itertools
import json
import re
import typing
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pydantic import Field

from topo import names
from topo.cluster_spec import NodeIn
from topo.model import IPTABLES_BACKENDS, NODE_PORT_RANGE, PROXY_MODES, KubeProxy, Lab, Service, ServicePort
from topo.object_spec import ObjectMetaIn, Parsed, ServiceDraft, check_labels, check_meta, normalized_manifest
from topo.address_spec import parse_address
from topo.schema import (Issues, Loc, StrictModel, close_match, looks_numeric, short, show, validate, written_at, wrong_type)
from topo.workload_spec import port_name_problem, protocol_problem
from services.service_type_spec import EXTERNAL_NAME, external_name, service_type as _service_type

HEADLESS = "None"  # clusterIP: None (the string) makes a headless service: DNS names, no virtual IP
SESSION_AFFINITIES = ("None", "ClientIP")
TRAFFIC_POLICIES = ("Cluster", "Local")
AFFINITY_TIMEOUT_DEFAULT = 10800  # Kubernetes' default for ClientIP affinity: three hours
AFFINITY_TIMEOUT_MAX = 86400  # Kubernetes' limit: a day
DUAL_STACK_POLICIES = ("PreferDualStack", "RequireDualStack")
# ClusterIP allocation (see `_cluster_ips`): offsets from the serviceCIDR's network address.
KUBERNETES_SERVICE_OFFSET = 1  # 10.96.0.1: the `kubernetes` service, the API server's cluster IP
DNS_SERVICE_OFFSET = 10  # 10.96.0.10: the cluster DNS (kube-dns), by convention
CLUSTER_IP_OFFSET = 100  # the first allocated cluster IP: 10.96.0.100, the explainer's example
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?", re.ASCII)  # matched in full

# kube-proxy modes that are gone or belong to another platform: named so the message says why, not "unknown".
PROXY_MODE_HINTS = {
    "userspace": "the userspace mode was removed from kube-proxy in Kubernetes 1.26",
    "kernelspace": "kernelspace is kube-proxy's mode on Windows nodes",
}


class KubeProxyIn(StrictModel):
    mode: str | None = None
    iptables: str | None = None


class _ServicePortIn(StrictModel):
    """targetPort is a number or a container port's name (Kubernetes' IntOrString), so it is read as Any and
    checked by `_target_port`, which can say which of the two was meant."""

    name: str | None = None
    port: int = Field(examples=["port: 80"])
    target_port: Any = Field(None, alias="targetPort")
    protocol: str | None = None
    node_port: int | None = Field(None, alias="nodePort")


class _ClientIPConfigIn(StrictModel):
    timeout_seconds: int | None = Field(None, alias="timeoutSeconds")


class _AffinityConfigIn(StrictModel):
    client_ip: _ClientIPConfigIn | None = Field(None, alias="clientIP")


class _ServiceSpecIn(StrictModel):
    """The Service spec subset a lab runs. ipFamilies, ipFamilyPolicy and internalTrafficPolicy are accepted
    only with Kubernetes' default values (an IPv4 single-stack lab; traffic policy Cluster)."""

    type: str | None = None
    cluster_ip: str | None = Field(None, alias="clusterIP")
    selector: dict[str, str] | None = None
    ports: list[_ServicePortIn] | None = None
    session_affinity: str | None = Field(None, alias="sessionAffinity")
    session_affinity_config: _AffinityConfigIn | None = Field(None, alias="sessionAffinityConfig")
    external_traffic_policy: str | None = Field(None, alias="externalTrafficPolicy")
    internal_traffic_policy: str | None = Field(None, alias="internalTrafficPolicy")
    ip_families: list[str] | None = Field(None, alias="ipFamilies")
    ip_family_policy: str | None = Field(None, alias="ipFamilyPolicy")
    external_name: Any = Field(None, alias="externalName")


class _ServiceIn(StrictModel):
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: ObjectMetaIn = Field(examples=["metadata: {name: web}"])
    spec: _ServiceSpecIn = Field(examples=["spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}"])


# ---------------------------------------------------------------------------- kube-proxy and the addons


def check_kube_proxy(proxy_in: KubeProxyIn, issues: Issues) -> KubeProxy | None:
    """kube-proxy's mode. Whether the kernel has what ipvs (or nftables) needs is checked at `lab up`."""
    mode = proxy_in.mode if proxy_in.mode is not None else KubeProxy().mode
    backend = proxy_in.iptables if proxy_in.iptables is not None else KubeProxy().iptables
    if backend not in IPTABLES_BACKENDS:
        close = close_match(backend, IPTABLES_BACKENDS)
        hint = f" (did you mean {close}?)" if close else ""
        issues.add(("spec", "kubeProxy", "iptables"),
                   f"unknown iptables backend {short(repr(backend), 40)}{hint}: use auto (the machine's own iptables, "
                   "as kube-proxy picks it), nft or legacy")
        return None
    if mode in PROXY_MODES:
        return KubeProxy(mode=mode, iptables=backend)
    loc = ("spec", "kubeProxy", "mode")
    supported = ", ".join(PROXY_MODES)
    if mode.lower() in PROXY_MODE_HINTS:
        issues.add(loc, f"{PROXY_MODE_HINTS[mode.lower()]}: use one of {supported}")
        return None
    close = close_match(mode, PROXY_MODES)
    hint = f" (did you mean {close}?)" if close else ""
    issues.add(loc, f"unknown kube-proxy mode {short(repr(mode), 40)}{hint}; supported: {supported} "
                    f"(iptables is Kubernetes' default)")
    return None


def addon_node(node: str | None, nodes_in: list[NodeIn], loc: Loc, what: str, default: str,
               issues: Issues) -> None:
    """An addon's `node` must name a node of the lab (its pod runs there)."""
    known = [n.name for n in nodes_in]
    if node is not None and known and node not in known:
        issues.add(loc, f"node {short(node, 60)} is not a node of this lab (nodes: {', '.join(known)}): name the "
                        f"node {what} runs on, or leave node out for {default}")


# ---------------------------------------------------------------------------- a Service's own rules


def service_name_problem(value: object) -> str | None:
    """Kubernetes requires Service names to be DNS-1035 labels: a DNS-1123 label that starts with a letter
    (a Service name becomes a DNS name and the prefix of its environment variables in pods)."""
    problem = names.dns_label_problem(value)
    if problem is None and _DNS1035_LABEL.fullmatch(value):  # type: ignore[arg-type]
        return None
    if problem is None:
        return (f"{value!r} starts with a digit, but Kubernetes requires a Service name to start with a letter "
                f"(a DNS-1035 label): rename it, e.g. svc-{value}")
    if isinstance(value, str) and 0 < len(value) <= names.DNS1123_LABEL_MAX:
        return (f"{short(repr(value), 60)} is not a valid Service name: use lower-case letters, digits and '-', "
                "starting with a letter and ending with a letter or digit")
    return problem


def read_service(obj: Any, loc: Loc, issues: Issues) -> Parsed | None:
    """A v1 Service's own rules; what depends on the lab (serviceCIDR, other services) is `services_against_lab`'s."""
    model = validate(_ServiceIn, obj, loc, issues)
    if model is None:
        return None
    before = len(issues)
    meta, spec, sloc = model.metadata, model.spec, loc + ("spec",)
    check_meta(meta, loc + ("metadata",), issues, name_problem=service_name_problem)
    service_type = _service_type(spec.type, sloc + ("type",), issues)
    alias = external_name(spec.external_name, service_type, spec.cluster_ip, sloc, issues)
    headless, cluster_ip = (False, None) if service_type == EXTERNAL_NAME else _given_cluster_ip(
        spec.cluster_ip, service_type, sloc + ("clusterIP",), issues)
    ports = _service_ports(spec.ports or [], service_type, headless or service_type == EXTERNAL_NAME,
                           sloc + ("ports",), issues)
    selector = dict(spec.selector or {})
    check_labels(selector, sloc + ("selector",), issues)
    affinity, timeout = _session_affinity(spec, sloc, issues)
    policy = _external_traffic_policy(spec.external_traffic_policy, service_type, sloc, issues)
    _check_defaults_only(spec, sloc, issues)
    if len(issues) > before or service_type is None or affinity is None or policy is None:
        return None
    namespace = meta.namespace or "default"
    manifest = normalized_manifest(model)
    manifest["metadata"].setdefault("namespace", "default")
    _fill_service_defaults(manifest["spec"], service_type, affinity, timeout)
    service = Service(name=meta.name, namespace=namespace, cluster_ip=cluster_ip, ports=ports,
                      selector=tuple(selector.items()), type=service_type, session_affinity=affinity,
                      affinity_timeout=timeout, external_traffic_policy=policy, external_name=alias)
    return Parsed(model.api_version, model.kind, loc, manifest, meta.name, namespace, dict(meta.labels or {}),
                  service=ServiceDraft(service, headless))


def _given_cluster_ip(text: str | None, service_type: str | None, loc: Loc,
                      issues: Issues) -> tuple[bool, IPv4Address | None]:
    """(headless, the address given). Absent or "" (as in Kubernetes): one is allocated."""
    if text is None or text == "":
        return False, None
    if text == HEADLESS:
        if service_type == "NodePort":
            issues.add(loc, "clusterIP None makes a headless service, which has no cluster IP for node ports to "
                            "forward to, so Kubernetes refuses it for type NodePort: remove clusterIP: None, or use "
                            "type: ClusterIP")
        return True, None
    if text.lower() == HEADLESS.lower():
        issues.add(loc, f"{short(repr(text), 40)} is not an address: write None, with a capital N, for a headless "
                        "service (Kubernetes matches it exactly)")
        return False, None
    return False, parse_address(text, loc, issues, "cluster.serviceCIDR", "10.96.0.50")


def _service_ports(ports_in: list[_ServicePortIn], service_type: str | None, headless: bool, loc: Loc,
                   issues: Issues) -> tuple[ServicePort, ...]:
    if not ports_in and not headless:
        issues.add(loc, "no ports: a service needs at least one, e.g. ports: [{port: 80, targetPort: 8080}] (only a "
                        "headless service, clusterIP: None, may have none)")
    named: dict[str, int] = {}
    served: dict[tuple[int, str], int] = {}
    node_ports: dict[tuple[int, str], int] = {}
    ports = []
    for index, port_in in enumerate(ports_in):
        ploc = loc + (index,)
        name = port_in.name or ""
        protocol = port_in.protocol if port_in.protocol is not None else "TCP"
        if name:
            problem = names.dns_label_problem(name)
            if problem:
                issues.add(ploc + ("name",), problem)
            elif name in named:
                issues.add(ploc + ("name",), f"port name {name} is already used by ports[{named[name]}]: give each "
                                             "port of a service its own name")
            named.setdefault(name, index)
        elif len(ports_in) > 1:
            issues.add(ploc + ("name",), "missing; a service with more than one port needs a name for each (its "
                                         "endpoints and kube-proxy's rules tell the ports apart by name): add one, "
                                         f"e.g. name: {_port_example(port_in.port)}")
        problem = protocol_problem(protocol)
        if problem:
            issues.add(ploc + ("protocol",), problem)
        if not 1 <= port_in.port <= 65535:
            issues.add(ploc + ("port",), f"{show(port_in.port)} is not a port number: use 1..65535")
        elif (port_in.port, protocol) in served:
            issues.add(ploc + ("port",), f"port {port_in.port}/{protocol} is already served by ports"
                                         f"[{served[(port_in.port, protocol)]}]: a service serves each port and "
                                         "protocol once; remove one, or change its port")
        served.setdefault((port_in.port, protocol), index)
        target = _target_port(port_in.target_port, port_in.port, ploc + ("targetPort",), issues)
        node_port = port_in.node_port
        if node_port is not None and service_type is not None:
            _check_node_port(node_port, protocol, service_type, node_ports, ploc + ("nodePort",), issues)
            node_ports.setdefault((node_port, protocol), index)
        ports.append(ServicePort(name=name, port=port_in.port, target_port=target if target is not None else 0,
                                 protocol=protocol, node_port=node_port))
    return tuple(ports)


def _port_example(port: int) -> str:
    return {53: "dns", 80: "http", 443: "https"}.get(port, f"port-{port}" if 1 <= port <= 65535 else "http")


def _target_port(value: Any, port: int, loc: Loc, issues: Issues) -> int | str | None:
    """targetPort: a number, or the name of a container port (looked up in each endpoint pod); the service's
    port when left out."""
    if value is None:
        return port
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        issues.add(loc, wrong_type("a port number or the name of a container port", value,
                                   issues.source.raw.get(loc)))
        return None
    if isinstance(value, int):
        if 1 <= value <= 65535:
            return value
        issues.add(loc, f"{show(value)} is not a port number: use 1..65535, or the name of a container port")
        return None
    if looks_numeric(value):
        issues.add(loc, f"{short(repr(value), 30)} is a string, so it would name a container port, and port names "
                        f"need a letter: remove the quotes for port number {value.strip()}")
        return None
    problem = port_name_problem(value)
    if problem:
        issues.add(loc, problem + " (targetPort names a port of the pods' containers)")
        return None
    return value


def _check_node_port(node_port: int, protocol: str, service_type: str, seen: dict[tuple[int, str], int], loc: Loc,
                     issues: Issues) -> None:
    low, high = NODE_PORT_RANGE
    if service_type != "NodePort":
        issues.add(loc, f"nodePort is only used by type NodePort, and this service is type {service_type}: remove "
                        "nodePort, or set type: NodePort")
    elif not low <= node_port <= high:
        issues.add(loc, f"nodePort {show(node_port)} is outside the node port range {low}-{high} (kube-apiserver's "
                        f"--service-node-port-range): pick one in it, or leave nodePort out to have one allocated")
    elif (node_port, protocol) in seen:
        issues.add(loc, f"nodePort {node_port}/{protocol} is already used by ports[{seen[(node_port, protocol)]}]: "
                        "give each port its own, or leave nodePort out to have one allocated")


def _session_affinity(spec: _ServiceSpecIn, loc: Loc, issues: Issues) -> tuple[str | None, int]:
    affinity = spec.session_affinity if spec.session_affinity is not None else SESSION_AFFINITIES[0]
    timeout = AFFINITY_TIMEOUT_DEFAULT
    if affinity not in SESSION_AFFINITIES:
        close = close_match(affinity, SESSION_AFFINITIES)
        hint = f" (did you mean {close}?)" if close else ""
        issues.add(loc + ("sessionAffinity",), f"sessionAffinity must be None or ClientIP, got "
                                               f"{short(repr(affinity), 40)}{hint}")
        return None, timeout
    config = spec.session_affinity_config
    if config is None:
        return affinity, timeout
    if affinity != "ClientIP":
        note = "" if spec.session_affinity is not None else " (the default)"
        issues.add(loc + ("sessionAffinityConfig",),
                   f"sessionAffinityConfig only applies to sessionAffinity ClientIP, but sessionAffinity is "
                   f"{affinity}{note}: set sessionAffinity: ClientIP, or remove sessionAffinityConfig")
        return None, timeout
    given = config.client_ip.timeout_seconds if config.client_ip is not None else None
    if given is not None and not 1 <= given <= AFFINITY_TIMEOUT_MAX:
        issues.add(loc + ("sessionAffinityConfig", "clientIP", "timeoutSeconds"),
                   f"timeoutSeconds {show(given)} is out of range: use 1..{AFFINITY_TIMEOUT_MAX} (a day); "
                   f"Kubernetes' default is {AFFINITY_TIMEOUT_DEFAULT} (three hours)")
        return None, timeout
    return affinity, given if given is not None else timeout


def _external_traffic_policy(given: str | None, service_type: str | None, loc: Loc, issues: Issues) -> str | None:
    loc = loc + ("externalTrafficPolicy",)
    if given is None:
        return TRAFFIC_POLICIES[0]
    if given not in TRAFFIC_POLICIES:
        close = close_match(given, TRAFFIC_POLICIES)
        hint = f" (did you mean {close}?)" if close else ""
        issues.add(loc, f"externalTrafficPolicy must be Cluster or Local, got {short(repr(given), 40)}{hint}")
        return None
    if service_type in ("ClusterIP", EXTERNAL_NAME):
        issues.add(loc, "externalTrafficPolicy is about traffic from outside the cluster, and Kubernetes allows it "
                        "only for services reachable from outside (here: type NodePort); this service is type "
                        f"{service_type}: remove externalTrafficPolicy, or set type: NodePort")
        return None
    return given


def _check_defaults_only(spec: _ServiceSpecIn, loc: Loc, issues: Issues) -> None:
    """Fields a lab does not vary: accepted (manifests copied from a cluster carry them) with Kubernetes'
    defaults for an IPv4 single-stack cluster only, so a value that would change the behaviour is not ignored."""
    if spec.ip_families is not None and spec.ip_families != ["IPv4"]:
        issues.add(loc + ("ipFamilies",), f"ipFamilies {short(json.dumps(spec.ip_families), 40)} is not supported: "
                                          "kubenet-lab labs are IPv4 only; remove ipFamilies, or write [IPv4]")
    policy = spec.ip_family_policy
    if policy is not None and policy != "SingleStack":
        why = "asks for dual-stack, but" if policy in DUAL_STACK_POLICIES else "is not a policy here:"
        issues.add(loc + ("ipFamilyPolicy",), f"ipFamilyPolicy {short(repr(policy), 40)} {why} kubenet-lab labs are "
                                              "IPv4 only; remove ipFamilyPolicy, or write SingleStack")
    internal = spec.internal_traffic_policy
    if internal == "Local":
        issues.add(loc + ("internalTrafficPolicy",), "internalTrafficPolicy Local is not supported by kubenet-lab: "
                                                     "remove it (the default, Cluster, sends traffic to ready "
                                                     "endpoints on every node)")
    elif internal is not None and internal != "Cluster":
        close = close_match(internal, TRAFFIC_POLICIES)
        hint = f" (did you mean {close}?)" if close else ""
        issues.add(loc + ("internalTrafficPolicy",), f"internalTrafficPolicy must be Cluster, got "
                                                     f"{short(repr(internal), 40)}{hint}: remove it, or write Cluster")


def _fill_service_defaults(spec: dict[str, Any], service_type: str, affinity: str, timeout: int) -> None:
    """Kubernetes' defaults, as kube-apiserver stores them; the allocated clusterIP and nodePorts come later."""
    spec["type"] = service_type
    spec["sessionAffinity"] = affinity
    for port in spec.get("ports", []):
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port["port"])
    if service_type == "NodePort":
        spec.setdefault("externalTrafficPolicy", TRAFFIC_POLICIES[0])
    if affinity == "ClientIP":
        config = spec.setdefault("sessionAffinityConfig", {})
        config.setdefault("clientIP", {})["timeoutSeconds"] = timeout


# ---------------------------------------------------------------------------- cluster IPs and node ports


def services_against_lab(parsed: list[Parsed], lab: Lab, service_cidr: IPv4Network | None, namespaces: set[str],
                         issues: Issues) -> list[Service]:
    """The Services among `parsed`, checked against each other and the lab's services, with their cluster IPs
    and node ports allocated; the allocated values are written into the normalized manifests, as kube-apiserver
    stores them. service_cidr None: the cluster is wrong, so cluster IPs are neither checked nor allocated."""
    objs = [p for p in parsed if p.service is not None]
    if not objs:
        return []
    defined = {s.key: f"service {s.key}, already in lab {lab.name}" for s in lab.services}
    for obj in objs:
        key = f"{obj.namespace}/{obj.name}"
        if obj.namespace not in namespaces:
            issues.add(obj.loc + ("metadata", "namespace"),
                       f"namespace {obj.namespace} does not exist: add a v1 Namespace object named {obj.namespace}")
        if key in defined:
            issues.add(obj.loc + ("metadata", "name"), f"service {key} clashes with {defined[key]}: rename one")
        defined.setdefault(key, f"the service at {written_at(obj.loc, issues)}")
    ips = _cluster_ips(objs, lab, service_cidr, issues)
    ports = _node_ports(objs, lab, _controller_port(lab, parsed), issues)
    services = []
    for index, obj in enumerate(objs):
        assert obj.service is not None
        service = replace(obj.service.service, cluster_ip=ips.get(index), ports=ports[index])
        spec = obj.manifest["spec"]
        if obj.service.headless:
            spec["clusterIP"] = HEADLESS
        elif service.cluster_ip is not None:
            spec["clusterIP"] = str(service.cluster_ip)
        if service.type == "NodePort":
            for port, manifest_port in zip(service.ports, spec.get("ports", [])):
                if port.node_port is not None:
                    manifest_port["nodePort"] = port.node_port
        services.append(service)
    return services


def _cluster_ip_problem(ip: IPv4Address, cidr: IPv4Network) -> str | None:
    """Why `ip` cannot be a given clusterIP in serviceCIDR `cidr`, or None. The DNS address (.10) may be given."""
    usable = f"{cidr.network_address + 2}..{cidr.broadcast_address - 1}"
    fix = f"pick one in {usable}, or leave clusterIP out to have one allocated"
    if ip not in cidr:
        return f"{ip} is outside cluster.serviceCIDR {cidr}, where cluster IPs come from: {fix}"
    if ip == cidr.network_address:
        return f"{ip} is the network address of cluster.serviceCIDR {cidr}, not a usable address: {fix}"
    if ip == cidr.broadcast_address:
        return f"{ip} is the broadcast address of cluster.serviceCIDR {cidr}, not a usable address: {fix}"
    if ip == cidr.network_address + KUBERNETES_SERVICE_OFFSET:
        return (f"{ip} is the first address of cluster.serviceCIDR {cidr}, which Kubernetes reserves for the "
                f"`kubernetes` service (the API server's cluster IP): {fix}")
    return None


def _cluster_ip_candidates(cidr: IPv4Network) -> typing.Iterator[IPv4Address]:
    """The addresses a service without clusterIP may get, in the order they are handed out.

    kube-apiserver picks a random free address; a lab picks deterministically, so a spec always gives the
    same addresses: from network + 100 upward (10.96.0.100, .101, ...: the explainer's example ClusterIP
    is 10.96.0.100), then, in a range too small for that, from network + 2. Never the network address,
    .1 (the `kubernetes` service), .10 (the cluster DNS, kube-dns) or the broadcast address.
    """
    network, broadcast = int(cidr.network_address), int(cidr.broadcast_address)
    reserved = {network + KUBERNETES_SERVICE_OFFSET, network + DNS_SERVICE_OFFSET}
    start = min(network + CLUSTER_IP_OFFSET, broadcast)
    for address in itertools.chain(range(start, broadcast), range(network + 2, start)):  # lazily: a /12 is 2^20
        if address not in reserved:
            yield IPv4Address(address)


def _cluster_ips(objs: list[Parsed], lab: Lab, cidr: IPv4Network | None, issues: Issues) -> dict[int, IPv4Address]:
    """Each non-headless service's cluster IP (by position in `objs`): the one given, checked, else the lowest
    free candidate. Given addresses are taken first, so a later service's address is never handed out earlier."""
    owners = {s.cluster_ip: f"service {s.key}, already in lab {lab.name}" for s in lab.services
              if s.cluster_ip is not None}
    result: dict[int, IPv4Address] = {}
    for index, obj in enumerate(objs):
        assert obj.service is not None
        ip = obj.service.service.cluster_ip
        if ip is None:
            continue
        loc = obj.loc + ("spec", "clusterIP")
        problem = _cluster_ip_problem(ip, cidr) if cidr is not None else None
        if problem is None and cidr is not None and lab.dns.enabled and ip == cidr.network_address + DNS_SERVICE_OFFSET:
            # The cluster DNS addon's kube-dns Service owns serviceCIDR + 10 (kubelet points pods' resolv.conf at it).
            problem = (f"clusterIP {ip} is serviceCIDR + {DNS_SERVICE_OFFSET}, the cluster DNS's address (its kube-dns "
                       "Service; the addon runs unless spec.dns.enabled is false): pick another address, or leave "
                       "clusterIP out to have one allocated; or set dns.enabled: false to run your own DNS there")
        if problem is None and ip in owners:
            problem = (f"clusterIP {ip} is already the cluster IP of {owners[ip]}: give each service its own, or "
                       "leave clusterIP out to have one allocated")
        if problem:
            issues.add(loc, problem)
            continue
        owners[ip] = f"service {obj.namespace}/{obj.name} at {written_at(obj.loc, issues)}"
        result[index] = ip
    if cidr is None:
        return result
    candidates = _cluster_ip_candidates(cidr)  # one pass: every address before the last one handed out is taken
    for index, obj in enumerate(objs):
        assert obj.service is not None
        if obj.service.headless or obj.service.service.cluster_ip is not None or \
                obj.service.service.type == EXTERNAL_NAME:  # an alias: no cluster IP, as in Kubernetes
            continue
        ip = next((c for c in candidates if c not in owners), None)
        if ip is None:
            issues.add(obj.loc + ("spec",), f"no address of cluster.serviceCIDR {cidr} is left for this service's "
                                            "cluster IP (.1 and .10 are reserved): use a larger serviceCIDR (a "
                                            "shorter prefix), or give fewer services a cluster IP")
            return result
        owners[ip] = f"service {obj.namespace}/{obj.name}"
        result[index] = ip
    return result


def _controller_port(lab: Lab, parsed: list[Parsed]) -> tuple[int, str] | None:
    """The ingress controller's node port, and why the controller runs, if it does: enabled, or left automatic
    (None) while the lab has Ingress objects (already, or among `parsed`). Services may not use it then."""
    controller = lab.ingress_controller
    if controller.enabled:
        return controller.node_port, "ingressController.enabled is true"
    if controller.enabled is None and (lab.ingresses or any(p.ingress is not None for p in parsed)):
        return controller.node_port, "the lab has Ingress objects"
    return None


def _node_ports(objs: list[Parsed], lab: Lab, controller: tuple[int, str] | None,
                issues: Issues) -> dict[int, tuple[ServicePort, ...]]:
    """Each service's ports with their node ports: given ones checked (a node port belongs to one service,
    since every node listens on it), missing ones of NodePort services allocated, lowest free from 30000 up
    in spec order (kube-apiserver picks at random). As kube-apiserver does, ports of one service with the
    same number (53/TCP and 53/UDP) share one allocated node port. A running ingress controller's node port
    (`controller`: the port, and why it runs) is neither given nor allocated to a service."""
    controller_port = controller[0] if controller is not None else None
    owners: dict[int, str] = {}
    for service in lab.services:
        for port in service.ports:
            if port.node_port is not None:
                owners.setdefault(port.node_port, f"service {service.key}, already in lab {lab.name}")
    for obj in objs:
        assert obj.service is not None
        mine: set[int] = set()
        for index, port in enumerate(obj.service.service.ports):
            if port.node_port is None:
                continue
            if controller is not None and port.node_port == controller_port:
                issues.add(obj.loc + ("spec", "ports", index, "nodePort"),
                           f"nodePort {port.node_port} is the ingress controller's node port "
                           f"(spec.ingressController.nodePort), and the controller runs in this lab ({controller[1]}): "
                           "every node listens on it for the controller; pick another nodePort, or leave nodePort out "
                           "to have one allocated")
                continue
            if port.node_port in owners and port.node_port not in mine:
                issues.add(obj.loc + ("spec", "ports", index, "nodePort"),
                           f"nodePort {port.node_port} is already used by {owners[port.node_port]}: every node "
                           "listens on a node port for one service only; pick another, or leave nodePort out to "
                           "have one allocated")
                continue
            mine.add(port.node_port)
            owners[port.node_port] = f"service {obj.namespace}/{obj.name} at {written_at(obj.loc, issues)}"
    if controller_port is not None:
        owners.setdefault(controller_port, "the ingress controller")  # never allocated to a service
    low, high = NODE_PORT_RANGE
    free = iter(range(low, high + 1))  # one pass, as for cluster IPs
    result: dict[int, tuple[ServicePort, ...]] = {}
    for position, obj in enumerate(objs):
        assert obj.service is not None
        ports = list(obj.service.service.ports)
        if obj.service.service.type == "NodePort":
            for index, port in enumerate(ports):
                if port.node_port is not None:
                    continue
                number = _shared_node_port(ports, port)
                if number is None:
                    number = next((n for n in free if n not in owners), None)
                    if number is None:
                        issues.add(obj.loc + ("spec", "ports", index),
                                   f"no node port is left in {low}-{high} for this port: every node port is taken; "
                                   "use type ClusterIP for some services")
                        break
                    owners[number] = f"service {obj.namespace}/{obj.name}"
                ports[index] = replace(port, node_port=number)
        result[position] = tuple(ports)
    return result


def _shared_node_port(ports: list[ServicePort], port: ServicePort) -> int | None:
    """The node port another port of the same service with the same number already has, if this port's
    protocol is still free on it."""
    for other in ports:
        if other.port == port.port and other.node_port is not None and not any(
                p.node_port == other.node_port and p.protocol == port.protocol for p in ports):
            return other.node_port
    return None
