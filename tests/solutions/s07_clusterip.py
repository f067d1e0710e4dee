"""Reference solution of labs/07-clusterip: a Service for the api pods, then three answers read off the
live lab (the KUBE-SVC chain of default/web:http, the ping replies of the ClusterIP, the source address
an endpoint sees)."""
from __future__ import annotations

from tests.solutions.late_common import address_of, answer, apply, grep, main, run_in


def solve(name: str) -> None:
    apply(name, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"},
                 "spec": {"selector": {"app": "api"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    rules = run_in(name, "node1", "iptables-save", "-t", "nat")
    chain = grep(r'^-A KUBE-SERVICES .*"default/web:http cluster IP".* -j (KUBE-SVC-\S+)$', rules)
    ping = run_in(name, "client", "ping", "-c2", "-i0.2", "-W1", "10.96.0.100", check=False)
    replies = int(grep(r"(\d+) (?:packets )?received", ping))
    seen = address_of(run_in(name, "client", "curl", "-s", "--max-time", "5", "http://web/clientip"))
    answer(name, web_svc_chain=chain, clusterip_ping_replies=replies, seen_source=seen)


if __name__ == "__main__":
    main(solve)
