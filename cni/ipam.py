"""Pod IP address management with the semantics of the reference `host-local` IPAM plugin.

Each node hands out addresses from its own PodCIDR: its first address is the gateway (cni0; .1 in a /24),
pods get the ones after it, and, like host-local, allocation resumes after the last address handed out
instead of reusing the lowest free one, so a deleted and recreated pod may come back with another IP.
Leases are persisted per node, so every later command (`lab status`, `lab apply`, a CNI DEL from another
process) sees the same state.
"""
from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from topo.errors import IpamExhausted
from topo.model import gateway_of


@dataclass
class Lease:
    container_id: str
    ifname: str
    pod: str = ""  # "namespace/name", for people reading `lab status`


@dataclass
class NodeIpam:
    """The leases of one node's PodCIDR. Pure data and arithmetic; `LeaseFile` persists it."""

    node: str
    subnet: IPv4Network
    last_reserved: IPv4Address | None = None
    leases: dict[IPv4Address, Lease] = field(default_factory=dict)

    @property
    def gateway(self) -> IPv4Address:
        return gateway_of(self.subnet).ip

    @property
    def first(self) -> IPv4Address:
        return self.subnet.network_address + 2

    @property
    def last(self) -> IPv4Address:
        return self.subnet.broadcast_address - 1

    @property
    def capacity(self) -> int:
        return max(int(self.last) - int(self.first) + 1, 0)

    def lookup(self, container_id: str, ifname: str) -> IPv4Address | None:
        for ip, lease in self.leases.items():
            if lease.container_id == container_id and lease.ifname == ifname:
                return ip
        return None

    def allocate(self, container_id: str, ifname: str = "eth0", pod: str = "") -> IPv4Interface:
        """Lease an address to a container; asking again for the same container returns the same one."""
        held = self.lookup(container_id, ifname)
        if held is None:
            held = self._next_free()
            self.leases[held] = Lease(container_id, ifname, pod)
            self.last_reserved = held
        return IPv4Interface(f"{held}/{self.subnet.prefixlen}")

    def _next_free(self) -> IPv4Address:
        if self.capacity == 0 or len(self.leases) >= self.capacity:
            raise IpamExhausted(
                f"node {self.node}: PodCIDR {self.subnet} is full: all {self.capacity} pod IPs are "
                f"leased ({self.gateway} is the gateway); delete a pod or give nodes a larger PodCIDR "
                "(a smaller spec.cluster.nodeCIDRMaskSize)")
        first, last = int(self.first), int(self.last)
        start = int(self.last_reserved) + 1 if self.last_reserved is not None else first
        if not first <= start <= last:
            start = first
        span = last - first + 1
        for step in range(span):
            candidate = IPv4Address(first + (start - first + step) % span)
            if candidate not in self.leases:
                return candidate
        raise AssertionError("unreachable: capacity check above")

    def release(self, container_id: str, ifname: str = "eth0") -> IPv4Address | None:
        """Free a container's lease. Releasing what is not leased is not an error (CNI DEL)."""
        ip = self.lookup(container_id, ifname)
        if ip is not None:
            del self.leases[ip]
        return ip

    def to_json(self) -> dict:
        return {
            "node": self.node,
            "subnet": str(self.subnet),
            "lastReserved": str(self.last_reserved) if self.last_reserved else None,
            "leases": {str(ip): {"containerID": l.container_id, "ifname": l.ifname, "pod": l.pod}
                       for ip, l in sorted(self.leases.items())},
        }

    @classmethod
    def from_json(cls, data: dict) -> NodeIpam:
        return cls(
            node=data["node"],
            subnet=IPv4Network(data["subnet"]),
            last_reserved=IPv4Address(data["lastReserved"]) if data.get("lastReserved") else None,
            leases={IPv4Address(ip): Lease(v["containerID"], v["ifname"], v.get("pod", ""))
                    for ip, v in data.get("leases", {}).items()},
        )


class LeaseFile:
    """One JSON file per node, changed under an exclusive lock so concurrent CNI calls stay consistent."""

    def __init__(self, path: Path, node: str, subnet: IPv4Network) -> None:
        self.path = Path(path)
        self.node = node
        self.subnet = subnet

    def read(self) -> NodeIpam:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return NodeIpam(self.node, self.subnet)
        ipam = NodeIpam.from_json(data)
        if ipam.subnet != self.subnet:
            raise ValueError(f"{self.path}: leases are for {ipam.subnet}, not {self.subnet}")
        return ipam

    def write(self, ipam: NodeIpam) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ipam.to_json(), indent=1))
        os.replace(tmp, self.path)

    @contextmanager
    def locked(self) -> Iterator[NodeIpam]:
        """Read, let the caller change, write back, all under one lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            ipam = self.read()
            yield ipam
            self.write(ipam)
