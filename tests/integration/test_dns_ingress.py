"""The cluster DNS (the CoreDNS role), the ndots:5 gotcha measured for real, and Ingress vs NodePort."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool
from tests.integration.conftest import in_lab, lab, leftovers, unique, write_spec

pytestmark = pytest.mark.integration

AGNHOST = [{"name": "app", "image": "agnhost", "args": ["netexec", "--http-port=8080"],
            "ports": [{"name": "http", "containerPort": 8080}]}]


def pod(name: str, node: str, app: str, namespace: str = "default", **spec: object) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": AGNHOST, **spec}}


def service(name: str, app: str, **spec: object) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}], **spec}}


def base_lab(name: str, objects: list[dict], **extra: object) -> dict:
    return {"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"nodes": [{"name": "node1", "ip": "192.168.1.10"}, {"name": "node2", "ip": "192.168.1.11"}],
                     "external": [{"name": "outside", "ip": "192.168.1.200", "serves": ["http", "dns"],
                                   "names": ["api.example.com"]}],
                     "objects": objects, **extra}}


@pytest.fixture(scope="module")
def dns_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_root()
    require_tool("mnexec")
    require_tool("dnsmasq")
    name = unique("dns")
    objects = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}},
               pod("web-1", "node1", "web"), pod("web-2", "node1", "web"), pod("web-3", "node2", "web"),
               pod("client", "node1", "client"),
               pod("lean", "node1", "lean", dnsConfig={"options": [{"name": "ndots", "value": "1"}]}),
               pod("other", "node2", "client", namespace="team"),
               service("web", "web"), service("web-headless", "web", clusterIP="None")]
    lab("up", str(write_spec(tmp_path_factory.mktemp(name), base_lab(name, objects))))
    yield name
    lab("down", name)
    assert leftovers(name) == {"netns": [], "state": []}


def lookup(lab_name: str, pod_name: str, host: str, database: str = "ahostsv4") -> set[str]:
    out = lab("exec", "--lab", lab_name, pod_name, "--", "getent", database, host, check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def count(lab_name: str, pod_name: str, host: str, family: str = "any") -> tuple[int, int]:
    data = json.loads(lab("dns-count", "--lab", lab_name, "--json", "--family", family, pod_name, host).stdout)
    return len(data["clusterQueries"]), len(data["upstreamQueries"])


def test_pods_get_the_resolv_conf_kubelet_writes(dns_lab: str) -> None:
    assert in_lab(dns_lab, "client", "cat", "/etc/resolv.conf") == (
        "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n")
    assert "search team.svc.cluster.local" in in_lab(dns_lab, "team/other", "cat", "/etc/resolv.conf")
    assert "options ndots:1" in in_lab(dns_lab, "lean", "cat", "/etc/resolv.conf")


def test_service_names_resolve_short_and_across_namespaces(dns_lab: str) -> None:
    vip = {"10.96.0.100"}
    assert lookup(dns_lab, "client", "web.default.svc.cluster.local") == vip
    assert lookup(dns_lab, "client", "web") == vip  # through the search list
    assert lookup(dns_lab, "team/other", "web.default") == vip  # another namespace: name.namespace
    assert lookup(dns_lab, "team/other", "web") == set()  # no `web` in namespace team
    assert in_lab(dns_lab, "team/other", "curl", "-s", "--max-time", "5", "http://web.default/hostname") in {
        "web-1", "web-2", "web-3"}


def test_headless_services_answer_with_the_pod_ips_and_srv_for_named_ports(dns_lab: str) -> None:
    info = json.loads(lab("status", dns_lab, "--json").stdout)
    web_ips = {p["ip"] for p in info["pods"] if p["name"].startswith("web-")}
    assert lookup(dns_lab, "client", "web-headless.default.svc.cluster.local") == web_ips
    srv = in_lab(dns_lab, "client", "dig", "+short", "SRV", "_http._tcp.web.default.svc.cluster.local")
    assert srv.split()[-2:] == ["80", "web.default.svc.cluster.local."]


def test_the_ndots_5_storm_counted_query_by_query(dns_lab: str) -> None:
    # glibc, A and AAAA in parallel (getent ahosts): every search suffix is tried before the name itself.
    assert count(dns_lab, "client", "api.example.com") == (8, 2)
    assert count(dns_lab, "client", "api.example.com", family="inet") == (4, 1)
    # the fixes: an absolute name (trailing dot) or a lower ndots
    assert count(dns_lab, "client", "api.example.com.") == (2, 2)
    assert count(dns_lab, "lean", "api.example.com") == (2, 2)
    assert lookup(dns_lab, "client", "api.example.com") == {"192.168.1.200"}


def test_names_follow_pod_churn(dns_lab: str, tmp_path: Path) -> None:
    info = json.loads(lab("status", dns_lab, "--json").stdout)
    web3 = next(p["ip"] for p in info["pods"] if p["name"] == "web-3")
    lab("delete", "--lab", dns_lab, "pod", "web-3")
    try:
        assert web3 not in lookup(dns_lab, "client", "web-headless.default.svc.cluster.local")
    finally:
        back = tmp_path / "web-3.yaml"
        back.write_text(json.dumps(pod("web-3", "node2", "web")))
        lab("apply", "--lab", dns_lab, "-f", str(back))
    info = json.loads(lab("status", dns_lab, "--json").stdout)
    web3 = next(p["ip"] for p in info["pods"] if p["name"] == "web-3")
    assert web3 in lookup(dns_lab, "client", "web-headless.default.svc.cluster.local")


# ---- Ingress vs NodePort --------------------------------------------------------------------------

SITES = 100


@pytest.fixture(scope="module")
def ingress_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_root()
    require_tool("mnexec")
    require_tool("nginx")
    name = unique("ing")
    backends = [pod(f"b{i}", f"node{i % 2 + 1}", f"b{i}") for i in range(10)]
    sites = [service(f"site{i}", f"b{i % 10}", type="NodePort") for i in range(SITES)]
    rules = [{"host": f"site{i}.example.com", "http": {"paths": [
        {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": f"site{i}", "port": {"number": 80}}}}]}}
        for i in range(SITES)]
    ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "sites"},
               "spec": {"rules": rules}}
    lab("up", str(write_spec(tmp_path_factory.mktemp(name), base_lab(name, backends + sites + [ingress]))),
        timeout=300)
    yield name
    lab("down", name)
    assert leftovers(name) == {"netns": [], "state": []}


def test_one_node_ip_serves_a_hundred_sites_by_host_header(ingress_lab: str) -> None:
    script = (f"for i in $(seq 0 {SITES - 1}); do curl -s --max-time 5 -H \"Host: site$i.example.com\" "
              "http://192.168.1.10:30080/hostname; echo; done")
    answers = in_lab(ingress_lab, "outside", "sh", "-c", script, timeout=120).splitlines()
    assert answers == [f"b{i % 10}" for i in range(SITES)]


def test_the_nodeport_way_needs_a_port_per_service(ingress_lab: str) -> None:
    info = json.loads(lab("status", ingress_lab, "--json").stdout)
    ports = {s["name"]: s["nodePort"] for s in info["services"] if s["name"].startswith("site")}
    assert len(set(ports.values())) == SITES  # one hole in every node's firewall per site
    script = " ; ".join(f"curl -s --max-time 5 http://192.168.1.11:{ports[f'site{i}']}/hostname; echo"
                        for i in range(0, SITES, 10))
    assert in_lab(ingress_lab, "outside", "sh", "-c", script).splitlines() == [f"b{i % 10}" for i in range(0, SITES, 10)]


def test_an_unknown_host_gets_the_controllers_404(ingress_lab: str) -> None:
    proc = lab("exec", "--lab", ingress_lab, "outside", "--", "curl", "-s", "-o", "/dev/stderr", "-w",
               "%{http_code}", "-H", "Host: nobody.example.com", "http://192.168.1.11:30080/")
    assert proc.stdout == "404" and "default backend - 404" in proc.stderr
