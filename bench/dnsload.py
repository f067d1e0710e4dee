"""The ndots:5 storm: N client pods each resolving an external name R times per second, measured at the
cluster DNS (queries/s it received, the NXDOMAIN share of its answers, queries/s it forwarded upstream)
and at the clients (lookup p50/p99, failures, lookups over 1 s), per setting, side by side in one run.

One lab: two nodes, the cluster DNS on node2 with a CPU limit (`resources.limits.cpu`, a CFS quota as
kubelet sets it) so that overload shows as latency and timeouts, one host search domain on the nodes (a
cloud node's, as kubelet merges it: 10 queries per glibc lookup), NodeLocal DNSCache running on every node
(only the setting that points resolv.conf at 169.254.20.10 uses it), and N pause pods as clients.

Each client is the project's C client (images/dnsclient.py: glibc or musl getaddrinfo, paced), run in its
pod's namespaces with the setting's resolv.conf bind-mounted over the pod's in a private mount namespace
(`unshare -m`), so one set of pods serves every setting; each resolv.conf is written by the same code
that writes a pod's (services.dns.resolv_conf, kubelet's rules) from a pod with the setting's dnsConfig.

The conntrack race (Kubernetes issue 56903): every node's `insert_failed` and `drop` counters
(/proc/net/stat/nf_conntrack in the node's namespace, summed over CPUs) are read before and after each
case; a lookup that lost a packet to it waits the resolver's timeout (5 s glibc, musl retries after 1 s),
which shows in `over_1s`.

    python bench/dnsload.py [--repeat N] [--json FILE] [--plot DIR]    (the same as: lab bench dns ...)
"""
from __future__ import annotations

import dataclasses
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from images import dnsclient  # noqa: E402
from observe.dnscount import log_tail  # noqa: E402
from services import dns, nodelocal  # noqa: E402
from topo.model import DnsConfig, Pod  # noqa: E402

NAME = "api.example.com"
HOST_DOMAIN = "us-west-2.compute.internal"
DNS_CPU = "100m"  # the cluster DNS pod's limit (CoreDNS's deployment requests 100m)
CLUSTER_DNS = "10.96.0.10"


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    libc: str  # glibc or musl
    lookup: str  # the name as the application writes it
    options: tuple[tuple[str, str | None], ...] = ()  # dnsConfig options merged as kubelet does
    node_local: bool = False  # resolv.conf names 169.254.20.10 (kubelet --cluster-dns with the addon)


SETTINGS = (
    Setting("ndots:5 glibc", "glibc", NAME),
    Setting("ndots:5 musl", "musl", NAME),
    Setting("ndots:2 (dnsConfig)", "glibc", NAME, (("ndots", "2"),)),
    Setting("trailing dot", "glibc", NAME + "."),
    Setting("NodeLocal DNSCache", "glibc", NAME, node_local=True),
    Setting("single-request-reopen", "glibc", NAME, (("single-request-reopen", None),)),
    Setting("use-vc (TCP)", "glibc", NAME, (("use-vc", None),)),
)
QUICK_SETTINGS = ("ndots:5 glibc", "ndots:2 (dnsConfig)", "trailing dot", "NodeLocal DNSCache")


def storm_spec(name: str, clients: int) -> dict:
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"client-{i}", "labels": {"app": "client"}},
             "spec": {"nodeName": "node1" if i % 2 == 0 else "node2", "containers": [{"name": "c", "image": "pause"}]}}
            for i in range(clients)]
    return {"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"dns": {"node": "node2", "nodeSearch": [HOST_DOMAIN], "nodeLocal": True,
                             "resources": {"limits": {"cpu": DNS_CPU}}},
                     "external": [{"name": "upstream", "ip": "192.168.1.200", "serves": ["http", "dns"],
                                   "names": [NAME]}],
                     "nodes": [{"name": "node1", "ip": "192.168.1.10"}, {"name": "node2", "ip": "192.168.1.11"}],
                     "objects": pods}}


def resolv_conf(setting: Setting) -> str:
    """The pod's resolv.conf for `setting`, by kubelet's rules (services.dns.resolv_conf)."""
    pod = Pod("client", "default", "node1", (), (), dns_config=DnsConfig(options=setting.options))
    server = nodelocal.LOCAL_IP if setting.node_local else dns.IPv4Address(CLUSTER_DNS)
    return dns.resolv_conf(pod, server, "cluster.local", None, (HOST_DOMAIN,))


def _conntrack(nodes: list[str]) -> dict[str, int]:
    """insert_failed and drop, summed over the CPUs of every node namespace."""
    total = {"insert_failed": 0, "drop": 0}
    for ns in nodes:
        text = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/stat/nf_conntrack"], capture_output=True,
                              text=True).stdout.split("\n")
        if not text or not text[0]:
            continue
        head = text[0].split()
        for line in text[1:]:
            if line.strip():
                values = dict(zip(head, line.split()))
                for key in total:
                    total[key] += int(values.get(key, "0"), 16)
    return total


_ANSWER = re.compile(r"\b(?:reply|config|cached) \S+ is (\S+)")


def _log_counts(text: str) -> tuple[int, int, int]:
    """(queries, answers, NXDOMAIN answers) in a dnsmasq log excerpt."""
    answers = _ANSWER.findall(text)
    return text.count(" query["), len(answers), sum(1 for a in answers if a == "NXDOMAIN")




def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def run_case(lab: str, setting: Setting, clients: int, rate: float, seconds: float, folder: Path) -> dict[str, float]:
    """One storm: `clients` pods at `rate` lookups/s for `seconds`; the metrics of the case."""
    from apiserver import state

    st = state.load(lab)
    run_dir = state.lab_dir(lab)
    logs = {"cluster": run_dir / "dns" / "queries.log", "upstream": run_dir / "upstream-dns" / "queries.log",
            "cache": run_dir / "nodelocal"}
    conf = folder / f"resolv-{re.sub(r'[^a-z0-9]+', '-', setting.name.lower())}.conf"
    conf.write_text(resolv_conf(setting))
    argv = dnsclient.load_argv(setting.libc, setting.lookup, rate, seconds)
    keys = [k for k in st.pods if k.startswith("default/client-")][:clients]
    nodes = [f"klab_{lab}_n_{n}" for n in ("node1", "node2")]
    cache_logs = sorted(logs["cache"].glob("*/queries.log"))
    offsets = {k: _size(p) for k, p in logs.items() if k != "cache"}
    cache_offsets = [_size(p) for p in cache_logs]
    before = _conntrack(nodes)
    throttle = _throttled(lab)
    procs = []
    started = time.monotonic()
    for key in keys:
        pause = st.pods[key].pause_pid
        procs.append(subprocess.Popen(
            ["nsenter", "-t", str(pause), "-n", "-m", "-u", "--", "unshare", "-m", "--", "sh", "-c",
             'mount --bind "$1" "$(readlink -f /etc/resolv.conf)" && shift && exec "$@"', "sh", str(conf), *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 60)
        line = next((x for x in out.splitlines() if x.startswith("{")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"storm client failed ({proc.returncode}): {err.strip()[:200]}")
        results.append(json.loads(line))
    elapsed = time.monotonic() - started
    time.sleep(0.3)  # dnsmasq writes its log asynchronously
    after = _conntrack(nodes)
    throttle = {k: v - throttle.get(k, 0) for k, v in _throttled(lab).items()}
    queries, answers, nx = _log_counts(log_tail(logs["cluster"], offsets["cluster"]))
    upstream, _, _ = _log_counts(log_tail(logs["upstream"], offsets["upstream"]))
    cache_queries = sum(_log_counts(log_tail(p, o))[0] for p, o in zip(cache_logs, cache_offsets))
    latencies = sorted(ms for r in results for ms in r["ms"])
    lookups = sum(r["lookups"] for r in results)
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"clients": clients, "lookups_per_s": lookups / elapsed,
            "dns_queries_per_s": queries / elapsed, "dns_queries_per_lookup": queries / max(lookups, 1),
            "nxdomain_share": nx / answers if answers else 0.0, "upstream_queries_per_s": upstream / elapsed,
            "node_cache_queries_per_s": cache_queries / elapsed,
            "p50_ms": q[49], "p99_ms": q[98], "failures": sum(r["failures"] for r in results),
            "over_1s": sum(r["over_1s"] for r in results),
            "insert_failed": after["insert_failed"] - before["insert_failed"],
            "conntrack_drop": after["drop"] - before["drop"],
            # periods in which the DNS pod's quota ran out (cpu.stat nr_throttled of its cgroup)
            "dns_throttled_periods": throttle.get("nr_throttled", 0)}


def _throttled(lab: str) -> dict[str, int]:
    from kubelet import cgroups

    for root in cgroups.lab_roots():
        for stat in (root / lab).rglob("coredns/cpu.stat"):
            return cgroups.throttled(stat.parent)
    return {}


if __name__ == "__main__":
    from lab.bench_base import script_main

    sys.exit(script_main("dns", __doc__))
