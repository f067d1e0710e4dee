"""Cluster addons the lab runs like any workload: the cluster DNS and the ingress controller.

On a real cluster these are Deployments and Services in kube-system / ingress-nginx; here they are pods
and services added to the lab's model, so they get pod IPs from IPAM, sit behind kube-proxy's rules like
everything else (DNS traffic to 10.96.0.10 is DNATed to the DNS pod), and show up in `lab status`.
Their configuration is generated from the lab's objects and rewritten whenever those change.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
from ipaddress import IPv4Address
from pathlib import Path

from services import dns, ingress, nodelocal
from services.endpoints import RunningPod
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
        container = Container("coredns", "coredns", tuple(dns.dnsmasq_argv(folder / "dnsmasq.conf")), ports,
                              cpu_limit_millis=lab.dns.cpu_limit_millis)
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


def host_search(lab: Lab, node: str) -> tuple[str, ...]:
    """The search domains of a node's own /etc/resolv.conf: its dnsSearch, else spec.dns.nodeSearch."""
    try:
        given = lab.node(node).dns_search
    except KeyError:
        given = None
    return given if given is not None else lab.dns.node_search


def pod_nameserver(lab: Lab) -> IPv4Address:
    """kubelet's --cluster-dns: NodeLocal DNSCache's link-local address when the lab runs it (pods ask the
    cache on their own node), else the kube-dns Service's ClusterIP."""
    return nodelocal.LOCAL_IP if lab.dns.node_local else dns.cluster_dns_ip(lab.cluster.service_cidr)


def pod_resolv_conf(lab: Lab, pod: Pod) -> str:
    return dns.resolv_conf(pod, pod_nameserver(lab), lab.dns.domain, upstream(lab), host_search(lab, pod.node))


def pod_hosts(pod: Pod, ip: IPv4Address | str | None, domain: str = "cluster.local") -> str:
    """The /etc/hosts kubelet writes into a pod: localhost, and the pod's own name at its IP. As kubelet
    does, `spec.hostname` replaces the pod's name, and with `spec.subdomain` the fully qualified name
    HOSTNAME.SUBDOMAIN.NAMESPACE.svc.DOMAIN comes first (the name a headless service's DNS gives it)."""
    lines = ["# Kubernetes-managed hosts file.", "127.0.0.1\tlocalhost",
             "::1\tlocalhost ip6-localhost ip6-loopback", "fe00::0\tip6-localnet", "fe00::0\tip6-mcastprefix",
             "fe00::1\tip6-allnodes", "fe00::2\tip6-allrouters"]
    if ip is not None:
        host = pod_hostname(pod)
        fqdn = f"{host}.{pod.subdomain}.{pod.namespace}.svc.{domain}\t" if pod.subdomain else ""
        lines.append(f"{ip}\t{fqdn}{host}")
    return "\n".join(lines) + "\n"


def pod_hostname(pod: Pod) -> str:
    """What `hostname` prints in a pod: spec.hostname when given, else the pod's name (as kubelet sets it)."""
    return pod.hostname or pod.name


def write_configs(lab: Lab, running: list[RunningPod], run_dir: Path) -> None:
    """Write the DNS server's and the ingress controller's configuration for the lab as it is now.

    Writing is half the job: `pending` says what the running daemons still have to load, from what they
    loaded last (`mark_loaded`), not from whether this write changed a file. A decision made from the
    write alone is lost when the write happens in one step and the reload in another (two writes in one
    `lab apply`, or a command killed between them): the daemon would serve stale records for ever.
    """
    if lab.dns.enabled:
        folder = dns_dir(run_dir)
        records = dns.records(lab.services, [], running, lab.dns.domain)  # the endpoints of ClusterIP services play no part
        conf = dns.dnsmasq_conf(records, upstream(lab), lab.dns.domain, folder / "queries.log", folder / "hosts")
        _write(folder, {"dnsmasq.conf": conf, "hosts": dns.hosts_file(records)})
    if ingress_enabled(lab):
        folder = ingress_dir(run_dir)
        _write(folder, {"nginx.conf": ingress.nginx_conf(lab.ingresses, {s.key: s for s in lab.services}, folder)})


# What each addon's daemon reads, and what it takes to make it read a changed file again: dnsmasq reads SRV
# records from its config only at start ("restart"), its hosts file on SIGHUP; nginx its config on SIGHUP.
_FILES = {"dns": (("dnsmasq.conf", "restart"), ("hosts", "hup")), "ingress": (("nginx.conf", "hup"),)}
_LOADED = "loaded.json"  # the digests of the files as the running daemon last read them


def _folder(addon: str, run_dir: Path) -> Path:
    return dns_dir(run_dir) if addon == "dns" else ingress_dir(run_dir)


def _digests(folder: Path, files: tuple[tuple[str, str], ...]) -> dict[str, str]:
    out = {}
    for name, _action in files:
        with contextlib.suppress(FileNotFoundError):
            out[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return out


def pending(run_dir: Path) -> dict[str, str]:
    """What each addon's daemon must do to serve its files as they are now: "restart", "hup", or nothing
    (absent). A missing or damaged record of what was loaded counts as nothing loaded."""
    todo = {}
    for addon, files in _FILES.items():
        folder = _folder(addon, run_dir)
        now = _digests(folder, files)
        if not now:
            continue
        try:
            loaded = json.loads((folder / _LOADED).read_text())
        except (OSError, ValueError):
            loaded = {}
        actions = [action for name, action in files if name in now and loaded.get(name) != now[name]]
        if actions:
            todo[addon] = "restart" if "restart" in actions else "hup"
    return todo


def mark_loaded(addon: str, run_dir: Path) -> None:
    """The daemon of `addon` has (re)read its files as they are now: record their digests."""
    folder = _folder(addon, run_dir)
    digests = _digests(folder, _FILES[addon])
    if digests:
        _write(folder, {_LOADED: json.dumps(digests, sort_keys=True)})


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
