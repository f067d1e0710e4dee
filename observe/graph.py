"""`lab graph`: the running lab drawn the way the explainer draws a cluster, from what the kernel holds.

Two steps, so each is testable on its own:

1. `build()` compares what the spec says should exist (routes per backend, VXLAN forwarding entries, the
   IP-in-IP tunl0, BGP sessions, service rules of any kube-proxy mode, pods on their bridge) with an `observe.Observation` of the kernel, and returns
   a pure `Graph`: every element carries a status (ok, missing, down, wrong, extra) and a note. A route
   someone deleted is still in the graph, marked missing; a session that is not Established is down.
2. `to_dot()` and `to_text()` render a Graph: Graphviz (SVG/PNG/DOT) for slides, text for a terminal.

No root is needed for either step: the unit tests build Graphs from hand-made observations.
"""
from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from lab.observe import NsView, Observation
from routing import bgp, host_gw, ipip, vxlan
from services.endpoints import RunningPod, ServicePortEndpoints
from topo import names, underlay
from topo.model import BRIDGE, NODE_IFNAME, POD_IFNAME, Lab

OK, MISSING, DOWN, WRONG, EXTRA = "ok", "missing", "down", "wrong", "extra"
DNS_KEY = ("kube-system", "coredns")  # the cluster DNS pod (lab.addons names it so: the CoreDNS role)
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

def _link_state(view: NsView | None, dev: str, need_carrier: bool = True) -> tuple[str, str]:
    if view is None:
        return MISSING, "namespace gone"
    link = view.links.get(dev)
    if link is None:
        return MISSING, f"no {dev}"
    if not link.up:
        return DOWN, f"{dev} is down"
    if need_carrier and not link.carrier:
        return DOWN, f"{dev} has no carrier"
    return OK, ""


def _expected_routes(lab: Lab, node: str) -> list[tuple[IPv4Network, IPv4Address | None, str | None, str | None]]:
    """(dst, via, dev, proto) of the cross-node routes the backend installs in `node`; None: any."""
    backend = lab.network.backend
    if backend == "host-gw":
        return [(r.dst, r.via, r.dev, None) for r in host_gw.routes(lab) if r.node == node]
    if backend == "vxlan":
        mine = next(p for p in vxlan.plan(lab) if p.vtep.node == node)
        return [(peer.pod_cidr, peer.address.ip, vxlan.DEVICE, None) for peer in mine.peers]
    if backend == "bgp":
        return [(p.pod_cidr, None, None, "bgp") for p in lab.nodes if p.name != node]
    if backend == "ipip":
        # Calico's routes (routing/ipip.py): via the other node's IP, through tunl0 onlink when the
        # ipipMode encapsulates towards it (Always: every node; CrossSubnet: other racks only), else eth0.
        return [(r.dst, r.via, r.dev, "bgp") for r in ipip.expected_routes(lab) if r.node == node]
    return []


def _route_lines(lab: Lab, node_name: str, view: NsView | None) -> list[RouteLine]:
    node = lab.node(node_name)
    own = RouteLine(str(node.pod_cidr), f"{node.pod_cidr} dev {BRIDGE}", "", own=True)
    lines = [own]
    observed = view.route_to(node.pod_cidr) if view else None
    if observed is None:
        own.status, own.note = MISSING, "missing route"
    else:
        own.observed = observed.text()
        if observed.dev != BRIDGE or observed.type != "unicast":
            own.status, own.note = WRONG, f"goes to {observed.dev or observed.type}, not {BRIDGE}"
    expected_dsts = {node.pod_cidr}
    for dst, via, dev, proto in _expected_routes(lab, node_name):
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
    dev.status, dev.note = _link_state(view, vxlan.DEVICE, need_carrier=False)
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
    dev.status, dev.note = _link_state(view, ipip.DEVICE, need_carrier=False)
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
        veth = names.host_veth(names.sandbox_id(lab.name, pod.namespace, pod.name))
        box = PodBox(pod.name, pod.namespace, str(rp.ip), veth,
                     role="dns" if (pod.namespace, pod.name) == DNS_KEY else "")
        pod_view = obs.namespaces.get(lab.pod_netns(pod))
        if not rp.ready:
            box.status, box.note = DOWN, "not running"
        elif pod_view is None:
            box.status, box.note = MISSING, "namespace gone"
        elif not pod_view.has_addr(POD_IFNAME, rp.ip):
            box.status, box.note = WRONG, f"{POD_IFNAME} lacks {rp.ip}"
        else:
            state, note = _link_state(view, veth)
            link = view.links.get(veth) if view else None
            if state == OK and link is not None and link.master != BRIDGE:
                state, note = WRONG, f"{veth} not on {BRIDGE}"
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
                line.status, line.note = MISSING, f"not in the rules of {', '.join(lacking)}"
            box.endpoints.append(line)
        for extra in sorted({t for targets in programmed.values() if targets for t in targets} -
                            {str(e) for e in sp.endpoints}):
            box.endpoints.append(EndpointLine(extra, "", "", EXTRA, "stale: no such endpoint"))
        if not sp.endpoints:
            box.status, box.note = DOWN, "no endpoints (connections are rejected)"
        elif nowhere:
            box.status, box.note = MISSING, "no node has rules for it"
        elif any(v is None for v in programmed.values()):
            box.status = MISSING
            box.note = f"no rules on {', '.join(n for n, v in programmed.items() if v is None)}"
        out.append(box)
    return out


def build(lab: Lab, running: list[RunningPod], sps: list[ServicePortEndpoints], obs: Observation) -> Graph:
    """Compare the lab as specified (and as its pods run) with what the kernel holds."""
    up = underlay.plan(lab)
    graph = Graph(lab.name, lab.network.backend, lab.kube_proxy.mode, str(lab.cluster.pod_cidr),
                  str(lab.cluster.service_cidr),
                  str(lab.underlay.subnet) if lab.underlay.subnet else ", ".join(str(r.subnet) for r in lab.underlay.racks),
                  lab.network.ipip_mode if lab.network.backend == "ipip" else "")
    for node in lab.nodes:
        view = obs.namespaces.get(lab.node_netns(node.name))
        eth0 = Device(NODE_IFNAME, str(lab.node_interface(node)))
        eth0.status, eth0.note = _link_state(view, NODE_IFNAME)
        if eth0.status == OK and view is not None and not view.has_addr(NODE_IFNAME, node.ip):
            eth0.status, eth0.note = WRONG, f"lacks {node.ip}"
        cni0 = Device(BRIDGE, str(node.gateway))
        cni0.status, cni0.note = _link_state(view, BRIDGE, need_carrier=bool(lab.pods_on(node.name)))
        if cni0.status == OK and view is not None and not view.has_addr(BRIDGE, node.gateway.ip):
            cni0.status, cni0.note = WRONG, f"lacks {node.gateway}"
        box = NodeBox(node.name, str(node.ip), str(node.pod_cidr), node.rack, eth0, cni0,
                      _tunnel(lab, node.name, view), _pods(lab, node.name, view, running, obs),
                      _route_lines(lab, node.name, view))
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
        box.status, box.note = _link_state(view, seg.switch)
        graph.segments.append(box)
    host_ips: dict[str, list[str]] = {}
    for link in up.links:
        host_ips.setdefault(link.host, []).append(str(link.address))
        if link.peer is not None and link.peer_address is not None:
            host_ips.setdefault(link.peer, []).append(str(link.peer_address))
        host = next(h for h in up.hosts if h.name == link.host)
        att = Attachment(link.host, link.intf, link.segment, link.port, link.peer, address=str(link.address),
                         peer_intf=link.peer_intf or "", peer_address=str(link.peer_address or ""))
        state, note = _link_state(obs.namespaces.get(host.netns), link.intf)
        if state == OK and link.segment is not None:
            state, note = _link_state(obs.namespaces.get(segment_of[link.segment].netns), link.port or "")
        elif state == OK and link.peer is not None:
            peer = next(h for h in up.hosts if h.name == link.peer)
            state, note = _link_state(obs.namespaces.get(peer.netns), link.peer_intf or "")
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


# ------------------------------------------------------------------------------------------- text

MARK = {OK: "✓", MISSING: "✗", DOWN: "✗", WRONG: "!", EXTRA: "?"}
ANSI = {OK: "\033[32m", MISSING: "\033[31m", DOWN: "\033[31m", WRONG: "\033[33m", EXTRA: "\033[33m"}


def to_text(graph: Graph, color: bool = False) -> str:
    """A terminal drawing: the underlay as the trunk, nodes with their bridge, pods and routes as branches."""

    def mark(status: str) -> str:
        sym = MARK.get(status, "?")
        return f"{ANSI[status]}{sym}\033[0m" if color and status in ANSI else sym

    def note(status: str, text: str) -> str:
        if status == OK or not text:
            return ""
        shown = f"  <- {text.upper() if status in (MISSING, DOWN) else text}"
        return f"{ANSI[status]}{shown}\033[0m" if color else shown

    mode = f" ({graph.ipip_mode})" if graph.ipip_mode else ""
    lines = [f"lab {graph.lab}: backend {graph.backend}{mode}, kube-proxy {graph.kube_proxy}, "
             f"pods {graph.pod_cidr}, services {graph.service_cidr}"]
    for seg in graph.segments:
        lines.append(f"{mark(seg.status)} underlay switch {seg.name}  {seg.subnet}{note(seg.status, seg.note)}")
        members = [a for a in graph.attachments if a.segment == seg.name]
        for i, att in enumerate(members):
            last = i == len(members) - 1
            branch, stem = ("└─", "   ") if last else ("├─", "│  ")
            node = next((n for n in graph.nodes if n.name == att.host), None)
            host = next((h for h in graph.routers + graph.external if h.name == att.host), None)
            link = f"{att.port} ── {att.intf}"
            if node is not None:
                lines.append(f"{branch} {link}  {mark(node.status)} node {node.name}  {node.eth0.address}  "
                             f"PodCIDR {node.pod_cidr}{note(node.status, node.note)}"
                             f"{note(att.status, att.note)}")
                lines.extend(stem + row for row in _node_rows(node, mark, note))
            elif host is not None:
                what = "router" if host.kind == "router" else "external host"
                lines.append(f"{branch} {link}  {mark(host.status)} {what} {host.name}  {', '.join(host.ips)}"
                             f"{'  (' + host.detail + ')' if host.detail else ''}{note(host.status, host.note)}"
                             f"{note(att.status, att.note)}")
    p2p = [a for a in graph.attachments if a.segment is None]
    if p2p:
        lines.append("point-to-point links")
        lines += [f"  {mark(a.status)} {a.host} {a.intf} {a.address} ── {a.peer} {a.peer_intf} {a.peer_address}"
                  f"{note(a.status, a.note)}" for a in p2p]
    if graph.sessions:
        lines.append("BGP sessions")
        for s in graph.sessions:
            kind = "iBGP" if s.ibgp else "eBGP"
            state = "Established" if s.status == OK else " / ".join(f"{k}: {v}" for k, v in s.states.items())
            lines.append(f"  {mark(s.status)} {s.a} ── {s.b}  {kind} {state}")
    if graph.services:
        lines.append("services (kube-proxy " + graph.kube_proxy + ", on every node)")
        for svc in graph.services:
            np = f" NodePort {svc.node_port}" if svc.node_port else ""
            role = "  [cluster DNS]" if svc.role == "dns" else ""
            lines.append(f"  {mark(svc.status)} {svc.namespace}/{svc.name}  {svc.cluster_ip}:{svc.port}/"
                         f"{svc.protocol}{np}{role}{note(svc.status, svc.note)}")
            for ep in svc.endpoints:
                pod = f" ({ep.pod.split('/', 1)[-1]} on {ep.node})" if ep.pod else ""
                lines.append(f"      -> {mark(ep.status)} {ep.address}{pod}{note(ep.status, ep.note)}")
    if graph.problems:
        lines.append(f"{len(graph.problems)} problem{'s' if len(graph.problems) != 1 else ''}:")
        lines += [f"  {mark(MISSING)} {p}" for p in graph.problems]
    else:
        lines.append("everything the spec expects is in the kernel")
    return "\n".join(lines)


def _node_rows(node: NodeBox, mark, note) -> list[str]:
    rows = [f"├─ {mark(node.cni0.status)} {node.cni0.name} bridge  {node.cni0.address}{note(node.cni0.status, node.cni0.note)}"]
    for i, pod in enumerate(node.pods):
        branch = "└─" if i == len(node.pods) - 1 else "├─"
        role = "  [cluster DNS]" if pod.role == "dns" else ""
        rows.append(f"│  {branch} {pod.veth} ── {mark(pod.status)} pod {pod.key}  {pod.ip}{role}"
                    f"{note(pod.status, pod.note)}")
    if node.tunnel is not None:
        t = node.tunnel
        rows.append(f"├─ {mark(t.status)} {t.name}  {t.address}  {t.detail}{note(t.status, t.note)}")
    rows.append("└─ routes")
    for i, r in enumerate(node.routes):
        branch = "└─" if i == len(node.routes) - 1 else "├─"
        text = r.observed if r.status in (OK, EXTRA) or (r.status == WRONG and r.observed) else r.expected
        rows.append(f"   {branch} {mark(r.status)} {text}{note(r.status, r.note)}")
    return rows


# ------------------------------------------------------------------------------------------- dot

PALETTE = {
    "node_fill": "#f2f6fb", "node_line": "#3d6ea8",
    "pod_fill": "#ffffff", "pod_line": "#3d6ea8",
    "dns_fill": "#e3f4e4", "dns_line": "#2e7d32",
    "bridge_fill": "#fff1d0", "bridge_line": "#c98a00",
    "nic_fill": "#e9eef5", "nic_line": "#6b7f99",
    "tunnel_fill": "#efe6fa", "tunnel_line": "#7b4fc0",
    "svc_fill": "#f3ecfc", "svc_line": "#7b4fc0",
    "switch_fill": "#eceff1", "switch_line": "#546e7a",
    "router_fill": "#e0f2f1", "router_line": "#00796b",
    "ext_fill": "#e8f5e9", "ext_line": "#388e3c",
    "ok": "#2e7d32", "bad": "#c62828", "warn": "#ef6c00", "text": "#263238", "muted": "#607d8b",
}
FONT = "Helvetica"


def _bad(status: str) -> bool:
    return status in (MISSING, DOWN, WRONG)


def _color(status: str, normal: str) -> str:
    if status in (MISSING, DOWN, WRONG):
        return PALETTE["bad"]
    if status == EXTRA:
        return PALETTE["warn"]
    return normal


def _id(*parts: str) -> str:
    return "n_" + "_".join(parts).replace("-", "_").replace(".", "_").replace("/", "_").replace(":", "_")


def _h(text: str) -> str:
    return html.escape(str(text), quote=True)


def _label(title: str, *rows: str, status: str = OK, note: str = "", bold: bool = True) -> str:
    """An HTML-like Graphviz label: a title, smaller rows, and (when broken) the note in red."""
    parts = [f"<b>{_h(title)}</b>" if bold else _h(title)]
    parts += [f'<font point-size="10">{_h(r)}</font>' for r in rows if r]
    if status != OK and note:
        color = PALETTE["warn"] if status == EXTRA else PALETTE["bad"]
        parts.append(f'<font point-size="10" color="{color}"><b>{_h(note.upper() if _bad(status) else note)}</b></font>')
    return "<" + "<br/>".join(parts) + ">"


def _style(status: str, fill: str, line: str, base: str = "rounded,filled") -> dict[str, str]:
    attrs = {"fillcolor": fill, "color": _color(status, line), "style": base}
    if _bad(status):
        attrs.update(style=base + ",dashed", penwidth="2.2", fillcolor="#fdecea")
    return attrs


def _route_table(node: NodeBox) -> str:
    rows = ['<tr><td align="left" colspan="2"><font point-size="10" color="{}"><b>ROUTES (kernel)</b></font></td></tr>'
            .format(PALETTE["muted"])]
    for r in node.routes:
        if r.status == OK:
            color, sym = PALETTE["ok"], "✓"
        elif r.status == EXTRA:
            color, sym = PALETTE["warn"], "?"
        else:
            color, sym = PALETTE["bad"], "✗"
        text = r.observed if r.status in (OK, EXTRA) or (r.status == WRONG and r.observed) else r.expected
        cell = _h(text)
        if r.status != OK:
            cell = f"<b>{cell}</b><br/>{_h(r.note.upper() if _bad(r.status) else r.note)}"
        rows.append(f'<tr><td valign="top"><font color="{color}">{sym}</font></td>'
                    f'<td align="left" balign="left"><font point-size="9" color="{color if r.status != OK else PALETTE["text"]}">'
                    f"{cell}</font></td></tr>")
    return ('<<table border="1" cellborder="0" cellspacing="1" cellpadding="2" style="rounded" color="{}" '
            'bgcolor="white">{}</table>>').format(PALETTE["nic_line"], "".join(rows))


def to_dot(graph: Graph) -> str:
    """The lab as a Graphviz digraph, top-down as the explainer draws it: services above, nodes with their
    pods, bridge and NICs side by side, the underlay (switches, routers, external hosts) below."""
    from graphviz import Digraph

    problems = len(graph.problems)
    status_line = (f'<font color="{PALETTE["ok"]}">✓ matches the spec</font>' if not problems else
                   f'<font color="{PALETTE["bad"]}"><b>✗ {problems} problem{"s" if problems != 1 else ""}</b></font>')
    backend = graph.backend + (f" ({graph.ipip_mode})" if graph.ipip_mode else "")
    title = (f'<<font point-size="20"><b>lab {_h(graph.lab)}</b></font><br/>'
             f'<font point-size="12" color="{PALETTE["muted"]}">backend {_h(backend)} · kube-proxy '
             f'{_h(graph.kube_proxy)} · pods {_h(graph.pod_cidr)} · services {_h(graph.service_cidr)}</font><br/>'
             f'<font point-size="12">{status_line}</font>>')
    g = Digraph("lab", graph_attr={"rankdir": "TB", "fontname": FONT, "labelloc": "t", "label": title,
                                   "bgcolor": "white", "pad": "0.4", "nodesep": "0.3", "ranksep": "0.45",
                                   "newrank": "true", "compound": "true", "splines": "true"},
                node_attr={"fontname": FONT, "fontsize": "12", "shape": "box", "style": "rounded,filled",
                           "penwidth": "1.3", "fontcolor": PALETTE["text"], "margin": "0.14,0.06"},
                edge_attr={"fontname": FONT, "fontsize": "9", "color": PALETTE["muted"], "arrowsize": "0.6",
                           "fontcolor": PALETTE["muted"]})
    pod_ids: dict[str, str] = {}
    bridges: list[str] = []
    nics: dict[str, str] = {}
    tunnels: dict[str, str] = {}
    for node in graph.nodes:
        with g.subgraph(name=f"cluster_{_id(node.name)}") as c:
            rack = f" · {node.rack}" if node.rack else ""
            c.attr(label=_label(f"{node.name} ({node.ip})", f"PodCIDR {node.pod_cidr}{rack}",
                                status=node.status, note=node.note),
                   style="rounded,filled", fillcolor=PALETTE["node_fill"] if not _bad(node.status) else "#fdecea",
                   color=_color(node.status, PALETTE["node_line"]), penwidth="1.6", fontsize="14", labeljust="c")
            bridge = _id(node.name, "cni0")
            bridges.append(bridge)
            with c.subgraph(name=f"pods_{_id(node.name)}") as row:
                row.attr(rank="same")
                for pod in node.pods:
                    pid = _id(node.name, pod.namespace, pod.name)
                    pod_ids[pod.key] = pid
                    title = "CoreDNS" if pod.role == "dns" else pod.name
                    rows = [pod.ip] if pod.role != "dns" else [f"{pod.key}", pod.ip]
                    if pod.role == "dns":
                        attrs = _style(pod.status, PALETTE["dns_fill"], PALETTE["dns_line"])
                        attrs["penwidth"] = "2"
                    else:
                        attrs = _style(pod.status, PALETTE["pod_fill"], PALETTE["pod_line"])
                    row.node(pid, _label(title, *rows, status=pod.status, note=pod.note), **attrs)
            column = f"stack_{_id(node.name)}"  # bridge, tunnel and NIC in one straight column
            c.node(bridge, _label(f"{node.cni0.name} bridge", node.cni0.address, status=node.cni0.status,
                                  note=node.cni0.note),
                   **_style(node.cni0.status, PALETTE["bridge_fill"], PALETTE["bridge_line"]), width="2.2",
                   group=column)
            for pod in node.pods:
                c.edge(pod_ids[pod.key], bridge, label=f" {pod.veth}", arrowhead="none",
                       color=_color(pod.status, PALETTE["pod_line"]),
                       style="dashed" if _bad(pod.status) else "solid")
            eth0 = _id(node.name, "eth0")
            nics[node.name] = eth0
            c.node(eth0, _label(node.eth0.name, node.eth0.address, status=node.eth0.status, note=node.eth0.note),
                   **_style(node.eth0.status, PALETTE["nic_fill"], PALETTE["nic_line"]), group=column)
            routes = _id(node.name, "routes")
            with c.subgraph(name=f"bridge_{_id(node.name)}") as row:
                row.attr(rank="same")
                row.node(routes, _route_table(node), shape="plain", style="")
                row.node(bridge)
            if node.tunnel is not None:
                tun = _id(node.name, "tunnel")
                tunnels[node.name] = tun
                c.node(tun, _label(node.tunnel.name, node.tunnel.address, node.tunnel.detail,
                                   status=node.tunnel.status, note=node.tunnel.note),
                       **_style(node.tunnel.status, PALETTE["tunnel_fill"], PALETTE["tunnel_line"]), group=column)
                c.edge(bridge, tun, arrowhead="none", color=PALETTE["tunnel_line"], style="dotted")
                c.edge(tun, eth0, arrowhead="none", color=PALETTE["tunnel_line"], style="dotted")
            else:
                c.edge(bridge, eth0, arrowhead="none", style="dotted", label=" routed")
            c.edge(routes, bridge, style="invis")
    # Bridges and NICs line up across nodes, nodes left to right in the spec's order (invisible edges
    # inside a rank fix the order there).
    for row in (bridges, list(nics.values())):
        with g.subgraph() as s:
            s.attr(rank="same")
            for a, b in zip(row, row[1:]):
                s.edge(a, b, style="invis")
            for n in row[:1]:
                s.node(n)

    # Services above the nodes, edges down to their endpoints.
    if graph.services:
        with g.subgraph(name="cluster_services") as c:
            c.attr(label=_label("Services", "ClusterIPs: kube-proxy rules in every node, no interface holds them",
                                bold=True),
                   style="rounded,dashed", color=PALETTE["svc_line"], fontcolor=PALETTE["svc_line"], fontsize="13")
            merged: dict[tuple[str, str], list[ServiceBox]] = {}
            for svc in graph.services:
                merged.setdefault((svc.namespace, svc.name), []).append(svc)
            for (ns, name), ports in merged.items():
                sid = _id("svc", ns, name)
                worst = next((p.status for p in ports if p.status != OK), OK)
                notes = "; ".join(p.note for p in ports if p.note)
                port_text = ", ".join(f"{p.port}/{p.protocol}" + (f" (NodePort {p.node_port})" if p.node_port else "")
                                      for p in ports)
                title = f"{name}" + ("  (cluster DNS)" if ports[0].role == "dns" else "")
                fill = PALETTE["dns_fill"] if ports[0].role == "dns" else PALETTE["svc_fill"]
                line = PALETTE["dns_line"] if ports[0].role == "dns" else PALETTE["svc_line"]
                c.node(sid, _label(title, f"{ports[0].cluster_ip} · {port_text}", ns, status=worst, note=notes),
                       **_style(worst, fill, line, base="rounded,filled"), shape="box")
                seen: set[str] = set()
                for p in ports:
                    for ep in p.endpoints:
                        if ep.pod in seen or ep.pod not in pod_ids:
                            continue
                        seen.add(ep.pod)
                        port = ep.address.rsplit(":", 1)[-1]
                        g.edge(sid, pod_ids[ep.pod], label=f" :{port}", color=_color(ep.status, line),
                               style="dashed" if ep.status != OK else "solid", penwidth="1.1",
                               fontcolor=_color(ep.status, line))

    # The underlay: switches, routers, external hosts, and every host's link.
    for seg in graph.segments:
        g.node(_id("seg", seg.name), _label(f"switch {seg.name}", f"underlay {seg.subnet}", status=seg.status,
                                            note=seg.note),
               **_style(seg.status, PALETTE["switch_fill"], PALETTE["switch_line"]), shape="box", width="3")
    for host in graph.routers:
        g.node(_id("host", host.name), _label(host.name, *host.ips, host.detail, status=host.status, note=host.note),
               **_style(host.status, PALETTE["router_fill"], PALETTE["router_line"], base="filled"), shape="octagon")
    for host in graph.external:
        g.node(_id("host", host.name), _label(host.name.replace("-", " ").title() if host.name == "external-web"
                                              else host.name, *host.ips, host.detail, status=host.status,
                                              note=host.note),
               **_style(host.status, PALETTE["ext_fill"], PALETTE["ext_line"]), shape="box")
    routers = {h.name for h in graph.routers}
    for att in graph.attachments:
        src = nics.get(att.host, _id("host", att.host))
        color = _color(att.status, PALETTE["switch_line"])
        style = {"arrowhead": "none", "color": color, "penwidth": "1.6", "labelfontsize": "8",
                 "labelfontcolor": PALETTE["muted"], "style": "dashed" if _bad(att.status) else "solid"}
        if att.segment is not None and att.host in routers:
            # A rack's router hangs below its switch: the picture reads top-down, pods to the fabric.
            g.edge(_id("seg", att.segment), src, taillabel=att.port or "", **style)
        elif att.segment is not None:
            g.edge(src, _id("seg", att.segment), headlabel=att.port or "", **style)
        elif att.peer is not None:
            g.edge(src, _id("host", att.peer), arrowhead="none", color=color, penwidth="1.6",
                   taillabel=att.intf, labelfontsize="8", labelfontcolor=PALETTE["muted"])

    # How pods reach other nodes: the VXLAN or IP-in-IP tunnels, or the BGP sessions.
    if len(tunnels) > 1:
        names_ = list(tunnels)
        label = f" VXLAN VNI {vxlan.VNI} · UDP {vxlan.PORT} " if graph.backend == "vxlan" else \
            " IP-in-IP (proto 4)" + (" between racks " if graph.ipip_mode == "CrossSubnet" else " ")
        for a, b in zip(names_, names_[1:]):
            g.edge(tunnels[a], tunnels[b], dir="both", color=PALETTE["tunnel_line"], penwidth="2",
                   style="bold", constraint="false", label=label,
                   fontcolor=PALETTE["tunnel_line"], fontsize="10")
    for s in graph.sessions:
        a = nics.get(s.a, _id("host", s.a))
        b = nics.get(s.b, _id("host", s.b))
        state = "Established" if s.status == OK else " / ".join(f"{v}" for v in set(s.states.values()))
        color = PALETTE["ok"] if s.status == OK else PALETTE["bad"]
        g.edge(a, b, dir="both", color=color, style="dashed", penwidth="1.6", constraint="false",
               label=f" {'iBGP' if s.ibgp else 'eBGP'} {state} ", fontcolor=color, fontsize="9", arrowsize="0.5")
    # A cross-node route that is missing or wrong, drawn where it should lead: to the other node's bridge.
    cidr_owner = {n.pod_cidr: n.name for n in graph.nodes}
    for node in graph.nodes:
        for r in node.routes:
            if r.own or r.status not in (MISSING, WRONG) or r.dst not in cidr_owner:
                continue
            peer = cidr_owner[r.dst]
            ends = (tunnels[node.name], tunnels[peer]) if node.name in tunnels and peer in tunnels else \
                (nics[node.name], nics[peer])
            g.edge(*ends, color=PALETTE["bad"], style="dashed",
                   penwidth="2", constraint="false", fontcolor=PALETTE["bad"], fontsize="10",
                   label=f" ✗ {r.note} to {r.dst} ")
    if graph.problems:
        rows = "".join(f'<tr><td align="left"><font color="{PALETTE["bad"]}" point-size="10">✗ {_h(p)}</font></td></tr>'
                       for p in graph.problems[:12])
        more = len(graph.problems) - 12
        if more > 0:
            rows += f'<tr><td align="left"><font point-size="10">... and {more} more</font></td></tr>'
        g.node("problems", f'<<table border="1" cellborder="0" color="{PALETTE["bad"]}" bgcolor="#fff5f5" '
                           f'style="rounded"><tr><td align="left"><b>Problems</b></td></tr>{rows}</table>>',
               shape="plain", style="")
    return g.source


def render(graph: Graph, path: Path) -> Path:
    """Write the graph as .dot, .svg or .png (by suffix)."""
    from topo.errors import FeatureMissing, StateError

    suffix = path.suffix.lower().lstrip(".")
    if suffix not in ("dot", "gv", "svg", "png"):
        raise StateError(f"cannot write {path}: use a .svg, .png or .dot file name")
    source = to_dot(graph)
    if suffix in ("dot", "gv"):
        path.write_text(source)
        return path
    import shutil
    import subprocess

    if shutil.which("dot") is None:
        raise FeatureMissing("Graphviz's dot is not installed: install Debian's 'graphviz' package (./install.sh does)")
    argv = ["dot", f"-T{suffix}", "-o", str(path)] + (["-Gdpi=130"] if suffix == "png" else [])
    proc = subprocess.run(argv, input=source, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise StateError(f"dot failed: {(proc.stderr.strip().splitlines() or ['?'])[0]}")
    return path


# ------------------------------------------------------------------------------------------- entry

def graph_of(name: str | None) -> Graph:
    """Observe a running lab and compare it with its spec (needs root: it enters the lab's namespaces)."""
    from lab import apply, state
    from lab.objects import current_lab, running_pods
    from lab.observe import observe
    from services import endpoints

    st = state.resolve(name)
    lab = current_lab(st)
    running = running_pods(st, lab)
    sps = endpoints.resolve(lab.services, running)
    obs = observe(lab, [ps.netns for ps in st.pods.values()], lambda s: apply.frr_folder(st.name, s))
    return build(lab, running, sps, obs)
