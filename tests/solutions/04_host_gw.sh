#!/bin/bash
# Reference solution of labs/04-host-gw.
. "$(dirname "$0")/common.sh" "$@"

# Task restore-route: host-gw's route for node2's PodCIDR, next hop node2 itself, on the shared segment.
lab exec node1 -- ip route add 10.244.2.0/24 via 192.168.1.11 dev eth0
# Task next-hop-mac: after one packet, node1's neighbour table holds node2's MAC.
lab exec web-1 -- ping -c1 -W1 10.244.2.2 >/dev/null
answer node2-mac "$(lab exec node1 -- ip neigh show 192.168.1.11 | awk '{print $5}')"
# Task on-link: a next hop off the segment is refused ("Nexthop has invalid gateway"); the prefix next hops
# must be in is eth0's connected route, the one the kernel made for node1's own address.
if lab exec node1 -- ip route add 10.244.9.0/24 via 10.0.0.1 2>/dev/null; then
    echo "the kernel accepted an off-link next hop" >&2
    exit 1
fi
answer node1-onlink-prefix "$(lab exec node1 -- ip -4 -o route show dev eth0 proto kernel scope link | awk '{print $1}')"
