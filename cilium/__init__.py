"""The Cilium profile's agent: eBPF programs and maps that replace kube-proxy (socket LB, NodePort) and
carry the tunnel, loaded through libbpf from sources in `cilium/bpf/` (see docs/cilium.md)."""
