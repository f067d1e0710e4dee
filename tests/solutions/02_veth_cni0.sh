#!/bin/bash
# Reference solution of labs/02-veth-cni0.
. "$(dirname "$0")/common.sh" "$@"

veth_of() {  # the node-side peer of a pod's eth0: its iflink is the peer's index on the node
    local index
    index=$(lab exec "$1" -- cat /sys/class/net/eth0/iflink)
    lab exec node1 -- ip -o link | awk -F': ' -v i="$index" '$1 == i {split($2, n, "@"); print n[1]}'
}

# Task find-the-pair.
answer web-1-host-veth "$(veth_of web-1)"
# Task replug: web-2's veth lost its master; plug it back into the bridge, with hairpin on as the CNI
# plugs every port (a port added by hand starts with hairpin off).
lab exec node1 -- ip link set dev "$(veth_of web-2)" master cni0
lab exec node1 -- bridge link set dev "$(veth_of web-2)" hairpin on
# Task follow-a-frame: web-1's frames to other nodes go to its gateway, cni0 on node1 (whose MAC the CNI
# pinned: it does not change as ports come and go).
answer web-1-gateway-mac "$(lab exec node1 -- cat /sys/class/net/cni0/address)"
