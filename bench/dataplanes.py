#!/usr/bin/env python3
"""Throughput (one and four TCP streams), ping RTT and TCP connect time per path: pod to pod across two
nodes for each backend (host-gw, vxlan, bgp, and the cilium profile in tunnel mode), on the host-gw lab
pod to pod on one node, pod to a ClusterIP and external host to a NodePort, and on the cilium lab pod to
a ClusterIP across nodes (the socket LB next to pod to pod: issue 18's connect p50 and throughput
targets); against a bare veth pair between two namespaces (the physical limit of this machine). The
measuring functions here are what `lab bench dataplanes` runs.

Cases are interleaved (every repetition runs each case once) and medians are reported, because all
"nodes" share one kernel and two cores: run-to-run noise of 10-25 % is normal here, and only differences
larger than that mean anything.

    .venv/bin/python bench/dataplanes.py [--repeat 3] [--json FILE] [--plot DIR]   (= lab bench dataplanes)
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
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


NODE_PORT_IPERF, NODE_PORT_HTTP = 30201, 30208
EXTERNAL = "192.168.1.200"


CILIUM = "cilium"  # a "backend" here: the cilium profile in its default tunnel mode (VXLAN), no kube-proxy


def two_node_lab(name: str, backend: str) -> dict:
    """Pods a and c on node1, b on node2, each an iperf3 server and an HTTP server (for connect times);
    a NodePort service in front of b; an external client host on the underlay. `cilium`: the same lab
    with the cilium profile (tunnel mode), whose ClusterIP is served by the socket LB."""
    cni = {"profile": "cilium"} if backend == CILIUM else None
    backend = "vxlan" if backend == CILIUM else backend
    containers = [{"name": "iperf", "image": "iperf3", "command": ["iperf3", "-s"]},
                  {"name": "http", "image": "agnhost", "args": ["netexec", "--http-port=8080"]}]
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": p, "labels": {"app": p}},
             "spec": {"nodeName": n, "containers": containers}}
            for p, n in (("a", "node1"), ("b", "node2"), ("c", "node1"))]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"},
               "spec": {"type": "NodePort", "selector": {"app": "b"},
                        "ports": [{"name": "iperf", "port": 5201, "nodePort": NODE_PORT_IPERF},
                                  {"name": "http", "port": 8080, "nodePort": NODE_PORT_HTTP}]}}
    return {"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"network": {"backend": backend}, "dns": {"enabled": False}, **({"cni": cni} if cni else {}),
                     "external": [{"name": "ext", "ip": EXTERNAL, "serves": []}],
                     "nodes": [{"name": "node1", "ip": "192.168.1.10"}, {"name": "node2", "ip": "192.168.1.11"}],
                     "objects": [*pods, service]}}


class BareVeth:
    """Two namespaces joined by one veth pair: no bridge, no routing, the floor of every path."""

    def __init__(self) -> None:
        self.tag = f"bench{uuid.uuid4().hex[:6]}"  # lab-shaped names: `lab clean` removes them after a crash
        self.a, self.b = names.node_netns(self.tag, "a"), names.node_netns(self.tag, "b")
        self.server: subprocess.Popen | None = None
        self.http: subprocess.Popen | None = None
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
        self.http = subprocess.Popen(["ip", "netns", "exec", self.b, sys.executable, "-m", "images.agnhost",
                                      "netexec", "--http-port=8080"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=REPO)

    def run(self, *cmd: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.a, *cmd], capture_output=True, text=True).stdout

    def close(self) -> None:
        try:
            for proc in (self.server, self.http):
                if proc is not None:
                    proc.terminate()
                    proc.wait()
            self.server = self.http = None
        finally:  # the namespaces go even if stopping the server is interrupted
            netns.delete(self.a)
            netns.delete(self.b)


def iperf_gbps(output: str) -> float:
    """iperf3 -J's received rate; NaN when it printed no result (a connection that failed under load)
    rather than losing the whole run."""
    try:
        return json.loads(output)["end"]["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError):
        return float("nan")


def ping_ms(output: str) -> float:
    match = re.search(r"= [\d.]+/([\d.]+)/", output)
    return float(match.group(1)) if match else float("nan")


def connect_us(run, url: str, count: int = 20) -> float:
    """Median TCP connect time (curl's time_connect) over `count` new connections, in microseconds."""
    script = f"for i in $(seq {count}); do curl -s -o /dev/null -w '%{{time_connect}}\\n' {url}; done"
    times = [float(t) * 1e6 for t in run("sh", "-c", script).split() if t.strip()]
    return statistics.median(times) if times else float("nan")


CONNECT_LOOP = """import socket, statistics, sys, time
port, count, dsts = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
times = {d: [] for d in dsts}
for _ in range(count):
    for d in dsts:
        s = socket.socket()
        t = time.perf_counter()
        s.connect((d, port))
        times[d].append(time.perf_counter() - t)
        s.close()
print(" ".join(str(statistics.median(times[d]) * 1e6) for d in dsts))
"""


def connect_p50_us(run, port: int, *dsts: str, count: int = 200) -> list[float]:
    """Median connect() time to each destination, `count` connections each, made one after another by one
    process inside the source, the destinations alternating (so a ClusterIP and its pod IP share every
    moment of the machine's noise). No process start per connection, unlike curl's time_connect: what a
    socket LB's connect4 program adds (about 1 us in 25) shows here."""
    out = run("python3", "-c", CONNECT_LOOP, str(port), str(count), *dsts).strip()
    try:
        return [float(x) for x in out.splitlines()[-1].split()]
    except (ValueError, IndexError):
        return [float("nan")] * len(dsts)


def measure(run, dst: str, seconds: int, iperf_port: int = 5201, http_port: int = 8080,
            ping: bool = True, paired: str | None = None) -> dict[str, float]:
    """One sample of every metric of a path: one TCP stream, 4 parallel streams, ping RTT (not for a
    ClusterIP, which answers no ping), TCP connect time (curl's, and connect() p50 in one process; for a
    ClusterIP also to `paired`, its backend pod: streams in the order ClusterIP, pod, pod, ClusterIP, and
    connects in the same loop, so both share the machine's noise of that moment)."""
    one = run("iperf3", "-c", dst, "-p", str(iperf_port), "-t", str(seconds), "-J", "--connect-timeout", "3000")
    four = run("iperf3", "-c", dst, "-p", str(iperf_port), "-t", str(seconds), "-P", "4", "-J",
               "--connect-timeout", "3000")
    sample = {"gbps": iperf_gbps(one), "gbps_4_streams": iperf_gbps(four),
              "connect_us": connect_us(run, f"http://{dst}:{http_port}/echo?msg=x")}
    if paired:  # a ClusterIP: its backend pod's IP measured next to it (ABBA) / in the same loop, alternating
        def stream(to: str) -> float:
            return iperf_gbps(run("iperf3", "-c", to, "-p", str(iperf_port), "-t", str(seconds), "-J",
                                  "--connect-timeout", "3000"))

        # ClusterIP, pod, pod, ClusterIP: whichever runs second in a pair tends to be faster here, so
        # each comes first once; the reported numbers are the means of each's two streams.
        pod = [stream(paired), stream(paired)]
        sample["gbps"] = (sample["gbps"] + stream(dst)) / 2
        sample["gbps_pod"] = sum(pod) / 2
        sample["connect_p50_us"], sample["connect_p50_pod_us"] = connect_p50_us(run, http_port, dst, paired,
                                                                                 count=400)
    else:
        sample["connect_p50_us"] = connect_p50_us(run, http_port, dst)[0]
    if ping:
        sample["rtt_ms"] = ping_ms(run("ping", "-c", "20", "-i", "0.01", "-q", dst))
    return sample


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
    from lab.bench_base import remove_lab  # `lab down`, or the crash-safe teardown if the build never finished

    remove_lab(name)


def measure_bare(bare: BareVeth, seconds: int) -> dict[str, float]:
    """Every metric between the two ends of the bare veth pair."""
    return measure(bare.run, "10.99.0.2", seconds)


def _in(name: str, target: str):
    return lambda *c: lab_cli("exec", "--lab", name, target, "--", *c)


def measure_lab(name: str, seconds: int, path: str = "across nodes") -> dict[str, float]:
    """Every metric of one path of a lab made by up_lab: pod a (node1) to pod b (node2) `across nodes`,
    to pod c on its own node (`same node`), to b's `ClusterIP`, or the external host to b's `NodePort`."""
    if path == "across nodes":
        return measure(_in(name, "a"), "10.244.2.2", seconds)
    if path == "same node":
        return measure(_in(name, "a"), "10.244.1.3", seconds)
    if path == "ClusterIP":
        vip = next(s["clusterIP"] for s in json.loads(lab_cli("status", name, "--json"))["services"]
                   if s["name"] == "b")
        return measure(_in(name, "a"), vip, seconds, ping=False, paired="10.244.2.2")
    if path == "NodePort":
        return measure(_in(name, "ext"), "192.168.1.10", seconds, NODE_PORT_IPERF, NODE_PORT_HTTP)
    raise ValueError(path)


if __name__ == "__main__":
    from lab.bench_base import script_main

    sys.exit(script_main("dataplanes", __doc__))
