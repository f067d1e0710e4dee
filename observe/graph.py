"""`lab graph`: the running lab drawn the way the explainer draws a cluster, from what the kernel holds.

Two steps, so each is testable on its own:

1. `build()` compares what the spec says should exist (routes per backend, VXLAN forwarding entries, the
   IP-in-IP tunl0, BGP sessions, service rules of any kube-proxy mode, pods on their bridge) with an `Observation` of the kernel (observe/kernel.py), and returns
   a pure `Graph`: every element carries a status (ok, missing, down, wrong, extra) and a note. A route
   someone deleted is still in the graph, marked missing; a session that is not Established is down.
2. `to_dot()` and `to_text()` (observe/graph_render.py) render a Graph: Graphviz (SVG/PNG/DOT) for slides,
   text for a terminal.

No root is needed for either step: the unit tests build Graphs from hand-made observations.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from observe import graph_cilium
from observe.graph_status import DOWN, EXTRA, MISSING, OK, WRONG, device_state
from observe.kernel import NsView, Observation
from routing import bgp, host_gw, ipip, vxlan
from services import kube_proxy
from services.endpoints import RunningPod, ServicePortEndpoints
from topo import names, underlay
from topo.model import BRIDGE, NODE_IFNAME, POD_IFNAME, Lab

DNS_KEY = ("kube-system", "coredns")  # the cluster DNS pod (services/addons.py names it so: the CoreDNS role)
DNS_SERVICE = ("kube-system", "kube-dns")


# ------------------------------------------------------------------------------------------- model

@dataclass
class Device:
    name: str
    address: str = ""
    status: str = OK
    note: str = ""
    detail: str = ""  # e.g. flannel.1's VNI and port


@dataclass
class PodBox:
    name: str
    namespace: str
    ip: str
    veth: str
    status: str = OK
    note: str = ""
    role: str = ""  # "dns" for the cluster DNS pod

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class RouteLine:
    """One route a node should hold (or holds without reason): the expectation and what the kernel has."""

    dst: str
    expected: str  # "" for a route nobody expects
    observed: str  # "" when absent
    status: str = OK
    note: str = ""
    own: bool = False  # the node's own PodCIDR on cni0


@dataclass
class NodeBox:
    name: str
    ip: str
    pod_cidr: str
    rack: str | None
    eth0: Device
    cni0: Device
    tunnel: Device | None = None
    pods: list[PodBox] = field(default_factory=list)
    routes: list[RouteLine] = field(default_factory=list)
    status: str = OK
    note: str = ""


@dataclass
class HostBox:
    """A router (ToR, spine) or an external host on the underlay."""

    name: str
    ips: list[str]
    kind: str  # "router" or "external"
    status: str = OK
    note: str = ""
    detail: str = ""


@dataclass
class Attachment:
    """A host's interface plugged into a switch port (or a point-to-point link between two hosts)."""

    host: str
    intf: str
    segment: str | None
    port: str | None
    peer: str | None = None
    status: str = OK
    note: str = ""
    address: str = ""
    peer_intf: str = ""
    peer_address: str = ""


@dataclass
class Segment:
    name: str  # the switch
    subnet: str
    status: str = OK
    note: str = ""


@dataclass
class Session:
    a: str
    b: str
    states: dict[str, str]  # speaker -> state it reports for the other
    status: str = OK
    ibgp: bool = True


@dataclass
class EndpointLine:
    address: str  # ip:port
    pod: str  # namespace/name
    node: str
    status: str = OK
    note: str = ""


@dataclass
class ServiceBox:
    name: str
    namespace: str
    cluster_ip: str
    port: int
    protocol: str
    node_port: int | None
    endpoints: list[EndpointLine] = field(default_factory=list)
    status: str = OK
    note: str = ""
    role: str = ""  # "dns" for kube-dns

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port}/{self.protocol}"


@dataclass
class Graph:
    lab: str
    backend: str
    kube_proxy: str
    pod_cidr: str
    service_cidr: str
    underlay: str
    ipip_mode: str = ""  # backend ipip: Calico's ipipMode (Always, CrossSubnet)
    nodes: list[NodeBox] = field(default_factory=list)
    routers: list[HostBox] = field(default_factory=list)
    external: list[HostBox] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)
    services: list[ServiceBox] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------- build



Expected = list[tuple[IPv4Network, IPv4Address | None, str | None, str | None]]


def _expected_routes(lab: Lab) -> dict[str, Expected]:
    """Per node, (dst, via, dev, proto) of the cross-node routes the backend installs there; None: any.
    Planned once for the whole lab (per node, it would be quadratic in the nodes)."""
    backend = lab.network.backend
    out: dict[str, Expected] = {n.name: [] for n in lab.nodes}
    if backend == "host-gw":
        for r in host_gw.routes(lab):
            out[r.node].append((r.dst, r.via, r.dev, None))
    elif backend == "vxlan":
        for mine in vxlan.plan(lab):
            out[mine.vtep.node] = [(peer.pod_cidr, peer.address.ip, vxlan.DEVICE, None) for peer in mine.peers]
    elif backend == "bgp":
        for node in lab.nodes:
            out[node.name] = [(p.pod_cidr, None, None, "bgp") for p in lab.nodes if p.name != node.name]
    elif backend == "ipip":
        # Calico's routes (routing/ipip.py): via the other node's IP, through tunl0 onlink when the
        # ipipMode encapsulates towards it (Always: every node; CrossSubnet: other racks only), else eth0.
        for r in ipip.expected_routes(lab):
            out[r.node].append((r.dst, r.via, r.dev, "bgp"))
    return out


def _vpc_route_lines(lab: Lab, node_name: str, view: NsView | None, running: list[RunningPod]) -> list[RouteLine]:
    """aws-vpc: no PodCIDR route and no cross-node routes; each of the node's pods is a /32 to its host veth
    (the underlay reaches it because eth0 answers ARP for it: `ip neigh show proxy`)."""
    lines = []
    for rp in running:
        if rp.pod.node != node_name:
            continue
        veth = names.host_veth(names.sandbox_id(lab.name, rp.pod.namespace, rp.pod.name))
        dst = IPv4Network(f"{rp.ip}/32")
        line = RouteLine(str(dst), f"{dst} dev {veth}", "", own=True)
        got = view.route_to(dst) if view else None
        if got is None or got.dst != dst:
            line.status, line.note = MISSING, "missing route"
        else:
            line.observed = got.text()
            if got.dev != veth:
                line.status, line.note = WRONG, f"goes to {got.dev or got.type}, not {veth}"
        lines.append(line)
    return lines


def _route_lines(lab: Lab, node_name: str, view: NsView | None, expected: Expected,
                 running: list[RunningPod]) -> list[RouteLine]:
    node = lab.node(node_name)
    if lab.cni.profile == "cilium":  # no PodCIDR route: a /32 per local pod, remote PodCIDRs by routingMode
        return _check_routes(lab, view, [], set(), [(d, v, dev, None) for d, v, dev in
                                                    graph_cilium.expected_routes(lab, node_name, running)])
    own = RouteLine(str(node.pod_cidr), f"{node.pod_cidr} dev {BRIDGE}", "", own=True)
    observed = view.route_to(node.pod_cidr) if view else None
    if observed is None:
        own.status, own.note = MISSING, "missing route"
    else:
        own.observed = observed.text()
        if observed.dev != BRIDGE or observed.type != "unicast":
            own.status, own.note = WRONG, f"goes to {observed.dev or observed.type}, not {BRIDGE}"
    return _check_routes(lab, view, [own], {node.pod_cidr}, expected)


def _check_routes(lab: Lab, view: NsView | None, lines: list[RouteLine], expected_dsts: set[IPv4Network],
                  expected: Expected) -> list[RouteLine]:
    for dst, via, dev, proto in expected:
        expected_dsts.add(dst)
        want = " ".join(x for x in (str(dst), f"via {via}" if via else "", f"dev {dev}" if dev else "",
                                    f"proto {proto}" if proto else "") if x)
        line = RouteLine(str(dst), want, "")
        lines.append(line)
        got = view.route_to(dst) if view else None
        if got is None:
            line.status, line.note = MISSING, "missing route"
            continue
        line.observed = got.text()
        if got.type != "unicast":
            line.status, line.note = WRONG, f"{got.type} route"
        elif via is not None and got.via != via:
            line.status, line.note = WRONG, f"via {got.via} instead of {via}"
        elif dev is not None and got.dev != dev:
            line.status, line.note = WRONG, f"dev {got.dev} instead of {dev}"
        elif proto is not None and got.proto != proto:
            line.status, line.note = WRONG, f"proto {got.proto}, not learned by {proto}"
    for route in view.routes if view else []:
        # A route into the pod network nobody planned (a learner's, or a stale one) changes where pods go.
        if route.dst.overlaps(lab.cluster.pod_cidr) and route.dst not in expected_dsts and route.dst.prefixlen > 0:
            note = "unexpected route" if route.dst.prefixlen < 32 or route.type == "unicast" else ""
            lines.append(RouteLine(str(route.dst), "", route.text(), EXTRA, note or "unexpected route"))
    return lines


def _tunnel(lab: Lab, node_name: str, view: NsView | None) -> Device | None:
    if lab.network.backend == "ipip":
        return _ipip_tunnel(lab, node_name, view)
    if lab.network.backend != "vxlan":
        return None
    mine = next(p for p in vxlan.plan(lab) if p.vtep.node == node_name)
    dev = Device(vxlan.DEVICE, str(mine.vtep.address), detail=f"VNI {vxlan.VNI} · UDP {vxlan.PORT}")
    dev.status, dev.note = device_state(view, vxlan.DEVICE, need_carrier=False)
    if dev.status != OK or view is None:
        return dev
    if not view.has_addr(vxlan.DEVICE, mine.vtep.address.ip):
        dev.status, dev.note = WRONG, f"lacks {mine.vtep.address}"
    fdb = {(e.mac, e.dst) for e in view.fdb if e.dev == vxlan.DEVICE}
    arp = {(n.ip, n.mac) for n in view.neigh if n.dev == vxlan.DEVICE}
    lacking = [p.node for p in mine.peers if (p.mac, p.ip) not in fdb]
    if lacking:
        dev.status, dev.note = MISSING, f"no FDB entry for {', '.join(lacking)}"
    lacking = [p.node for p in mine.peers if (p.address.ip, p.mac) not in arp]
    if lacking and dev.status == OK:
        dev.status, dev.note = MISSING, f"no ARP entry for {', '.join(lacking)}"
    return dev


def _ipip_tunnel(lab: Lab, node_name: str, view: NsView | None) -> Device:
    """Calico's tunl0: up, holding the node's tunnel address, MTU 20 bytes below the underlay's."""
    t = ipip.tunnel(lab.node(node_name))
    dev = Device(ipip.DEVICE, str(t.address), detail=f"IP-in-IP (proto 4) · {lab.network.ipip_mode} · MTU {t.mtu}")
    dev.status, dev.note = device_state(view, ipip.DEVICE, need_carrier=False)
    if dev.status != OK or view is None:
        return dev
    if not view.has_addr(ipip.DEVICE, t.address.ip):
        dev.status, dev.note = WRONG, f"lacks {t.address}"
    elif view.links[ipip.DEVICE].mtu != t.mtu:
        dev.status, dev.note = WRONG, f"MTU {view.links[ipip.DEVICE].mtu}, not {t.mtu}"
    return dev


def _pods(lab: Lab, node_name: str, view: NsView | None, running: list[RunningPod],
          obs: Observation) -> list[PodBox]:
    out = []
    for rp in running:
        pod = rp.pod
        if pod.node != node_name:
            continue
        cilium = lab.cni.profile == "cilium"
        veth = names.host_veth(names.sandbox_id(lab.name, pod.namespace, pod.name), prefix="lxc" if cilium else "veth")
        box = PodBox(pod.name, pod.namespace, str(rp.ip), veth,
                     role="dns" if (pod.namespace, pod.name) == DNS_KEY else "")
        pod_view = obs.namespaces.get(lab.pod_netns(pod))
        if not rp.ready:
            box.status, box.note = DOWN, "not running"
        elif pod_view is None:
            box.status, box.note = MISSING, "namespace gone"
        elif not pod_view.has_addr(POD_IFNAME, rp.ip):
            box.status, box.note = WRONG, f"{POD_IFNAME} lacks {rp.ip}"
        elif POD_IFNAME in pod_view.links and not pod_view.links[POD_IFNAME].up:
            # the cause, named: the node's veth losing its carrier is only its effect
            box.status, box.note = DOWN, f"{POD_IFNAME} is down (in the pod)"
        elif cilium:
            box.status, box.note = graph_cilium.pod_state(view, veth)
        else:
            state, note = device_state(view, veth)
            link = view.links.get(veth) if view else None
            routed = lab.cni.profile == "aws-vpc"  # the VPC CNI routes each pod: its veth is on no bridge
            if state == OK and link is not None and not routed and link.master != BRIDGE:
                state, note = WRONG, f"{veth} not on {BRIDGE}"
            elif state == OK and link is not None and routed and link.master is not None:
                state, note = WRONG, f"{veth} is on {link.master}: the VPC CNI routes pods, no bridge"
            box.status, box.note = state, note
        out.append(box)
    return out


def _sessions(lab: Lab, obs: Observation) -> list[Session]:
    speakers = bgp.node_speakers(lab) + bgp.router_speakers(lab)
    asn = {s.name: s.asn for s in speakers}
    pairs: dict[frozenset[str], Session] = {}
    for s in speakers:
        for peer in s.neighbors:
            key = frozenset((s.name, peer.name))
            session = pairs.setdefault(key, Session(s.name, peer.name, {}, ibgp=peer.remote_as == s.asn))
            reported = obs.bgp.get(s.name)
            session.states[s.name] = (reported or {}).get(peer.name, (reported or {}).get(str(peer.ip),
                                                                                          "bgpd not answering"
                                                                                          if not reported else "?"))
    for session in pairs.values():
        if any(v != "Established" for v in session.states.values()):
            session.status = DOWN
        if session.b in asn and asn[session.b] != asn[session.a]:
            session.ibgp = False
    return list(pairs.values())


def _services(lab: Lab, sps: list[ServicePortEndpoints], obs: Observation) -> list[ServiceBox]:
    out = []
    rules = "service map entries" if lab.cni.profile == "cilium" else "rules"
    for sp in sps:
        svc = sp.service
        box = ServiceBox(svc.name, svc.namespace, str(svc.cluster_ip), sp.port.port, sp.port.protocol,
                         sp.port.node_port if svc.type == "NodePort" else None,
                         role="dns" if (svc.namespace, svc.name) == DNS_SERVICE else "")
        key = (str(svc.cluster_ip), sp.protocol, sp.port.port)
        programmed = {n.name: obs.services.get(n.name, {}).get(key) for n in lab.nodes}
        nowhere = all(v is None for v in programmed.values())
        for ep in sp.endpoints:
            line = EndpointLine(str(ep), ep.pod, ep.node)
            lacking = [n for n, targets in programmed.items() if targets is None or str(ep) not in targets]
            if lacking and not nowhere:
                line.status, line.note = MISSING, f"not in the {rules} of {', '.join(lacking)}"
            box.endpoints.append(line)
        for extra in sorted({t for targets in programmed.values() if targets for t in targets} -
                            {str(e) for e in sp.endpoints}):
            box.endpoints.append(EndpointLine(extra, "", "", EXTRA, "stale: no such endpoint"))
        if not sp.endpoints:
            box.status, box.note = DOWN, "no endpoints (connections are rejected)"
        elif nowhere:
            box.status, box.note = MISSING, f"no node has {rules} for it"
        elif any(v is None for v in programmed.values()):
            box.status = MISSING
            box.note = f"no {rules} on {', '.join(n for n, v in programmed.items() if v is None)}"
        out.append(box)
    return out


def build(lab: Lab, running: list[RunningPod], sps: list[ServicePortEndpoints], obs: Observation) -> Graph:
    """Compare the lab as specified (and as its pods run) with what the kernel holds."""
    up = underlay.plan(lab)
    expected = _expected_routes(lab)
    cilium = lab.cni.profile == "cilium"
    proxy = kube_proxy.mode_label(lab)
    graph = Graph(lab.name, lab.network.backend, proxy, str(lab.cluster.pod_cidr),
                  str(lab.cluster.service_cidr),
                  str(lab.underlay.subnet) if lab.underlay.subnet else ", ".join(str(r.subnet) for r in lab.underlay.racks),
                  lab.network.ipip_mode if lab.network.backend == "ipip" else "")
    for node in lab.nodes:
        view = obs.namespaces.get(lab.node_netns(node.name))
        eth0 = Device(NODE_IFNAME, str(lab.node_interface(node)))
        eth0.status, eth0.note = device_state(view, NODE_IFNAME)
        if eth0.status == OK and view is not None and not view.has_addr(NODE_IFNAME, node.ip):
            eth0.status, eth0.note = WRONG, f"lacks {node.ip}"
        vpc = lab.cni.profile == "aws-vpc"
        tunnel = None
        if cilium:  # cilium_host in cni0's place, cilium_vxlan with its tunnel map in flannel.1's
            name, address, detail, status, note = graph_cilium.host_device(lab, node.name, view)
            cni0 = Device(name, address, status, note, detail)
            row = graph_cilium.tunnel_device(lab, node.name, view, obs)
            tunnel = Device(row[0], row[1], row[3], row[4], row[2]) if row else None
        elif vpc:  # drawn as "no bridge": pods are routed as /32s and eth0 answers ARP for them
            cni0 = Device("no", f"pods routed as /32s, answered for on {NODE_IFNAME} ({node.instance_type})")
        else:
            cni0 = Device(BRIDGE, str(node.gateway))
            cni0.status, cni0.note = device_state(view, BRIDGE, need_carrier=bool(lab.pods_on(node.name)))
            if cni0.status == OK and view is not None and not view.has_addr(BRIDGE, node.gateway.ip):
                cni0.status, cni0.note = WRONG, f"lacks {node.gateway}"
            tunnel = _tunnel(lab, node.name, view)
        routes = _vpc_route_lines(lab, node.name, view, running) if vpc else \
            _route_lines(lab, node.name, view, expected[node.name], running)
        box = NodeBox(node.name, str(node.ip), "-" if vpc else str(node.pod_cidr), node.rack, eth0, cni0, tunnel,
                      _pods(lab, node.name, view, running, obs), routes)
        if view is None:
            box.status, box.note = MISSING, "namespace gone"
        graph.nodes.append(box)
    segment_of = {s.switch: s for s in up.segments}
    for seg in up.segments:
        subnet = ""
        if seg.switch.startswith("r") and lab.underlay.racks:
            rack = next((r for r in lab.underlay.racks if f"r{r.index}" == seg.switch), None)
            subnet = str(rack.subnet) if rack else ""
        elif lab.underlay.fabric is not None and seg.switch == "fab":
            subnet = str(lab.underlay.fabric.cidr)
        else:
            subnet = str(lab.underlay.subnet or "")
        box = Segment(seg.switch, subnet)
        view = obs.namespaces.get(seg.netns)
        box.status, box.note = device_state(view, seg.switch)
        graph.segments.append(box)
    host_ips: dict[str, list[str]] = {}
    for link in up.links:
        host_ips.setdefault(link.host, []).append(str(link.address))
        if link.peer is not None and link.peer_address is not None:
            host_ips.setdefault(link.peer, []).append(str(link.peer_address))
        host = next(h for h in up.hosts if h.name == link.host)
        att = Attachment(link.host, link.intf, link.segment, link.port, link.peer, address=str(link.address),
                         peer_intf=link.peer_intf or "", peer_address=str(link.peer_address or ""))
        state, note = device_state(obs.namespaces.get(host.netns), link.intf)
        if state == OK and link.segment is not None:
            state, note = device_state(obs.namespaces.get(segment_of[link.segment].netns), link.port or "")
        elif state == OK and link.peer is not None:
            peer = next(h for h in up.hosts if h.name == link.peer)
            state, note = device_state(obs.namespaces.get(peer.netns), link.peer_intf or "")
        att.status, att.note = state, note
        graph.attachments.append(att)
    for host in up.hosts:
        if not (host.router or host.external):
            continue
        view = obs.namespaces.get(host.netns)
        box = HostBox(host.name, host_ips.get(host.name, []), "router" if host.router else "external")
        if view is None:
            box.status, box.note = MISSING, "namespace gone"
        elif host.router:
            learned = [r for r in view.routes if r.proto == "bgp"]
            box.detail = f"{len(learned)} routes learned by BGP"
        else:
            ext = next(e for e in lab.external if e.name == host.name)
            box.detail = ", ".join(ext.serves) + (f" · {', '.join(ext.names)}" if ext.names else "")
        (graph.routers if host.router else graph.external).append(box)
    graph.sessions = _sessions(lab, obs)
    graph.services = _services(lab, sps, obs)
    graph.problems = problems(graph)
    return graph


def problems(graph: Graph) -> list[str]:
    """One line per element that is not as the spec says, in the order they are drawn."""
    out = []
    for node in graph.nodes:
        if node.status != OK:
            out.append(f"{node.name}: {node.note}")
            continue
        for dev in (node.eth0, node.cni0, node.tunnel):
            if dev is not None and dev.status != OK:
                out.append(f"{node.name}: {dev.name}: {dev.note}")
        for pod in node.pods:
            if pod.status != OK:
                out.append(f"{node.name}: pod {pod.key}: {pod.note}")
        for r in node.routes:
            if r.status != OK:
                out.append(f"{node.name}: {r.note} {r.expected or r.observed}"
                           + (f" (kernel has: {r.observed})" if r.status == WRONG and r.observed else ""))
    for seg in graph.segments:
        if seg.status != OK:
            out.append(f"switch {seg.name}: {seg.note}")
    for att in graph.attachments:
        if att.status != OK:
            out.append(f"{att.host} {att.intf}: {att.note}")
    for host in graph.routers + graph.external:
        if host.status != OK:
            out.append(f"{host.name}: {host.note}")
    for s in graph.sessions:
        if s.status != OK:
            states = ", ".join(f"{k} says {v}" for k, v in s.states.items())
            out.append(f"BGP session {s.a} - {s.b} not Established ({states})")
    for svc in graph.services:
        if svc.status not in (OK,):
            out.append(f"service {svc.key}: {svc.note}")
        for ep in svc.endpoints:
            if ep.status != OK:
                out.append(f"service {svc.key}: endpoint {ep.address}: {ep.note}")
    return out


# ------------------------------------------------------------------------------------------- entry

def graph_of(name: str | None) -> Graph:
    """Observe a running lab and compare it with its spec (needs root: it enters the lab's namespaces)."""
    from apiserver import state
    from apiserver.desired import current_lab
    from kubelet.pods import running_pods
    from observe.kernel import observe
    from routing.frr import frr_folder
    from services import endpoints

    st = state.resolve(name)
    lab = current_lab(st)
    running = running_pods(st, lab)
    sps = endpoints.resolve(lab.services, running)
    obs = observe(lab, [ps.netns for ps in st.pods.values()], lambda s: frr_folder(state.lab_dir(st.name), s))
    if lab.cni.profile == "cilium":
        graph_cilium.fill(lab, obs)  # the service and tunnel maps, in place of kube-proxy's rules
    return build(lab, running, sps, obs)
