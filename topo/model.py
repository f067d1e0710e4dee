"""The validated lab model: pure data, computed once from a spec, used by every layer above.

It holds every derived fact (a node's PodCIDR, its gateway, a pod's namespace names) in exactly one
place, so the plan, the apply step, `lab status` and the tests never recompute them differently.
Building it needs no root and touches no kernel object.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from topo import names

BACKENDS = ("host-gw",)
DEFAULT_MTU = 1500
BRIDGE = "cni0"  # the bridge name Flannel and the reference bridge plugin give every node
POD_IFNAME = "eth0"  # the interface name kubelet asks the CNI plugin for inside the pod
NODE_IFNAME = "eth0"  # the node's underlay interface, as on a cloud VM


@dataclass(frozen=True)
class ContainerPort:
    container_port: int
    protocol: str = "TCP"
    name: str | None = None


@dataclass(frozen=True)
class Container:
    """A container is a process in the pod's namespaces; `argv` is what is executed (never a shell)."""

    name: str
    image: str | None
    argv: tuple[str, ...]
    ports: tuple[ContainerPort, ...] = ()


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    node: str
    labels: tuple[tuple[str, str], ...] = ()
    containers: tuple[Container, ...] = ()
    owner: str | None = None  # the Deployment a replica came from

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class Node:
    name: str
    ip: IPv4Address
    pod_cidr: IPv4Network
    index: int  # position in the spec, 0-based; names the node's underlay switch port

    @property
    def gateway(self) -> IPv4Interface:
        """cni0's address: the first host of the PodCIDR, as host-local and Flannel use."""
        return IPv4Interface(f"{self.pod_cidr.network_address + 1}/{self.pod_cidr.prefixlen}")

    @property
    def pod_capacity(self) -> int:
        """Pod IPs a PodCIDR holds: all hosts minus the gateway (a /24 holds 253, not 254)."""
        return max(self.pod_cidr.num_addresses - 3, 0)


@dataclass(frozen=True)
class Cluster:
    pod_cidr: IPv4Network = IPv4Network("10.244.0.0/16")
    service_cidr: IPv4Network = IPv4Network("10.96.0.0/12")
    node_cidr_mask_size: int = 24


@dataclass(frozen=True)
class Underlay:
    subnet: IPv4Network = IPv4Network("192.168.1.0/24")


@dataclass(frozen=True)
class Network:
    backend: str = "host-gw"
    mtu: int = DEFAULT_MTU


@dataclass
class Lab:
    name: str
    cluster: Cluster
    underlay: Underlay
    network: Network
    nodes: tuple[Node, ...]
    pods: tuple[Pod, ...] = ()
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> labels
    source: str | None = None  # the spec file, for messages and `lab status`
    exercise: str | None = None  # the labs/<NN-slug> folder when the spec came from one
    objects: tuple[dict[str, Any], ...] = ()  # the manifests as given, for later layers

    # --- names of kernel objects, derived here only -------------------------------------------
    @property
    def tag(self) -> str:
        return names.lab_tag(self.name)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def node_netns(self, node: str) -> str:
        return names.node_netns(self.name, node)

    def pod_netns(self, pod: Pod) -> str:
        return names.pod_netns(self.name, pod.namespace, pod.name)

    def underlay_netns(self) -> str:
        return names.underlay_netns(self.name)

    def pods_on(self, node: str) -> list[Pod]:
        return [p for p in self.pods if p.node == node]

    def node_interface(self, node: Node) -> IPv4Interface:
        return IPv4Interface(f"{node.ip}/{self.underlay.subnet.prefixlen}")
