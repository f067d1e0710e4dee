"""What `lab graph` and `lab trace` read back from the kernel, parsed without root: iptables-save text,
nft JSON, captured frames (Ethernet, IPv4, TCP/UDP/ICMP, VXLAN), and how sightings of one probe are told
apart from other traffic and put in the order the packet travelled."""
from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from observe import capture, hops, netfilter, packets
from observe import ipvs
from observe import kernel as observe
from observe.capture import Probe, Sighting
from observe.places import Place

GOLDEN = Path(__file__).resolve().parent / "golden"


# ------------------------------------------------------------------------------------------ rules

def test_iptables_save_rules_with_counters_policies_targets_and_comments() -> None:
    text = "\n".join([
        "*filter", ":INPUT ACCEPT [3:180]", ":FORWARD DROP [7:420]", ":KUBE-FORWARD - [0:0]",
        '[2:120] -A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        '[5:300] -A FORWARD -d 10.244.2.2/32 -p tcp -m comment --comment "policy default/deny web" -j DROP',
        "[0:0] -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP", "COMMIT",
        "*nat", ":PREROUTING ACCEPT [1:60]", ":KUBE-SEP-X - [0:0]",
        "[1:60] -A KUBE-SEP-X -p tcp -m tcp -j DNAT --to-destination 10.244.1.2:8080", "COMMIT"])
    rules = {r.where: r for r in observe.parse_iptables_save(text)}
    assert rules["iptables filter FORWARD policy"].packets == 7 and rules["iptables filter FORWARD policy"].drops
    assert rules["iptables filter INPUT policy"].verdict == "ACCEPT"
    jump = rules["iptables filter FORWARD #1"]
    assert (jump.verdict, jump.comment, jump.packets) == ("jump:KUBE-FORWARD", "kubernetes forwarding rules", 2)
    drop = rules["iptables filter FORWARD #2"]
    assert drop.drops and drop.comment == "policy default/deny web" and drop.packets == 5
    dnat = rules["iptables nat KUBE-SEP-X #1"]
    assert (dnat.verdict, dnat.dnat) == ("DNAT", "10.244.1.2:8080")


def test_iptables_services_follow_kube_proxys_chains() -> None:
    rules = observe.parse_iptables_save((GOLDEN / "iptables" / "clusterip-two-endpoints.rules").read_text())
    services = observe.iptables_services(rules)
    assert len(services) == 1
    (key, targets), = services.items()
    assert key[1:] == ("tcp", 80) and len(targets) == 2 and all(t.endswith(":8080") for t in targets)
    assert all(r.packets is None for r in rules if not r.where.endswith("policy"))  # saved without -c


def _nft(*objects: dict) -> dict:
    return {"nftables": [{"metainfo": {"version": "1.0.6"}}, *objects]}


def _rule(chain: str, handle: int, *expr: dict, table: str = "kube-proxy", comment: str | None = None) -> dict:
    rule = {"family": "ip", "table": table, "chain": chain, "handle": handle, "expr": list(expr)}
    if comment:
        rule["comment"] = comment
    return {"rule": rule}


SVC = "service-SUSTUHLJ-default/web/tcp/http"
EP = "endpoint-AAOQDDFY-default/web/tcp/http__10.244.2.2/8080"
NFT_DOC = _nft(
    {"map": {"family": "ip", "name": "service-ips", "table": "kube-proxy", "type": ["ipv4_addr", "inet_proto",
                                                                                    "inet_service"],
             "map": "verdict", "elem": [[{"concat": ["10.96.0.100", "tcp", 80]}, {"goto": {"target": SVC}}]]}},
    _rule(SVC, 45, {"match": {"op": "==", "left": {"numgen": {"mode": "random", "mod": 1, "offset": 0}},
                              "right": 0}}, {"goto": {"target": EP}}),
    _rule(EP, 44, {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
          {"dnat": {"addr": "10.244.2.2", "port": 8080}}),
    _rule("cali-tw-veth1", 15, {"counter": {"packets": 3, "bytes": 180}}, {"drop": None}, table="calico",
          comment="default/b ingress: no policy allows it (default/deny-b)"),
)


def test_nft_json_rules_maps_counters_and_comments() -> None:
    rules, maps = observe.parse_nft_json(NFT_DOC)
    assert maps == {"ip kube-proxy service-ips": {"10.96.0.100 . tcp . 80": f"goto {SVC}"}}
    by = {r.where: r for r in rules}
    drop = by["nft ip calico cali-tw-veth1 handle 15"]
    assert drop.drops and drop.packets == 3 and drop.comment == "default/b ingress: no policy allows it (default/deny-b)"
    assert drop.text == 'counter packets 3 drop comment "default/b ingress: no policy allows it (default/deny-b)"'
    assert by[f"nft ip kube-proxy {EP} handle 44"].dnat == "10.244.2.2:8080"
    assert by[f"nft ip kube-proxy {SVC} handle 45"].packets is None  # kube-proxy's rules carry no counters
    assert observe.nft_services(rules, maps) == {("10.96.0.100", "tcp", 80): ["10.244.2.2:8080"]}


def test_dnat_is_named_from_the_counters_that_moved() -> None:
    rules = observe.parse_iptables_save((GOLDEN / "iptables" / "clusterip-two-endpoints.rules").read_text())
    (key, targets), = observe.iptables_services(rules).items()
    chosen = targets[1]
    sep = next(r for r in rules if r.dnat == chosen)
    hit = [r for r in rules if r.where.startswith("iptables nat ") and (
        r.chain in ("PREROUTING", "KUBE-SERVICES") and (r.verdict or "").startswith("jump:KUBE-SVC") or
        r.chain == "PREROUTING" or r.verdict == f"jump:{sep.chain}" or r is sep)]
    text = netfilter.dnat_chain("unused", "iptables", hit, key, chosen)
    assert text.startswith("KUBE-SERVICES -> KUBE-SVC-") and f"-> {sep.chain}" in text
    assert "(" in text and ")" in text  # the service port's comment


# ------------------------------------------------------------------------------------------ frames

def ip_header(src: str, dst: str, proto: int, payload: bytes, df: bool = True) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000 if df else 0, 64, proto, 0,
                       IPv4Address(src).packed, IPv4Address(dst).packed) + payload


def ether(payload: bytes, dst_mac: bytes = b"\x0e\x01\x02\x03\x04\x05") -> bytes:
    return dst_mac + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + payload


def tcp(src: str, sport: int, dst: str, dport: int, seq: int, ack: int = 0, flags: int = packets.TCP_SYN) -> bytes:
    return ether(ip_header(src, dst, 6, struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 64240, 0, 0)))


def icmp(src: str, dst: str, itype: int, ident: int, payload: bytes, code: int = 0, rest: int | None = None) -> bytes:
    second = rest if rest is not None else (ident << 16) | 1
    return ether(ip_header(src, dst, 1, struct.pack("!BBHI", itype, code, 0, second) + payload))


def test_tcp_udp_and_icmp_frames_parse() -> None:
    p = packets.parse_frame(tcp("10.244.1.2", 40000, "10.96.0.100", 80, 1234))
    assert p is not None and p.form == ("tcp", "10.244.1.2", 40000, "10.96.0.100", 80) and p.seq == 1234
    assert p.summary() == "TCP 10.244.1.2:40000 > 10.96.0.100:80 [SYN]"
    echo = packets.parse_frame(icmp("10.244.1.2", "10.244.2.2", 8, 77, b"kubenet-trace abc"))
    assert echo is not None and echo.icmp_id == 77 and b"abc" in echo.payload
    assert echo.form == ("icmp", "10.244.1.2", 77, "10.244.2.2", 77)
    assert packets.parse_frame(b"\x00" * 12 + b"\x08\x06" + b"\x00" * 28) is None  # ARP


def test_vxlan_frames_are_opened_and_the_inner_packet_followed() -> None:
    inner = tcp("10.244.1.2", 40000, "10.244.2.2", 8080, 99)
    vxlan_header = bytes([0x08, 0, 0, 0]) + (1).to_bytes(3, "big") + b"\0"
    outer_udp = struct.pack("!HHHH", 51000, 8472, 8 + len(vxlan_header) + len(inner), 0) + vxlan_header + inner
    frame = ether(ip_header("192.168.1.10", "192.168.1.11", 17, outer_udp))
    p = packets.parse_frame(frame)
    assert p is not None and (p.vni, p.dport) == (1, 8472)
    assert p.inner is not None and p.inner.form == ("tcp", "10.244.1.2", 40000, "10.244.2.2", 8080)
    assert p.inner_mac == "0e:01:02:03:04:05"
    sighting = Sighting(Place("ns", "node1", "node"), "eth0", True, p)
    assert sighting.eff.seq == 99


def test_icmp_errors_carry_the_packet_they_are_about() -> None:
    quoted = ip_header("10.244.1.2", "10.244.2.2", 1, struct.pack("!BBHHH", 8, 0, 0, 77, 1))
    frame = icmp("10.244.1.1", "10.244.1.2", 3, 0, quoted, code=4, rest=1450)
    p = packets.parse_frame(frame)
    assert p is not None and packets.icmp_error(p) == "fragmentation needed (mtu 1450)"
    assert p.inner is not None and p.inner.icmp_id == 77


def test_echo_request_has_a_valid_checksum() -> None:
    packet = packets.echo_request(0x1234, b"payload!")
    assert packets._checksum(packet) == 0


# ------------------------------------------------------------------------------------------ journeys

POD_A = Place("pa", "a", "pod")
NODE1 = Place("n1", "node1", "node")
SWITCH = Place("ul", "switch ul", "switch")
NODE2 = Place("n2", "node2", "node")
POD_B = Place("pb", "b", "pod")
PEERS = {("pa", "eth0"): ("n1", "vethA"), ("n1", "vethA"): ("pa", "eth0"),
         ("n1", "eth0"): ("ul", "ul-eth0"), ("ul", "ul-eth0"): ("n1", "eth0"),
         ("n2", "eth0"): ("ul", "ul-eth1"), ("ul", "ul-eth1"): ("n2", "eth0"),
         ("pb", "eth0"): ("n2", "vethB"), ("n2", "vethB"): ("pb", "eth0")}


def _s(place: Place, dev: str, out: bool, frame: bytes) -> Sighting:
    p = packets.parse_frame(frame)
    assert p is not None
    return Sighting(place, dev, out, p)


def test_a_probe_is_found_through_nat_and_its_journey_ordered_by_the_cables() -> None:
    syn_sent = tcp("10.244.1.2", 40000, "10.96.0.100", 80, 555)
    syn_dnat = tcp("10.244.1.2", 40000, "10.244.2.2", 8080, 555)
    synack = tcp("10.244.2.2", 8080, "10.244.1.2", 40000, 9000, ack=556, flags=packets.TCP_SYN | packets.TCP_ACK)
    synack_undnat = tcp("10.96.0.100", 80, "10.244.1.2", 40000, 9000, ack=556, flags=packets.TCP_SYN | packets.TCP_ACK)
    noise = tcp("10.244.1.3", 41000, "10.244.2.2", 8080, 1)
    # Namespace by namespace, each in its socket's order (as Captures.read returns them): not in time order.
    sightings = [
        _s(NODE2, "eth0", False, syn_dnat), _s(NODE2, "vethB", True, syn_dnat),
        _s(NODE2, "vethB", False, synack), _s(NODE2, "eth0", True, synack),
        _s(POD_B, "eth0", False, syn_dnat), _s(POD_B, "eth0", True, synack),
        _s(SWITCH, "ul-eth0", False, syn_dnat), _s(SWITCH, "ul-eth1", True, syn_dnat),
        _s(SWITCH, "ul-eth1", False, synack), _s(SWITCH, "ul-eth0", True, synack),
        _s(POD_A, "eth0", True, syn_sent), _s(POD_A, "eth0", False, synack_undnat),
        _s(NODE1, "vethA", False, syn_sent), _s(NODE1, "vethA", False, noise), _s(NODE1, "eth0", True, syn_dnat),
        _s(NODE1, "eth0", False, synack), _s(NODE1, "vethA", True, synack_undnat),
    ]
    probe = Probe("tcp", IPv4Address("10.96.0.100"), 80, 40000, b"tok", 0)
    forward, reply = hops.classify(sightings, probe, POD_A)
    forward = hops.walk(forward, "pa", PEERS)
    assert [(s.place.name, s.dev, s.outgoing) for s in forward] == [
        ("a", "eth0", True), ("node1", "vethA", False), ("node1", "eth0", True), ("switch ul", "ul-eth0", False),
        ("switch ul", "ul-eth1", True), ("node2", "eth0", False), ("node2", "vethB", True), ("b", "eth0", False)]
    start = hops.origin(reply, [POD_B])
    assert start == "pb"
    reply = hops.walk(reply, start, PEERS)
    assert [(s.place.name, s.dev) for s in reply][0] == ("b", "eth0")
    assert [(s.place.name, s.dev) for s in reply][-1] == ("a", "eth0")
    assert len(reply) == 8


def test_a_retransmission_ends_the_journey() -> None:
    syn = tcp("10.244.1.2", 40000, "10.244.2.2", 8080, 7)
    sightings = [_s(POD_A, "eth0", True, syn), _s(POD_A, "eth0", True, syn), _s(NODE1, "vethA", False, syn),
                 _s(NODE1, "vethA", False, syn)]
    probe = Probe("tcp", IPv4Address("10.244.2.2"), 8080, 40000, b"tok", 0)
    forward, _ = hops.classify(sightings, probe, POD_A)
    assert len(hops.walk(forward, "pa", PEERS)) == 2


def test_icmp_errors_and_echo_replies_are_answers() -> None:
    token = b"0123456789ab"
    request = icmp("10.244.1.2", "10.244.2.2", 8, 77, b"kubenet-trace " + token)
    reply = icmp("10.244.2.2", "10.244.1.2", 0, 77, b"kubenet-trace " + token)
    quoted = ip_header("10.244.1.2", "10.244.2.2", 1, struct.pack("!BBHHH", 8, 0, 0, 77, 1))
    error = icmp("10.244.1.1", "10.244.1.2", 3, 0, quoted, code=4, rest=1450)
    other = icmp("10.244.2.2", "10.244.1.2", 0, 78, b"someone else")
    sightings = [_s(POD_A, "eth0", True, request), _s(POD_A, "eth0", False, reply),
                 _s(POD_A, "eth0", False, error), _s(POD_A, "eth0", False, other)]
    probe = Probe("icmp", IPv4Address("10.244.2.2"), None, 77, token, 77)
    forward, answers = hops.classify(sightings, probe, POD_A)
    assert len(forward) == 1 and len(answers) == 2


def test_render_lists_hops_reply_and_verdict() -> None:
    result = hops.TraceResult("seed", "node1-pod1", "web (10.96.0.100:80/tcp)", "tcp", 80)
    result.hops = [hops.Hop("node1-pod1", "out", "eth0 out", "eth0", "TCP 10.244.1.2:1 > 10.96.0.100:80 [SYN]"),
                   hops.Hop("node1", "dnat", "DNAT 10.96.0.100:80 -> 10.244.2.2:8080 by KUBE-SVC-X")]
    result.delivered, result.verdict, result.watched = True, "delivered to node2-pod1", ["node1"]
    text = hops.render(result)
    assert "  1  node1-pod1  eth0 out   TCP 10.244.1.2:1 > 10.96.0.100:80 [SYN]" in text
    assert "-> DNAT 10.96.0.100:80 -> 10.244.2.2:8080 by KUBE-SVC-X" in text
    assert "✓ delivered to node2-pod1" in text
    assert result.to_json()["hops"][1]["kind"] == "dnat"


def test_udp_probe_and_its_echoed_answer_are_told_apart() -> None:
    token = b"0123456789ab"
    sent = packets.UDP_MARK + token
    request = ether(ip_header("10.244.1.2", "10.244.2.2", 17, struct.pack("!HHHH", 40000, 8080, 8 + len(sent), 0) + sent))
    answer = sent[len(b"echo "):]  # agnhost netexec answers "echo X" with X
    back = ether(ip_header("10.244.2.2", "10.244.1.2", 17, struct.pack("!HHHH", 8080, 40000, 8 + len(answer), 0) + answer))
    probe = Probe("udp", IPv4Address("10.244.2.2"), 8080, 40000, token, 0)
    forward, reply = hops.classify([_s(POD_A, "eth0", True, request), _s(POD_A, "eth0", False, back)], probe, POD_A)
    assert [s.outgoing for s in forward] == [True] and [s.outgoing for s in reply] == [False]


# ------------------------------------------------------------------------------------------ IP-in-IP

def ipip_frame(outer_src: str, outer_dst: str, inner: bytes) -> bytes:
    return ether(ip_header(outer_src, outer_dst, 4, inner[14:]))  # the inner IPv4 packet, without Ethernet


def test_ip_in_ip_packets_are_opened_and_the_inner_packet_followed() -> None:
    inner = tcp("10.244.1.2", 40000, "10.244.3.2", 8080, 99)
    p = packets.parse_frame(ipip_frame("192.168.1.10", "192.168.2.10", inner))
    assert p is not None and (p.proto, p.encap, p.src, p.dst) == ("ipip", "ipip", "192.168.1.10", "192.168.2.10")
    assert p.inner is not None and p.inner.form == ("tcp", "10.244.1.2", 40000, "10.244.3.2", 8080)
    assert p.summary() == "IPIP 192.168.1.10 > 192.168.2.10 (proto 4)"
    assert Sighting(NODE1, "eth0", True, p).eff.seq == 99
    # On tunl0 itself a packet has no link-layer header: parse_ip reads it as it comes.
    assert packets.parse_ip(inner[14:]).form == p.inner.form


class FakeKernel:
    """Answers `ip route get` with a fixed route and has no views (nothing bridged, nothing held)."""

    def __init__(self, route: observe.RouteView | str = observe.RouteView(
            IPv4Network("10.244.3.0/24"), IPv4Address("192.168.2.10"), "tunl0", "bgp", onlink=True)) -> None:
        self.answer = route
        self.views: dict[str, observe.NsView] = {}

    def view(self, ns: str) -> observe.NsView | None:
        return self.views.get(ns)

    def route(self, ns: str, dst: str, src: str | None, iif: str | None, fibmatch: bool = True):
        return self.answer


class FakeLookup:
    lab = None

    def describe_dev(self, place: Place, dev: str) -> str:
        return ""


def test_the_ip_in_ip_hop_names_the_outer_addresses_and_proto_4() -> None:
    inner = tcp("10.244.1.2", 40000, "10.244.3.2", 8080, 7)
    outer = ipip_frame("192.168.1.10", "192.168.2.10", inner)
    node3 = Place("n3", "node3", "node")
    on_tunl0 = packets.parse_ip(inner[14:])
    sightings = [_s(NODE1, "vethA", False, inner), Sighting(NODE1, "tunl0", True, on_tunl0),
                 _s(NODE1, "eth0", True, outer), _s(node3, "eth0", False, outer),
                 Sighting(node3, "tunl0", False, on_tunl0), _s(node3, "vethC", True, inner)]
    probe = Probe("tcp", IPv4Address("10.244.3.2"), 8080, 40000, b"tok", 0)
    tracer = hops.Tracer(FakeLookup(), FakeKernel(), POD_A, None, probe, {})
    journey = tracer.hops(sightings, reply=False)
    encap = [h for h in journey if h.kind == "encap"]
    assert len(encap) == 1 and encap[0].place == "node1" and encap[0].dev == "tunl0"
    assert encap[0].detail == {"outer_src": "192.168.1.10", "outer_dst": "192.168.2.10", "proto": 4}
    decap = [h for h in journey if h.kind == "decap"]
    assert len(decap) == 1 and decap[0].place == "node3" and decap[0].detail["proto"] == 4
    wire = next(h for h in journey if h.kind == "out" and h.dev == "eth0")
    assert wire.packet.startswith("IPIP 192.168.1.10 > 192.168.2.10 (proto 4) carrying TCP 10.244.1.2:40000")
    assert wire.detail == {"outer_src": "192.168.1.10", "outer_dst": "192.168.2.10", "proto": 4}
    route = next(h for h in journey if h.kind == "route" and h.place == "node1")
    assert route.text == "route 10.244.3.0/24 via 192.168.2.10 dev tunl0 proto bgp onlink"


# ------------------------------------------------------------------------------------------ capture filter

SKF_AD_OFF, SKF_NET_OFF = -0x1000, -0x100000


def run_filter(program: list[tuple[int, int, int, int]], frame: bytes, net: int = 14) -> int:
    """A classic BPF interpreter for the instructions capture_filter uses: what the kernel would keep of
    `frame` (0: nothing). `net` is where the network header starts (14 after Ethernet, 0 on tunl0)."""
    a = x = 0
    mem = [0] * 16
    protocol = struct.unpack_from("!H", frame, 12)[0] if net == 14 else 0x0800

    def load(k: int, size: int) -> int | None:
        k = k - 0x1_0000_0000 if k >= 0x8000_0000 else k
        if SKF_AD_OFF <= k < 0:
            return protocol
        offset = k - SKF_NET_OFF + net if k < SKF_AD_OFF else k
        if offset + size > len(frame):
            return None
        return int.from_bytes(frame[offset:offset + size], "big")

    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code in (0x28, 0x30, 0x48, 0x50):  # ld h/b, absolute or indirect
            size = 2 if code in (0x28, 0x48) else 1
            value = load((k + (x if code in (0x48, 0x50) else 0)) & 0xFFFFFFFF, size)
            if value is None:
                return 0  # out of the packet: the kernel drops it
            a = value
        elif code == 0x60:
            a = mem[k]
        elif code == 0x02:
            mem[k] = a
        elif code == 0x54:
            a &= k
        elif code == 0x64:
            a = (a << k) & 0xFFFFFFFF
        elif code == 0x0C:
            a = (a + x) & 0xFFFFFFFF
        elif code == 0x07:
            x = a
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x45:
            pc += jt if a & k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")


def vxlan_frame(inner: bytes) -> bytes:
    header = bytes([0x08, 0, 0, 0]) + (1).to_bytes(3, "big") + b"\0"
    udp = struct.pack("!HHHH", 51000, 8472, 8 + len(header) + len(inner), 0) + header + inner
    return ether(ip_header("192.168.1.10", "192.168.1.11", 17, udp))


def udp_frame(sport: int, dport: int, payload: bytes = b"x" * 32) -> bytes:
    return ether(ip_header("10.244.1.2", "10.244.2.2", 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
                           + payload))


def test_the_capture_filter_keeps_what_a_trace_reads_and_nothing_else() -> None:
    tcp_filter, udp_filter, icmp_filter = (capture.capture_filter(p) for p in ("tcp", "udp", "icmp"))
    syn = tcp("10.244.1.2", 40000, "10.244.2.2", 8080, 1)
    synack = tcp("10.244.2.2", 8080, "10.244.1.2", 40000, 9, ack=2, flags=packets.TCP_SYN | packets.TCP_ACK)
    rst = tcp("10.244.2.2", 8080, "10.244.1.2", 40000, 0, ack=2, flags=packets.TCP_RST | packets.TCP_ACK)
    data = tcp("10.244.1.9", 5201, "10.244.2.9", 41000, 5, ack=6, flags=packets.TCP_ACK | packets.TCP_PSH)  # iperf
    echo = icmp("10.244.1.2", "10.244.2.2", 8, 77, b"kubenet-trace x")
    quoted = ip_header("10.244.1.2", "10.244.2.2", 6, b"\0" * 8)
    error = icmp("10.244.1.1", "10.244.1.2", 3, 0, quoted, code=4, rest=1450)
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + b"\0" * 28
    ipv6 = b"\xff" * 6 + b"\x02" * 6 + b"\x86\xdd" + b"\x60" + b"\0" * 39
    kept = {name: bool(run_filter(tcp_filter, frame)) for name, frame in (
        ("syn", syn), ("synack", synack), ("rst", rst), ("data", data), ("echo", echo), ("error", error),
        ("udp", udp_frame(40000, 53)), ("arp", arp), ("ipv6", ipv6),
        ("vxlan syn", vxlan_frame(syn)), ("vxlan data", vxlan_frame(data)), ("vxlan arp", vxlan_frame(arp)),
        ("ipip syn", ipip_frame("192.168.1.10", "192.168.2.10", syn)),
        ("ipip data", ipip_frame("192.168.1.10", "192.168.2.10", data)))}
    assert kept == {"syn": True, "synack": True, "rst": True, "data": False, "echo": True, "error": True,
                    "udp": False, "arp": False, "ipv6": False, "vxlan syn": True, "vxlan data": False,
                    "vxlan arp": False, "ipip syn": True, "ipip data": False}
    assert run_filter(tcp_filter, syn[14:], net=0) and not run_filter(tcp_filter, data[14:], net=0)  # tunl0
    assert run_filter(udp_filter, udp_frame(40000, 8080)) and run_filter(udp_filter, vxlan_frame(udp_frame(1, 2)))
    assert not run_filter(udp_filter, syn) and run_filter(udp_filter, echo)
    assert run_filter(icmp_filter, echo) and run_filter(icmp_filter, vxlan_frame(echo))
    assert not run_filter(icmp_filter, syn) and not run_filter(icmp_filter, udp_frame(1, 2))
    assert not run_filter(icmp_filter, vxlan_frame(syn))
    assert all(jt < 256 and jf < 256 for _, jt, jf, _ in tcp_filter)


# ------------------------------------------------------------------------------------------ IPVS

PROC_IP_VS = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A600064:0050 rr 
  -> 0AF40202:1F90      Masq    1      0          0         
  -> 0AF40102:1F90      Masq    1      0          1         
UDP  0A60000A:0035 rr persistent 10800 FFFFFFFF
  -> 0AF40203:0035      Masq    1      0          0         
TCP  C0A8010B:7580 rr 
FWM  00000001 rr 
  -> 0AF40102:1F90      Masq    1      0          0         
"""

IPVSADM_LN = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  10.96.0.100:80 rr
  -> 10.244.1.2:8080              Masq    1      0          1         
  -> 10.244.2.2:8080              Masq    1      0          0         
UDP  10.96.0.10:53 rr persistent 10800
  -> 10.244.2.3:53                Masq    1      0          0         
TCP  192.168.1.11:30080 rr
"""


def test_the_ipvs_table_is_read_from_proc_and_from_ipvsadm() -> None:
    proc = ipvs.parse_ip_vs(PROC_IP_VS)
    assert [(v.protocol, v.ip, v.port, v.scheduler) for v in proc] == [
        ("tcp", "10.96.0.100", 80, "rr"), ("udp", "10.96.0.10", 53, "rr"), ("tcp", "192.168.1.11", 30080, "rr")]
    assert proc[0].reals == (("10.244.2.2:8080", "Masq"), ("10.244.1.2:8080", "Masq"))
    assert proc[2].reals == ()  # a NodePort without endpoints; the firewall-mark service is left out
    assert ipvs.ipvs_services(proc) == {("10.96.0.100", "tcp", 80): ["10.244.2.2:8080", "10.244.1.2:8080"],
                                           ("10.96.0.10", "udp", 53): ["10.244.2.3:53"],
                                           ("192.168.1.11", "tcp", 30080): []}
    shown = ipvs.ipvs_services(ipvs.parse_ip_vs(IPVSADM_LN))
    assert shown[("10.96.0.100", "tcp", 80)] == ["10.244.1.2:8080", "10.244.2.2:8080"]
    assert set(shown) == set(ipvs.ipvs_services(proc))
    assert ipvs.parse_ip_vs("") == []


def test_a_udp_probe_to_port_53_is_a_dns_query_and_its_answer_is_told_apart() -> None:
    """A UDP probe to a DNS server is a real query (so CoreDNS answers it); the answer echoes the question,
    token and all, and must still count as the reply, never as the probe."""
    token = b"0123456789ab"
    query = capture.dns_query(token, "cluster.local")
    assert query[12:13] == bytes([26]) and b"\x07cluster\x05local\x00" in query and query.endswith(b"\x00\x01\x00\x01")
    assert capture.is_dns_query(query, token) and not capture.is_dns_query(query, b"ffffffffffff")
    answer = query[:2] + b"\x81\x83" + query[4:]  # QR, RD, RA, NXDOMAIN: the question echoed
    assert not capture.is_dns_query(answer, token)
    request = ether(ip_header("10.244.1.2", "10.244.2.3", 17, struct.pack("!HHHH", 40000, 53, 8 + len(query), 0) + query))
    back = ether(ip_header("10.244.2.3", "10.244.1.2", 17, struct.pack("!HHHH", 53, 40000, 8 + len(answer), 0) + answer))
    probe = Probe("udp", IPv4Address("10.96.0.10"), 53, 40000, token, 0)
    forward, reply = hops.classify([_s(POD_A, "eth0", True, request), _s(POD_A, "eth0", False, back)], probe, POD_A)
    assert [s.outgoing for s in forward] == [True] and [s.outgoing for s in reply] == [False]


def test_the_cilium_trace_explains_a_refused_connect_from_the_frontends_slots(monkeypatch) -> None:
    """A frontend whose slot 0 counts more backends than its slots name: a deleted slot and a slot naming
    a backend id the backends map lacks are both named, and a refused connect() (EPERM) says so."""
    import errno
    from types import SimpleNamespace

    from cilium import maps
    from observe import trace_cilium
    from observe.places import Target

    lookup = SimpleNamespace(st=SimpleNamespace(name="lab1"), lab=SimpleNamespace(nodes=[]))
    target = Target("service", "web", IPv4Address("10.96.0.100"), 80, "tcp")
    ct = trace_cilium.CiliumTrace(lookup, Place("pa", "a", "pod", node="node2"), target)  # type: ignore[arg-type]
    monkeypatch.setattr(trace_cilium.CiliumTrace, "socket_lb", lambda self: True)
    fe = maps.Frontend(IPv4Address("10.96.0.100"), 80, maps.PROTOCOLS["tcp"])
    backend = maps.Backend(IPv4Address("10.244.1.2"), 8080, maps.PROTOCOLS["tcp"])
    ct.nodes["node2"] = trace_cilium.NodeMaps({fe: {0: (0, 3, 1, 0), 2: (7, 0, 1, 0), 3: (9, 0, 1, 0)}},
                                              {7: backend}, [])
    holes = ct.holes()
    assert "frontend 10.96.0.100:80/TCP has 3 backends in slot 0" in holes
    assert "slot 1 of 3 is missing from node2's cilium_lb4_services_v2" in holes
    assert "slot 3 names backend id 9, which cilium_lb4_backends_v3 does not hold" in holes
    refused = Probe("tcp", target.ip, 80, 0, b"t", 0, refused_errno=errno.EPERM, hook="connect4")
    text = ct.refusal(refused)
    assert text.startswith("the socket LB refused connect() (Operation not permitted, no packet was sent): "
                           "cil_sock4_connect (cgroup/connect4) on node2 picked a slot at random in 1..3")
    assert holes in text
    assert ct.refusal(Probe("tcp", target.ip, 80, 0, b"t", 0, refused_errno=errno.EMSGSIZE)) == ""
    ct.nodes["node2"].slots[fe] = {0: (0, 1, 1, 0), 1: (7, 0, 1, 0)}
    assert ct.holes() == ""  # whole again
