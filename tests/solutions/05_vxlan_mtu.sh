#!/bin/bash
# Reference solution of labs/05-vxlan-mtu.
. "$(dirname "$0")/common.sh" "$@"

# Task read-the-tunnel.
answer vxlan-port "$(lab exec node1 -- ip -d link show flannel.1 | grep -o 'dstport [0-9]*' | cut -d' ' -f2)"
answer flannel-mtu "$(lab exec node1 -- cat /sys/class/net/flannel.1/mtu)"
# Task fix-black-hole: node2's NIC must carry a full flannel.1 packet plus the VXLAN overhead, as the
# switch and node1 do (the underlay's 1500).
lab exec node2 -- ip link set dev eth0 mtu 1500
