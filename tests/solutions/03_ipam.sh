#!/bin/bash
# Reference solution of labs/03-ipam.
. "$(dirname "$0")/common.sh" "$@"

# A /28 has 16 addresses: network, broadcast and cni0's .1 leave 13 for pods.
cidr=$(status_json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["nodes"][0]["podCIDR"])')
prefix=${cidr#*/}
answer node1-capacity $(( (1 << (32 - prefix)) - 3 ))

# 26 pod IPs in all, batch holds 20: web's 8 need batch at 18 at most (and at least 10 stay).
manifest=$(mktemp --suffix=.yaml)
trap 'rm -f "$manifest"' EXIT
cat >"$manifest" <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: batch}
spec:
  replicas: 18
  selector: {matchLabels: {app: batch}}
  template:
    metadata: {labels: {app: batch}}
    spec: {containers: [{name: pause, image: pause}]}
YAML
lab apply -f "$manifest"
sed -i 's/name: batch/name: web/; s/app: batch/app: web/g; s/replicas: 18/replicas: 8/' "$manifest"
lab apply -f "$manifest"

# node2 now runs 9 batch + 4 web pods: 13 of 13.
used=$(status_json | "$PYTHON" -c 'import json,sys; print(sum(p["node"] == "node2" for p in json.load(sys.stdin)["pods"]))')
answer node2-free $(( (1 << (32 - prefix)) - 3 - used ))
