"""Endpoints: which pod addresses stand behind each port of each Service, as the EndpointSlice controller
would publish them, and the naming kube-proxy uses for them.

Pure data: computed from the lab's services and its running pods (with their IPs), used by every proxy
mode alike, so the modes differ only in how they program the kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from topo.model import Pod, Service, ServicePort


@dataclass(frozen=True)
class Endpoint:
    ip: IPv4Address
    port: int
    node: str
    pod: str  # "namespace/name"

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class RunningPod:
    """A pod as the endpoints controller sees it: its model, its IP, and whether it is ready."""

    pod: Pod
    ip: IPv4Address
    ready: bool = True


@dataclass(frozen=True)
class ServicePortEndpoints:
    """One port of one service and its ready endpoints: the unit kube-proxy programs (one KUBE-SVC chain)."""

    service: Service
    port: ServicePort
    endpoints: tuple[Endpoint, ...]

    @property
    def name(self) -> str:
        """kube-proxy's ServicePortName: `namespace/name` plus `:port-name` when the port is named."""
        return f"{self.service.key}:{self.port.name}" if self.port.name else self.service.key

    @property
    def protocol(self) -> str:
        return self.port.protocol.lower()

    def local(self, node: str) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if e.node == node)


def target_port(pod: Pod, port: ServicePort) -> int | None:
    """The pod's port for a service port: a number as is, a name looked up among the pod's container ports."""
    if isinstance(port.target_port, int):
        return port.target_port
    for container in pod.containers:
        for cp in container.ports:
            if cp.name == port.target_port and cp.protocol == port.protocol:
                return cp.container_port
    return None  # the pod does not expose that named port: not an endpoint for it (as in Kubernetes)


def resolve(services: tuple[Service, ...] | list[Service], pods: list[RunningPod]) -> list[ServicePortEndpoints]:
    """Every port of every service with a cluster IP, with its ready endpoints in a stable order."""
    out = []
    ready = [(rp, rp.pod.label_map) for rp in pods if rp.ready]  # each pod's labels as a dict once, not per service
    for service in services:
        if service.cluster_ip is None:
            continue  # headless: no virtual IP, nothing for kube-proxy to program
        members = [rp for rp, labels in ready if rp.pod.namespace == service.namespace and service.selects(labels)]
        for port in service.ports:
            eps = []
            for rp in members:
                number = target_port(rp.pod, port)
                if number is not None:
                    eps.append(Endpoint(rp.ip, number, rp.pod.node, rp.pod.key))
            out.append(ServicePortEndpoints(service, port, tuple(sorted(eps, key=lambda e: (int(e.ip), e.port)))))
    return out
