"""`lab observe` without a lab: naming, filters, Hubble's compact line and JSON, and the decoding of each
source's raw events (conntrack and NFLOG netlink messages, cilium_events records, DNS frames)."""
from __future__ import annotations

import dataclasses
import socket
import struct
from datetime import datetime, timezone
from ipaddress import IPv4Network

import pytest

from cilium import events
from observe import flows, flows_cilium, flows_ct, flows_dns
from observe.flow import (DROPPED, FORWARDED, TRACED, TRANSLATED, TYPE_DNS, TYPE_DROP, TYPE_POLICY, TYPE_TRACE,
                          Dns, Flow, Service)
from topo.errors import StateError

T0 = datetime(2026, 12, 5, 18, 0, 0, 123000, tzinfo=timezone.utc)


def names() -> flows.Names:
    return flows.Names(
        pods={"10.244.1.2": ("default", "node1-pod1", ("app=web",)), "10.244.2.2": ("default", "node2-pod1", ("app=web",)),
              "10.244.2.3": ("kube-system", "coredns", ("k8s-app=kube-dns",))},
        hosts={"192.168.1.10": "node1", "192.168.1.11": "node2", "192.168.1.200": "external-web"},
        services={("10.96.0.100", 80, "TCP"): Service("web", "default"),
                  ("10.96.0.10", 53, "UDP"): Service("kube-dns", "kube-system"),
                  ("192.168.1.10", 30080, "TCP"): Service("web", "default")},
        pod_cidr=IPv4Network("10.244.0.0/16"))


def flow(**kw) -> Flow:
    n = names()
    base = dict(time=T0, verdict=FORWARDED, type=TYPE_TRACE, node_name="node1", source=n.endpoint("10.244.1.2"),
                destination=n.endpoint("10.244.2.2"), protocol="TCP", source_port=40000, destination_port=8080,
                tcp_flags=("SYN",))
    base.update(kw)
    return Flow(**base)


# ---- names -------------------------------------------------------------------------------------

def test_addresses_are_named_as_pods_hosts_services_or_the_world() -> None:
    n = names()
    assert n.endpoint("10.244.1.2").label() == "default/node1-pod1"
    assert n.endpoint("192.168.1.11").label() == "node2"
    assert n.endpoint("10.96.0.100").label() == "svc/default/web"
    assert n.endpoint("8.8.8.8").label() == "8.8.8.8"
    assert n.service("192.168.1.10", 30080, "TCP") == Service("web", "default")  # a NodePort frontend
    assert n.is_lab("10.96.0.10") and not n.is_lab("192.168.1.10")


# ---- filters -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,passes", [
    ({"pod": "node1-pod1"}, True), ({"pod": "default/node2"}, True), ({"pod": "kube-system/node1-pod1"}, False),
    ({"from_pod": "node1-pod1"}, True), ({"from_pod": "node2-pod1"}, False), ({"to_pod": "node2-pod1"}, True),
    ({"namespace": "default"}, True), ({"namespace": "kube-system"}, False),
    ({"port": 8080}, True), ({"port": 40000}, True), ({"port": 80}, False),
    ({"protocol": "tcp"}, True), ({"protocol": "udp"}, False),
    ({"verdict": "FORWARDED"}, True), ({"verdict": "DROPPED"}, False),
    ({"type": "l3-l4"}, True), ({"type": "drop"}, False), ({"type": "dns"}, False), ({"type": "trace"}, True),
    ({"to_service": "web"}, False),
])
def test_filters_match_like_hubble_observe(kw: dict, passes: bool) -> None:
    assert flows.Filters.parse(**kw).match(flow()) is passes


def test_service_filters_match_the_service_and_its_port() -> None:
    f = flow(verdict=TRANSLATED, destination_service=Service("web", "default"), original_destination="10.96.0.100:80")
    assert flows.Filters.parse(to_service="web").match(f)
    assert flows.Filters.parse(to_service="default/web").match(f)
    assert not flows.Filters.parse(to_service="kube-system/web").match(f)
    assert flows.Filters.parse(port=80).match(f)  # the Service's port counts too
    assert flows.Filters.parse(verdict="translated").match(f)


@pytest.mark.parametrize("kw,message", [
    ({"port": 0}, "out of range"), ({"protocol": "sctp"}, "--protocol"), ({"verdict": "MAYBE"}, "--verdict"),
    ({"type": "capture"}, "--type"), ({"pod": "Bad_Name"}, "--pod"), ({"namespace": "a/b"}, "--namespace"),
])
def test_bad_filters_are_refused_in_one_line(kw: dict, message: str) -> None:
    with pytest.raises(StateError, match=message):
        flows.Filters.parse(**kw)


def test_durations() -> None:
    assert flows.parse_since("10s") == 10 and flows.parse_since("500ms") == 0.5 and flows.parse_since("2m") == 120
    with pytest.raises(StateError, match="duration"):
        flows.parse_since("soon")
    # the message names the flag the bad value came in (`lab observe --duration banana` said --since)
    with pytest.raises(StateError, match=r"^--duration 'banana': want a duration"):
        flows.parse_since("banana", "--duration")


# ---- printing ----------------------------------------------------------------------------------

def test_compact_line_is_hubbles() -> None:
    line = flows.compact(flow(trace_observation_point="to-endpoint"))
    assert line.endswith(": default/node1-pod1:40000 (pod) -> default/node2-pod1:8080 (pod) to-endpoint FORWARDED "
                         "(TCP Flags: SYN)")
    assert "[node1]" in flows.compact(flow(), with_node=True)


def test_a_drop_says_why_and_which_policy() -> None:
    f = flow(verdict=DROPPED, type=TYPE_DROP, drop_reason_desc="Policy denied", policies=("default/deny-web",),
             traffic_direction="INGRESS")
    assert "Policy denied DROPPED (TCP Flags: SYN) by default/deny-web" in flows.compact(f)
    data = flows.to_json(f)["flow"]
    assert data["drop_reason_desc"] == "POLICY_DENIED"
    assert data["ingress_denied_by"] == [{"name": "deny-web", "namespace": "default", "kind": "NetworkPolicy"}]


def test_a_translated_flow_names_the_service_and_the_backend() -> None:
    f = flow(verdict=TRANSLATED, destination_service=Service("web", "default"), original_destination="10.96.0.100:80")
    assert "-> default/node2-pod1:8080 (pod) via svc default/web (10.96.0.100:80)" in flows.compact(f)
    data = flows.to_json(f)["flow"]
    assert data["destination_service"] == {"name": "web", "namespace": "default"}
    assert data["destination"]["pod_name"] == "node2-pod1"


def test_a_reply_keeps_the_client_on_the_left() -> None:
    n = names()
    f = flow(source=n.endpoint("10.244.2.2"), destination=n.endpoint("10.244.1.2"), source_port=8080,
             destination_port=40000, is_reply=True, tcp_flags=("SYN", "ACK"))
    assert "default/node1-pod1:40000 (pod) <- default/node2-pod1:8080 (pod)" in flows.compact(f)


def test_dns_lines_and_json() -> None:
    n = names()
    q = flow(type=TYPE_DNS, protocol="UDP", destination=n.endpoint("10.244.2.3"), destination_port=53, tcp_flags=(),
             dns=Dns("api.example.com.default.svc.cluster.local.", ("A",)))
    assert "dns-request FORWARDED (DNS Query api.example.com.default.svc.cluster.local. A)" in flows.compact(q)
    a = flow(type=TYPE_DNS, protocol="UDP", source=n.endpoint("10.244.2.3"), source_port=53,
             destination=n.endpoint("10.244.1.2"), destination_port=40000, tcp_flags=(), is_reply=True,
             dns=Dns("api.example.com.", ("A",), ("192.168.1.200",), 0, True))
    assert 'dns-response FORWARDED (DNS Answer "192.168.1.200" (Query api.example.com. A))' in flows.compact(a)
    nx = flow(type=TYPE_DNS, protocol="UDP", dns=Dns("x.cluster.local.", ("AAAA",), (), 3, True), tcp_flags=())
    assert "RCode: Non-Existent Domain" in flows.compact(nx)
    data = flows.to_json(nx)["flow"]
    assert data["Type"] == "L7" and data["l7"]["dns"] == {"query": "x.cluster.local.", "ips": [], "rcode": 3,
                                                          "qtypes": ["AAAA"]}
    assert flows.Filters.parse(type="dns").match(nx) and not flows.Filters.parse(type="l3-l4").match(nx)


def test_json_has_hubbles_keys_and_reads_back() -> None:
    f = flow(verdict=TRANSLATED, destination_service=Service("web", "default"), original_destination="10.96.0.100:80",
             trace_observation_point="post-xlate-fwd", extra={"snat": "192.168.1.10:40000"})
    data = flows.to_json(f)
    assert set(data) == {"flow", "node_name", "time"} and data["time"] == "2026-12-05T18:00:00.123000Z"
    fl = data["flow"]
    assert fl["IP"] == {"source": "10.244.1.2", "destination": "10.244.2.2", "ipVersion": "IPv4"}
    assert fl["l4"] == {"TCP": {"source_port": 40000, "destination_port": 8080, "flags": {"SYN": True}}}
    assert fl["source"]["labels"] == ["k8s:app=web"] and fl["Type"] == "L3_L4"
    assert fl["trace_observation_point"] == "POST_XLATE_FWD"
    back = flows.flow_from_json(data)
    assert back == dataclasses.replace(f, summary="TCP Flags: SYN")  # Hubble's Summary is always filled


# ---- conntrack and NFLOG -----------------------------------------------------------------------

def nla(kind: int, payload: bytes, nested: bool = False) -> bytes:
    body = struct.pack("=HH", 4 + len(payload), kind | (0x8000 if nested else 0)) + payload
    return body + b"\0" * (-len(body) % 4)


def ct_tuple(src: str, dst: str, proto: int, sport: int, dport: int) -> bytes:
    ip = nla(1, nla(1, socket.inet_aton(src)) + nla(2, socket.inet_aton(dst)), True)
    pr = nla(2, nla(1, bytes([proto])) + nla(2, struct.pack("!H", sport)) + nla(3, struct.pack("!H", dport)), True)
    return ip + pr


def ct_new(orig: tuple, reply: tuple, status: int, tcp_state: int = 1) -> bytes:
    """A NEW event as ctnetlink sends it; TCP with CTA_PROTOINFO_TCP_STATE (1: SYN_SENT, 3: ESTABLISHED)."""
    info = nla(4, nla(1, nla(1, bytes([tcp_state])), True), True) if orig[2] == 6 else b""
    return struct.pack("=BBH", socket.AF_INET, 0, 0) + nla(1, ct_tuple(*orig), True) + \
        nla(2, ct_tuple(*reply), True) + nla(3, struct.pack("!I", status)) + info


def test_a_conntrack_event_with_dnat_is_a_translated_flow_to_the_backend() -> None:
    payload = ct_new(("10.244.1.2", "10.96.0.100", 6, 40000, 80), ("10.244.2.2", "10.244.1.2", 6, 8080, 40000),
                     flows_ct.IPS_DST_NAT | 0x8)
    f = flows_ct.ct_flow(payload, "node1", names())
    assert f.verdict == TRANSLATED and f.destination.label() == "default/node2-pod1" and f.destination_port == 8080
    assert f.destination_service == Service("web", "default") and f.original_destination == "10.96.0.100:80"


def test_a_conntrack_event_without_nat_is_forwarded_and_node_traffic_is_left_out() -> None:
    f = flows_ct.ct_flow(ct_new(("10.244.1.2", "10.244.2.2", 6, 40000, 8080),
                                ("10.244.2.2", "10.244.1.2", 6, 8080, 40000), 0x8), "node2", names())
    assert f.verdict == FORWARDED and f.tcp_flags == ("SYN",) and f.node_name == "node2"
    pickup = flows_ct.ct_flow(ct_new(("10.244.1.2", "10.244.2.2", 6, 40001, 8080),
                                     ("10.244.2.2", "10.244.1.2", 6, 8080, 40001), 0x8, tcp_state=3), "node2", names())
    assert pickup.tcp_flags == ()  # conntrack picked up a connection mid-stream: no SYN claimed
    bgp = ct_new(("192.168.1.10", "192.168.1.11", 6, 40000, 179), ("192.168.1.11", "192.168.1.10", 6, 179, 40000), 0)
    assert flows_ct.ct_flow(bgp, "node1", names()) is None


def test_masquerade_is_a_translated_flow_with_its_snat() -> None:
    f = flows_ct.ct_flow(ct_new(("10.244.2.3", "192.168.1.200", 17, 40000, 53),
                                ("192.168.1.200", "192.168.1.11", 17, 53, 40000), flows_ct.IPS_SRC_NAT), "node2", names())
    assert f.verdict == TRANSLATED and f.extra["snat"] == "192.168.1.11:40000" and f.destination.label() == "external-web"
    assert "snat to 192.168.1.11:40000" in flows.compact(f)


def test_an_nflog_packet_from_a_drop_rule_is_dropped_by_the_policies() -> None:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, socket.inet_aton("10.244.1.2"),
                     socket.inet_aton("10.244.2.2"))
    tcp = struct.pack("!HHIIBBHHH", 40000, 8080, 1, 0, 0x50, 0x02, 1000, 0, 0)
    prefix = b"default/node2-pod1 ingress: no policy allows it (default/deny-web, default/other)\0"
    payload = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(1)) + nla(9, ip + tcp) + nla(10, prefix)
    f = flows_ct.nflog_flow(payload, "node2", names())
    assert f.verdict == DROPPED and f.drop_reason_desc == "Policy denied" and f.traffic_direction == "INGRESS"
    assert f.policies == ("default/deny-web", "default/other") and f.tcp_flags == ("SYN",)
    assert (f.source_port, f.destination_port) == (40000, 8080)


def test_drop_rule_prefixes() -> None:
    assert flows_ct.rule_of("x/a egress: invalid packet (conntrack)") == ("EGRESS", "Invalid packet", ())
    cut = "x/a ingress: no policy allows it (x/p1, x/p2, x/long-na..."
    assert flows_ct.rule_of(cut) == ("INGRESS", "Policy denied", ("x/p1", "x/p2"))


# ---- cilium_events -----------------------------------------------------------------------------

def record(type_: int, subtype: int, saddr: str, daddr: str, dport: int, orig: str = "0.0.0.0", orig_port: int = 0,
           rev_nat: int = 0, flags: int = 0, cookie: int = 0, policy_id: int = 0) -> bytes:
    return events.FLOW_EVENT.pack(5_000_000_000, type_, subtype, 6, 0x02, 0, socket.inet_aton(saddr),
                                  socket.inet_aton(daddr), struct.pack("!H", 40000), struct.pack("!H", dport),
                                  socket.inet_aton(orig), struct.pack("!H", orig_port), rev_nat, 0, 0, policy_id, 0, cookie,
                                  flags)


def test_socket_lb_events_are_traced_then_translated() -> None:
    n, boot = names(), T0
    pre = flows_cilium.to_flow(events.unpack(record(events.EVENT_TRACE_SOCK, 1, "0.0.0.0", "10.96.0.100", 80,
                                                    rev_nat=3, cookie=77)), "node1", n, {77: "10.244.1.2"}, boot)
    assert pre.verdict == TRACED and pre.source.label() == "default/node1-pod1"  # named from the netns cookie
    assert pre.trace_observation_point == "pre-xlate-fwd" and pre.destination.label() == "svc/default/web"
    post = flows_cilium.to_flow(events.unpack(record(events.EVENT_TRACE_SOCK, 2, "10.244.1.2", "10.244.2.2", 8080,
                                                     "10.96.0.100", 80, 3)), "node1", n, {}, boot)
    assert post.verdict == TRANSLATED and post.destination_service == Service("web", "default")
    assert post.destination.label() == "default/node2-pod1" and post.original_destination == "10.96.0.100:80"
    assert (post.time - boot).total_seconds() == 5


def test_cilium_drops_and_policy_verdicts() -> None:
    n = names()
    drop = flows_cilium.to_flow(events.unpack(record(events.EVENT_DROP, events.DROP_NO_SERVICE, "10.244.1.2",
                                                     "10.96.0.100", 80)), "node1", n, {}, T0)
    assert drop.verdict == DROPPED and drop.drop_reason_desc == "Service backend not found"
    denied = flows_cilium.to_flow(events.unpack(record(events.EVENT_POLICY_VERDICT, events.DROP_POLICY, "10.244.1.2",
                                                       "10.244.2.2", 8080, flags=events.FLOW_F_INGRESS)), "node2", n,
                                  {}, T0)
    assert denied.verdict == DROPPED and denied.drop_reason_desc == "Policy denied"
    assert denied.traffic_direction == "INGRESS"
    allowed = flows_cilium.to_flow(events.unpack(record(events.EVENT_POLICY_VERDICT, 0, "10.244.1.2", "10.244.2.2",
                                                        8080, flags=events.FLOW_F_ALLOWED)), "node2", n, {}, T0)
    assert allowed.verdict == FORWARDED


# ---- DNS ---------------------------------------------------------------------------------------

def dns_frame(src: str, dst: str, sport: int, dport: int, message: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(message), 0) + message
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, socket.inet_aton(src),
                     socket.inet_aton(dst))
    return b"\0" * 12 + b"\x08\x00" + ip + udp


def question(name: str, qtype: int = 1) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", qtype, 1)


def test_dns_queries_and_nxdomain_answers() -> None:
    q = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + question("api.example.com.default.svc.cluster.local")
    f = flows_dns.dns_flow(dns_frame("10.244.1.2", "10.244.2.3", 40000, 53, q), False, "node2", names())
    assert f.type == TYPE_DNS and not f.is_reply and f.dns.query == "api.example.com.default.svc.cluster.local."
    a = struct.pack("!HHHHHH", 7, 0x8183, 1, 0, 0, 0) + question("api.example.com.default.svc.cluster.local")
    r = flows_dns.dns_flow(dns_frame("10.244.2.3", "10.244.1.2", 53, 40000, a), True, "node2", names())
    assert r.is_reply and r.dns.rcode == 3 and r.source.label() == "kube-system/coredns"


def test_the_dns_socket_filter_jumps_stay_inside_the_program() -> None:
    prog = flows_dns.dns_filter()
    for i, (code, jt, jf, _k) in enumerate(prog):
        if code != 0x06:  # BPF_RET
            assert i + 1 + jt < len(prog) and i + 1 + jf < len(prog)
    assert prog[-1][3] == 0 and prog[-2][3] > 0  # the last two: keep, drop


# ---- the command's own refusals ----------------------------------------------------------------

def _args(*argv: str):
    from lab import cli
    return cli.build_parser().parse_args(["observe", *argv])


@pytest.mark.parametrize("argv,message", [
    (("--since", "10s"), "keeps no history"), (("--since", "yesterday"), "duration"),
    (("--last", "0"), "at least 1"), (("--duration", "forever"), "duration"), (("--port", "70000"), "out of range"),
])
def test_observe_refuses_what_it_cannot_do_in_one_line(argv: tuple, message: str) -> None:
    from observe import flows_cli
    with pytest.raises(StateError, match=message):
        flows_cli.command(_args(*argv))


def test_observe_flags_are_hubbles() -> None:
    args = _args("--from-pod", "x/a", "--to-service", "web", "--verdict", "DROPPED", "--type", "drop", "-f", "-j")
    assert (args.from_pod, args.to_service, args.verdict, args.type, args.follow, args.json) == \
        ("x/a", "web", "DROPPED", "drop", True, True)


def test_cilium_policy_numbers_get_the_agents_names(tmp_path) -> None:
    (tmp_path / "cilium").mkdir()
    (tmp_path / "cilium" / "identities.json").write_text('{"policies": {"default/deny-web": 3}, "identities": []}')
    ids = flows_cilium.policy_names(tmp_path)
    assert ids == {3: "default/deny-web"} and flows_cilium.policy_names(tmp_path / "none") == {}
    raw = events.unpack(record(events.EVENT_DROP, events.DROP_POLICY, "10.244.1.2", "10.244.2.2", 8080,
                               flags=events.FLOW_F_INGRESS, policy_id=3))
    f = flows_cilium._named(flows_cilium.to_flow(raw, "node2", names(), {}, T0), ids)
    assert f.policies == ("default/deny-web",)
    assert flows.to_json(f)["flow"]["ingress_denied_by"][0]["name"] == "deny-web"


def test_policy_verdicts_read_as_hubbles() -> None:
    f = flow(type=TYPE_POLICY, verdict=DROPPED, drop_reason_desc="Policy denied", traffic_direction="INGRESS",
             policies=("default/deny-web",))
    assert "policy-verdict:none INGRESS DENIED (TCP Flags: SYN) by default/deny-web" in flows.compact(f)
    ok = flow(type=TYPE_POLICY, traffic_direction="EGRESS")
    assert "policy-verdict:L3-L4 EGRESS ALLOWED (TCP Flags: SYN)" in flows.compact(ok)
    assert flows.to_json(f)["flow"]["verdict"] == "DROPPED" and flows.to_json(f)["flow"]["event_type"]["type"] == 5
