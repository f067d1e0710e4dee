/* Identity-based NetworkPolicy, Cilium's model (written for this project, not copied from Cilium):
 *
 * - cilium_lxc: a local pod's IP -> its endpoint (id, security identity, enforcement flags);
 * - cilium_ipcache: an LPM trie of prefixes -> security identity: every pod IP (/32, its identity on every
 *   node), node addresses (host 1 / remote-node 6), the CIDRs of ipBlock peers (CIDR identities) and
 *   0.0.0.0/0 (world 2). kubenet-lab adds cidr_identity to each entry: the identity of the longest policy
 *   CIDR holding the address, so an ipBlock also matches pod and node addresses as Kubernetes requires
 *   (Cilium's CIDR policy skips cluster endpoints by default: docs/cilium.md says why this differs);
 * - a policy map per endpoint, cilium_policy_<endpoint id>: an LPM trie keyed by (identity, direction,
 *   protocol, port prefix) -> allow, found through kubenet_policy_maps (endpoint id -> map; Cilium reaches
 *   its per-endpoint maps from per-endpoint programs, one program serves every endpoint here);
 * - kubenet_ct4_policy: the connections a verdict allowed, one entry per (tuple, direction), so replies pass
 *   by a map lookup and a policy change never cuts a connection it allowed (as Cilium's CT does).
 *
 * Identity 0 in a policy key is Cilium's wildcard (any peer); a key whose prefix stops before the protocol
 * allows every protocol and port, one that stops inside the port covers a port range (endPort). */
#pragma once
#include "nodeport.h"
#include "events.h"

#define ID_HOST 1        /* Cilium's reserved identities (pkg/identity/numericidentity.go) */
#define ID_WORLD 2
#define ID_REMOTE_NODE 6

#define POLICY_INGRESS 0 /* policy_key.egress */
#define POLICY_EGRESS 1

#define EP_F_INGRESS_ENFORCED (1 << 0) /* kubenet-lab's endpoint_info.flags: a policy selects it */
#define EP_F_EGRESS_ENFORCED (1 << 1)

#define POLICY_FULL_PREFIX 64 /* identity 32 + direction 8 + protocol 8 + port 16 bits */
#define MAX_ENDPOINTS 4096
#define MAX_POLICY_ENTRIES 16384

struct endpoint_key {
	__be32 ip4;
	__u8 family;
	__u8 key;
	__u16 cluster_id;
};

struct endpoint_info {
	__u32 ifindex;
	__u16 unused;
	__u16 lxc_id;   /* the endpoint id (here the lxc veth's ifindex in the node) */
	__u32 flags;    /* EP_F_* */
	__u32 sec_id;   /* the endpoint's security identity */
	__u32 isolated_by[2]; /* kubenet-lab's own: per POLICY_INGRESS/EGRESS, the number of the first policy
			       * isolating the endpoint (0: none), named in the drop events of its default deny */
};

struct ipcache_key {
	__u32 prefixlen; /* 32 (cluster_id, pad, family) + the address prefix */
	__u16 cluster_id;
	__u8 pad1;
	__u8 family;
	__be32 ip4;
};

struct remote_endpoint_info {
	__u32 sec_identity;
	__be32 tunnel_endpoint;
	__u16 pad;
	__u8 key;
	__u8 flags;
	__u32 cidr_identity; /* kubenet-lab's own: the longest policy CIDR holding the address (else world) */
};

struct policy_key {
	__u32 prefixlen;
	__u32 sec_label;
	__u8 egress;
	__u8 protocol;
	__be16 dport;
};

struct policy_entry {
	__be16 proxy_port;
	__u8 deny;
	__u8 auth_type;
	__u32 policy_id; /* kubenet-lab's own: the agent's number of the NetworkPolicy allowing it */
	__u64 packets;   /* connections (first packets) this entry allowed */
	__u64 bytes;
};

struct policy_ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir; /* POLICY_INGRESS: judged at the destination endpoint; POLICY_EGRESS: at the source */
	__u16 pad;
};

struct policy_ct_entry {
	__u64 lifetime; /* seconds, as cilium_ct4_global's */
	__u32 policy_id;
	__u8 closing;
	__u8 pad[3];
	__u64 packets;
};

struct policy_inner {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(key_size, sizeof(struct policy_key)); /* sizes: the structs appear in no other map's BTF */
	__uint(value_size, sizeof(struct policy_entry));
	__uint(max_entries, MAX_POLICY_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
};

PINNED(cilium_lxc, BPF_MAP_TYPE_HASH, struct endpoint_key, struct endpoint_info, MAX_ENDPOINTS);

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct remote_endpoint_info);
	__uint(max_entries, 512000);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilium_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(key_size, sizeof(__u32));
	__uint(max_entries, MAX_ENDPOINTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct policy_inner);
} kubenet_policy_maps SEC(".maps");

PINNED(kubenet_ct4_policy, BPF_MAP_TYPE_LRU_HASH, struct policy_ct_key, struct policy_ct_entry, 65536);

struct l4 {
	__be32 saddr, daddr;
	__be16 sport, dport;
	__u8 proto;
	__u8 tcp_flags;
};

/* IPv4 TCP, UDP or ICMP (ports 0), first fragment: 0; anything else: -1 (not policed, as IPv6 here). */
static __always_inline int parse_l4(struct __sk_buff *skb, struct l4 *p)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl < 5)
		return -1;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;
	p->sport = p->dport = 0;
	p->tcp_flags = 0;
	if (ip->frag_off & bpf_htons(0x1fff))
		return -1;
	void *l4 = data + ETH_HLEN + ip->ihl * 4;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > end)
			return -1;
		p->sport = tcp->source;
		p->dport = tcp->dest;
		p->tcp_flags = ((__u8 *)tcp)[13];
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > end)
			return -1;
		p->sport = udp->source;
		p->dport = udp->dest;
	} else if (p->proto != IPPROTO_ICMP) {
		return -1;
	}
	return 0;
}

static __always_inline struct endpoint_info *lookup_endpoint(__be32 ip)
{
	struct endpoint_key key = {.ip4 = ip, .family = ENDPOINT_KEY_IPV4};
	return bpf_map_lookup_elem(&cilium_lxc, &key);
}

/* The peer's identity and the identity of the policy CIDR holding it (world when nothing matches). */
static __always_inline void lookup_identity(__be32 ip, __u32 *id, __u32 *cidr_id)
{
	struct ipcache_key key = {.prefixlen = 32 + 32, .family = ENDPOINT_KEY_IPV4, .ip4 = ip};
	struct remote_endpoint_info *info = bpf_map_lookup_elem(&cilium_ipcache, &key);
	*id = info ? info->sec_identity : ID_WORLD;
	*cidr_id = info && info->cidr_identity ? info->cidr_identity : ID_WORLD;
}

static __always_inline struct policy_entry *policy_lookup(void *policy, __u32 id, __u8 dir, struct l4 *p)
{
	struct policy_key key = {.prefixlen = POLICY_FULL_PREFIX, .sec_label = id, .egress = dir,
				 .protocol = p->proto, .dport = p->dport};
	struct policy_entry *e = bpf_map_lookup_elem(policy, &key);
	return e && !e->deny ? e : 0;
}

static __always_inline int policy_ct_alive(struct policy_ct_entry *ct, struct l4 *p, __u64 now)
{
	if (now > ct->lifetime)
		return 0;
	__u64 lifetime;
	if (p->proto != IPPROTO_TCP)
		lifetime = now + CT_LIFETIME_NONTCP;
	else if (p->tcp_flags & (TCP_RST | TCP_FIN) || ct->closing) {
		ct->closing = 1;
		lifetime = now + CT_CLOSE_TIMEOUT;
	} else
		lifetime = now + CT_LIFETIME_TCP;
	if (ct->lifetime < lifetime) /* written in place at most once a second */
		ct->lifetime = lifetime;
	return 1;
}

static __always_inline void policy_event(struct __sk_buff *skb, struct l4 *p, __u8 type, __u8 reason,
					 __u32 src_id, __u32 dst_id, __u32 policy_id, __u8 flags)
{
	struct flow_event ev = {.ktime_ns = bpf_ktime_get_ns(), .type = type, .subtype = reason,
				.proto = p->proto, .tcp_flags = p->tcp_flags, .ifindex = skb->ifindex,
				.saddr = p->saddr, .daddr = p->daddr, .sport = p->sport, .dport = p->dport,
				.src_identity = src_id, .dst_identity = dst_id, .policy_id = policy_id,
				.len = skb->len, .flags = flags};
	emit_event(&ev);
}

/* The verdict for a packet of endpoint `ep` in direction `dir` (POLICY_EGRESS: ep sends it). TC_ACT_OK or
 * TC_ACT_SHOT. A packet of a tracked connection (either direction) passes by its CT entry; the first packet
 * of a connection is judged by the endpoint's policy map, and an allowed one creates the entry. */
static __always_inline int policy_verdict(struct __sk_buff *skb, struct l4 *p, struct endpoint_info *ep, __u8 dir)
{
	__u64 now = now_seconds();
	int syn = p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
	struct policy_ct_key fwd = {.saddr = p->saddr, .daddr = p->daddr, .sport = p->sport, .dport = p->dport,
				    .proto = p->proto, .dir = dir};
	if (!syn) { /* a SYN always starts a new connection: judged again, even on a closing tuple */
		struct policy_ct_entry *ct = bpf_map_lookup_elem(&kubenet_ct4_policy, &fwd);
		if (ct && policy_ct_alive(ct, p, now))
			return TC_ACT_OK;
		/* a reply: the connection the peer opened, judged where the other direction was */
		struct policy_ct_key rev = {.saddr = p->daddr, .daddr = p->saddr, .sport = p->dport, .dport = p->sport,
					    .proto = p->proto, .dir = dir == POLICY_EGRESS ? POLICY_INGRESS : POLICY_EGRESS};
		ct = bpf_map_lookup_elem(&kubenet_ct4_policy, &rev);
		if (ct && policy_ct_alive(ct, p, now))
			return TC_ACT_OK;
	}
	__u32 peer, cidr_peer;
	lookup_identity(dir == POLICY_EGRESS ? p->daddr : p->saddr, &peer, &cidr_peer);
	__u32 src_id = dir == POLICY_EGRESS ? ep->sec_id : peer, dst_id = dir == POLICY_EGRESS ? peer : ep->sec_id;
	__u8 flags = dir == POLICY_INGRESS ? FLOW_F_INGRESS : 0;
	__u32 epid = ep->lxc_id;
	void *policy = bpf_map_lookup_elem(&kubenet_policy_maps, &epid);
	struct policy_entry *allow = 0;
	if (!policy) {
		/* no policy map yet (the agent has not regenerated this endpoint): not enforced */
	} else {
		allow = policy_lookup(policy, peer, dir, p);
		if (!allow)
			allow = policy_lookup(policy, 0, dir, p);
		if (!allow && cidr_peer != peer)
			allow = policy_lookup(policy, cidr_peer, dir, p);
		if (!allow) {
			__u32 isolating = ep->isolated_by[dir & 1];
			policy_event(skb, p, EVENT_POLICY_VERDICT, DROP_POLICY, src_id, dst_id, isolating, flags);
			policy_event(skb, p, EVENT_DROP, DROP_POLICY, src_id, dst_id, isolating, flags);
			return TC_ACT_SHOT;
		}
		__sync_fetch_and_add(&allow->packets, 1);
		__sync_fetch_and_add(&allow->bytes, skb->len);
	}
	__u32 policy_id = allow ? allow->policy_id : 0;
	struct policy_ct_entry entry = {.lifetime = now + (p->proto == IPPROTO_TCP ? CT_SYN_TIMEOUT : CT_LIFETIME_NONTCP),
					.policy_id = policy_id, .packets = 1};
	bpf_map_update_elem(&kubenet_ct4_policy, &fwd, &entry, BPF_ANY);
	if (policy)
		policy_event(skb, p, EVENT_POLICY_VERDICT, 0, src_id, dst_id, policy_id, flags | FLOW_F_ALLOWED);
	return TC_ACT_OK;
}
