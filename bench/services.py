#!/usr/bin/env python3
"""Service rules at scale, per kube-proxy mode: full sync time, one-service update time, and connect
latency to the first- and last-created service, for 10 / 100 / 1,000 / 10,000 services (2 endpoints each).

Measured in a throwaway "node" namespace with the very renderers and loaders a lab uses, against two real
endpoint servers in a "pod" namespace behind a veth pair. Every service DNATs to those two servers, so what
differs between services is only where their rules sit in the lookup: iptables walks KUBE-SERVICES rule
by rule (O(N)); nftables looks the address up in a verdict map (O(1)); IPVS (where the kernel has it, e.g.
in the test VM) looks the virtual server up in its hash table (O(1)), its sync being the lab's own
(kube-ipvs0 addresses, ipsets, the nat helper rules, ipvsadm -R; the +1 sync a delta). cilium: no rules at
all; the cilium profile's socket-LB programs on a cgroup of the bed's own, its service maps synced by the
agent's own code (cilium.agent.write_services: the first time read the maps and write the difference in one
batch per map, the +1 only the new frontend's entries), the client's sockets made in that cgroup, so
connect() itself picks the backend (a hash lookup, O(1)).

Every sync is timed through the function a lab's node sync calls (kube_proxy.sync_iptables, sync_nftables,
sync_ipvs, cilium.agent.write_services), with its saved state in a temporary folder; the +1 service runs in
the same process as the full sync, with the same service port objects plus one (kube-proxy and the cilium
agent are long-running daemons: only the change is computed, see docs/services.md "Partial sync").

    .venv/bin/python bench/services.py [--repeat 3] [--json FILE] [--plot DIR]   (= lab bench services)
    .venv/bin/python bench/services.py --modes iptables-nft,cilium --counts 10000 [--repeat 3] [--connects 200]
                                        (chosen cases only, measured in this process, median and range)
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import time
import uuid
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services import kube_proxy, kube_proxy_iptables, kube_proxy_ipvs, kube_proxy_nftables  # noqa: E402
from services.endpoints import Endpoint, ServicePortEndpoints  # noqa: E402
from topo import names, netns, process  # noqa: E402
from topo.model import Cluster, Node, Service, ServicePort  # noqa: E402

CLUSTER = Cluster()
NODE = Node("node1", IPv4Address("192.168.1.10"), IPv4Network("10.244.1.0/24"), 0)
SERVERS = (IPv4Address("10.244.1.2"), IPv4Address("10.244.1.3"))


def vip(i: int) -> IPv4Address:
    return CLUSTER.service_cidr.network_address + 100 + i


def service_ports(count: int) -> list[ServicePortEndpoints]:
    out = []
    for i in range(count):
        svc = Service(f"svc-{i}", "default", vip(i), (ServicePort("", 80, 8080),), (("app", f"s{i}"),))
        eps = tuple(Endpoint(ip, 8080, "node1", f"default/ep-{i}-{j}") for j, ip in enumerate(SERVERS))
        out.append(ServicePortEndpoints(svc, svc.ports[0], eps))
    return out


class Bed:
    """node namespace (client + rules) <-veth-> pod namespace holding both endpoint addresses."""

    def __init__(self) -> None:
        self.tag = f"svcbench{uuid.uuid4().hex[:6]}"  # lab-shaped names: `lab clean` removes them after a crash
        self.node, self.pod = names.node_netns(self.tag, "node"), names.node_netns(self.tag, "pod")
        self.server = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        netns.ensure_dir()
        for ns in (self.node, self.pod):
            netns.create(ns)
        with netns.rtnl_in(self.node) as rt:
            fd = netns.open_fd(self.pod)
            rt.add_veth("veth0", "eth0", fd, 1500)
            os.close(fd)
            for dev in ("lo", "veth0"):
                rt.set_link(rt.link(dev).index, up=True)
            rt.add_addr(rt.link("veth0").index, IPv4Interface("10.244.1.1/24"))
            rt.replace_route(CLUSTER.service_cidr, oif=rt.link("veth0").index)
        with netns.rtnl_in(self.pod) as rt:
            for dev in ("lo", "eth0"):
                rt.set_link(rt.link(dev).index, up=True)
            for ip in SERVERS:
                rt.add_addr(rt.link("eth0").index, IPv4Interface(f"{ip}/24"))
        argv = [sys.executable, "-m", "images.agnhost", "netexec", "--http-port=8080"]
        self.server = process.spawn_in(self.pod, argv, None)
        self._wait_listening()

    def _wait_listening(self, timeout: float = 60.0) -> None:
        """Until the endpoint server accepts (a fixed pause was too short where Python starts slowly, as in
        the test VM under software emulation)."""
        deadline = time.monotonic() + timeout
        with netns.entered(self.node):
            while True:
                try:
                    socket.create_connection((str(SERVERS[0]), 8080), timeout=1).close()
                    return
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def load(self, argv: list[str], script: str) -> None:
        kube_proxy.load(self.node, argv, script)

    def connect_us(self, ip: IPv4Address, count: int) -> list[float]:
        samples = []
        with netns.entered(self.node):
            for _ in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                started = time.perf_counter()
                sock.connect((str(ip), 80))
                samples.append((time.perf_counter() - started) * 1e6)
                sock.close()
        return samples

    def close(self) -> None:
        try:
            if self.server is not None:
                process.kill_all([self.server])
                self.server = None
        finally:  # the namespaces go even if stopping the server is interrupted
            netns.delete(self.node)
            netns.delete(self.pod)
            from cilium import agent

            agent.remove(self.tag)  # the cilium case's cgroup and pins, when it made them


def _cilium_entries(sps: list[ServicePortEndpoints]) -> list:
    from cilium import maps

    tcp = maps.PROTOCOLS["tcp"]
    return [maps.ServiceEntry(maps.Frontend(sp.service.cluster_ip, sp.port.port, tcp),
                              tuple(maps.Backend(e.ip, e.port, tcp) for e in sp.endpoints), name=sp.name)
            for sp in sps]


def _cilium_syncs(bed: Bed, sps: list[ServicePortEndpoints], sps2: list[ServicePortEndpoints]) -> tuple[float, float]:
    """The cilium profile's full sync and +1 service sync of one node's maps, each timed around
    cilium.agent.write_services as cilium.agent.sync_node runs it. The entries are built before: they are the
    agent's services in memory, and the +1 list holds the same entry objects plus the new one, as a
    long-running agent's would (its write then computes and writes only the new frontend's entries)."""
    from cilium import agent, maps

    agent.setup_socket_lb(bed.tag, "node", maps.NODE_CONFIG.pack(NODE.pod_cidr.netmask.packed, NODE.ip.packed,
                                                                 maps.VNI))
    entries = _cilium_entries(sps)
    entries2 = entries + _cilium_entries(sps2[len(sps):])
    started = time.perf_counter()
    agent.write_services(bed.tag, "node", entries)
    full = time.perf_counter() - started
    started = time.perf_counter()
    agent.write_services(bed.tag, "node", entries2)
    return full, time.perf_counter() - started


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _ipvs_syncs(bed: Bed, sps: list[ServicePortEndpoints], sps2: list[ServicePortEndpoints]) -> tuple[float, float]:
    """IPVS mode's full sync and +1 service sync, each timed as services.kube_proxy runs it for a node."""
    with tempfile.TemporaryDirectory() as folder:
        saved = Path(folder) / "node.ipvs.json"
        started = time.perf_counter()
        kube_proxy.sync_ipvs(bed.node, kube_proxy_ipvs.build(NODE, sps, CLUSTER), saved)
        full = time.perf_counter() - started
        started = time.perf_counter()
        kube_proxy.sync_ipvs(bed.node, kube_proxy_ipvs.build(NODE, sps2, CLUSTER), saved)
        return full, time.perf_counter() - started


def _socket_lb(bed: Bed, mode: str):  # type: ignore[no-untyped-def]
    from cilium import agent

    return agent.spawning_in(bed.tag, "node") if mode == "cilium" else contextlib.nullcontext()


def measure_case(mode: str, count: int, connects: int) -> dict:
    """One measurement in a fresh bed: full sync, +1 service sync, and connect latencies (µs) to the first-
    and last-created service. The bed is removed before returning, also on failure."""
    bed = Bed()
    try:
        sps = service_ports(count)
        sps2 = sps + service_ports(count + 1)[count:]
        # Each time covers what one node's sync costs: rendering the rules in Python plus loading them.
        if mode == "ipvs":
            full, one = _ipvs_syncs(bed, sps, sps2)
        elif mode == "cilium":
            full, one = _cilium_syncs(bed, sps, sps2)
        elif mode.startswith("iptables"):
            # kube_proxy.sync_iptables as a node's sync runs it: a full restore first, then the partial
            # sync (only the changed chains, --noflush) for the +1 service, in the same process (kube-proxy
            # is a long-running daemon: the rules of unchanged service ports are not rendered again)
            backend = mode.split("-", 1)[1] if "-" in mode else kube_proxy.host_iptables_backend()
            with tempfile.TemporaryDirectory() as folder:
                saved = Path(folder) / "node.iptables.rules"
                kube_proxy_iptables.forget()  # the full sync renders everything, as a fresh start
                started = time.perf_counter()
                kube_proxy.sync_iptables(bed.node, kube_proxy_iptables.plan(NODE, sps, CLUSTER), backend, saved)
                full = time.perf_counter() - started
                started = time.perf_counter()
                how = kube_proxy.sync_iptables(bed.node, kube_proxy_iptables.plan(NODE, sps2, CLUSTER), backend,
                                               saved)
                one = time.perf_counter() - started
                assert how == "partial", how
        else:
            # kube_proxy.sync_nftables as a node's sync runs it: the whole table first, then (same process,
            # kube-proxy being a daemon) only the changed service port's chains and elements
            with tempfile.TemporaryDirectory() as folder:
                saved = Path(folder) / "node.nft.json"
                kube_proxy_nftables._BY_ID.clear()
                started = time.perf_counter()
                kube_proxy.sync_nftables(bed.node, NODE, sps, CLUSTER, saved)
                full = time.perf_counter() - started
                started = time.perf_counter()
                how = kube_proxy.sync_nftables(bed.node, NODE, sps2, CLUSTER, saved)
                one = time.perf_counter() - started
                assert how == "partial", how
        with _socket_lb(bed, mode):  # cilium: the client's sockets made in the node's cgroup
            first = bed.connect_us(vip(0), connects)
            last = bed.connect_us(vip(count - 1), connects)
    finally:
        bed.close()
    return {"mode": mode, "services": count, "full_sync_s": full, "one_service_update_s": one,
            "first_p50_us": pct(first, 50), "first_p99_us": pct(first, 99),
            "last_p50_us": pct(last, 50), "last_p99_us": pct(last, 99)}


def _direct(modes: list[str], counts: list[int], repeat: int, connects: int) -> None:
    """`--modes`/`--counts`: the chosen cases only, measured here (not through `lab bench`), one row each
    with the median of `repeat` runs and their range."""
    import statistics

    print("mode              services  full sync s            +1 service s              last/first p50")
    for mode in modes:
        for count in counts:
            rows = [measure_case(mode, count, connects) for _ in range(repeat)]

            def spread(key: str) -> str:
                values = [r[key] for r in rows]
                return f"{statistics.median(values):.4f} ({min(values):.4f}-{max(values):.4f})"

            ratio = statistics.median(r["last_p50_us"] / r["first_p50_us"] for r in rows)
            print(f"{mode:17} {count:>8,}  {spread('full_sync_s'):22} {spread('one_service_update_s'):25} "
                  f"{ratio:.2f}x", flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--modes", help="comma-separated: iptables-nft,iptables-legacy,nftables,ipvs,cilium")
    parser.add_argument("--counts", help="comma-separated service counts, e.g. 10000")
    parser.add_argument("--connects", type=int, default=200)
    known, rest = parser.parse_known_args()
    if known.modes or known.counts:
        repeat = 3
        if "--repeat" in rest:
            repeat = int(rest[rest.index("--repeat") + 1])
        _direct((known.modes or "iptables-nft,iptables-legacy,nftables,cilium").split(","),
                [int(c) for c in (known.counts or "10,100,1000,10000").split(",")], repeat, known.connects)
        sys.exit(0)
    from lab.bench_base import script_main

    sys.exit(script_main("services", __doc__))
