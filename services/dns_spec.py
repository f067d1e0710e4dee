"""The cluster DNS addon in a spec (CoreDNS's role): its section, its address, and the names its objects take."""
from __future__ import annotations

from typing import Callable

from services.spec import DNS_SERVICE_OFFSET, addon_node
from topo.cluster_spec import NodeIn
from topo.model import Cluster, ClusterDns, Lab
from topo.object_spec import Parsed
from topo.schema import Issues, StrictModel
from topo.workload_spec import dns_name_problem

# The cluster DNS addon's objects in kube-system: the kube-dns Service and the coredns Deployment and pods.
DNS_ADDON_NAMESPACE = "kube-system"
DNS_ADDON_NAMES = ("kube-dns", "coredns")


class DnsIn(StrictModel):
    """The cluster DNS addon: whether it runs, on which node, and the cluster domain it answers for."""

    enabled: bool | None = None
    node: str | None = None
    domain: str | None = None


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
    return ClusterDns(enabled=enabled, node=dns_in.node, domain=domain)


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
