"""Reference solution of labs/10-nodeport-ingress: shop as NodePort 30100, one Ingress for the three
sites by host name, and the source address a site sees through the Ingress (the controller pod's)."""
from __future__ import annotations

from tests.solutions.late_common import address_of, answer, apply, main, run_in


def _rule(site: str) -> dict:
    backend = {"service": {"name": site, "port": {"number": 80}}}
    return {"host": f"{site}.example.com", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]}}


def solve(name: str) -> None:
    apply(name,
          {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shop"},
           "spec": {"type": "NodePort", "selector": {"app": "shop"},
                    "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30100}]}},
          {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "sites"},
           "spec": {"rules": [_rule(site) for site in ("shop", "blog", "docs")]}})
    seen = run_in(name, "browser", "curl", "-s", "--max-time", "5", "--retry", "5", "--retry-connrefused",
                  "-H", "Host: blog.example.com", "http://192.168.1.11:30080/clientip")
    answer(name, ingress_source=address_of(seen))


if __name__ == "__main__":
    main(solve)
