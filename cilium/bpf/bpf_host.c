/* The node's NodePort datapath for clients outside the cluster (nodeport.h has the translation and the
 * connection tracking):
 * - cil_from_netdev, on the ingress of the node's underlay device (Cilium's bpf_host.c program of that
 *   name on its native devices): a request to this node's IP on a node port is translated to a backend
 *   (and SNATed to the node with externalTrafficPolicy Cluster); a reply coming back from a backend on
 *   another node is translated back and sent to the client.
 * - cil_from_container, on the ingress of each pod's lxc veth (in Cilium it lives in bpf_lxc.c): a local
 *   backend's reply is translated back and sent straight out to the client, so the node's IP stack never
 *   sees a reply addressed to its own address for a connection it has no socket for.
 * - cil_from_container also enforces the pod's egress policy, and cil_to_container, on the egress of each
 *   lxc veth (what reaches the pod), its ingress policy (policy.h; in Cilium, bpf_lxc.c's policy tail
 *   calls). Both let the packets of connections a verdict already allowed pass by their CT entry.
 * One object per node: both are pinned next to the maps, and each new lxc veth gets them attached from the
 * pins (cilium/agent.py), with no load per pod. */
#include "policy.h"

SEC("tc")
int cil_from_netdev(struct __sk_buff *skb)
{
	struct pkt p = {};
	if (parse(skb, &p) < 0)
		return TC_ACT_OK;
	__u32 zero = 0;
	struct node_config *cfg = bpf_map_lookup_elem(&kubenet_node_config, &zero);
	if (!cfg || p.daddr != cfg->node_ip)
		return TC_ACT_OK; /* only what is addressed to this node itself */
	int ret = nodeport_rev_nat(skb, &p);
	if (ret >= 0)
		return ret;
	ret = nodeport_lb(skb, &p, cfg);
	return ret >= 0 ? ret : TC_ACT_OK;
}

SEC("tc")
int cil_from_container(struct __sk_buff *skb)
{
	struct pkt p = {};
	if (parse(skb, &p) == 0) {
		int ret = nodeport_rev_nat(skb, &p);
		if (ret >= 0)
			return ret; /* a NodePort reply of a local backend, sent on to its client */
	}
	struct l4 q = {};
	if (parse_l4(skb, &q) < 0)
		return TC_ACT_OK;
	struct endpoint_info *ep = lookup_endpoint(q.saddr);
	if (!ep)
		return TC_ACT_OK; /* not an endpoint of this node (yet) */
	return policy_verdict(skb, &q, ep, POLICY_EGRESS);
}

SEC("tc")
int cil_to_container(struct __sk_buff *skb)
{
	struct l4 q = {};
	if (parse_l4(skb, &q) < 0)
		return TC_ACT_OK;
	struct endpoint_info *ep = lookup_endpoint(q.daddr);
	if (!ep)
		return TC_ACT_OK;
	return policy_verdict(skb, &q, ep, POLICY_INGRESS);
}

char _license[] SEC("license") = "GPL";
