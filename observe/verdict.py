"""`lab trace`'s verdict: delivered (where, and what came back) or dropped (where it was last seen, and why).

The reasons, in order: an ICMP error on the wire, a DROP/REJECT rule whose counter moved where the packet
was last seen (in the cilium profile, a drop its programs reported for the probe's packet), no route, a next
hop that never answered ARP, a frame (tunnel headers included) larger than the MTU at the other end of the
cable it left by, than the switch port it would leave by, or than the next link's. A capture that lost
frames, or a packet that left for a place nobody watched, is said so, never a drop.
"""
from __future__ import annotations

import errno
import os
from ipaddress import IPv4Address, IPv4Network

from observe.capture import Sighting
from observe.hops import Kernel, Tracer, TraceResult
from observe.kernel import RouteView, Rule
from observe.netfilter import attribute_drops, drop_text, own_chains
from observe.packets import ICMP_ECHO, ICMP_ECHO_REPLY, TCP_RST, TCP_SYN, Packet, icmp_error
from observe.places import MAX_NODES, MAX_PODS, Lookup, Place


def _holds(kernel: Kernel, place: Place, ip: str) -> bool:
    view = kernel.view(place.netns)
    return view is not None and any(str(a.ip) == ip for addrs in view.addrs.values() for a in addrs)


def _beyond(lookup: Lookup, last: Sighting | None, watched: set[str]) -> str | None:
    """The place at the other end of the cable the packet was last seen leaving by, when it was not watched
    (a pod or node beyond the capture's bounds): the packet went on where nobody looked."""
    if last is None or not last.outgoing:
        return None
    peer = lookup.peers.get((last.place.netns, last.dev))
    if peer is None or peer[0] in watched:
        return None
    place = lookup.places.get(peer[0])
    return place.name if place else peer[0]


def verdict(result: TraceResult, tracer: Tracer, forward: list[Sighting], reply: list[Sighting],
            kernel: Kernel, hits: dict[str, list[Rule]], watched: set[str] | None = None) -> None:
    """Delivered (where, and what came back), or dropped: where it was last seen, and by what. A capture
    that lost frames, or a packet that left for a place nobody watched, is said so, never a drop."""
    target, probe, source, lookup = tracer.target, tracer.probe, tracer.source, tracer.lookup
    lost = "; ".join(result.capture_lost)
    # Delivered: it entered a namespace holding its destination address (as translated by then). A node
    # that DNATs a NodePort holds the address too, so the last such arrival counts, and a pod's first.
    arrived = [s for s in forward if not s.outgoing and s.place.kind != "switch" and _holds(kernel, s.place, s.eff.dst)]
    pods = [s for s in arrived if s.place.kind == "pod"]
    arrived = pods[:1] or arrived[-1:]
    errors = [s for s in reply if s.eff.proto == "icmp" and s.eff.icmp_type not in (ICMP_ECHO, ICMP_ECHO_REPLY)]
    answer_back = [s for s in reply if s.place == source and not s.outgoing]
    result.answered = bool(answer_back) and not errors
    last = forward[-1] if forward else None
    own = own_chains(lookup, [source, *target.places, lookup.by_ip.get(last.eff.dst) if last else None])
    if arrived:
        s = arrived[0]
        result.delivered = True
        result.reached = s.place.name
        at = f"{s.eff.dst}:{s.eff.dport}" if s.eff.dport else s.eff.dst
        tail = ""
        if probe.protocol == "tcp":
            flags = next((r.eff.flags for r in reply if r.eff.proto == "tcp"), 0)
            tail = ", answered SYN-ACK" if flags & TCP_SYN else \
                f", but nothing listens on port {s.eff.dport} (RST)" if flags & TCP_RST else ", no answer came back"
        elif errors:
            tail = f", answered {icmp_error(errors[0].eff)} by {errors[0].eff.src}"
        elif reply:
            tail = ", answered"
        else:
            tail = ", no answer came back"
        rtt = f"; round trip {(probe.answered_at - probe.sent_at) * 1000:.2f} ms" \
            if probe.answered_at and result.answered else ""
        if not result.answered:
            # The answer was last seen where its journey ends, or never left the destination's node.
            spaces = {reply[-1].place.netns} if reply else \
                {s.place.netns} | ({lookup.lab.node_netns(s.place.node)} if s.place.node else set())
            sure, maybe = attribute_drops(hits, spaces, own)
            if sure:
                tail += f"; the answer was dropped by {drop_text(lookup, sure)}"
            elif maybe:
                tail += f"; possibly the answer was dropped by {drop_text(lookup, maybe)}"
        result.verdict = f"delivered to {s.place.name} ({at}){tail}{rtt}"
        if lost:
            result.verdict += f" (the capture lost frames, so hops may be missing: {lost})"
        return
    beyond = _beyond(lookup, last, watched or set())
    if probe.answer in ("connected", "reply"):
        # The source got its answer: delivered, whatever the capture missed.
        result.delivered = result.answered = True
        result.reached = beyond or ""
        why = f"it left {last.place.name} by {last.dev} towards {beyond}, which was not watched" if beyond else \
            f"the capture lost frames: {lost}" if lost else "the capture did not see it arrive"
        result.verdict = f"delivered: the source got an answer ({probe.answer}), but {why}"
        return
    # Not delivered: where it was last seen, and by what.
    where = f"{last.place.name} after {last.dev} {'out' if last.outgoing else 'in'}" if last else \
        f"{source.name}: it never left"
    reasons: list[str] = []
    if errors:
        e = errors[0].eff
        sender = lookup.by_ip.get(e.src)
        who = f"{sender.name} ({e.src})" if sender else e.src
        what = icmp_error(e)
        if e.icmp_code == 4:
            link = ""
            if sender is not None and last is not None and last.place == sender:
                got = kernel.route(sender.netns, last.eff.dst, last.eff.src, None if last.outgoing else last.dev)
                view = kernel.view(sender.netns)
                if not isinstance(got, str) and view is not None and got.dev in view.links:
                    link = f" {got.dev} (MTU {view.links[got.dev].mtu}, route {got.text()})"
            reasons.append(f"MTU: {who} answered '{what}': the packet ({last.eff.length if last else '?'} "
                           f"bytes, Don't Fragment) is larger than its next link{link}")
        elif e.icmp_code in (9, 10, 13):
            reasons.append(f"rejected: {who} answered '{what}' (a REJECT rule)")
        elif e.icmp_code in (0, 1):
            reasons.append(f"no route: {who} answered '{what}'")
        else:
            reasons.append(f"{who} answered '{what}'")
    sure, maybe = attribute_drops(hits, {last.place.netns if last else source.netns}, own)
    reasons += [f"dropped by {drop_text(lookup, [d])}" for d in sure]
    # The cilium profile drops in its programs, not by rules: the drop they reported for the probe's packet.
    ebpf = tracer.cilium.drop_reason(forward) if tracer.cilium is not None else ""
    if ebpf:
        reasons.append(ebpf)
    decided = bool(sure) or bool(ebpf)
    if last is not None and not decided:
        reasons += _path_problems(tracer, last)
    if maybe and not decided:
        reasons.append(f"possibly dropped by {drop_text(lookup, maybe)} (a drop counter moved during the "
                       "trace, for this packet or for other traffic)")
    unread = tracer.cilium.events_lost() if tracer.cilium is not None and not decided else ""
    if unread:
        reasons.append(f"possibly a drop whose event was lost: {unread} during the trace (a full ring)")
    if not forward:
        reasons += _refused_at_source(tracer)
    dropped_by = "; ".join(reasons) or "no rule counter moved and the route exists: dropped without a trace"
    if beyond and not errors and not decided:
        result.verdict = (f"NOT ANSWERED: last seen leaving {where} towards {beyond}, which was not watched "
                          f"(a trace watches at most {MAX_NODES} nodes and {MAX_PODS} pods)")
        return
    if lost and not errors and not decided:
        result.dropped_by = dropped_by
        result.verdict = (f"NOT ANSWERED: last seen at {where}, but the capture lost frames ({lost}), so it may "
                          f"have gone further; {dropped_by}")
        return
    result.dropped_at, result.dropped_by = where, dropped_by
    result.verdict = f"DROPPED at {where}: {dropped_by}"


def _path_problems(tracer: Tracer, last: Sighting) -> list[str]:
    """Why a packet last seen at `last` went no further, when no rule of its own dropped it: no route, an
    unanswered next hop, a link too small for it."""
    kernel, lookup = tracer.kernel, tracer.lookup
    reasons: list[str] = []
    # A packet in a tunnel that is not for this place is routed as the outer packet.
    p = last.packet if last.packet.encap and not _holds(kernel, last.place, last.packet.dst) else last.eff
    if last.place.kind in ("node", "router", "external", "pod") and not last.outgoing:
        got = kernel.route(last.place.netns, p.dst, p.src, last.dev)
        if isinstance(got, str):
            reasons.append(f"no route in {last.place.name}: ip route get {p.dst} from {p.src} iif {last.dev}: {got}")
        else:
            reasons += _next_hop_problem(kernel, last.place, got, p, lookup.lab.cluster.service_cidr)
    far = _too_big_for_far_end(tracer, last)
    if far:
        return reasons + [far]
    if last.place.kind == "switch" and not last.outgoing:
        port = _too_big_for_a_port(tracer, last)
        return reasons + ([port] if port else [])
    view = kernel.view(last.place.netns)
    if view is not None:
        size = last.packet.length
        small = [l for l in view.links.values() if l.name != last.dev and l.mtu and l.mtu < size
                 and l.name != "lo" and l.kind in ("vxlan", "ipip", "veth", "bridge")]
        if small:
            link = small[0]
            peer = lookup.describe_dev(last.place, link.name)
            reasons.append(f"MTU: the {size}-byte packet does not fit {link.name}"
                           f"{' (' + peer + ')' if peer else ''}, MTU {link.mtu}")
    return reasons


# What a tunnel's header is called in a verdict. The overhead itself is measured, never assumed: the captured
# outer packet minus the inner one, which for VXLAN over IPv4 is 50 bytes (outer IP 20 + UDP 8 + VXLAN 8 + the
# inner Ethernet header 14: Linux's VXLAN_HEADROOM, why Flannel gives flannel.1 the underlay's MTU minus 50,
# topo.model.VXLAN_OVERHEAD) and for IP-in-IP 20 (the outer IPv4 header, topo.model.IPIP_OVERHEAD).
_ENCAP_NAMES = {"vxlan": "VXLAN", "ipip": "IP-in-IP"}
VLAN_HLEN = 4  # is_skb_forwardable admits MTU + the link header + one VLAN tag: 4 bytes over the MTU still pass


def _too_big_for_far_end(tracer: Tracer, last: Sighting) -> str:
    """A packet seen leaving by a cable and never at its other end, because it is larger than that end's MTU.

    Every cable of a lab is a veth, and a veth hands its peer only a frame that fits the peer's MTU (the
    kernel's is_skb_forwardable); a bigger one is dropped without an ICMP error, counted as TX dropped here
    and RX dropped there: exercise 05's black hole. The size is the packet as captured on the wire (with its
    tunnel headers), the MTUs are what the kernel holds on both ends. "": not this."""
    if not last.outgoing:
        return ""
    lookup, kernel = tracer.lookup, tracer.kernel
    peer = lookup.peers.get((last.place.netns, last.dev))
    far_view = kernel.view(peer[0]) if peer is not None else None
    far_link = far_view.links.get(peer[1]) if far_view is not None and peer is not None else None
    size = last.packet.length
    if peer is None or far_link is None or not far_link.mtu or size <= far_link.mtu + VLAN_HLEN:
        return ""
    far = lookup.places.get(peer[0]) or Place(peer[0], peer[0], "")
    about = lookup.describe_dev(far, far_link.name)
    near_view = kernel.view(last.place.netns)
    near_link = near_view.links.get(last.dev) if near_view is not None else None
    near = f" (MTU {near_link.mtu})" if near_link is not None else ""
    inside, fix = _inside(last.packet, far_link.mtu)
    if near_link is not None and near_link.mtu > far_link.mtu:
        fix = f"give {far.name}'s {far_link.name} the MTU of the other end ({near_link.mtu}), or {fix}"
    show = f"ip -n {far.netns} -s link show {far_link.name}" if far.kind in ("switch", "") else \
        f"lab exec {far.name} -- ip -s link show {far_link.name}"
    return (f"MTU: the {size}-byte packet{inside} does not fit {far.name}'s {far_link.name}"
            f"{' (' + about + ')' if about else ''}, MTU {far_link.mtu}, at the other end of {last.dev}{near}: "
            "a veth passes its peer no frame larger than the peer's MTU, and nobody sends an ICMP error (a black "
            f"hole; `{show}` counts it as RX dropped); fix: {fix}")


def _inside(packet: Packet, mtu: int) -> tuple[str, str]:
    """What a packet too big for `mtu` carries (a tunnel's inner packet and header bytes, as captured) and the
    sender-side fix: a smaller overlay MTU for a tunnel's packet, else a smaller packet."""
    if not packet.encap or packet.inner is None:
        return "", f"send at most {mtu} bytes of IP"
    overhead = packet.length - packet.inner.length
    return (f" ({packet.inner.length} bytes inside + {overhead} of {_ENCAP_NAMES.get(packet.encap, packet.encap)} "
            f"encapsulation)", f"make the overlay's MTU (the tunnel device's and the pods') at most {mtu - overhead}")


def _too_big_for_a_port(tracer: Tracer, last: Sighting) -> str:
    """A frame that came into a switch and left by no port, because it is larger than the MTU of the port
    the bridge forwards it by. The bridge's own MTU only follows its smallest port (a learner's `ip link`
    shows it too, which is why naming it misled): the port is what drops (the kernel's br_dev_queue_push_xmit
    asks is_skb_forwardable of the port, then frees the frame with no counter and no ICMP error), and the
    cable from it, with the host at its other end, is what to fix. The port is the one cabled to the host
    holding the destination address (the outer one, for a tunnel's packet); when no such host is cabled
    here (a routed underlay), the first port too small for the frame. "": no port is too small for it."""
    lookup, kernel, place = tracer.lookup, tracer.kernel, last.place
    view = kernel.view(place.netns)
    if view is None:
        return ""
    size = last.packet.length
    ports = {l.name: l for l in view.links.values()
             if l.name not in (last.dev, "lo") and l.kind != "bridge" and (place.netns, l.name) in lookup.peers}
    owner = lookup.by_ip.get(last.packet.dst)
    towards = next((n for n in ports if owner is not None and lookup.peers[(place.netns, n)][0] == owner.netns), None)
    candidates = [towards] if towards else list(ports)
    port = next((ports[n] for n in candidates if ports[n].mtu and size > ports[n].mtu + VLAN_HLEN), None)
    if port is None:
        return ""
    far_ns, far_dev = lookup.peers[(place.netns, port.name)]
    far = lookup.places.get(far_ns) or Place(far_ns, far_ns, "")
    far_view = kernel.view(far_ns)
    far_link = far_view.links.get(far_dev) if far_view is not None else None
    about = [t for t in (lookup.describe_dev(far, far_dev), f"MTU {far_link.mtu}" if far_link else "") if t]
    far_text = f"{far.name}'s {far_dev}" + (f" ({', '.join(about)})" if about else "")
    desc = lookup.describe_dev(place, port.name)
    bridge = next((l.name for l in view.links.values() if l.kind == "bridge"), "")
    inside, fix = _inside(last.packet, port.mtu)
    came = view.links.get(last.dev)
    if came is not None and came.mtu > port.mtu:
        ends = f"{place.name}'s {port.name}" + (f" and {far.name}'s {far_dev}" if far_link is None or
                                                 far_link.mtu < came.mtu else "")
        fix = f"give {ends} the MTU of {last.dev}, where it came in ({came.mtu}), or {fix}"
    return (f"MTU: the {size}-byte packet{inside} does not fit {place.name}'s {port.name}"
            f"{' (' + desc + ')' if desc else ''}, MTU {port.mtu}, the cable to {far_text}: the bridge "
            f"{bridge or place.name} forwards no frame larger than the MTU of the port it leaves by, and drops it "
            f"without a counter or an ICMP error (a black hole; `ip -n {place.netns} link show {port.name}` shows "
            f"the port's MTU); fix: {fix}")


def _refused_at_source(tracer: Tracer) -> list[str]:
    """Why a probe never left: no route at the source, or its own kernel refused to send it."""
    kernel, source, target, probe = tracer.kernel, tracer.source, tracer.target, tracer.probe
    reasons = []
    refused = tracer.cilium.refusal(probe) if tracer.cilium is not None else ""
    if refused:  # the socket LB said no at connect()/sendto(): no route or MTU question arises
        return [refused]
    got = kernel.route(source.netns, str(target.ip), None, None)
    if isinstance(got, str):
        reasons.append(f"no route in {source.name} to {target.ip}: {got}")
    if probe.refused_locally:
        mtu = ""
        view = kernel.view(source.netns)
        if not isinstance(got, str) and view is not None and got.dev in view.links:
            mtu = f" ({got.dev} has MTU {view.links[got.dev].mtu})"
        what = "MTU: " if probe.refused_locally == os.strerror(errno.EMSGSIZE) else ""
        cached = kernel.route(source.netns, str(target.ip), None, None, fibmatch=False)
        if what and not isinstance(cached, str) and cached.mtu:
            mtu = (f" (the path MTU it learned for {target.ip} is {cached.mtu}: an earlier ICMP 'fragmentation "
                   "needed' is cached for about 10 minutes)")
        reasons.append(f"{what}{source.name}'s own kernel refused to send it: {probe.refused_locally}{mtu}")
    return reasons


def _next_hop_problem(kernel: Kernel, place: Place, route: RouteView, packet: Packet,
                      service_cidr: IPv4Network) -> list[str]:
    """A route exists but the packet never left: an unresolved next hop (nobody answers ARP)."""
    if route.type != "unicast":
        return [f"{route.type} route in {place.name}: {route.text()}"]
    hop = str(route.via) if route.via else packet.dst
    view = kernel.view(place.netns)
    entry = next((n for n in view.neigh if str(n.ip) == hop), None) if view else None
    if entry is not None and entry.state in ("incomplete", "failed"):
        clusterip = route.via is None and hop == packet.dst and IPv4Address(hop) in service_cidr
        return [f"{place.name} routes it by {route.text()}, but nobody answers ARP for {hop} "
                f"(neighbour {entry.state})" + (": a ClusterIP is only a rule, and no rule matches this packet"
                                                 if clusterip else "")]
    return []
