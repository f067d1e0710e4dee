"""The cilium profile's flow source: each node's BPF ringbuf `cilium_events` (cilium/bpf/events.h), read
the way Hubble reads Cilium's monitor, by a pure-Python reader on the ring's mmap (ebpf-notes: 1.4 M
events/s drained).

A BPF ringbuf's mmap: page 0 the consumer position (ours to write), page 1 the producer position, then the
data area mapped twice in a row (so a record never wraps). Each record starts with an 8-byte header (length
with BUSY/DISCARD bits, page offset) and is padded to 8 bytes. We read what lies between the two
positions and move the consumer on; epoll on the map's fd wakes us when the programs submit.

Bounded: the ring is the per-node buffer (256 KiB, about 3,600 events); a full ring makes the programs
drop the event and count it in `cilium_events_lost` (never wait): read and reported. One reader per ring
at a time (the consumer position is shared): a lock file in the lab's run folder says so to a second
observer instead of letting the two steal each other's events.

Translation of a ringbuf record into a Hubble flow: EVENT_TRACE_SOCK pre-xlate-fwd -> TRACED, post-xlate-fwd
-> TRANSLATED naming the Service (from its frontend, orig_daddr:orig_dport) and the backend picked;
EVENT_TRACE -> FORWARDED (TRANSLATED when a frontend was translated); EVENT_POLICY_VERDICT -> FORWARDED or
DROPPED by the deciding policy; EVENT_DROP -> DROPPED with Cilium's reason text. A socket event names its
pod from the socket's network namespace cookie (SO_NETNS_COOKIE read in every pod's namespace).
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import socket
import struct
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cilium import events, libbpf
from observe.flow import (DROPPED, FORWARDED, TRACED, TRANSLATED, TYPE_DROP, TYPE_POLICY, TYPE_TRACE, Flow,
                          FlowEndpoint)
from observe.flows import Names, tcp_flag_names
from topo import netns

BUSY, DISCARD, HDR = 1 << 31, 1 << 30, 8
PAGE = mmap.PAGESIZE
SO_NETNS_COOKIE = 71
PROTO_NAMES = {6: "TCP", 17: "UDP", 1: "ICMPv4"}


class RingReader:
    """Consumer of one pinned BPF ringbuf (its size from BPF_OBJ_GET_INFO_BY_FD)."""

    def __init__(self, path: str, consume: bool = True) -> None:
        self.fd = libbpf.obj_get(path)
        self.consume = consume
        try:
            self.size = _map_info(self.fd)["max_entries"]
            self.cons = mmap.mmap(self.fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self.data = mmap.mmap(self.fd, PAGE + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE)
        except Exception:
            os.close(self.fd)
            raise
        self.mask = self.size - 1
        # Live only (observe/flows_run.py): what the programs queued while nobody read is skipped, not shown
        # as if it were happening now (what they could not queue meanwhile is in cilium_events_lost).
        self.pos = struct.unpack_from("=Q", self.data, 0)[0]
        if consume:
            struct.pack_into("=Q", self.cons, 0, self.pos)

    def fileno(self) -> int:
        return self.fd

    def drain(self, budget: int = 4096) -> list[bytes]:
        """Records between our position and the producer's (at most `budget`); our position moves on.

        A reader that does not consume (`consume=False`: another reader holds the ring, see RingSource)
        keeps its own position and never writes the shared one, so it takes no event from that reader.
        The producer reuses only space that reader has consumed, a whole ring (256 KiB) behind the head:
        a peek that fell that far behind has lost its place and starts again at the head."""
        prod = struct.unpack_from("=Q", self.data, 0)[0]
        cons = struct.unpack_from("=Q", self.cons, 0)[0] if self.consume else self.pos
        if not self.consume and prod - cons > self.size:
            cons = prod
        out = []
        while cons < prod and len(out) < budget:
            at = PAGE + (cons & self.mask)
            length = struct.unpack_from("=I", self.data, at)[0]
            if length & BUSY:
                break  # still being written
            size = length & ~(BUSY | DISCARD)
            if not length & DISCARD:
                out.append(bytes(self.data[at + HDR:at + HDR + size]))
            cons += (size + HDR + 7) & ~7
        self.pos = cons
        if self.consume:
            struct.pack_into("=Q", self.cons, 0, cons)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.cons.close()
            self.data.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("rest", ctypes.c_char * 64)]


def _map_info(fd: int) -> dict:
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    rc = libbpf.lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if rc:
        raise OSError(-rc, "BPF_OBJ_GET_INFO_BY_FD failed")
    return {"max_entries": info.max_entries, "name": info.name.decode()}


def lost_count(path: str) -> int:
    """The sum over CPUs of `cilium_events_lost` (a per-CPU array of one u64)."""
    fd = libbpf.obj_get(path)
    try:
        ncpu = os.cpu_count() or 1
        buf = ctypes.create_string_buffer(8 * ncpu)
        if libbpf.lib().bpf_map_lookup_elem(fd, struct.pack("=I", 0), buf):
            return 0
        return sum(struct.unpack(f"={ncpu}Q", buf.raw))
    finally:
        os.close(fd)


def netns_cookies(pods: dict[str, str]) -> dict[int, str]:
    """netns cookie -> pod IP, read with SO_NETNS_COOKIE in each pod's namespace (pod netns -> IP)."""
    out = {}
    for ns, ip in pods.items():
        with contextlib.suppress(OSError):
            with netns.entered(ns):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                out[struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]] = ip
            finally:
                s.close()
    return out


def boot_time() -> datetime:
    """Wall-clock time of ktime 0 (bpf_ktime_get_ns is CLOCK_MONOTONIC)."""
    return datetime.now(timezone.utc) - timedelta(seconds=__import__("time").monotonic())


def to_flow(ev: events.RawEvent, node: str, names: Names, cookies: dict[int, str], boot: datetime) -> Flow | None:
    """One ringbuf record as Hubble would show it."""
    when = boot + timedelta(microseconds=ev.ktime_ns // 1000)
    proto = PROTO_NAMES.get(ev.proto, str(ev.proto))
    src_ip = str(ev.saddr) if int(ev.saddr) else cookies.get(ev.cookie, "0.0.0.0")
    src, dst = names.endpoint(src_ip), names.endpoint(str(ev.daddr))
    if ev.src_identity:
        src = FlowEndpoint(src.ip, src.namespace, src.pod_name, src.labels, ev.src_identity, src.name)
    if ev.dst_identity:
        dst = FlowEndpoint(dst.ip, dst.namespace, dst.pod_name, dst.labels, ev.dst_identity, dst.name)
    service, orig = None, ""
    if ev.orig_daddr is not None:
        orig = f"{ev.orig_daddr}:{ev.orig_dport}"
        service = names.service(str(ev.orig_daddr), ev.orig_dport, proto)
    elif ev.rev_nat_index:
        service = names.service(str(ev.daddr), ev.dport, proto)
    direction = "INGRESS" if ev.flags & events.FLOW_F_INGRESS else "EGRESS"
    reply = bool(ev.flags & events.FLOW_F_REPLY)
    extra = {"rev_nat_index": str(ev.rev_nat_index)} if ev.rev_nat_index else {}
    common = dict(tcp_flags=tcp_flag_names(ev.tcp_flags), destination_service=service, original_destination=orig,
                  is_reply=reply, extra=extra)
    policies = (f"policy#{ev.policy_id}",) if ev.policy_id else ()
    if ev.type == events.EVENT_TRACE_SOCK:
        point = events.XLATE_POINTS.get(ev.subtype, str(ev.subtype))
        verdict = TRANSLATED if ev.subtype == 2 else TRACED
        return Flow(when, verdict, TYPE_TRACE, node, src, dst, proto, ev.sport, ev.dport,
                    trace_observation_point=point, summary=f"socket LB {point}", **common)
    if ev.type == events.EVENT_TRACE:
        point = events.TRACE_POINTS.get(ev.subtype, str(ev.subtype))
        return Flow(when, TRANSLATED if orig else FORWARDED, TYPE_TRACE, node, src, dst, proto, ev.sport, ev.dport,
                    trace_observation_point=point, summary=f"{point}", **common)
    if ev.type == events.EVENT_POLICY_VERDICT:
        allowed = bool(ev.flags & events.FLOW_F_ALLOWED)
        reason = "" if allowed else events.DROP_REASONS.get(ev.subtype, f"drop reason {ev.subtype}")
        return Flow(when, FORWARDED if allowed else DROPPED, TYPE_POLICY, node, src, dst, proto, ev.sport,
                    ev.dport, drop_reason_desc=reason, policies=policies, traffic_direction=direction,
                    summary="policy-verdict", **common)
    if ev.type == events.EVENT_DROP:
        reason = events.DROP_REASONS.get(ev.subtype, f"drop reason {ev.subtype}")
        return Flow(when, DROPPED, TYPE_DROP, node, src, dst, proto, ev.sport, ev.dport, drop_reason_desc=reason,
                    policies=policies, traffic_direction=direction if ev.flags else "", summary=reason, **common)
    return None


class RingSource:
    """One node's ring, turned into flows; `policy_names` maps the agent's policy ids to names when known."""

    def __init__(self, node: str, folder: Path, lock_dir: Path, names: Names, cookies: dict[int, str],
                 share: bool = False) -> None:
        """`share`: when another reader holds the ring, read alongside it without consuming (lab trace, which
        must not take a running `lab observe`'s events) instead of refusing; `self.shared` says so."""
        self.node, self.folder, self.names, self.cookies = node, folder, names, cookies
        self.note, self.lost, self.shared = "", 0, False
        lock_dir.mkdir(parents=True, exist_ok=True)
        self.lock: int | None = os.open(lock_dir / f"observe-{node}.lock",
                                        os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.lock)
            self.lock = None
            if not share:
                raise OSError(11, "another lab observe reads this node's ring")
            self.shared = True  # that reader consumes, so the ring has room: a peek sees every new event
        try:
            self.ring = RingReader(str(folder / events.EVENTS), consume=not self.shared)
        except Exception:
            if self.lock is not None:
                os.close(self.lock)
            raise
        self.lost_at_start = self._kernel_lost()
        self.boot = boot_time()
        self.policy_names: dict[int, str] = {}

    def _kernel_lost(self) -> int:
        with contextlib.suppress(Exception):
            return lost_count(str(self.folder / events.EVENTS_LOST))
        return 0

    def fileno(self) -> int:
        return self.ring.fileno()

    def read(self, budget: int = 4096) -> list[Flow]:
        out = []
        for record in self.ring.drain(budget):
            with contextlib.suppress(ValueError):
                flow = to_flow(events.unpack(record), self.node, self.names, self.cookies, self.boot)
                if flow is not None and flow.policies and self.policy_names:
                    flow = _named(flow, self.policy_names)
                if flow is not None:
                    out.append(flow)
        self.lost = self._kernel_lost() - self.lost_at_start
        return out

    def describe(self) -> str:
        return f"ringbuf cilium_events on {self.node}"

    def close(self) -> None:
        self.ring.close()
        if self.lock is not None:
            with contextlib.suppress(OSError):
                os.close(self.lock)
            self.lock = None


# Where the cilium agent records its numbering of NetworkPolicies and identities (issue 19's policy half:
# cilium/events.POLICY_RECORD, {"policies": {"ns/name": id}, "identities": [{"id", "labels"}], ...}), in the
# lab's state folder. Read here without depending on it: a lab without it shows `policy#N`.
POLICY_RECORD = "cilium/identities.json"


def policy_names(lab_dir: Path) -> dict[int, str]:
    """policy_id -> "namespace/name" from the agent's record ({} when there is none or it is unreadable)."""
    import json
    try:
        record = json.loads((lab_dir / POLICY_RECORD).read_text())
        return {int(number): str(key) for key, number in record.get("policies", {}).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _named(flow: Flow, ids: dict[int, str]) -> Flow:
    import dataclasses
    return dataclasses.replace(flow, policies=tuple(ids.get(int(p.split("#")[1]), p) if p.startswith("policy#")
                                                    else p for p in flow.policies))

