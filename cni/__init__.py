"""Container networking: pod namespaces, veth pairs, the cni0 bridge, IPAM, the CNI-spec interface."""
