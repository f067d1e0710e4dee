"""Tests of services/kube_proxy_iptables.py: the iptables-restore text kube-proxy's iptables mode would load.

Golden files live in golden/iptables/NAME.rules, one per hand-built case; to rewrite them after a
deliberate change run with KUBENET_UPDATE_GOLDEN=1 and read every diff before committing. Chain names are
checked against values that appear in kube-proxy's own tests (pkg/proxy/iptables/proxier_test.go) and on
every real cluster (kube-dns, the kubernetes API service). The tests at the end need root and
iptables-legacy: they load each golden into a throwaway network namespace (`unshare -n`), once with
`--test` (parse only) and once for real, reading it back with iptables-save.
"""
from __future__ import annotations

import math
import re
import subprocess
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from services import kube_proxy_iptables as kp
from services.endpoints import Endpoint, ServicePortEndpoints
from tests.conftest import assert_golden, require_root, require_tool
from tests.unit.proxy_cases import (cases, CLUSTER, NODE1, STICKY, WEB,
                                    WEB_EPS, ep, sp, svc)
from topo.model import Cluster, Node, Service, ServicePort

GOLDEN = Path(__file__).resolve().parent / "golden" / "iptables"



CASES = cases()


def _render(case: str) -> str:
    node, sps = CASES[case]
    return kp.render(node, sps, CLUSTER)


# ------------------------------------------------------------------------------------ golden files


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    assert_golden(GOLDEN / f"{case}.rules", _render(case))


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_jump_lands_on_a_declared_chain(case: str) -> None:
    assert kp.check_jumps(_render(case)) == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_is_deterministic_and_well_formed(case: str) -> None:
    text = _render(case)
    assert text == _render(case)
    assert text.endswith("COMMIT\n")
    assert [line for line in text.splitlines() if line.startswith("*")] == ["*filter", "*nat"]
    assert text.count("COMMIT\n") == 2
    for table in kp.tables(text).values():
        for chain in table:
            assert len(chain) <= 28, chain  # iptables' limit on chain names


# ------------------------------------------------------------------------------------ chain names


def test_chain_names_match_kube_proxys_own_tests() -> None:
    # From pkg/proxy/iptables/proxier_test.go (TestOverallIPTablesRules and friends).
    assert kp.service_chain("ns1/svc1:p80", "tcp") == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert kp.endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80") == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert kp.service_chain("ns2/svc2:p80", "tcp") == "KUBE-SVC-GNZBNJ2PO5MGZ6GT"
    assert kp.external_chain("ns2/svc2:p80", "tcp") == "KUBE-EXT-GNZBNJ2PO5MGZ6GT"
    assert kp.local_chain("ns2/svc2:p80", "tcp") == "KUBE-SVL-GNZBNJ2PO5MGZ6GT"
    assert kp.endpoint_chain("ns2/svc2:p80", "tcp", "10.180.0.2:80") == "KUBE-SEP-RS4RBKLTHTF2IUXJ"
    assert kp.service_chain("ns4/svc4:p80", "tcp") == "KUBE-SVC-4SW47YFZTEDKD3PK"
    assert kp.endpoint_chain("ns4/svc4:p80", "tcp", "10.180.0.4:80") == "KUBE-SEP-UKSFD7AGPMPPLUHC"
    assert kp.endpoint_chain("ns4/svc4:p80", "tcp", "10.180.0.5:80") == "KUBE-SEP-C6EBXVWJJZMIWKLZ"


def test_chain_names_every_real_cluster_shows() -> None:
    assert kp.service_chain("default/kubernetes:https", "tcp") == "KUBE-SVC-NPX46M4PTMTKRN6Y"
    assert kp.service_chain("kube-system/kube-dns:dns", "udp") == "KUBE-SVC-TCOU7JCQXEZGVUNU"
    assert kp.service_chain("kube-system/kube-dns:dns-tcp", "tcp") == "KUBE-SVC-ERIFXISQEP7F7OF4"
    assert kp.service_chain("kube-system/kube-dns:metrics", "tcp") == "KUBE-SVC-JD5MR3NA4I4DYORP"


def test_the_udp_golden_uses_kube_dns_chain_names() -> None:
    nat = kp.chains(_render("udp"))
    assert "KUBE-SVC-TCOU7JCQXEZGVUNU" in nat and "KUBE-SVC-ERIFXISQEP7F7OF4" in nat


def test_protocol_is_part_of_the_hash() -> None:
    assert kp.service_chain("ns/a:p", "tcp") != kp.service_chain("ns/a:p", "udp")


# --------------------------------------------------------------- the layout, rule by rule


def test_kube_proxys_reference_service_in_iptables_save_form() -> None:
    """kube-proxy's ns1/svc1:p80 fixture (cluster CIDR 10.0.0.0/8), as iptables-save prints it."""
    service = Service("svc1", "ns1", IPv4Address("172.30.0.41"), (ServicePort("p80", 80, 80),))
    endpoint = Endpoint(IPv4Address("10.180.0.1"), 80, "test-node", "ns1/pod1")
    node = Node("test-node", IPv4Address("192.168.0.2"), IPv4Network("10.180.0.0/24"), 0)
    text = kp.render(node, [ServicePortEndpoints(service, service.ports[0], (endpoint,))],
                     Cluster(pod_cidr=IPv4Network("10.0.0.0/8")))
    nat = kp.chains(text)
    assert nat["KUBE-SERVICES"] == [
        '-d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 '
        "-j KUBE-SVC-XPGD46QRK7WJZT7O",
        '-m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" '
        "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
    ]
    assert nat["KUBE-SVC-XPGD46QRK7WJZT7O"] == [
        '! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp '
        "--dport 80 -j KUBE-MARK-MASQ",
        '-m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ',
    ]
    assert nat["KUBE-SEP-SXIVWICOYRO3J4NJ"] == [
        '-s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ',
        '-p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.1:80',
    ]
    assert nat["KUBE-POSTROUTING"] == [
        "-m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-j MARK --xor-mark 0x4000",
        '-m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
    ]
    assert nat["KUBE-MARK-MASQ"] == ["-j MARK --or-mark 0x4000"]
    assert nat["PREROUTING"] == nat["OUTPUT"] == [
        '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES']
    assert nat["POSTROUTING"][0] == '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING'


def _probabilities(rules: list[str]) -> list[str | None]:
    found = [re.search(r"--probability (\S+)", r) for r in rules]
    return [m.group(1) if m else None for m in found]


def test_probabilities_are_one_over_the_endpoints_left() -> None:
    three = WEB_EPS + (ep("10.244.2.3", 8080, "node2", "web-3"),)
    nat = kp.chains(kp.render(NODE1, [sp(WEB, 0, *three)], CLUSTER))
    rules = nat[kp.service_chain("default/web", "tcp")][1:]  # after the masquerade rule
    assert _probabilities(rules) == ["0.3333333333", "0.5000000000", None]
    assert [r.split("-j ")[-1] for r in rules] == [kp.endpoint_chain("default/web", "tcp", str(e)) for e in three]
    assert kp.probability(7) == "0.1428571429"


def test_named_ports_make_one_chain_set_each() -> None:
    nat = kp.chains(_render("multiport-named"))
    http, metrics = kp.service_chain("default/app:http", "tcp"), kp.service_chain("default/app:metrics", "tcp")
    assert http != metrics and http in nat and metrics in nat
    assert nat[kp.endpoint_chain("default/app:metrics", "tcp", "10.244.1.3:9100")][-1].endswith(
        "--to-destination 10.244.1.3:9100")
    assert [r.split("-j ")[-1] for r in nat["KUBE-SERVICES"][:2]] == [http, metrics]
    assert '"default/app:metrics cluster IP"' in nat["KUBE-SERVICES"][1]


def test_no_endpoints_rejects_in_filter_and_leaves_no_nat_chains() -> None:
    text = _render("no-endpoints")
    nat, filt = kp.chains(text, "nat"), kp.chains(text, "filter")
    assert not [c for c in nat if c.startswith(("KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-SVL-"))]
    assert nat["KUBE-SERVICES"] == [nat["KUBE-SERVICES"][-1]]  # only the nodeports rule
    assert nat["KUBE-NODEPORTS"] == []
    assert filt["KUBE-SERVICES"] == [
        '-d 10.96.0.21/32 -p tcp -m comment --comment "default/empty has no endpoints" -m tcp --dport 80 '
        "-j REJECT --reject-with icmp-port-unreachable",
        '-d 10.96.0.22/32 -p tcp -m comment --comment "default/empty-np has no endpoints" -m tcp --dport 80 '
        "-j REJECT --reject-with icmp-port-unreachable",
    ]
    assert filt["KUBE-EXTERNAL-SERVICES"] == [
        '-p tcp -m comment --comment "default/empty-np has no endpoints" -m addrtype --dst-type LOCAL '
        "-m tcp --dport 30022 -j REJECT --reject-with icmp-port-unreachable"]


def test_client_ip_affinity_checks_before_choosing_and_records_on_dnat() -> None:
    nat = kp.chains(_render("affinity-clientip"))
    chain = kp.service_chain("default/sticky", "tcp")
    seps = [kp.endpoint_chain("default/sticky", "tcp", str(e)) for e in WEB_EPS]
    rules = nat[chain]
    assert "KUBE-MARK-MASQ" in rules[0]
    for rule, sep, e in zip(rules[1:3], seps, WEB_EPS):
        assert rule == (f'-m comment --comment "default/sticky -> {e}" -m recent --rcheck --seconds 10800 --reap '
                        f"--name {sep} --mask 255.255.255.255 --rsource -j {sep}")
    assert _probabilities(rules[3:]) == ["0.5000000000", None]
    assert nat[seps[0]][1] == ('-p tcp -m comment --comment "default/sticky" -m recent --set --name '
                               f"{seps[0]} --mask 255.255.255.255 --rsource -m tcp -j DNAT "
                               "--to-destination 10.244.1.2:8080")


def test_nodeport_cluster_policy_masquerades_then_uses_every_endpoint() -> None:
    nat = kp.chains(_render("nodeport-cluster"))
    svc_chain, ext = kp.service_chain("default/np", "tcp"), kp.external_chain("default/np", "tcp")
    assert nat["KUBE-NODEPORTS"] == [f'-p tcp -m comment --comment "default/np" -m tcp --dport 30080 -j {ext}']
    assert nat[ext] == ['-m comment --comment "masquerade traffic for default/np external destinations" '
                        "-j KUBE-MARK-MASQ", f"-j {svc_chain}"]
    assert len(nat[svc_chain]) == 3
    assert kp.local_chain("default/np", "tcp") not in nat


def test_nodeport_local_policy_keeps_client_ip_and_uses_local_endpoints_only() -> None:
    text = _render("nodeport-local-with-local-endpoint")
    nat = kp.chains(text)
    name = "default/np-local"
    svc_chain, svl, ext = (kp.service_chain(name, "tcp"), kp.local_chain(name, "tcp"),
                           kp.external_chain(name, "tcp"))
    assert nat[ext] == [
        f'-s 10.244.0.0/16 -m comment --comment "pod traffic for {name} external destinations" -j {svc_chain}',
        f'-m comment --comment "masquerade LOCAL traffic for {name} external destinations" '
        "-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ",
        f'-m comment --comment "route LOCAL traffic for {name} external destinations" '
        f"-m addrtype --src-type LOCAL -j {svc_chain}",
        f"-j {svl}",
    ]
    local_sep = kp.endpoint_chain(name, "tcp", "10.244.1.2:8080")
    assert nat[svl] == [f'-m comment --comment "{name} -> 10.244.1.2:8080" -j {local_sep}']
    assert not any("KUBE-MARK-MASQ" in rule for rule in nat[svl])
    # The ClusterIP still balances over every endpoint, so both endpoint chains exist.
    assert len([c for c in nat if c.startswith("KUBE-SEP-")]) == 2
    assert kp.chains(text, "filter")["KUBE-EXTERNAL-SERVICES"] == []


def test_nodeport_local_policy_without_local_endpoint_drops_outsiders() -> None:
    text = _render("nodeport-local-without-local-endpoint")
    nat, filt = kp.chains(text), kp.chains(text, "filter")
    name = "default/np-local"
    ext = kp.external_chain(name, "tcp")
    assert kp.local_chain(name, "tcp") not in nat
    assert len(nat[ext]) == 3 and not any("KUBE-SVL-" in rule for rule in nat[ext])
    assert nat["KUBE-NODEPORTS"] == [f'-p tcp -m comment --comment "{name}" -m tcp --dport 30081 -j {ext}']
    assert filt["KUBE-EXTERNAL-SERVICES"] == [
        f'-p tcp -m comment --comment "{name} has no local endpoints" -m addrtype --dst-type LOCAL '
        "-m tcp --dport 30081 -j DROP"]


def test_udp_and_sctp_use_their_own_match() -> None:
    nat = kp.chains(_render("udp"))
    assert nat["KUBE-SERVICES"][0].startswith("-d 10.96.0.10/32 -p udp ")
    assert "-m udp --dport 53" in nat["KUBE-SERVICES"][0]
    assert "-m tcp --dport 53" in nat["KUBE-SERVICES"][1]
    sctp = svc("s", "10.96.0.70", ServicePort("", 9999, 9999, "SCTP"))
    nat = kp.chains(kp.render(NODE1, [sp(sctp, 0, WEB_EPS[0])], CLUSTER))
    sep = kp.endpoint_chain("default/s", "sctp", "10.244.1.2:8080")
    assert nat[sep][1] == '-p sctp -m comment --comment "default/s" -m sctp -j DNAT --to-destination 10.244.1.2:8080'


def test_headless_services_are_skipped() -> None:
    headless = Service("h", "default", None, (ServicePort("", 80, 80),))
    assert kp.render(NODE1, [sp(headless, 0, WEB_EPS[0])], CLUSTER) == kp.render(NODE1, [], CLUSTER)


def test_services_keep_the_order_given() -> None:
    order = [sp(WEB, 0, *WEB_EPS), sp(STICKY, 0, *WEB_EPS)]
    first = kp.chains(kp.render(NODE1, order, CLUSTER))["KUBE-SERVICES"]
    second = kp.chains(kp.render(NODE1, order[::-1], CLUSTER))["KUBE-SERVICES"]
    assert first[:2] == second[:2][::-1]


# --------------------------------------------------------------------------------- egress NAT


def test_egress_masquerade_follows_flannel() -> None:
    pods, mine = IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24")
    masq = '-m comment --comment "flanneld masq"'
    assert kp.egress_masquerade(pods, mine) == [
        f"-A POSTROUTING {masq} -j FLANNEL-POSTRTG",
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {masq} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 {masq} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 {masq} -j MASQUERADE --random-fully",
        f"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 {masq} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 {masq} -j MASQUERADE --random-fully",
    ]
    assert kp.egress_masquerade(pods) == kp.egress_masquerade(pods, mine)[:4]


def test_render_runs_kube_postrouting_before_the_cni_egress_chain() -> None:
    nat = kp.chains(_render("clusterip-two-endpoints"))
    assert [rule.split("-j ")[-1] for rule in nat["POSTROUTING"]] == ["KUBE-POSTROUTING", "FLANNEL-POSTRTG"]
    assert nat["FLANNEL-POSTRTG"] == [line.split(" ", 2)[2] for line in
                                      kp.egress_masquerade(CLUSTER.pod_cidr, NODE1.pod_cidr)[1:]]
    # Nothing in the egress chain mentions the service CIDR: it runs after DNAT.
    assert not any("10.96." in rule for rule in nat["FLANNEL-POSTRTG"])


# ------------------------------------------------------------------------------ the parse helpers


def test_check_jumps_finds_what_iptables_restore_would_refuse() -> None:
    bad = "\n".join([
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-SERVICES - [0:0]",
        "-A PREROUTING -j KUBE-SERVICES",
        '-A KUBE-SERVICES -m comment --comment "a -j b" -j KUBE-SVC-NOPE',
        "-A KUBE-SVC-NOPE -j DNAT --to-destination 10.0.0.1:80",
        "-A KUBE-SERVICES -j OUTPUT",
        "COMMIT",
        "*filter",
        "-A INPUT -j ACCEPT",
    ])
    problems = kp.check_jumps(bad)
    assert problems == [
        "line 4: nat: chain KUBE-SERVICES declared twice",
        "line 6: nat: KUBE-SERVICES jumps to undeclared chain KUBE-SVC-NOPE",
        "line 7: nat: rule in undeclared chain KUBE-SVC-NOPE",
        "line 8: nat: KUBE-SERVICES jumps to built-in chain OUTPUT",
        "table filter has no COMMIT",
    ]


def test_tables_reads_iptables_save_output() -> None:
    saved = "\n".join([
        "# Generated by iptables-save v1.8.9",
        "*nat",
        ":PREROUTING ACCEPT [12:720]",
        ":KUBE-SVC-X - [0:0]",
        "-A PREROUTING -j KUBE-SVC-X",
        "COMMIT",
        "# Completed",
    ])
    assert kp.tables(saved) == {"nat": {"PREROUTING": ["-j KUBE-SVC-X"], "KUBE-SVC-X": []}}


# ------------------------------------------------------- loading into a throwaway namespace (root)


def _in_scratch_netns(script: str, text: str) -> subprocess.CompletedProcess[str]:
    require_root()
    require_tool("iptables-legacy-restore")
    require_tool("unshare")
    return subprocess.run(["unshare", "-n", "sh", "-c", script], input=text, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("case", sorted(CASES))
def test_iptables_legacy_restore_parses_the_golden(case: str) -> None:
    proc = _in_scratch_netns("iptables-legacy-restore -w 5 --test", (GOLDEN / f"{case}.rules").read_text())
    assert proc.returncode == 0, proc.stderr


def _as_saved(spec: str) -> str:
    """A rule as iptables-save prints it back: MARK shorthands and the probability in kernel fixed point."""
    spec = re.sub(r"--or-mark (\S+)", r"--set-xmark \1/\1", spec)
    spec = re.sub(r"--xor-mark (\S+)", r"--set-xmark \1/0x0", spec)

    def fixed(m: re.Match[str]) -> str:  # xt_statistic keeps lround(p * 2^31), printed with %.11f
        return f"--probability {math.floor(float(m.group(1)) * 0x80000000 + 0.5) / 0x80000000:.11f}"

    return re.sub(r"--probability (\S+)", fixed, spec)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_kernel_holds_exactly_the_rendered_rules(case: str) -> None:
    """Load for real and read back: iptables-save shows the same chains and rules, in the same order."""
    text = (GOLDEN / f"{case}.rules").read_text()
    proc = _in_scratch_netns("iptables-legacy-restore -w 5 && iptables-legacy-save", text)
    assert proc.returncode == 0, proc.stderr
    expected = {table: {chain: [_as_saved(rule) for rule in rules] for chain, rules in content.items()}
                for table, content in kp.tables(text).items()}
    saved = kp.tables(proc.stdout)
    assert {t: saved[t] for t in expected} == expected
    # Chains in the order iptables-save lists them, too.
    assert [list(saved[t]) for t in expected] == [list(c) for c in expected.values()]


def test_partial_sync_writes_only_the_changed_chains() -> None:
    """kube-proxy's partial sync (Kubernetes 1.28+, issue 17): after one more service only its chains are
    written (flushed and filled) besides the top-level chains, which kube-proxy writes whole on every sync
    (KUBE-SERVICES, KUBE-NODEPORTS, KUBE-EXTERNAL-SERVICES); a removed service's chains are flushed and
    deleted; a change to a built-in chain needs a full restore."""
    from bench.services import CLUSTER as C, NODE as N, service_ports

    sps = service_ports(50)
    more = sps + service_ports(51)[50:]
    before, after = kp.render(N, sps, C), kp.render(N, more, C)
    delta = kp.render_delta(before, after)
    assert delta is not None
    lines = delta.splitlines()
    written = {line.split()[1] for line in lines if line.startswith("-A ")}
    assert {c for c in written if not c.startswith(("KUBE-SVC-", "KUBE-SEP-"))} <= {
        "KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES"}
    assert all("svc-50" in line for line in lines if line.startswith("-A KUBE-S") and "KUBE-SERVICES" not in line)
    assert ":KUBE-SERVICES - [0:0]" in lines  # written whole: every service's rule, the new one included
    assert sum(line.startswith("-A KUBE-SERVICES ") for line in lines) == sum(
        line.startswith("-A KUBE-SERVICES ") for line in after.splitlines())
    back = kp.render_delta(after, before)
    assert back is not None and sum(line.startswith("-X ") for line in back.splitlines()) == 3  # SVC + 2 SEP
    assert kp.render_delta(after, after) is not None  # the top-level chains are written on every sync


def test_partial_sync_restores_a_service_rule_deleted_by_hand() -> None:
    """A KUBE-SERVICES rule deleted by hand (`lab break rule-delete`) is back after the next sync, as with
    kube-proxy, which writes KUBE-SERVICES whole every time: the delta holds that service's jump."""
    from bench.services import CLUSTER as C, NODE as N, service_ports

    sps = service_ports(3)
    before, after = kp.render(N, sps, C), kp.render(N, sps + service_ports(4)[3:], C)
    lost = next(line for line in before.splitlines() if line.startswith("-A KUBE-SERVICES ") and "svc-1 " in line)
    delta = kp.render_delta(before, after)
    assert lost in delta.splitlines()


    assert kp.render_delta(before, before.replace("-A PREROUTING ", "-A PREROUTING -i lo ", 1)) is None


# ------------------------------------------------------------------------------ the shared text body


def _reference_text(plan: kp.Plan) -> str:
    """Plan.text() rendered the direct way, table by table, with nothing shared between nodes."""
    filt, nat = kp._Table("filter", kp.FILTER_BUILTINS), kp._Table("nat", kp.NAT_BUILTINS)
    kp._skeleton(filt, nat)
    for part in plan.parts:
        for table, chain, spec in part:
            target = filt if table == "filter" else nat
            target.chain(chain) if spec is None else target.add(chain, spec)
    nat.add(kp.KUBE_SERVICES, kp.NODEPORTS_JUMP)
    kp._forward_rules(filt)
    if plan.egress is not None:
        nat.chain(*{line.split(" ", 2)[1] for line in plan.egress} - set(kp.NAT_BUILTINS))
    egress = plan.egress if plan.egress is not None else kp.egress_masquerade(plan.cluster.pod_cidr, plan.node.pod_cidr)
    for line in egress:
        nat.add_line(line)
    header = f"# kubenet-lab: kube-proxy (iptables mode) and flannel egress NAT for node {plan.node.name}"
    return "\n".join([header, *filt.lines(), *nat.lines()]) + "\n"


@pytest.mark.parametrize("case", sorted(CASES))
def test_nodes_sharing_a_body_each_get_their_own_lines(case: str) -> None:
    # Plan.text() renders what does not depend on the node once and shares it: the second and third nodes'
    # texts must still be exactly their own (their header and egress NAT lines, nobody else's).
    _node, sps = CASES[case]
    other = Node("node9", IPv4Address("192.168.1.19"), IPv4Network("10.244.9.0/24"), 9)
    aws = kp.aws_snat(IPv4Address("192.168.1.20"), [IPv4Network("192.168.0.0/16")], [IPv4Address("192.168.1.99")])
    kp.forget()
    for node, egress in ((NODE1, None), (other, None), (NODE1, aws), (other, []), (NODE1, None)):
        plan = kp.plan(node, sps, CLUSTER, egress)
        assert plan.text() == _reference_text(plan), (node.name, egress)


def test_legacy_loads_lock_a_file_of_their_node(tmp_path: Path) -> None:
    """The legacy loaders of one node lock a file of that node's own (XTABLES_LOCKFILE, next to its saved
    rules) instead of the machine-wide /run/xtables.lock, so 100 nodes' loads run in parallel rather than
    queueing on one lock (tables are per namespace). Held by someone else, that file makes the load wait and
    give up (`-w 5`, twice: the partial load, then the full one); the machine-wide lock is left alone here."""
    require_root()
    require_tool("iptables-legacy-restore")
    require_tool("flock")
    import uuid

    from bench.services import CLUSTER as C, NODE as N, service_ports
    from services import kube_proxy
    from topo import names, netns
    from topo.errors import ApplyError

    ns = names.node_netns(f"kpt{uuid.uuid4().hex[:6]}", "node1")  # lab-shaped: `lab clean` finds it after a crash
    saved = tmp_path / "node1.iptables.rules"
    lock = tmp_path / "node1.iptables.rules.xtables.lock"
    netns.ensure_dir()
    netns.create(ns)
    try:
        kube_proxy.sync_iptables(ns, kp.plan(N, service_ports(2), C), "legacy", saved)
        with netns.entered(ns):
            rules = subprocess.run(["iptables-legacy-save", "-t", "nat"], capture_output=True, text=True).stdout
        assert "-A KUBE-SERVICES -d 10.96.0.100/32" in rules
        assert lock.exists()
        holder = subprocess.Popen(["flock", str(lock), "sleep", "60"])
        try:
            while subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0:
                pass  # until the holder has it
            with pytest.raises(ApplyError, match=r"lock .*node1\.iptables\.rules\.xtables\.lock"):
                kube_proxy.sync_iptables(ns, kp.plan(N, service_ports(3), C), "legacy", saved)
        finally:
            holder.kill()
            holder.wait()
    finally:
        netns.delete(ns)


def test_nodes_planned_at_once_render_a_service_port_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # services/kube_proxy.py syncs nodes in parallel threads: all of them missing the memo at once used to
    # render the same big service port once each (4 renders of 10,000 endpoints for 4 workers).
    import threading

    calls = []
    real = kp._service_port
    monkeypatch.setattr(kp, "_service_port", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    eps = tuple(ep(f"10.244.{i // 200}.{i % 200 + 2}", 8080, "node1", f"p{i}") for i in range(2000))
    big = [sp(WEB, 0, *eps)]
    kp.forget()
    start = threading.Barrier(4)
    texts: list[str] = []

    def one(i: int) -> None:
        node = Node(f"node{i}", IPv4Address(f"192.168.1.{20 + i}"), IPv4Network(f"10.244.{20 + i}.0/24"), i)
        start.wait()
        texts.append(kp.plan(node, big, CLUSTER).text())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(texts) == 4 and len({t.split("\n", 1)[1] for t in texts}) == 4  # each node's own egress lines
