"""Each node's PodCIDR: the one place it is computed (given in the spec, or allocated from cluster.podCIDR).

Kubernetes' range allocator (kube-controller-manager's --allocate-node-cidrs) hands each node a
/nodeCIDRMaskSize block of the cluster's podCIDR. The lab does the same, deterministically, so every load of
a spec gives every node the same PodCIDR; `topo.model.Node.pod_cidr` then carries it to every layer.
"""
from __future__ import annotations

from ipaddress import IPv4Network

from topo.model import Cluster
from topo.address_spec import parse_network
from topo.schema import Issues, Loc


def node_pod_cidrs(nodes: list[tuple[str, str | None]], cluster: Cluster, issues: Issues) -> list[IPv4Network] | None:
    """Every node's PodCIDR: the one given, or the next free block. This is the only place it is computed.
    `nodes`: each node's name and podCIDR as written (None: not given), in spec order.

    Kubernetes' range allocator hands each node a /nodeCIDRMaskSize block of the cluster podCIDR; on a
    real cluster the first node usually gets block 0 (10.244.0.0/24). Here block N goes to the Nth node
    without one, counting from 1, so node1 gets 10.244.1.0/24 as in the explainer's picture; block 0 is
    never handed out, and blocks given explicitly to other nodes are skipped.
    """
    explicit: dict[int, IPv4Network] = {}
    owner: dict[IPv4Network, int] = {}
    for index, (_, given) in enumerate(nodes):
        if given is None:
            continue
        cidr = _check_given_pod_cidr(given, ("spec", "nodes", index, "podCIDR"), cluster, issues)
        if cidr is None:
            continue
        if cidr in owner:
            first = owner[cidr]
            issues.add(("spec", "nodes", index, "podCIDR"),
                       f"{cidr} is already the PodCIDR of {nodes[first][0]} (spec.nodes[{first}]): each node "
                       "needs its own block")
            continue
        owner[cidr] = index
        explicit[index] = cidr
    allocated = _allocate(nodes, explicit, cluster, issues)
    if allocated is None or len(explicit) + len(allocated) != len(nodes):
        return None
    return [explicit[i] if i in explicit else allocated[i] for i in range(len(nodes))]


def _check_given_pod_cidr(text: str, loc: Loc, cluster: Cluster, issues: Issues) -> IPv4Network | None:
    mask = cluster.node_cidr_mask_size
    cidr = parse_network(text, loc, f"10.244.1.0/{mask}", issues)
    if cidr is None:
        return None
    if not cidr.subnet_of(cluster.pod_cidr):
        issues.add(loc, f"{cidr} is outside cluster.podCIDR {cluster.pod_cidr}: a node's PodCIDR is a block of the "
                        f"cluster's, e.g. {_block(cluster, 1)}")
        return None
    if cidr.prefixlen != mask:
        fixed = IPv4Network(f"{cidr.network_address}/{mask}", strict=False)
        issues.add(loc, f"{cidr} is a /{cidr.prefixlen} but cluster.nodeCIDRMaskSize is {mask}: use a /{mask} such as "
                        f"{fixed}, or change cluster.nodeCIDRMaskSize")
        return None
    return cidr


def _block(cluster: Cluster, index: int) -> IPv4Network:
    size = 2 ** (32 - cluster.node_cidr_mask_size)
    return IPv4Network(f"{cluster.pod_cidr.network_address + index * size}/{cluster.node_cidr_mask_size}")


def _allocate(nodes: list[tuple[str, str | None]], explicit: dict[int, IPv4Network], cluster: Cluster,
              issues: Issues) -> dict[int, IPv4Network] | None:
    taken = set(explicit.values())
    blocks = 2 ** (cluster.node_cidr_mask_size - cluster.pod_cidr.prefixlen)
    allocated: dict[int, IPv4Network] = {}
    next_block = 1
    for index, (name, given) in enumerate(nodes):
        if given is not None:
            continue
        while next_block < blocks and _block(cluster, next_block) in taken:
            next_block += 1
        if next_block >= blocks:
            fits = blocks - 1 + (1 if _block(cluster, 0) in taken else 0)
            issues.add(("spec", "nodes", index),
                       f"no PodCIDR left for {name}: cluster.podCIDR {cluster.pod_cidr} has room for {fits} node "
                       f"PodCIDR{'' if fits == 1 else 's'} of /{cluster.node_cidr_mask_size} (block 0, "
                       f"{_block(cluster, 0)}, is not handed "
                       f"out) but the lab has {len(nodes)} nodes; use a larger cluster.podCIDR (a shorter prefix) "
                       "or a larger cluster.nodeCIDRMaskSize")
            return None
        allocated[index] = _block(cluster, next_block)
        next_block += 1
    return allocated
