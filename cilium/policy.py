"""The cilium-agent's policy side on each node: identities allocated and recorded, every node's ipcache,
each local endpoint in cilium_lxc with its own policy map (cilium_policy_NNNNN, pinned in the node's
folder and reached by the datapath through kubenet_policy_maps), kept in line after each change.

Like the service maps (cilium/agent.py), a sync reads what the maps hold, computes what they should hold
(cilium/identity.py, pure) and writes only the difference: a relabelled pod changes its ipcache entry on
every node and the policy maps whose peers it joins or leaves, nothing else. The identity allocation is the
one record kept outside the kernel (numbers must stay stable across syncs): `identities.json` in the lab's
state folder, written before any map names a new number, so a sync cut short by a crash converges when run
again. Order on a node: policy maps, then their entry in kubenet_policy_maps, then cilium_lxc (which is
what turns enforcement on for an endpoint); removals the other way round.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cilium import agent, identity, libbpf
from cni.lxc import LXC_PREFIX
from cni.network_policy import Workload
from services.endpoints import RunningPod
from topo import names, netns
from topo.model import Lab

ALLOCATION_FILE = "identities.json"  # in the folder callers pass: the lab's state dir / cilium (events.POLICY_RECORD)
POLICY_PIN = re.compile(r"cilium_policy_(\d{5})")


@dataclass
class PolicySyncReport:
    nodes: int
    endpoints: int
    identities: int
    written: int
    deleted: int
    seconds: float


def load_allocation(folder: Path) -> identity.Allocation:
    path = folder / ALLOCATION_FILE
    try:
        return identity.Allocation.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return identity.Allocation()
    except (ValueError, KeyError, TypeError):
        return identity.Allocation()  # a damaged record: numbers start again, the maps are rewritten


def save_allocation(folder: Path, alloc: identity.Allocation) -> None:
    """Atomically (a crash leaves the old record or the new one), and only when it changed."""
    text = json.dumps(alloc.to_json(), indent=1) + "\n"
    with contextlib.suppress(OSError):
        if (folder / ALLOCATION_FILE).read_text() == text:
            return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{ALLOCATION_FILE}.{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, folder / ALLOCATION_FILE)


def lxc_name(lab: Lab, workload: Workload) -> str:
    return names.host_veth(names.sandbox_id(lab.name, workload.pod.namespace, workload.pod.name), prefix=LXC_PREFIX)


def sync(lab: Lab, running: list[RunningPod], folder: Path) -> PolicySyncReport:
    """Every node's policy maps for the lab's current pods, namespaces and NetworkPolicies."""
    started = time.monotonic()
    workloads = [Workload(r.pod, r.ip) for r in running]
    alloc = load_allocation(folder)
    model = identity.build(lab, workloads, alloc)
    save_allocation(folder, alloc)
    written = deleted = endpoints = 0
    for node in lab.nodes:
        if not (agent.pins(lab.name, node.name) / identity.LXC).exists():
            continue  # the node's agent is not set up (yet): `lab up` will come back here
        e, w, d = sync_node(lab, node.name, workloads, model)
        endpoints, written, deleted = endpoints + e, written + w, deleted + d
    return PolicySyncReport(len(lab.nodes), endpoints, len(alloc.labels), written, deleted,
                            time.monotonic() - started)


def _write_policy(fd: int, want: dict[identity.PolicyKey, int]) -> tuple[int, int]:
    """One endpoint's policy map made to hold exactly `want` (the counters of kept entries are kept)."""
    have = dict(libbpf.entries(fd, identity.POLICY_KEY.size, identity.POLICY_ENTRY.size))
    packed = {k.pack(): pid for k, pid in want.items()}
    changed = [(k, identity.policy_entry(pid)) for k, pid in packed.items()
               if k not in have or identity.POLICY_ENTRY.unpack(have[k])[3] != pid]
    if changed:
        libbpf.update_batch(fd, b"".join(k for k, _ in changed), b"".join(v for _, v in changed), len(changed))
    stale = [k for k in have if k not in packed]
    libbpf.delete_batch(fd, b"".join(stale), len(stale))
    return len(changed), len(stale)


def _exact(fd: int, name: str, want: dict[bytes, bytes]) -> tuple[int, int]:
    key_size, value_size = identity.SIZES[name]
    have = dict(libbpf.entries(fd, key_size, value_size))
    changed = [(k, v) for k, v in want.items() if have.get(k) != v]
    if changed:  # LPM tries take batches too (generic batch ops)
        libbpf.update_batch(fd, b"".join(k for k, _ in changed), b"".join(v for _, v in changed), len(changed))
    stale = [k for k in have if k not in want]
    libbpf.delete_batch(fd, b"".join(stale), len(stale))
    return len(changed), len(stale)


def _policy_map(folder: Path, endpoint: int) -> int:
    """The endpoint's pinned policy map (made when missing); an fd the caller closes."""
    path = folder / identity.policy_map_name(endpoint)
    if path.exists():
        return libbpf.obj_get(str(path))
    fd = libbpf.map_create(libbpf.BPF_MAP_TYPE_LPM_TRIE, identity.policy_map_name(endpoint),
                           identity.POLICY_KEY.size, identity.POLICY_ENTRY.size, identity.POLICY_MAX_ENTRIES,
                           libbpf.BPF_F_NO_PREALLOC)
    try:
        libbpf.obj_pin(fd, str(path))
    except Exception:
        os.close(fd)
        raise
    return fd


HOOK_CHUNK = 256  # policy maps held open at once (well under the default limit of 1024 descriptors)


def _write_endpoints(lab: Lab, folder: Path, outer: int, local: list[tuple[Workload, int]],
                     workloads: list[Workload], model: identity.Model) -> tuple[int, int]:
    """These endpoints' policy maps (made when missing) brought in line, then hooked into
    kubenet_policy_maps. Every write to a map-in-map waits for an RCU grace period (about 30 ms here), once
    per syscall: so only the slots that do not hold their map already, all in one batch."""
    written = deleted = 0
    hooks: list[tuple[bytes, int]] = []
    with contextlib.ExitStack() as stack:
        for workload, index in local:
            fd = _policy_map(folder, index)
            stack.callback(os.close, fd)
            w, d = _write_policy(fd, identity.endpoint_policy(lab, workload, workloads, model))
            written, deleted = written + w, deleted + d
            key = index.to_bytes(4, "little")
            held = libbpf.lookup(outer, key, 4)
            if held is None or int.from_bytes(held, "little") != libbpf.map_id(fd):
                hooks.append((key, fd))
        if hooks:
            libbpf.update_batch(outer, b"".join(k for k, _ in hooks),
                                b"".join(fd.to_bytes(4, "little") for _, fd in hooks), len(hooks))
    return written + len(hooks), deleted


def sync_node(lab: Lab, node: str, workloads: list[Workload], model: identity.Model) -> tuple[int, int, int]:
    """One node: its ipcache, its endpoints' policy maps and cilium_lxc. (endpoints, written, deleted)"""
    folder = agent.pins(lab.name, node)
    with netns.rtnl_in(lab.node_netns(node)) as rt:
        links = {l.name: l.index for l in rt.links() if l.name.startswith(LXC_PREFIX)}
    local = [(w, links[lxc_name(lab, w)]) for w in workloads if w.pod.node == node and lxc_name(lab, w) in links]
    written = deleted = 0
    with contextlib.ExitStack() as stack:
        fds = {}
        for name in (identity.LXC, identity.IPCACHE, identity.POLICY_MAPS):
            fds[name] = libbpf.obj_get(str(folder / name))
            stack.callback(os.close, fds[name])
        w, d = _exact(fds[identity.IPCACHE], identity.IPCACHE,
                      identity.ipcache_entries(lab, node, workloads, model))
        written, deleted = written + w, deleted + d
        lxc: dict[bytes, bytes] = {}
        for start in range(0, len(local), HOOK_CHUNK):  # a chunk's maps stay open until its batch is written
            w, d = _write_endpoints(lab, folder, fds[identity.POLICY_MAPS], local[start:start + HOOK_CHUNK],
                                    workloads, model)
            written, deleted = written + w, deleted + d
        for workload, index in local:
            lxc[identity.endpoint_key(workload.ip)] = identity.endpoint_info(
                index, identity.enforcement(lab, workload.pod), model.of_pod[workload.pod.key],
                identity.isolated_by(lab, workload.pod, model.alloc))
        w, d = _exact(fds[identity.LXC], identity.LXC, lxc)
        written, deleted = written + w, deleted + d
        keep = {index for _, index in local}
        outer = [k for k, _ in libbpf.entries(fds[identity.POLICY_MAPS], 4, 4)
                 if int.from_bytes(k, "little") not in keep]
        libbpf.delete_batch(fds[identity.POLICY_MAPS], b"".join(outer), len(outer))
        deleted += len(outer)
        for pin in folder.iterdir():
            m = POLICY_PIN.fullmatch(pin.name)
            if m and int(m.group(1)) not in keep:
                with contextlib.suppress(FileNotFoundError):
                    pin.unlink()
    collect_ct(lab.name, node)
    return len(local), written, deleted


def collect_ct(lab: str, node: str) -> int:
    """kubenet_ct4_policy's connections past their lifetime removed (the LRU evicts the rest)."""
    path = agent.pins(lab, node) / identity.POLICY_CT
    fd = libbpf.obj_get(str(path))
    try:
        now = time.monotonic()
        dead = [k for k, v in libbpf.entries(fd, *identity.SIZES[identity.POLICY_CT])
                if identity.POLICY_CT_VALUE.unpack(v)[0] < now]
        if dead:
            libbpf.delete_batch(fd, b"".join(dead), len(dead))
    finally:
        os.close(fd)
    return len(dead)
