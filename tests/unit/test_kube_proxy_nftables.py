"""Tests of services/kube_proxy_nftables.py: the `nft -f` scripts kube-proxy's nftables mode would load.

Golden files live in golden/nftables/: NAME.nft for each hand-built case (render_full) and delta-*.nft for
the incremental updates (render_delta); to rewrite them after a deliberate change run with
KUBENET_UPDATE_GOLDEN=1 and read every diff before committing. Chain names are checked against the
examples in kube-proxy's own source (pkg/proxy/nftables/proxier.go). The tests at the end need root and
nft: in a throwaway network namespace (`unshare -n`) they check-load every golden, prove that
full(old) + delta(old, new) leaves the kernel holding exactly full(new), and count where real packets
are DNATed to (the endpoint pick is uniform).
"""
from __future__ import annotations

import json
import re
import subprocess
from fractions import Fraction
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from services import kube_proxy_nftables as kp
from services.endpoints import Endpoint, ServicePortEndpoints
from tests.conftest import assert_golden, require_root, require_tool
from tests.unit.proxy_cases import (cases, CLUSTER, DNS, DNS_EPS, NODE1, NODE2, NP_CLUSTER, NP_LOCAL, STICKY, WEB,
                                    WEB_EPS, ep, sp, svc)
from topo.model import Cluster, Node, Service, ServicePort

GOLDEN = Path(__file__).resolve().parent / "golden" / "nftables"

EMPTY = svc("empty", "10.96.0.21", ServicePort("", 80, 8080))
EMPTY_NP = svc("empty-np", "10.96.0.22", ServicePort("", 80, 8080, node_port=30022), type="NodePort")
SCTP = svc("sctp", "10.96.0.70", ServicePort("", 9999, 9999, "SCTP"))

CASES: dict[str, tuple[Node, list[ServicePortEndpoints]]] = {
    **cases(),
    "sctp-three-endpoints": (NODE1, [sp(SCTP, 0, ep("10.244.1.7", 9999, "node1", "s-1"),
                                        ep("10.244.2.7", 9999, "node2", "s-2"),
                                        ep("10.244.3.7", 9999, "node3", "s-3"))]),
}

# The delta cases: a base cluster, and one change each.
BASE = [sp(WEB, 0, *WEB_EPS), sp(DNS, 0, *DNS_EPS), sp(DNS, 1, *DNS_EPS)]
MOVED = (WEB_EPS[0], ep("10.244.2.9", 8080, "node2", "web-3"))
DELTAS: dict[str, tuple[list[ServicePortEndpoints], list[ServicePortEndpoints]]] = {
    "delta-add-service": (BASE, BASE + [sp(NP_CLUSTER, 0, *WEB_EPS)]),
    "delta-change-endpoint": (BASE, [sp(WEB, 0, *MOVED)] + BASE[1:]),
    "delta-delete-service": (BASE, BASE[1:]),
}


def _full(case: str) -> str:
    node, sps = CASES[case]
    return kp.render_full(kp.build(node, sps, CLUSTER))


def _delta(case: str) -> str:
    old, new = DELTAS[case]
    return kp.render_delta(kp.build(NODE1, old, CLUSTER), kp.build(NODE1, new, CLUSTER))


def _golden(name: str, text: str) -> None:
    assert_golden(GOLDEN / f"{name}.nft", text)


# ------------------------------------------------------------------------------------ golden files


@pytest.mark.parametrize("case", sorted(CASES))
def test_full_golden(case: str) -> None:
    _golden(case, _full(case))


@pytest.mark.parametrize("case", sorted(DELTAS))
def test_delta_golden(case: str) -> None:
    _golden(case, _delta(case))


# ------------------------------------------------------------------------------- well-formedness

CHAIN_DEF = re.compile(r"^\s*chain (\S+) \{$", re.M)
SET_DEF = re.compile(r"^\s*(?:set|map) (\S+) \{$", re.M)
TARGET = re.compile(r"\b(?:goto|jump) (\S+?)(?=[\s,}]|$)", re.M)
SET_REF = re.compile(r"@(\S+)")


def _targets_and_refs(text: str) -> tuple[set[str], set[str]]:
    return set(TARGET.findall(text)), set(SET_REF.findall(text))


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_goto_and_jump_lands_on_a_chain_defined_in_the_script(case: str) -> None:
    text = _full(case)
    targets, refs = _targets_and_refs(text)
    assert targets, "a script without any goto/jump"
    assert targets <= set(CHAIN_DEF.findall(text)), targets - set(CHAIN_DEF.findall(text))
    assert refs <= set(SET_DEF.findall(text)), refs - set(SET_DEF.findall(text))


@pytest.mark.parametrize("case", sorted(CASES))
def test_full_script_replaces_both_tables_atomically_and_is_deterministic(case: str) -> None:
    text = _full(case)
    assert text == _full(case)
    assert text.startswith("add table ip kube-proxy\ndelete table ip kube-proxy\ntable ip kube-proxy {\n")
    assert "add table ip kubenet-egress\ndelete table ip kubenet-egress\ntable ip kubenet-egress {\n" in text
    assert not re.search(r"(chain|table) \S+ \{[^\n]*\}", text)  # nft 1.0.6 wants a newline or ';' before '}'


def test_base_chains_hooks_and_priorities() -> None:
    rs = kp.build(NODE1, [], CLUSTER)
    hooks = {c.name: c.hook for c in rs.chains if c.hook}
    assert hooks == {
        "filter-input": "type filter hook input priority -110; policy accept;",
        "filter-forward": "type filter hook forward priority -110; policy accept;",
        "filter-output": "type filter hook output priority -110; policy accept;",
        "nat-prerouting": "type nat hook prerouting priority -100; policy accept;",
        "nat-output": "type nat hook output priority -100; policy accept;",  # not `dstnat`: refused there
        "nat-postrouting": "type nat hook postrouting priority 100; policy accept;",
    }
    assert rs.chain("services").rules == (
        "ip daddr . meta l4proto . th dport vmap @service-ips",
        "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports")
    assert rs.chain("masquerading").rules == ("meta mark and 0x4000 == 0 return",
                                              "meta mark set meta mark xor 0x4000", "masquerade fully-random")
    assert rs.chain("mark-for-masquerade").rules == ("meta mark set meta mark or 0x4000",)
    assert rs.chain("reject-chain").rules == ("reject",)


def test_egress_nat_is_flannels_in_its_own_table() -> None:
    rs = kp.build(NODE2, [], CLUSTER)
    (chain,) = rs.egress
    assert chain.hook == "type nat hook postrouting priority 100; policy accept;"
    assert chain.rules == (
        "ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return",  # pod to pod: never NATed
        "ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
        "ip saddr != 10.244.0.0/16 ip daddr 10.244.2.0/24 return",  # into this node's pods: client IP kept
        "ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random")
    assert "table ip kubenet-egress" in kp.render_full(rs)


# ------------------------------------------------------------------------------------ chain names


def test_chain_names_match_kube_proxys_examples() -> None:
    # The examples in the comments of servicePortChainNameBase / servicePortEndpointChainNameBase.
    assert kp.hash_and_truncate("ns1/svc1/tcp/p80") == "ULMVA6XW-ns1/svc1/tcp/p80"
    assert kp.hash_and_truncate("ns1/svc1/tcp/p80__10.180.0.1/80") == "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    svc1 = svc("svc1", "172.30.0.41", ServicePort("p80", 80, 80), namespace="ns1")
    one = sp(svc1, 0, Endpoint(IPv4Address("10.180.0.1"), 80, "node1", "ns1/pod1"))
    assert kp.service_chain(one) == "service-ULMVA6XW-ns1/svc1/tcp/p80"
    assert kp.local_chain(one) == "local-ULMVA6XW-ns1/svc1/tcp/p80"
    assert kp.external_chain(one) == "external-ULMVA6XW-ns1/svc1/tcp/p80"
    assert kp.endpoint_chain(one, one.endpoints[0]) == "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    assert kp.affinity_set(one, one.endpoints[0]) == "affinity-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"


def test_long_names_are_truncated_like_kube_proxy() -> None:
    name = kp.hash_and_truncate("n" * 300)
    assert len(name) == 240 and name.endswith("...") and name[8] == "-"


# ------------------------------------------------------------------------------------ semantics


def _pick_probabilities(rules: tuple[str, ...]) -> dict[str, Fraction]:
    """Walk a service chain's pick ladder: each `numgen random mod K == 0 goto X` is taken 1/K of the time."""
    reach, out = Fraction(1), {}
    for rule in rules:
        m = re.fullmatch(r"numgen random mod (\d+) == 0 goto (\S+)", rule)
        if m:
            take = reach / int(m.group(1))
            out[m.group(2)] = out.get(m.group(2), 0) + take
            reach -= take
        elif rule.startswith("goto "):
            out[rule[5:]] = out.get(rule[5:], 0) + reach
            reach = Fraction(0)
    assert reach == 0
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10])
def test_the_pick_is_exactly_uniform(n: int) -> None:
    eps = [ep(f"10.244.1.{i + 2}", 8080, "node1", f"web-{i}") for i in range(n)]
    one = sp(WEB, 0, *eps)
    rs = kp.build(NODE1, [one], CLUSTER)
    probabilities = _pick_probabilities(rs.chain(kp.service_chain(one)).rules)
    assert probabilities == {kp.endpoint_chain(one, e): Fraction(1, n) for e in eps}


def test_clusterip_lookup_is_one_verdict_map_element_per_port() -> None:
    node, sps = CASES["udp"]
    rs = kp.build(node, sps, CLUSTER)
    assert dict(rs.map("service-ips").elements) == {
        "10.96.0.10 . udp . 53": "goto " + kp.service_chain(sps[0]),
        "10.96.0.10 . tcp . 53": "goto " + kp.service_chain(sps[1]),
    }
    udp_chain = rs.chain(kp.service_chain(sps[0]))
    assert udp_chain.name == "service-" + kp.hash_and_truncate("kube-system/kube-dns/udp/dns")
    assert udp_chain.rules[0] == ("ip daddr 10.96.0.10 udp dport 53 ip saddr != 10.244.0.0/16 "
                                  "jump mark-for-masquerade")
    ep_chain = rs.chain(kp.endpoint_chain(sps[0], DNS_EPS[0]))
    assert ep_chain.rules == ("ip saddr 10.244.1.5 jump mark-for-masquerade",  # hairpin
                              "meta l4proto udp dnat to 10.244.1.5:53")


def test_services_without_endpoints_are_rejected_not_dnated() -> None:
    node, sps = CASES["no-endpoints"]
    rs = kp.build(node, sps, CLUSTER)
    assert dict(rs.map("no-endpoint-services").elements) == {
        "10.96.0.21 . tcp . 80": "goto reject-chain", "10.96.0.22 . tcp . 80": "goto reject-chain"}
    assert dict(rs.map("no-endpoint-nodeports").elements) == {"tcp . 30022": "goto reject-chain"}
    assert rs.map("service-ips").elements == () and rs.map("service-nodeports").elements == ()
    assert not [c for c in rs.chains if "/" in c.name]  # no per-service chain at all
    assert rs.chain("filter-forward").rules == ("ct state new jump endpoints-check",)


def test_affinity_sets_and_rules() -> None:
    node, sps = CASES["affinity-clientip"]
    rs = kp.build(node, sps, CLUSTER)
    one = sps[0]
    assert [s.name for s in rs.sets] == [kp.affinity_set(one, e) for e in WEB_EPS]
    assert {s.declaration for s in rs.sets} == {"type ipv4_addr; flags dynamic,timeout; timeout 10800s;"}
    rules = rs.chain(kp.service_chain(one)).rules
    assert rules[1:3] == tuple(f"ip saddr @{kp.affinity_set(one, e)} goto {kp.endpoint_chain(one, e)}"
                               for e in WEB_EPS)
    assert f"update @{kp.affinity_set(one, WEB_EPS[1])} {{ ip saddr }}" in rs.chain(
        kp.endpoint_chain(one, WEB_EPS[1])).rules


def test_nodeport_policies() -> None:
    node, sps = CASES["nodeport-cluster"]
    rs, one = kp.build(node, sps, CLUSTER), sps[0]
    assert dict(rs.map("service-nodeports").elements) == {"tcp . 30080": "goto " + kp.external_chain(one)}
    assert rs.chain(kp.external_chain(one)).rules == ("jump mark-for-masquerade",
                                                       "goto " + kp.service_chain(one))
    # Local, with an endpoint on this node: only that endpoint, no masquerade for outside clients.
    node, sps = CASES["nodeport-local-with-local-endpoint"]
    rs, one = kp.build(node, sps, CLUSTER), sps[0]
    ext = rs.chain(kp.external_chain(one)).rules
    assert ext[-1] == "goto " + kp.local_chain(one) and "jump mark-for-masquerade" not in ext[0]
    assert _pick_probabilities(rs.chain(kp.local_chain(one)).rules) == {kp.endpoint_chain(one, WEB_EPS[0]): 1}
    assert rs.map("no-endpoint-nodeports").elements == ()
    # Local, no endpoint here: the ClusterIP still works, the NodePort drops what is not short-circuited.
    node, sps = CASES["nodeport-local-without-local-endpoint"]
    rs, one = kp.build(node, sps, CLUSTER), sps[0]
    assert dict(rs.map("no-endpoint-nodeports").elements) == {"tcp . 30081": "drop"}
    assert "goto" in dict(rs.map("service-ips").elements)["10.96.0.60 . tcp . 80"]
    assert kp.local_chain(one) not in rs.chain_rules
    assert rs.chain(kp.external_chain(one)).rules == (
        "ip saddr 10.244.0.0/16 goto " + kp.service_chain(one),
        "fib saddr type local jump mark-for-masquerade",
        "fib saddr type local goto " + kp.service_chain(one))


def test_headless_services_are_ignored() -> None:
    headless = Service("h", "default", None, (ServicePort("", 80, 8080),))
    rs = kp.build(NODE1, [sp(headless, 0, *WEB_EPS)], CLUSTER)
    assert rs == kp.build(NODE1, [], CLUSTER)


# ------------------------------------------------------------------------------------ deltas


def test_delta_scripts_touch_only_what_changed() -> None:
    add = _delta("delta-add-service")
    assert "delete" not in add and "flush" not in add and "web/" not in add and "kube-dns" not in add
    change = _delta("delta-change-endpoint")
    lines = change.splitlines()
    old_ep = kp.endpoint_chain(BASE[0], WEB_EPS[1])
    new_ep = kp.endpoint_chain(BASE[0], MOVED[1])
    svc_chain = kp.service_chain(BASE[0])
    assert lines.index(f"add chain ip kube-proxy {new_ep}") < lines.index(f"flush chain ip kube-proxy {svc_chain}")
    assert lines.index(f"flush chain ip kube-proxy {old_ep}") < lines.index(f"delete chain ip kube-proxy {old_ep}")
    assert lines[-1] == f"delete chain ip kube-proxy {old_ep}"
    assert "element" not in change  # the service's map element still points at the same service chain
    delete = _delta("delta-delete-service").splitlines()
    assert delete[0] == "delete element ip kube-proxy service-ips { 10.96.0.20 . tcp . 80 }"
    assert delete[-1].startswith("delete chain ip kube-proxy service-")


def test_no_change_is_an_empty_delta() -> None:
    rs = kp.build(NODE1, BASE, CLUSTER)
    assert kp.render_delta(rs, kp.build(NODE1, list(BASE), CLUSTER)) == ""


def test_a_changed_affinity_timeout_recreates_the_sets_with_their_users_flushed() -> None:
    short = Service(STICKY.name, STICKY.namespace, STICKY.cluster_ip, STICKY.ports, STICKY.selector,
                    session_affinity="ClientIP", affinity_timeout=60)
    old = kp.build(NODE1, [sp(STICKY, 0, *WEB_EPS)], CLUSTER)
    new = kp.build(NODE1, [sp(short, 0, *WEB_EPS)], CLUSTER)
    lines = kp.render_delta(old, new).splitlines()
    one = sp(STICKY, 0, *WEB_EPS)
    for e in WEB_EPS:
        aff, chain = kp.affinity_set(one, e), kp.endpoint_chain(one, e)
        assert lines.index(f"flush chain ip kube-proxy {chain}") < lines.index(f"delete set ip kube-proxy {aff}")
        assert lines.index(f"delete set ip kube-proxy {aff}") < lines.index(
            f"add set ip kube-proxy {aff} {{ type ipv4_addr; flags dynamic,timeout; timeout 60s; }}")
        assert f"add rule ip kube-proxy {chain} update @{aff} {{ ip saddr }}" in lines


def test_a_changed_skeleton_falls_back_to_a_full_replace() -> None:
    rs = kp.build(NODE1, BASE, CLUSTER)
    odd = kp.Ruleset(rs.chains, rs.maps[:-1], rs.sets, rs.egress)
    assert kp.render_delta(odd, rs) == kp.render_full(rs)


def test_changed_egress_is_replaced_on_its_own() -> None:
    old = kp.build(NODE1, BASE, CLUSTER)
    new = kp.build(NODE1, BASE, Cluster(pod_cidr=IPv4Network("10.200.0.0/16")))
    delta = kp.render_delta(old, new)
    assert "table ip kubenet-egress {" in delta and "10.200.0.0/16" in delta
    assert "add table ip kubenet-egress\ndelete table ip kubenet-egress\n" in delta


def test_json_round_trip() -> None:
    for node, sps in CASES.values():
        rs = kp.build(node, sps, CLUSTER)
        back = kp.from_json(json.loads(json.dumps(kp.to_json(rs))))
        assert back == rs and kp.render_full(back) == kp.render_full(rs)
    with pytest.raises(ValueError):
        kp.from_json({"format": 99})


# ------------------------------------------------------- loading into a throwaway namespace (root)


def _in_scratch_netns(script: str, files: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    require_root()
    require_tool("nft")
    require_tool("unshare")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return subprocess.run(["unshare", "-n", "sh", "-ec", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)


def _normalized(listing: str) -> dict:
    """`nft -j list ruleset` without handles, map elements as a sorted list: comparable across histories."""
    out: dict = {"chains": {}, "rules": {}, "maps": {}, "sets": {}, "tables": set()}
    for item in json.loads(listing)["nftables"]:
        (kind, body), = item.items()
        if kind == "table":
            out["tables"].add(body["name"])
        elif kind == "chain":
            out["chains"][(body["table"], body["name"])] = {k: v for k, v in body.items() if k != "handle"}
        elif kind == "rule":
            out["rules"].setdefault((body["table"], body["chain"]), []).append(json.dumps(body["expr"]))
        elif kind in ("map", "set"):
            decl = {k: v for k, v in body.items() if k not in ("handle", "elem")}
            elements = sorted(json.dumps(e, sort_keys=True) for e in body.get("elem", []))
            out["maps" if kind == "map" else "sets"][(body["table"], body["name"])] = (decl, elements)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_nft_check_loads_every_golden(case: str, tmp_path: Path) -> None:
    proc = _in_scratch_netns("nft -c -f full.nft", {"full.nft": (GOLDEN / f"{case}.nft").read_text()}, tmp_path)
    assert proc.returncode == 0, proc.stderr


def _churn() -> dict[str, tuple[list[ServicePortEndpoints], list[ServicePortEndpoints]]]:
    """Many changes at once: policies, affinity timeouts, endpoints appearing and disappearing."""
    short = Service(STICKY.name, STICKY.namespace, STICKY.cluster_ip, STICKY.ports, STICKY.selector,
                    session_affinity="ClientIP", affinity_timeout=60)
    np_now_local = Service(NP_CLUSTER.name, NP_CLUSTER.namespace, NP_CLUSTER.cluster_ip, NP_CLUSTER.ports,
                           NP_CLUSTER.selector, type="NodePort", external_traffic_policy="Local")
    old = [sp(WEB, 0, *WEB_EPS), sp(STICKY, 0, *WEB_EPS), sp(NP_CLUSTER, 0, *WEB_EPS), sp(EMPTY, 0),
           sp(NP_LOCAL, 0, WEB_EPS[1]), sp(DNS, 0, *DNS_EPS)]
    new = [sp(WEB, 0), sp(short, 0, *MOVED), sp(np_now_local, 0, *WEB_EPS), sp(EMPTY, 0, WEB_EPS[0]),
           sp(NP_LOCAL, 0, *WEB_EPS), sp(SCTP, 0, ep("10.244.1.7", 9999, "node1", "s-1"))]
    return {**DELTAS, "churn": (old, new), "churn-back": (new, old), "from-empty": ([], old), "to-empty": (old, [])}


@pytest.mark.parametrize("case", sorted(_churn()))
def test_full_old_plus_delta_equals_full_new_in_the_kernel(case: str, tmp_path: Path) -> None:
    old_sps, new_sps = _churn()[case]
    old, new = kp.build(NODE1, old_sps, CLUSTER), kp.build(NODE1, new_sps, CLUSTER)
    files = {"old.nft": kp.render_full(old), "delta.nft": kp.render_delta(old, new), "new.nft": kp.render_full(new)}
    proc = _in_scratch_netns(
        "nft -f old.nft; nft -c -f delta.nft; nft -f delta.nft; nft -j list ruleset > via-delta.json;"
        "nft flush ruleset; nft -f new.nft; nft -j list ruleset > direct.json", files, tmp_path)
    assert proc.returncode == 0, proc.stderr
    via_delta = _normalized((tmp_path / "via-delta.json").read_text())
    assert via_delta == _normalized((tmp_path / "direct.json").read_text())
    assert via_delta["tables"] == {"kube-proxy", "kubenet-egress"}


def test_a_delta_at_a_thousand_services_applies(tmp_path: Path) -> None:
    def many(n: int) -> list[ServicePortEndpoints]:
        return [sp(svc(f"s{i}", str(IPv4Address("10.96.10.0") + i), ServicePort("", 80, 8080)), 0,
                   ep(str(IPv4Address("10.244.1.10") + i % 200), 8080, "node1", f"p{i}"),
                   ep(str(IPv4Address("10.244.2.10") + i % 200), 8080, "node2", f"q{i}")) for i in range(n)]
    old = kp.build(NODE1, many(1000), CLUSTER)
    new_sps = many(1001)
    new_sps[500] = sp(new_sps[500].service, 0, *new_sps[500].endpoints[:1])
    del new_sps[7]
    new = kp.build(NODE1, new_sps, CLUSTER)
    files = {"old.nft": kp.render_full(old), "delta.nft": kp.render_delta(old, new)}
    proc = _in_scratch_netns("nft -f old.nft; nft -f delta.nft; nft list map ip kube-proxy service-ips",
                             files, tmp_path)
    assert proc.returncode == 0, proc.stderr
    listing = proc.stdout
    assert listing.count(" : goto service-") == 1000
    assert "10.96.13.232 . tcp . 80" in listing and "10.96.10.7 . tcp . 80" not in listing  # 1000 = 3*256+232


UNIFORM_PROBE = r"""
import json, socket, subprocess
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "route", "add", "10.96.0.0/12", "dev", "lo"], check=True)
subprocess.run(["ip", "route", "add", "10.244.0.0/16", "dev", "lo"], check=True)
subprocess.run(["nft", "-f", "full.nft"], check=True)
subprocess.run(["nft", "-f", "count.nft"], check=True)
for _ in range(3000):  # a new socket each time: a new source port, a new conntrack entry, a new pick
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", ("10.96.0.70", 9999))
out = json.loads(subprocess.run(["nft", "-j", "list", "table", "ip", "count"], capture_output=True,
                                text=True, check=True).stdout)
print(json.dumps({r["rule"]["comment"]: next(e["counter"]["packets"] for e in r["rule"]["expr"] if "counter" in e)
                  for r in (i for i in out["nftables"] if "rule" in i)}))
"""


def test_real_packets_are_spread_uniformly(tmp_path: Path) -> None:
    eps = [ep(f"10.244.{i}.7", 9999, f"node{i}", f"u-{i}") for i in (1, 2, 3)]
    udp = svc("spread", "10.96.0.70", ServicePort("", 9999, 9999, "UDP"))
    full = kp.render_full(kp.build(NODE1, [sp(udp, 0, *eps)], CLUSTER))
    count = "table ip count {\n\tchain out {\n\t\ttype filter hook output priority 0; policy accept;\n" + "".join(
        f'\t\tip daddr {e.ip} udp dport 9999 counter comment "{e.ip}"\n' for e in eps) + "\t}\n}\n"
    proc = _in_scratch_netns("python3 probe.py", {"full.nft": full, "count.nft": count,
                                                  "probe.py": UNIFORM_PROBE}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert sum(seen.values()) == 3000, seen
    assert all(850 <= n <= 1150 for n in seen.values()), seen  # 1000 +- 150: about 6 standard deviations
