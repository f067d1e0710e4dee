#!/bin/bash
# Reference solution of labs/01-namespaces: what a learner does, with the commands a learner has.
. "$(dirname "$0")/common.sh" "$@"

# Task find-pause: the pod's namespace is pinned as klab_<lab>_p_<namespace>_<pod>; of the processes in
# it, the pause process is the one whose command is `pause`.
for pid in $(ip netns pids "klab_${LAB_NAME}_p_default_web"); do
    if [ "$(ps -o comm= -p "$pid")" = pause ]; then
        answer web-pause-pid "$pid"
    fi
done

# Task two-containers: one pod, two containers, two ports, one network namespace.
manifest=$(mktemp --suffix=.yaml)
trap 'rm -f "$manifest"' EXIT
cat >"$manifest" <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: duo}
spec:
  nodeName: node1
  containers:
    - {name: server, image: agnhost, args: [netexec, --http-port=9000]}
    - {name: sidecar, image: agnhost, args: [netexec, --http-port=9001]}
YAML
lab apply -f "$manifest"
