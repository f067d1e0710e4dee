/* NodePort from outside the cluster (what Cilium's lib/nodeport.h and lib/conntrack.h do, written for this
 * project): a client with no socket in the lab's cgroups reaches a node's IP on a node port. The program
 * on the node's underlay device translates the request to a backend, and every reply is translated back
 * before it leaves, both through cilium_ct4_global:
 *
 * - a request's tuple (TUPLE_F_OUT, as the client sent it) -> the backend it goes to (nat_*) and, with
 *   externalTrafficPolicy Cluster, the node's own address and port it is SNATed to (snat_*);
 * - the reply's tuple (TUPLE_F_IN, as the backend sends it) -> the frontend to restore as the source
 *   (nat_*) and the client to restore as the destination (snat_*).
 *
 * Lifecycle: a SYN (any packet for UDP) creates both entries; every packet renews them (60 s until the
 * connection is established, then 6 h for TCP, 60 s for UDP); a FIN shortens them to 10 s, an RST removes
 * them at once, and an entry past its lifetime is removed when next met (the LRU map evicts the rest).
 * Cilium's numbers (its CT_SYN_TIMEOUT, CT_CONNECTION_LIFETIME_*, CT_CLOSE_TIMEOUT defaults). */
#pragma once
#include "maps.h"
#include "events.h"
#include <stddef.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>

#define TUPLE_F_OUT 0 /* the client's direction */
#define TUPLE_F_IN 1  /* the backend's replies */

#define CT_SYN_TIMEOUT 60
#define CT_LIFETIME_TCP 21600
#define CT_LIFETIME_NONTCP 60
#define CT_CLOSE_TIMEOUT 10

#define NAT_MIN_PORT 32768 /* Cilium's SNAT port range for NodePort */
#define NAT_MAX_PORT 60999
#define NAT_TRIES 16

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#define IP_OFF ETH_HLEN
#define IP_CSUM_OFF (IP_OFF + offsetof(struct iphdr, check))

struct pkt {
	__u32 l4_off;
	__be32 saddr, daddr;
	__be16 sport, dport;
	__u8 proto;
	__u8 tcp_flags;
};

static __always_inline __u64 now_seconds(void)
{
	return bpf_ktime_get_ns() / 1000000000ULL;
}

/* IPv4 TCP/UDP, first fragment only: 0; anything else: -1 (left to the stack untouched). */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl < 5)
		return -1;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return -1;
	if (ip->frag_off & bpf_htons(0x1fff))
		return -1;
	p->l4_off = ETH_HLEN + ip->ihl * 4;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;
	p->tcp_flags = 0;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = data + p->l4_off;
		if ((void *)(tcp + 1) > end)
			return -1;
		p->sport = tcp->source;
		p->dport = tcp->dest;
		p->tcp_flags = ((__u8 *)tcp)[13];
	} else {
		struct udphdr *udp = data + p->l4_off;
		if ((void *)(udp + 1) > end)
			return -1;
		p->sport = udp->source;
		p->dport = udp->dest;
	}
	return 0;
}

/* Rewrite the source (is_src) or destination address and port, keeping the IPv4 and L4 checksums valid
 * (the L4 checksum covers the addresses through its pseudo header). */
static __always_inline int rewrite(struct __sk_buff *skb, struct pkt *p, int is_src, __be32 addr, __be16 port)
{
	__u32 addr_off = IP_OFF + (is_src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
	__u32 port_off = p->l4_off + (is_src ? 0 : 2);
	__u32 csum_off = p->l4_off + (p->proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
							       : offsetof(struct udphdr, check));
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__be32 old_addr = is_src ? p->saddr : p->daddr;
	__be16 old_port = is_src ? p->sport : p->dport;
	if (old_addr != addr) {
		if (bpf_l4_csum_replace(skb, csum_off, old_addr, addr, mangled | BPF_F_PSEUDO_HDR | 4) < 0 ||
		    bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, addr, 4) < 0 ||
		    bpf_skb_store_bytes(skb, addr_off, &addr, 4, 0) < 0)
			return -1;
	}
	if (old_port != port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, port, mangled | 2) < 0 ||
		    bpf_skb_store_bytes(skb, port_off, &port, 2, 0) < 0)
			return -1;
	}
	if (is_src) {
		p->saddr = addr;
		p->sport = port;
	} else {
		p->daddr = addr;
		p->dport = port;
	}
	return 0;
}

/* Send the translated packet on: through the tunnel when its destination is a remote PodCIDR in
 * cilium_tunnel_map, else out of the device the node's routes name, with the neighbour's MAC filled in. */
static __always_inline int forward(struct __sk_buff *skb, struct pkt *p)
{
	struct bpf_fib_lookup fib = {.family = 2 /* AF_INET */, .l4_protocol = p->proto, .sport = p->sport,
				     .dport = p->dport, .ipv4_src = p->saddr, .ipv4_dst = p->daddr,
				     .ifindex = skb->ingress_ifindex};
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_SHOT; /* no route to the backend or the client */
	__u32 zero = 0;
	struct node_config *cfg = bpf_map_lookup_elem(&kubenet_node_config, &zero);
	if (cfg && cfg->vni) {
		struct tunnel_key key = {.ip4 = p->daddr & cfg->pod_cidr_mask, .family = ENDPOINT_KEY_IPV4};
		struct tunnel_value *ep = bpf_map_lookup_elem(&cilium_tunnel_map, &key);
		if (ep) {
			struct bpf_tunnel_key tkey = {.remote_ipv4 = bpf_ntohl(ep->ip4), .tunnel_id = cfg->vni,
						      .tunnel_ttl = 64};
			if (bpf_skb_set_tunnel_key(skb, &tkey, sizeof(tkey), BPF_F_ZERO_CSUM_TX) < 0)
				return TC_ACT_SHOT;
			return bpf_redirect(fib.ifindex, 0);
		}
	}
	return bpf_redirect_neigh(fib.ifindex, 0, 0, 0);
}

static __always_inline void ct_delete_pair(struct ipv4_ct_tuple *one, struct ipv4_ct_tuple *other)
{
	bpf_map_delete_elem(&cilium_ct4_global, one);
	bpf_map_delete_elem(&cilium_ct4_global, other);
}

/* The tuple of the other direction of an entry. */
static __always_inline void ct_other(struct ipv4_ct_tuple *key, struct ct_entry *ct, struct ipv4_ct_tuple *out)
{
	out->nexthdr = key->nexthdr;
	if (key->flags == TUPLE_F_OUT) { /* request -> reply: backend to (SNAT address or client) */
		out->saddr = ct->nat_addr;
		out->sport = ct->nat_port;
		out->daddr = ct->snat_addr ? ct->snat_addr : key->saddr;
		out->dport = ct->snat_addr ? ct->snat_port : key->sport;
		out->flags = TUPLE_F_IN;
	} else { /* reply -> request: client to frontend */
		out->saddr = ct->snat_addr;
		out->sport = ct->snat_port;
		out->daddr = ct->nat_addr;
		out->dport = ct->nat_port;
		out->flags = TUPLE_F_OUT;
	}
}

/* Account and age one packet of a live entry (written in place: no map update per packet). Returns 1
 * when the packet closes the connection at once (RST): the caller removes both entries after it. */
static __always_inline int ct_touch(struct ipv4_ct_tuple *key, struct ct_entry *ct, struct pkt *p, __u64 now,
				    __u32 len)
{
	struct ipv4_ct_tuple other = {};
	ct_other(key, ct, &other);
	struct ct_entry *peer = bpf_map_lookup_elem(&cilium_ct4_global, &other);
	__u64 lifetime;
	if (p->proto != IPPROTO_TCP)
		lifetime = now + CT_LIFETIME_NONTCP;
	else if (p->tcp_flags & TCP_RST)
		return 1;
	else if ((p->tcp_flags & TCP_FIN) || ct->tx_closing)
		lifetime = now + CT_CLOSE_TIMEOUT;
	else if (p->tcp_flags & TCP_SYN)
		lifetime = now + CT_SYN_TIMEOUT;
	else
		lifetime = now + CT_LIFETIME_TCP;
	if (p->tcp_flags & TCP_FIN) {
		ct->tx_closing = 1;
		if (peer)
			peer->tx_closing = 1;
	}
	if (ct->lifetime != lifetime)
		ct->lifetime = lifetime;
	if (peer && peer->lifetime != lifetime)
		peer->lifetime = lifetime;
	__sync_fetch_and_add(&ct->packets, 1);
	__sync_fetch_and_add(&ct->bytes, len);
	return 0;
}

/* A reply of a NodePort connection (the backend's side): reverse NAT, then on to the client.
 * -1: not one (or a dead or reused tuple): the caller lets it pass. */
static __always_inline int nodeport_rev_nat(struct __sk_buff *skb, struct pkt *p)
{
	struct ipv4_ct_tuple key = {.daddr = p->daddr, .saddr = p->saddr, .dport = p->dport, .sport = p->sport,
				    .nexthdr = p->proto, .flags = TUPLE_F_IN};
	struct ct_entry *ct = bpf_map_lookup_elem(&cilium_ct4_global, &key);
	if (!ct)
		return -1;
	struct ipv4_ct_tuple other = {};
	ct_other(&key, ct, &other);
	__u64 now = now_seconds();
	/* Past its lifetime, or a SYN: a new flow reusing the tuple is not this connection's reply. */
	if (now > ct->lifetime || (p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)) {
		ct_delete_pair(&key, &other);
		return -1;
	}
	int closed = ct_touch(&key, ct, p, now, skb->len);
	__be32 src = ct->nat_addr, dst = ct->snat_addr;
	__be16 sport = ct->nat_port, dport = ct->snat_port;
	if (closed)
		ct_delete_pair(&key, &other);
	if (rewrite(skb, p, 1, src, sport) < 0 || rewrite(skb, p, 0, dst, dport) < 0)
		return TC_ACT_SHOT;
	return forward(skb, p);
}

/* A NodePort event for `lab observe` (Cilium's trace/drop notifications), sent once per new connection, not
 * per packet: TRACE_FROM_NETWORK with the client, the backend picked and the frontend it was addressed to
 * (orig_*), or a drop when no backend is there. */
static __always_inline void nodeport_event(struct __sk_buff *skb, struct pkt *p, __u8 type, __u8 subtype,
					   __be32 backend, __be16 backend_port, __u16 rev_nat)
{
	struct flow_event ev = {.ktime_ns = bpf_ktime_get_ns(), .type = type, .subtype = subtype,
				.proto = p->proto, .tcp_flags = p->tcp_flags, .ifindex = skb->ifindex,
				.saddr = p->saddr, .daddr = backend ? backend : p->daddr,
				.sport = p->sport, .dport = backend ? backend_port : p->dport,
				.orig_daddr = backend ? p->daddr : 0, .orig_dport = backend ? p->dport : 0,
				.rev_nat_index = rev_nat, .len = skb->len};
	emit_event(&ev);
}

/* A SNAT port whose reply tuple is free: the client's own port when it is, else random ones. */
static __always_inline int pick_nat_port(struct ipv4_ct_tuple *reply)
{
	__u16 port = bpf_ntohs(reply->dport);
	for (int i = 0; i < NAT_TRIES; i++) {
		if (port >= NAT_MIN_PORT && port <= NAT_MAX_PORT) {
			reply->dport = bpf_htons(port);
			if (!bpf_map_lookup_elem(&cilium_ct4_global, reply))
				return 0;
		}
		port = NAT_MIN_PORT + bpf_get_prandom_u32() % (NAT_MAX_PORT - NAT_MIN_PORT + 1);
	}
	return -1;
}

/* A request to one of this node's NodePort frontends. -1: not one (the caller lets it pass). */
static __always_inline int nodeport_lb(struct __sk_buff *skb, struct pkt *p, struct node_config *cfg)
{
	struct ipv4_ct_tuple key = {.daddr = p->daddr, .saddr = p->saddr, .dport = p->dport, .sport = p->sport,
				    .nexthdr = p->proto, .flags = TUPLE_F_OUT};
	struct ct_entry *ct = bpf_map_lookup_elem(&cilium_ct4_global, &key);
	__u64 now = now_seconds();
	int syn = p->proto != IPPROTO_TCP || (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
	struct ipv4_ct_tuple other = {};
	if (ct) {
		ct_other(&key, ct, &other);
		if (now > ct->lifetime || (p->proto == IPPROTO_TCP && syn && ct->tx_closing)) {
			ct_delete_pair(&key, &other); /* dead, or a new connection on a closing tuple */
			ct = 0;
		}
	}
	if (!ct) {
		struct lb4_key skey = {.address = p->daddr, .dport = p->dport, .proto = p->proto};
		struct lb4_service *svc = bpf_map_lookup_elem(&cilium_lb4_services_v2, &skey);
		if (!svc || !(svc->flags & SVC_FLAG_NODEPORT))
			return -1;
		if (!syn)
			return -1; /* not a connection's start: the stack answers it (an RST: no socket there) */
		if (svc->count == 0) { /* Local policy without a local endpoint: no backend here */
			nodeport_event(skb, p, EVENT_DROP, DROP_NO_SERVICE, 0, 0, svc->rev_nat_index);
			return TC_ACT_SHOT;
		}
		skey.backend_slot = (bpf_get_prandom_u32() % svc->count) + 1;
		struct lb4_service *slot = bpf_map_lookup_elem(&cilium_lb4_services_v2, &skey);
		if (!slot)
			return TC_ACT_SHOT;
		struct lb4_backend *backend = bpf_map_lookup_elem(&cilium_lb4_backends_v3, &slot->backend_id);
		if (!backend)
			return TC_ACT_SHOT; /* a slot naming a backend that is gone */
		int snat = !(svc->flags & SVC_FLAG_LOCAL);
		struct ipv4_ct_tuple reply = {.saddr = backend->address, .sport = backend->port,
					      .daddr = snat ? cfg->node_ip : p->saddr, .dport = p->sport,
					      .nexthdr = p->proto, .flags = TUPLE_F_IN};
		if (snat && pick_nat_port(&reply) < 0)
			return TC_ACT_SHOT; /* no free SNAT port for this backend */
		__u64 lifetime = now + (p->proto == IPPROTO_TCP ? CT_SYN_TIMEOUT : CT_LIFETIME_NONTCP);
		struct ct_entry back = {.lifetime = lifetime, .nat_addr = p->daddr, .nat_port = p->dport,
					.rev_nat_index = svc->rev_nat_index, .snat_addr = p->saddr,
					.snat_port = p->sport};
		struct ct_entry fwd = {.lifetime = lifetime, .nat_addr = backend->address, .nat_port = backend->port,
				       .rev_nat_index = svc->rev_nat_index, .snat_addr = snat ? reply.daddr : 0,
				       .snat_port = snat ? reply.dport : 0};
		if (bpf_map_update_elem(&cilium_ct4_global, &reply, &back, BPF_ANY) < 0 ||
		    bpf_map_update_elem(&cilium_ct4_global, &key, &fwd, BPF_ANY) < 0)
			return TC_ACT_SHOT;
		ct = bpf_map_lookup_elem(&cilium_ct4_global, &key);
		if (!ct)
			return TC_ACT_SHOT;
		other = reply;
		nodeport_event(skb, p, EVENT_TRACE, TRACE_FROM_NETWORK, backend->address, backend->port,
			       svc->rev_nat_index);
	}
	int closed = ct_touch(&key, ct, p, now, skb->len);
	__be32 backend = ct->nat_addr, snat_addr = ct->snat_addr;
	__be16 backend_port = ct->nat_port, snat_port = ct->snat_port;
	if (closed)
		ct_delete_pair(&key, &other);
	if (rewrite(skb, p, 0, backend, backend_port) < 0)
		return TC_ACT_SHOT;
	if (snat_addr && rewrite(skb, p, 1, snat_addr, snat_port) < 0)
		return TC_ACT_SHOT;
	return forward(skb, p);
}
