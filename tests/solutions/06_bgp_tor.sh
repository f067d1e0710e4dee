#!/bin/bash
# Reference solution of labs/06-bgp-tor.
. "$(dirname "$0")/common.sh" "$@"

# Task revive-bgpd: start node3's bgpd the way the other nodes' were started (ps -ef | grep bgpd shows
# their command lines), inside node3's namespace, as a daemon.
dir=/run/kubenet-lab/$LAB_NAME/frr/node3
lab exec node3 -- /usr/lib/frr/bgpd -d -f "$dir/bgpd.conf" -i "$dir/bgpd.pid" -z "$dir/zserv.api" \
    --vty_socket "$dir" -P 0 -u frr -g frr
# Task read-the-fabric: once routes are back, tor-rack1 reaches rack2's pods via the spine.
for _ in $(seq 50); do
    hop=$(lab exec tor-rack1 -- ip route show 10.244.3.0/24 | grep -o 'via [0-9.]*' | cut -d' ' -f2 || true)
    [ -n "$hop" ] && break
    sleep 0.1
done
answer tor-rack1-next-hop "$hop"
