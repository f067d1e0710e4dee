"""The cluster DNS addon in a spec (CoreDNS's role): its section, its address, and the names its objects take."""
from __future__ import annotations

import re
from typing import Callable

from pydantic import Field

from services.dns import MAX_SEARCH_PATHS
from services.spec import DNS_SERVICE_OFFSET, addon_node
from topo.cluster_spec import NodeIn
from topo.model import Cluster, ClusterDns, Lab
from topo.object_spec import Parsed
from topo.schema import Issues, Loc, StrictModel, short
from topo.workload_spec import dns_name_problem

# The cluster DNS addon's objects in kube-system: the kube-dns Service and the coredns Deployment and pods.
DNS_ADDON_NAMESPACE = "kube-system"
DNS_ADDON_NAMES = ("kube-dns", "coredns")


class LimitsIn(StrictModel):
    cpu: str | int | float | None = None


class ResourcesIn(StrictModel):
    limits: LimitsIn | None = None


class DnsIn(StrictModel):
    """The cluster DNS addon: whether it runs, on which node, the cluster domain it answers for, the nodes'
    host search domains, NodeLocal DNSCache, and the DNS pod's CPU limit."""

    enabled: bool | None = None
    node: str | None = None
    domain: str | None = None
    node_search: list[str] | None = Field(None, alias="nodeSearch")
    node_local: bool | None = Field(None, alias="nodeLocal")
    resources: ResourcesIn | None = None


_CPU = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)(?P<milli>m?)")
MAX_CPU_MILLIS = 64_000


def cpu_millis(value: str | int | float, loc: Loc, issues: Issues) -> int | None:
    """A Kubernetes CPU quantity (`100m`, `0.5`, `2`) in millicores; at least 1m, as the API server rounds."""
    text = str(value).strip()
    match = _CPU.fullmatch(text)
    if match is None or isinstance(value, bool):
        issues.add(loc, f"{short(repr(value), 40)} is not a CPU quantity: write millicores like 100m, or cores like 0.5")
        return None
    number = float(match["number"])
    millis = round(number if match["milli"] else number * 1000)
    if millis < 1:
        issues.add(loc, f"{text} is less than 1m (one thousandth of a CPU): a limit must be at least 1m")
        return None
    if millis > MAX_CPU_MILLIS:
        issues.add(loc, f"{text} is more than {MAX_CPU_MILLIS // 1000} CPUs: write a limit the DNS pod could use, e.g. 100m")
        return None
    return millis


def _check_search(values: list[str], loc: Loc, issues: Issues) -> tuple[str, ...]:
    """A node's host search list: DNS names, at most 32 of them (kubelet keeps at most 32 in a pod's list)."""
    if len(values) > MAX_SEARCH_PATHS:
        issues.add(loc, f"{len(values)} search domains; a node's resolv.conf here takes at most {MAX_SEARCH_PATHS} "
                        "(kubelet keeps no more than that in a pod's search list)")
    for i, value in enumerate(values):
        problem = dns_name_problem(value, "search domain", "us-west-2.compute.internal")
        if problem:
            issues.add(loc + (i,), problem)
    return tuple(values)


def check_dns(dns_in: DnsIn, nodes_in: list[NodeIn], cluster: Cluster | None, issues: Issues) -> ClusterDns:
    """The cluster DNS addon (CoreDNS's role). Its Service, kube-dns in kube-system, takes serviceCIDR + 10 (the
    address kubeadm gives it and kubelet's --cluster-dns names), so that address must be inside the range.
    What is written is kept even when wrong, so the other checks see whether the addon runs."""
    loc = ("spec", "dns")
    default = ClusterDns()
    enabled = dns_in.enabled if dns_in.enabled is not None else default.enabled
    addon_node(dns_in.node, nodes_in, loc + ("node",), "the cluster DNS pod", "the last node", issues)
    domain = dns_in.domain if dns_in.domain is not None else default.domain
    problem = dns_name_problem(domain, "cluster domain", default.domain)
    if problem:
        issues.add(loc + ("domain",), problem)
        domain = default.domain
    if enabled and cluster is not None:
        cidr = cluster.service_cidr
        address = cidr.network_address + DNS_SERVICE_OFFSET
        if DNS_SERVICE_OFFSET >= cidr.num_addresses - 1:
            issues.add(("spec", "cluster", "serviceCIDR"),
                       f"{cidr} is too small for the cluster DNS: its kube-dns Service takes serviceCIDR + "
                       f"{DNS_SERVICE_OFFSET} ({address}), which must be a usable address of the range; use a /28 or "
                       "larger (e.g. 10.96.0.0/12), or set dns.enabled: false")
    node_search = _check_search(dns_in.node_search or [], loc + ("nodeSearch",), issues)
    for index, node in enumerate(nodes_in):
        if node.dns_search is not None:
            _check_search(node.dns_search, ("spec", "nodes", index, "dnsSearch"), issues)
    cpu = None
    limits = dns_in.resources.limits if dns_in.resources is not None else None
    if limits is not None and limits.cpu is not None:
        cpu = cpu_millis(limits.cpu, loc + ("resources", "limits", "cpu"), issues)
    return ClusterDns(enabled=enabled, node=dns_in.node, domain=domain, node_search=node_search,
                      node_local=bool(dns_in.node_local), cpu_limit_millis=cpu)


def check_reserved_names(parsed: list[Parsed], lab: Lab, issues: Issues,
                         wanted: Callable[[Parsed], bool] = lambda obj: True) -> None:
    """While the lab runs the cluster DNS, its objects' names are taken: a user object of any kind named like
    them in kube-system would clash with the addon's (or be mistaken for it)."""
    if not lab.dns.enabled:
        return
    for obj in parsed:
        if obj.namespace == DNS_ADDON_NAMESPACE and obj.name in DNS_ADDON_NAMES and wanted(obj):
            issues.add(obj.loc + ("metadata", "name"),
                       f"{obj.kind} {DNS_ADDON_NAMESPACE}/{obj.name}: the names {' and '.join(DNS_ADDON_NAMES)} in "
                       f"namespace {DNS_ADDON_NAMESPACE} belong to the cluster DNS addon this lab runs (spec.dns): "
                       "rename the object or put it in another namespace, or set dns.enabled: false to run your own")
