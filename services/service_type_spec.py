"""A Service's type, and what type ExternalName asks of the rest of the Service.

`type: ExternalName` makes a Service that is only a DNS alias: the cluster DNS answers
`<svc>.<ns>.svc.<zone>` with a CNAME to `spec.externalName` (Kubernetes DNS specification 2.5); it gets no
cluster IP and no endpoints, and kube-proxy programs nothing for it. The checks follow kube-apiserver's
(pkg/apis/core/validation, ValidateService): externalName is required, a lower-case DNS-1123 subdomain (a
trailing dot, marking it fully qualified, is allowed and dropped), and clusterIP may not be set.
"""
from __future__ import annotations

from typing import Any

from topo.schema import Issues, Loc, close_match, short
from topo.workload_spec import dns_name_problem

SERVICE_TYPES = ("ClusterIP", "NodePort", "ExternalName")
# Types Kubernetes has and a lab cannot build: named so a learner hears why and what to use instead.
UNSUPPORTED_SERVICE_TYPES = {
    "LoadBalancer": "type LoadBalancer is not supported: a lab has no cloud to provision a load balancer; use type "
                    "NodePort (a LoadBalancer service is a NodePort service with a load balancer in front of the "
                    "nodes) and reach it at a node's IP",
}
EXTERNAL_NAME = "ExternalName"


def service_type(given: str | None, loc: Loc, issues: Issues) -> str | None:
    """The Service's type (ClusterIP when left out, as in Kubernetes), or None with an issue."""
    value = given if given is not None else SERVICE_TYPES[0]
    if value in SERVICE_TYPES:
        return value
    if value in UNSUPPORTED_SERVICE_TYPES:
        issues.add(loc, UNSUPPORTED_SERVICE_TYPES[value])
        return None
    close = close_match(value, SERVICE_TYPES + tuple(UNSUPPORTED_SERVICE_TYPES))
    hint = f" (did you mean {close}?)" if close else ""
    issues.add(loc, f"unknown type {short(repr(value), 40)}{hint}; supported: {', '.join(SERVICE_TYPES)}")
    return None


def external_name(given: Any, service_type_: str | None, cluster_ip: str | None, loc: Loc,
                  issues: Issues) -> str | None:
    """spec.externalName: required for (and only for) type ExternalName; returned without a trailing dot."""
    if service_type_ != EXTERNAL_NAME:
        if given is not None and service_type_ is not None:
            issues.add(loc + ("externalName",), f"externalName is only used by type ExternalName, and this service is "
                                                f"type {service_type_}: remove externalName, or set type: ExternalName")
        return None
    if cluster_ip not in (None, ""):
        issues.add(loc + ("clusterIP",), "clusterIP may not be set for ExternalName services (an ExternalName service "
                                         "is only a DNS alias: it has no cluster IP): remove clusterIP")
    if given is None or given == "":
        issues.add(loc + ("externalName",), "missing; type ExternalName needs the DNS name the service is an alias "
                                            "for, e.g. externalName: api.example.com")
        return None
    if not isinstance(given, str):
        issues.add(loc + ("externalName",), f"{short(repr(given), 40)} is not a DNS name: write one like "
                                            "api.example.com")
        return None
    name = given[:-1] if given.endswith(".") and given != "." else given  # "may have a trailing dot"
    problem = dns_name_problem(name, "service's externalName", "api.example.com")
    if problem:
        issues.add(loc + ("externalName",), problem)
        return None
    return name
