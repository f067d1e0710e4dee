"""Services: kube-proxy's modes (iptables, nftables, IPVS), NodePorts, egress NAT, and later DNS and Ingress."""
