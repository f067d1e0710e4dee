/* The tunnel, Cilium's default routing mode: cilium_vxlan is a collect-metadata ("external") VXLAN device
 * on UDP 8472 with no forwarding database. Routes send a remote PodCIDR to it; this program, on its egress,
 * reads the remote node's address from cilium_tunnel_map and sets it as the tunnel's destination, so the
 * map IS the tunnel's state. On its ingress, a decapsulated frame (addressed to the sending node's device)
 * is handed to this node's IP stack, which routes it to the pod's lxc veth by its /32 route. */
#include "maps.h"
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>

#define PACKET_HOST 0

SEC("tc")
int cil_to_overlay(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_SHOT;
	__u32 zero = 0;
	struct node_config *cfg = bpf_map_lookup_elem(&kubenet_node_config, &zero);
	if (!cfg)
		return TC_ACT_SHOT;
	struct tunnel_key key = {.ip4 = ip->daddr & cfg->pod_cidr_mask, .family = ENDPOINT_KEY_IPV4};
	struct tunnel_value *ep = bpf_map_lookup_elem(&cilium_tunnel_map, &key);
	if (!ep)
		return TC_ACT_SHOT; /* no tunnel endpoint for this PodCIDR: nowhere to send it */
	struct bpf_tunnel_key tkey = {.remote_ipv4 = bpf_ntohl(ep->ip4), .tunnel_id = cfg->vni, .tunnel_ttl = 64};
	if (bpf_skb_set_tunnel_key(skb, &tkey, sizeof(tkey), BPF_F_ZERO_CSUM_TX) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

SEC("tc")
int cil_from_overlay(struct __sk_buff *skb)
{
	if (skb->pkt_type != PACKET_HOST)
		bpf_skb_change_type(skb, PACKET_HOST);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
