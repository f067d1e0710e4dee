"""Cluster addons the lab runs like any workload: the cluster DNS and the ingress controller.

On a real cluster these are Deployments and Services in kube-system / ingress-nginx; here they are pods
and services added to the lab's model, so they get pod IPs from IPAM, sit behind kube-proxy's rules like
everything else (DNS traffic to 10.96.0.10 is DNATed to the DNS pod), and show up in `lab status`.
Their configuration is generated from the lab's objects and rewritten whenever those change.
"""
from __future__ import annotations

import dataclasses
import os
import signal
from ipaddress import IPv4Address
from pathlib import Path

from services import dns, ingress
from services.endpoints import RunningPod, resolve
from topo.errors import SpecError, SpecIssue
from topo.model import Container, ContainerPort, Lab, Pod, Service, ServicePort

DNS_NAMESPACE, DNS_POD, DNS_SERVICE = "kube-system", "coredns", "kube-dns"
DNS_LABELS = (("k8s-app", "kube-dns"),)  # the label CoreDNS's pods carry, for kube-dns compatibility
INGRESS_NAMESPACE = INGRESS_POD = INGRESS_SERVICE = "ingress-nginx"
INGRESS_LABELS = (("app.kubernetes.io/name", "ingress-nginx"),)
# The addons' own services: the spec module checks user objects against the addons' reserved addresses
# and ports itself, so validation of applied objects leaves these out.
SERVICES = {f"{DNS_NAMESPACE}/{DNS_SERVICE}", f"{INGRESS_NAMESPACE}/{INGRESS_SERVICE}"}


def dns_dir(run_dir: Path) -> Path:
    return run_dir / "dns"


def ingress_dir(run_dir: Path) -> Path:
    return run_dir / "ingress"


def ingress_enabled(lab: Lab) -> bool:
    enabled = lab.ingress_controller.enabled
    return bool(lab.ingresses) if enabled is None else enabled


def upstream(lab: Lab) -> IPv4Address | None:
    """The external host serving DNS: the cluster DNS forwards other names there."""
    return next((e.ip for e in lab.external if "dns" in e.serves), None)


def _free_cluster_ip(lab: Lab, services: list[Service]) -> IPv4Address:
    used = {s.cluster_ip for s in services}
    base = lab.cluster.service_cidr.network_address
    for offset in range(11, 100):  # below the range services get automatically (from .100)
        if base + offset not in used:
            return base + offset
    raise SpecError(lab.source, [SpecIssue("spec.cluster.serviceCIDR", "no free address for the ingress controller")])


def dns_node(lab: Lab) -> str | None:
    """The node the cluster DNS pod runs on (None: no cluster DNS)."""
    return (lab.dns.node or lab.nodes[-1].name) if lab.dns.enabled and lab.nodes else None


def ingress_node(lab: Lab) -> str | None:
    """The node the ingress controller pod runs on (None: no ingress controller)."""
    return (lab.ingress_controller.node or lab.nodes[0].name) if ingress_enabled(lab) and lab.nodes else None


def addon_pods(lab: Lab) -> dict[str, tuple[str, ...]]:
    """The addon pods each node runs, described for messages: they take a pod address of that node's PodCIDR,
    so validation counts them (`topo.placement_spec`) before `lab up` has to find them one."""
    found: dict[str, tuple[str, ...]] = {}
    for node, what in ((dns_node(lab), f"the cluster DNS pod {DNS_NAMESPACE}/{DNS_POD}"),
                       (ingress_node(lab), f"the ingress controller pod {INGRESS_NAMESPACE}/{INGRESS_POD}")):
        if node is not None:
            found[node] = found.get(node, ()) + (what,)
    return found


def with_addons(lab: Lab, run_dir: Path) -> Lab:
    """The lab's model plus its addons' pods and services (pure: nothing is started here)."""
    pods, services, namespaces = list(lab.pods), list(lab.services), dict(lab.namespaces)
    node = dns_node(lab)
    if node is not None:
        folder = dns_dir(run_dir)
        ports = (ContainerPort(53, "UDP", "dns"), ContainerPort(53, "TCP", "dns-tcp"))
        container = Container("coredns", "coredns", tuple(dns.dnsmasq_argv(folder / "dnsmasq.conf")), ports)
        pods.append(Pod(DNS_POD, DNS_NAMESPACE, node, DNS_LABELS, (container,)))
        services.append(Service(DNS_SERVICE, DNS_NAMESPACE, dns.cluster_dns_ip(lab.cluster.service_cidr),
                                (ServicePort("dns", 53, "dns", "UDP"), ServicePort("dns-tcp", 53, "dns-tcp", "TCP")),
                                DNS_LABELS))
    node = ingress_node(lab)
    if node is not None:
        folder = ingress_dir(run_dir)
        container = Container("controller", "ingress-nginx",
                              tuple(ingress.nginx_argv(folder, folder / "nginx.conf")), (ContainerPort(80, "TCP", "http"),))
        namespaces.setdefault(INGRESS_NAMESPACE, {})
        pods.append(Pod(INGRESS_POD, INGRESS_NAMESPACE, node, INGRESS_LABELS, (container,)))
        services.append(Service(INGRESS_SERVICE, INGRESS_NAMESPACE, _free_cluster_ip(lab, services),
                                (ServicePort("http", 80, "http", "TCP", lab.ingress_controller.node_port),),
                                INGRESS_LABELS, type="NodePort"))
    return dataclasses.replace(lab, pods=tuple(pods), services=tuple(services), namespaces=namespaces)


def pod_resolv_conf(lab: Lab, pod: Pod) -> str:
    return dns.resolv_conf(pod, dns.cluster_dns_ip(lab.cluster.service_cidr), lab.dns.domain, upstream(lab))


def pod_hosts(pod: Pod, ip: IPv4Address | str | None) -> str:
    """The /etc/hosts kubelet writes into a pod: localhost, and the pod's own name at its IP."""
    lines = ["# Kubernetes-managed hosts file.", "127.0.0.1\tlocalhost",
             "::1\tlocalhost ip6-localhost ip6-loopback", "fe00::0\tip6-localnet", "fe00::0\tip6-mcastprefix",
             "fe00::1\tip6-allnodes", "fe00::2\tip6-allrouters"]
    if ip is not None:
        lines.append(f"{ip}\t{pod.name}")
    return "\n".join(lines) + "\n"


def write_configs(lab: Lab, running: list[RunningPod], run_dir: Path) -> dict[str, str]:
    """Write the DNS server's and the ingress controller's configuration; say what each needs now:
    "restart" (dnsmasq reads SRV records from its config only at start), "hup" (re-read the hosts file,
    or nginx's config), or nothing."""
    todo = {}
    if lab.dns.enabled:
        folder = dns_dir(run_dir)
        records = dns.records(lab.services, resolve(lab.services, running), running, lab.dns.domain)
        conf = dns.dnsmasq_conf(records, upstream(lab), lab.dns.domain, folder / "queries.log", folder / "hosts")
        if _write(folder, {"dnsmasq.conf": conf}):
            todo["dns"] = "restart"
        if _write(folder, {"hosts": dns.hosts_file(records)}) and "dns" not in todo:
            todo["dns"] = "hup"
    if ingress_enabled(lab):
        folder = ingress_dir(run_dir)
        conf = ingress.nginx_conf(lab.ingresses, {s.key: s for s in lab.services}, folder)
        if _write(folder, {"nginx.conf": conf}):
            todo["ingress"] = "hup"
    return todo


def _write(folder: Path, files: dict[str, str]) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    changed = False
    for name, text in files.items():
        path = folder / name
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
            changed = True
    return changed


def hangup(pid: int) -> None:
    """SIGHUP: nginx re-reads its configuration without dropping connections; dnsmasq its hosts file."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        pass
