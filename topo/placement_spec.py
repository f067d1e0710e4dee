"""Pods from their objects, placed on nodes: a Deployment's replicas named and spread, each node's capacity.

A node holds as many pods as its PodCIDR has addresses for (host-local IPAM). Replica names and placement are
derived from the objects' identities, never random, so every load of a spec (and `lab apply`) places the same
pods on the same nodes.
"""
from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from topo import names
from topo.model import Lab, Node, Pod
from topo.object_spec import Parsed, PodTemplate
from topo.schema import MAX_PODS, MAX_PODS_PER_NODE, Issues, Loc, short, written_at

# Pods the lab itself runs, by node: the addons (cluster DNS, ingress controller), which take a pod address of
# their node's PodCIDR like any pod. Described for messages, e.g. "the cluster DNS pod kube-system/coredns".
Reserved = Mapping[str, tuple[str, ...]]


@dataclass
class _Draft:
    """A pod before placement."""

    name: str
    namespace: str
    template: PodTemplate
    obj: Parsed
    replica: int | None


def pods_against_lab(parsed: list[Parsed], lab: Lab, namespaces: set[str], issues: Issues, place: bool,
                     reserved: Reserved | None = None) -> list[Pod]:
    """Pods in spec order (a Deployment's replicas where the Deployment is), then placed on nodes.

    With place False (the nodes themselves are wrong) only the checks that need no node run. `reserved`: the
    addon pods each node runs besides these (not yet in lab.pods), which count against its PodCIDR.
    """
    drafts: list[_Draft] = []
    total = [len(lab.pods)]  # pods of the lab so far, for MAX_PODS
    owners: dict[tuple[str, str, str], Loc] = {}
    taken: dict[str, str] = {pod.key: f"a pod already running in lab {lab.name}" for pod in lab.pods}
    for obj in parsed:
        if obj.template is None:
            continue
        if not _object_ok(obj, lab, namespaces, owners, issues):
            continue
        for draft in _drafts(obj, lab, issues, place, total, sum(len(r) for r in (reserved or {}).values())):
            key = f"{draft.namespace}/{draft.name}"
            if key in taken:
                issues.add(obj.loc + ("metadata", "name"), f"pod {key} clashes with {taken[key]}: rename one")
                continue
            taken[key] = _describe_origin(draft, issues)
            drafts.append(draft)
    if not place:
        return []
    return _place(drafts, lab, issues, reserved or {})


def _object_ok(obj: Parsed, lab: Lab, namespaces: set[str], owners: dict[tuple[str, str, str], Loc],
               issues: Issues) -> bool:
    ok = True
    assert obj.namespace is not None and obj.template is not None
    if obj.namespace not in namespaces:
        issues.add(obj.loc + ("metadata", "namespace"),
                   f"namespace {obj.namespace} does not exist: add a v1 Namespace object named {obj.namespace}")
        ok = False
    node = obj.template.node_name
    if node is not None and lab.nodes and node not in {n.name for n in lab.nodes}:
        issues.add(obj.template.node_loc, f"nodeName {short(node, 60)} is not a node of this lab "
                                          f"(nodes: {', '.join(n.name for n in lab.nodes)})")
        ok = False
    ident = (obj.kind, obj.namespace, obj.name)
    if obj.replicas is not None and ident in owners:
        issues.add(obj.loc + ("metadata", "name"), f"{obj.kind} {obj.namespace}/{obj.name} is already defined at "
                                                   f"{written_at(owners[ident], issues)}: rename one")
        ok = False
    owners.setdefault(ident, obj.loc)
    return ok


def _describe_origin(draft: _Draft, issues: Issues) -> str:
    where = written_at(draft.obj.loc, issues)
    if draft.replica is None:
        return f"the pod at {where}"
    return f"replica {draft.replica} of {draft.obj.kind} {draft.obj.name} at {where}"


def capacity(node: Node) -> int:
    """Pods a node may run: what its PodCIDR holds, and never more than MAX_PODS_PER_NODE."""
    return min(node.pod_capacity, MAX_PODS_PER_NODE)


def _drafts(obj: Parsed, lab: Lab, issues: Issues, place: bool, total: list[int], addons: int) -> list[_Draft]:
    """A pod's draft, or a Deployment's replicas'. `total`: the pods counted so far (the lab's running ones
    included); `addons`: the addon pods the nodes run besides them, which take room as well."""
    assert obj.template is not None and obj.namespace is not None
    if obj.replicas is None:
        total[0] += 1
        return [_Draft(obj.name, obj.namespace, obj.template, obj, None)]
    if not place:
        return []  # replica names only matter once the lab is otherwise valid
    room = sum(capacity(node) for node in lab.nodes)
    if obj.replicas > room:  # beyond every node's room at once: said here, before making any (the rest: _place)
        fix = ("larger instance types (max pods)" if any(n.max_pods is not None for n in lab.nodes) else
               "larger PodCIDRs with a smaller cluster.nodeCIDRMaskSize")
        used = total[0] + addons
        taken = f", {used} of them taken" if used else ""
        issues.add(obj.loc + ("spec", "replicas"), f"replicas {obj.replicas} is more than this lab's nodes can hold "
                                                   f"({room} pods in all{taken}): lower replicas, or give nodes {fix}")
        return []
    total[0] += obj.replicas
    if total[0] > MAX_PODS:
        issues.add(obj.loc + ("spec", "replicas"), f"replicas {obj.replicas} would make {total[0]} pods; a lab runs at "
                                                   f"most {MAX_PODS} pods in all: lower replicas")
        return []
    used: set[str] = set()
    drafts = []
    for index in range(obj.replicas):
        name = _replica_name(obj.namespace, obj.name, index, used)
        used.add(name)
        drafts.append(_Draft(name, obj.namespace, obj.template, obj, index))
    return drafts


def _replica_name(namespace: str, deployment: str, index: int, used: set[str]) -> str:
    """`<deployment>-<5 hex>`, like the random suffix of a ReplicaSet's pods, but derived from the
    replica's identity so every load of a spec gives the same names. A clash between two replicas of the
    same Deployment (likely past a few hundred replicas) is resolved by rehashing, still deterministically."""
    attempt = 0
    while True:
        parts = (namespace, deployment, str(index)) + ((str(attempt),) if attempt else ())
        name = f"{deployment}-{names.short_hash(*parts, length=5)}"
        if name not in used:
            return name
        attempt += 1


def _place(drafts: list[_Draft], lab: Lab, issues: Issues, reserved: Reserved) -> list[Pod]:
    """Pick each pod's node: its nodeName; for replica i, nodes[i mod count]; otherwise the node with the
    fewest pods so far (earlier node on a tie), a stand-in for the scheduler's spreading. Existing pods count;
    the addon pods `reserved` for each node count against its capacity only (spreading stays as it was)."""
    # One pass over the pods, not one per node: `lab apply` places a new pod against every running one
    # (a million comparisons at 10,000 pods on 100 nodes).
    running = Counter(pod.node for pod in lab.pods)
    counts = {node.name: running[node.name] for node in lab.nodes}
    extra = {node.name: len(reserved.get(node.name, ())) for node in lab.nodes}
    overflow_at: dict[str, Loc] = {}
    def veth_of(namespace: str, name: str) -> str:
        return _host_veth(names.sandbox_id(lab.name, namespace, name))

    # The host veth names of the running pods, worked out only on the nodes that get a pod (a veth name is
    # a hash, and a one-pod `lab apply` at 10,000 pods spent 0.08 s hashing the other 99 nodes' pods).
    on_node: dict[str, list[Pod]] = {}
    for pod in lab.pods:
        on_node.setdefault(pod.node, []).append(pod)
    veths: dict[tuple[str, str], str] = {}
    looked: set[str] = set()
    pods = []
    for draft in drafts:
        node = _node_for(draft, lab, counts)
        if node not in looked:
            looked.add(node)
            veths.update({(node, veth_of(pod.namespace, pod.name)): pod.key for pod in on_node.get(node, ())})
        counts[node] += 1
        if counts[node] + extra[node] == capacity(lab.node(node)) + 1:  # where it overflows: the field putting it there
            overflow_at[node] = draft.obj.loc + (("spec", "replicas") if draft.replica is not None else
                                                 ("spec", "nodeName") if draft.template.node_name else ())
        veth = veth_of(draft.namespace, draft.name)
        key = f"{draft.namespace}/{draft.name}"
        if (node, veth) in veths:
            issues.add(draft.obj.loc + ("metadata", "name"),
                       f"pods {veths[(node, veth)]} and {key} on {node} would get the same host veth name {veth} "
                       "(a hash collision): rename one of them")
        veths[(node, veth)] = key
        pods.append(Pod(name=draft.name, namespace=draft.namespace, node=node, labels=draft.template.labels,
                        containers=draft.template.containers,
                        owner=draft.obj.name if draft.replica is not None else None,
                        dns_policy=draft.template.dns_policy, dns_config=draft.template.dns_config,
                        hostname=draft.template.hostname, subdomain=draft.template.subdomain))
    for node_name, loc in overflow_at.items():
        before = running[node_name]  # `lab apply`: pods already there, the addons among them
        counted = reserved.get(node_name, ()) + ((f"{before} already running",) if before else ())
        issues.add(loc, _capacity_message(lab, lab.node(node_name), counts[node_name] + extra[node_name], counted))
    return pods


@functools.lru_cache(maxsize=65536)
def _host_veth(sandbox: str) -> str:
    """names.host_veth, remembered: a command places pods against the same running pods several times (the
    spec, then the applied objects), and each name is a SHA-256."""
    return names.host_veth(sandbox)


def _node_for(draft: _Draft, lab: Lab, counts: dict[str, int]) -> str:
    if draft.template.node_name is not None:
        return draft.template.node_name
    if draft.replica is not None:
        return lab.nodes[draft.replica % len(lab.nodes)].name
    return min(lab.nodes, key=lambda n: (counts[n.name], n.index)).name


def _capacity_message(lab: Lab, node: Node, count: int, addons: tuple[str, ...]) -> str:
    """host-local IPAM hands out the PodCIDR minus network, broadcast and the bridge's .1 gateway."""
    if node.max_pods is not None:  # aws-vpc: the kubelet's max pods for the instance type (the EKS formula)
        return (f"{node.name} would have {count} pods but max pods for its {node.instance_type} is {node.max_pods} "
                f"({node.pod_capacity} besides the host-network aws-node and kube-proxy): pick a larger "
                f"instanceType, or put fewer pods on {node.name}")
    mask = lab.cluster.node_cidr_mask_size
    counted = f" (counting {' and '.join(addons)})" if addons else ""
    if node.pod_capacity > MAX_PODS_PER_NODE:
        return (f"{node.name} would have {count} pods{counted}; a lab node runs at most {MAX_PODS_PER_NODE} (kubelet's "
                f"default is 110): put fewer pods on {node.name}")
    bigger = ""
    if mask - 1 > lab.cluster.pod_cidr.prefixlen:
        bigger = f" ({mask - 1} holds {2 ** (32 - mask + 1) - 3})"
    return (f"{node.name} would have {count} pods{counted} but its PodCIDR {node.pod_cidr} holds {node.pod_capacity} "
            f"({node.gateway.ip} is the gateway): give nodes larger PodCIDRs with a smaller cluster.nodeCIDRMaskSize{bigger}, "
            f"or put fewer pods on {node.name}")
