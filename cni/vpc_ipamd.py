"""The Amazon VPC CNI's ipamd, modelled: ENIs, secondary IPs or /28 prefixes, the warm pool, and the subnet
they are all carved out of.

On EKS the pod IPs are addresses of the VPC subnet itself. ipamd (the aws-node DaemonSet) attaches ENIs to the
node and asks EC2 for secondary addresses (or /28 prefixes) on them *before* pods need them, following its
settings, and the CNI binary hands a new pod one address from that warm pool. This module keeps the same
books, without EC2, following the VPC CNI's documented behaviour (docs/eni-and-ip-target.md,
docs/prefix-and-ip-target.md of amazon-vpc-cni-k8s):

- WARM_ENI_TARGET (default 1): keep that many ENIs' worth of unused secondary IPs. With one pod on a fresh
  node the primary ENI is no longer "a full ENI" free, so a second ENI with all its secondary IPs is attached.
- WARM_IP_TARGET / MINIMUM_IP_TARGET: keep `assigned + WARM_IP_TARGET` addresses, at least MINIMUM_IP_TARGET,
  filling the ENIs in order and releasing what is above the target when pods go.
- ENABLE_PREFIX_DELEGATION: /28 prefixes instead of single IPs; WARM_PREFIX_TARGET (default 1) whole free
  prefixes are kept, or with the IP targets set, enough prefixes to hold them.
- Custom networking (ENIConfig): the primary ENI serves no pods; pod ENIs live in another subnet.
- Subnets: AWS reserves 5 addresses of every subnet (network, VPC router, DNS, future use, broadcast). Every
  ENI's primary address and every secondary IP or prefix comes out of what is left.
- When EC2 cannot give a whole request (InsufficientFreeAddressesInSubnet), ipamd falls back to asking for one
  address at a time: an ENI ends up with whatever the subnet still had.

Simplified here: ipamd acts at once (no reconcile loop period, no cooldown before releasing), a new ENI is
"attached" by bookkeeping only (its addresses are answered for on the node's one underlay interface), and all
ENIs of a node are in the node's own subnet unless custom networking is on.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from cni.vpc_instances import INSTANCE_TYPES, PREFIX_LEN, PREFIX_SIZE, InstanceType
from topo import names
from topo.errors import LabError
from topo.model import Lab, VpcCni

AWS_RESERVED = 5  # per subnet: network, VPC router (+1), DNS (+2), future use (+3), broadcast
ASSIGN_FAILED = "failed to assign an IP address to container"  # the VPC CNI's message for a pod without an IP
SUBNET_FULL = "InsufficientFreeAddressesInSubnet"  # EC2's error code, as ipamd logs it
NO_PREFIX = "InsufficientCidrBlocks"  # EC2's error code when no free /28 is left for a prefix
LOG_KEEP = 200


class IpamdExhausted(LabError):
    """No address for a pod: the VPC CNI's "failed to assign an IP address to container"."""

    def __init__(self, node: str, why: str) -> None:
        super().__init__(f"{ASSIGN_FAILED} (node {node}: {why})")
        self.node, self.why = node, why


def reserved_of(subnet: IPv4Network) -> set[IPv4Address]:
    base = subnet.network_address
    return {base, base + 1, base + 2, base + 3, subnet.broadcast_address}


@dataclass
class Eni:
    id: str
    subnet: IPv4Network
    primary: IPv4Address
    ips: list[IPv4Address] = field(default_factory=list)  # secondary IPs (the default mode)
    prefixes: list[IPv4Network] = field(default_factory=list)  # /28s (prefix delegation)

    def pool(self) -> list[IPv4Address]:
        return list(self.ips) + [ip for p in self.prefixes for ip in p]

    def holds(self) -> set[IPv4Address]:
        """Every subnet address this ENI takes (its primary, its secondary IPs, all of its prefixes)."""
        return {self.primary, *self.pool()}

    def to_json(self) -> dict:
        return {"id": self.id, "subnet": str(self.subnet), "primary": str(self.primary),
                "ips": [str(i) for i in self.ips], "prefixes": [str(p) for p in self.prefixes]}

    @classmethod
    def from_json(cls, d: dict) -> Eni:
        return cls(d["id"], IPv4Network(d["subnet"]), IPv4Address(d["primary"]), [IPv4Address(i) for i in d["ips"]],
                   [IPv4Network(p) for p in d["prefixes"]])


@dataclass
class NodePool:
    node: str
    instance: str
    enis: list[Eni]
    assigned: dict[IPv4Address, str] = field(default_factory=dict)  # ip -> container id

    @property
    def type(self) -> InstanceType:
        return INSTANCE_TYPES[self.instance]

    def to_json(self) -> dict:
        return {"node": self.node, "instance": self.instance, "enis": [e.to_json() for e in self.enis],
                "assigned": {str(ip): c for ip, c in sorted(self.assigned.items())}}

    @classmethod
    def from_json(cls, d: dict) -> NodePool:
        return cls(d["node"], d["instance"], [Eni.from_json(e) for e in d["enis"]],
                   {IPv4Address(ip): c for ip, c in d.get("assigned", {}).items()})


@dataclass
class Ipamd:
    """The books of every node's ipamd in one lab, and of the subnets they share."""

    config: VpcCni
    others: dict[IPv4Network, set[IPv4Address]]  # subnet -> addresses held by what is not an ENI (routers, hosts)
    nodes: dict[str, NodePool] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    _asking: int = 0  # 1 while a pod waits on an empty pool: the request counts toward WARM_IP_TARGET's target

    # ---- the subnets ---------------------------------------------------------------------------
    def pod_subnet(self, pool: NodePool) -> IPv4Network:
        return self.config.custom_network or pool.enis[0].subnet

    def taken(self, subnet: IPv4Network) -> set[IPv4Address]:
        used = reserved_of(subnet) | self.others.get(subnet, set())
        for pool in self.nodes.values():
            for eni in pool.enis:
                used |= {ip for ip in eni.holds() if ip in subnet}
        return used

    def free(self, subnet: IPv4Network) -> list[IPv4Address]:
        taken = self.taken(subnet)
        return [ip for ip in subnet if ip not in taken]

    def free_prefixes(self, subnet: IPv4Network) -> list[IPv4Network]:
        taken = self.taken(subnet)
        if subnet.prefixlen > PREFIX_LEN:
            return []
        return [p for p in subnet.subnets(new_prefix=PREFIX_LEN) if not any(ip in taken for ip in p)]

    # ---- a node's pool -------------------------------------------------------------------------
    def pod_enis(self, pool: NodePool) -> list[Eni]:
        return pool.enis[1:] if self.config.custom_network else pool.enis

    def total(self, pool: NodePool) -> int:
        return sum(len(e.pool()) for e in self.pod_enis(pool))

    def available(self, pool: NodePool) -> list[IPv4Address]:
        return [ip for e in self.pod_enis(pool) for ip in e.pool() if ip not in pool.assigned]

    def slots(self, pool: NodePool) -> int:
        """Secondary slots per ENI: IPs per ENI minus the primary (each holds one IP or one /28)."""
        return pool.type.ips_per_eni - 1

    def _ip_targets(self) -> bool:
        return self.config.warm_ip_target is not None or self.config.minimum_ip_target is not None

    def wanted(self, pool: NodePool) -> int | None:
        """With WARM_IP_TARGET / MINIMUM_IP_TARGET: the addresses the pool should hold (None: ENI/prefix mode)."""
        if not self._ip_targets():
            return None
        want = max(len(pool.assigned) + self._asking + (self.config.warm_ip_target or 0),
                   self.config.minimum_ip_target or 0)
        if self.config.prefix_delegation:
            return math.ceil(want / PREFIX_SIZE) * PREFIX_SIZE
        return want

    def too_low(self, pool: NodePool) -> bool:
        free = len(self.available(pool))
        want = self.wanted(pool)
        if want is not None:
            return self.total(pool) < want
        if self.config.prefix_delegation:
            return self._free_prefixes_of(pool) < self.config.warm_prefix_target
        return free < self.config.warm_eni_target * self.slots(pool)

    def _free_prefixes_of(self, pool: NodePool) -> int:
        return sum(1 for e in self.pod_enis(pool) for p in e.prefixes if not any(ip in pool.assigned for ip in p))

    def top_up(self, pool: NodePool) -> None:
        """ipamd's pool reconciliation for one node: grow while the pool is too low and it can, then release
        what is above the targets."""
        while self.too_low(pool):
            if not self._grow(pool):
                break
        self._shrink(pool)

    def _grow(self, pool: NodePool) -> bool:
        """One step of increasing the pool: fill an ENI that has room, else attach another. False when stuck."""
        subnet = self.pod_subnet(pool)
        want = self.wanted(pool)
        for eni in self.pod_enis(pool):
            used = len(eni.prefixes) if self.config.prefix_delegation else len(eni.ips)
            if used >= self.slots(pool):
                continue
            room = self.slots(pool) - used
            if self.config.prefix_delegation:
                need = 1 if want is None else max(1, math.ceil((want - self.total(pool)) / PREFIX_SIZE))
                got = self.free_prefixes(subnet)[:min(room, need)]
                if not got:
                    return self._stuck(pool, f"no free /{PREFIX_LEN} prefix left in subnet {subnet}", NO_PREFIX)
                eni.prefixes += got
                self._log(f"{pool.node}: assigned {len(got)} prefix(es) {', '.join(map(str, got))} to {eni.id}")
                return True
            need = room if want is None else min(room, want - self.total(pool))
            got = self.free(subnet)[:need]
            if not got:
                return self._stuck(pool, f"subnet {subnet} has no free address")
            if len(got) < need:
                self._log(f"{pool.node}: failed to allocate all available IP addresses on ENI {eni.id}: "
                          f"{SUBNET_FULL} (asked {need}, subnet {subnet} had {len(got)})")
            eni.ips += got
            self._log(f"{pool.node}: assigned {len(got)} secondary IP(s) to {eni.id}")
            return True
        if len(pool.enis) >= pool.type.enis:
            return self._stuck(pool, f"max ENIs ({pool.type.enis}) already attached to the instance "
                                     f"({pool.instance})", "")
        free = self.free(subnet)
        if not free:
            return self._stuck(pool, f"subnet {subnet} has no free address for a new ENI")
        eni = Eni(names.short_hash(pool.node, str(len(pool.enis)), length=8), subnet, free[0])
        eni.id = f"eni-{eni.id}"
        pool.enis.append(eni)
        self._log(f"{pool.node}: attached {eni.id} (device {len(pool.enis) - 1}, primary {eni.primary}, "
                  f"subnet {subnet})")
        return True

    def _stuck(self, pool: NodePool, why: str, code: str = SUBNET_FULL) -> bool:
        self._log(f"{pool.node}: failed to increase pool: {code + ': ' if code else ''}{why}")
        return False

    def _shrink(self, pool: NodePool) -> None:
        want = self.wanted(pool)
        if want is not None:
            for eni in reversed(self.pod_enis(pool)):
                if self.config.prefix_delegation:
                    for p in reversed(list(eni.prefixes)):
                        if self.total(pool) - PREFIX_SIZE >= want and not any(ip in pool.assigned for ip in p):
                            eni.prefixes.remove(p)
                            self._log(f"{pool.node}: released prefix {p} from {eni.id}")
                else:
                    for ip in reversed(list(eni.ips)):
                        if self.total(pool) - 1 >= want and ip not in pool.assigned:
                            eni.ips.remove(ip)
                            self._log(f"{pool.node}: released {ip} from {eni.id}")
        elif self.config.prefix_delegation:
            for eni in reversed(self.pod_enis(pool)):
                for p in reversed(list(eni.prefixes)):
                    if self._free_prefixes_of(pool) > self.config.warm_prefix_target and not any(
                            ip in pool.assigned for ip in p):
                        eni.prefixes.remove(p)
                        self._log(f"{pool.node}: released prefix {p} from {eni.id}")
        else:
            while len(pool.enis) > 1:
                last = pool.enis[-1]
                if any(ip in pool.assigned for ip in last.pool()):
                    break
                spare = len(self.available(pool)) - len(last.pool())
                if spare < self.config.warm_eni_target * self.slots(pool):
                    break
                pool.enis.pop()
                self._log(f"{pool.node}: detached {last.id} (more than WARM_ENI_TARGET ENIs free)")
        while len(pool.enis) > 1 and not pool.enis[-1].pool() and (want is not None or self.config.prefix_delegation):
            self._log(f"{pool.node}: detached {pool.enis[-1].id} (no addresses left on it)")
            pool.enis.pop()

    # ---- pods ----------------------------------------------------------------------------------
    def assign(self, node: str, container_id: str) -> IPv4Address:
        """An address for a pod from the node's warm pool (refilled after, as ipamd's loop would); when the
        pool is empty and cannot grow, IpamdExhausted with the VPC CNI's message."""
        pool = self.nodes[node]
        for ip, holder in pool.assigned.items():
            if holder == container_id:
                return ip
        if not self.available(pool):
            self._asking = 1
            try:
                self.top_up(pool)
            finally:
                self._asking = 0
        free = self.available(pool)
        if not free:
            why = self.why_empty(pool)
            self._log(f"{node}: {ASSIGN_FAILED} {container_id}: {why}")
            raise IpamdExhausted(node, why)
        ip = min(free)
        pool.assigned[ip] = container_id
        self.top_up(pool)
        return ip

    def why_empty(self, pool: NodePool) -> str:
        if len(pool.enis) >= pool.type.enis and all(
                (len(e.prefixes) if self.config.prefix_delegation else len(e.ips)) >= self.slots(pool)
                for e in self.pod_enis(pool)):
            return f"every address of its {pool.type.enis} ENIs is in use ({pool.instance})"
        if self.config.prefix_delegation:
            return f"{NO_PREFIX}: subnet {self.pod_subnet(pool)} has no free /{PREFIX_LEN} prefix"
        return f"{SUBNET_FULL}: subnet {self.pod_subnet(pool)} has no free address"

    def release(self, node: str, container_id: str) -> IPv4Address | None:
        pool = self.nodes.get(node)
        if pool is None:
            return None
        for ip, holder in list(pool.assigned.items()):
            if holder == container_id:
                del pool.assigned[ip]
                self.top_up(pool)
                return ip
        return None

    def _log(self, line: str) -> None:
        self.log.append(line)
        del self.log[:-LOG_KEEP]

    # ---- persistence ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"nodes": {n: p.to_json() for n, p in self.nodes.items()}, "log": self.log}


def others_of(lab: Lab) -> dict[IPv4Network, set[IPv4Address]]:
    """Addresses in the VPC subnets held by what is not a node's ENI: the racks' routers, external hosts."""
    out: dict[IPv4Network, set[IPv4Address]] = {}
    subnets = [r.subnet for r in lab.underlay.racks] or ([lab.underlay.subnet] if lab.underlay.subnet else [])
    for subnet in subnets:
        held = {r.router_ip for r in lab.underlay.racks if r.router_ip in subnet}
        held |= {e.ip for e in lab.external if e.ip in subnet}
        out[subnet] = held - reserved_of(subnet)  # a ToR at .1 is the VPC router AWS reserves anyway
    return out


def fresh(lab: Lab) -> Ipamd:
    """Every node as ipamd starts it: the primary ENI (primary address: the node's IP), then the pool topped up."""
    ipamd = Ipamd(lab.vpc, others_of(lab))
    for node in lab.nodes:
        ipamd.nodes[node.name] = NodePool(node.name, node.instance_type or "m5.large",
                                          [Eni(f"eni-{names.short_hash(node.name, '0', length=8)}",
                                               lab.node_subnet(node), node.ip)])
    for pool in ipamd.nodes.values():
        ipamd.top_up(pool)
    return ipamd


def from_json(lab: Lab, data: dict) -> Ipamd:
    ipamd = Ipamd(lab.vpc, others_of(lab), {n: NodePool.from_json(p) for n, p in data.get("nodes", {}).items()},
                  list(data.get("log", [])))
    for node in lab.nodes:  # a node added since: started as ipamd starts it
        if node.name not in ipamd.nodes:
            ipamd.nodes[node.name] = fresh_node(lab, ipamd, node.name)
    return ipamd


def fresh_node(lab: Lab, ipamd: Ipamd, name: str) -> NodePool:
    node = lab.node(name)
    pool = NodePool(name, node.instance_type or "m5.large",
                    [Eni(f"eni-{names.short_hash(name, '0', length=8)}", lab.node_subnet(node), node.ip)])
    ipamd.nodes[name] = pool
    ipamd.top_up(pool)
    return pool


class IpamdFile:
    """The lab's ipamd books on disk (one JSON file), changed under an exclusive lock."""

    def __init__(self, path: Path, lab: Lab) -> None:
        self.path = Path(path)
        self.lab = lab

    def read(self) -> Ipamd:
        try:
            return from_json(self.lab, json.loads(self.path.read_text()))
        except FileNotFoundError:
            return fresh(self.lab)

    def write(self, ipamd: Ipamd) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ipamd.to_json(), indent=1))
        os.replace(tmp, self.path)

    @contextmanager
    def locked(self) -> Iterator[Ipamd]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            ipamd = self.read()
            try:
                yield ipamd
            except IpamdExhausted:
                self.write(ipamd)  # the pool as ipamd left it, and its log line
                raise
            self.write(ipamd)


IPAMD_FILE = "vpc-ipamd.json"
