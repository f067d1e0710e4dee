"""The `lab bench` suites that measure one gotcha each as a lab grows: `scale` (what one change costs at
1,000 or 10,000 pods, bench/scale.py), `dns-load` (the ndots:5 storm and its fixes, bench/dnsload.py) and
`ipam` (pods that fit in one VPC subnet per aws-vpc setting, bench/vpc_ipam.py), `observe` (what `lab
observe` costs) and `policy` (what NetworkPolicy costs per profile, bench/policy.py).
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from topo.errors import FeatureMissing

from lab.bench_base import Case, Suite, _lab_cli, bench_script, _spread, _table, remove_lab

DNS_CLIENTS = (20, 50, 100, 200)  # `lab bench dns` storm sizes without --clients
SCALE_SIZES = (1000,)  # `lab bench scale` without --sizes; 10,000 takes minutes (issue 15 measured it)
DNS_NAME = "api.example.com"


class Scale(Suite):
    """The change path's cost as a lab grows (bench/scale.py): the seed lab, then each size, side by side."""
    name = "scale"

    def __init__(self, quick: bool, sizes: tuple[int, ...] = SCALE_SIZES) -> None:
        super().__init__(quick)
        self.folder: Path | None = None
        self.cases.append(Case("seed lab (3 pods)", self._runner(None), {"pods": 3}))
        for size in () if quick else sizes:
            nodes, per_node = bench_script("scale").shape(size)
            self.cases.append(Case(f"{nodes} nodes x {per_node} pods", self._runner(size), {"pods": nodes * per_node}))

    def _runner(self, size: int | None) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            sc = bench_script("scale")
            return sc.measure(sc.seed_spec if size is None else (lambda n: sc.scale_spec(n, size)), self.folder)
        return run

    def setup(self, stack: ExitStack, folder: Path) -> None:
        self.folder = folder

    def table(self) -> str:
        seed = self.cases[0].median().get("apply_one_s") if self.cases[0].samples else None
        rows = []
        for c in self.cases:
            ratio = f"{c.median()['apply_one_s'] / seed:.2f}x" if seed and c.samples else "-"
            loads = c.median().get("up_rule_loads_cpu_s") if c.samples else None
            rows.append([c.name, _spread(c, "up_s", ".2f"), _cpu(c, "up"), "-" if loads is None else f"{loads:.2f}",
                         _spread(c, "apply_one_s", ".3f"), ratio,
                         _cpu(c, "apply_one"),
                         _spread(c, "delete_one_s", ".3f"), _spread(c, "status_s", ".3f"), _spread(c, "down_s", ".2f"),
                         _spread(c, "down_freed_s", ".2f") if "down_freed_s" in c.samples else "-"])
        return _table(["case", "lab up s", "its CPU s", "rule loads", "apply 1 pod s", "vs seed", "its CPU s",
                       "delete 1 pod s", "lab status s", "lab down s", "kernel done s"], rows) + (
            "\nits CPU s: the command with what it ran / the whole machine / PID 1 (medians; PID 1 is idle on an"
            "\nordinary machine, a VM's supervisor may not be: docs/benchmarks.md, issue 15's tenth step)"
            "\nrule loads: CPU s of loading kube-proxy's rules into every node, estimated from three nodes' loads"
            "\n(part of lab up's CPU; every node's rules hold every endpoint, as kube-proxy's do)")

    def plot(self, plt, path: Path) -> None:
        fig, ax = plt.subplots(figsize=(8, 4))
        xs = range(len(self.cases))
        for offset, key, label in ((-0.3, "apply_one_s", "apply 1 pod"), (-0.1, "delete_one_s", "delete 1 pod"),
                                   (0.1, "status_s", "lab status")):
            ax.bar([x + offset for x in xs], [c.median()[key] for c in self.cases], 0.2, label=label)
        ax.set_xticks(list(xs), [c.name for c in self.cases])
        ax.set_ylabel("wall time (s)")
        ax.set_title("one change vs the size of the lab (CLI wall time)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def _cpu(case: Case, prefix: str) -> str:
    """`command / machine / PID 1` CPU seconds of a scale case's step (medians), or "-" for older samples."""
    keys = [f"{prefix}_cpu_s", f"{prefix}_machine_cpu_s", f"{prefix}_pid1_cpu_s"]
    if not all(k in case.samples for k in keys):
        return "-"
    med = case.median()
    return " / ".join(f"{med[k]:.1f}" if med[k] >= 10 else f"{med[k]:.2f}" for k in keys)


class DnsLoad(Suite):
    """The ndots:5 storm and its fixes (bench/dnsload.py), side by side: every setting at every client count."""
    name = "dns-load"
    RATE, SECONDS = 2.0, 4.0  # lookups per second per client, seconds per case

    def __init__(self, quick: bool, clients: tuple[int, ...] = DNS_CLIENTS) -> None:
        super().__init__(quick)
        script = bench_script("dnsload")
        self.clients = (4,) if quick else clients
        self.rate, self.seconds = (5.0, 2.0) if quick else (self.RATE, self.SECONDS)
        self.lab, self.folder = "", Path()
        settings = [s for s in script.SETTINGS if not quick or s.name in script.QUICK_SETTINGS]
        for count in self.clients:
            for setting in settings:
                self.cases.append(Case(f"{setting.name} x{count}", self._runner(setting, count),
                                       {"setting": setting.name, "clients": count, "rate": self.rate,
                                        "seconds": self.seconds, "libc": setting.libc, "lookup": setting.lookup,
                                        "dns_cpu": script.DNS_CPU}))

    def _runner(self, setting, count: int) -> Callable[[], dict[str, float]]:  # type: ignore[no-untyped-def]
        return lambda: bench_script("dnsload").run_case(self.lab, setting, count, self.rate, self.seconds, self.folder)

    def setup(self, stack: ExitStack, folder: Path) -> None:
        import yaml

        from images import dnsclient

        try:
            dnsclient.binary("glibc")
            dnsclient.binary("musl")
        except dnsclient.ClientMissing as exc:
            raise FeatureMissing(f"lab bench dns: {exc}") from exc
        self.lab, self.folder = f"bench-storm-{uuid.uuid4().hex[:4]}", folder
        path = folder / f"{self.lab}.yaml"
        path.write_text(yaml.safe_dump(bench_script("dnsload").storm_spec(self.lab, max(self.clients)), sort_keys=False))
        stack.callback(remove_lab, self.lab)
        _lab_cli("up", str(path))

    def table(self) -> str:
        rows = [[c.info["setting"], str(c.info["clients"]), _spread(c, "dns_queries_per_lookup", ".1f"),
                 _spread(c, "dns_queries_per_s", ".0f"), _spread(c, "nxdomain_share", ".0%"),
                 _spread(c, "upstream_queries_per_s", ".0f"), _spread(c, "node_cache_queries_per_s", ".0f"),
                 _spread(c, "lookups_per_s", ".0f"), _spread(c, "p50_ms", ".1f"), _spread(c, "p99_ms", ".1f"),
                 _spread(c, "failures", ".0f"), _spread(c, "over_1s", ".0f"), _spread(c, "insert_failed", ".0f"),
                 _spread(c, "dns_throttled_periods", ".0f")]
                for c in self.cases]
        return (f"{self.rate:g} lookups/s per client for {self.seconds:g} s; cluster DNS limited to "
                f"{bench_script('dnsload').DNS_CPU} CPU; autopath: not available (dnsmasq cannot expand search paths "
                "server-side)\n" + _table(["setting", "clients", "queries/lookup at DNS", "DNS q/s", "NXDOMAIN",
                                            "upstream q/s", "node cache q/s", "lookups/s", "p50 ms", "p99 ms",
                                            "failures", ">1 s", "insert_failed", "DNS throttled"], rows))

    def plot(self, plt, path: Path) -> None:
        fig, ax = plt.subplots(figsize=(7, 4))
        for setting in dict.fromkeys(c.info["setting"] for c in self.cases):
            cases = [c for c in self.cases if c.info["setting"] == setting]
            ax.plot([c.info["clients"] for c in cases], [c.median()["dns_queries_per_s"] for c in cases],
                    marker="o", label=setting)
        ax.set_xlabel("client pods")
        ax.set_ylabel("queries/s at the cluster DNS")
        ax.set_title(f"The ndots:5 storm: {self.rate:g} lookups/s per client of {DNS_NAME}")
        ax.legend(fontsize=7)
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
        script = bench_script("vpc_ipam")
        for setting in (script.QUICK if quick else script.SETTINGS):
            self.cases.append(Case(setting, self._fits(setting), {"subnet": script.SUBNET, "nodes": script.NODES,
                                                                   "instanceType": script.INSTANCE}))
        for warm in (True, False):
            self.cases.append(Case("one pod, warm pool" if warm else "one pod, empty pool (WARM_IP_TARGET=0)",
                                   self._wait(warm), {"warm": warm}))

    def _fits(self, setting: str) -> Callable[[], dict[str, float]]:
        return lambda: bench_script("vpc_ipam").observed(setting, self.folder)

    def _wait(self, warm: bool) -> Callable[[], dict[str, float]]:
        return lambda: {"apply_s": bench_script("vpc_ipam").wait_for_address(self.folder, warm)}

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


class Observe(Suite):
    """What `lab observe --follow` costs the traffic it watches (bench/observe.py), per profile: the same
    lab measured without and with an observer, alternately, so the ratio compares like with like."""
    name = "observe"

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        self.seconds = 1 if quick else 3
        self.profiles = ("calico",) if quick else ("flannel", "calico", "cilium")
        self.labs: dict[str, str] = {}
        for profile in self.profiles:
            for observed in (False, True):
                self.cases.append(Case(f"{profile} {'observed' if observed else 'none'}",
                                       self._runner(profile, observed), {"profile": profile, "observed": observed}))

    def _runner(self, profile: str, observed: bool) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            return bench_script("observe").measure(self.labs[profile], self.seconds, observed)
        return run

    def setup(self, stack: ExitStack, folder: Path) -> None:
        import shutil

        if shutil.which("iperf3") is None:
            raise FeatureMissing("lab bench observe needs iperf3 (./install.sh installs it)")
        for profile in self.profiles:
            if profile == "cilium":
                try:
                    from cilium import agent
                    agent.require()
                except Exception:  # no cgroup2/clang/libbpf here: measure the other profiles
                    self.cases = [c for c in self.cases if c.info["profile"] != "cilium"]
                    continue
            self.labs[profile] = bench_script("observe").up_lab(profile, folder)
            stack.callback(remove_lab, self.labs[profile])

    def table(self) -> str:
        rows = []
        for c in self.cases:
            base = next(b for b in self.cases if b.info["profile"] == c.info["profile"] and not b.info["observed"])
            rows.append([c.name, _spread(c, "gbps", ".2f"), _ratio_of(c, base, "gbps"), _spread(c, "connects_s", ".0f"),
                         _ratio_of(c, base, "connects_s"), _spread(c, "flows", ".0f") if c.info["observed"] else "-",
                         _spread(c, "lost", ".0f") if c.info["observed"] else "-"])
        return _table(["case", "Gbit/s 1 stream", "vs none", "connects/s (ClusterIP)", "vs none", "flows shown",
                       "events lost"], rows)

    def plot(self, plt, path: Path) -> None:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar([c.name for c in self.cases], [c.median()["gbps"] for c in self.cases], color="tab:blue")
        ax.set_ylabel("Gbit/s (iperf3, one TCP stream, pod to pod across nodes)")
        ax.set_title("lab observe --follow running vs none")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


class Policy(Suite):
    """What NetworkPolicy costs per profile (bench/policy.py): one new pod's update of a node, calico's nft
    reload against cilium's map entries, and TCP throughput with a default-deny + allow policy against none
    (ABBA inside each sample, one lab per profile serving both sides)."""
    name = "policy"

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        self.pods = 200 if quick else 1000
        self.seconds = 1 if quick else 3
        self.profiles = ("calico", "cilium")
        self.labs: dict[str, tuple[str, Path]] = {}
        self.cases.append(Case(f"update: 1 new pod of {self.pods:,}, 100 policies", self._update,
                               {"pods": self.pods, "policies": 100, "nodes": 2}))
        for profile in self.profiles:
            self.cases.append(Case(f"{profile} throughput", self._runner(profile), {"profile": profile}))

    def _update(self) -> dict[str, float]:
        return bench_script("policy").update_case(self.pods)

    def _runner(self, profile: str) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            name, path = self.labs[profile]
            return bench_script("policy").enforcement_case(name, path, self.seconds)
        return run

    def setup(self, stack: ExitStack, folder: Path) -> None:
        import shutil

        if shutil.which("iperf3") is None or shutil.which("nft") is None:
            raise FeatureMissing("lab bench policy needs iperf3 and nft (./install.sh installs them)")
        try:
            from cilium import agent
            agent.require()
        except Exception as exc:  # the cilium side is half of every ratio: no suite rather than half of one
            raise FeatureMissing(f"lab bench policy needs the cilium profile here: {exc}") from exc
        for profile in self.profiles:
            self.labs[profile] = bench_script("policy").up_lab(profile, folder)
            stack.callback(remove_lab, self.labs[profile][0])

    def table(self) -> str:
        up = self.cases[0]
        m = up.median() if up.samples else {}
        rows = [["calico: render + nft -f of the node's table", _spread(up, "calico_s", ".3f") if m else "-",
                 _spread(up, "calico_render_s", ".3f") if m else "-", "-"],
                ["cilium: identities + policy maps, changed entries", _spread(up, "cilium_s", ".3f") if m else "-",
                 _spread(up, "cilium_compute_s", ".3f") if m else "-",
                 _spread(up, "cilium_entries_written", ".0f") if m else "-"]]
        text = (f"one new pod among {up.info['pods']:,} pods (2 nodes) and 100 policies, one node brought in line\n"
                + _table(["profile", "update s", "of which computing s", "map entries written"], rows))
        if m and m["cilium_s"]:
            text += f"\ncalico / cilium update time: {m['calico_s'] / m['cilium_s']:.1f}x"
        rows = [[c.info["profile"], _spread(c, "gbps_none", ".2f"), _spread(c, "gbps_policy", ".2f"),
                 _spread(c, "ratio", ".3f") + "x"] for c in self.cases[1:] if c.samples]
        text += ("\n\none TCP stream pod a (node1) -> pod b (node2), iperf3, ABBA: none, policy, policy, none\n"
                 + _table(["profile", "Gbit/s no policy", "Gbit/s deny + allow", "policy vs none"], rows))
        return text + "\n(issue 19's target: cilium >= 0.95x of no policy)"

    def plot(self, plt, path: Path) -> None:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        up = self.cases[0].median()
        left.bar(["calico (nft reload)", "cilium (map entries)"], [up["calico_s"], up["cilium_s"]], color="tab:blue")
        left.set_ylabel("seconds per node")
        left.set_title(f"1 new pod among {self.pods:,}, 100 policies")
        cases = [c for c in self.cases[1:] if c.samples]
        xs = range(len(cases))
        right.bar([x - 0.2 for x in xs], [c.median()["gbps_none"] for c in cases], 0.4, label="no policy")
        right.bar([x + 0.2 for x in xs], [c.median()["gbps_policy"] for c in cases], 0.4, label="deny + allow")
        right.set_xticks(list(xs), [c.info["profile"] for c in cases])
        right.set_ylabel("Gbit/s (iperf3, one TCP stream, across nodes)")
        right.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def _ratio_of(case: Case, base: Case, key: str) -> str:
    if not case.samples or not base.samples or not base.median()[key]:
        return "-"
    return f"{case.median()[key] / base.median()[key]:.2f}x"
