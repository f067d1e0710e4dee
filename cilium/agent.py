"""The cilium-agent role on each node: its BPF maps pinned in the lab's own bpffs folder, the socket-LB
programs on the node's own cgroup, cilium_vxlan with its tunnel programs, and the service maps kept in
line with the lab's services and endpoints.

Where things live (all found by the lab's name, so `lab down`/`lab clean` remove them after a kill -9 too):
- pins: /sys/fs/bpf/kubenet-lab/LAB/NODE/<map> (bpffs mounted when it is not);
- cgroups: /sys/fs/cgroup/unified/klab_LAB/NODE, holding every process of the node's pods (and `lab exec`
  into them); the machine's root cgroup is never touched;
- tc programs: on the node's own devices, gone with its namespace.

A sync reads what the maps hold (the kernel is the record), computes what they should hold
(cilium/maps.py) and writes only the difference, each map in one BPF_MAP_UPDATE_BATCH (deletions in one
BPF_MAP_DELETE_BATCH): run again after a crash, it finishes what was interrupted.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cilium import build, libbpf, maps
from cni.lxc import LXC_PREFIX
from services.endpoints import RunningPod
from services.kube_proxy import host_iptables_backend, iptables_restore, load
from topo import names, netns
from topo.errors import ApplyError, FeatureMissing
from topo.model import NODE_IFNAME, Lab

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "kubenet-lab"
CGROUP2 = Path("/sys/fs/cgroup/unified")
VXLAN_DEVICE, VXLAN_PORT = "cilium_vxlan", 8472
SOCK_PROGRAMS = (("cil_sock4_connect", libbpf.BPF_CGROUP_INET4_CONNECT),
                 ("cil_sock4_sendmsg", libbpf.BPF_CGROUP_UDP4_SENDMSG),
                 ("cil_sock4_recvmsg", libbpf.BPF_CGROUP_UDP4_RECVMSG),
                 ("cil_sock4_getpeername", libbpf.BPF_CGROUP_INET4_GETPEERNAME))
FROM_CONTAINER = "cil_from_container"  # pinned program (bpf_host.c), attached to each lxc veth's ingress
TO_CONTAINER = "cil_to_container"  # pinned too, attached to each lxc veth's egress (the pod's ingress policy)
ENDPOINT_PROGRAMS = ((FROM_CONTAINER, libbpf.BPF_TC_INGRESS), (TO_CONTAINER, libbpf.BPF_TC_EGRESS))


def lab_pins(lab: str) -> Path:
    return PIN_ROOT / lab


def pins(lab: str, node: str) -> Path:
    return PIN_ROOT / lab / node


def lab_cgroup(lab: str) -> Path:
    return CGROUP2 / f"{names.NETNS_PREFIX}{lab}"


def cgroup(lab: str, node: str) -> Path:
    return lab_cgroup(lab) / node


def tunnel(lab: Lab) -> bool:
    """Cilium's routingMode: tunnel (VXLAN, the default) or native (backend host-gw)."""
    return lab.network.backend == "vxlan"


def require() -> None:
    """What the profile needs of the machine, checked before anything is built."""
    if not (CGROUP2 / "cgroup.procs").exists():
        raise FeatureMissing(f"cni.profile cilium attaches its socket load balancer to a cgroup v2 tree: "
                             f"{CGROUP2} is not a cgroup2 mount")
    libbpf.lib()
    build.compile_all()


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf when it is not (never unmounted: other users may pin there too)."""
    with open("/proc/self/mounts") as fh:
        if any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in fh):
            return
    proc = subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ApplyError(f"cannot mount bpffs at {BPFFS}: {proc.stderr.strip()}")


# ---- a node ------------------------------------------------------------------------------------

def setup_node(lab: Lab, node: str) -> None:
    """Everything of the agent on one node: pins, cgroup and its socket-LB programs, the node config, the
    tunnel (device, programs, map), egress masquerade. Idempotent: a second run replaces programs and
    leaves one attached per hook."""
    folder = setup_socket_lb(lab.name, node, maps.node_config(lab, node))
    if tunnel(lab):
        _setup_tunnel(lab, node, folder)
    _setup_nodeport(lab, node, folder)
    _masquerade(lab, node)


def setup_socket_lb(lab: str, node: str, config: bytes) -> Path:
    """The node's pins folder and cgroup, the socket-LB programs attached to it, its node config written
    (also what `lab bench services` measures, under a lab-shaped name). Returns the pins folder."""
    ensure_bpffs()
    folder = pins(lab, node)
    folder.mkdir(parents=True, exist_ok=True)
    group = cgroup(lab, node)
    group.mkdir(parents=True, exist_ok=True)
    with libbpf.BpfObject(str(build.object_path("bpf_sock")), str(folder)) as obj:
        for program, hook in SOCK_PROGRAMS:
            libbpf.attach_cgroup(obj.prog_fd(program), str(group), hook)
        libbpf.update(obj.map_fd(maps.CONFIG), maps.CONFIG_KEY.pack(0), config)
    return folder


def _setup_nodeport(lab: Lab, node: str, folder: Path) -> None:
    """NodePort from outside: cil_from_netdev on the underlay device's ingress; cil_from_container pinned
    next to the maps for the pods' lxc veths (attached by `attach_endpoints`, one attach per device)."""
    ns = lab.node_netns(node)
    with netns.rtnl_in(ns) as rt:
        link = rt.link(NODE_IFNAME)
        if link is None:
            raise ApplyError(f"{node} has no {NODE_IFNAME}")
    with libbpf.BpfObject(str(build.object_path("bpf_host")), str(folder)) as obj:
        for program, _point in ENDPOINT_PROGRAMS:
            obj.pin_program(program, str(folder / program))
        with netns.entered(ns):
            libbpf.attach_tc(obj.prog_fd("cil_from_netdev"), link.index, libbpf.BPF_TC_INGRESS)


def attach_endpoints(lab: Lab, node: str) -> int:
    """cil_from_container (lxc ingress) and cil_to_container (lxc egress) on every lxc veth of the node that
    does not have them yet (a pod made since the last sync, or a sync a crash cut short): one in-process
    attach per new device and hook. Returns how many attaches."""
    ns = lab.node_netns(node)
    with netns.rtnl_in(ns) as rt:
        devices = [l.index for l in rt.links() if l.name.startswith(LXC_PREFIX)]
    done = 0
    with netns.entered(ns):
        for program, point in ENDPOINT_PROGRAMS:
            missing = [i for i in devices if not libbpf.tc_attached(i, point)]
            if not missing:
                continue
            fd = libbpf.obj_get(str(pins(lab.name, node) / program))
            try:
                for index in missing:
                    libbpf.attach_tc(fd, index, point)
            finally:
                os.close(fd)
            done += len(missing)
    return done


def _setup_tunnel(lab: Lab, node: str, folder: Path) -> None:
    ns = lab.node_netns(node)
    with netns.rtnl_in(ns) as rt:
        if rt.link(VXLAN_DEVICE) is None:
            _ip(ns, f"link add {VXLAN_DEVICE} type vxlan external dstport {VXLAN_PORT}\n"
                    f"link set {VXLAN_DEVICE} arp off mtu {lab.node(node).link.mtu or 1500} up\n")
        index = rt.link(VXLAN_DEVICE).index  # type: ignore[union-attr]
        for other in lab.nodes:
            if other.name != node:
                rt.replace_route(other.pod_cidr, oif=index)
    with libbpf.BpfObject(str(build.object_path("bpf_overlay")), str(folder)) as obj:
        with netns.entered(ns):
            libbpf.attach_tc(obj.prog_fd("cil_to_overlay"), index, libbpf.BPF_TC_EGRESS)
            libbpf.attach_tc(obj.prog_fd("cil_from_overlay"), index, libbpf.BPF_TC_INGRESS)
        _write_exact(obj.map_fd(maps.TUNNEL), maps.TUNNEL, maps.tunnel_entries(lab, node))


def _ip(ns: str, script: str) -> None:
    with netns.entered(ns):
        proc = subprocess.run(["ip", "-batch", "-"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ApplyError(f"ip in {ns} failed: {(proc.stderr.strip().splitlines() or ['?'])[0]}")


def masquerade_rules(lab: Lab, node: str) -> str:
    """Cilium's iptables masquerade (its default without BPF masquerading): pods' traffic to anything
    outside the cluster's pod CIDR leaves with the node's address; pod to pod never. Chain names as
    Cilium's (CILIUM_POST_nat); the only nat rules of a cilium node: no KUBE-* chain anywhere."""
    me = lab.node(node)
    return ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
            ":CILIUM_POST_nat - [0:0]\n"
            '-A POSTROUTING -m comment --comment "cilium-feeder: CILIUM_POST_nat" -j CILIUM_POST_nat\n'
            f"-A CILIUM_POST_nat -s {me.pod_cidr} ! -d {lab.cluster.pod_cidr} ! -o cilium_+ "
            f'-m comment --comment "cilium masquerade non-cluster" -j MASQUERADE\nCOMMIT\n')


def _masquerade(lab: Lab, node: str) -> None:
    load(lab.node_netns(node), iptables_restore(host_iptables_backend()), masquerade_rules(lab, node))


# ---- maps --------------------------------------------------------------------------------------

def _read(fd: int, name: str) -> dict[bytes, bytes]:
    key_size, value_size = maps.SIZES[name]
    return dict(libbpf.entries(fd, key_size, value_size))


def _write_exact(fd: int, name: str, want: dict[bytes, bytes], have: dict[bytes, bytes] | None = None,
                 delete: bool = True) -> tuple[int, int]:
    """Make a map hold exactly `want`: one batch of updates (only what differs), then one of deletions."""
    have = _read(fd, name) if have is None else have
    changed = [(k, v) for k, v in want.items() if have.get(k) != v]
    if changed:
        libbpf.update_batch(fd, b"".join(k for k, _ in changed), b"".join(v for _, v in changed), len(changed))
    stale = [k for k in have if k not in want] if delete else []
    if stale:
        libbpf.delete_batch(fd, b"".join(stale), len(stale))
    return len(changed), len(stale)


@dataclass
class SyncReport:
    nodes: int
    frontends: int
    backends: int
    written: int
    deleted: int
    seconds: float


@contextlib.contextmanager
def _pinned(lab: str, node: str, *wanted: str) -> Iterator[dict[str, int]]:
    fds: dict[str, int] = {}
    try:
        for name in wanted:
            fds[name] = libbpf.obj_get(str(pins(lab, node) / name))
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def sync_node(lab: Lab, running: list[RunningPod], node: str) -> tuple[int, int, int, int]:
    """One node's service maps brought in line: (frontends, backends, entries written, entries deleted)."""
    return write_services(lab.name, node, maps.services_of(lab, running, node))


@dataclass
class _Written:
    """What this process last wrote into one node's three service maps: the agent's memory, as Cilium's agent
    keeps its services between two updates and writes only what an update changes. Held per process only: a
    new process (every `lab apply`) starts without it and compares with what the maps hold."""

    map_ids: tuple[int, ...]  # the maps it was written to (a map re-created under the same pin has a new id)
    ids: maps.Ids
    contents: dict[str, dict[bytes, bytes]]  # what the three maps hold
    entries: dict[int, tuple[maps.ServiceEntry, bytes]]  # id(entry) -> (the entry, kept alive; its slot-0 key)
    parts: dict[bytes, tuple[dict[bytes, bytes], dict[bytes, bytes], dict[bytes, bytes]]]  # per frontend
    users: dict[bytes, int]  # backend map key -> how many frontends name it
    front: dict[bytes, int] = field(default_factory=dict)  # a frontend's slot-0 key -> id() of its entry
    last: list[maps.ServiceEntry] = field(default_factory=list)  # the entries as last passed, in order


_WRITTEN: dict[tuple[str, str], _Written] = {}
_SERVICE_MAPS = (maps.SERVICES, maps.BACKENDS, maps.REVNAT)


def write_services(lab: str, node: str, entries: list[maps.ServiceEntry]) -> tuple[int, int, int, int]:
    """The node's service maps made to hold exactly these frontends.

    Without a memory of this process's last write to these very maps (a new process, another map under the
    pin, a write that failed half way), the three maps are read and compared whole: whatever they hold,
    the sync converges. With it, only the entries whose frontends changed are computed and written, a cost
    independent of the number of services: the unchanged ones are recognized by identity (the caller
    passes the same ServiceEntry objects, as a long-running agent holds its services)."""
    with _pinned(lab, node, *_SERVICE_MAPS) as fds:
        map_ids = tuple(libbpf.map_id(fds[name]) for name in _SERVICE_MAPS)
        memo = _WRITTEN.pop((lab, node), None)  # popped: an exception below leaves no memory behind
        if memo is None or memo.map_ids != map_ids:
            memo, want, have = _full(fds, map_ids, entries)
        else:
            want, have = _partial(memo, *_changes(memo, entries))
        written, deleted = _write_ordered(fds, want, have)
        for name in _SERVICE_MAPS:
            held = memo.contents[name]
            held.update(want[name])
            for key in have[name].keys() - want[name].keys():
                held.pop(key, None)
        if len(memo.parts) == len(memo.entries):  # no two entries with one frontend: the memory is exact
            memo.last = list(entries)
            _WRITTEN[(lab, node)] = memo
    return len(entries), len(memo.users), written, deleted


def _full(fds: dict[str, int], map_ids: tuple[int, ...], entries: list[maps.ServiceEntry]) -> tuple[_Written, dict, dict]:
    """Every frontend computed, compared with what the maps hold now (the kernel is the record)."""
    have = {name: _read(fds[name], name) for name in _SERVICE_MAPS}
    memo = _Written(map_ids, maps.ids_from(have), {name: dict(have[name]) for name in _SERVICE_MAPS}, {}, {}, {})
    want: dict[str, dict[bytes, bytes]] = {name: {} for name in _SERVICE_MAPS}
    for entry in entries:
        part = maps.contribution(entry, memo.ids)
        key = next(iter(part[0]))  # slot 0
        memo.entries[id(entry)] = (entry, key)
        memo.front[key] = id(entry)
        memo.parts[key] = part
    for part in memo.parts.values():
        for name, content in zip(_SERVICE_MAPS, part):
            want[name].update(content)
        for bkey in part[1]:
            memo.users[bkey] = memo.users.get(bkey, 0) + 1
    return memo, want, have


def _changes(memo: _Written, entries: list[maps.ServiceEntry]) -> tuple[list[maps.ServiceEntry], list[int]]:
    """The entries new since the last write, and the ids of those gone. An entry is the one written before when
    it is the same object (a pointer comparison), or else equal to the entry written for its frontend (which
    it then stands for)."""
    last = memo.last
    if len(entries) >= len(last) and entries[:len(last)] == last:  # identical objects compare at pointer speed
        return entries[len(last):], []  # the common case of a long-running agent: services added at the end
    now = {id(entry): entry for entry in entries}  # ids of live objects: the memory holds its entries alive
    fresh = []
    for i in now.keys() - memo.entries.keys():
        entry = now[i]
        key = maps.lb4_key(entry.frontend, 0)
        was = memo.front.get(key)
        if was is not None and was not in now and memo.entries[was][0] == entry:
            del memo.entries[was]  # an equal entry, another object: it stands for the one written
            memo.entries[i] = (entry, key)
            memo.front[key] = i
        else:
            fresh.append(entry)
    gone = list(memo.entries.keys() - now.keys()) if len(memo.entries) != len(now) - len(fresh) else []
    return fresh, gone


def _partial(memo: _Written, fresh: list[maps.ServiceEntry], gone: list[int]) -> tuple[dict, dict]:
    """Only the changed frontends' entries: what they should hold (want) and what the maps hold there (have)."""
    old_keys = {memo.entries[k][1] for k in gone}
    old_parts = [memo.parts.pop(key) for key in old_keys if key in memo.parts]
    gone_entries = [memo.entries.pop(k)[0] for k in gone]
    for key in old_keys:
        memo.front.pop(key, None)
    new_parts = []
    for entry in fresh:
        part = maps.contribution(entry, memo.ids)
        key = next(iter(part[0]))
        memo.entries[id(entry)] = (entry, key)
        memo.front[key] = id(entry)
        memo.parts[key] = part  # a frontend held twice leaves len(parts) < len(entries): not memorized
        new_parts.append(part)
    for part, step in [(p, -1) for p in old_parts] + [(p, 1) for p in new_parts]:
        for bkey in part[1]:
            memo.users[bkey] = memo.users.get(bkey, 0) + step
    want: dict[str, dict[bytes, bytes]] = {name: {} for name in _SERVICE_MAPS}
    have: dict[str, dict[bytes, bytes]] = {name: {} for name in _SERVICE_MAPS}
    for part in new_parts:
        for name, content in zip(_SERVICE_MAPS, part):
            want[name].update(content)
    for name, index in ((maps.SERVICES, 0), (maps.REVNAT, 2)):
        held = memo.contents[name]
        for part in old_parts + new_parts:
            have[name].update((k, held[k]) for k in part[index] if k in held)
    held = memo.contents[maps.BACKENDS]
    for part in old_parts + new_parts:
        for bkey, value in part[1].items():
            if bkey in held:
                have[maps.BACKENDS][bkey] = held[bkey]
            if memo.users.get(bkey, 0) > 0:
                want[maps.BACKENDS].setdefault(bkey, value)
            else:
                memo.users.pop(bkey, None)
    # ids of frontends and backends no longer named, as a fresh read of the maps would not find them
    for entry in gone_entries:
        if maps.lb4_key(entry.frontend, 0) not in memo.parts:
            memo.ids.frontends.pop(entry.frontend, None)
        for be in entry.backends:
            bid = memo.ids.backends.get(be)
            if bid is not None and maps.BACKEND_KEY.pack(bid) not in memo.users:
                del memo.ids.backends[be]
    return want, have


def _write_ordered(fds: dict[str, int], want: dict[str, dict[bytes, bytes]],
                   have: dict[str, dict[bytes, bytes]]) -> tuple[int, int]:
    """Order: backends, then reverse NAT, then the service slots (slot 0 last in its batch), so no slot ever
    names a backend that is not there yet; deletions the other way round."""
    written = deleted = 0
    for name in (maps.BACKENDS, maps.REVNAT):
        w, _ = _write_exact(fds[name], name, want[name], have[name], delete=False)
        written += w
    services = dict(sorted(want[maps.SERVICES].items(), key=lambda kv: kv[0][6:8] == b"\0\0"))  # slot 0 last
    w, d = _write_exact(fds[maps.SERVICES], maps.SERVICES, services, have[maps.SERVICES])
    written, deleted = written + w, deleted + d
    for name in (maps.BACKENDS, maps.REVNAT):
        stale = [k for k in have[name] if k not in want[name]]
        if stale:
            libbpf.delete_batch(fds[name], b"".join(stale), len(stale))
            deleted += len(stale)
    return written, deleted


def collect_ct(lab: str, node: str) -> int:
    """Cilium's CT garbage collection: remove the connections past their lifetime (bpf_ktime_get_ns and
    time.monotonic read the same clock), in one batch. Returns how many."""
    with _pinned(lab, node, maps.CT) as fds:
        now = time.monotonic()
        dead = [k for k, v in _read(fds[maps.CT], maps.CT).items() if maps.CT_VALUE.unpack(v)[0] < now]
        if dead:
            libbpf.delete_batch(fds[maps.CT], b"".join(dead), len(dead))
    return len(dead)


def sync(lab: Lab, running: list[RunningPod]) -> SyncReport:
    """Every node's service maps for the lab's current services and ready pods."""
    started = time.monotonic()
    frontends = backends = written = deleted = 0
    for node in lab.nodes:
        attach_endpoints(lab, node.name)
        collect_ct(lab.name, node.name)
        f, b, w, d = sync_node(lab, running, node.name)
        frontends, backends, written, deleted = f, max(backends, b), written + w, deleted + d
    return SyncReport(len(lab.nodes), frontends, backends, written, deleted, time.monotonic() - started)


# ---- processes in the node's cgroup ------------------------------------------------------------

def _own_cgroup() -> Path:
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            if line.startswith("0::"):
                return CGROUP2 / line.strip()[3:].lstrip("/")
    return CGROUP2


def _join(folder: Path, pid: int = 0) -> None:
    with open(folder / "cgroup.procs", "w") as fh:
        fh.write(str(pid or os.getpid()))


@contextlib.contextmanager
def spawning_in(lab: str, node: str) -> Iterator[None]:
    """Processes started inside this block start in the node's cgroup (its socket LB applies from their
    first instruction: a child inherits the cgroup of its parent at fork). This process joins the
    node's cgroup for the block and goes back to where it was."""
    home = _own_cgroup()
    _join(cgroup(lab, node))
    try:
        yield
    finally:
        _join(home)


def join_cgroup_of(pid: int) -> None:
    """Join the cgroup `pid` is in when it is one of a lab's (`lab exec` into a pod joins its containers')."""
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cgroup") as fh:
            for line in fh:
                if line.startswith("0::/" + names.NETNS_PREFIX):
                    _join(CGROUP2 / line.strip()[4:])


def join_node(lab: str, node: str) -> None:
    """`lab exec NODE`: the node's own processes go through its socket LB too (Cilium's host reachable
    services), when the lab has one."""
    if cgroup(lab, node).is_dir():
        _join(cgroup(lab, node))


# ---- teardown ----------------------------------------------------------------------------------

def remove(lab: str, timeout: float = 5.0) -> list[str]:
    """The lab's cgroups (once their processes are gone) and pins; what could not be removed is returned."""
    left = []
    group = lab_cgroup(lab)
    if group.is_dir():
        for folder in sorted((p for p in group.iterdir() if p.is_dir()), reverse=True) + [group]:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        left.append(f"{folder}: {exc.strerror}")
                        break
                    _kill_members(folder)
                    time.sleep(0.02)
    shutil.rmtree(lab_pins(lab), ignore_errors=True)
    with contextlib.suppress(OSError):
        PIN_ROOT.rmdir()  # only when no other lab pins anything
    return left


def _kill_members(folder: Path) -> None:
    """A process still in a lab's cgroup after its namespaces are gone (a `lab exec` that outlived them)."""
    with contextlib.suppress(OSError):
        for pid in (folder / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), 9)


def leftover_labs() -> set[str]:
    """Labs that still have pins or cgroups (for `lab clean`)."""
    found = set()
    if PIN_ROOT.is_dir():
        found |= {p.name for p in PIN_ROOT.iterdir()}
    if CGROUP2.is_dir():
        found |= {p.name[len(names.NETNS_PREFIX):] for p in CGROUP2.iterdir()
                  if p.is_dir() and p.name.startswith(names.NETNS_PREFIX)}
    return {lab for lab in found if names.is_dns_label(lab, names.LAB_NAME_MAX)}
