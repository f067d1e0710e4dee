/* Flow events: what Hubble reads from Cilium's monitor. Cilium's programs send notifications through the
 * perf event array `cilium_events`; this kernel has ringbuf, so the lab's `cilium_events` is a BPF ringbuf
 * with the same name and one record layout (struct flow_event, written for this project; cilium/events.py
 * unpacks it). The message types and observation points keep Cilium's numbers (pkg/monitor/api/types.go,
 * bpf/lib/trace.h, bpf/lib/common.h drop reasons), so `lab observe` can name them as Hubble does.
 * A full ring never blocks the datapath: the event is dropped and counted in `cilium_events_lost`. */
#pragma once
#include "maps.h"

/* Message types (Cilium's MessageType* values). */
#define EVENT_DROP 1
#define EVENT_TRACE 4
#define EVENT_POLICY_VERDICT 5
#define EVENT_TRACE_SOCK 7

/* Observation points of EVENT_TRACE (Cilium's TRACE_* values). */
#define TRACE_TO_LXC 0
#define TRACE_TO_STACK 3
#define TRACE_TO_OVERLAY 4
#define TRACE_FROM_LXC 5
#define TRACE_FROM_STACK 8
#define TRACE_FROM_OVERLAY 9
#define TRACE_FROM_NETWORK 10
#define TRACE_TO_NETWORK 11

/* Socket-LB translation points of EVENT_TRACE_SOCK (Cilium's XLATE_* values). */
#define XLATE_PRE_DIRECTION_FWD 1
#define XLATE_POST_DIRECTION_FWD 2
#define XLATE_PRE_DIRECTION_REV 3
#define XLATE_POST_DIRECTION_REV 4

/* Drop reasons (Cilium's DROP_* codes, positive here; bpf/lib/common.h). */
#define DROP_POLICY 133         /* "Policy denied" */
#define DROP_NO_SERVICE 158     /* "Service backend not found" */
#define DROP_POLICY_DENY 181    /* "Policy denied by denylist" */

/* flow_event.flags */
#define FLOW_F_INGRESS (1 << 0) /* the verdict was taken for the destination endpoint (else egress) */
#define FLOW_F_REPLY   (1 << 1) /* a packet of the reply direction of a tracked connection */
#define FLOW_F_ALLOWED (1 << 2) /* EVENT_POLICY_VERDICT: allowed (else denied) */

struct flow_event {
	__u64 ktime_ns;      /* bpf_ktime_get_ns() */
	__u8 type;           /* EVENT_* */
	__u8 subtype;        /* TRACE_* / XLATE_* point, DROP_* reason for EVENT_DROP and denied verdicts */
	__u8 proto;          /* IPPROTO_* */
	__u8 tcp_flags;      /* byte 13 of the TCP header (FIN 0x01 SYN 0x02 RST 0x04 PSH 0x08 ACK 0x10) */
	__u32 ifindex;       /* the device it was seen on (0 for socket events) */
	__be32 saddr;
	__be32 daddr;        /* for EVENT_TRACE_SOCK post-xlate: the backend picked */
	__be16 sport;
	__be16 dport;
	__be32 orig_daddr;   /* a service frontend translated to daddr (0 if none) */
	__be16 orig_dport;
	__u16 rev_nat_index; /* the service's id in cilium_lb4_reverse_nat (0 if none) */
	__u32 src_identity;  /* security identities (0 until known) */
	__u32 dst_identity;
	__u32 policy_id;     /* which NetworkPolicy decided (the agent's numbering; 0: none / default) */
	__u32 len;           /* packet length in bytes (0 for socket events) */
	__u32 pad0;
	__u64 cookie;        /* socket or netns cookie (socket events), 0 otherwise */
	__u8 flags;          /* FLOW_F_* */
	__u8 pad[7];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilium_events SEC(".maps");

PINNED(cilium_events_lost, BPF_MAP_TYPE_PERCPU_ARRAY, __u32, __u64, 1);

/* Reserve, fill, submit; a full ring counts the loss instead of waiting. */
static __always_inline void emit_event(const struct flow_event *ev)
{
	struct flow_event *slot = bpf_ringbuf_reserve(&cilium_events, sizeof(*slot), 0);
	if (!slot) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&cilium_events_lost, &zero);
		if (lost)
			*lost += 1;
		return;
	}
	__builtin_memcpy(slot, ev, sizeof(*slot));
	bpf_ringbuf_submit(slot, 0);
}
