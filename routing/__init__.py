"""Cross-node pod routing: how a node reaches the PodCIDRs of the others (host-gw; later VXLAN, BGP)."""
