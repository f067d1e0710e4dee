"""kube-proxy's IPVS mode, as a plan: what one node's kernel would hold, and the text that loads it.

Pure: nothing here touches a kernel; services/kube_proxy.py loads the renders (ip -batch for kube-ipvs0,
ipset restore, iptables-legacy-restore, ipvsadm -R: one process each per node). The plan is applied only
where the kernel has IPVS (CONFIG_IP_VS) and dummy devices (CONFIG_DUMMY); this project's CI kernel has
neither, so there it is unit-tested only and the test VM (tests/vm/run) runs it for real.

What kube-proxy (pkg/proxy/ipvs) programs on every node, and this plan mirrors:

* a dummy interface `kube-ipvs0` holding every ClusterIP as a /32 (netlink.NewIPNet of an IPv4 address).
  The VIP is therefore a LOCAL address of the node: a packet to it is delivered up the stack (INPUT),
  where IPVS picks it up. Side effect: the node answers ICMP echo for it, which the iptables and
  nftables modes (pure DNAT, no interface holds the VIP) never do. See `ping_answers` for the caveat.
* one IPVS virtual server per service port, ClusterIP:port/protocol, scheduler `rr` (kube-proxy's
  default), its real servers the endpoints in masquerade (NAT) forwarding with weight 1. A service port
  without endpoints keeps its virtual server, with no real servers (connections are refused by IPVS).
  ClientIP session affinity is IPVS persistence with the service's timeout (sessionAffinityConfig's
  timeoutSeconds, 10800 by default).
* NodePort: one more virtual server on each node address and the nodePort, NOT bound to kube-ipvs0.
  kube-proxy uses every local address except kube-ipvs0's (loopback excluded) unless
  --nodeport-addresses narrows it; the lab uses the node's underlay IP only (as `--nodeport-addresses
  primary` would). With externalTrafficPolicy Local its real servers are the node's local endpoints;
  a node with none falls back to all endpoints (kubernetes/kubernetes#97081: pods on that node can still
  use the NodePort, while external clients get replies from the pod address and drop them).
* ipsets, so that the iptables rules stay a constant handful whatever the number of services:
  KUBE-CLUSTER-IP (hash:ip,port, every ClusterIP:port), KUBE-LOOP-BACK (hash:ip,port,ip: every LOCAL
  endpoint ip,port,ip for hairpin), KUBE-NODE-PORT-TCP/-UDP (bitmap:port, range 0-65535),
  KUBE-NODE-PORT-LOCAL-TCP/-UDP (Local policy: no masquerade), and for SCTP the hash:ip,port sets
  KUBE-NODE-PORT-SCTP-HASH / KUBE-NODE-PORT-LOCAL-SCTP-HASH (node IP and port).
* the nat table helper rules: KUBE-SERVICES (from PREROUTING and OUTPUT) marks traffic to a ClusterIP
  from outside the cluster CIDR for masquerade (`--cluster-cidr`: `! -s <pod CIDR>`) and sends traffic
  to a local address to KUBE-NODE-PORT, which marks NodePort traffic unless its port is Local;
  KUBE-POSTROUTING masquerades hairpin traffic (KUBE-LOOP-BACK, dst,dst,src) and anything carrying the
  0x4000 mark (clearing the mark first); KUBE-MARK-MASQ sets the mark. Rules for an empty set are left
  out, as kube-proxy does.

Not modelled (the lab has no such services, or they are filter-table policy): externalIPs and
LoadBalancer sets and chains, health-check node ports, the filter table's KUBE-FORWARD,
KUBE-PROXY-FIREWALL and KUBE-IPVS-FILTER (with its KUBE-IPVS-IPS set).
"""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from services.endpoints import Endpoint, ServicePortEndpoints
from topo.model import Cluster, Node

DUMMY = "kube-ipvs0"  # kube-proxy's defaultDummyDevice
SCHEDULER = "rr"  # kube-proxy's defaultScheduler
MASQ_MARK = "0x4000"  # 1 << --iptables-masquerade-bit (14, the default)
WEIGHT = 1  # every real server's weight

# Sysctls kube-proxy's IPVS mode sets on the node (NewProxier), for whoever applies the plan.
# vs/conntrack=1 matters most: without it IPVS-forwarded packets get no conntrack entry, so the
# MASQUERADE rules in KUBE-POSTROUTING never see them (NodePort and hairpin replies break).
SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net/ipv4/vs/conntrack", "1"),
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    ("net/ipv4/vs/expire_quiescent_template", "1"),
    ("net/ipv4/ip_forward", "1"),
)

# --- ipsets: names, types and comments as in pkg/proxy/ipvs/ipset.go -------------------------------
LOOP_BACK = "KUBE-LOOP-BACK"
CLUSTER_IP = "KUBE-CLUSTER-IP"
NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH"
NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"

HASH_IP_PORT = "hash:ip,port"
HASH_IP_PORT_IP = "hash:ip,port,ip"
BITMAP_PORT = "bitmap:port"

# name -> (type, comment), in kube-proxy's ipsetInfo order (the order sets are created in).
IPSETS: dict[str, tuple[str, str]] = {
    LOOP_BACK: (HASH_IP_PORT_IP, "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    CLUSTER_IP: (HASH_IP_PORT, "Kubernetes service cluster ip + port for masquerade purpose"),
    NODE_PORT_TCP: (BITMAP_PORT, "Kubernetes nodeport TCP port for masquerade purpose"),
    NODE_PORT_LOCAL_TCP: (BITMAP_PORT, "Kubernetes nodeport TCP port with externalTrafficPolicy=local"),
    NODE_PORT_UDP: (BITMAP_PORT, "Kubernetes nodeport UDP port for masquerade purpose"),
    NODE_PORT_LOCAL_UDP: (BITMAP_PORT, "Kubernetes nodeport UDP port with externalTrafficPolicy=local"),
    NODE_PORT_SCTP: (HASH_IP_PORT, "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'"),
    NODE_PORT_LOCAL_SCTP: (HASH_IP_PORT,
                           "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'"),
}
HASH_SIZE = 1024  # kube-proxy's ipset defaults
MAX_ELEM = 65536
PORT_RANGE = "0-65535"

# protocol -> (set for NodePorts, set for Local NodePorts)
_NODE_PORT_SETS = {
    "tcp": (NODE_PORT_TCP, NODE_PORT_LOCAL_TCP),
    "udp": (NODE_PORT_UDP, NODE_PORT_LOCAL_UDP),
    "sctp": (NODE_PORT_SCTP, NODE_PORT_LOCAL_SCTP),
}

# --- nat table chains (pkg/proxy/ipvs/proxier.go) ----------------------------------------------------
SERVICES = "KUBE-SERVICES"
POSTROUTING = "KUBE-POSTROUTING"
NODE_PORT = "KUBE-NODE-PORT"
MARK_MASQ = "KUBE-MARK-MASQ"
NAT_CHAINS = (SERVICES, POSTROUTING, NODE_PORT, MARK_MASQ)
BUILTIN_NAT_CHAINS = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")
# (from, to, comment): the jumps kube-proxy ensures from the built-in chains (iptablesJumpChain)
_JUMPS = (
    ("OUTPUT", SERVICES, "kubernetes service portals"),
    ("PREROUTING", SERVICES, "kubernetes service portals"),
    ("POSTROUTING", POSTROUTING, "kubernetes postrouting rules"),
)
# (set, from chain, target, match type, protocol): kube-proxy's ipsetWithIptablesChain, nat table rows
# this plan uses, in its order (a Local set's RETURN must come before the masquerading set's rule).
_SET_RULES = (
    (LOOP_BACK, POSTROUTING, "MASQUERADE", "dst,dst,src", None),
    (NODE_PORT_LOCAL_TCP, NODE_PORT, "RETURN", "dst", "tcp"),
    (NODE_PORT_TCP, NODE_PORT, MARK_MASQ, "dst", "tcp"),
    (NODE_PORT_LOCAL_UDP, NODE_PORT, "RETURN", "dst", "udp"),
    (NODE_PORT_UDP, NODE_PORT, MARK_MASQ, "dst", "udp"),
    (NODE_PORT_LOCAL_SCTP, NODE_PORT, "RETURN", "dst,dst", "sctp"),
    (NODE_PORT_SCTP, NODE_PORT, MARK_MASQ, "dst,dst", "sctp"),
)

_IPVSADM_PROTOCOL = {"tcp": "-t", "udp": "-u", "sctp": "--sctp-service"}
_PROTOCOL_ORDER = {"tcp": 0, "udp": 1, "sctp": 2}


@dataclass(frozen=True)
class RealServer:
    """An IPVS destination: one endpoint, reached by masquerading (NAT), weight 1."""

    ip: IPv4Address
    port: int
    weight: int = WEIGHT


@dataclass(frozen=True)
class VirtualServer:
    """An IPVS service: address:port/protocol and its real servers. `persistence` is the ClientIP
    affinity timeout in seconds (ipvsadm -p), None without affinity; `comment` is the ServicePortName."""

    ip: IPv4Address
    port: int
    protocol: str  # lower case: tcp, udp, sctp
    scheduler: str
    persistence: int | None
    reals: tuple[RealServer, ...]
    comment: str

    @property
    def key(self) -> str:
        return f"{self.ip}:{self.port}/{self.protocol}"


@dataclass(frozen=True)
class IpvsPlan:
    node: str
    dummy: str  # "kube-ipvs0"
    addresses: tuple[IPv4Address, ...]  # held by the dummy, each as a /32
    virtual_servers: tuple[VirtualServer, ...]
    ipsets: dict[str, tuple[str, tuple[str, ...]]]  # name -> (type, entries), kube-proxy's creation order
    iptables: str  # the nat table, as iptables-restore input


# ---------------------------------------------------------------------------------------------- build


def _reals(endpoints: tuple[Endpoint, ...]) -> tuple[RealServer, ...]:
    unique = {(int(e.ip), e.port): RealServer(e.ip, e.port) for e in endpoints}
    return tuple(unique[k] for k in sorted(unique))


def _node_port_reals(sp: ServicePortEndpoints, node: Node) -> tuple[RealServer, ...]:
    """syncEndpoint with onlyNodeLocalEndpoints: the local endpoints when there are any, otherwise all."""
    if sp.service.external_traffic_policy == "Local":
        local = sp.local(node.name)
        if local:
            return _reals(local)
    return _reals(sp.endpoints)


def _virtual_server(sp: ServicePortEndpoints, ip: IPv4Address, port: int,
                    reals: tuple[RealServer, ...]) -> VirtualServer:
    persistence = sp.service.affinity_timeout if sp.service.session_affinity == "ClientIP" else None
    return VirtualServer(ip, port, sp.protocol, SCHEDULER, persistence, reals, sp.name)


def _ip_port(ip: IPv4Address, protocol: str, port: int) -> str:
    return f"{ip},{protocol}:{port}"  # utilipset.Entry.String() for hash:ip,port


def build(node: Node, sps: list[ServicePortEndpoints], cluster: Cluster) -> IpvsPlan:
    """Everything kube-proxy's IPVS mode would program on `node` for these service ports."""
    servers: dict[tuple[int, int, int], VirtualServer] = {}
    addresses: set[IPv4Address] = set()
    # set name -> {sort key: entry}
    entries: dict[str, dict[tuple, str]] = {name: {} for name in IPSETS}

    for sp in sps:
        svc = sp.service
        if svc.cluster_ip is None:
            continue  # headless: kube-proxy programs nothing
        protocol = sp.protocol
        if protocol not in _IPVSADM_PROTOCOL:
            raise ValueError(f"{sp.name}: protocol {sp.port.protocol} is not one IPVS balances")
        order = _PROTOCOL_ORDER[protocol]

        # hairpin: a local endpoint reaching its own service is masqueraded (KUBE-LOOP-BACK)
        for e in sp.local(node.name):
            entries[LOOP_BACK][(int(e.ip), order, e.port)] = f"{_ip_port(e.ip, protocol, e.port)},{e.ip}"

        # the ClusterIP: bound to kube-ipvs0, a virtual server with every endpoint (internal policy Cluster)
        vip = svc.cluster_ip
        entries[CLUSTER_IP][(int(vip), order, sp.port.port)] = _ip_port(vip, protocol, sp.port.port)
        addresses.add(vip)
        servers[(int(vip), sp.port.port, order)] = _virtual_server(sp, vip, sp.port.port, _reals(sp.endpoints))

        # the NodePort: a virtual server on the node's address (not bound to kube-ipvs0)
        node_port = sp.port.node_port
        if node_port:
            masq_set, local_set = _NODE_PORT_SETS[protocol]
            if protocol == "sctp":  # hash:ip,port: one entry per node address
                key, entry = (int(node.ip), order, node_port), _ip_port(node.ip, protocol, node_port)
            else:  # bitmap:port: the port alone
                key, entry = (node_port,), str(node_port)
            entries[masq_set][key] = entry
            if svc.external_traffic_policy == "Local":
                entries[local_set][key] = entry
            servers[(int(node.ip), node_port, order)] = _virtual_server(sp, node.ip, node_port,
                                                                        _node_port_reals(sp, node))

    ipsets = {name: (kind, tuple(entries[name][k] for k in sorted(entries[name])))
              for name, (kind, _comment) in IPSETS.items()}
    return IpvsPlan(
        node=node.name,
        dummy=DUMMY,
        addresses=tuple(sorted(addresses)),
        virtual_servers=tuple(servers[k] for k in sorted(servers)),
        ipsets=ipsets,
        iptables=_nat_table(node, cluster, ipsets),
    )


def _comment(text: str) -> str:
    return f'-m comment --comment "{text}"'


def _nat_table(node: Node, cluster: Cluster, ipsets: dict[str, tuple[str, tuple[str, ...]]]) -> str:
    """The nat table as kube-proxy's writeIptablesRules lays it out, plus the jumps from the built-in
    chains it ensures separately, so the text is a complete nat table for iptables-restore."""
    def filled(name: str) -> bool:
        return bool(ipsets[name][1])

    lines = [f"# kube-proxy (ipvs mode) nat rules for node {node.name}", "*nat"]
    lines += [f":{chain} ACCEPT [0:0]" for chain in BUILTIN_NAT_CHAINS]
    lines += [f":{chain} - [0:0]" for chain in NAT_CHAINS]
    lines += [f"-A {src} {_comment(text)} -j {dst}" for src, dst, text in _JUMPS]
    # connections to localhost are never services
    lines.append(f"-A {SERVICES} -s 127.0.0.0/8 -j RETURN")
    for name, chain, target, match, protocol in _SET_RULES:
        if filled(name):
            proto = f"-p {protocol} " if protocol else ""
            lines.append(f"-A {chain} {proto}{_comment(IPSETS[name][1])} -m set --match-set {name} {match} "
                         f"-j {target}")
    if filled(CLUSTER_IP):
        # off-cluster sources reaching a ClusterIP (a node itself, a host routed in) are masqueraded, so
        # the reply comes back through this node; pod-to-service traffic keeps its source (--cluster-cidr)
        lines.append(f"-A {SERVICES} {_comment(IPSETS[CLUSTER_IP][1])} -m set --match-set {CLUSTER_IP} dst,dst "
                     f"! -s {cluster.pod_cidr} -j {MARK_MASQ}")
    # traffic to any local address may be a NodePort
    lines.append(f"-A {SERVICES} -m addrtype --dst-type LOCAL -j {NODE_PORT}")
    if filled(CLUSTER_IP):
        # accept traffic to IPVS services early (acceptIPVSTraffic), at the end of KUBE-SERVICES
        lines.append(f"-A {SERVICES} -m set --match-set {CLUSTER_IP} dst,dst -j ACCEPT")
    lines += [
        f"-A {POSTROUTING} -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        # clear the mark so a packet re-traversing the stack is not masqueraded twice
        f"-A {POSTROUTING} -j MARK --xor-mark {MASQ_MARK}",
        f"-A {POSTROUTING} {_comment('kubernetes service traffic requiring SNAT')} -j MASQUERADE --random-fully",
        f"-A {MARK_MASQ} -j MARK --or-mark {MASQ_MARK}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- render


def render_ipvsadm(plan: IpvsPlan) -> str:
    """Input for `ipvsadm-restore`, replacing the node's whole IPVS table (-C first). Each virtual server is
    preceded by its name in a `#` line; `ipvsadm -R` itself knows no comments (the ipvsadm-restore script
    greps them out), so pass it `loadable(text)`."""
    lines = [f"# kube-proxy (ipvs mode) virtual servers for node {plan.node}", "-C"]
    vips = set(plan.addresses)
    for vs in plan.virtual_servers:
        service = _service_args(vs)
        where = "" if vs.ip in vips else " (node port)"  # node addresses are not on kube-ipvs0
        lines.append(f"# {vs.comment}{where}")
        lines.append(_service_line("-A", vs))
        lines += [f"-a {service} -r {rs.ip}:{rs.port} -m -w {rs.weight}" for rs in vs.reals]
    return "\n".join(lines) + "\n"


def _service_args(vs: VirtualServer) -> str:
    return f"{_IPVSADM_PROTOCOL[vs.protocol]} {vs.ip}:{vs.port}"


def _service_line(op: str, vs: VirtualServer) -> str:
    persistence = f" -p {vs.persistence}" if vs.persistence is not None else ""
    return f"{op} {_service_args(vs)} -s {vs.scheduler}{persistence}"


def render_ipvsadm_delta(old: IpvsPlan, new: IpvsPlan) -> str:
    """Input for `ipvsadm -R` turning `old` into `new` one virtual and real server at a time (-A/-E/-D,
    -a/-e/-d), as kube-proxy syncs: a full restore starts with -C, which would also drop the connection
    entries of every unchanged service. Empty when nothing changed."""
    before = {vs.key: vs for vs in old.virtual_servers}
    after = {vs.key: vs for vs in new.virtual_servers}
    lines = [f"-D {_service_args(before[k])}" for k in sorted(before.keys() - after.keys())]
    for vs in new.virtual_servers:
        was = before.get(vs.key)
        if was == vs:
            continue  # most of them, in a sync after one change
        if was is None:
            lines.append(_service_line("-A", vs))
        elif (was.scheduler, was.persistence) != (vs.scheduler, vs.persistence):
            lines.append(_service_line("-E", vs))
        old_reals = {(rs.ip, rs.port): rs for rs in (was.reals if was else ())}
        new_reals = {(rs.ip, rs.port): rs for rs in vs.reals}
        service = _service_args(vs)
        lines += [f"-d {service} -r {ip}:{port}" for ip, port in sorted(old_reals.keys() - new_reals.keys())]
        for key, rs in new_reals.items():
            if key not in old_reals:
                lines.append(f"-a {service} -r {rs.ip}:{rs.port} -m -w {rs.weight}")
            elif old_reals[key].weight != rs.weight:
                lines.append(f"-e {service} -r {rs.ip}:{rs.port} -m -w {rs.weight}")
    return "\n".join(lines) + "\n" if lines else ""


def to_json(plan: IpvsPlan) -> dict:
    """The plan as JSON, kept per node between syncs (the `old` of the next delta)."""
    return {"node": plan.node, "dummy": plan.dummy, "addresses": [str(a) for a in plan.addresses],
            "virtual_servers": [{"ip": str(vs.ip), "port": vs.port, "protocol": vs.protocol,
                                 "scheduler": vs.scheduler, "persistence": vs.persistence, "comment": vs.comment,
                                 "reals": [[str(rs.ip), rs.port, rs.weight] for rs in vs.reals]}
                                for vs in plan.virtual_servers],
            "ipsets": {name: [kind, list(entries)] for name, (kind, entries) in plan.ipsets.items()},
            "iptables": plan.iptables}


def from_json(data: dict) -> IpvsPlan:
    servers = tuple(VirtualServer(IPv4Address(v["ip"]), v["port"], v["protocol"], v["scheduler"], v["persistence"],
                                  tuple(RealServer(IPv4Address(ip), port, weight) for ip, port, weight in v["reals"]),
                                  v["comment"]) for v in data["virtual_servers"])
    return IpvsPlan(data["node"], data["dummy"], tuple(IPv4Address(a) for a in data["addresses"]), servers,
                    {name: (kind, tuple(entries)) for name, (kind, entries) in data["ipsets"].items()},
                    data["iptables"])


def render_address_batch(plan: IpvsPlan, present: set[IPv4Address] | None) -> str:
    """Input for `ip -batch -` making kube-ipvs0 hold exactly the plan's ClusterIPs. `present`: the
    addresses it holds now, None when the device does not exist yet (then it is created, and left down
    as kube-proxy leaves it: see render_addresses)."""
    lines = [f"link add {plan.dummy} type dummy"] if present is None else []
    have = present or set()
    lines += [f"address del {ip}/32 dev {plan.dummy}" for ip in sorted(have - set(plan.addresses))]
    lines += [f"address add {ip}/32 dev {plan.dummy}" for ip in plan.addresses if ip not in have]
    return "\n".join(lines) + "\n" if lines else ""


def loadable(ipvsadm_text: str) -> str:
    """ipvsadm text without its comment lines: what `ipvsadm -R` accepts (it parses every line as options)."""
    return "".join(line for line in ipvsadm_text.splitlines(keepends=True) if not line.startswith("#"))


def render_ipset(plan: IpvsPlan) -> str:
    """Input for `ipset restore`: create every set (-exist: already there is fine), flush it, fill it.
    Sets are created even when empty, as kube-proxy does, so the iptables rules may name any of them."""
    lines = []
    for name, (kind, members) in plan.ipsets.items():
        if kind == BITMAP_PORT:
            options = f"range {PORT_RANGE}"
        else:
            options = f"family inet hashsize {HASH_SIZE} maxelem {MAX_ELEM}"
        lines.append(f"create {name} {kind} {options} -exist")
        lines.append(f"flush {name}")
        lines += [f"add {name} {entry}" for entry in members]
    return "\n".join(lines) + "\n"


def render_iptables(plan: IpvsPlan) -> str:
    """The helper rules as iptables-restore input: a complete nat table (load without --noflush)."""
    return plan.iptables


def render_addresses(plan: IpvsPlan) -> list[list[str]]:
    """The `ip` commands creating kube-ipvs0 and binding every ClusterIP to it as a /32 (one argv each).
    Like kube-proxy's EnsureDummyDevice, the link is never set up: an address on a down device still gets
    its `local` route in the local table, which is all IPVS needs to see the packets in INPUT."""
    cmds = [["ip", "link", "add", plan.dummy, "type", "dummy"]]
    cmds += [["ip", "addr", "add", f"{ip}/32", "dev", plan.dummy] for ip in plan.addresses]
    return cmds


def ping_answers(plan: IpvsPlan, ip: IPv4Address | str) -> bool:
    """Does this node answer a ping to `ip` because kube-ipvs0 holds it? True for every ClusterIP:
    in IPVS mode the VIP is a local address, unlike the iptables and nftables modes (DNAT of TCP/UDP/SCTP
    only: ICMP echo to a VIP goes unanswered).

    That is the behaviour of this plan and of kube-proxy up to 1.26. From 1.27 kube-proxy also installs
    filter/KUBE-IPVS-FILTER (kubernetes/kubernetes#72236, so host ports are not reachable through VIPs),
    whose `-m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT` also rejects ICMP
    echo to a VIP (icmp-port-unreachable); this plan leaves the filter table out."""
    return IPv4Address(str(ip)) in plan.addresses
