"""Reference solution of labs/11-egress-nat: read the two source addresses (from batch, on node1), move
worker to node2 (its egress address is its node's), and set externalTrafficPolicy Local on the ledger
NodePort."""
from __future__ import annotations

from tests.solutions.late_common import address_of, agnhost_pod, answer, apply, lab, main, pod_ip, run_in


def solve(name: str) -> None:
    egress = run_in(name, "batch", "curl", "-s", "--max-time", "5", "http://192.168.1.200/clientip")
    direct = run_in(name, "batch", "curl", "-s", "--max-time", "5", f"http://{pod_ip(name, 'ledger-1')}:8080/clientip")
    answer(name, egress_source=address_of(egress), pod_source=address_of(direct))
    lab("delete", "--lab", name, "pod", "worker")
    apply(name, agnhost_pod("worker", "node2", {"app": "worker"}),
          {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ledger"},
           "spec": {"type": "NodePort", "externalTrafficPolicy": "Local", "selector": {"app": "ledger"},
                    "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30200}]}})


if __name__ == "__main__":
    main(solve)
