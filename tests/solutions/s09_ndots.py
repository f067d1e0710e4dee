"""Reference solution of labs/09-ndots: count the storm from the untouched pod, then recreate `app` with
ndots:2 (api.example.com, 2 dots, becomes absolute; web.default, 1 dot, still takes the search list and
never leaves the cluster; ndots:1 would leak it upstream)."""
from __future__ import annotations

from tests.solutions.late_common import agnhost_pod, answer, apply, dns_count, lab, main


def solve(name: str) -> None:
    default = dns_count(name, "probe", "api.example.com")
    fqdn = dns_count(name, "probe", "api.example.com.")
    answer(name, default_queries=len(default["clusterQueries"]), upstream_queries=len(default["upstreamQueries"]),
           fqdn_queries=len(fqdn["clusterQueries"]))
    lab("delete", "--lab", name, "pod", "app")
    apply(name, agnhost_pod("app", "node1", {"app": "app"},
                            dnsConfig={"options": [{"name": "ndots", "value": "2"}]}))


if __name__ == "__main__":
    main(solve)
