"""kube-proxy's IPVS mode as a plan: virtual servers, kube-ipvs0 addresses, ipsets and the nat helper rules.

This kernel has no IPVS, so nothing is loaded: the renders are compared with golden files under
golden/ipvs/ (<case>.ipvsadm, <case>.ipset, <case>.iptables) and checked textually for what the loaders
would refuse. To rewrite the goldens after a deliberate change, run with KUBENET_UPDATE_GOLDEN=1 and read
every diff before committing. No test needs root.
"""
from __future__ import annotations

import random
import re
import shlex
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from tests.conftest import assert_golden
from services import kube_proxy_ipvs as ipvs
from services.endpoints import Endpoint, ServicePortEndpoints
from topo.model import Cluster, Node, Service, ServicePort

GOLDEN = Path(__file__).parent / "golden" / "ipvs"
CLUSTER = Cluster()
NODE1 = Node("node1", IPv4Address("192.168.1.10"), IPv4Network("10.244.1.0/24"), 0)
NODE2 = Node("node2", IPv4Address("192.168.1.11"), IPv4Network("10.244.2.0/24"), 1)
NODE3 = Node("node3", IPv4Address("192.168.1.12"), IPv4Network("10.244.3.0/24"), 2)
NODES = {n.name: n for n in (NODE1, NODE2, NODE3)}


def svc(name: str, vip: str, *ports: ServicePort, **spec: object) -> Service:
    return Service(name, "default", IPv4Address(vip), tuple(ports), (("app", name),), **spec)  # type: ignore[arg-type]


def ep(ip: str, port: int, node: str, pod: str) -> Endpoint:
    return Endpoint(IPv4Address(ip), port, node, f"default/{pod}")


def sps_of(service: Service, *endpoints: Endpoint) -> list[ServicePortEndpoints]:
    """One entry per port of the service; an endpoint belongs to the port whose target port it has."""
    return [ServicePortEndpoints(service, p, tuple(e for e in endpoints if e.port == p.target_port))
            for p in service.ports]


HTTP = ServicePort("http", 80, 8080)
WEB = svc("web", "10.96.0.100", HTTP)
WEB_EPS = (ep("10.244.1.2", 8080, "node1", "web-1"), ep("10.244.2.2", 8080, "node2", "web-2"))


def case_clusterip_two_endpoints() -> list[ServicePortEndpoints]:
    return sps_of(WEB, *WEB_EPS)


def case_no_endpoints() -> list[ServicePortEndpoints]:
    return sps_of(svc("idle", "10.96.0.50", ServicePort("", 80, 8080)))


def case_client_ip_affinity() -> list[ServicePortEndpoints]:
    sticky = svc("sticky", "10.96.0.60", HTTP, session_affinity="ClientIP")
    return sps_of(sticky, *WEB_EPS)


def case_nodeport_cluster() -> list[ServicePortEndpoints]:
    web_np = svc("web-np", "10.96.0.70", ServicePort("http", 80, 8080, node_port=30080), type="NodePort")
    return sps_of(web_np, *WEB_EPS)


LOCAL = svc("solo-local", "10.96.0.80", ServicePort("http", 80, 8080, node_port=30081), type="NodePort",
            external_traffic_policy="Local")
LOCAL_EPS = (ep("10.244.1.5", 8080, "node1", "solo-a"), ep("10.244.2.5", 8080, "node2", "solo-b"),
             ep("10.244.2.6", 8080, "node2", "solo-c"))


def case_nodeport_local() -> list[ServicePortEndpoints]:
    return sps_of(LOCAL, *LOCAL_EPS)


def case_udp() -> list[ServicePortEndpoints]:
    dns = Service("kube-dns", "kube-system", IPv4Address("10.96.0.10"),
                  (ServicePort("dns", 53, 53, "UDP"), ServicePort("dns-tcp", 53, 53, "TCP")), (("k8s-app", "dns"),))
    dns_eps = (Endpoint(IPv4Address("10.244.1.3"), 53, "node1", "kube-system/coredns-a"),
               Endpoint(IPv4Address("10.244.2.3"), 53, "node2", "kube-system/coredns-b"))
    echo = svc("echo", "10.96.0.90", ServicePort("", 7, 7, "UDP", node_port=30007), type="NodePort")
    return sps_of(dns, *dns_eps) + sps_of(echo, ep("10.244.2.7", 7, "node2", "echo"))


# (golden name, node, service ports)
CASES = [
    ("clusterip-two-endpoints", "node1", case_clusterip_two_endpoints),
    ("no-endpoints", "node1", case_no_endpoints),
    ("client-ip-affinity", "node1", case_client_ip_affinity),
    ("nodeport-cluster", "node1", case_nodeport_cluster),
    ("nodeport-local-node2", "node2", case_nodeport_local),  # local endpoints: only they are real servers
    ("nodeport-local-node3", "node3", case_nodeport_local),  # none here: kube-proxy falls back to all
    ("udp", "node1", case_udp),
]
RENDERS = {"ipvsadm": ipvs.render_ipvsadm, "ipset": ipvs.render_ipset, "iptables": ipvs.render_iptables}


def plan_of(case: str) -> ipvs.IpvsPlan:
    for name, node, make in CASES:
        if name == case:
            return ipvs.build(NODES[node], make(), CLUSTER)
    raise KeyError(case)


# ------------------------------------------------------------------ textual checks (the loaders' rules)

BUILTIN_TARGETS = {"ACCEPT", "DROP", "RETURN", "REJECT", "MASQUERADE", "MARK", "SNAT", "DNAT", "LOG"}


def check_iptables(text: str, sets: set[str]) -> None:
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*nat" and lines[-1] == "COMMIT" and lines.count("COMMIT") == 1
    chains: dict[str, str] = {}
    for line in lines[1:-1]:
        if line.startswith(":"):
            name, policy, counters = line[1:].split(" ")
            assert name not in chains and counters == "[0:0]", line
            chains[name] = policy
    assert {c for c, p in chains.items() if p != "-"} <= {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}
    for line in lines[1:-1]:
        if line.startswith(":"):
            continue
        words = shlex.split(line)  # quotes must balance, as iptables-restore's parser needs
        assert words[0] == "-A" and words[1] in chains, line
        assert words.count("-j") == 1, line
        target = words[words.index("-j") + 1]
        assert target in BUILTIN_TARGETS or target in chains, f"undeclared target {target}: {line}"
        if "--match-set" in words:
            name, dirs = words[words.index("--match-set") + 1: words.index("--match-set") + 3]
            assert name in sets, line
            assert re.fullmatch(r"(src|dst)(,(src|dst)){0,2}", dirs), line
        if "--comment" in words:
            assert len(words[words.index("--comment") + 1]) <= 256, line


ENTRY = {
    "hash:ip,port": r"\d+\.\d+\.\d+\.\d+,(tcp|udp|sctp):\d+",
    "hash:ip,port,ip": r"\d+\.\d+\.\d+\.\d+,(tcp|udp|sctp):\d+,\d+\.\d+\.\d+\.\d+",
    "bitmap:port": r"\d+",
}


def check_ipset(text: str) -> dict[str, list[str]]:
    created: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if words[0] == "create":
            name, kind = words[1], words[2]
            assert len(name) <= 31 and name not in created, line
            if kind == "bitmap:port":
                assert words[3:] == ["range", "0-65535", "-exist"], line
            else:
                assert words[3:] == ["family", "inet", "hashsize", "1024", "maxelem", "65536", "-exist"], line
            created[name] = kind
            members[name] = []
        elif words[0] == "flush":
            assert len(words) == 2 and words[1] in created and not members[words[1]], line
        elif words[0] == "add":
            assert len(words) == 3 and words[1] in created, line
            assert re.fullmatch(ENTRY[created[words[1]]], words[2]), line
            assert words[2] not in members[words[1]], f"duplicate: {line}"
            members[words[1]].append(words[2])
        else:
            raise AssertionError(f"not an ipset restore command: {line}")
    return members


VS_LINE = re.compile(r"-A (-t|-u|--sctp-service) (\d+\.\d+\.\d+\.\d+:\d+) -s rr( -p \d+)?")
RS_LINE = re.compile(r"-a (-t|-u|--sctp-service) (\d+\.\d+\.\d+\.\d+:\d+) -r (\d+\.\d+\.\d+\.\d+:\d+) -m -w 1")


def check_ipvsadm(text: str) -> dict[str, list[str]]:
    lines = [line.split("#")[0].strip() for line in text.splitlines()]  # ipvsadm drops all after '#'
    lines = [line for line in lines if line]
    assert lines[0] == "-C"
    services: dict[str, list[str]] = {}
    for line in lines[1:]:
        if m := VS_LINE.fullmatch(line):
            key = f"{m[1]} {m[2]}"
            assert key not in services, line
            services[key] = []
        elif m := RS_LINE.fullmatch(line):
            key = f"{m[1]} {m[2]}"
            assert key in services and m[3] not in services[key], line
            services[key].append(m[3])
        else:
            raise AssertionError(f"not an ipvsadm-restore line: {line}")
    return services


# ------------------------------------------------------------------ golden files


@pytest.mark.parametrize("case", [c[0] for c in CASES])
@pytest.mark.parametrize("kind", list(RENDERS))
def test_render_matches_the_golden_file(case: str, kind: str) -> None:
    assert_golden(GOLDEN / f"{case}.{kind}", RENDERS[kind](plan_of(case)))


def test_every_golden_file_belongs_to_a_case() -> None:
    expected = {f"{case}.{kind}" for case, _, _ in CASES for kind in RENDERS}
    assert {p.name for p in GOLDEN.iterdir()} == expected


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_renders_pass_the_loaders_rules(case: str) -> None:
    plan = plan_of(case)
    members = check_ipset(ipvs.render_ipset(plan))
    check_iptables(ipvs.render_iptables(plan), set(members))
    services = check_ipvsadm(ipvs.render_ipvsadm(plan))
    assert len(services) == len(plan.virtual_servers)
    assert members == {name: list(entries) for name, (_, entries) in plan.ipsets.items()}


# ------------------------------------------------------------------ the plan's facts


def test_clusterip_is_one_rr_virtual_server_with_every_endpoint_masqueraded() -> None:
    plan = plan_of("clusterip-two-endpoints")
    (vs,) = plan.virtual_servers
    assert (vs.ip, vs.port, vs.protocol, vs.scheduler, vs.persistence) == (IPv4Address("10.96.0.100"), 80, "tcp",
                                                                          "rr", None)
    assert vs.reals == (ipvs.RealServer(IPv4Address("10.244.1.2"), 8080), ipvs.RealServer(IPv4Address("10.244.2.2"), 8080))
    assert all(rs.weight == 1 for rs in vs.reals) and vs.comment == "default/web:http"
    assert plan.dummy == "kube-ipvs0" and plan.addresses == (IPv4Address("10.96.0.100"),)
    assert plan.ipsets["KUBE-CLUSTER-IP"] == ("hash:ip,port", ("10.96.0.100,tcp:80",))
    # hairpin: only this node's endpoint, dst ip:port and the same ip as source
    assert plan.ipsets["KUBE-LOOP-BACK"] == ("hash:ip,port,ip", ("10.244.1.2,tcp:8080,10.244.1.2",))
    assert ipvs.build(NODE2, case_clusterip_two_endpoints(), CLUSTER).ipsets["KUBE-LOOP-BACK"][1] == (
        "10.244.2.2,tcp:8080,10.244.2.2",)


def test_a_service_without_endpoints_keeps_its_virtual_server_and_its_address() -> None:
    plan = plan_of("no-endpoints")
    (vs,) = plan.virtual_servers
    assert vs.reals == () and vs.comment == "default/idle"
    assert ipvs.ping_answers(plan, "10.96.0.50")
    assert "-A -t 10.96.0.50:80 -s rr\n" in ipvs.render_ipvsadm(plan) and "-a " not in ipvs.render_ipvsadm(plan)


def test_client_ip_affinity_is_persistence_with_the_services_timeout() -> None:
    assert plan_of("client-ip-affinity").virtual_servers[0].persistence == 10800
    short = svc("short", "10.96.0.61", HTTP, session_affinity="ClientIP", affinity_timeout=60)
    plan = ipvs.build(NODE1, sps_of(short, *WEB_EPS), CLUSTER)
    assert "-A -t 10.96.0.61:80 -s rr -p 60\n" in ipvs.render_ipvsadm(plan)


def test_nodeport_is_a_virtual_server_on_the_node_ip_not_bound_to_the_dummy() -> None:
    plan = plan_of("nodeport-cluster")
    by_addr = {(vs.ip, vs.port): vs for vs in plan.virtual_servers}
    node_vs = by_addr[(NODE1.ip, 30080)]
    assert node_vs.reals == by_addr[(IPv4Address("10.96.0.70"), 80)].reals and len(node_vs.reals) == 2
    assert plan.addresses == (IPv4Address("10.96.0.70"),)
    assert not ipvs.ping_answers(plan, NODE1.ip)  # eth0 holds it, not kube-ipvs0
    assert plan.ipsets["KUBE-NODE-PORT-TCP"] == ("bitmap:port", ("30080",))
    assert plan.ipsets["KUBE-NODE-PORT-LOCAL-TCP"][1] == ()
    rules = ipvs.render_iptables(plan)
    assert ('-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for masquerade purpose" '
            "-m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ") in rules
    assert "KUBE-NODE-PORT-LOCAL-TCP" not in rules  # an empty set gets no rule, as in kube-proxy


def test_nodeport_local_uses_local_endpoints_and_falls_back_to_all_without_any() -> None:
    def node_port_reals(node: Node) -> set[str]:
        plan = ipvs.build(node, case_nodeport_local(), CLUSTER)
        (vs,) = [vs for vs in plan.virtual_servers if vs.ip == node.ip]
        cluster_vs = [vs for vs in plan.virtual_servers if vs.ip == IPv4Address("10.96.0.80")][0]
        assert len(cluster_vs.reals) == 3  # the ClusterIP ignores externalTrafficPolicy
        return {str(rs.ip) for rs in vs.reals}

    assert node_port_reals(NODE1) == {"10.244.1.5"}
    assert node_port_reals(NODE2) == {"10.244.2.5", "10.244.2.6"}
    assert node_port_reals(NODE3) == {"10.244.1.5", "10.244.2.5", "10.244.2.6"}  # kubernetes#97081


def test_nodeport_local_returns_before_the_masquerade_mark() -> None:
    plan = plan_of("nodeport-local-node2")
    assert plan.ipsets["KUBE-NODE-PORT-LOCAL-TCP"][1] == ("30081",) == plan.ipsets["KUBE-NODE-PORT-TCP"][1]
    rules = ipvs.render_iptables(plan).splitlines()
    local = next(i for i, r in enumerate(rules) if "--match-set KUBE-NODE-PORT-LOCAL-TCP dst -j RETURN" in r)
    masq = next(i for i, r in enumerate(rules) if "--match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ" in r)
    assert local < masq


def test_udp_and_sctp_use_their_ipvsadm_flags_and_sets() -> None:
    plan = plan_of("udp")
    out = ipvs.render_ipvsadm(plan)
    assert "-A -u 10.96.0.10:53 -s rr\n" in out and "-A -t 10.96.0.10:53 -s rr\n" in out
    assert "-a -u 10.96.0.10:53 -r 10.244.1.3:53 -m -w 1\n" in out
    assert plan.ipsets["KUBE-NODE-PORT-UDP"][1] == ("30007",)
    assert plan.ipsets["KUBE-CLUSTER-IP"][1] == ("10.96.0.10,tcp:53", "10.96.0.10,udp:53", "10.96.0.90,udp:7")
    assert "-p udp" in ipvs.render_iptables(plan)

    sctp = svc("sig", "10.96.0.95", ServicePort("", 3868, 3868, "SCTP", node_port=30868), type="NodePort")
    plan = ipvs.build(NODE1, sps_of(sctp, ep("10.244.1.9", 3868, "node1", "sig")), CLUSTER)
    out = ipvs.render_ipvsadm(plan)
    assert "-A --sctp-service 10.96.0.95:3868 -s rr\n" in out
    assert "-a --sctp-service 192.168.1.10:30868 -r 10.244.1.9:3868 -m -w 1\n" in out
    assert plan.ipsets["KUBE-NODE-PORT-SCTP-HASH"] == ("hash:ip,port", ("192.168.1.10,sctp:30868",))
    members = check_ipset(ipvs.render_ipset(plan))
    check_iptables(ipvs.render_iptables(plan), set(members))
    check_ipvsadm(out)


def test_clusterip_masquerade_follows_cluster_cidr_semantics() -> None:
    rules = ipvs.render_iptables(plan_of("clusterip-two-endpoints"))
    assert ('-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" '
            "-m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ\n") in rules
    other = ipvs.build(NODE1, case_clusterip_two_endpoints(), Cluster(pod_cidr=IPv4Network("10.32.0.0/12")))
    assert "! -s 10.32.0.0/12 -j KUBE-MARK-MASQ" in other.iptables
    assert ('-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip for solving '
            'hairpin purpose" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE\n') in rules
    assert "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n" in rules
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n" in rules
    for builtin, chain in (("PREROUTING", "KUBE-SERVICES"), ("OUTPUT", "KUBE-SERVICES"),
                           ("POSTROUTING", "KUBE-POSTROUTING")):
        assert re.search(rf"^-A {builtin} .* -j {chain}$", rules, re.M)


def test_no_services_still_gives_loadable_renders() -> None:
    plan = ipvs.build(NODE1, [], CLUSTER)
    assert plan.virtual_servers == () and plan.addresses == ()
    members = check_ipset(ipvs.render_ipset(plan))
    assert set(members) == set(ipvs.IPSETS) and not any(members.values())  # created anyway, as kube-proxy does
    check_iptables(ipvs.render_iptables(plan), set(members))
    assert "--match-set" not in plan.iptables
    assert check_ipvsadm(ipvs.render_ipvsadm(plan)) == {}


def test_headless_services_are_ignored() -> None:
    headless = Service("db", "default", None, (HTTP,), (("app", "db"),))
    plan = ipvs.build(NODE1, sps_of(headless, *WEB_EPS), CLUSTER)
    assert plan.virtual_servers == () and plan.addresses == ()


def test_ping_answers_for_a_clusterip_but_not_a_pod_ip() -> None:
    plan = plan_of("clusterip-two-endpoints")
    assert ipvs.ping_answers(plan, IPv4Address("10.96.0.100"))
    assert ipvs.ping_answers(plan, "10.96.0.100")
    assert not ipvs.ping_answers(plan, "10.244.1.2")  # a pod IP: the pod answers, not kube-ipvs0
    assert not ipvs.ping_answers(plan, "10.96.0.101")  # an unallocated VIP


def test_addresses_are_bound_as_host_routes_on_the_dummy() -> None:
    plan = ipvs.build(NODE1, case_clusterip_two_endpoints() + case_udp(), CLUSTER)
    assert plan.addresses == tuple(sorted({IPv4Address("10.96.0.100"), IPv4Address("10.96.0.10"),
                                           IPv4Address("10.96.0.90")}))
    assert ipvs.render_addresses(plan) == [
        ["ip", "link", "add", "kube-ipvs0", "type", "dummy"],
        ["ip", "addr", "add", "10.96.0.10/32", "dev", "kube-ipvs0"],
        ["ip", "addr", "add", "10.96.0.90/32", "dev", "kube-ipvs0"],
        ["ip", "addr", "add", "10.96.0.100/32", "dev", "kube-ipvs0"],
    ]


def test_output_does_not_depend_on_input_order() -> None:
    sps = (case_clusterip_two_endpoints() + case_client_ip_affinity() + case_nodeport_cluster()
           + case_nodeport_local() + case_udp() + case_no_endpoints())
    want = ipvs.build(NODE2, sps, CLUSTER)
    rng = random.Random(7)
    for _ in range(5):
        shuffled = list(sps)
        rng.shuffle(shuffled)
        shuffled = [ServicePortEndpoints(s.service, s.port, tuple(rng.sample(s.endpoints, len(s.endpoints))))
                    for s in shuffled]
        got = ipvs.build(NODE2, shuffled, CLUSTER)
        assert got == want
        assert [r(got) for r in RENDERS.values()] == [r(want) for r in RENDERS.values()]
