"""`lab trace`'s text for a pod reaching a Service through its own node's bridge, from constructed
sightings: the seed lab's node1-pod1 to svc/web, DNATed to itself (hairpin) or to node1-pod2.

The pod sends to its gateway (cni0's MAC: the ClusterIP is not on its subnet), so the node routes the
packet; with br_netfilter the kernel shows it either bridged straight back out of a port (the neighbour's
header was cached) or leaving by cni0 first (it was not). Both are the same routing, and the trace must say
so the same way each time: never "layer 2, no routing"."""
from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from observe import hops, packets, places
from observe.capture import Probe, Sighting
from observe.kernel import LinkView, NsView, RouteView, Rule
from observe.places import Place
from tests.unit.test_graph_trace_parsing import FakeKernel, ether, ip_header
from tests.unit.test_graph_trace_verdicts import lookup  # noqa: F401  (the seed lab's model, a fixture)

CNI0_MAC = b"\x0a\x58\x0a\xf4\x01\x01"
POD1_MAC, POD2_MAC = b"\x0e\x00\x00\x00\x01\x02", b"\x0e\x00\x00\x00\x01\x03"
VIP, GATEWAY, POD1, POD2 = "10.96.0.100", "10.244.1.1", "10.244.1.2", "10.244.1.3"
SPORT, MASQ_PORT, ISN = 40000, 5000, 7


def _tcp(mac: bytes, src: str, sport: int, dst: str, dport: int, reply: bool = False) -> packets.Packet:
    flags = packets.TCP_SYN | (packets.TCP_ACK if reply else 0)
    seq, ack = (99, ISN + 1) if reply else (ISN, 0)
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 64240, 0, 0)
    p = packets.parse_frame(ether(ip_header(src, dst, 6, header), mac))
    assert p is not None
    return p


def _hits(endpoint: str) -> list[Rule]:
    """The iptables counters that moved: KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP's DNAT, and the hairpin's
    masquerade in KUBE-POSTROUTING."""
    nat = "iptables nat "
    return [Rule(nat + "PREROUTING #1", "PREROUTING", "", 1, "jump:KUBE-SERVICES"),
            Rule(nat + "KUBE-SERVICES #1", "KUBE-SERVICES", "", 1, "jump:KUBE-SVC-WEB"),
            Rule(nat + "KUBE-SVC-WEB #1", "KUBE-SVC-WEB", "", 1, "jump:KUBE-SEP-ONE", "default/web:http"),
            Rule(nat + "KUBE-SEP-ONE #2", "KUBE-SEP-ONE", "", 1, "DNAT", "default/web:http", endpoint),
            Rule(nat + "KUBE-POSTROUTING #3", "KUBE-POSTROUTING", "", 1, "MASQUERADE",
                 "kubernetes service traffic requiring SNAT")]


def _tracer(lookup: places.Lookup, endpoint: str) -> tuple[hops.Tracer, Place, Place, str, str]:
    src, pod2 = lookup.pods["default/node1-pod1"], lookup.pods["default/node1-pod2"]
    node1 = next(p for p in lookup.places.values() if p.name == "node1")
    veth1, veth2 = lookup.veth_of[src.netns], lookup.veth_of[pod2.netns]
    kernel = FakeKernel(RouteView(IPv4Network("10.244.1.0/24"), None, "cni0", "kernel"))
    kernel.views[node1.netns] = NsView(node1.netns, links={
        "cni0": LinkView("cni0", "bridge", True, True, 1500, mac=":".join(f"{b:02x}" for b in CNI0_MAC)),
        veth1: LinkView(veth1, "veth", True, True, 1500, "cni0"),
        veth2: LinkView(veth2, "veth", True, True, 1500, "cni0")},
        addrs={"cni0": [IPv4Interface(f"{GATEWAY}/24")]})
    target = places.Target("service", "default/web", IPv4Address(VIP), 80, "tcp", None, (src, pod2))
    probe = Probe("tcp", IPv4Address(VIP), 80, SPORT, b"tok", 0)
    return hops.Tracer(lookup, kernel, src, target, probe, {node1.netns: _hits(endpoint)}), src, node1, veth1, veth2


def _between_texts(journey: list[hops.Hop]) -> list[tuple[str, str]]:
    """What the trace says happened between the captures: the hops a learner reads as the explanation."""
    return [(h.kind, h.text) for h in journey if h.kind not in ("in", "out")]


def _both_ways(src, node, in_dev: str, out_dev: str, dst, first: packets.Packet, last: packets.Packet,
               via_cni0: packets.Packet) -> list[list[Sighting]]:
    """One journey through a node as the kernel may show it: bridged from port to port (br_netfilter reused
    the neighbour's cached header), or leaving by cni0 first (it did not)."""
    bridged = [Sighting(src, "eth0", True, first), Sighting(node, in_dev, False, first),
               Sighting(node, out_dev, True, last), Sighting(dst, "eth0", False, last)]
    return [bridged, bridged[:2] + [Sighting(node, "cni0", True, via_cni0)] + bridged[2:]]


def test_a_pod_reaching_itself_through_a_service_is_routed_back_out_its_port_hairpin(
        lookup: places.Lookup) -> None:
    tracer, src, node1, veth, _ = _tracer(lookup, f"{POD1}:8080")
    sent = _tcp(CNI0_MAC, POD1, SPORT, VIP, 80)
    dnatted = _tcp(POD1_MAC, POD1, SPORT, POD1, 8080)
    masqueraded = _tcp(POD1_MAC, GATEWAY, MASQ_PORT, POD1, 8080)
    said = [_between_texts(tracer.hops(journey, reply=False))
            for journey in _both_ways(src, node1, veth, veth, src, sent, masqueraded, dnatted)]
    for texts in said:
        assert not [t for kind, t in texts if kind == "bridge" or "no routing" in t], texts
        assert [kind for kind, _ in texts] == ["route", "dnat", "route", "snat"], texts
        route = texts[2][1]
        assert route.startswith("route 10.244.1.0/24 dev cni0 proto kernel")
        assert f"back out of cni0 by {veth}, the port it came in by (hairpin)" in route, route
    assert said[0] == said[1]  # one description, whichever way the kernel showed it

    answer = _tcp(CNI0_MAC, POD1, 8080, GATEWAY, MASQ_PORT, reply=True)  # to the node's address: its MAC
    unsnat = _tcp(POD1_MAC, POD1, 8080, POD1, SPORT, reply=True)
    back = _tcp(POD1_MAC, VIP, 80, POD1, SPORT, reply=True)
    said = [_between_texts(tracer.hops(journey, reply=True))
            for journey in _both_ways(src, node1, veth, veth, src, answer, back, unsnat)]
    for texts in said:
        assert [kind for kind, _ in texts] == ["un-nat", "route", "un-nat"], texts
        assert "(hairpin)" in texts[1][1] and "no routing" not in texts[1][1]
    assert said[0] == said[1]


def test_a_service_dnat_to_a_pod_on_the_same_bridge_is_routed_and_its_answer_bridged(
        lookup: places.Lookup) -> None:
    tracer, src, node1, veth1, veth2 = _tracer(lookup, f"{POD2}:8080")
    pod2 = lookup.pods["default/node1-pod2"]
    sent = _tcp(CNI0_MAC, POD1, SPORT, VIP, 80)
    dnatted = _tcp(POD2_MAC, POD1, SPORT, POD2, 8080)
    said = [_between_texts(tracer.hops(journey, reply=False))
            for journey in _both_ways(src, node1, veth1, veth2, pod2, sent, dnatted, dnatted)]
    for texts in said:
        assert [kind for kind, _ in texts] == ["route", "dnat", "route"], texts
        assert texts[2][1] == "route 10.244.1.0/24 dev cni0 proto kernel"
    assert said[0] == said[1]
    # The answer goes straight to node1-pod1's MAC (same subnet): the bridge forwards it, and conntrack
    # undoes the DNAT on the way (br_netfilter): that one is layer 2.
    answer = _tcp(POD1_MAC, POD2, 8080, POD1, SPORT, reply=True)
    back = _tcp(POD1_MAC, VIP, 80, POD1, SPORT, reply=True)
    texts = _between_texts(tracer.hops([Sighting(pod2, "eth0", True, answer), Sighting(node1, veth2, False, answer),
                                        Sighting(node1, veth1, True, back)], reply=True))
    assert [kind for kind, _ in texts] == ["bridge", "un-nat"], texts
    assert texts[0][1] == f"cni0 forwards the frame {veth2} -> {veth1} (layer 2, no routing)"
