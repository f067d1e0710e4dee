"""The cluster's address plan and its nodes: podCIDR, serviceCIDR, a flat underlay, node names and addresses.

Pod, Service and node addresses must be told apart by destination alone, so their ranges are checked to be
disjoint here (the racks' subnets and fabric included). A node sits on a flat underlay segment or in a rack
(`node_segment`, which external hosts share); its address must be a host of that segment. Each node's
PodCIDR is computed in `topo.pod_cidr_spec`. Racks, their routers and the fabric are routing's
(`routing.spec`); this module reads only their validated model.
"""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from pydantic import Field

from topo import names
from topo.link_spec import LinkIn, check_link
from topo.model import Cluster, Fabric, LinkSpec, Node, Rack, Underlay
from topo.pod_cidr_spec import node_pod_cidrs
from topo.address_spec import default_note, given_or_default, parse_address, parse_network
from topo.schema import Issues, Loc, StrictModel, field_path, short, show

# kube-apiserver refuses a Service range larger than /12 (2^20 addresses) for IPv4.
SERVICE_CIDR_MIN_PREFIX = 12
# The smallest node block that still holds a pod: a /30 has 4 addresses minus network, broadcast, gateway.
NODE_MASK_MAX = 30


class ClusterIn(StrictModel):
    pod_cidr: str | None = Field(None, alias="podCIDR")
    service_cidr: str | None = Field(None, alias="serviceCIDR")
    node_cidr_mask_size: int | None = Field(None, alias="nodeCIDRMaskSize")


class NodeIn(StrictModel):
    name: str = Field(examples=["name: node1"])
    ip: str = Field(examples=["ip: 192.168.1.10"])
    pod_cidr: str | None = Field(None, alias="podCIDR")
    rack: str | None = None
    link: LinkIn | None = None
    dns_search: list[str] | None = Field(None, alias="dnsSearch")  # the node's host search domains
    instance_type: str | None = Field(None, alias="instanceType")  # aws-vpc profile (cni.vpc_spec checks it)


# ---------------------------------------------------------------------------- cluster


def check_cluster(cluster_in: ClusterIn, issues: Issues) -> Cluster | None:
    base = ("spec", "cluster")
    default = Cluster()
    pod = parse_network(given_or_default(cluster_in.pod_cidr, default.pod_cidr), base + ("podCIDR",), "10.244.0.0/16",
                        issues)
    service = parse_network(given_or_default(cluster_in.service_cidr, default.service_cidr), base + ("serviceCIDR",),
                            "10.96.0.0/12", issues)
    mask = cluster_in.node_cidr_mask_size
    mask = default.node_cidr_mask_size if mask is None else mask
    ok = pod is not None and service is not None
    if service is not None and service.prefixlen < SERVICE_CIDR_MIN_PREFIX:
        issues.add(base + ("serviceCIDR",), f"{service} is larger than Kubernetes allows for Services: use a prefix "
                                            f"of /{SERVICE_CIDR_MIN_PREFIX} or longer, e.g. 10.96.0.0/12")
        ok = False
    if pod is not None:
        ok = _check_mask(pod, mask, cluster_in, issues) and ok
    if pod is not None and service is not None and pod.overlaps(service):
        overlap(("spec", "cluster", "podCIDR"), pod, cluster_in.pod_cidr,
                ("spec", "cluster", "serviceCIDR"), service, cluster_in.service_cidr,
                "pod and Service addresses must come from separate ranges; change one of them (the defaults "
                f"{default.pod_cidr} and {default.service_cidr} do not overlap)", issues)
        ok = False
    if not ok or pod is None or service is None:
        return None
    return Cluster(pod_cidr=pod, service_cidr=service, node_cidr_mask_size=mask)


def _check_mask(pod: IPv4Network, mask: int, cluster_in: ClusterIn, issues: Issues) -> bool:
    """Each node's PodCIDR is a /mask block cut out of the cluster's podCIDR (kube-controller-manager's
    --node-cidr-mask-size), so the mask must be longer than the cluster prefix and leave room for a pod."""
    loc = ("spec", "cluster")
    if pod.prefixlen > NODE_MASK_MAX - 1:
        issues.add(loc + ("podCIDR",), f"{pod} is too small to be split into node PodCIDRs: use a prefix of "
                                       f"/{NODE_MASK_MAX - 1} or shorter, e.g. 10.244.0.0/16")
        return False
    low, high = pod.prefixlen + 1, NODE_MASK_MAX
    if not low <= mask <= high:
        issues.add(loc + ("nodeCIDRMaskSize",),
                   f"{show(mask)} is out of range: use {low}..{high}; each node gets a /nodeCIDRMaskSize block of "
                   f"podCIDR {pod}{default_note(cluster_in.pod_cidr)}, so it must be longer than /{pod.prefixlen}, "
                   f"and /{high} is the smallest block that still holds a pod (its first address is the gateway)")
        return False
    return True


# ---------------------------------------------------------------------------- underlay


def check_flat_underlay(subnet_given: str | None, issues: Issues) -> Underlay | None:
    """One L2 segment for every node: underlay.subnet as written (None: the default)."""
    loc = ("spec", "underlay", "subnet")
    subnet = parse_network(given_or_default(subnet_given, Underlay().subnet), loc, "192.168.1.0/24", issues)
    if subnet is None:
        return None
    if subnet.prefixlen > NODE_MASK_MAX:
        issues.add(loc, f"{subnet} leaves no room for node addresses: use a prefix of /{NODE_MASK_MAX} or shorter, "
                        "e.g. 192.168.1.0/24")
        return None
    return Underlay(subnet=subnet)


def rack_loc(index: int) -> Loc:
    """Where rack `index` is written (racks are routing's; the underlay's ranges and messages name them)."""
    return ("spec", "underlay", "racks", index)


# ---------------------------------------------------------------------------- address ranges apart


def check_disjoint(cluster_in: ClusterIn, cluster: Cluster, underlay: Underlay, subnet_given: str | None,
                   fabric_cidr_given: str | None, issues: Issues) -> None:
    """Pod, Service and node addresses must be told apart by destination alone, so their ranges are disjoint.
    `subnet_given` and `fabric_cidr_given`: underlay.subnet and underlay.fabric.cidr as written (None: not given)."""
    for other, key, given_other in ((cluster.pod_cidr, "podCIDR", cluster_in.pod_cidr),
                                    (cluster.service_cidr, "serviceCIDR", cluster_in.service_cidr)):
        for loc, net, given_net, why in _underlay_ranges(underlay, subnet_given, fabric_cidr_given):
            if net.overlaps(other):
                overlap(("spec", "cluster", key), other, given_other, loc, net, given_net, why, issues)


def _underlay_ranges(underlay: Underlay, subnet_given: str | None, fabric_cidr_given: str | None
                     ) -> list[tuple[Loc, IPv4Network, str | None, str]]:
    """The underlay's ranges: where each is written, the range, whether it was given, and how to fix an overlap."""
    why = "node addresses must not come from the pod or Service ranges; pick a separate "
    if underlay.subnet is not None:
        return [(("spec", "underlay", "subnet"), underlay.subnet, subnet_given,
                 why + f"underlay.subnet (the default {Underlay().subnet} is one)")]
    ranges = [(rack_loc(r.index) + ("subnet",), r.subnet, "given", why + f"subnet for rack {r.name}")
              for r in underlay.racks]
    if underlay.fabric is not None:
        ranges.append((("spec", "underlay", "fabric", "cidr"), underlay.fabric.cidr, fabric_cidr_given,
                       "the routers' fabric links must not use pod or Service addresses; pick a separate fabric.cidr "
                       f"(the default {Fabric().cidr} is one)"))
    return ranges


def overlap(first: Loc, first_net: IPv4Network, first_given: str | None, second: Loc, second_net: IPv4Network,
            second_given: str | None, why: str, issues: Issues) -> None:
    """Report two overlapping ranges at the one the user wrote (the later one if both were written)."""
    here, there = (second, first) if second_given is not None or first_given is None else (first, second)
    nets = {first: (first_net, first_given), second: (second_net, second_given)}
    here_net, here_given = nets[here]
    there_net, there_given = nets[there]
    issues.add(here, f"{here_net}{default_note(here_given)} overlaps {field_path(there[1:])} {there_net}"
                     f"{default_note(there_given)}: {why}")


# ---------------------------------------------------------------------------- nodes


def check_nodes(nodes_in: list[NodeIn], cluster: Cluster | None, underlay: Underlay | None,
                racks: tuple[str, ...] | None, issues: Issues) -> list[Node] | None:
    """Names, addresses, racks, links and PodCIDRs of the nodes; None when any of them is wrong."""
    before = len(issues)
    if not nodes_in:
        issues.add(("spec", "nodes"), "no nodes: a lab needs at least one, e.g. nodes: [{name: node1, ip: 192.168.1.10}]")
        return None
    seen_names: dict[str, int] = {}
    seen_ips: dict[IPv4Address, int] = {}
    ips: list[IPv4Address | None] = []
    links: list[LinkSpec | None] = []
    for index, node in enumerate(nodes_in):
        loc = ("spec", "nodes", index)
        problem = names.dns_label_problem(node.name)
        if problem:
            issues.add(loc + ("name",), problem)
        elif node.name in seen_names:
            issues.add(loc + ("name",), f"node name {node.name} is already used by spec.nodes[{seen_names[node.name]}]: "
                                        "give each node its own name")
        seen_names.setdefault(node.name, index)
        ip = _check_node_ip(node, loc, underlay, racks, issues)
        if ip is not None and ip in seen_ips:
            first = seen_ips[ip]
            issues.add(loc + ("ip",), f"{ip} is already the address of {nodes_in[first].name} (spec.nodes[{first}]): "
                                      "give each node its own IP")
            ip = None
        if ip is not None:
            seen_ips[ip] = index
        ips.append(ip)
        links.append(check_link(node.link, loc + ("link",), issues, underlay.link if underlay else None))
    given_cidrs = [(node.name, node.pod_cidr) for node in nodes_in]
    cidrs = node_pod_cidrs(given_cidrs, cluster, issues) if cluster is not None else None
    if cidrs is None or underlay is None or len(issues) > before:
        return None
    return [Node(name=n.name, ip=ip, pod_cidr=cidr, index=i, rack=n.rack,  # type: ignore[arg-type]
                 link=link.merged(underlay.link),  # type: ignore[union-attr]
                 dns_search=tuple(n.dns_search) if n.dns_search is not None else None)
            for i, (n, ip, cidr, link) in enumerate(zip(nodes_in, ips, cidrs, links))]


def _check_node_ip(node: NodeIn, loc: Loc, underlay: Underlay | None, racks: tuple[str, ...] | None,
                   issues: Issues) -> IPv4Address | None:
    segment = node_segment(node.rack, loc, underlay, racks, issues)
    ip = parse_address(node.ip, loc + ("ip",), issues, "underlay.subnet" if racks is None else "its rack's subnet")
    if ip is None or segment is None:
        return ip
    problem = segment_ip_problem(ip, segment, underlay, " (its nodes' gateway)")
    if problem:
        issues.add(loc + ("ip",), problem)
        return None
    return ip


def segment_ip_problem(ip: IPv4Address, segment: tuple[IPv4Network, str, Rack | None], underlay: Underlay | None,
                       router_note: str = "") -> str | None:
    """What is wrong with a host's (node's or external host's) IP in its segment: outside it, its network or
    broadcast address, or its rack router's address (`router_note` says what that router is to the host)."""
    subnet, where, rack = segment
    router_ip = rack.router_ip if rack is not None else None
    problem = host_problem(ip, subnet, where, router_ip)
    if problem and rack is not None and ip not in subnet:
        problem += other_rack_hint(ip, underlay)
    if problem is None and rack is not None and ip == router_ip:
        problem = (f"{ip} is the address of {rack.router}, the router of rack {rack.name}{router_note}: "
                   f"pick another address in {host_addresses(subnet, router_ip)}")
    return problem


def node_segment(rack_name: str | None, loc: Loc, underlay: Underlay | None, racks: tuple[str, ...] | None,
                 issues: Issues, what: str = "node") -> tuple[IPv4Network, str, Rack | None] | None:
    """The subnet a host's IP must be in, how messages name it, and the host's rack; None when unknown.
    `what` names the kind of host (a node, an external host) in messages."""
    if racks is None:
        if rack_name is not None:
            issues.add(loc + ("rack",), "rack needs underlay.racks; this lab's underlay is one flat segment: remove "
                                        "rack, or give underlay.racks")
        if underlay is None or underlay.subnet is None:
            return None
        return underlay.subnet, f"underlay.subnet {underlay.subnet}", None
    if not racks:
        return None  # "no racks" is reported at underlay.racks
    if rack_name is None:
        issues.add(loc + ("rack",), f"missing; this lab's underlay has racks, so every {what} names the rack it sits "
                                    f"in, e.g. rack: {racks[0]} (racks: {', '.join(racks)})")
        return None
    if rack_name not in racks:
        issues.add(loc + ("rack",), f"rack {short(rack_name, 60)} is not a rack of this lab "
                                    f"(racks: {', '.join(racks)})")
        return None
    if underlay is None or not underlay.routed:
        return None
    rack = underlay.rack(rack_name)
    return rack.subnet, f"rack {rack.name}'s subnet {rack.subnet}", rack


def host_addresses(subnet: IPv4Network, taken: IPv4Address | None = None) -> str:
    """The host addresses of `subnet`, for a message; `taken` (a router's address) left out."""
    first, last = subnet.network_address + 1, subnet.broadcast_address - 1
    if taken == first and first < last:
        first += 1
    elif taken == last and first < last:
        last -= 1
    elif taken is not None and first < taken < last:
        return f"{first}..{last} except {taken}"
    return f"{first}..{last}"


def host_problem(ip: IPv4Address, subnet: IPv4Network, where: str, taken: IPv4Address | None = None) -> str | None:
    """Why `ip` cannot be a host of `subnet` (named `where` in the message), or None."""
    hosts = host_addresses(subnet, taken)
    if ip not in subnet:
        return f"{ip} is outside {where}: pick an address in {hosts}"
    if ip == subnet.network_address:
        return f"{ip} is the network address of {where}, not a host address: pick one of {hosts}"
    if ip == subnet.broadcast_address:
        return f"{ip} is the broadcast address of {where}, not a host address: pick one of {hosts}"
    return None


def other_rack_hint(ip: IPv4Address, underlay: Underlay | None) -> str:
    for rack in underlay.racks if underlay is not None else ():
        if ip in rack.subnet:
            return f" ({ip} is in rack {rack.name}'s subnet: did you mean rack: {rack.name}?)"
    return ""
