"""`lab trace`'s journey: which captured packets are the probe's (and its answer's), their order along the
cables, and the hops in between, with what the kernel did at each (routing, NAT, encapsulation, bridging);
and the text a terminal shows.

The journey is put in order from the cables, not from timestamps: a namespace's sightings come in its
socket's order, and a packet that left by one end of a veth is next seen at the other end.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address
from typing import Any

from observe import kernel as observed
from observe.capture import DNS_PORT, Probe, Sighting, is_dns_query
from observe.kernel import NsView, Rule, RouteView
from observe.netfilter import dnat_chain, snat_rule
from observe.packets import (ICMP_ECHO, ICMP_ECHO_REPLY, IPPROTO_IPIP, TCP_ACK, TCP_RST, TCP_SYN, UDP_MARK,
                             Packet)
from observe.places import Lookup, Peers, Place, Target
from topo import netns


def classify(sightings: list[Sighting], probe: Probe, source: Place) -> tuple[list[Sighting], list[Sighting]]:
    """(forward, reply) sightings of this probe, each up to its first complete journey."""
    isn = None
    if probe.protocol == "tcp":
        # The SYN as it left the source. A node's own connection to a ClusterIP may already be masqueraded
        # (another source port) when first seen, so the port is preferred, not required.
        syns = [s.eff for s in sightings if s.place == source and s.outgoing and s.eff.proto == "tcp" and
                s.eff.flags & TCP_SYN and not s.eff.flags & TCP_ACK]
        best = next((p for p in syns if p.sport == probe.sport), None) or \
            next((p for p in syns if p.dport == probe.port or p.dst == str(probe.dst)), None) or \
            (syns[0] if syns else None)
        isn = best.seq if best is not None else None

    def is_forward(p: Packet) -> bool:
        if probe.protocol == "icmp":
            return p.proto == "icmp" and p.icmp_type == ICMP_ECHO and probe.token in p.payload
        if probe.protocol == "udp":  # the answer echoes the token too, without the "echo " command
            return p.proto == "udp" and (p.payload.startswith(UDP_MARK) and probe.token in p.payload or
                                         p.dport == DNS_PORT and is_dns_query(p.payload, probe.token))
        return p.proto == "tcp" and isn is not None and p.seq == isn and bool(p.flags & TCP_SYN) and \
            not p.flags & TCP_ACK

    forward = [s for s in sightings if is_forward(s.eff)]
    forms = {s.eff.form for s in forward}
    reverse = {(f[0], f[3], f[4], f[1], f[2]) for f in forms}

    def is_reply(p: Packet) -> bool:
        if p.proto == "icmp" and p.icmp_type not in (ICMP_ECHO, ICMP_ECHO_REPLY, None):
            q = p.inner
            if q is None:
                return False
            if q.proto == "tcp":
                return isn is not None and q.seq == isn and q.form in forms
            return q.form in forms or (q.proto == "icmp" and q.icmp_id == probe.ident)
        if probe.protocol == "icmp":
            return p.proto == "icmp" and p.icmp_type == ICMP_ECHO_REPLY and probe.token in p.payload
        if probe.protocol == "tcp":  # the ISN is random: acknowledging it is proof enough, in any NAT form
            return p.proto == "tcp" and isn is not None and p.ack == (isn + 1) & 0xFFFFFFFF and \
                bool(p.flags & (TCP_SYN | TCP_RST))
        as_sent = p.src == str(probe.dst) and p.sport == probe.port and p.dport == probe.sport  # back at the source
        return p.proto == "udp" and (p.form in reverse or as_sent) and not p.payload.startswith(UDP_MARK) and \
            not is_dns_query(p.payload, probe.token)

    reply = [s for s in sightings if is_reply(s.eff)]
    return forward, reply


def walk(sightings: list[Sighting], start: str, peers: Peers) -> list[Sighting]:
    """The packet's journey, in order: a namespace's sightings in their queue order, and from an
    interface it left by, on to the In sighting at the other end of that cable. The first repeat of an
    (namespace, interface, direction) ends it: a retransmission, or a loop."""
    queues: dict[str, list[Sighting]] = {}
    for s in sightings:
        queues.setdefault(s.place.netns, []).append(s)
    pos = dict.fromkeys(queues, 0)
    path: list[Sighting] = []
    seen: set[tuple[str, str, bool]] = set()
    ns = start
    while ns in queues and pos[ns] < len(queues[ns]):
        s = queues[ns][pos[ns]]
        pos[ns] += 1
        key = (ns, s.dev, s.outgoing)
        if key in seen:
            break
        seen.add(key)
        path.append(s)
        if s.outgoing and (ns, s.dev) in peers:
            other, dev = peers[(ns, s.dev)]
            queue = queues.get(other, [])
            j = next((k for k in range(pos.get(other, 0), len(queue))
                      if not queue[k].outgoing and queue[k].dev == dev), None)
            if j is not None:
                pos[other], ns = j, other
    return path


def origin(reply: list[Sighting], preferred: list[Place], peers: Peers | None = None) -> str | None:
    """Where an answer was born: a namespace whose first sighting of it is outgoing; failing that (it was
    born somewhere not watched), where it first came in from a cable whose other end was not watched."""
    firsts: dict[str, Sighting] = {}
    for s in reply:
        firsts.setdefault(s.place.netns, s)
    born = [ns for ns, s in firsts.items() if s.outgoing]
    if not born and peers is not None:
        born = [ns for ns, s in firsts.items() if peers.get((ns, s.dev), ("", ""))[0] not in firsts]
    for place in preferred:
        if place.netns in born:
            return place.netns
    return born[0] if born else None


@dataclass


class Hop:
    place: str
    kind: str  # send, in, out, route, dnat, snat, un-nat, encap, decap, bridge, deliver, drop, error
    text: str
    dev: str = ""
    packet: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass


class TraceResult:
    lab: str
    source: str
    destination: str
    protocol: str
    port: int | None
    hops: list[Hop] = field(default_factory=list)
    reply: list[Hop] = field(default_factory=list)
    delivered: bool = False
    answered: bool = False
    reached: str = ""  # the place it was delivered to
    verdict: str = ""
    dropped_at: str = ""
    dropped_by: str = ""
    seconds: float = 0.0
    watched: list[str] = field(default_factory=list)
    kube_proxy: str = ""  # kube-proxy's mode and iptables backend, as `lab status` names them
    capture_lost: list[str] = field(default_factory=list)  # "node1: 3 frames dropped (...)": the path may lack hops

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Kernel:
    """Read-only questions to the namespaces of the path, asked after the probe (cached per namespace)."""

    def __init__(self) -> None:
        self._views: dict[str, NsView | None] = {}

    def view(self, ns: str) -> NsView | None:
        if ns not in self._views:
            self._views[ns] = observed.read_namespace(ns)
        return self._views[ns]

    def route(self, ns: str, dst: str, src: str | None, iif: str | None, fibmatch: bool = True) -> RouteView | str:
        view = self.view(ns)
        if view is None:
            return "namespace gone"
        names_ = {link.index: link.name for link in view.links.values()}
        index = view.links[iif].index if iif and iif in view.links else None
        try:
            handle = netns.rtnl_in(ns)
        except OSError as exc:
            return str(exc)
        try:
            return observed.route_get(handle, IPv4Address(dst), IPv4Address(src) if src and index else None,
                                     index, names_, fibmatch)
        finally:
            handle.close()


    def source_address(self, ns: str, dst: str) -> str | None:
        """The address the kernel gives a socket that does not choose one (`ip route get DST`'s src)."""
        try:
            handle = netns.rtnl_in(ns)
        except OSError:
            return None
        try:
            got = observed.route_get(handle, IPv4Address(dst), fibmatch=False)
        finally:
            handle.close()
        return str(got.src) if not isinstance(got, str) and got.src else None


class Tracer:
    def __init__(self, lookup: Lookup, kernel: Kernel, source: Place, target: Target, probe: Probe,
                 hits: dict[str, list[Rule]]) -> None:
        self.lookup, self.kernel, self.source, self.target, self.probe = lookup, kernel, source, target, probe
        self.hits = hits
        self.cilium: Any = None  # observe.trace_cilium.CiliumTrace in a cilium lab: programs and maps, not rules

    def _capture_hop(self, s: Sighting, show_packet: bool) -> Hop:
        desc = self.lookup.describe_dev(s.place, s.dev)
        direction = "out" if s.outgoing else "in"
        text = f"{s.dev} {direction}" + (f" ({desc})" if desc else "")
        packet = s.eff.summary() if show_packet else ""
        detail: dict[str, Any] = {}
        if s.packet.encap == "vxlan":
            detail = {"outer_src": s.packet.src, "outer_dst": s.packet.dst, "outer_sport": s.packet.sport,
                      "outer_dport": s.packet.dport, "vni": s.packet.vni}
            packet = f"VXLAN {s.packet.src}:{s.packet.sport} > {s.packet.dst}:{s.packet.dport} VNI {s.packet.vni}" \
                     f" carrying {s.eff.summary()}"
        elif s.packet.encap == "ipip":
            detail = {"outer_src": s.packet.src, "outer_dst": s.packet.dst, "proto": IPPROTO_IPIP}
            packet = f"IPIP {s.packet.src} > {s.packet.dst} (proto 4) carrying {s.eff.summary()}"
        return Hop(s.place.name, direction, text, s.dev, packet, detail)

    def _route_hop(self, place: Place, dst: str, src: str | None, iif: str | None) -> Hop:
        got = self.kernel.route(place.netns, dst, src, iif)
        if isinstance(got, str):
            return Hop(place.name, "route", f"route to {dst}: {got}", detail={"error": got})
        return Hop(place.name, "route", f"route {got.text()}", got.dev or "",
                   detail={"dst": str(got.dst), "via": str(got.via) if got.via else None, "dev": got.dev,
                           "proto": got.proto, "type": got.type})

    def _nat_hops(self, place: Place, before: Packet, after: Packet, reply: bool,
                  dev: str = "") -> tuple[list[Hop], list[Hop]]:
        """(before routing, after routing): a destination rewrite happens in PREROUTING/OUTPUT, a source
        rewrite in POSTROUTING; on the reply path conntrack undoes them at the same two points."""
        pre: list[Hop] = []
        post: list[Hop] = []
        hit = self.hits.get(place.netns, [])
        if self.cilium is not None and place.kind == "node":
            found = self._cilium_nat_hops(place, before, after, reply, dev)
            if found is not None:
                return found
        if (before.dst, before.dport) != (after.dst, after.dport):
            old, new = _endpoint(before.dst, before.dport), _endpoint(after.dst, after.dport)
            if reply:
                pre.append(Hop(place.name, "un-nat", f"un-SNAT (conntrack reverses the masquerade): destination "
                                                     f"{old} -> {new}", detail={"from": old, "to": new}))
            else:
                rule = dnat_chain(place.netns, self.lookup.lab.kube_proxy.mode, hit,
                                  (before.dst, before.proto, before.dport), new)
                pre.append(Hop(place.name, "dnat", f"DNAT {old} -> {new} by {rule}",
                               detail={"from": old, "to": new, "rule": rule}))
        if (before.src, before.sport) != (after.src, after.sport):
            old, new = _endpoint(before.src, before.sport), _endpoint(after.src, after.sport)
            if reply:
                post.append(Hop(place.name, "un-nat", f"un-DNAT (conntrack reverses the DNAT): source {old} -> {new}",
                                detail={"from": old, "to": new}))
            else:
                rule = snat_rule(hit, place.netns)
                post.append(Hop(place.name, "snat", f"SNAT {old} -> {new} by {rule}",
                                detail={"from": old, "to": new, "rule": rule}))
        return pre, post

    def _cilium_nat_hops(self, place: Place, before: Packet, after: Packet, reply: bool,
                         dev: str) -> tuple[list[Hop], list[Hop]] | None:
        """A cilium node translates with tc programs and cilium_ct4_global (NodePort), and masquerades to
        the outside with its CILIUM_POST_nat rule: no kube-proxy chain to name. None: a reply that no CT
        entry of the NodePort programs explains (conntrack undoing the masquerade: the generic text)."""
        pre: list[Hop] = []
        post: list[Hop] = []
        dnat = (before.dst, before.dport) != (after.dst, after.dport)
        snat = (before.src, before.sport) != (after.src, after.sport)
        if reply and (dnat or snat):
            text = self.cilium.nodeport(place, before, reply=True, dev=dev)
            if not text:
                return None
            frm, to = (_endpoint(before.src, before.sport), _endpoint(after.src, after.sport)) if snat else \
                (_endpoint(before.dst, before.dport), _endpoint(after.dst, after.dport))
            if snat and dnat:
                frm = f"{frm} > {_endpoint(before.dst, before.dport)}"
                to = f"{to} > {_endpoint(after.dst, after.dport)}"
            pre.append(Hop(place.name, "un-nat", f"reverse NAT {frm} -> {to} by {text}",
                           detail={"from": frm, "to": to, "program": text.split(" ", 1)[0]}))
            return pre, post
        if dnat:
            old, new = _endpoint(before.dst, before.dport), _endpoint(after.dst, after.dport)
            text = self.cilium.nodeport(place, before, reply=False, dev=dev)
            pre.append(Hop(place.name, "dnat", f"DNAT {old} -> {new} by {text}",
                           detail={"from": old, "to": new, "program": "cil_from_netdev", "rule": text}))
        if snat:
            old, new = _endpoint(before.src, before.sport), _endpoint(after.src, after.sport)
            rule = "cil_from_netdev (externalTrafficPolicy: Cluster)" if dnat else \
                snat_rule(self.hits.get(place.netns, []), place.netns)
            (pre if dnat else post).append(Hop(place.name, "snat", f"SNAT {old} -> {new} by {rule}",
                                               detail={"from": old, "to": new, "rule": rule}))
        return pre, post

    def _encap_hop(self, place: Place, inner_out: Sighting, outer_out: Sighting) -> Hop:
        p = outer_out.packet
        if p.encap == "ipip":
            return Hop(place.name, "encap", f"{inner_out.dev} encapsulates: outer {p.src} > {p.dst} IP proto 4 "
                                            "(IP-in-IP; the outer destination is the route's next hop)",
                       inner_out.dev, detail={"outer_src": p.src, "outer_dst": p.dst, "proto": IPPROTO_IPIP})
        fdb = ""
        view = self.kernel.view(place.netns)
        tunnel = self.cilium.tunnel(place, inner_out.eff.dst) if self.cilium is not None else ""
        if tunnel:
            fdb = f"; {tunnel}"
        elif view is not None and p.inner_mac:
            entry = next((e for e in view.fdb if e.dev == inner_out.dev and e.mac == p.inner_mac), None)
            if entry is not None:
                fdb = f"; FDB {entry.mac} -> {entry.dst}"
        return Hop(place.name, "encap", f"{inner_out.dev} encapsulates: outer {p.src} > {p.dst} UDP {p.dport}, "
                                        f"VNI {p.vni}{fdb}", inner_out.dev,
                   detail={"outer_src": p.src, "outer_dst": p.dst, "port": p.dport, "vni": p.vni,
                           **({"tunnel_map": tunnel} if tunnel else {})})

    def hops(self, sightings: list[Sighting], reply: bool) -> list[Hop]:
        out: list[Hop] = []
        last_packet = ""
        hairpins = _hairpins(sightings)
        for i, s in enumerate(sightings):
            prev = sightings[i - 1] if i else None
            same_place = prev is not None and prev.place == s.place
            if not reply and i == 0 and s.place == self.source:
                if s.outgoing:
                    route = self._route_hop(s.place, s.eff.dst, None, None)
                    pre, post = [], []
                    src = str(self.source.ip) if self.source.kind == "pod" else \
                        self.kernel.source_address(self.source.netns, str(self.probe.dst))
                    sent = Packet(src or s.eff.src, str(self.probe.dst), s.eff.proto, s.eff.length,
                                  self.probe.sport or s.eff.sport,
                                  self.probe.port if self.probe.protocol != "icmp" else None)
                    lb = self.cilium.rewrite(self.probe) if self.cilium is not None else None
                    if lb is not None:  # the socket LB rewrote the call: no packet ever carried the frontend
                        pre = [lb]
                    elif self.probe.protocol != "icmp":
                        pre, post = self._nat_hops(s.place, sent, s.eff, reply)
                    out += pre + [route] + post
            if same_place and prev is not None:
                out += self._between(prev, s, reply, hairpins[i])
            summary = s.packet.summary() + (s.eff.summary() if s.packet.encap else "")
            hop = self._capture_hop(s, summary != last_packet)
            last_packet = summary
            out.append(hop)
        return out

    def _between(self, a: Sighting, b: Sighting, reply: bool, hairpin: str = "") -> list[Hop]:
        """What the kernel did inside one namespace between two sightings there. `hairpin`: the bridge port
        the packet came into this namespace by and leaves it by again, if it does."""
        place = a.place
        if a.packet.encap == "vxlan" and not a.outgoing and not b.outgoing:
            return [Hop(place.name, "decap", f"UDP {a.packet.dport} is the VXLAN socket: {b.dev} "
                                             f"(VNI {a.packet.vni}) takes the inner packet out",
                        b.dev, detail={"vni": a.packet.vni, "outer_src": a.packet.src, "outer_dst": a.packet.dst})]
        if a.packet.encap == "ipip" and not a.outgoing and not b.outgoing:
            return [Hop(place.name, "decap", f"IP proto 4 to this node: {b.dev} (IP-in-IP) takes the inner "
                                             "packet out", b.dev,
                        detail={"proto": IPPROTO_IPIP, "outer_src": a.packet.src, "outer_dst": a.packet.dst})]
        if a.outgoing and b.outgoing and b.packet.encap and not a.packet.encap:
            route = self._route_hop(place, b.packet.dst, None, None)
            route.text = "outer " + route.text
            return [self._encap_hop(place, a, b), route]
        view = self.kernel.view(place.netns)
        links = view.links if view else {}
        a_port, b_port = links.get(a.dev), links.get(b.dev)
        bridged = place.kind == "switch" or bool(a_port and b_port and a_port.master and a_port.master == b_port.master)
        # Between two ports of a node's bridge, a frame for the node (its MAC or address, or translated by a
        # DNAT there) was routed: br_netfilter may still show it bridged from port to port (it reuses the
        # neighbour's cached header) or leaving by the bridge first (it did not), the same routing either way.
        routed = bridged and place.kind != "switch" and not a.outgoing and b.outgoing and \
            _for_the_node(a, b, reply, view, a_port.master if a_port else None)
        out: list[Hop] = []
        if bridged and not routed and not a.outgoing and b.outgoing:
            bridge = a_port.master if a_port and a_port.master else "the bridge"
            out.append(Hop(place.name, "bridge", f"{bridge} forwards the frame {a.dev} -> {b.dev} (layer 2, "
                                                 "no routing)", detail={"bridge": bridge}))
        pre, post = self._nat_hops(place, a.eff, b.eff, reply, a.dev)
        out += pre
        if (routed or not bridged) and not a.outgoing and b.outgoing and \
                place.kind in ("node", "router", "external", "pod"):
            # In transit through a tunnel (a router between racks), the kernel routes the outer packet.
            x, y = (a.packet, b.packet) if a.packet.encap and b.packet.encap else (a.eff, b.eff)
            route = self._route_hop(place, y.dst, x.src, a.dev)
            if hairpin and hairpin == a.dev and a_port is not None and a_port.master:
                # Routed out of the bridge it came from, to the very port it came in by: the port's hairpin
                # mode lets the bridge send it back (a pod reaching itself through a Service).
                route.text += f"; back out of {a_port.master} by {a.dev}, the port it came in by (hairpin)"
                route.detail["hairpin"] = a.dev
            if self.cilium is not None and any(h.detail.get("program") in ("cil_from_netdev", "cil_from_container")
                                               for h in pre):
                # The tc program sent it on itself (bpf_fib_lookup + bpf_redirect_neigh, or the tunnel).
                route.text = f"{pre[0].detail['program']} redirects it to {b.dev}, past the node's IP stack " \
                             f"(the FIB it asked: {route.text})"
            out.append(route)
        return out + post


def _hairpins(sightings: list[Sighting]) -> list[str]:
    """For each sighting, the interface its namespace's stretch of the journey came in by, if that stretch
    also leaves by it (a hairpin on a bridge port); else "". A stretch: consecutive sightings in one place."""
    out = [""] * len(sightings)
    start = 0
    for i in range(1, len(sightings) + 1):
        if i < len(sightings) and sightings[i].place == sightings[start].place:
            continue
        first, last = sightings[start], sightings[i - 1]
        if i - 1 > start and not first.outgoing and last.outgoing and first.dev == last.dev:
            out[start:i] = [first.dev] * (i - start)
        start = i
    return out


def _for_the_node(a: Sighting, b: Sighting, reply: bool, view: NsView | None, bridge: str | None) -> bool:
    """Was the frame that came in as `a` for the node itself, so routed, not bridged: sent to the bridge's
    own MAC (a pod's gateway), to an address of the node, or given another destination by a DNAT there."""
    if not reply and (a.eff.dst, a.eff.dport) != (b.eff.dst, b.eff.dport):
        return True
    if view is None:
        return False
    mac = view.links[bridge].mac if bridge and bridge in view.links else ""
    if mac and a.packet.mac_dst and a.packet.mac_dst.lower() == mac.lower():
        return True
    dst = IPv4Address(a.eff.dst)
    return any(addr.ip == dst for addrs in view.addrs.values() for addr in addrs)


def _endpoint(ip: str, port: int | None) -> str:
    return f"{ip}:{port}" if port is not None else ip


def render(result: TraceResult) -> str:
    lines = [f"lab trace {result.lab}: {result.source} -> {result.destination}"
             + (f" (kube-proxy {result.kube_proxy})" if result.kube_proxy else "")]
    lines += _hop_lines(result.hops)
    if result.reply:
        lines.append("reply:")
        lines += _hop_lines(result.reply)
    lines.append(("✓ " if result.delivered else "✗ ") + result.verdict)
    if result.capture_lost:
        lines.append(f"capture lost frames: {'; '.join(result.capture_lost)}")
    lines.append(f"(watched {len(result.watched)} namespaces: {', '.join(result.watched)}; {result.seconds:.2f} s)")
    return "\n".join(lines)


def _hop_lines(hops: list[Hop]) -> list[str]:
    width = max((len(h.place) for h in hops), default=8)
    out = []
    n = 0
    for h in hops:
        if h.kind in ("in", "out"):
            n += 1
            line = f"{n:>3}  {h.place:<{width}}  {h.text}"
            if h.packet:
                line += f"   {h.packet}"
        else:
            line = f"{'':>3}  {h.place:<{width}}    -> {h.text}"
        out.append(line)
    return out
