"""`lab bench`: the project's measurements in one command (data planes, service rules at scale, DNS
queries per lookup, lab up/down), with medians over interleaved repetitions, a table per suite, and
optionally every raw sample as JSON and one PNG per suite.

The measuring code is the bench/ scripts' own (bench/dataplanes.py, bench/services.py,
bench/lab_updown.py), loaded from the source tree; this module only schedules cases, reports and cleans
up. Everything a run creates is removed at the end, also on failure or Ctrl-C: labs with `lab down`
(falling back to the crash-safe teardown `lab clean` uses), throwaway namespaces by the scripts' own
close() paths.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from lab.bench_base import Case, Suite, _lab_cli, _ratio, bench_script, _spread, _table, remove_lab
from lab.bench_suites import DNS_CLIENTS, SCALE_SIZES, DnsLoad, Ipam, Observe, Policy, Scale
from topo.errors import FeatureMissing, StateError

SUITES = ("dataplanes", "services", "dns", "dns-load", "updown", "ipam", "scale", "observe", "policy")  # `dns` also runs `dns-load`
DNS_NAME = "api.example.com"


class Dataplanes(Suite):
    name = "dataplanes"

    # Paths measured on the host-gw lab besides pod to pod across nodes (the dataplane does not change them).
    EXTRA_PATHS = ("same node", "ClusterIP", "NodePort")

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        self.backends = ("host-gw",) if quick else ("host-gw", "vxlan", "bgp")
        self.seconds = 1 if quick else 5
        # The cilium profile (tunnel mode) and its ClusterIP across nodes: the socket LB next to pod to pod.
        self.cilium = not quick and _cilium_here()
        self.backends += ("cilium",) if self.cilium else ()
        self.cases = [Case("bare veth", lambda: {}), *(Case(b, lambda: {}) for b in self.backends),
                      *(Case(f"host-gw {p}", lambda: {}) for p in self.EXTRA_PATHS),
                      *([Case("cilium ClusterIP", lambda: {})] if self.cilium else [])]

    def setup(self, stack: ExitStack, folder: Path) -> None:
        if shutil.which("iperf3") is None:
            raise FeatureMissing("lab bench dataplanes needs iperf3 (./install.sh installs it)")
        dp = bench_script("dataplanes")
        bare = dp.BareVeth()
        stack.callback(bare.close)
        self.cases[0].info.update(mtu=1500, path="bare veth pair between two namespaces")
        self.cases[0].run = lambda: dp.measure_bare(bare, self.seconds)
        labs = {}
        for case in self.cases[1:1 + len(self.backends)]:
            lab, mtu = dp.up_lab(case.name, folder)
            stack.callback(remove_lab, lab)
            labs[case.name] = (lab, mtu)
            case.info.update(mtu=mtu, path="pod to pod across nodes")
            case.run = lambda lab=lab: dp.measure_lab(lab, self.seconds)
        for case, path in zip(self.cases[1 + len(self.backends):], self.EXTRA_PATHS):
            lab, mtu = labs["host-gw"]
            case.info.update(mtu=mtu, path={"same node": "pod to pod on one node", "ClusterIP": "pod to ClusterIP",
                                            "NodePort": "external host to NodePort"}[path])
            case.run = lambda lab=lab, path=path: dp.measure_lab(lab, self.seconds, path)
        if self.cilium:
            lab, mtu = labs["cilium"]
            self.cases[-1].info.update(mtu=mtu, path="pod to ClusterIP across nodes (socket LB)")
            self.cases[-1].run = lambda lab=lab: dp.measure_lab(lab, self.seconds, "ClusterIP")

    def table(self) -> str:
        base = self.cases[0].median()["gbps"]
        rows = [[c.name, c.info.get("path", ""), str(c.info.get("mtu", "")), _spread(c, "gbps", ".2f"),
                 _ratio(c.median()["gbps"], base, ".0%"), _spread(c, "gbps_4_streams", ".2f"),
                 _spread(c, "rtt_ms", ".3f") if "rtt_ms" in c.samples else "no ping (a VIP)",
                 _spread(c, "connect_us", ".0f"), _spread(c, "connect_p50_us", ".1f")] for c in self.cases]
        text = _table(["case", "path", "MTU", "Gbit/s 1 stream", "vs bare veth", "Gbit/s 4 streams", "RTT ms",
                       "TCP connect us (curl)", "connect() p50 us"], rows)
        by_name = {c.name: c for c in self.cases if c.samples}
        for pod, vip in (("host-gw", "host-gw ClusterIP"), ("cilium", "cilium ClusterIP")):
            if pod in by_name and vip in by_name:
                a, b = by_name[pod].median(), by_name[vip].median()
                pod_us = b.get("connect_p50_pod_us", a["connect_p50_us"])  # the pod IP in the same loop
                text += (f"\n{vip} vs pod to pod: connect() p50 {b['connect_p50_us']:.1f} / {pod_us:.1f} us = "
                         f"{_ratio(b['connect_p50_us'], pod_us, '.2f')}x (one loop, alternating)"
                         f", throughput {b['gbps']:.2f} / {b.get('gbps_pod', a['gbps']):.2f} Gbit/s = "
                         f"{_ratio(b['gbps'], b.get('gbps_pod', a['gbps']), '.2f')}x (ClusterIP, pod, pod, ClusterIP)"
                         + (" (issue 18's targets: <= 1.1x, >= 0.95x)" if pod == "cilium" else ""))
        return text

    def plot(self, plt, path: Path) -> None:
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [f"{c.name}\nMTU {c.info.get('mtu', '?')}" for c in self.cases]
        meds = [c.median()["gbps"] for c in self.cases]
        errs = [[m - min(c.samples["gbps"]) for m, c in zip(meds, self.cases)],
                [max(c.samples["gbps"]) - m for m, c in zip(meds, self.cases)]]
        ax.bar(labels, meds, yerr=errs, capsize=4, color="tab:blue")
        ax.set_ylabel("Gbit/s (iperf3, one TCP stream)")
        ax.set_title("Throughput per path (one TCP stream) vs a bare veth pair")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def _ipvs_here() -> bool:
    """The IPVS column is measured where the kernel has IPVS and dummy devices (probed; needs root)."""
    from topo import kernel

    return os.geteuid() == 0 and not kernel.missing(kernel.IPVS, kernel.DUMMY)


def _cilium_here() -> bool:
    """The cilium rows: a cgroup2 tree for the socket LB, libbpf and clang (its programs are compiled here)."""
    from cilium import agent

    try:
        agent.require()
    except Exception:  # FeatureMissing, ApplyError (a compile error): no rows rather than no suite
        return False
    return os.geteuid() == 0


class Services(Suite):
    name = "services"

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        counts = (10, 100) if quick else (10, 100, 1000, 10000)
        connects = 100 if quick else 200
        # iptables mode on both backends (spec.kubeProxy.iptables: nft is the machine's own on current
        # distributions and the lab's default there; legacy the older x_tables)
        self.modes = ("iptables-nft", "iptables-legacy", "nftables") + (("ipvs",) if _ipvs_here() else ()) + \
            (("cilium",) if _cilium_here() else ())
        for mode in self.modes:
            for count in counts:
                self.cases.append(Case(f"{mode} {count}", self._runner(mode, count, connects),
                                       {"mode": mode, "services": count}))

    @staticmethod
    def _runner(mode: str, count: int, connects: int) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            row = bench_script("services").measure_case(mode, count, connects)
            return {k: v for k, v in row.items() if k not in ("mode", "services")}
        return run

    def setup(self, stack: ExitStack, folder: Path) -> None:
        from services import kube_proxy

        tools = [kube_proxy.iptables_restore("nft")[0], kube_proxy.iptables_restore("legacy")[0], kube_proxy.NFT[0]]
        if "ipvs" in self.modes:
            tools += [kube_proxy.IPVSADM_RESTORE[0], kube_proxy.IPSET_RESTORE[0]]
        for tool in tools:
            if shutil.which(tool) is None:
                raise FeatureMissing(f"lab bench services needs {tool} (./install.sh installs it)")

    def table(self) -> str:
        rows = []
        for c in self.cases:
            m = c.median()
            rows.append([c.info["mode"], f"{c.info['services']:,}", _spread(c, "full_sync_s", ".3f"),
                         _spread(c, "one_service_update_s", ".3f"),
                         f"{m['first_p50_us']:.0f} / {m['first_p99_us']:.0f}",
                         f"{m['last_p50_us']:.0f} / {m['last_p99_us']:.0f}",
                         _ratio(m["last_p50_us"], m["first_p50_us"], ".2f") + "x"])
        return _table(["mode", "services", "full sync s", "+1 service s", "first p50/p99 us", "last p50/p99 us",
                       "last vs first p50"], rows)

    def plot(self, plt, path: Path) -> None:
        fig, ax = plt.subplots(figsize=(7, 4))
        for mode in self.modes:
            cases = [c for c in self.cases if c.info["mode"] == mode]
            xs = [c.info["services"] for c in cases]
            ax.plot(xs, [c.median()["first_p50_us"] for c in cases], "o--", label=f"{mode}, first service")
            ax.plot(xs, [c.median()["last_p50_us"] for c in cases], "o-", label=f"{mode}, last service")
        ax.set_xscale("log")
        ax.set_xlabel("services")
        ax.set_ylabel("connect latency p50 (µs)")
        ax.set_title("Connect latency to a service vs number of services")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


class Dns(Suite):
    name = "dns"

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        ndots = ("5",) if quick else ("5", "2", "1")
        self.pods = {f"ndots{n}": n for n in ndots}
        self.lab = ""
        for n in ndots:
            self.cases.append(Case(f"ndots {n}", self._runner(f"ndots{n}", DNS_NAME),
                                   {"pod_ndots": int(n), "lookup": DNS_NAME}))
        self.cases.append(Case("trailing dot", self._runner("ndots5", DNS_NAME + "."),
                               {"pod_ndots": 5, "lookup": DNS_NAME + "."}))

    def _runner(self, pod: str, host: str) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            started = time.perf_counter()
            data = json.loads(_lab_cli("dns-count", "--lab", self.lab, "--json", pod, host))
            return {"cluster_queries": len(data["clusterQueries"]), "upstream_queries": len(data["upstreamQueries"]),
                    "lookup_s": time.perf_counter() - started}
        return run

    def setup(self, stack: ExitStack, folder: Path) -> None:
        if shutil.which("dnsmasq") is None:
            raise FeatureMissing("lab bench dns needs dnsmasq (./install.sh installs it)")
        import yaml

        pods = []
        for pod, n in self.pods.items():
            spec: dict = {"nodeName": "node1", "containers": [{"name": "pause", "image": "pause"}]}
            if n != "5":
                spec["dnsConfig"] = {"options": [{"name": "ndots", "value": n}]}
            pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "labels": {"app": pod}},
                         "spec": spec})
        self.lab = f"bench-dns-{uuid.uuid4().hex[:4]}"
        data = {"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": self.lab},
                "spec": {"nodes": [{"name": "node1", "ip": "192.168.1.10"}, {"name": "node2", "ip": "192.168.1.11"}],
                         "external": [{"name": "outside", "ip": "192.168.1.200", "serves": ["http", "dns"],
                                       "names": [DNS_NAME]}],
                         "objects": pods}}
        path = folder / f"{self.lab}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        stack.callback(remove_lab, self.lab)
        _lab_cli("up", str(path))

    def table(self) -> str:
        base = self.cases[-1].median()["cluster_queries"]
        rows = [[c.name, c.info["lookup"], _spread(c, "cluster_queries", ".0f"),
                 _spread(c, "upstream_queries", ".0f"), _ratio(c.median()["cluster_queries"], base, ".1f") + "x",
                 _spread(c, "lookup_s", ".2f")] for c in self.cases]
        return _table(["case", "lookup", "cluster DNS queries", "upstream queries", "vs trailing dot",
                       "lookup s (incl. lab exec)"], rows)

    def plot(self, plt, path: Path) -> None:
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [c.name for c in self.cases]
        ax.bar(labels, [c.median()["cluster_queries"] for c in self.cases], color="tab:orange")
        ax.set_ylabel("queries at the cluster DNS per lookup")
        ax.set_title(f"DNS queries for one lookup of {DNS_NAME} (A + AAAA)")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


class Updown(Suite):
    name = "updown"

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        self.folder: Path | None = None
        self.cases.append(Case("seed lab (2 nodes, 3 pods)", self._runner("seed"), {"nodes": 2, "pods": 3}))
        if _cilium_here():  # the same lab with cni.profile cilium, interleaved with the default one
            self.cases.append(Case("seed lab, cilium profile", self._runner("cilium"), {"nodes": 2, "pods": 3}))
        if not quick:
            self.cases.append(Case("50 nodes x 20 pods", self._runner("1000"), {"nodes": 50, "pods": 1000}))

    def _runner(self, which: str) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            ud = bench_script("lab_updown")
            make = {"seed": ud.seed_spec, "cilium": ud.cilium_seed_spec}.get(which) or (lambda n: ud.scale_spec(n, 50, 20))
            up, down = ud.updown_once(make, self.folder)
            return {"up_s": up, "down_s": down}
        return run

    def setup(self, stack: ExitStack, folder: Path) -> None:
        self.folder = folder

    def table(self) -> str:
        seed = self.cases[0].median()["up_s"] if self.cases[0].samples else 0.0
        rows = [[c.name, _spread(c, "up_s", ".2f"), _ratio(c.median()["up_s"], seed, ".2f") + "x" if c.samples else "-",
                 _spread(c, "down_s", ".2f")] for c in self.cases]
        return _table(["case", "lab up s", "vs seed lab", "lab down s"], rows)

    def plot(self, plt, path: Path) -> None:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = range(len(self.cases))
        ax.bar([x - 0.2 for x in xs], [c.median()["up_s"] for c in self.cases], 0.4, label="lab up")
        ax.bar([x + 0.2 for x in xs], [c.median()["down_s"] for c in self.cases], 0.4, label="lab down")
        ax.set_xticks(list(xs), [c.name for c in self.cases])
        ax.set_ylabel("wall time (s)")
        ax.set_title("lab up / lab down, as the CLI runs them")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


SUITE_CLASSES = {"dataplanes": Dataplanes, "services": Services, "dns": Dns, "dns-load": DnsLoad, "updown": Updown,
                 "ipam": Ipam, "scale": Scale, "observe": Observe,
                 "policy": Policy}


def machine(suites: list[Suite]) -> dict:
    mtu = {}
    for suite in suites:
        if isinstance(suite, Dataplanes):
            mtu = {c.name: c.info["mtu"] for c in suite.cases if "mtu" in c.info}
    return {"kernel": platform.release(), "cores": os.cpu_count(), "python": platform.python_version(),
            "mtu": mtu, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run(selected: list[str], quick: bool, repeat: int | None, json_path: str | None, plot_dir: str | None,
        sizes: tuple[int, ...] = SCALE_SIZES, clients: tuple[int, ...] = DNS_CLIENTS) -> int:
    from topo.kernel import require_root

    unknown = [name for name in selected if name not in SUITES]
    if unknown:
        raise StateError(f"no suite {', '.join(unknown)}: choose from {', '.join(SUITES)}")
    require_root()
    if repeat is None:
        repeat = 1 if quick else 3
    if repeat < 1:
        raise StateError("--repeat must be at least 1")
    plt = None
    if plot_dir:  # fail before measuring, not after
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise FeatureMissing("--plot needs matplotlib: .venv/bin/pip install matplotlib") from exc
    if "dns" in selected:
        selected = [*selected, "dns-load"]
    extra = {"scale": (sizes,), "dns-load": (clients,)}
    suites = [SUITE_CLASSES[name](quick, *extra.get(name, ()))
              for name in dict.fromkeys(selected or [s for s in SUITES if s not in ("scale", "observe", "policy")])]
    total = sum(len(s.cases) for s in suites) * repeat
    done = 0
    with tempfile.TemporaryDirectory(prefix="lab-bench-") as tmp:
        for suite in suites:
            with ExitStack() as stack:
                print(f"{suite.name}: setting up", file=sys.stderr, flush=True)
                suite.setup(stack, Path(tmp))
                for rep in range(repeat):
                    for case in suite.cases:
                        sample = case.run()
                        case.add(sample)
                        done += 1
                        shown = ", ".join(f"{k} {v:.4g}" for k, v in sample.items())
                        rep_note = f" (run {rep + 1}/{repeat})" if repeat > 1 else ""
                        print(f"[{done}/{total}] {suite.name} {case.name}{rep_note}: {shown}", file=sys.stderr,
                              flush=True)
    for suite in suites:
        print(f"\n== {suite.name} ({repeat} run{'s' if repeat > 1 else ''}, median"
              f"{' (min-max)' if repeat > 1 else ''}) ==")
        print(suite.table())
    if json_path:
        doc = {"version": 1, "machine": machine(suites), "repeat": repeat, "quick": quick,
               "suites": {s.name: s.to_json() for s in suites}}
        Path(json_path).write_text(json.dumps(doc, indent=2))
    if plot_dir:
        folder = Path(plot_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for suite in suites:
            suite.plot(plt, folder / f"{suite.name}.png")
    return 0
