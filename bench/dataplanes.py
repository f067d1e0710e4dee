#!/usr/bin/env python3
"""Pod-to-pod throughput and latency across two nodes for each backend (host-gw, vxlan, bgp), against a
bare veth pair between two namespaces (the physical limit of this machine), in one run.

Cases are interleaved (every repetition runs each case once) and medians are reported, because all
"nodes" share one kernel and two cores: run-to-run noise of 10-25 % is normal here, and only differences
larger than that mean anything.

    .venv/bin/python bench/dataplanes.py [--repeat 3] [--seconds 5] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from topo import names, netns  # noqa: E402

BACKENDS = ("host-gw", "vxlan", "bgp")


def lab_cli(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout


def two_node_lab(name: str, backend: str) -> dict:
    iperf = {"name": "iperf", "image": "iperf3", "command": ["iperf3", "-s"]}
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": p},
             "spec": {"nodeName": n, "containers": [iperf]}} for p, n in (("a", "node1"), ("b", "node2"))]
    return {"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"network": {"backend": backend},
                     "nodes": [{"name": "node1", "ip": "192.168.1.10"}, {"name": "node2", "ip": "192.168.1.11"}],
                     "objects": pods}}


class BareVeth:
    """Two namespaces joined by one veth pair: no bridge, no routing, the floor of every path."""

    def __init__(self) -> None:
        self.tag = f"bench{uuid.uuid4().hex[:6]}"  # lab-shaped names: `lab clean` removes them after a crash
        self.a, self.b = names.node_netns(self.tag, "a"), names.node_netns(self.tag, "b")
        self.server: subprocess.Popen | None = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        netns.ensure_dir()
        netns.create(self.a)
        netns.create(self.b)
        with netns.rtnl_in(self.a) as rt:
            fd = netns.open_fd(self.b)
            rt.add_veth("eth0", "eth0", fd, 1500)
            os.close(fd)
        for ns, ip in ((self.a, "10.99.0.1/30"), (self.b, "10.99.0.2/30")):
            with netns.rtnl_in(ns) as rt:
                from ipaddress import IPv4Interface

                for dev in ("lo", "eth0"):
                    rt.set_link(rt.link(dev).index, up=True)
                rt.add_addr(rt.link("eth0").index, IPv4Interface(ip))
        self.server = subprocess.Popen(["ip", "netns", "exec", self.b, "iperf3", "-s"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)

    def run(self, *cmd: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.a, *cmd], capture_output=True, text=True).stdout

    def close(self) -> None:
        try:
            if self.server is not None:
                self.server.terminate()
                self.server.wait()
                self.server = None
        finally:  # the namespaces go even if stopping the server is interrupted
            netns.delete(self.a)
            netns.delete(self.b)


def iperf_gbps(output: str) -> float:
    return json.loads(output)["end"]["sum_received"]["bits_per_second"] / 1e9


def ping_ms(output: str) -> float:
    match = re.search(r"= [\d.]+/([\d.]+)/", output)
    return float(match.group(1)) if match else float("nan")


def measure(run, dst: str, seconds: int) -> tuple[float, float]:
    out = run("iperf3", "-c", dst, "-t", str(seconds), "-J", "--connect-timeout", "3000")
    rtt = run("ping", "-c", "20", "-i", "0.01", "-q", dst)
    return iperf_gbps(out), ping_ms(rtt)


def up_lab(backend: str, folder: Path) -> tuple[str, int]:
    """Bring up the two-node lab of one backend; returns its name and the pod MTU. On failure the half-built
    lab is taken down before the error propagates."""
    name = f"bench-{backend.replace('-', '')}-{uuid.uuid4().hex[:4]}"
    spec = folder / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(two_node_lab(name, backend)))
    try:
        lab_cli("up", str(spec))
        return name, json.loads(lab_cli("status", name, "--json"))["mtu"]
    except BaseException:
        down_lab(name)
        raise


def down_lab(name: str) -> None:
    from lab.bench import remove_lab  # `lab down`, or the crash-safe teardown if the build never finished

    remove_lab(name)


def measure_bare(bare: BareVeth, seconds: int) -> tuple[float, float]:
    """(Gbit/s, RTT ms) between the two ends of the bare veth pair."""
    return measure(bare.run, "10.99.0.2", seconds)


def measure_lab(name: str, seconds: int) -> tuple[float, float]:
    """(Gbit/s, RTT ms) from pod a on node1 to pod b on node2 of a lab made by up_lab."""
    return measure(lambda *c: lab_cli("exec", "--lab", name, "a", "--", *c), "10.244.2.2", seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--json", help="write every sample and the machine description here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (it builds real labs)", file=sys.stderr)
        return 3
    labs: dict[str, str] = {}
    samples: dict[str, dict[str, list[float]]] = {c: {"gbps": [], "rtt_ms": []} for c in ("bare veth", *BACKENDS)}
    mtu: dict[str, int] = {"bare veth": 1500}
    bare = BareVeth()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for backend in BACKENDS:
                labs[backend], mtu[backend] = up_lab(backend, Path(tmp))
        for rep in range(args.repeat):
            for case in samples:
                if case == "bare veth":
                    gbps, rtt = measure_bare(bare, args.seconds)
                else:
                    gbps, rtt = measure_lab(labs[case], args.seconds)
                samples[case]["gbps"].append(gbps)
                samples[case]["rtt_ms"].append(rtt)
                print(f"  run {rep + 1}/{args.repeat} {case:10} {gbps:6.2f} Gbit/s  {rtt:.3f} ms", file=sys.stderr)
    finally:
        bare.close()
        for name in labs.values():
            down_lab(name)
    base = statistics.median(samples["bare veth"]["gbps"])
    print(f"\n{'path':32} {'MTU':>5} {'Gbit/s median':>14} {'range':>13} {'vs bare veth':>13} {'RTT ms':>8}")
    rows = []
    for case, got in samples.items():
        med = statistics.median(got["gbps"])
        rtt = statistics.median(got["rtt_ms"])
        label = "bare veth pair" if case == "bare veth" else f"pod to pod across nodes, {case}"
        print(f"{label:32} {mtu[case]:>5} {med:14.2f} {min(got['gbps']):6.2f}-{max(got['gbps']):<6.2f} "
              f"{med / base:12.0%} {rtt:8.3f}")
        rows.append({"case": case, "mtu": mtu[case], "gbps": got["gbps"], "rtt_ms": got["rtt_ms"],
                     "gbps_median": med, "ratio_to_bare": med / base, "rtt_ms_median": rtt})
    if args.json:
        machine = {"kernel": platform.release(), "cores": os.cpu_count(), "python": platform.python_version()}
        Path(args.json).write_text(json.dumps({"machine": machine, "seconds": args.seconds, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
