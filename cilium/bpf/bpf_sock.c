/* Socket-level load balancing (what Cilium calls socket LB, in its bpf_sock.c): a connect() or sendmsg()
 * to a service's frontend is rewritten to one backend BEFORE any packet exists, so the pod's packets carry
 * the backend's address from the first byte; getpeername() and recvmsg() translate back, so the
 * application still sees the ClusterIP. Attached to the lab's per-node cgroup, never the machine's. */
#include "maps.h"
#include "events.h"
#include <linux/in.h>
#include <bpf/bpf_endian.h>

#define SYS_REJECT 0
#define SYS_PROCEED 1

static __always_inline struct lb4_service *lookup_service(__be32 addr, __be16 port, __u8 proto)
{
	struct lb4_key key = {.address = addr, .dport = port, .backend_slot = 0, .proto = proto};
	return bpf_map_lookup_elem(&cilium_lb4_services_v2, &key);
}

static __always_inline __u8 proto_of(struct bpf_sock_addr *ctx)
{
	return ctx->type == 2 /* SOCK_DGRAM */ ? IPPROTO_UDP : IPPROTO_TCP;
}

/* A socket-LB event for `lab observe` (Cilium's trace_sock notification: XLATE_PRE/POST_DIRECTION_FWD, or a
 * drop when the service has no backend). The source address is the socket's bound one (0 before a bind);
 * the netns cookie names the pod. Only connects/sends to a service pay for it. */
static __always_inline void sock_event(struct bpf_sock_addr *ctx, __u8 type, __u8 subtype, __be32 daddr,
				       __be16 dport, __be32 orig, __be16 orig_port, __u16 rev_nat)
{
	struct flow_event ev = {.ktime_ns = bpf_ktime_get_ns(), .type = type, .subtype = subtype,
				.proto = proto_of(ctx), .daddr = daddr, .dport = dport, .orig_daddr = orig,
				.orig_dport = orig_port, .rev_nat_index = rev_nat,
				.cookie = bpf_get_netns_cookie(ctx)};
	struct bpf_sock *sk = ctx->sk;
	if (sk) {
		ev.saddr = sk->src_ip4;
		ev.sport = bpf_htons((__u16)sk->src_port);
	}
	emit_event(&ev);
}

/* -1: not a service; 0: a service without a usable backend (reject); 1: rewritten. */
static __always_inline int translate(struct bpf_sock_addr *ctx)
{
	__be32 addr = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;
	__u8 proto = proto_of(ctx);
	struct lb4_service *svc = lookup_service(addr, port, proto);
	if (!svc)
		return -1;
	if (svc->count == 0) {
		sock_event(ctx, EVENT_DROP, DROP_NO_SERVICE, addr, port, 0, 0, svc->rev_nat_index);
		return 0;
	}
	__u32 backend_id = 0;
	struct lb4_backend *backend = 0;
	struct lb_affinity_key akey = {};
	__u64 now = bpf_ktime_get_ns() / 1000000000ULL;
	if (svc->flags & SVC_FLAG_AFFINITY) {
		akey.client_cookie = bpf_get_netns_cookie(ctx);
		akey.rev_nat_id = svc->rev_nat_index;
		struct lb_affinity_val *seen = bpf_map_lookup_elem(&cilium_lb4_affinity, &akey);
		if (seen && now - seen->last_used <= svc->backend_id) {
			backend = bpf_map_lookup_elem(&cilium_lb4_backends_v3, &seen->backend_id);
			if (backend)
				backend_id = seen->backend_id;
		}
	}
	if (!backend) {
		struct lb4_key slot = {.address = addr, .dport = port, .proto = proto};
		slot.backend_slot = (bpf_get_prandom_u32() % svc->count) + 1;
		struct lb4_service *chosen = bpf_map_lookup_elem(&cilium_lb4_services_v2, &slot);
		if (!chosen)
			return 0;
		backend_id = chosen->backend_id;
		backend = bpf_map_lookup_elem(&cilium_lb4_backends_v3, &backend_id);
		if (!backend)
			return 0; /* a slot naming a backend that is gone: Cilium drops too */
	}
	if (svc->flags & SVC_FLAG_AFFINITY) {
		struct lb_affinity_val val = {.last_used = now, .backend_id = backend_id};
		bpf_map_update_elem(&cilium_lb4_affinity, &akey, &val, BPF_ANY);
	}
	struct ipv4_revnat_tuple rkey = {.cookie = bpf_get_socket_cookie(ctx), .address = backend->address,
					 .port = backend->port};
	struct ipv4_revnat_entry rval = {.address = addr, .port = port, .rev_nat_index = svc->rev_nat_index};
	struct ipv4_revnat_entry *old = bpf_map_lookup_elem(&cilium_lb4_reverse_sk, &rkey);
	if (!old || old->address != addr || old->port != port) /* write only when new (LRU updates cost) */
		bpf_map_update_elem(&cilium_lb4_reverse_sk, &rkey, &rval, BPF_ANY);
	sock_event(ctx, EVENT_TRACE_SOCK, XLATE_PRE_DIRECTION_FWD, addr, port, 0, 0, svc->rev_nat_index);
	sock_event(ctx, EVENT_TRACE_SOCK, XLATE_POST_DIRECTION_FWD, backend->address, backend->port, addr, port,
		   svc->rev_nat_index);
	ctx->user_ip4 = backend->address;
	ctx->user_port = backend->port;
	return 1;
}

static __always_inline int forward(struct bpf_sock_addr *ctx)
{
	return translate(ctx) == 0 ? SYS_REJECT : SYS_PROCEED;
}

static __always_inline int reverse(struct bpf_sock_addr *ctx)
{
	struct ipv4_revnat_tuple rkey = {.cookie = bpf_get_socket_cookie(ctx), .address = ctx->user_ip4,
					 .port = (__be16)ctx->user_port};
	struct ipv4_revnat_entry *rval = bpf_map_lookup_elem(&cilium_lb4_reverse_sk, &rkey);
	if (rval) {
		/* still a service? (a deleted service's sockets show their real peer) */
		struct lb4_reverse_nat *nat = bpf_map_lookup_elem(&cilium_lb4_reverse_nat, &rval->rev_nat_index);
		if (nat && nat->address == rval->address && nat->port == rval->port) {
			ctx->user_ip4 = rval->address;
			ctx->user_port = rval->port;
		}
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int cil_sock4_connect(struct bpf_sock_addr *ctx) { return forward(ctx); }

SEC("cgroup/sendmsg4")
int cil_sock4_sendmsg(struct bpf_sock_addr *ctx) { return forward(ctx); }

SEC("cgroup/recvmsg4")
int cil_sock4_recvmsg(struct bpf_sock_addr *ctx) { return reverse(ctx); }

SEC("cgroup/getpeername4")
int cil_sock4_getpeername(struct bpf_sock_addr *ctx) { return reverse(ctx); }

char _license[] SEC("license") = "GPL";
