"""What kube-proxy's iptables loads cost when ONE Service has many endpoints (issue 15's `lab up`: 100 nodes
x 100 pods behind one Service), and the smallest partial load against a table of many services (issue 17's
legacy floor). Outside a lab: a scratch namespace with a lab-shaped name (`lab clean` removes it after a
crash), one node's full restore input as kube_proxy_iptables renders it, loaded with each backend's restore.

    python bench/iptables_load.py [--endpoints 1000,5000,10000] [--services 1000,5000,10000]
                                  [--backends nft,legacy] [--repeat 3]

Prints, per size and backend, the loader's wall time and its CPU (user / sys of the child: what does not
depend on how busy the machine is), and the Python time of one more node's plan + text (the first node
renders; the others share its body). Numbers are in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
import uuid
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services import kube_proxy_iptables as ipt  # noqa: E402
from services.endpoints import Endpoint, ServicePortEndpoints  # noqa: E402
from topo import names, netns  # noqa: E402
from topo.model import Cluster, Node, Service, ServicePort  # noqa: E402

CLUSTER = Cluster()
ONE_CHAIN = "*nat\n:KUBE-SVC-BENCHPROBE - [0:0]\n-A KUBE-SVC-BENCHPROBE -j RETURN\nCOMMIT\n"
DROP_CHAIN = "*nat\n:KUBE-SVC-BENCHPROBE - [0:0]\n-X KUBE-SVC-BENCHPROBE\nCOMMIT\n"


def node(i: int) -> Node:
    return Node(f"node{i}", IPv4Address(int(IPv4Address("192.168.1.10")) + i), IPv4Network(f"10.244.{i % 250}.0/24"), i)


def one_service(endpoints: int) -> list[ServicePortEndpoints]:
    """One Service selecting `endpoints` pods, 100 a node (the shape of bench/scale.py's 10,000)."""
    svc = Service("all", "default", CLUSTER.service_cidr.network_address + 100, (ServicePort("", 80, 8080),),
                  (("app", "pause"),))
    base = int(IPv4Address("10.244.0.0"))
    eps = tuple(Endpoint(IPv4Address(base + (i // 100) * 256 + 2 + i % 100), 8080, f"node{i // 100}", f"default/p{i}")
                for i in range(endpoints))
    return [ServicePortEndpoints(svc, svc.ports[0], eps)]


def many_services(count: int) -> list[ServicePortEndpoints]:
    from bench.services import service_ports  # two endpoints each, as `lab bench services`

    return service_ports(count)


def timed_load(ns: str, argv: list[str], text: str) -> tuple[float, float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with netns.entered(ns):
        proc = subprocess.run(argv, input=text.encode(), capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{argv[0]} failed: {proc.stderr.decode().strip()}")
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def median(samples: list[tuple[float, float, float]]) -> str:
    wall, user, sys_ = sorted(samples)[len(samples) // 2]
    return f"{wall:.3f} s (user {user:.3f} / sys {sys_:.3f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", default="1000,5000,10000")
    parser.add_argument("--services", default="1000,5000,10000")
    parser.add_argument("--backends", default="nft,legacy")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    backends = args.backends.split(",")
    netns.ensure_dir()
    ns = names.node_netns(f"kpload{uuid.uuid4().hex[:6]}", "node")
    netns.create(ns)
    try:
        for count in (int(n) for n in args.endpoints.split(",") if n):
            sps = one_service(count)
            ipt.forget()
            text = ipt.plan(node(1), sps, CLUSTER).text()
            started = time.perf_counter()
            ipt.plan(node(2), sps, CLUSTER).text()
            python = time.perf_counter() - started
            print(f"one Service, {count} endpoints: {text.count(chr(10))} lines, {len(text) / 1e6:.1f} MB; "
                  f"another node's plan + text {python * 1000:.1f} ms")
            for backend in backends:
                samples = [timed_load(ns, [f"iptables-{backend}-restore", "-w", "5"], text) for _ in range(args.repeat)]
                print(f"  full restore, {backend}: {median(samples)}")
        for count in (int(n) for n in args.services.split(",") if n):
            text = ipt.render(node(1), many_services(count), CLUSTER)
            for backend in backends:
                timed_load(ns, [f"iptables-{backend}-restore", "-w", "5"], text)
                samples = []
                for _ in range(args.repeat):
                    samples.append(timed_load(ns, [f"iptables-{backend}-restore", "-w", "5", "--noflush"], ONE_CHAIN))
                    timed_load(ns, [f"iptables-{backend}-restore", "-w", "5", "--noflush"], DROP_CHAIN)
                print(f"{count} services, smallest partial load (--noflush, one chain), {backend}: {median(samples)}")
                timed_load(ns, [f"iptables-{backend}-restore", "-w", "5"], "*nat\nCOMMIT\n*filter\nCOMMIT\n")
    finally:
        netns.delete(ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
