"""Reference solution of labs/08-proxy-scale: count the KUBE-SVC jumps in iptables mode, switch the lab
to nftables (edit lab.yaml, rebuild: a proxy mode is chosen when a lab is built), then read svc-300's
element of the service-ips verdict map. The IPVS task is left alone (it needs a kernel with IPVS)."""
from __future__ import annotations

import re

from tests.solutions.late_common import answer, grep, main, rebuild_with, run_in


def solve(name: str) -> None:
    rules = run_in(name, "node1", "iptables-save", "-t", "nat")
    jumps = len(re.findall(r"(?m)^-A KUBE-SERVICES .*-j KUBE-SVC-\S+$", rules))
    answer(name, kube_svc_jumps=jumps)
    rebuild_with(name, r"^(\s*mode:\s*)iptables\b", r"\1nftables")
    elements = run_in(name, "node1", "nft", "list", "map", "ip", "kube-proxy", "service-ips")
    answer(name, svc300_chain=grep(r"goto (service-[A-Z0-9]+-default/svc-300/tcp/http)", elements))


if __name__ == "__main__":
    main(solve)
