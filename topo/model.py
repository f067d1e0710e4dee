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

BACKENDS = ("host-gw", "vxlan", "bgp", "ipip", "vpc")  # vpc: the Amazon VPC CNI's (pods in the subnet)
DEFAULT_MTU = 1500
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IP 20 + UDP 8 + VXLAN 8: why Flannel's vxlan MTU is 1450
IPIP_OVERHEAD = 20  # the outer IPv4 header: why Calico's tunl0 and pods get 1480 on a 1500-byte network
# Calico's IPPool `ipipMode` values a lab can use (its third, Never, is plain BGP: backend bgp here).
IPIP_MODES = ("Always", "CrossSubnet")
CALICO_AS = 64512  # Calico's default AS number for the cluster
SPINE_AS = 65000
SPINE = "spine"  # the spine router's name (a reserved router name)
BRIDGE = "cni0"  # the bridge name Flannel and the reference bridge plugin give every node
POD_IFNAME = "eth0"  # the interface name kubelet asks the CNI plugin for inside the pod
NODE_IFNAME = "eth0"  # the node's underlay interface, as on a cloud VM


def gateway_of(pod_cidr: IPv4Network) -> IPv4Interface:
    """cni0's address: the first host of a PodCIDR, as host-local and Flannel use (the `.1`)."""
    return IPv4Interface(f"{pod_cidr.network_address + 1}/{pod_cidr.prefixlen}")


@dataclass(frozen=True)
class ContainerPort:
    container_port: int
    protocol: str = "TCP"
    name: str | None = None


UNPRIVILEGED_UID = 65534  # nobody: a spec's container runs as this user unless its securityContext says otherwise
UNPRIVILEGED_GID = 65534  # nogroup


@dataclass(frozen=True)
class SecurityContext:
    """How a container's process runs: user, group (no supplementary groups), the capability bounding set,
    the capabilities raised ambient (a non-root process's effective ones), and no_new_privs."""

    run_as_user: int = UNPRIVILEGED_UID
    run_as_group: int = UNPRIVILEGED_GID
    capabilities: tuple[str, ...] = ()  # the bounding set (root's effective capabilities)
    ambient: tuple[str, ...] = ()
    no_new_privs: bool = False

    @property
    def root(self) -> bool:
        return self.run_as_user == 0


@dataclass(frozen=True)
class Container:
    """A container is a process in the pod's namespaces; `argv` is what is executed (never a shell).

    `security` is how a spec's container runs (topo.security_spec: an unprivileged user unless it asks for
    root); None is the lab's own addon processes (dnsmasq, nginx), which run as the lab does."""

    name: str
    image: str | None
    argv: tuple[str, ...]
    ports: tuple[ContainerPort, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # the container's `env`, set on its process
    security: SecurityContext | None = None
    cpu_limit_millis: int | None = None  # resources.limits.cpu in millicores: a CFS quota (kubelet/cgroups.py)


@dataclass(frozen=True)
class DnsConfig:
    """A pod's `dnsConfig`: merged into what its dnsPolicy gives, as kubelet merges it."""

    nameservers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[tuple[str, str | None], ...] = ()  # (name, value): ndots=2 -> ("ndots", "2")


class _PodKey:
    """A pod's `key`, worked out once per pod object and kept in its __dict__ (the instance's entry then wins
    over this non-data descriptor). Every pass over a lab's pods looks them up by key: a tenth of a second at
    10,000 pods when each look built the string again. functools.cached_property takes a lock on every first
    look (Python 3.11), which cost as much as it saved."""

    def __get__(self, pod: Pod | None, owner: type) -> str:
        if pod is None:
            return self  # type: ignore[return-value]  # the class attribute itself (dataclass inspection)
        key = pod.__dict__["key"] = f"{pod.namespace}/{pod.name}"
        return key


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    node: str
    labels: tuple[tuple[str, str], ...] = ()
    containers: tuple[Container, ...] = ()
    owner: str | None = None  # the Deployment a replica came from
    dns_policy: str = "ClusterFirst"  # Kubernetes' default; Default, None, ClusterFirstWithHostNet
    dns_config: DnsConfig | None = None
    # spec.hostname and spec.subdomain: with a headless Service named `subdomain` selecting the pod, the
    # pod gets `<hostname>.<subdomain>.<ns>.svc.<zone>` (Kubernetes DNS specification 2.4.1-2.4.3)
    hostname: str | None = None
    subdomain: str | None = None

    key = _PodKey()  # NAMESPACE/NAME

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class LinkSpec:
    """Properties of one underlay link (a node's, or the default for all). None: the kernel's default."""

    mtu: int | None = None
    bandwidth_mbit: float | None = None  # shaped with HTB on both ends
    delay_ms: float | None = None  # needs netem: refused at `lab up` on a kernel without it
    loss_percent: float | None = None  # likewise
    jitter_ms: float | None = None  # likewise; only with a delay (netem varies the delay by up to this much)

    def merged(self, default: LinkSpec) -> LinkSpec:
        return LinkSpec(*(mine if mine is not None else theirs for mine, theirs in
                          zip(self._values(), default._values())))

    def _values(self) -> tuple:
        return self.mtu, self.bandwidth_mbit, self.delay_ms, self.loss_percent, self.jitter_ms

    @property
    def impaired(self) -> bool:
        """Does this link need netem (delay, jitter or loss)?"""
        return bool(self.delay_ms or self.loss_percent or self.jitter_ms)


@dataclass(frozen=True)
class Node:
    name: str
    ip: IPv4Address
    pod_cidr: IPv4Network
    index: int  # position in the spec, 0-based; names the node's underlay switch port
    rack: str | None = None  # routed underlays: the rack (subnet behind one top-of-rack router)
    link: LinkSpec = LinkSpec()  # this node's underlay link, defaults from underlay.link already merged in
    dns_search: tuple[str, ...] | None = None  # the node's own resolv.conf search list (None: spec.dns.nodeSearch)
    instance_type: str | None = None  # aws-vpc profile: the EC2 instance type (ENIs, IPs per ENI)
    max_pods: int | None = None  # aws-vpc profile: EKS's max pods for the instance type and settings

    @property
    def gateway(self) -> IPv4Interface:
        return gateway_of(self.pod_cidr)

    @property
    def pod_capacity(self) -> int:
        """Pod IPs a PodCIDR holds: all hosts minus the gateway (a /24 holds 253, not 254). With the aws-vpc
        profile: max pods minus the two host-network pods (aws-node, kube-proxy) the lab runs as daemons."""
        if self.max_pods is not None:
            return self.max_pods - 2
        return max(self.pod_cidr.num_addresses - 3, 0)


@dataclass(frozen=True)
class Cluster:
    pod_cidr: IPv4Network = IPv4Network("10.244.0.0/16")
    service_cidr: IPv4Network = IPv4Network("10.96.0.0/12")
    node_cidr_mask_size: int = 24


@dataclass(frozen=True)
class Rack:
    """A rack: its own subnet, one L2 segment, behind a top-of-rack router (FRR) that is its gateway."""

    name: str
    subnet: IPv4Network
    router: str  # the ToR's name (a Mininet host running FRR)
    router_ip: IPv4Address  # the ToR's address in the rack: the nodes' default gateway
    asn: int  # the rack's AS: the ToR's, and with bgp peering "tor" its nodes' (iBGP, ToR as route reflector)
    index: int


@dataclass(frozen=True)
class Fabric:
    """How the ToR routers are joined: `spine` (one spine router, a point-to-point /30 to each ToR) or
    `direct` (all ToRs on one shared segment). Routers exchange rack subnets with eBGP."""

    mode: str = "spine"
    cidr: IPv4Network = IPv4Network("10.255.0.0/24")
    spine_asn: int = SPINE_AS


@dataclass(frozen=True)
class Underlay:
    subnet: IPv4Network | None = IPv4Network("192.168.1.0/24")  # the flat segment; None when routed
    racks: tuple[Rack, ...] = ()
    fabric: Fabric | None = None  # set when racks are
    link: LinkSpec = LinkSpec()  # default for every node link

    @property
    def routed(self) -> bool:
        return bool(self.racks)

    def rack(self, name: str) -> Rack:
        for rack in self.racks:
            if rack.name == name:
                return rack
        raise KeyError(name)


@dataclass(frozen=True)
class Bgp:
    asn: int = CALICO_AS
    peering: str = "mesh"  # "mesh": iBGP full mesh of nodes; "tor": each node peers with its rack's router


@dataclass(frozen=True)
class Network:
    backend: str = "host-gw"
    mtu: int = DEFAULT_MTU  # pod-facing MTU (pods' eth0, cni0); vxlan defaults to underlay MTU - 50, ipip - 20
    bgp: Bgp = Bgp()  # backends bgp and ipip (Calico: BGP distributes the routes either way)
    # backend ipip: Calico's IPPool ipipMode. Always: every pod packet between nodes goes through tunl0;
    # CrossSubnet: only between nodes of different subnets (racks), same-subnet ones are routed directly.
    ipip_mode: str = "Always"


@dataclass(frozen=True)
class ServicePort:
    name: str  # "" for a service's single unnamed port
    port: int
    target_port: int | str  # a number, or the name of a container port
    protocol: str = "TCP"
    node_port: int | None = None  # NodePort services: given or allocated from 30000-32767


@dataclass(frozen=True)
class Service:
    """A v1 Service: a stable virtual IP (or a node port) in front of the pods its selector matches."""

    name: str
    namespace: str
    cluster_ip: IPv4Address | None  # None: headless (`clusterIP: None`)
    ports: tuple[ServicePort, ...]
    selector: tuple[tuple[str, str], ...] = ()
    type: str = "ClusterIP"  # or NodePort
    session_affinity: str = "None"  # or ClientIP
    affinity_timeout: int = 10800  # seconds; Kubernetes' default for ClientIP affinity
    external_traffic_policy: str = "Cluster"  # or Local (NodePort only)
    external_name: str | None = None  # type ExternalName: a DNS alias (CNAME), no cluster IP, no proxy rules

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, labels: dict[str, str]) -> bool:
        """A service without a selector selects nothing (its endpoints would be managed by hand)."""
        return bool(self.selector) and all(labels.get(k) == v for k, v in self.selector)


@dataclass(frozen=True)
class KubeProxy:
    mode: str = "iptables"  # Kubernetes' default; or nftables, ipvs
    # iptables mode's backend: auto (the machine's own `iptables`, as kube-proxy's image picks the host's),
    # nft (iptables-nft: nf_tables underneath) or legacy (iptables-legacy: x_tables)
    iptables: str = "auto"


@dataclass(frozen=True)
class ExternalHost:
    """A machine outside the cluster on the underlay (the explainer's "External Web")."""

    name: str
    ip: IPv4Address
    serves: tuple[str, ...] = ("http",)  # http: agnhost netexec on port 80 (shows the client IP it sees);
    # dns: an authoritative DNS server for `names`, the cluster DNS's upstream
    rack: str | None = None  # routed underlays: the rack segment it is plugged into
    index: int = 0
    names: tuple[str, ...] = ()  # DNS names (served by whichever external host serves dns) for this host


@dataclass(frozen=True)
class ClusterDns:
    """The cluster DNS addon (the CoreDNS role): a pod behind the kube-dns Service at serviceCIDR .10."""

    enabled: bool = True
    node: str | None = None  # where its pod runs; None: the last node (node2 in the explainer's picture)
    domain: str = "cluster.local"
    node_search: tuple[str, ...] = ()  # the nodes' host search domains unless a node gives its own dnsSearch
    node_local: bool = False  # NodeLocal DNSCache: a caching DNS on 169.254.20.10 in every node
    cpu_limit_millis: int | None = None  # resources.limits.cpu of the DNS pod, in millicores


@dataclass(frozen=True)
class IngressBackend:
    service: str
    port: int | str  # number, or the service port's name


@dataclass(frozen=True)
class IngressPath:
    path: str
    path_type: str  # Prefix, Exact, ImplementationSpecific (treated as Prefix, as ingress-nginx does)
    backend: IngressBackend


@dataclass(frozen=True)
class IngressRule:
    host: str | None  # None: any host
    paths: tuple[IngressPath, ...]


@dataclass(frozen=True)
class Ingress:
    """A networking.k8s.io/v1 Ingress: host and path rules routing HTTP to services of its namespace."""

    name: str
    namespace: str
    rules: tuple[IngressRule, ...]
    default_backend: IngressBackend | None = None
    class_name: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class IngressController:
    """The ingress controller addon (ingress-nginx's role): nginx in a pod, a NodePort on every node."""

    enabled: bool | None = None  # None: when the lab has Ingress objects
    node: str | None = None  # None: the first node
    node_port: int = 30080


# ---------------------------------------------------------------------------- CNI profiles, NetworkPolicy

# `spec.cni.profile`: which CNI a lab plays. A profile sets the pod backend's default (spec.network.backend
# still overrides it) and whether NetworkPolicy is enforced. Flannel has no policy engine: a cluster running
# it stores NetworkPolicy objects and nothing happens, which is what the lab reproduces (with a warning).
# Calico routes with BGP and enforces every policy. Cilium is an eBPF dataplane that also replaces
# kube-proxy (cilium/, docs/cilium.md) and enforces NetworkPolicy with security identities in its BPF
# programs (cilium/identity.py, cilium/policy.py), not with the calico profile's nftables.
CNI_PROFILES: dict[str, tuple[str, bool]] = {  # profile -> (default backend, enforces NetworkPolicy)
    "flannel": ("vxlan", False),
    "calico": ("bgp", True),
    "cilium": ("vxlan", True),
    # The Amazon VPC CNI: pods get addresses of the VPC subnet itself (backend vpc: no overlay, no pod routes
    # between nodes); NetworkPolicy enforced as by Amazon's network policy agent (the calico-style rules).
    "aws-vpc": ("vpc", True),
}
PLANNED_CNI_PROFILES: dict[str, str] = {}
# Cilium's routingMode and the backend that carries it: tunnel (VXLAN through cilium_vxlan, the default)
# or native (routes to each node's PodCIDR via its underlay IP, host-gw style).
CILIUM_ROUTING_MODES = {"tunnel": "vxlan", "native": "host-gw"}


@dataclass(frozen=True)
class Cni:
    """The CNI the lab plays. `given`: written in the spec; without it the profile follows the backend
    (bgp is Calico's, the others Flannel's), so labs written before profiles existed keep their meaning."""

    profile: str = "flannel"
    given: bool = False
    routing_mode: str | None = None  # cilium only: tunnel or native (None: from the backend)

    @property
    def enforces_policy(self) -> bool:
        return CNI_PROFILES[self.profile][1]


@dataclass(frozen=True)
class VpcCni:
    """The aws-node DaemonSet's settings (its environment variables, same names and defaults)."""

    warm_eni_target: int = 1  # WARM_ENI_TARGET
    warm_ip_target: int | None = None  # WARM_IP_TARGET
    minimum_ip_target: int | None = None  # MINIMUM_IP_TARGET
    prefix_delegation: bool = False  # ENABLE_PREFIX_DELEGATION
    warm_prefix_target: int = 1  # WARM_PREFIX_TARGET
    external_snat: bool = False  # AWS_VPC_K8S_CNI_EXTERNALSNAT: false = the node SNATs pod traffic leaving the VPC
    custom_network: IPv4Network | None = None  # AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG with an ENIConfig's subnet

    def env(self) -> dict[str, str]:
        out = {"WARM_ENI_TARGET": str(self.warm_eni_target), "WARM_PREFIX_TARGET": str(self.warm_prefix_target),
               "ENABLE_PREFIX_DELEGATION": str(self.prefix_delegation).lower(),
               "AWS_VPC_K8S_CNI_EXTERNALSNAT": str(self.external_snat).lower(),
               "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": str(self.custom_network is not None).lower()}
        if self.warm_ip_target is not None:
            out["WARM_IP_TARGET"] = str(self.warm_ip_target)
        if self.minimum_ip_target is not None:
            out["MINIMUM_IP_TARGET"] = str(self.minimum_ip_target)
        return out


@dataclass(frozen=True)
class SelectorRequirement:
    """One matchExpressions entry: In / NotIn (with values), Exists / DoesNotExist (without)."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values  # a missing key is "not in" (Kubernetes' rule)
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclass(frozen=True)
class LabelSelector:
    """A metav1.LabelSelector: every matchLabels pair and every expression must hold; empty selects all."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[SelectorRequirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.match_labels)
                and all(e.matches(labels) for e in self.match_expressions))


@dataclass(frozen=True)
class IPBlock:
    cidr: IPv4Network
    excepts: tuple[IPv4Network, ...] = ()  # `except` in the manifest (a Python keyword)


@dataclass(frozen=True)
class PolicyPeer:
    """One `from`/`to` entry. podSelector alone: pods of the policy's namespace; namespaceSelector alone: all
    pods of the matching namespaces; both in ONE entry: those pods in those namespaces (AND); ipBlock: addresses.
    Two entries are two alternatives (OR): the difference the Kubernetes documentation warns about."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True)
class PolicyPort:
    """A port a rule allows: a number (a range with end_port), a named container port, or None for every
    port of the protocol."""

    protocol: str = "TCP"
    port: int | str | None = None
    end_port: int | None = None


@dataclass(frozen=True)
class PolicyRule:
    """An ingress or egress rule: traffic from/to any of `peers` (none: everyone) on any of `ports` (none: all)."""

    peers: tuple[PolicyPeer, ...] = ()
    ports: tuple[PolicyPort, ...] = ()


@dataclass(frozen=True)
class NetworkPolicy:
    """A networking.k8s.io/v1 NetworkPolicy. `policy_types` is filled in as the API server defaults it
    (Ingress always, Egress when egress rules are given), so a policy with Ingress and no ingress rules
    isolates its pods for ingress and allows nothing: a default deny."""

    name: str
    namespace: str
    pod_selector: LabelSelector
    policy_types: tuple[str, ...]
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, pod: Pod) -> bool:
        return pod.namespace == self.namespace and self.pod_selector.matches(pod.label_map)


PROXY_MODES = ("iptables", "nftables", "ipvs")
IPTABLES_BACKENDS = ("auto", "nft", "legacy")
NODE_PORT_RANGE = (30000, 32767)  # Kubernetes' default --service-node-port-range


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
    services: tuple[Service, ...] = ()
    kube_proxy: KubeProxy = KubeProxy()
    external: tuple[ExternalHost, ...] = ()
    dns: ClusterDns = ClusterDns()
    ingresses: tuple[Ingress, ...] = ()
    ingress_controller: IngressController = IngressController()
    cni: Cni = Cni()
    network_policies: tuple[NetworkPolicy, ...] = ()
    vpc: VpcCni = VpcCni()  # the aws-vpc profile's settings
    text: str = ""  # the spec text this model was parsed from (kept so later commands re-derive it)

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

    def node_subnet(self, node: Node) -> IPv4Network:
        if node.rack is not None:
            return self.underlay.rack(node.rack).subnet
        assert self.underlay.subnet is not None
        return self.underlay.subnet

    def node_interface(self, node: Node) -> IPv4Interface:
        return IPv4Interface(f"{node.ip}/{self.node_subnet(node).prefixlen}")

    def router_netns(self, router: str) -> str:
        return names.node_netns(self.name, router)

    def external_netns(self, host: str) -> str:
        return names.node_netns(self.name, host)

    @property
    def routers(self) -> list[str]:
        """The underlay's routers: each rack's ToR, and the spine when the fabric has one."""
        found = [r.router for r in self.underlay.racks]
        if self.underlay.fabric is not None and self.underlay.fabric.mode == "spine":
            found.append(SPINE)
        return found
