"""DNS under load (issue 21): each resolver's queries as measured, the node's host search domains merged
into pods' resolv.conf (the explainer's "up to 10 queries"), NodeLocal DNSCache serving from the node,
and the cluster DNS pod's CPU limit. The storm itself is a benchmark (`lab bench dns`), run small in
test_bench.py."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kubelet import cgroups
from tests.conftest import require_tool
from tests.integration.conftest import lab, leftovers, pause_pod, unique

NAME = "api.example.com"
HOST_DOMAIN = "us-west-2.compute.internal"
SEARCH = ["default.svc.cluster.local", "svc.cluster.local", "cluster.local", HOST_DOMAIN]
# glibc, musl and Node's dns.lookup (glibc underneath) walk the whole list: each candidate A and AAAA
TEN = [(t, f"{NAME}.{d}") for d in SEARCH for t in ("A", "AAAA")] + [("A", NAME), ("AAAA", NAME)]


def spec(name: str, **dns: object) -> dict:
    return {"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"dns": {"node": "node2", "nodeSearch": [HOST_DOMAIN], **dns},
                     "external": [{"name": "upstream", "ip": "192.168.1.200", "serves": ["http", "dns"], "names": [NAME]}],
                     "nodes": [{"name": "node1", "ip": "192.168.1.10"}, {"name": "node2", "ip": "192.168.1.11"}],
                     "objects": [pause_pod("probe", "node1")]}}


def count(name: str, resolver: str = "glibc", host: str = NAME) -> dict:
    return json.loads(lab("dns-count", "--lab", name, "--json", "--resolver", resolver, "probe", host).stdout)


def seq(queries: list[dict]) -> list[tuple[str, str]]:
    return [(q["qtype"], q["name"]) for q in queries]


def test_resolvers_with_a_host_search_domain(lab_up) -> None:  # type: ignore[no-untyped-def]
    """One host search domain on the node: glibc's lookup of a two-dot name costs 10 queries at the cluster
    DNS (4 search candidates + the name, A and AAAA each), in this order; musl and Node's dns.lookup the
    same ten; Node's dns.resolve4/resolve6 (c-ares through node's query API) asks the name alone."""
    require_tool("musl-gcc")
    require_tool("node")
    name = unique("dnsres")
    lab_up(spec(name, resources={"limits": {"cpu": "200m"}}))
    resolv = lab("exec", "--lab", name, "probe", "--", "cat", "/etc/resolv.conf").stdout
    assert f"search {' '.join(SEARCH)}\n" in resolv and "options ndots:5" in resolv
    measured = {r: count(name, r) for r in ("glibc", "musl", "node-lookup", "node-resolve")}
    for resolver in ("glibc", "musl", "node-lookup"):
        got = measured[resolver]
        assert seq(got["clusterQueries"]) == TEN, resolver
        assert seq(got["podQueries"]) == TEN, resolver  # what left the pod is what the DNS logged
        assert got["answer"] == ["192.168.1.200"], resolver
        assert [q["rcode"] for q in got["podQueries"]] == ["NXDOMAIN"] * 8 + ["NOERROR"] * 2, resolver
    resolve = measured["node-resolve"]
    assert seq(resolve["clusterQueries"]) == [("A", NAME), ("AAAA", NAME)]
    assert resolve["answer"] == ["192.168.1.200"]
    # the upstream sees only what the cluster DNS cannot answer: the host-domain candidate and the name
    assert seq(measured["glibc"]["upstreamQueries"]) == [("A", f"{NAME}.{HOST_DOMAIN}"), ("AAAA", f"{NAME}.{HOST_DOMAIN}"),
                                                        ("A", NAME), ("AAAA", NAME)]


def test_cpu_limit_on_the_dns_pod(lab_up) -> None:  # type: ignore[no-untyped-def]
    """spec.dns.resources.limits.cpu: 250m puts the DNS pod's dnsmasq in a cgroup of the lab's tree with
    kubelet's quota (25 ms every 100 ms); lab down removes the cgroups."""
    name = unique("dnscpu")
    lab_up(spec(name, resources={"limits": {"cpu": "250m"}}))
    groups = [Path(p) for p in cgroups.leftovers(name)]
    assert groups, "no cgroup for the lab"
    found = [g for g in groups[0].rglob("cgroup.procs") if g.read_text().split()]
    assert len(found) == 1 and "coredns" in str(found[0])
    pid = found[0].read_text().split()[0]
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "dnsmasq"
    assert cgroups.quota_of(found[0].parent) == (25_000, 100_000)
    assert count(name, host=NAME + ".")["answer"] == ["192.168.1.200"]  # still answers
    lab("down", name)
    assert leftovers(name) == {"netns": [], "state": []}  # includes the cgroup tree


def test_node_local_dns_cache(lab_up) -> None:  # type: ignore[no-untyped-def]
    """spec.dns.nodeLocal: pods ask 169.254.20.10 on their node; the first lookup's misses reach the cluster
    DNS, the same lookup again is answered from the node's cache and never reaches it; NOTRACK rules are in
    every node's raw table, and the cache's queries leave no conntrack entries."""
    name = unique("dnsnl")
    lab_up(spec(name, nodeLocal=True))
    resolv = lab("exec", "--lab", name, "probe", "--", "cat", "/etc/resolv.conf").stdout
    assert "nameserver 169.254.20.10\n" in resolv and "10.96.0.10" not in resolv
    first = count(name)
    assert {q["server"] for q in first["podQueries"]} == {"169.254.20.10"}
    assert seq(first["nodeCacheQueries"]) == TEN
    assert first["clusterQueries"] and first["answer"] == ["192.168.1.200"]
    again = count(name)
    assert {q["server"] for q in again["podQueries"]} == {"169.254.20.10"}
    assert seq(again["nodeCacheQueries"]) == TEN
    assert again["clusterQueries"] == [] and again["upstreamQueries"] == []
    assert again["nodeCacheHits"] == 10 and again["answer"] == ["192.168.1.200"]
    for node in ("node1", "node2"):
        ns = f"klab_{name}_n_{node}"
        raw = subprocess.run(["ip", "netns", "exec", ns, "iptables-save", "-t", "raw"], capture_output=True,
                             text=True, check=True).stdout
        for rule in ("-d 169.254.20.10/32 -p udp -m udp --dport 53", "-s 169.254.20.10/32 -p udp -m udp --sport 53",
                     "-d 169.254.20.10/32 -p tcp -m tcp --dport 53", "-s 169.254.20.10/32 -p tcp -m tcp --sport 53"):
            assert any(rule in line and "NOTRACK" in line for line in raw.splitlines()), (node, rule)
        assert "-A PREROUTING -j KUBENET-NODELOCALDNS" in raw and "-A OUTPUT -j KUBENET-NODELOCALDNS" in raw
        if node == "node1":
            tracked = subprocess.run(["ip", "netns", "exec", ns, "conntrack", "-L", "-d", "169.254.20.10"],
                                     capture_output=True, text=True).stdout
            assert "169.254.20.10" not in tracked
