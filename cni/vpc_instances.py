"""EC2 instance types as the Amazon VPC CNI sees them: how many ENIs a node may attach, how many IPv4
addresses each ENI holds, and the max-pods number EKS derives from them.

The numbers are EC2's published per-instance limits (the table the VPC CNI ships and `kubectl describe node`
reflects as allocatable pods); only a handful of common types are built in. The formulas follow the EKS
documentation and the VPC CNI's max-pods calculator:

- secondary IPs (the default): max pods = ENIs x (IPs per ENI - 1) + 2. Each ENI's primary address is
  not given to pods; the "+ 2" is for the host-network pods every node runs (aws-node, kube-proxy), which
  need no pod IP. The lab runs those two as node daemons, not pods, so a node takes max pods - 2 pods with
  their own IPs.
- custom networking: the primary ENI serves no pods, so (ENIs - 1) x (IPs per ENI - 1) + 2.
- prefix delegation (ENABLE_PREFIX_DELEGATION): each secondary slot holds a /28 (16 addresses), so
  ENIs x (IPs per ENI - 1) x 16 + 2, capped at 110 for instances with fewer than 30 vCPUs and 250 otherwise
  (EKS's recommendation, which its max-pods calculator applies).
"""
from __future__ import annotations

from dataclasses import dataclass

PREFIX_LEN = 28  # ENABLE_PREFIX_DELEGATION: each slot holds a /28
PREFIX_SIZE = 16
HOST_NETWORK_PODS = 2  # aws-node and kube-proxy: the "+ 2" of the max-pods formula
PD_CAP_SMALL, PD_CAP_LARGE, PD_CAP_VCPUS = 110, 250, 30


@dataclass(frozen=True)
class InstanceType:
    name: str
    enis: int  # network interfaces the instance can attach
    ips_per_eni: int  # IPv4 addresses per interface, its primary included
    vcpus: int

    def max_pods(self, prefix_delegation: bool = False, custom_networking: bool = False) -> int:
        enis = self.enis - 1 if custom_networking else self.enis
        slots = enis * (self.ips_per_eni - 1)
        if not prefix_delegation:
            return slots + HOST_NETWORK_PODS
        cap = PD_CAP_SMALL if self.vcpus < PD_CAP_VCPUS else PD_CAP_LARGE
        return min(slots * PREFIX_SIZE + HOST_NETWORK_PODS, cap)


# EC2's limits for the types a lab can name (ENIs x IPv4 addresses per ENI, vCPUs).
INSTANCE_TYPES: dict[str, InstanceType] = {t.name: t for t in (
    InstanceType("t3.small", 3, 4, 2),
    InstanceType("t3.medium", 3, 6, 2),
    InstanceType("t3.large", 3, 12, 2),
    InstanceType("m5.large", 3, 10, 2),
    InstanceType("m5.xlarge", 4, 15, 4),
    InstanceType("m5.2xlarge", 4, 15, 8),
    InstanceType("c5.large", 3, 10, 2),
    InstanceType("m5.4xlarge", 8, 30, 16),
    InstanceType("m5.8xlarge", 8, 30, 32),
)}
DEFAULT_INSTANCE_TYPE = "m5.large"
