"""`lab trace` decisions without root: which destination a name means, which drop counter is the probe's,
what a capture that lost frames or a packet that left the watched area is called, and the capture's
bounds. The lab is the seed lab's model with one more pod named like its Service (`web`); kernels and
sockets are stand-ins."""
from __future__ import annotations

import struct
from datetime import datetime, timezone
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
import yaml

from apiserver import state
from observe import capture, flows, hops, packets, places, trace_cilium, verdict
from observe.capture import Probe, Sighting
from observe.flow import DROPPED, FORWARDED, TYPE_DROP, TYPE_POLICY, Flow
from observe.kernel import LinkView, NeighEntry, NsView, RouteView, Rule
from observe.places import Place
from services import endpoints
from tests.unit.test_graph import model, seed_text
from tests.unit.test_graph_trace_parsing import FakeKernel, icmp, tcp, vxlan_frame
from topo.errors import StateError

DECOY = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "decoy"}},
         "spec": {"nodeName": "node2", "containers": [{"name": "app", "image": "agnhost",
                                                       "args": ["netexec", "--http-port=8080"]}]}}


@pytest.fixture
def lookup(tmp_path: Path) -> places.Lookup:
    data = yaml.safe_load(seed_text())
    data["spec"]["objects"].append(DECOY)
    lab, running = model(yaml.safe_dump(data, sort_keys=False), tmp_path)
    pods = {f"{rp.pod.namespace}/{rp.pod.name}": state.PodState(rp.pod.node, str(rp.ip), lab.pod_netns(rp.pod), 0)
            for rp in running}
    st = state.LabState(lab.name, "up", 0, None, "", pods=pods)
    return places.Lookup(st, lab, running, endpoints.resolve(lab.services, running))


# ------------------------------------------------------------------------------------------ names

def test_a_name_both_a_pod_and_a_service_is_refused_with_the_forms_to_use(lookup: places.Lookup) -> None:
    with pytest.raises(StateError) as err:
        lookup.target("web", None)
    assert str(err.value) == ("web is both the pod default/web and the service default/web: give svc/web for the "
                              "service or pod/web for the pod")
    with pytest.raises(StateError, match="give svc/web"):
        lookup.target("web:80", None)


def test_svc_pod_and_clusterip_forms_say_which_is_meant(lookup: places.Lookup) -> None:
    endpoints_ = {"node1-pod1", "node1-pod2", "node2-pod1"}
    for text in ("svc/web", "service/default/web:80", "svc/default/web", "10.96.0.100:80"):
        t = lookup.target(text, None)
        assert (t.kind, str(t.ip), t.port, t.protocol) == ("service", "10.96.0.100", 80, "tcp"), text
        assert {p.name for p in t.places} == endpoints_, text  # never the pod named web
    pod = lookup.target("pod/web:8080", None)
    assert (pod.kind, pod.name, pod.port) == ("pod", "web", 8080)
    assert str(pod.ip) == str(lookup.pods["default/web"].ip) and pod.places == (lookup.pods["default/web"],)
    assert lookup.target("pod/default/node1-pod1", None).name == "node1-pod1"
    dns = lookup.target("kube-dns", None)  # a name only one namespace has: no form needed
    assert (dns.kind, str(dns.ip), dns.port, dns.protocol) == ("service", "10.96.0.10", 53, "udp")
    # A bare ClusterIP is pinged as given; a port no service has is no service either.
    assert (lookup.target("10.96.0.100", None).kind, lookup.target("10.96.0.100", None).places) == ("ip", ())
    assert lookup.target("10.96.0.100:81", None).kind == "ip"
    with pytest.raises(StateError, match="no service default/nosuch"):
        lookup.target("svc/nosuch", None)
    with pytest.raises(StateError, match="not in a service"):
        lookup.source("svc/web")


# ------------------------------------------------------------------------------------------ verdicts

def _place(lookup: places.Lookup, name: str) -> Place:
    return next(p for p in lookup.places.values() if p.name == name)


def _setup(lookup: places.Lookup, hits: dict[str, list[Rule]], answer: str = "", lost: list[str] | None = None,
           last_leaves: bool = False, reported: list[Flow] | None = None,
           ring_lost: dict[str, int] | None = None) -> hops.TraceResult:
    """node1-pod1 -> node2-pod1:8080, last seen coming into node2 (or leaving it to the pod). `reported`:
    the flow events a cilium lab's rings gave during the trace (then the trace reads them, as in a cilium lab)."""
    src, dst = lookup.pods["default/node1-pod1"], lookup.pods["default/node2-pod1"]
    node1, node2, switch = _place(lookup, "node1"), _place(lookup, "node2"), _place(lookup, "switch ul")
    syn = packets.parse_frame(tcp(str(src.ip), 40000, str(dst.ip), 8080, 5))
    veth_a, veth_b = lookup.veth_of[src.netns], lookup.veth_of[dst.netns]
    forward = [Sighting(src, "eth0", True, syn), Sighting(node1, veth_a, False, syn),
               Sighting(node1, "eth0", True, syn), Sighting(switch, "ul-eth0", False, syn),
               Sighting(switch, "ul-eth1", True, syn), Sighting(node2, "eth0", False, syn)]
    if last_leaves:
        forward.append(Sighting(node2, veth_b, True, syn))
    kernel = FakeKernel(RouteView(IPv4Network("10.244.2.0/24"), None, "cni0", "kernel"))
    kernel.views[node2.netns] = NsView(node2.netns, neigh=[NeighEntry("cni0", dst.ip, "", "failed")],
                                       addrs={"cni0": [IPv4Interface("10.244.2.1/24")]})
    target = places.Target("pod", dst.name, dst.ip, 8080, "tcp", None, (dst,))
    probe = Probe("tcp", dst.ip, 8080, 40000, b"tok", 0, answer=answer)
    tracer = hops.Tracer(lookup, kernel, src, target, probe, hits)
    if reported is not None:
        tracer.cilium = trace_cilium.CiliumTrace(lookup, src, target)
        tracer.cilium.events, tracer.cilium.lost = reported, ring_lost or {}
    result = hops.TraceResult("seed", src.name, dst.name, "tcp", 8080)
    result.capture_lost = lost or []
    watched = {p.netns for p in lookup.places.values()} - ({dst.netns} if last_leaves else set())
    verdict.verdict(result, tracer, forward, [], kernel, hits, watched)
    return result


def _drop(chain: str, where: str, comment: str | None = None) -> Rule:
    return Rule(where, chain, "counter drop", 1, "drop" if where.startswith("nft") else "DROP", comment)


def test_only_the_probes_own_drops_are_blamed(lookup: places.Lookup) -> None:
    node1, node2 = lookup.lab.node_netns("node1"), lookup.lab.node_netns("node2")
    other = lookup.veth_of[lookup.pods["default/web"].netns]
    mine = lookup.veth_of[lookup.pods["default/node2-pod1"].netns]
    elsewhere = {node1: [_drop("FORWARD", "iptables filter FORWARD #3", "someone else's traffic")],
                 node2: [_drop(f"cali-tw-{other}", f"nft ip calico cali-tw-{other} handle 9", "default/web ingress")]}
    r = _setup(lookup, elsewhere)
    assert r.dropped_at == "node2 after eth0 in"
    # The route analysis still runs, and the counters that moved are only possibilities.
    assert "nobody answers ARP for 10.244.2.2 (neighbour failed)" in r.dropped_by
    assert "a ClusterIP is only a rule" not in r.dropped_by  # 10.244.2.2 is no ClusterIP
    assert "possibly dropped by iptables filter FORWARD #3 in node1: someone else's traffic; " \
           f"nft ip calico cali-tw-{other} handle 9 in node2: default/web ingress" in r.dropped_by
    assert not r.dropped_by.startswith("dropped by")
    own = {**elsewhere, node2: elsewhere[node2] + [
        _drop(f"cali-tw-{mine}", f"nft ip calico cali-tw-{mine} handle 12", "default/node2-pod1 ingress: no policy")]}
    r = _setup(lookup, own)
    assert r.dropped_by == f"dropped by nft ip calico cali-tw-{mine} handle 12 in node2: default/node2-pod1 " \
                          "ingress: no policy"
    assert r.verdict.startswith("DROPPED at node2 after eth0 in: dropped by nft ip calico cali-tw-")


def test_a_capture_that_lost_frames_is_no_drop(lookup: places.Lookup) -> None:
    r = _setup(lookup, {}, lost=["node2: 12 frames dropped (capture buffer full)"])
    assert r.dropped_at == "" and not r.delivered
    assert r.verdict.startswith("NOT ANSWERED: last seen at node2 after eth0 in, but the capture lost frames "
                                "(node2: 12 frames dropped (capture buffer full))")
    r = _setup(lookup, {}, answer="connected", lost=["node2: 12 frames dropped (capture buffer full)"])
    assert r.delivered and r.answered and r.dropped_at == ""
    assert r.verdict == ("delivered: the source got an answer (connected), but the capture lost frames: "
                         "node2: 12 frames dropped (capture buffer full)")


def test_a_packet_that_left_for_an_unwatched_place_is_no_drop(lookup: places.Lookup) -> None:
    r = _setup(lookup, {}, last_leaves=True)
    veth = lookup.veth_of[lookup.pods["default/node2-pod1"].netns]
    assert r.dropped_at == "" and not r.delivered
    assert r.verdict.startswith(f"NOT ANSWERED: last seen leaving node2 after {veth} out towards node2-pod1, "
                                "which was not watched")


def _too_big(lookup: places.Lookup, far_mtu: int, wrapped: bool) -> hops.TraceResult:
    """A 1400-byte echo (1428 bytes of IP) from node1-pod1 to node2-pod1, VXLAN-wrapped between the nodes
    or not, last seen leaving the switch by the port to node2, whose eth0 has MTU `far_mtu` (exercise 05)."""
    src, dst = lookup.pods["default/node1-pod1"], lookup.pods["default/node2-pod1"]
    node1, node2, switch = _place(lookup, "node1"), _place(lookup, "node2"), _place(lookup, "switch ul")
    inner = icmp(str(src.ip), str(dst.ip), packets.ICMP_ECHO, 7, b"kubenet-trace tok".ljust(1400, b"."))
    echo, wire = packets.parse_frame(inner), packets.parse_frame(vxlan_frame(inner) if wrapped else inner)
    assert echo is not None and wire is not None and echo.length == 1428
    assert wire.length == (1478 if wrapped else 1428)
    forward = [Sighting(src, "eth0", True, echo), Sighting(node1, lookup.veth_of[src.netns], False, echo),
               Sighting(node1, "eth0", True, wire), Sighting(switch, "ul-eth0", False, wire),
               Sighting(switch, "ul-eth1", True, wire)]
    kernel = FakeKernel()
    kernel.views[switch.netns] = NsView(switch.netns, links={d: LinkView(d, "veth", True, True, 1500, "ul")
                                                               for d in ("ul-eth0", "ul-eth1", "ul-eth2")})
    kernel.views[node2.netns] = NsView(node2.netns, links={"eth0": LinkView("eth0", "veth", True, True, far_mtu)})
    target = places.Target("pod", dst.name, dst.ip, None, "icmp", None, (dst,))
    probe = Probe("icmp", dst.ip, None, 0, b"tok", 7)
    tracer = hops.Tracer(lookup, kernel, src, target, probe, {})
    result = hops.TraceResult("seed", src.name, dst.name, "icmp", None)
    verdict.verdict(result, tracer, forward, [], kernel, {}, {p.netns for p in lookup.places.values()})
    return result


def test_a_frame_larger_than_the_mtu_at_the_far_end_of_its_cable_is_named(lookup: places.Lookup) -> None:
    r = _too_big(lookup, 1400, wrapped=True)
    assert r.dropped_at == "switch ul after ul-eth1 out" and not r.delivered
    assert r.dropped_by == (
        "MTU: the 1478-byte packet (1428 bytes inside + 50 of VXLAN encapsulation) does not fit node2's eth0 "
        "(underlay NIC), MTU 1400, at the other end of ul-eth1 (MTU 1500): a veth passes its peer no frame "
        "larger than the peer's MTU, and nobody sends an ICMP error (a black hole; "
        "`lab exec node2 -- ip -s link show eth0` counts it as RX dropped); fix: give node2's eth0 the MTU of "
        "the other end (1500), or make the overlay's MTU (the tunnel device's and the pods') at most 1350")
    assert r.verdict == f"DROPPED at switch ul after ul-eth1 out: {r.dropped_by}"
    # Not wrapped (host-gw), the same link: the packet's own size, nothing about an overlay.
    r = _too_big(lookup, 1400, wrapped=False)
    assert r.dropped_by.startswith("MTU: the 1428-byte packet does not fit node2's eth0 (underlay NIC), MTU 1400,")
    assert r.dropped_by.endswith("fix: give node2's eth0 the MTU of the other end (1500), or send at most 1400 "
                                 "bytes of IP")
    # A far end that takes it is no reason: the drop stays unexplained, as before. A veth admits up to 4 bytes
    # over its MTU (room for a VLAN tag), so 1478 bytes still pass a 1474-byte end.
    for fits in (1500, 1474):
        r = _too_big(lookup, fits, wrapped=True)
        assert "MTU" not in r.dropped_by and r.dropped_by.endswith("dropped without a trace"), fits
    assert _too_big(lookup, 1473, wrapped=True).dropped_by.startswith("MTU: the 1478-byte packet")


def _switch_view(lookup: places.Lookup, port_mtu: int) -> NsView:
    """Switch ul as the kernel lists it: the bridge first (its MTU follows its smallest port), then the ports;
    ul-eth1 (to node2) at `port_mtu`, as `link: {mtu: ...}` on node2 makes it (labs/examples/mtu-black-hole)."""
    ns = _place(lookup, "switch ul").netns
    links = {"ul": LinkView("ul", "bridge", True, True, min(port_mtu, 1500))}
    links.update({d: LinkView(d, "veth", True, True, port_mtu if d == "ul-eth1" else 1500, "ul")
                  for d in ("ul-eth0", "ul-eth1", "ul-eth2")})
    return NsView(ns, links=links)


def test_a_frame_larger_than_the_switch_port_it_leaves_by_names_the_port_and_its_cable(lookup: places.Lookup) -> None:
    """labs/examples/mtu-black-hole: node2's link at 1400 makes switch ul's ul-eth1 and its bridge ul 1400; the
    1478-byte frame comes in by ul-eth0 and leaves by no port. The verdict used to name the bridge ("does not
    fit ul (port)"); the port towards the destination, the cable and its other end are what drop and what to fix."""
    src, dst = lookup.pods["default/node1-pod1"], lookup.pods["default/node2-pod1"]
    node1, node2, switch = _place(lookup, "node1"), _place(lookup, "node2"), _place(lookup, "switch ul")
    inner = icmp(str(src.ip), str(dst.ip), packets.ICMP_ECHO, 7, b"kubenet-trace tok".ljust(1400, b"."))
    echo, wire = packets.parse_frame(inner), packets.parse_frame(vxlan_frame(inner))
    assert echo is not None and wire is not None and wire.length == 1478 and wire.dst == str(node2.ip)
    forward = [Sighting(src, "eth0", True, echo), Sighting(node1, lookup.veth_of[src.netns], False, echo),
               Sighting(node1, "eth0", True, wire), Sighting(switch, "ul-eth0", False, wire)]

    def judged(port_mtu: int, far_mtu: int) -> hops.TraceResult:
        kernel = FakeKernel()
        kernel.views[switch.netns] = _switch_view(lookup, port_mtu)
        kernel.views[node2.netns] = NsView(node2.netns, links={"eth0": LinkView("eth0", "veth", True, True, far_mtu)})
        target = places.Target("pod", dst.name, dst.ip, None, "icmp", None, (dst,))
        tracer = hops.Tracer(lookup, kernel, src, target, Probe("icmp", dst.ip, None, 0, b"tok", 7), {})
        result = hops.TraceResult("seed", src.name, dst.name, "icmp", None)
        verdict.verdict(result, tracer, forward, [], kernel, {}, {p.netns for p in lookup.places.values()})
        return result

    r = judged(1400, 1400)
    assert r.dropped_at == "switch ul after ul-eth0 in" and not r.delivered
    assert r.dropped_by == (
        "MTU: the 1478-byte packet (1428 bytes inside + 50 of VXLAN encapsulation) does not fit switch ul's "
        "ul-eth1 (port to node2), MTU 1400, the cable to node2's eth0 (underlay NIC, MTU 1400): the bridge ul "
        "forwards no frame larger than the MTU of the port it leaves by, and drops it without a counter or an "
        f"ICMP error (a black hole; `ip -n {switch.netns} link show ul-eth1` shows the port's MTU); fix: give "
        "switch ul's ul-eth1 and node2's eth0 the MTU of ul-eth0, where it came in (1500), or make the overlay's "
        "MTU (the tunnel device's and the pods') at most 1350")
    assert "does not fit ul " not in r.verdict and "(port)" not in r.verdict
    # Only the switch's port is small: only it needs the MTU back.
    assert "fix: give switch ul's ul-eth1 the MTU of ul-eth0, where it came in (1500), or" in \
        judged(1400, 1500).dropped_by
    # A port that takes it (a veth admits 4 bytes over its MTU, room for a VLAN tag) is no reason.
    assert judged(1474, 1474).dropped_by.endswith("dropped without a trace")


def _policy_events(lookup: places.Lookup, dport: int = 8080) -> list[Flow]:
    """What node2's cil_to_container reports for node1-pod1's SYN to node2-pod1 when its ingress policy
    denies it (cilium/bpf/policy.h: a policy verdict, then a drop), decoded as `lab observe` decodes them."""
    names = flows.names_of(lookup.st, lookup.lab)
    src, dst = names.endpoint(str(lookup.pods["default/node1-pod1"].ip)), \
        names.endpoint(str(lookup.pods["default/node2-pod1"].ip))
    common = dict(time=datetime.now(timezone.utc), node_name="node2", source=src, destination=dst, protocol="TCP",
                  source_port=40000, destination_port=dport, tcp_flags=("SYN",), drop_reason_desc="Policy denied",
                  policies=("default/deny-web",), traffic_direction="INGRESS")
    return [Flow(verdict=FORWARDED, type=TYPE_POLICY, **{**common, "node_name": "node1", "drop_reason_desc": "",
                                                          "traffic_direction": "EGRESS", "policies": ()}),
            Flow(verdict=DROPPED, type=TYPE_POLICY, summary="policy-verdict", **common),
            Flow(verdict=DROPPED, type=TYPE_DROP, summary="Policy denied", **common)]


def test_a_cilium_policy_drop_is_named_from_the_programs_events(lookup: places.Lookup) -> None:
    """No rule counter moves in the cilium profile: the drop is what cil_to_container reported in the ring,
    matched to the probe by its tuple, with the deciding policy as `lab observe` names it."""
    veth = lookup.veth_of[lookup.pods["default/node2-pod1"].netns]
    r = _setup(lookup, {}, reported=_policy_events(lookup))
    assert r.dropped_at == "node2 after eth0 in"
    assert r.dropped_by == (
        f"dropped by cil_to_container (tc egress on {veth}, default/node2-pod1's lxc veth) in node2: Policy denied, "
        "policy-verdict:none INGRESS DENIED by default/deny-web (the first of the NetworkPolicies isolating "
        "default/node2-pod1 for ingress: none of their rules admits it); reported in node2's cilium_events, "
        "as `lab observe` shows it")
    assert "nobody answers ARP" not in r.dropped_by  # the drop is known: no route analysis
    # Another connection's drop is not the probe's; a ring that lost events makes it only a possibility.
    r = _setup(lookup, {}, reported=_policy_events(lookup, dport=9090), ring_lost={"node2": 3})
    assert "cil_to_container" not in r.dropped_by, r.dropped_by
    assert "possibly a drop whose event was lost: cilium_events on node2 lost 3 events during the trace" \
        in r.dropped_by


def test_a_clusterip_is_only_a_rule_only_inside_the_service_cidr() -> None:
    place = Place("n1", "node1", "node")
    cidr = IPv4Network("10.96.0.0/12")
    for dst, said in (("10.96.0.100", True), ("10.244.9.9", False)):
        kernel = FakeKernel()
        kernel.views["n1"] = NsView("n1", neigh=[NeighEntry("cni0", IPv4Address(dst), "", "incomplete")])
        route = RouteView(IPv4Network("10.0.0.0/8"), None, "cni0", "kernel")
        packet = packets.Packet("10.244.1.2", dst, "icmp", 84)
        text, = verdict._next_hop_problem(kernel, place, route, packet, cidr)
        assert f"nobody answers ARP for {dst}" in text and ("a ClusterIP is only a rule" in text) == said


# ------------------------------------------------------------------------------------------ capture bounds

class FloodSocket:
    """A packet socket under sustained traffic: a frame every time it is asked, and drops reported."""

    def __init__(self, drops: int = 0) -> None:
        self.frame = tcp("10.244.1.9", 5201, "10.244.2.9", 41000, 1)
        self.drops = drops

    def recvfrom(self, size: int) -> tuple[bytes, tuple]:
        return self.frame, ("eth0", 0x0800, 0, capture.ARPHRD_ETHER, b"")

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option, size) == (capture.SOL_PACKET, capture.PACKET_STATISTICS, 8)
        return struct.pack("II", 100, self.drops)


def test_reading_captures_is_bounded_and_reports_what_it_missed() -> None:
    captures = capture.Captures([], "tcp")
    a, b = Place("na", "node1", "node"), Place("nb", "node2", "node")
    captures.socks = [(a, FloodSocket(drops=3)), (b, FloodSocket())]
    seen = captures.read(budget=5.0, limit=50)
    assert len(seen) == 50 and all(s.place == a for s in seen)
    assert captures.lost == {"node1": "3 frames dropped (capture buffer full), not read to the end (a trace reads "
                                      "at most 50 frames, for 5 s)",
                             "node2": "not read to the end (a trace reads at most 50 frames, for 5 s)"}
    captures.lost = {}
    assert len(captures.read(budget=0.0, limit=50)) == 0 and set(captures.lost) == {"node1", "node2"}


def test_a_service_with_many_endpoints_is_watched_within_bounds(lookup: places.Lookup,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(places, "MAX_ENDPOINTS", 1)
    monkeypatch.setattr(places, "MAX_PODS", 2)
    source = _place(lookup, "node2")
    web = lookup.target("svc/web", None)
    watched = places.places_to_watch(lookup, source, web)
    pods = [p.name for p in watched if p.kind == "pod"]
    assert len(pods) == 2 and pods[0] == "node2-pod1"  # the endpoint on the source's node comes first
    assert {"node1", "node2", "switch ul"} <= {p.name for p in watched}
