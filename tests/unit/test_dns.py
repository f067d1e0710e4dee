"""Tests of services/dns.py: kubelet's resolv.conf, the cluster DNS's records, dnsmasq's configuration and
its query log.

Golden files live in golden/dns/; to rewrite them after a deliberate change run with
KUBENET_UPDATE_GOLDEN=1 and read every diff before committing. The resolv.conf rules are kubelet's
(pkg/kubelet/network/dns/dns.go: GetPodDNS, appendDNSConfig, mergeDNSOptions, formDNSConfigFitsLimits) and
the text containerd's (search, nameserver lines, options). The tests at the end need root and dnsmasq:
`dnsmasq --test` on the goldens, then the real thing in a throwaway network namespace (`unshare -n`),
listening on 127.0.0.1 at high ports only, queried over UDP by a tiny resolver written here.
"""
from __future__ import annotations

import json
import random
import socket
import struct
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from services import dns
from services.endpoints import RunningPod, resolve
from tests.conftest import assert_golden, require_root, require_tool
from topo.model import Container, ContainerPort, DnsConfig, ExternalHost, Pod, Service, ServicePort

GOLDEN = Path(__file__).resolve().parent / "golden" / "dns"
REPO = Path(__file__).resolve().parents[2]
DOMAIN = "cluster.local"
CLUSTER_DNS = IPv4Address("10.96.0.10")
UPSTREAM = IPv4Address("192.168.1.100")
RUN = Path("/run/kubenet-lab/demo/dns")  # where the goldens say the files are (tests substitute a tmp dir)


def check_golden(name: str, text: str) -> None:
    assert_golden(GOLDEN / name, text)


def pod(name: str = "client", namespace: str = "default", policy: str = "ClusterFirst",
        config: DnsConfig | None = None, labels: tuple[tuple[str, str], ...] = (),
        ports: tuple[ContainerPort, ...] = ()) -> Pod:
    return Pod(name, namespace, "node1", labels=labels, containers=(Container("c", None, ("sleep", "inf"), ports),),
               dns_policy=policy, dns_config=config)


# ------------------------------------------------------------------------------------ resolv.conf

RESOLV_CASES: dict[str, tuple[Pod, IPv4Address | None]] = {
    "cluster-first": (pod(), UPSTREAM),
    "cluster-first-other-namespace": (pod(namespace="shop"), UPSTREAM),
    "cluster-first-with-host-net": (pod(policy="ClusterFirstWithHostNet"), UPSTREAM),
    "default": (pod(policy="Default"), UPSTREAM),
    "default-no-upstream": (pod(policy="Default"), None),
    "none": (pod(policy="None", config=DnsConfig(nameservers=("1.1.1.1", "8.8.8.8"), searches=("example.com",),
                                                 options=(("ndots", "2"), ("edns0", None)))), UPSTREAM),
    "cluster-first-dns-config": (pod(config=DnsConfig(
        nameservers=("192.168.1.100", "10.96.0.10"),  # the cluster DNS again: dropped as a duplicate
        searches=("example.com", "svc.cluster.local"),  # the second is already there
        options=(("ndots", "1"), ("edns0", None), ("timeout", "2")))), UPSTREAM),
    "default-dns-config": (pod(policy="Default", config=DnsConfig(
        nameservers=("192.168.1.100", "9.9.9.9"), searches=("corp.example",), options=(("attempts", "3"),))),
        UPSTREAM),
}


@pytest.mark.parametrize("case", sorted(RESOLV_CASES))
def test_resolv_conf_golden(case: str) -> None:
    p, upstream = RESOLV_CASES[case]
    check_golden(f"resolv-{case}.conf", dns.resolv_conf(p, CLUSTER_DNS, DOMAIN, upstream))


def test_cluster_first_is_kubelets_exact_text() -> None:
    assert dns.resolv_conf(pod(), CLUSTER_DNS, DOMAIN, UPSTREAM) == (
        "search default.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 10.96.0.10\n"
        "options ndots:5\n")


def test_cluster_first_with_host_net_is_cluster_first_for_pods_off_the_host_network() -> None:
    assert (dns.resolv_conf(pod(policy="ClusterFirstWithHostNet"), CLUSTER_DNS, DOMAIN, None)
            == dns.resolv_conf(pod(), CLUSTER_DNS, DOMAIN, None))


def test_default_is_the_nodes_resolver() -> None:
    assert dns.resolv_conf(pod(policy="Default"), CLUSTER_DNS, DOMAIN, UPSTREAM) == "nameserver 192.168.1.100\n"
    text = dns.resolv_conf(pod(policy="Default"), CLUSTER_DNS, DOMAIN, None)
    assert all(line.startswith("#") for line in text.splitlines())  # comments only: no nameserver line


def test_dns_config_option_overrides_in_place_and_new_ones_follow() -> None:
    p = pod(config=DnsConfig(options=(("ndots", "1"), ("single-request-reopen", None))))
    assert dns.resolv_conf(p, CLUSTER_DNS, DOMAIN, None).splitlines()[-1] == "options ndots:1 single-request-reopen"


def test_dns_config_appends_after_the_policys_own_and_drops_duplicates() -> None:
    p = pod(config=DnsConfig(nameservers=("10.96.0.10", "1.1.1.1"), searches=("cluster.local", "x.example")))
    assert dns.resolv_conf(p, CLUSTER_DNS, DOMAIN, None) == (
        "search default.svc.cluster.local svc.cluster.local cluster.local x.example\n"
        "nameserver 10.96.0.10\n"
        "nameserver 1.1.1.1\n"
        "options ndots:5\n")


def test_none_uses_only_dns_config() -> None:
    p = pod(policy="None", config=DnsConfig(nameservers=("1.1.1.1",)))
    assert dns.resolv_conf(p, CLUSTER_DNS, DOMAIN, UPSTREAM) == "nameserver 1.1.1.1\n"


def test_at_most_three_nameservers() -> None:
    p = pod(config=DnsConfig(nameservers=("1.1.1.1", "2.2.2.2", "3.3.3.3")))
    servers = [l for l in dns.resolv_conf(p, CLUSTER_DNS, DOMAIN, None).splitlines() if l.startswith("nameserver")]
    assert servers == ["nameserver 10.96.0.10", "nameserver 1.1.1.1", "nameserver 2.2.2.2"]


def _search(p: Pod) -> list[str]:
    line = dns.resolv_conf(p, CLUSTER_DNS, DOMAIN, None).splitlines()[0]
    assert line.startswith("search ")
    return line.split()[1:]


def test_search_limits_are_kubelets() -> None:
    many = tuple(f"d{i}.example" for i in range(40))
    assert len(_search(pod(config=DnsConfig(searches=many)))) == 32  # 3 cluster ones + 29
    long_domain = ".".join(["a" * 63] * 4)  # 255 characters: over 253, dropped
    assert long_domain not in _search(pod(config=DnsConfig(searches=(long_domain, "ok.example"))))
    wide = tuple(f"{i:02d}" + "x" * 60 + ".example" for i in range(31))  # 70 characters each
    searches = _search(pod(config=DnsConfig(searches=wide)))
    assert len(" ".join(searches)) <= 2048
    assert len(" ".join(searches + [wide[len(searches) - 3]])) > 2048  # cut from the end, no more than needed
    assert searches[:3] == ["default.svc.cluster.local", "svc.cluster.local", "cluster.local"]


def test_unknown_dns_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="dnsPolicy"):
        dns.resolv_conf(pod(policy="ClusterLast"), CLUSTER_DNS, DOMAIN, None)


def test_cluster_dns_ip_is_the_tenth_address() -> None:
    assert dns.cluster_dns_ip(IPv4Network("10.96.0.0/12")) == IPv4Address("10.96.0.10")
    assert dns.cluster_dns_ip(IPv4Network("172.20.0.0/16")) == IPv4Address("172.20.0.10")


# ------------------------------------------------------------------------------------ records

WEB = Service("web", "default", IPv4Address("10.96.0.20"), (ServicePort("", 80, 8080),), selector=(("app", "web"),))
API = Service("api", "default", IPv4Address("10.96.0.30"),
              (ServicePort("http", 80, "http"), ServicePort("metrics", 9090, 9090), ServicePort("dns", 53, 53, "UDP")),
              selector=(("app", "api"),))
DB = Service("db", "default", None, (ServicePort("pg", 5432, "pg"), ServicePort("", 9187, 9187)),
             selector=(("app", "db"),))
KUBE_DNS = Service("kube-dns", "kube-system", CLUSTER_DNS, (ServicePort("dns", 53, 53, "UDP"),
                                                            ServicePort("dns-tcp", 53, 53)),
                   selector=(("k8s-app", "kube-dns"),))
SERVICES = [WEB, API, DB, KUBE_DNS]


def _db_pod(i: int, namespace: str = "default") -> Pod:
    return pod(f"db-{i}", namespace, labels=(("app", "db"),), ports=(ContainerPort(5433, name="pg"),))


RUNNING = [
    RunningPod(pod("web-1", labels=(("app", "web"),)), IPv4Address("10.244.1.2")),
    RunningPod(_db_pod(0), IPv4Address("10.244.2.4")),
    RunningPod(_db_pod(1), IPv4Address("10.244.1.3")),
    RunningPod(_db_pod(2), IPv4Address("10.244.2.3")),
    RunningPod(_db_pod(3), IPv4Address("10.244.1.9"), ready=False),  # not ready: not an endpoint
    RunningPod(_db_pod(4, namespace="other"), IPv4Address("10.244.1.10")),  # another namespace's
]


def _records() -> dns.Records:
    return dns.records(SERVICES, resolve(SERVICES, RUNNING), RUNNING, DOMAIN)


def test_records_golden() -> None:
    recs = _records()
    check_golden("cluster.hosts", dns.hosts_file(recs))
    check_golden("cluster.srv", "".join(f"{s.name} {s.priority} {s.weight} {s.port} {s.target}\n" for s in recs.srv))


def test_clusterip_service_has_one_a_record() -> None:
    recs = _records()
    assert recs.lookup("web.default.svc.cluster.local") == [IPv4Address("10.96.0.20")]
    assert recs.lookup("kube-dns.kube-system.svc.cluster.local.") == [CLUSTER_DNS]


def test_headless_service_has_one_a_record_per_ready_endpoint() -> None:
    recs = _records()
    assert recs.lookup("db.default.svc.cluster.local") == [IPv4Address(ip) for ip in
                                                           ("10.244.1.3", "10.244.2.3", "10.244.2.4")]
    assert recs.lookup("10-244-2-3.db.default.svc.cluster.local") == [IPv4Address("10.244.2.3")]
    assert not recs.lookup("10-244-1-9.db.default.svc.cluster.local")  # not ready
    assert all(ip != IPv4Address("10.244.1.10") for name, ip in recs.a if ".svc." in name)  # other namespace


def test_srv_only_for_named_ports() -> None:
    srv = _records().srv
    assert {s.name for s in srv} == {
        "_http._tcp.api.default.svc.cluster.local", "_metrics._tcp.api.default.svc.cluster.local",
        "_dns._udp.api.default.svc.cluster.local", "_pg._tcp.db.default.svc.cluster.local",
        "_dns._udp.kube-dns.kube-system.svc.cluster.local", "_dns-tcp._tcp.kube-dns.kube-system.svc.cluster.local"}
    api = [s for s in srv if s.name == "_metrics._tcp.api.default.svc.cluster.local"]
    assert api == [dns.Srv("_metrics._tcp.api.default.svc.cluster.local", "api.default.svc.cluster.local",
                           9090, 0, 100)]


def test_headless_srv_targets_each_endpoint_at_its_own_port() -> None:
    pg = [s for s in _records().srv if s.name.startswith("_pg.")]
    assert [(s.target, s.port, s.weight) for s in pg] == [
        ("10-244-1-3.db.default.svc.cluster.local", 5433, 33),
        ("10-244-2-3.db.default.svc.cluster.local", 5433, 33),
        ("10-244-2-4.db.default.svc.cluster.local", 5433, 33)]


def test_records_compare_for_change_detection() -> None:
    recs = _records()
    assert recs == _records() and hash(recs) == hash(_records())
    assert dns.reload_action(recs, _records()) == "none"
    assert dns.reload_action(None, recs) == "restart"
    fewer = [rp for rp in RUNNING if rp.pod.name != "db-0"]
    no_db0 = dns.records(SERVICES, resolve(SERVICES, fewer), fewer, DOMAIN)
    assert no_db0 != recs
    assert dns.reload_action(recs, no_db0) == "restart"  # its SRV record went too
    moved = [RunningPod(rp.pod, IPv4Address("10.244.1.50")) if rp.pod.name == "web-1" else rp for rp in RUNNING]
    # web-1's pod record (spec 2.6) follows its new address: the hosts file changes, the services' records do not
    assert dns.reload_action(recs, dns.records(SERVICES, resolve(SERVICES, moved), moved, DOMAIN)) == "hup"
    headless_web = Service("web", "default", None, WEB.ports, selector=WEB.selector)
    changed = dns.records([headless_web, API, DB, KUBE_DNS], [], RUNNING, DOMAIN)
    assert dns.reload_action(recs, changed) == "hup"  # A records only: rewrite the hosts file, SIGHUP


# Kubernetes DNS specification (kubernetes/dns docs/specification.md), schema 1.1.0: the records issue 17 added.

def _named_db_pod(i: int, subdomain: str = "db") -> Pod:
    return Pod(f"db-{i}", "other", "node1", labels=(("app", "db"),),
               containers=(Container("c", None, (), (ContainerPort(5432, name="pg"),)),),
               hostname=f"db-{i}", subdomain=subdomain)


DB_OTHER = Service("db", "other", None, (ServicePort("pg", 5432, "pg"),), selector=(("app", "db"),))
NAMED = [RunningPod(_named_db_pod(0), IPv4Address("10.244.2.7")), RunningPod(_named_db_pod(1), IPv4Address("10.244.1.7")),
         RunningPod(_named_db_pod(2, subdomain="elsewhere"), IPv4Address("10.244.1.8"))]


def test_schema_version_txt_record_2_2() -> None:
    """2.2 Schema Version: `dns-version.<zone>. <ttl> IN TXT <schema-version>`; this DNS follows 1.1.0."""
    conf = _cluster_conf(RUN)
    assert 'txt-record=dns-version.cluster.local,"1.1.0"' in conf.splitlines()
    assert dns.DNS_SCHEMA_VERSION == "1.1.0"


def test_headless_endpoint_with_hostname_and_subdomain_2_4() -> None:
    """2.4.1: `<hostname>.<service>.<ns>.svc.<zone>` A for a ready endpoint with a hostname (a pod whose
    `subdomain` is the service's name gets its `hostname` as the endpoint's); 2.4.2: SRV targets that name;
    2.4.3: PTR of its address gives that name. A pod whose subdomain names another service keeps the
    dashed name."""
    recs = dns.records([DB_OTHER], [], NAMED, DOMAIN)
    assert recs.lookup("db-0.db.other.svc.cluster.local") == [IPv4Address("10.244.2.7")]
    assert recs.lookup("DB-1.db.other.svc.cluster.local.") == [IPv4Address("10.244.1.7")]
    assert recs.lookup("10-244-1-8.db.other.svc.cluster.local") == [IPv4Address("10.244.1.8")]
    assert not recs.lookup("db-2.db.other.svc.cluster.local")
    assert not recs.lookup("10-244-2-7.db.other.svc.cluster.local")  # the hostname replaces the dashed name
    assert sorted(s.target for s in recs.srv) == ["10-244-1-8.db.other.svc.cluster.local",
                                                  "db-0.db.other.svc.cluster.local", "db-1.db.other.svc.cluster.local"]
    assert dict(recs.ptr)[IPv4Address("10.244.2.7")] == "db-0.db.other.svc.cluster.local"
    first = {}
    for line in recs.hosts_lines:  # dnsmasq answers PTR with the first name of an address in the hosts file
        ip, name = line.split()
        first.setdefault(ip, name)
    assert first["10.244.2.7"] == "db-0.db.other.svc.cluster.local"
    assert first["10.244.1.8"] == "10-244-1-8.db.other.svc.cluster.local"


def test_pod_records_2_6() -> None:
    """2.6 (deprecated, still required): `<a>-<b>-<c>-<d>.<ns>.pod.<zone>` A for every pod, in its namespace."""
    recs = _records()
    assert recs.lookup("10-244-1-2.default.pod.cluster.local") == [IPv4Address("10.244.1.2")]
    assert recs.lookup("10-244-1-10.other.pod.cluster.local") == [IPv4Address("10.244.1.10")]
    assert not recs.lookup("10-244-1-10.default.pod.cluster.local")  # verified: the pod is in "other"
    first = {}
    for line in recs.hosts_lines:
        ip, name = line.split()
        first.setdefault(ip, name)
    assert first["10.96.0.20"] == "web.default.svc.cluster.local"  # 2.3.3 PTR of a ClusterIP
    assert first["10.244.2.3"] == "10-244-2-3.db.default.svc.cluster.local"


def test_external_name_is_a_cname_2_5() -> None:
    """2.5: an ExternalName service `<svc>.<ns>.svc.<zone>. IN CNAME <extname>`; no A, no SRV, and kube-proxy
    programs nothing for it (no cluster IP)."""
    ext = Service("ext", "default", None, (ServicePort("http", 80, 80),), external_name="api.example.com",
                  type="ExternalName")
    recs = dns.records([ext, WEB], resolve([ext, WEB], RUNNING), RUNNING, DOMAIN)
    assert recs.target("Ext.default.svc.cluster.local.") == "api.example.com"
    assert not recs.lookup("ext.default.svc.cluster.local") and not any("ext." in s.name for s in recs.srv)
    assert [sp.service.name for sp in resolve([ext, WEB], RUNNING)] == ["web"]
    assert "cname=ext.default.svc.cluster.local,api.example.com" in dns.dnsmasq_conf(
        recs, UPSTREAM, DOMAIN, RUN / "l", RUN / "h").splitlines()
    before = dns.records([WEB], resolve([WEB], RUNNING), RUNNING, DOMAIN)
    assert dns.reload_action(before, recs) == "restart"  # cname= lines live in the configuration


def test_records_refuse_endpoints_of_unknown_services() -> None:
    with pytest.raises(ValueError, match="not among"):
        dns.records([WEB], resolve(SERVICES, RUNNING), RUNNING, DOMAIN)


# ------------------------------------------------------------------------------------ dnsmasq configuration

EXTERNAL = [
    ExternalHost("web-ext", IPv4Address("192.168.1.101"), ("http",), index=1,
                 names=("api.example.com", "www.example.com")),
    ExternalHost("dns-ext", UPSTREAM, ("dns",), index=0, names=("ns.example.com",)),
]


def _cluster_conf(run: Path, upstream: IPv4Address | None = UPSTREAM, **kw) -> str:
    return dns.dnsmasq_conf(_records(), upstream, DOMAIN, run / "cluster-dns.log", run / "cluster.hosts", **kw)


def test_cluster_dnsmasq_conf_golden() -> None:
    check_golden("cluster-dnsmasq.conf", _cluster_conf(RUN))
    check_golden("cluster-dnsmasq-no-upstream.conf", _cluster_conf(RUN, None))


def test_upstream_dnsmasq_conf_golden() -> None:
    check_golden("upstream-dnsmasq.conf", dns.upstream_conf(EXTERNAL, RUN / "upstream-dns.log"))


def _options(conf: str) -> list[str]:
    return [line for line in conf.splitlines() if line and not line.startswith("#")]


def test_cluster_conf_is_local_for_the_domain_and_forwards_the_rest() -> None:
    options = _options(_cluster_conf(RUN))
    for needed in ("no-resolv", "no-hosts", "cache-size=0", "log-queries", "port=53", "local=/cluster.local/",
                   "server=192.168.1.100", f"addn-hosts={RUN}/cluster.hosts", f"log-facility={RUN}/cluster-dns.log"):
        assert needed in options
    assert "address=/#/" not in options
    assert "address=/#/" in _options(_cluster_conf(RUN, None))
    assert "srv-host=_pg._tcp.db.default.svc.cluster.local,10-244-1-3.db.default.svc.cluster.local,5433,0,33" in options


def test_no_option_carries_a_trailing_comment() -> None:
    """dnsmasq reads `#` inside a value as part of it (server=1.2.3.4#53 is a port): comments are lines."""
    for conf in (_cluster_conf(RUN), dns.upstream_conf(EXTERNAL, RUN / "u.log")):
        assert all("#" not in line or line == "address=/#/" for line in _options(conf))


def test_upstream_is_authoritative_for_the_external_names_only() -> None:
    options = _options(dns.upstream_conf(EXTERNAL, RUN / "u.log"))
    assert "address=/#/" in options and not any(o.startswith("server=") for o in options)
    assert [o for o in options if o.startswith("host-record=")] == [
        "host-record=ns.example.com,192.168.1.100", "host-record=api.example.com,192.168.1.101",
        "host-record=www.example.com,192.168.1.101"]


def test_argv_runs_in_the_foreground_as_root_without_a_shared_pid_file() -> None:
    assert dns.dnsmasq_argv(Path("/x/d.conf")) == [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/x/d.conf", "--user=root", "--pid-file"]
    assert dns.check_argv(Path("/x/d.conf")) == ["dnsmasq", "--test", "--conf-file=/x/d.conf"]


# ------------------------------------------------------------------------------------ the query log

def test_parse_log_golden() -> None:
    """golden/dns/sample.log holds lines dnsmasq 2.90 wrote (plain and `log-queries=extra`)."""
    queries = dns.parse_log((GOLDEN / "sample.log").read_text())
    check_golden("sample.queries", "".join(f"{q.qtype} {q.name} {q.source}\n" for q in queries))


def test_parse_log_reads_query_lines_only() -> None:
    text = ("Nov 25 00:23:06 dnsmasq[6077]: query[AAAA] api.example.com.default.svc.cluster.local from 10.244.1.2\n"
            "Nov 25 00:23:06 dnsmasq[6077]: config api.example.com.default.svc.cluster.local is NXDOMAIN\n"
            "Nov 25 00:23:06 dnsmasq[6077]: forwarded api.example.com to 192.168.1.100\n"
            "Nov 25 00:23:10 dnsmasq[6125]: 2 10.244.2.7/39966 query[A] api.example.com from 10.244.2.7\n"
            "Nov 25 00:23:10 dnsmasq[6125]: 2 10.244.2.7/39966 reply api.example.com is 192.168.1.101\n")
    assert dns.parse_log(text) == [
        dns.Query("AAAA", "api.example.com.default.svc.cluster.local", "10.244.1.2"),
        dns.Query("A", "api.example.com", "10.244.2.7")]
    assert dns.parse_log("") == []


# ------------------------------------------------------------------------------------ real dnsmasq (root)

def _dnsmasq_tmp(tmp_path: Path) -> tuple[Path, Path]:
    """The goldens with the tmp directory for RUN; the hosts file written; (cluster conf, upstream conf)."""
    cluster, upstream = tmp_path / "cluster.conf", tmp_path / "upstream.conf"
    cluster.write_text((GOLDEN / "cluster-dnsmasq.conf").read_text().replace(str(RUN), str(tmp_path)))
    upstream.write_text((GOLDEN / "upstream-dnsmasq.conf").read_text().replace(str(RUN), str(tmp_path)))
    (tmp_path / "cluster.hosts").write_text((GOLDEN / "cluster.hosts").read_text())
    assert cluster.read_text() == _cluster_conf(tmp_path)  # the goldens are current
    return cluster, upstream


def test_dnsmasq_accepts_the_goldens(tmp_path: Path) -> None:
    require_tool("dnsmasq")
    for conf in _dnsmasq_tmp(tmp_path):
        proc = subprocess.run(dns.check_argv(conf), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr


def dns_query(name: str, qtype: str, port: int, server: str = "127.0.0.1") -> tuple[str, list[str]]:
    """A one-question UDP query: (RCODE name, answers as text: an address, or "PRIO WEIGHT PORT TARGET")."""
    types = {"A": 1, "AAAA": 28, "SRV": 33, "PTR": 12}
    packet = struct.pack(">HHHHHH", random.randrange(65536), 0x0100, 1, 0, 0, 0)
    packet += b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    packet += struct.pack(">HH", types[qtype], 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(packet, (server, port))
        data, _ = sock.recvfrom(4096)

    def read_name(at: int) -> tuple[str, int]:
        labels, end = [], None
        while data[at]:
            if data[at] & 0xC0 == 0xC0:
                end = end or at + 2
                at = ((data[at] & 0x3F) << 8) | data[at + 1]
                continue
            labels.append(data[at + 1:at + 1 + data[at]].decode())
            at += data[at] + 1
        return ".".join(labels), end or at + 1

    flags, _, answers = struct.unpack(">HHH", data[2:8])
    _, at = read_name(12)
    at += 4
    out = []
    for _ in range(answers):
        _, at = read_name(at)
        rtype, _, _, length = struct.unpack(">HHIH", data[at:at + 10])
        at += 10
        if rtype == 1:
            out.append(socket.inet_ntoa(data[at:at + 4]))
        elif rtype == 33:
            prio, weight, port_ = struct.unpack(">HHH", data[at:at + 6])
            out.append(f"{prio} {weight} {port_} {read_name(at + 6)[0]}")
        elif rtype == 12:
            out.append(read_name(at)[0])
        at += length
    return {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}.get(flags & 0xF, str(flags & 0xF)), out


# Runs inside `unshare -n`: both servers on 127.0.0.1 (high ports), the queries, then both stopped.
_SCENARIO = r"""
import json, signal, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from tests.unit.test_dns import dns_query
cluster, upstream, cport, uport = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
procs = [subprocess.Popen(json.loads(argv) + ["--listen-address=127.0.0.1", "--bind-interfaces"])
         for argv in sys.argv[6:8]]
try:
    time.sleep(0.5)
    out = {f"{name} {qtype}": dns_query(name, qtype, cport) for name, qtype in json.loads(sys.argv[8])}
    out["upstream foo.example.com A"] = dns_query("foo.example.com", "A", uport)
    # reload_action "hup": a rewritten hosts file is re-read on SIGHUP (dnsmasq still root: --user=root)
    with open(sys.argv[9], "a") as hosts:
        hosts.write("10.96.0.99 new.default.svc.cluster.local\n")
    procs[0].send_signal(signal.SIGHUP)
    time.sleep(0.3)
    out["after hup"] = dns_query("new.default.svc.cluster.local", "A", cport)
finally:
    for p in procs:
        p.terminate()
        p.wait(5)
print(json.dumps(out))
"""


def test_real_dnsmasq_answers_from_the_records_and_logs_every_query(tmp_path: Path) -> None:
    require_root()
    require_tool("dnsmasq")
    require_tool("unshare")
    cluster, upstream = _dnsmasq_tmp(tmp_path)
    cport, uport = 15353, 15354
    # The lab's upstream listens on port 53 of its own address; here it is 127.0.0.1 at a high port.
    cluster.write_text(cluster.read_text().replace("server=192.168.1.100", f"server=127.0.0.1#{uport}")
                       .replace("\nport=53\n", f"\nport={cport}\n"))
    upstream.write_text(upstream.read_text().replace("\nport=53\n", f"\nport={uport}\n"))
    questions = [("web.default.svc.cluster.local", "A"), ("web.default.svc.cluster.local", "AAAA"),
                 ("db.default.svc.cluster.local", "A"), ("_pg._tcp.db.default.svc.cluster.local", "SRV"),
                 ("_http._tcp.api.default.svc.cluster.local", "SRV"), ("nope.default.svc.cluster.local", "A"),
                 ("api.example.com.default.svc.cluster.local", "A"), ("api.example.com", "A"),
                 ("nope.example.com", "A"), ("20.0.96.10.in-addr.arpa", "PTR")]
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", _SCENARIO, str(REPO), str(cluster), str(upstream), str(cport),
         str(uport), json.dumps(dns.dnsmasq_argv(cluster)), json.dumps(dns.dnsmasq_argv(upstream)),
         json.dumps(questions), str(tmp_path / "cluster.hosts")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = {k: tuple(v) for k, v in json.loads(proc.stdout).items()}
    assert got["web.default.svc.cluster.local A"] == ("NOERROR", ["10.96.0.20"])
    assert got["web.default.svc.cluster.local AAAA"] == ("NOERROR", [])  # exists, no IPv6: no data
    assert got["db.default.svc.cluster.local A"][0] == "NOERROR"
    assert sorted(got["db.default.svc.cluster.local A"][1]) == ["10.244.1.3", "10.244.2.3", "10.244.2.4"]
    assert sorted(got["_pg._tcp.db.default.svc.cluster.local SRV"][1]) == [
        "0 33 5433 10-244-1-3.db.default.svc.cluster.local", "0 33 5433 10-244-2-3.db.default.svc.cluster.local",
        "0 33 5433 10-244-2-4.db.default.svc.cluster.local"]
    assert got["_http._tcp.api.default.svc.cluster.local SRV"] == (
        "NOERROR", ["0 100 80 api.default.svc.cluster.local"])
    assert got["nope.default.svc.cluster.local A"] == ("NXDOMAIN", [])
    assert got["api.example.com.default.svc.cluster.local A"] == ("NXDOMAIN", [])  # never forwarded
    assert got["api.example.com A"] == ("NOERROR", ["192.168.1.101"])  # forwarded to the upstream
    assert got["nope.example.com A"] == ("NXDOMAIN", [])  # the upstream's address=/#/
    assert got["20.0.96.10.in-addr.arpa PTR"] == ("NOERROR", ["web.default.svc.cluster.local"])
    assert got["upstream foo.example.com A"] == ("NXDOMAIN", [])
    assert got["after hup"] == ("NOERROR", ["10.96.0.99"])
    cluster_log = dns.parse_log((tmp_path / "cluster-dns.log").read_text())
    assert [(q.name, q.qtype) for q in cluster_log] == [*questions, ("new.default.svc.cluster.local", "A")]
    assert {q.source for q in cluster_log} == {"127.0.0.1"}
    upstream_log = dns.parse_log((tmp_path / "upstream-dns.log").read_text())
    assert [(q.name, q.qtype) for q in upstream_log] == [
        ("api.example.com", "A"), ("nope.example.com", "A"), ("foo.example.com", "A")]  # only what left the cluster
