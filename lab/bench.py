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
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from topo import names, netns
from topo.errors import FeatureMissing, StateError

REPO = Path(__file__).resolve().parent.parent
SUITES = ("dataplanes", "services", "dns", "updown", "ipam")
DNS_NAME = "api.example.com"


def script_main(suite: str, doc: str) -> int:
    """The bench/ scripts' command line: `lab bench SUITE` under another name (one implementation).

    Run as `python -m lab.cli bench ...` in a child process, from this source tree and in the caller's
    folder (so relative --json and --plot paths mean the same): the scheduler never imports the CLI that
    imports it. A Ctrl-C reaches the child too (same process group), which cleans up and exits; its exit
    status is the script's."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write every sample and the machine description here")
    parser.add_argument("--plot", help="write a PNG into this folder")
    args = parser.parse_args()
    extra = [*(["--json", args.json] if args.json else []), *(["--plot", args.plot] if args.plot else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-m", "lab.cli", "bench", suite, "--repeat", str(args.repeat), *extra],
                             env=env)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            continue  # the child got the same Ctrl-C: let it finish its cleanup


def remove_lab(name: str) -> None:
    """Take a lab down as a user would; if that fails (a build killed before its state was written),
    remove whatever namespaces and state of that name are left, as `lab clean` does."""
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "down", name], cwd=REPO, capture_output=True)
    if proc.returncode == 0:
        return
    from apiserver import state
    from lab import apply

    if netns.list_names(f"{names.NETNS_PREFIX}{name}{names.SEP}") or state.lab_dir(name).exists():
        with state.locked(name):
            apply.teardown(name)
            state.remove(name)


def _script(name: str) -> ModuleType:
    """One of the bench/ scripts, imported from the source tree (bench/ is not an installed package)."""
    key = f"_kubenet_bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    path = REPO / "bench" / f"{name}.py"
    if not path.exists():
        raise FeatureMissing(f"lab bench needs the source tree's bench/ scripts ({path} is missing)")
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _lab_cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StateError(f"lab {' '.join(args)} failed: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


@dataclass
class Case:
    name: str
    run: Callable[[], dict[str, float]]  # one sample of every metric
    info: dict = field(default_factory=dict)  # fixed facts of the case (MTU, mode, service count)
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, sample: dict[str, float]) -> None:
        for key, value in sample.items():
            self.samples.setdefault(key, []).append(value)

    def median(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items()}

    def to_json(self) -> dict:
        return {"name": self.name, **self.info, "samples": self.samples, "median": self.median(),
                "min": {k: min(v) for k, v in self.samples.items()},
                "max": {k: max(v) for k, v in self.samples.items()}}


def _spread(case: Case, key: str, fmt: str) -> str:
    values = case.samples[key]
    med = format(statistics.median(values), fmt)
    if len(values) == 1:
        return med
    return f"{med} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def _ratio(value: float, base: float, fmt: str) -> str:
    return format(value / base, fmt) if base else "n/a"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


class Suite:
    name = ""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.cases: list[Case] = []

    def setup(self, stack: ExitStack, folder: Path) -> None:
        """Build what the cases measure; register its removal on `stack`."""

    def table(self) -> str:
        raise NotImplementedError

    def plot(self, plt, path: Path) -> None:
        raise NotImplementedError

    def to_json(self) -> dict:
        return {"cases": [c.to_json() for c in self.cases]}


class Dataplanes(Suite):
    name = "dataplanes"

    # Paths measured on the host-gw lab besides pod to pod across nodes (the dataplane does not change them).
    EXTRA_PATHS = ("same node", "ClusterIP", "NodePort")

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        self.backends = ("host-gw",) if quick else ("host-gw", "vxlan", "bgp")
        self.seconds = 1 if quick else 5
        self.cases = [Case("bare veth", lambda: {}), *(Case(b, lambda: {}) for b in self.backends),
                      *(Case(f"host-gw {p}", lambda: {}) for p in self.EXTRA_PATHS)]

    def setup(self, stack: ExitStack, folder: Path) -> None:
        if shutil.which("iperf3") is None:
            raise FeatureMissing("lab bench dataplanes needs iperf3 (./install.sh installs it)")
        dp = _script("dataplanes")
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

    def table(self) -> str:
        base = self.cases[0].median()["gbps"]
        rows = [[c.name, c.info.get("path", ""), str(c.info.get("mtu", "")), _spread(c, "gbps", ".2f"),
                 _ratio(c.median()["gbps"], base, ".0%"), _spread(c, "gbps_4_streams", ".2f"),
                 _spread(c, "rtt_ms", ".3f") if "rtt_ms" in c.samples else "no ping (a VIP)",
                 _spread(c, "connect_us", ".0f")] for c in self.cases]
        return _table(["case", "path", "MTU", "Gbit/s 1 stream", "vs bare veth", "Gbit/s 4 streams", "RTT ms",
                       "TCP connect us"], rows)

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


class Services(Suite):
    name = "services"

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        counts = (10, 100) if quick else (10, 100, 1000, 10000)
        connects = 100 if quick else 200
        # iptables mode on both backends (spec.kubeProxy.iptables: nft is the machine's own on current
        # distributions and the lab's default there; legacy the older x_tables)
        self.modes = ("iptables-nft", "iptables-legacy", "nftables") + (("ipvs",) if _ipvs_here() else ())
        for mode in self.modes:
            for count in counts:
                self.cases.append(Case(f"{mode} {count}", self._runner(mode, count, connects),
                                       {"mode": mode, "services": count}))

    @staticmethod
    def _runner(mode: str, count: int, connects: int) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            row = _script("services").measure_case(mode, count, connects)
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
        if not quick:
            self.cases.append(Case("50 nodes x 20 pods", self._runner("1000"), {"nodes": 50, "pods": 1000}))

    def _runner(self, which: str) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            ud = _script("lab_updown")
            make = ud.seed_spec if which == "seed" else (lambda n: ud.scale_spec(n, 50, 20))
            up, down = ud.updown_once(make, self.folder)
            return {"up_s": up, "down_s": down}
        return run

    def setup(self, stack: ExitStack, folder: Path) -> None:
        self.folder = folder

    def table(self) -> str:
        rows = [[c.name, _spread(c, "up_s", ".2f"), _spread(c, "down_s", ".2f")] for c in self.cases]
        return _table(["case", "lab up s", "lab down s"], rows)

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


class Ipam(Suite):
    """bench/vpc_ipam.py: pods that fit in one small VPC subnet per aws-vpc setting (computed and observed),
    and `lab apply` of one pod with a warm address against an empty warm pool."""

    name = "ipam"

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        self.folder: Path | None = None
        script = _script("vpc_ipam")
        for setting in (script.QUICK if quick else script.SETTINGS):
            self.cases.append(Case(setting, self._fits(setting), {"subnet": script.SUBNET, "nodes": script.NODES,
                                                                   "instanceType": script.INSTANCE}))
        for warm in (True, False):
            self.cases.append(Case("one pod, warm pool" if warm else "one pod, empty pool (WARM_IP_TARGET=0)",
                                   self._wait(warm), {"warm": warm}))

    def _fits(self, setting: str) -> Callable[[], dict[str, float]]:
        return lambda: _script("vpc_ipam").observed(setting, self.folder)

    def _wait(self, warm: bool) -> Callable[[], dict[str, float]]:
        return lambda: {"apply_s": _script("vpc_ipam").wait_for_address(self.folder, warm)}

    def setup(self, stack: ExitStack, folder: Path) -> None:
        self.folder = folder

    def table(self) -> str:
        fits = [c for c in self.cases if "warm" not in c.info]
        rows = [[c.name, f"{c.median()['computed_first']:.0f}", _spread(c, "observed_first", ".0f"),
                 f"{c.median()['computed_most']:.0f}", _spread(c, "observed_most", ".0f")] for c in fits]
        subnet = fits[0].info["subnet"] if fits else ""
        head = ["setting (" + subnet + ", 3 x t3.medium)", "first waits after: computed", "observed",
                "fit at most: computed", "observed"]
        waits = [[c.name, _spread(c, "apply_s", ".3f")] for c in self.cases if "warm" in c.info]
        return _table(head, rows) + "\n\n" + _table(["lab apply of one pod", "wall s"], waits)

    def plot(self, plt, path: Path) -> None:
        fits = [c for c in self.cases if "warm" not in c.info]
        fig, ax = plt.subplots(figsize=(9, 4))
        xs = range(len(fits))
        ax.bar([x - 0.2 for x in xs], [c.median()["observed_first"] for c in fits], 0.4, label="first pod waits after")
        ax.bar([x + 0.2 for x in xs], [c.median()["observed_most"] for c in fits], 0.4, label="fit at most")
        ax.set_xticks(list(xs), [c.name.split(" (")[0] for c in fits], rotation=15, fontsize=7)
        ax.set_ylabel("pods running")
        ax.set_yscale("symlog")
        ax.set_title("pods that fit in one VPC subnet, per setting (observed)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


SUITE_CLASSES = {"dataplanes": Dataplanes, "services": Services, "dns": Dns, "updown": Updown, "ipam": Ipam}


def machine(suites: list[Suite]) -> dict:
    mtu = {}
    for suite in suites:
        if isinstance(suite, Dataplanes):
            mtu = {c.name: c.info["mtu"] for c in suite.cases if "mtu" in c.info}
    return {"kernel": platform.release(), "cores": os.cpu_count(), "python": platform.python_version(),
            "mtu": mtu, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run(selected: list[str], quick: bool, repeat: int | None, json_path: str | None, plot_dir: str | None) -> int:
    from lab.lifecycle import require_root

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
    suites = [SUITE_CLASSES[name](quick) for name in dict.fromkeys(selected or SUITES)]
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
