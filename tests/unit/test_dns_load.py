"""Issue 21, the pure parts: kubelet's merge of the node's host search domains (and its limits), the spec's
new DNS fields and their one-line errors, the CPU quota kubelet computes, NodeLocal DNSCache's rules and
configuration, and the wire parser that tells which queries a resolver sent in parallel."""
from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address

import pytest

from apiserver.spec import parse_spec_text
from kubelet import cgroups
from observe import dnswire
from services import addons, dns, nodelocal
from services.kube_proxy_iptables import check_jumps
from topo.errors import SpecError
from topo.model import DnsConfig, Pod

HEADER = """\
apiVersion: kubenet-lab/v1alpha1
kind: Lab
metadata: {name: t}
spec:
"""
NODES = "  nodes:\n    - {name: node1, ip: 192.168.1.10}\n    - {name: node2, ip: 192.168.1.11}\n"
CLUSTER_DNS = IPv4Address("10.96.0.10")


def _search(text: str) -> list[str]:
    return next(line.split()[1:] for line in text.splitlines() if line.startswith("search"))


def test_cluster_first_appends_the_nodes_host_search_domains() -> None:
    pod = Pod("p", "shop", "node1")
    text = dns.resolv_conf(pod, CLUSTER_DNS, "cluster.local", None, ("us-west-2.compute.internal",))
    assert text == ("search shop.svc.cluster.local svc.cluster.local cluster.local us-west-2.compute.internal\n"
                    "nameserver 10.96.0.10\noptions ndots:5\n")


def test_host_domains_dedupe_and_come_before_dnsconfig_searches() -> None:
    pod = Pod("p", "default", "node1", dns_config=DnsConfig(searches=("extra.example", "ec2.internal")))
    text = dns.resolv_conf(pod, CLUSTER_DNS, "cluster.local", None, ("ec2.internal", "cluster.local"))
    assert _search(text) == ["default.svc.cluster.local", "svc.cluster.local", "cluster.local", "ec2.internal",
                             "extra.example"]


def test_default_policy_takes_the_nodes_search_list() -> None:
    pod = Pod("p", "default", "node1", dns_policy="Default")
    text = dns.resolv_conf(pod, CLUSTER_DNS, "cluster.local", IPv4Address("192.168.1.200"), ("ec2.internal",))
    assert text == "search ec2.internal\nnameserver 192.168.1.200\n"


def test_kubelets_limits_32_domains_and_2048_characters() -> None:
    many = tuple(f"d{i}.example" for i in range(40))
    assert len(_search(dns.resolv_conf(Pod("p", "default", "n"), CLUSTER_DNS, "cluster.local", None, many))) == 32
    long = tuple(f"{'x' * 60}.{'y' * 60}.{'z' * 60}.d{i}" for i in range(20))  # about 190 characters each
    search = _search(dns.resolv_conf(Pod("p", "default", "n"), CLUSTER_DNS, "cluster.local", None, long))
    assert len(" ".join(search)) <= 2048 and len(search) < 23


def test_spec_node_search_default_and_per_node_override() -> None:
    lab = parse_spec_text(HEADER + "  dns: {nodeSearch: [ec2.internal]}\n  nodes:\n"
                          "    - {name: node1, ip: 192.168.1.10, dnsSearch: [us-west-2.compute.internal]}\n"
                          "    - {name: node2, ip: 192.168.1.11}\n", "t.yaml")
    assert addons.host_search(lab, "node1") == ("us-west-2.compute.internal",)
    assert addons.host_search(lab, "node2") == ("ec2.internal",)
    pod = Pod("p", "default", "node2")
    assert _search(addons.pod_resolv_conf(lab, pod))[-1] == "ec2.internal"


def test_spec_node_local_and_cpu_limit() -> None:
    lab = parse_spec_text(HEADER + "  dns: {nodeLocal: true, resources: {limits: {cpu: 100m}}}\n" + NODES, "t.yaml")
    assert lab.dns.node_local and lab.dns.cpu_limit_millis == 100
    assert "nameserver 169.254.20.10\n" in addons.pod_resolv_conf(lab, Pod("p", "default", "node1"))
    coredns = next(p for p in addons.with_addons(lab, __import__("pathlib").Path("/tmp")).pods if p.name == "coredns")
    assert coredns.containers[0].cpu_limit_millis == 100


@pytest.mark.parametrize("dns_yaml, where, words", [
    ("{nodeSearch: [Bad_Name]}", "spec.dns.nodeSearch[0]", "search domain"),
    ("{resources: {limits: {cpu: lots}}}", "spec.dns.resources.limits.cpu", "not a CPU quantity"),
    ("{resources: {limits: {cpu: 0m}}}", "spec.dns.resources.limits.cpu", "at least 1m"),
    ("{resources: {limits: {cpu: 1000}}}", "spec.dns.resources.limits.cpu", "more than 64 CPUs"),
])
def test_bad_dns_fields_are_one_line_errors_with_their_path(dns_yaml: str, where: str, words: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec_text(HEADER + f"  dns: {dns_yaml}\n" + NODES, "t.yaml")
    lines = info.value.lines()
    assert len(lines) == 1 and lines[0].startswith("t.yaml:5:") and where in lines[0] and words in lines[0], lines


def test_bad_node_search_domain_names_the_node() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec_text(HEADER + "  nodes:\n    - {name: node1, ip: 192.168.1.10, dnsSearch: [ok.example, 'a b']}\n",
                        "t.yaml")
    assert any("spec.nodes[0].dnsSearch[1]" in line for line in info.value.lines())


@pytest.mark.parametrize("millis, quota", [(100, 10_000), (250, 25_000), (1, 1_000), (2000, 200_000)])
def test_kubelets_quota(millis: int, quota: int) -> None:
    assert cgroups.quota_us(millis) == quota


def test_nodelocal_rules_load_and_conf() -> None:
    rules = nodelocal.notrack_rules()
    assert check_jumps(rules) == []
    assert rules.count("-j NOTRACK") == 4 and "-d 169.254.20.10/32 -p udp -m udp --dport 53" in rules
    conf = nodelocal.conf(CLUSTER_DNS, __import__("pathlib").Path("/x/q.log"))
    assert "listen-address=169.254.20.10\n" in conf and "server=10.96.0.10\n" in conf and "cache-size=0" not in conf


def _query(ident: int, name: str, qtype: int, response: bool = False, rcode: int = 0, answer: str | None = None) -> bytes:
    flags = (0x8000 if response else 0) | rcode
    body = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", qtype, 1)
    an = b""
    if answer:
        an = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + socket.inet_aton(answer)
    return struct.pack("!HHHHHH", ident, flags, 1, 1 if answer else 0, 0, 0) + body + an


def _frame(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, socket.inet_aton(src),
                     socket.inet_aton(dst))
    return b"\0" * 12 + b"\x08\x00" + ip + udp


def test_wire_pairs_queries_with_answers_and_numbers_parallel_steps() -> None:
    pod, server = "10.244.1.2", "10.96.0.10"
    frames = [  # glibc: A and AAAA together from one socket, then the next candidate
        (1.0000, True, _frame(pod, server, 4000, 53, _query(1, "api.example.com.svc", 1))),
        (1.0001, True, _frame(pod, server, 4000, 53, _query(2, "api.example.com.svc", 28))),
        (1.0003, False, _frame(server, pod, 53, 4000, _query(1, "api.example.com.svc", 1, True, 3))),
        (1.0004, False, _frame(server, pod, 53, 4000, _query(2, "api.example.com.svc", 28, True, 3))),
        (1.0010, True, _frame(pod, server, 4001, 53, _query(3, "api.example.com", 1))),
        (1.0012, False, _frame(server, pod, 53, 4001, _query(3, "api.example.com", 1, True, 0, "192.168.1.200"))),
        (1.0013, True, _frame(pod, server, 4001, 53, _query(4, "api.example.com", 28))),  # sent after: a new step
        (1.0015, False, _frame(server, pod, 53, 4001, _query(4, "api.example.com", 28, True, 0))),
    ]
    got = dnswire.exchanges(frames)
    assert [(q.qtype, q.name, q.step, q.rcode) for q in got] == [
        ("A", "api.example.com.svc", 1, "NXDOMAIN"), ("AAAA", "api.example.com.svc", 1, "NXDOMAIN"),
        ("A", "api.example.com", 2, "NOERROR"), ("AAAA", "api.example.com", 3, "NOERROR")]
    assert got[2].answers == ["192.168.1.200"] and got[0].sent == 0.0
    assert got[-1].answered == pytest.approx(0.0015)


def test_dns_count_says_one_step_and_one_query_in_the_singular() -> None:
    """`lab dns-count` printed "1 queries sent by the pod in 1 steps" for a lookup of one query."""
    from observe import dnscount

    wire = [dnswire.Exchange(0.0, "A", "web.default.svc.cluster.local", "10.96.0.10", 4000, answered=0.0004,
                             rcode="NOERROR", answers=["10.96.0.100"], step=1)]
    one = dns.Query("A", "web.default.svc.cluster.local", "10.244.1.2")
    count = dnscount.Count("default/a", "10.244.1.2", "web.default.svc.cluster.local.", "search x\n",
                           ["10.96.0.100"], cluster=[one], wire=wire)
    text = dnscount.render(count)
    assert "1 query sent by the pod in 1 step," in text and "1 query at the cluster DNS" in text, text
    assert "1 steps" not in text and "1 queries" not in text
    count.wire = wire + [dnswire.Exchange(0.001, "AAAA", "web.default.svc.cluster.local", "10.96.0.10", 4000,
                                          step=2)]
    assert "2 queries sent by the pod in 2 steps," in dnscount.render(count)
