"""The cluster DNS against the Kubernetes DNS-Based Service Discovery specification (kubernetes/dns,
docs/specification.md, schema version 1.1.0), record kind by record kind, asked with `dig` from a pod
through the kube-dns Service as a learner would. The sections before issue 17 (2.3 ClusterIP A/SRV/PTR,
2.4 headless A per ready endpoint) are in test_dns_ingress.py; these are the ones issue 17 added."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool
from tests.integration.conftest import in_lab, lab, leftovers, unique, write_spec
from tests.integration.test_dns_ingress import base_lab, pod

pytestmark = pytest.mark.integration

PG = [{"name": "db", "image": "agnhost", "args": ["netexec", "--http-port=5432"],
       "ports": [{"name": "pg", "containerPort": 5432}]}]


def db_pod(name: str, node: str, **spec: object) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "other", "labels": {"app": "db"}},
            "spec": {"nodeName": node, "containers": PG, **spec}}


@pytest.fixture(scope="module")
def spec_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_root()
    require_tool("mnexec")
    require_tool("dnsmasq")
    require_tool("dig")
    name = unique("dnsspec")
    objects = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}},
               pod("client", "node1", "client"), pod("web-1", "node2", "web"),
               {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
               db_pod("db-0", "node1", hostname="db-0", subdomain="db"),
               db_pod("db-1", "node2", hostname="db-1", subdomain="db"),
               db_pod("plain", "node2"),
               {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "other"},
                "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"name": "pg", "port": 5432}]}},
               {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext"},
                "spec": {"type": "ExternalName", "externalName": "api.example.com"}}]
    lab("up", str(write_spec(tmp_path_factory.mktemp(name), base_lab(name, objects))))
    yield name
    lab("down", name)
    assert leftovers(name) == {"netns": [], "state": []}


def dig(lab_name: str, *query: str) -> list[str]:
    """`dig +short` from the client pod, at the resolver kubelet gave it (the kube-dns Service)."""
    return in_lab(lab_name, "client", "dig", "+short", *query).split("\n")[:-1] or []


def ips(lab_name: str) -> dict[str, str]:
    return {p["name"]: p["ip"] for p in json.loads(lab("status", lab_name, "--json").stdout)["pods"]}


def test_dns_version_txt_2_2(spec_lab: str) -> None:
    """2.2 Schema Version: `dns-version.<zone>. IN TXT <schema-version>` (NXDOMAIN before issue 17)."""
    assert dig(spec_lab, "TXT", "dns-version.cluster.local") == ['"1.1.0"']


def test_hostname_and_subdomain_a_srv_ptr_2_4(spec_lab: str) -> None:
    """2.4.1 A `<hostname>.<service>.<ns>.svc.<zone>`, 2.4.2 SRV targets that name, 2.4.3 PTR gives it."""
    addr = ips(spec_lab)
    assert dig(spec_lab, "db-0.db.other.svc.cluster.local") == [addr["db-0"]]
    assert dig(spec_lab, "DB-1.Db.Other.svc.cluster.local") == [addr["db-1"]]  # case-insensitive
    srv = sorted(line.split()[2:] for line in dig(spec_lab, "SRV", "_pg._tcp.db.other.svc.cluster.local"))
    dashed = addr["plain"].replace(".", "-")
    assert srv == sorted([["5432", "db-0.db.other.svc.cluster.local."], ["5432", "db-1.db.other.svc.cluster.local."],
                          ["5432", f"{dashed}.db.other.svc.cluster.local."]])
    assert dig(spec_lab, "-x", addr["db-0"]) == ["db-0.db.other.svc.cluster.local."]
    assert dig(spec_lab, "-x", addr["plain"]) == [f"{dashed}.db.other.svc.cluster.local."]


def test_pod_sees_its_hostname_and_fqdn(spec_lab: str) -> None:
    """kubelet sets the pod's hostname from spec.hostname and puts HOSTNAME.SUBDOMAIN.NS.svc.ZONE in its
    /etc/hosts, so `hostname -f` in the pod gives the name the headless service's DNS serves."""
    assert in_lab(spec_lab, "other/db-0", "hostname").strip() == "db-0"
    hosts = in_lab(spec_lab, "other/db-0", "cat", "/etc/hosts")
    assert f"{ips(spec_lab)['db-0']}\tdb-0.db.other.svc.cluster.local\tdb-0" in hosts, hosts


def test_applied_pod_with_hostname_gets_its_name_2_4(spec_lab: str, tmp_path: Path) -> None:
    """A pod added by `lab apply` keeps its hostname and subdomain (recorded in the lab's state)."""
    file = tmp_path / "db-2.yaml"
    file.write_text(json.dumps(db_pod("db-2", "node1", hostname="db-2", subdomain="db")))
    lab("apply", "--lab", spec_lab, "-f", str(file))
    try:
        assert dig(spec_lab, "db-2.db.other.svc.cluster.local") == [ips(spec_lab)["db-2"]]
    finally:
        lab("delete", "--lab", spec_lab, "pod", "db-2", "-n", "other", check=False)
    assert dig(spec_lab, "db-2.db.other.svc.cluster.local") == []


def test_external_name_is_a_cname_2_5(spec_lab: str) -> None:
    """2.5 `<svc>.<ns>.svc.<zone>. IN CNAME <extname>`; no cluster IP, so no kube-proxy rule names it."""
    assert dig(spec_lab, "CNAME", "ext.default.svc.cluster.local") == ["api.example.com."]
    assert dig(spec_lab, "ext.default.svc.cluster.local")[0] == "api.example.com."
    rules = in_lab(spec_lab, "node1", "iptables-save", "-t", "nat")
    assert "default/web:http" in rules and "default/ext" not in rules


def test_pod_a_records_2_6(spec_lab: str) -> None:
    """2.6 (deprecated, required): `<a>-<b>-<c>-<d>.<ns>.pod.<zone>. IN A <a>.<b>.<c>.<d>`."""
    addr = ips(spec_lab)
    dashed = addr["web-1"].replace(".", "-")
    assert dig(spec_lab, f"{dashed}.default.pod.cluster.local") == [addr["web-1"]]
    assert dig(spec_lab, f"{addr['db-0'].replace('.', '-')}.other.pod.cluster.local") == [addr["db-0"]]
