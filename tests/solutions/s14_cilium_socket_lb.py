"""Reference solution of labs/14-cilium-socket-lb: capture client-1's SYN to db's ClusterIP (it carries the
backend's address: the socket LB rewrote the connect()), count the KUBE-* rules of node1 (none), read each
node's service map (a web slot is missing) and make the agent sync again by re-applying the web Service."""
from __future__ import annotations

import subprocess
import sys
import time

from tests.solutions.late_common import REPO, answer, apply, grep, lab, main, run_in, status

WEB = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
       "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


def syn_destination(name: str, cluster_ip: str) -> str:
    """tcpdump in client-1 (one SYN), while curl connects to db's ClusterIP from client-1."""
    capture = subprocess.Popen([sys.executable, "-m", "lab.cli", "exec", "--lab", name, "client-1", "--",
                                "timeout", "10", "tcpdump", "-lni", "eth0", "-c", "1", "tcp[tcpflags] & tcp-syn != 0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        time.sleep(1.5)  # tcpdump is listening
        run_in(name, "client-1", "curl", "-s", "--max-time", "5", f"http://{cluster_ip}:5432/hostname")
        out, _ = capture.communicate(timeout=15)
    finally:
        capture.kill()
    return grep(r" > (\d+\.\d+\.\d+\.\d+)\.5432: Flags \[S\]", out)


def solve(name: str) -> None:
    services = {s["name"]: s for s in status(name)["services"]}
    dest = syn_destination(name, services["db"]["clusterIP"])
    rules = run_in(name, "node1", "iptables-save", "-t", "nat")
    answer(name, syn_destination=dest, service_nat_rules=sum("KUBE-" in line for line in rules.splitlines()))
    for node in ("node1", "node2"):
        listing = lab("cilium", "--lab", name, node, "service", "list")
        assert listing.count("(active)") < 6, listing  # web lost one backend slot (3 web + 1 db when whole)
    apply(name, WEB)  # the agent syncs after every apply: it writes what the kernel's maps lack
    for node in ("node1", "node2"):
        listing = lab("cilium", "--lab", name, node, "service", "list")
        assert listing.count("(active)") == 4, listing


if __name__ == "__main__":
    main(solve)
