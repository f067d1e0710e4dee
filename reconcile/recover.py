"""Finishing what a killed command left behind: the lab's recorded state held against what the kernel holds.

Every command that changes a running lab (`lab apply`, `lab delete`, `lab break`) starts here, under the
lab's lock, so a `kill -9` at any moment of an earlier one is repaired before anything new is done:

- a pod recorded `Pending` (its command died while making it) is rolled back: whatever exists of it
  (namespace, processes, veth, lease, files) is removed and the record dropped; running the same
  `lab apply` again makes it afresh. Rolling back rather than forward keeps one path for making pods;
- a pod recorded `Terminating` (its command died while removing it) is removed, as was asked;
- a pod namespace of the lab that no record names (a crash between creating it and recording it) goes;
- each node's IPAM leases are checked against the recorded pods: the kernel wins. A lease file that is
  missing, unreadable or disagrees is rewritten from the pods that hold the addresses, so an address in
  use is never handed out twice (host-local would; a lost lease file is how pods get duplicate IPs).

Then the caller's own work, and `resync` (which is itself convergent), bring every layer in line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from apiserver import state
from cni.ipam import Lease, NodeIpam
from cni.plugin import NetConf
from kubelet import pods as kubelet
from topo import names, netns
from topo.model import POD_IFNAME, Lab


@dataclass
class Recovery:
    rolled_back: list[str] = field(default_factory=list)  # pods a killed command was making
    finished: list[str] = field(default_factory=list)  # pods a killed command was removing
    orphans: list[str] = field(default_factory=list)  # pod namespaces no record named
    leases: list[str] = field(default_factory=list)  # nodes whose lease files were rewritten

    def lines(self) -> list[str]:
        """What `lab apply`/`lab delete` report before their own lines (nothing when all was in order)."""
        out = [f"pod {k} rolled back (an earlier command was killed while making it)" for k in self.rolled_back]
        out += [f"pod {k} deleted (an earlier command was killed while deleting it)" for k in self.finished]
        out += [f"pod namespace {n} removed (made by a killed command, never recorded)" for n in self.orphans]
        out += [f"node {n}: IPAM leases rewritten from the running pods" for n in self.leases]
        return out

    @property
    def changed(self) -> bool:
        return bool(self.rolled_back or self.finished or self.orphans or self.leases)


def recover(st: state.LabState, lab: Lab) -> Recovery:
    """Bring the lab's record and its kernel objects into agreement (see the module docstring); records the
    result before returning. Cheap when nothing is wrong: one directory listing and each node's lease file."""
    done = Recovery()
    for key, ps in list(st.pods.items()):
        if ps.waiting:  # Pending on purpose (no address): clear what a killed retry made of it, keep it wanted
            kubelet.remove_pod(lab, key, ps.node if ps.node in {n.name for n in lab.nodes} else None)
            continue
        if ps.phase in ("Pending", "Terminating"):
            kubelet.remove_pod(lab, key, ps.node if ps.node in {n.name for n in lab.nodes} else None)
            del st.pods[key]
            (done.rolled_back if ps.phase == "Pending" else done.finished).append(key)
    recorded = {ps.netns for ps in st.pods.values()}
    prefix = f"{names.NETNS_PREFIX}{lab.name}{names.SEP}p{names.SEP}"
    for space in netns.list_names(prefix):
        if space in recorded:
            continue
        namespace, _, pod = space[len(prefix):].partition(names.SEP)
        kubelet.remove_pod(lab, f"{namespace}/{pod}", None)
        done.orphans.append(space)
    if lab.cni.profile == "aws-vpc":
        done.leases += _repair_ipamd(st, lab)
    else:
        unchanged = _unchanged_lease_files(st)
        confs = [kubelet.netconf(lab, node.name, state.ipam_dir(lab.name)) for node in lab.nodes]
        looked_at = [conf for conf in confs if conf.lease_file().path.name not in unchanged]
        by_node: dict[str, dict[str, str]] = {}  # node -> {ip: pod key}, gathered in one pass over the pods
        if looked_at:
            for key, ps in st.pods.items():
                if ps.ip:
                    by_node.setdefault(ps.node, {})[ps.ip] = key
        for conf in looked_at:
            if _repair_leases(lab, conf, by_node.get(conf.node, {})):
                done.leases.append(conf.node)
    if done.changed:
        st.record()
    return done


LEASE_STAMPS = "lease-stamps.json"  # in the lab's folder: each lease file as it was when the lab was last in step


def _stat_key(info: os.stat_result) -> list[int]:
    # a lease file is replaced whole (a new inode), and any write or rename moves its ctime
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def stamp_leases(st: state.LabState) -> None:
    """Remember each lease file as it is now, when every layer has just been brought in line with generation
    `st.generation` (reconcile.resync.mark_in_step). The leases then agree with the recorded pods: every
    command records its change (bumping the generation) before it allocates or frees an address, and one
    killed before its end never marks the lab in step."""
    files = {}
    try:
        with os.scandir(state.ipam_dir(st.name)) as entries:
            for entry in entries:
                if entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
                    files[entry.name] = _stat_key(entry.stat(follow_symlinks=False))
    except FileNotFoundError:
        pass
    path = state.lab_dir(st.name) / LEASE_STAMPS
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"generation": st.generation, "files": files}))
    tmp.replace(path)


def _unchanged_lease_files(st: state.LabState) -> set[str]:
    """The lease files untouched since the lab was last in step at this very generation: they agree with the
    recorded pods without being read. Each lease file costs a stat instead of parsing it and comparing it with
    every pod of its node (25 ms at 10,000 pods). A file deleted, edited or replaced by hand since, or any
    file after a command that recorded a change and did not finish, is read and compared in full."""
    try:
        stamps = json.loads((state.lab_dir(st.name) / LEASE_STAMPS).read_text())
        if stamps["generation"] != st.generation:
            return set()
        folder = state.ipam_dir(st.name)
        unchanged = set()
        for name, key in stamps["files"].items():
            try:
                if _stat_key(os.stat(folder / name, follow_symlinks=False)) == key:
                    unchanged.add(name)
            except OSError:
                pass
        return unchanged
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _repair_leases(lab: Lab, conf: NetConf, held: dict[str, str]) -> bool:
    """Rewrite the lease file of `conf`'s node when it does not hold exactly the recorded pods' addresses
    (`held`: address -> pod key of the pods recorded on this node)."""
    lease_file = conf.lease_file()
    try:
        data = json.loads(lease_file.path.read_text())
        # In order (the common case) when the file holds exactly these addresses for these sandboxes: compared
        # as the text the file holds, without building the pool (a lab's every lease, on every command).
        if data["subnet"] == str(conf.subnet) and {ip: (v["containerID"], v["ifname"]) for ip, v in data["leases"].items()} == {
                ip: (names.sandbox_id(lab.name, *key.split("/", 1)), POD_IFNAME) for ip, key in held.items()}:
            return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # missing or damaged: looked at in full below
    wanted: dict[IPv4Address, Lease] = {}
    for ip, key in held.items():
        namespace, name = key.split("/", 1)
        wanted[IPv4Address(ip)] = Lease(names.sandbox_id(lab.name, namespace, name), POD_IFNAME, key)
    try:
        current = lease_file.read()
    except (ValueError, KeyError, TypeError, AttributeError):  # damaged: nothing in it can be trusted
        current = None
    if current is not None and {ip: (l.container_id, l.ifname) for ip, l in current.leases.items()} == {
            ip: (l.container_id, l.ifname) for ip, l in wanted.items()}:
        return False
    if current is None and not wanted and not lease_file.path.exists():
        return False  # nothing leased, nothing on file: in order
    last = current.last_reserved if current is not None else max(wanted, default=None)
    lease_file.write(NodeIpam(conf.node, conf.subnet, last, wanted))
    return True


def _repair_ipamd(st: state.LabState, lab: Lab) -> list[str]:
    """aws-vpc: ipamd's assignments held against the recorded running pods, the kernel's truth. An address
    assigned to no running pod is given back to the warm pool; a running pod's address missing from the books
    (a lost or damaged file) is written back onto the ENI that holds it, or onto the node's primary ENI. Returns
    the nodes whose books changed."""
    books = kubelet.ipamd_file(lab)
    try:
        ipamd = books.read()
    except (ValueError, KeyError, TypeError, AttributeError):
        books.path.unlink(missing_ok=True)
        ipamd = books.read()
    changed = []
    for node in lab.nodes:
        pool = ipamd.nodes[node.name]
        wanted = {}
        for key, ps in st.pods.items():
            if ps.node == node.name and ps.ip and not ps.waiting:
                namespace, name = key.split("/", 1)
                wanted[IPv4Address(ps.ip)] = names.sandbox_id(lab.name, namespace, name)
        if pool.assigned == wanted:
            continue
        held = {ip for e in pool.enis for ip in e.pool()}
        home = (ipamd.pod_enis(pool) or pool.enis)[0]
        home.ips += [ip for ip in wanted if ip not in held]
        pool.assigned = wanted
        ipamd.top_up(pool)
        changed.append(node.name)
    if changed or not books.path.exists():
        books.write(ipamd)
    return changed
