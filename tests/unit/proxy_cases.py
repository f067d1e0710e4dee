"""Service models shared by the kube-proxy renderer tests: the same cases render in every mode."""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from services.endpoints import Endpoint, ServicePortEndpoints
from topo.model import Cluster, Node, Service, ServicePort

CLUSTER = Cluster()  # pods 10.244.0.0/16, services 10.96.0.0/12
NODE1 = Node("node1", IPv4Address("192.168.1.10"), IPv4Network("10.244.1.0/24"), 0)
NODE2 = Node("node2", IPv4Address("192.168.1.11"), IPv4Network("10.244.2.0/24"), 1)


def ep(ip: str, port: int, node: str, pod: str) -> Endpoint:
    return Endpoint(IPv4Address(ip), port, node, f"default/{pod}")


def svc(name: str, ip: str, *ports: ServicePort, namespace: str = "default", **kw) -> Service:
    return Service(name, namespace, IPv4Address(ip), tuple(ports), selector=(("app", name),), **kw)


def sp(service: Service, index: int, *endpoints: Endpoint) -> ServicePortEndpoints:
    return ServicePortEndpoints(service, service.ports[index], tuple(endpoints))


WEB = svc("web", "10.96.0.20", ServicePort("", 80, 8080))
WEB_EPS = (ep("10.244.1.2", 8080, "node1", "web-1"), ep("10.244.2.2", 8080, "node2", "web-2"))
APP = svc("app", "10.96.0.30", ServicePort("http", 80, "http"), ServicePort("metrics", 9090, "metrics"))
STICKY = svc("sticky", "10.96.0.40", ServicePort("", 80, 8080), session_affinity="ClientIP")
NP_CLUSTER = svc("np", "10.96.0.50", ServicePort("", 80, 8080, node_port=30080), type="NodePort")
NP_LOCAL = svc("np-local", "10.96.0.60", ServicePort("", 80, 8080, node_port=30081), type="NodePort",
               external_traffic_policy="Local")
DNS = svc("kube-dns", "10.96.0.10", ServicePort("dns", 53, 53, "UDP"), ServicePort("dns-tcp", 53, 53, "TCP"),
          namespace="kube-system")
DNS_EPS = (Endpoint(IPv4Address("10.244.1.5"), 53, "node1", "kube-system/coredns-1"),
           Endpoint(IPv4Address("10.244.2.5"), 53, "node2", "kube-system/coredns-2"))


def cases() -> dict[str, tuple[Node, list[ServicePortEndpoints]]]:
    """The situations every proxy mode's renderer is checked in (one golden file per case and mode)."""
    empty = svc("empty", "10.96.0.21", ServicePort("", 80, 8080))
    empty_np = svc("empty-np", "10.96.0.22", ServicePort("", 80, 8080, node_port=30022), type="NodePort")
    return {
        "clusterip-two-endpoints": (NODE1, [sp(WEB, 0, *WEB_EPS)]),
        "no-endpoints": (NODE1, [sp(empty, 0), sp(empty_np, 0)]),
        "multiport-named": (NODE1, [
            sp(APP, 0, ep("10.244.1.3", 8080, "node1", "app-1"), ep("10.244.2.3", 8080, "node2", "app-2")),
            sp(APP, 1, ep("10.244.1.3", 9100, "node1", "app-1"), ep("10.244.2.3", 9100, "node2", "app-2")),
        ]),
        "affinity-clientip": (NODE1, [sp(STICKY, 0, *WEB_EPS)]),
        "nodeport-cluster": (NODE1, [sp(NP_CLUSTER, 0, *WEB_EPS)]),
        "nodeport-local-with-local-endpoint": (NODE1, [sp(NP_LOCAL, 0, *WEB_EPS)]),
        "nodeport-local-without-local-endpoint": (NODE2, [sp(NP_LOCAL, 0, WEB_EPS[0])]),
        "udp": (NODE1, [sp(DNS, 0, *DNS_EPS), sp(DNS, 1, *DNS_EPS)]),
    }
