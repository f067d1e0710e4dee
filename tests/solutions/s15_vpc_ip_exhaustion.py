"""Reference solution of labs/15-vpc-ip-exhaustion: read the subnet's free count and a node's max pods from
`lab ipam`, give the warm pools' addresses back with WARM_IP_TARGET on the aws-node DaemonSet, then scale web
to 21 replicas."""
from __future__ import annotations

import json

from tests.solutions.late_common import answer, apply, lab, main


def solve(name: str) -> None:
    books = json.loads(lab("ipam", "--lab", name, "--json"))
    answer(name, free_addresses=books["subnets"][0]["free"], max_pods=books["nodes"][0]["maxPods"])
    apply(name, {"apiVersion": "apps/v1", "kind": "DaemonSet",
                 "metadata": {"name": "aws-node", "namespace": "kube-system"},
                 "spec": {"template": {"spec": {"containers": [
                     {"name": "aws-node", "env": [{"name": "WARM_IP_TARGET", "value": "1"}]}]}}}})
    web = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "default"},
           "spec": {"replicas": 21, "selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}},
                                 "spec": {"containers": [{"name": "app", "image": "agnhost",
                                                          "args": ["netexec", "--http-port=8080"]}]}}}}
    apply(name, web)


if __name__ == "__main__":
    main(solve)
