"""Reference solution of labs/12-network-policy. Switching the CNI profile is a change of the lab spec,
so the solution edits the exercise's lab.yaml and rebuilds the lab (as the README tells the learner),
then applies a namespace-wide default deny plus the one allow the story needs (web to api)."""
from __future__ import annotations

from tests.solutions.late_common import apply, main, rebuild_with


def solve(name: str) -> None:
    rebuild_with(name, r"^(\s*profile:\s*)flannel\b", r"\1calico")
    apply(name,
          {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "default-deny-ingress"},
           "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}},
          {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "api-from-web"},
           "spec": {"podSelector": {"matchLabels": {"app": "api"}}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                 "ports": [{"port": 8080, "protocol": "TCP"}]}]}})


if __name__ == "__main__":
    main(solve)
