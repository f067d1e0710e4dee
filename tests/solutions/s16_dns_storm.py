"""Reference solution of labs/16-dns-storm: count the storm from the untouched pod (4 search domains, the
cluster's three and the node's cloud domain, then the name: 5 names x A and AAAA), recreate `app` with
ndots:2 (api.example.com, 2 dots, is asked as is first; web.default, 1 dot, still takes the search list),
then turn on NodeLocal DNSCache, a setting of the lab: edit lab.yaml, re-create the lab, and apply the app
fix again (the re-created lab starts from lab.yaml's pods)."""
from __future__ import annotations

from tests.solutions.late_common import agnhost_pod, answer, apply, dns_count, lab, main, rebuild_with, run_in


def fix_app(name: str) -> None:
    lab("delete", "--lab", name, "pod", "app")
    apply(name, agnhost_pod("app", "node1", {"app": "app"},
                            dnsConfig={"options": [{"name": "ndots", "value": "2"}]}))


def solve(name: str) -> None:
    lookup = dns_count(name, "probe", "api.example.com")
    search = next(line.split()[1:] for line in run_in(name, "probe", "cat", "/etc/resolv.conf").splitlines()
                  if line.startswith("search "))
    answer(name, lookup_queries=len(lookup["clusterQueries"]), search_domains=len(search))
    fix_app(name)
    rebuild_with(name, r"^(\s+nodeLocal:) false$", r"\1 true")
    fix_app(name)


if __name__ == "__main__":
    main(solve)
