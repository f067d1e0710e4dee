/* The maps of kubenet-lab's Cilium profile. Map NAMES and the meaning of their keys and values follow
 * Cilium's (cilium_lb4_services_v2, cilium_lb4_backends_v3, cilium_lb4_reverse_nat, cilium_lb4_reverse_sk,
 * cilium_lb4_affinity, cilium_tunnel_map, cilium_ct4_global), so that a learner reading them with
 * `bpftool map dump pinned ...` sees the layout Cilium's own debug CLI reads. The structs are written for
 * this project (not copied from Cilium); cilium/maps.py packs the same layouts in Python.
 * Every map is pinned by name in the node's own folder: /sys/fs/bpf/kubenet-lab/LAB/NODE/. */
#pragma once
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define MAX_SERVICES 65536

/* Service flags, the bit values Cilium uses in lb4_service.flags. */
#define SVC_FLAG_NODEPORT  (1 << 1)
#define SVC_FLAG_LOCAL     (1 << 2) /* externalTrafficPolicy: Local */
#define SVC_FLAG_AFFINITY  (1 << 4) /* sessionAffinity: ClientIP */

/* A frontend (ClusterIP or node IP, port, protocol) and slot: slot 0 is the service itself (how many
 * backends, its reverse-NAT id, flags), slots 1..count each name one backend. */
struct lb4_key {
	__be32 address;
	__be16 dport;
	__u16 backend_slot;
	__u8 proto;
	__u8 scope;
	__u8 pad[2];
};

struct lb4_service {
	__u32 backend_id; /* slot > 0: the backend; slot 0: the affinity timeout in seconds */
	__u16 count;
	__u16 rev_nat_index;
	__u8 flags;
	__u8 flags2;
	__u8 pad[2];
};

struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 flags;
	__u16 cluster_id;
	__u8 zone;
	__u8 pad;
};

struct lb4_reverse_nat {
	__be32 address;
	__be16 port;
	__u16 pad;
};

/* The socket LB's reverse translation: which service a connected socket's backend stands for. */
struct ipv4_revnat_tuple {
	__u64 cookie;
	__be32 address;
	__be16 port;
	__u16 pad;
};

struct ipv4_revnat_entry {
	__be32 address;
	__be16 port;
	__u16 rev_nat_index;
};

/* sessionAffinity: ClientIP. The socket LB's client is the pod's network namespace (its cookie). */
struct lb_affinity_key {
	__u64 client_cookie;
	__u32 rev_nat_id;
	__u32 pad;
};

struct lb_affinity_val {
	__u64 last_used; /* seconds, bpf_ktime_get_ns() / 1e9 */
	__u32 backend_id;
	__u32 pad;
};

/* The tunnel map: a remote node's PodCIDR (its network address) -> that node's underlay IP. */
#define ENDPOINT_KEY_IPV4 1
struct tunnel_key {
	__be32 ip4;
	__u32 pad6[3];
	__u8 family;
	__u8 pad[3];
};

struct tunnel_value {
	__be32 ip4;
	__u32 pad6[3];
	__u8 family;
	__u8 key;
	__u8 pad[2];
};

/* Connection tracking of the NodePort program: one entry per direction, as Cilium's CT keys them. */
struct ipv4_ct_tuple {
	__be32 daddr;
	__be32 saddr;
	__be16 dport;
	__be16 sport;
	__u8 nexthdr;
	__u8 flags;
	__u8 pad[2];
};

struct ct_entry {
	__u64 lifetime; /* seconds: the entry is dead after this */
	__be32 nat_addr; /* the address to restore on replies (original destination) */
	__be16 nat_port;
	__u16 rev_nat_index;
	__be32 snat_addr; /* the client's address, when the request was SNATed to the node */
	__be16 snat_port;
	__u8 tx_closing;
	__u8 pad;
	__u64 packets;
	__u64 bytes;
};

/* kubenet-lab's own (not one of Cilium's): what Cilium compiles into each node's program (node_config.h),
 * kept in a map so one compiled object serves every node. */
struct node_config {
	__be32 pod_cidr_mask;
	__be32 node_ip;
	__u32 vni;
	__u32 pad;
};

#define PINNED(name_, type_, key_, value_, max_)     \
	struct {                                      \
		__uint(type, type_);                  \
		__type(key, key_);                    \
		__type(value, value_);                \
		__uint(max_entries, max_);            \
		__uint(pinning, LIBBPF_PIN_BY_NAME);  \
	} name_ SEC(".maps")

PINNED(cilium_lb4_services_v2, BPF_MAP_TYPE_HASH, struct lb4_key, struct lb4_service, MAX_SERVICES * 4);
PINNED(cilium_lb4_backends_v3, BPF_MAP_TYPE_HASH, __u32, struct lb4_backend, MAX_SERVICES * 2);
PINNED(cilium_lb4_reverse_nat, BPF_MAP_TYPE_HASH, __u16, struct lb4_reverse_nat, MAX_SERVICES);
PINNED(cilium_lb4_reverse_sk, BPF_MAP_TYPE_LRU_HASH, struct ipv4_revnat_tuple, struct ipv4_revnat_entry, 65536);
PINNED(cilium_lb4_affinity, BPF_MAP_TYPE_LRU_HASH, struct lb_affinity_key, struct lb_affinity_val, 65536);
PINNED(cilium_tunnel_map, BPF_MAP_TYPE_HASH, struct tunnel_key, struct tunnel_value, 1024);
PINNED(cilium_ct4_global, BPF_MAP_TYPE_LRU_HASH, struct ipv4_ct_tuple, struct ct_entry, 65536);
PINNED(kubenet_node_config, BPF_MAP_TYPE_ARRAY, __u32, struct node_config, 1);
