"""`lab bench --quick`: every suite runs, the JSON holds every sample and the machine description, one PNG
per suite is written, and nothing is left behind. No timing thresholds: only shape and sanity."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab.bench_base import bench_script
from tests.conftest import require_root, require_tool
from tests.integration.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SUITES = ("dataplanes", "services", "dns", "dns-load", "updown", "ipam")
# counters that are honestly zero on a healthy run (no failures, no conntrack race, no NXDOMAIN for an
# absolute name, no node cache in use for the settings that bypass it)
ZERO_OK = {"failures", "over_1s", "insert_failed", "conntrack_drop", "nxdomain_share", "node_cache_queries_per_s",
           "dns_throttled_periods"}


def _bench_namespaces() -> list[str]:
    spaces = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    return sorted(n for n in spaces if n.startswith(("klab_bench", "klab_svcbench")))


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict, Path]:
    require_root()
    for tool in ("mnexec", "iperf3", "dnsmasq"):
        require_tool(tool)
    pytest.importorskip("matplotlib")
    tmp = tmp_path_factory.mktemp("bench")
    out, plots = tmp / "bench.json", tmp / "plots"
    before = _bench_namespaces()
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "bench", "--quick", "--json", str(out), "--plot", str(plots)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, f"lab bench exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert _bench_namespaces() == before  # labs and throwaway namespaces are all gone
    return proc, json.loads(out.read_text()), plots


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_exit_zero_with_progress_and_a_table_per_suite(bench) -> None:
    proc, _, _ = bench
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert progress and progress[-1].startswith(f"[{len(progress)}/{len(progress)}]")
    for suite in SUITES:
        assert f"== {suite}" in proc.stdout


def test_json_schema(bench) -> None:
    _, doc, _ = bench
    assert doc["version"] == 1
    machine = doc["machine"]
    assert {"kernel", "cores", "mtu", "python", "date"} <= machine.keys()
    assert machine["kernel"] and machine["python"] and machine["date"] and _positive(machine["cores"])
    assert machine["mtu"] and all(_positive(v) for v in machine["mtu"].values())
    assert set(doc["suites"]) == set(SUITES)
    for suite, body in doc["suites"].items():
        assert body["cases"], suite
        for case in body["cases"]:
            assert case["name"] and case["samples"] and case["median"], (suite, case)
            assert case["samples"].keys() == case["median"].keys()
            for metric, values in case["samples"].items():
                assert isinstance(values, list) and values, (suite, case["name"], metric)
                if metric in ZERO_OK:
                    assert all(_positive(v) or v == 0 for v in values), (suite, case["name"], metric, values)
                    continue
                assert all(_positive(v) for v in values), (suite, case["name"], metric, values)
                assert _positive(case["median"][metric]), (suite, case["name"], metric)


def test_expected_cases_and_metrics(bench) -> None:
    _, doc, _ = bench
    suites = doc["suites"]
    dataplanes = {c["name"]: c for c in suites["dataplanes"]["cases"]}
    assert {"bare veth", "host-gw", "host-gw same node", "host-gw ClusterIP", "host-gw NodePort"} <= dataplanes.keys()
    assert all({"gbps", "gbps_4_streams", "connect_us"} <= c["samples"].keys() and _positive(c["mtu"])
               for c in dataplanes.values())
    # every path but the ClusterIP answers ping (no interface holds a VIP in iptables mode)
    assert all(("rtt_ms" in c["samples"]) == (name != "host-gw ClusterIP") for name, c in dataplanes.items())
    services = suites["services"]["cases"]
    assert {(c["mode"], c["services"]) for c in services} >= {("iptables-nft", 10), ("iptables-legacy", 10),
                                                              ("nftables", 100)}
    assert all({"full_sync_s", "first_p50_us", "last_p99_us"} <= c["samples"].keys() for c in services)
    dns = {c["name"]: c for c in suites["dns"]["cases"]}
    assert {"ndots 5", "trailing dot"} <= dns.keys()
    # the ndots:5 search-list expansion costs more queries than the absolute name (a count, not a timing)
    assert dns["ndots 5"]["median"]["cluster_queries"] > dns["trailing dot"]["median"]["cluster_queries"]
    assert all({"up_s", "down_s"} <= c["samples"].keys() for c in suites["updown"]["cases"])
    # the storm: measured at the cluster DNS, per setting (counts of queries, not timings)
    load = {c["setting"]: c["median"] for c in suites["dns-load"]["cases"]}
    assert {"ndots:5 glibc", "ndots:2 (dnsConfig)", "trailing dot", "NodeLocal DNSCache"} <= load.keys()
    assert load["ndots:5 glibc"]["dns_queries_per_lookup"] == pytest.approx(10, abs=0.5)  # 4 search domains + name
    assert load["trailing dot"]["dns_queries_per_lookup"] == pytest.approx(2, abs=0.2)
    assert load["ndots:2 (dnsConfig)"]["dns_queries_per_lookup"] == pytest.approx(2, abs=0.2)
    assert load["NodeLocal DNSCache"]["dns_queries_per_lookup"] < 1  # cache hits never reach the cluster DNS
    assert all({"p50_ms", "p99_ms", "dns_queries_per_s", "upstream_queries_per_s"} <= c["samples"].keys()
               for c in suites["dns-load"]["cases"])
    # aws-vpc: what the ipamd model predicts for the subnet is what the running lab holds (docs/vpc-ipam.md)
    ipam = {c["name"]: c["median"] for c in suites["ipam"]["cases"]}
    fits = {n: m for n, m in ipam.items() if "computed_first" in m}
    assert fits and all(m["observed_first"] == m["computed_first"] and m["observed_most"] == m["computed_most"]
                        for m in fits.values()), fits
    assert fits["default (WARM_ENI_TARGET=1)"]["observed_first"] == 17
    assert fits["WARM_IP_TARGET=1"]["observed_first"] == 21


def test_one_png_per_suite(bench) -> None:
    _, _, plots = bench
    for suite in SUITES:
        png = plots / f"{suite}.png"
        assert png.exists(), png
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scale_suite_quick(tmp_path: Path) -> None:
    """`lab bench scale --quick`: the seed lab's life (up, one-pod apply and delete, status, down) timed as
    the CLI runs it, every metric present and positive, nothing left behind; the sizes are checked."""
    require_root()
    require_tool("mnexec")
    out = tmp_path / "scale.json"
    before = _bench_namespaces()
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "bench", "scale", "--quick", "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "== scale" in proc.stdout and "apply 1 pod s" in proc.stdout
    case, = json.loads(out.read_text())["suites"]["scale"]["cases"]
    timed = {"up_s", "apply_one_s", "delete_one_s", "status_s", "down_s"}
    # where the CPU went during `lab up` and the one-pod apply: the command, the machine, PID 1 (may be idle)
    cpu = {f"{step}_{what}" for step in ("up", "apply_one") for what in ("cpu_s", "machine_cpu_s", "pid1_cpu_s")}
    # and, where /proc/slabinfo shows the kernel's namespaces, how long it took to free them after `lab down`
    freed = {"down_freed_s"} if bench_script("scale").namespaces_held() is not None else set()
    # and what loading kube-proxy's rules into the seed lab's nodes costs (iptables mode: a node's load x nodes)
    loads = {"up_rule_loads_cpu_s"}
    assert timed | cpu | freed | loads == case["median"].keys()
    assert all(_positive(v) for k, v in case["median"].items() if k not in cpu)
    assert "rule loads" in proc.stdout
    assert all(case["median"][k] >= 0 for k in cpu) and case["median"]["up_cpu_s"] > 0
    assert not freed or case["median"]["down_freed_s"] >= case["median"]["down_s"]
    assert _bench_namespaces() == before
    bad = subprocess.run([sys.executable, "-m", "lab.cli", "bench", "scale", "--sizes", "10,x"], capture_output=True,
                         text=True, cwd=REPO, timeout=30)
    assert bad.returncode == 2 and "--sizes" in bad.stderr
