"""Where a running lab is remembered between commands: its desired state, and what was made of it.

`lab up` returns while the lab keeps running, so every later command (status, exec, apply, down) finds
the lab from a small JSON file under /run (tmpfs: a reboot forgets labs exactly when it forgets their
namespaces; where the machine's /run is on its disk, the lab mounts a tmpfs of its own there while labs
exist, `prepare_run_dir`). The spec text is kept, not a copy of the model, so the model is always
re-derived the one way it is ever derived.

The file is written first, then the kernel is changed (desired state first, as the API server records an
object before any controller acts on it): a pod about to be made is recorded `Pending`, one about to go
`Terminating`, and each recorded change bumps `generation`. A command killed halfway therefore leaves a
record that says what was under way, and `reconcile.recover` finishes or rolls back exactly that. Writes
are atomic (a temporary file renamed over the old one), so the file is never half-written; when it is
lost or damaged anyway, the kernel's objects (found by the lab's prefix) are the truth of last resort.

Locks are per lab: two labs change at once; only the run folder's shared parts take the global lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson

from topo import memfs, names, netns
from topo.model import Pod
from topo.errors import StateError

RUN_DIR = Path(os.environ.get("KUBENET_LAB_RUN_DIR", "/run/kubenet-lab"))
netns.TEMPLATE_WITNESSES.append(str(RUN_DIR))  # its tmpfs comes and goes with the labs (prepare_run_dir)


@dataclass
class PodState:
    node: str
    ip: str
    netns: str
    pause_pid: int
    containers: dict[str, int] = field(default_factory=dict)  # container name -> pid
    owner: str | None = None  # the Deployment a replica belongs to
    labels: dict[str, str] = field(default_factory=dict)
    ports: list[list] = field(default_factory=list)  # [name, number, protocol] of its container ports
    phase: str = "Running"  # "Pending" while being made, "Terminating" while being removed (crash markers)
    hostname: str | None = None  # spec.hostname and spec.subdomain, for the cluster DNS's names
    subdomain: str | None = None
    # Pending with a reason: a pod that stays Pending on purpose, not a crash marker (`reconcile.recover` keeps
    # it and retries). "ContainerCreating": the CNI could give it no address (aws-vpc: the subnet ran dry);
    # `message` is what kubelet's event would say.
    reason: str | None = None
    message: str | None = None

    @property
    def waiting(self) -> bool:
        return self.phase == "Pending" and self.reason is not None


@dataclass
class LabState:
    name: str
    phase: str  # "building" while `lab up` runs, "up" once it returned successfully
    pid: int  # the process building the lab (to tell a crashed build from a running one)
    spec_file: str | None
    spec_text: str
    exercise: str | None = None
    created: float = field(default_factory=time.time)
    objects: list[dict[str, Any]] = field(default_factory=list)  # manifests added by `lab apply`
    deleted: list[str] = field(default_factory=list)  # "Kind/ns/name" of spec objects removed by `lab delete`
    pods: dict[str, PodState] = field(default_factory=dict)
    generation: int = 0  # bumped by every recorded change of the desired state, as metadata.generation

    def to_json(self) -> bytes:
        # orjson writes the dataclasses as they are (a pod's every field): 2 ms for 10,000 pods where the
        # standard library took 60 ms (building a dict per pod, then encoding it), twice per change.
        return orjson.dumps(self, option=orjson.OPT_NON_STR_KEYS)  # a key YAML read as a number: "1", as json.dumps wrote it

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabState:
        """Fields this version does not know are ignored (a newer tool's state must not break an older one)."""
        pods = {}
        for key, value in data.pop("pods", {}).items():
            try:
                pods[key] = PodState(**value)  # the common case: every field known
            except TypeError:
                pods[key] = PodState(**{f: x for f, x in value.items() if f in _POD_FIELDS})
        known = {f.name for f in fields(cls)} - {"pods"}
        return cls(**{k: v for k, v in data.items() if k in known}, pods=pods)

    def record(self) -> None:
        """A change of the desired state: bump the generation and write it before the kernel is touched."""
        self.generation += 1
        save(self)


_POD_FIELDS = {f.name for f in fields(PodState)}

LOCK = ".lock"  # names starting with a dot can never be lab names
LOCKS = ".locks"  # one lock file per lab (a lab's own folder comes and goes with it)
BIN = ".bin"


def check_name(name: str) -> str:
    """A lab name reaches paths (state folder) and namespace names: only DNS labels get through."""
    if not names.is_dns_label(name, names.LAB_NAME_MAX):
        raise StateError(f"{name!r} is not a lab name (lower-case letters, digits and '-', at most "
                         f"{names.LAB_NAME_MAX} characters)")
    return name


def pod_state(pod: Pod, ip: str, netns: str, pause_pid: int, containers: dict[str, int]) -> PodState:
    """What later commands need to know of a running pod (its model is not stored, only these facts)."""
    ports = [[p.name, p.container_port, p.protocol] for c in pod.containers for p in c.ports]
    return PodState(node=pod.node, ip=ip, netns=netns, pause_pid=pause_pid, containers=containers,
                    owner=pod.owner, labels=pod.label_map, ports=ports, hostname=pod.hostname,
                    subdomain=pod.subdomain)


WAITING_REASON = "ContainerCreating"  # what `kubectl get pods` shows for a pod whose sandbox keeps failing


def waiting_pod(pod: Pod, netns: str, message: str) -> PodState:
    """The record of a pod that is to exist but has no sandbox yet: Pending, ContainerCreating, the message."""
    record = pod_state(pod, "", netns, 0, {})
    record.phase, record.reason, record.message = "Pending", WAITING_REASON, message
    return record


def pod_dir(lab: str, pod: Pod) -> Path:
    """Where kubelet's files for a pod live (its resolv.conf and hosts, bind-mounted into the pod)."""
    return pod_dir_of(lab, pod.key)


def pod_dir_of(lab: str, key: str) -> Path:
    """pod_dir of a pod given by its key, NAMESPACE/NAME (as the lab's state names pods)."""
    namespace, name = key.split("/", 1)
    return lab_dir(lab) / "pods" / f"{namespace}_{name}"


def lab_dir(name: str) -> Path:
    return RUN_DIR / check_name(name)


def state_path(name: str) -> Path:
    return lab_dir(name) / "state.json"


def ipam_dir(name: str) -> Path:
    return lab_dir(name) / "ipam"


def log_dir(name: str) -> Path:
    return lab_dir(name) / "logs"


def kube_proxy_dir(name: str) -> Path:
    """What each node's kube-proxy last loaded (services/kube_proxy.py keeps its files there)."""
    return lab_dir(name) / "kube-proxy"


def save(state: LabState) -> None:
    path = state_path(state.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(state.to_json())
    os.replace(tmp, path)


def load(name: str) -> LabState | None:
    try:
        data = orjson.loads(state_path(name).read_bytes())
        st = LabState.from_json(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        raise StateError(f"state of lab {name} is unreadable ({type(exc).__name__}: {exc}): "
                         f"'lab down {name}' removes what the kernel holds of it") from exc
    if not isinstance(st, LabState) or st.name != name:
        raise StateError(f"state of lab {name} names another lab ({st.name!r}): "
                         f"'lab down {name}' removes what the kernel holds of it")
    return st


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_live(state: LabState | None) -> bool:
    """Up, or still being built by a process that is alive. Anything else is a crash's leftover."""
    if state is None:
        return False
    return state.phase == "up" or (state.phase == "building" and pid_alive(state.pid) and state.pid != os.getpid())


def known_labs() -> list[str]:
    try:
        return sorted(p.name for p in RUN_DIR.iterdir()
                      if names.is_dns_label(p.name, names.LAB_NAME_MAX) and (p / "state.json").exists())
    except FileNotFoundError:
        return []


def live_labs() -> list[str]:
    return [name for name in known_labs() if is_live(load_readable(name))]


def load_readable(name: str) -> LabState | None:
    """`load`, with an unreadable state taken as no state: a listing of labs must not fail for every lab
    because one lab's file is damaged (that lab's own commands say what is wrong)."""
    try:
        return load(name)
    except StateError:
        return None


def resolve(name: str | None, any_phase: bool = False) -> LabState:
    """The lab a command means: the one named, or the only one running.

    `any_phase` also finds a lab whose build failed and was kept (`lab up --keep-on-failure`).
    """
    if name is not None:  # an empty name is a wrong name (check_name), not "the only lab running"
        state = load(check_name(name))
        if state is None or (state.phase != "up" and not any_phase):
            running = ", ".join(live_labs()) or "none"
            raise StateError(f"lab {name} is not running (running: {running})")
        return state
    live = [n for n in known_labs() if (s := load_readable(n)) is not None and s.phase == "up"]
    if not live:
        raise StateError("no lab is running: start one with 'lab up [SPEC]'")
    if len(live) > 1:
        raise StateError(f"{len(live)} labs are running ({', '.join(live)}): name one (--lab NAME)")
    return load(live[0])  # type: ignore[return-value]


_HEAD = re.compile(r'\{"name":"([a-z0-9-]+)","phase":"([a-z]+)"')


def peek_phase(name: str) -> str | None:
    """A lab's phase from the head of its state file (the file starts with its name and phase: `save` writes
    the fields in order), without reading the whole file: finding the lab a command means must not cost a
    read of every pod of every lab. Falls back to a full read for a file written otherwise; None when there
    is no readable state."""
    try:
        with open(state_path(name), "rb") as fh:
            head = fh.read(256).decode("utf-8", "replace")
    except OSError:
        return None
    match = _HEAD.match(head)
    if match and match.group(1) == name:
        return match.group(2)
    st = load_readable(name)
    return None if st is None else st.phase


def resolve_name(name: str | None) -> str:
    """The lab a changing command means (the one named, or the only one running), found as `resolve` finds it
    but without loading its state: the command loads it once, under the lab's lock (`load_running`)."""
    if name is not None:  # an empty name is a wrong name (check_name), not "the only lab running"
        check_name(name)
        if peek_phase(name) != "up":
            running = ", ".join(live_labs()) or "none"
            raise StateError(f"lab {name} is not running (running: {running})")
        return name
    live = [n for n in known_labs() if peek_phase(n) == "up"]
    if not live:
        raise StateError("no lab is running: start one with 'lab up [SPEC]'")
    if len(live) > 1:
        raise StateError(f"{len(live)} labs are running ({', '.join(live)}): name one (--lab NAME)")
    return live[0]


def load_running(name: str) -> LabState:
    """The state of a running lab, read under its lock (it may have gone down while the command waited)."""
    st = load(name)
    if st is None or st.phase != "up":
        raise StateError(f"lab {name} is not running any more")
    return st


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`. The file may be removed by whoever holds the lock (a lab's folder goes
    with the lab), so after waiting, check that the file locked is still the one at the path; if not, retry."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the device too: a lock file of a run folder since unmounted may share an inode number
            now, held = os.stat(path), os.fstat(fd)
            current = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(name: str | None = None) -> Iterator[None]:
    """One command at a time changes a lab (builds, changes and teardowns of one lab must not interleave);
    other labs go on. Without a name: the whole run folder (`lab clean`, the shared pause binary)."""
    if name is None:
        with _flock(RUN_DIR / LOCK):
            yield
        return
    with _flock(RUN_DIR / LOCKS / check_name(name)):
        yield


@contextlib.contextmanager
def try_locked(name: str) -> Iterator[bool]:
    """A lab's lock if it is free right now (True), else nothing (False): for `lab clean`, which must leave
    a lab alone while a command builds or changes it."""
    path = RUN_DIR / LOCKS / check_name(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def remove(name: str) -> None:
    """A lab's state folder and lock; the whole run folder once no lab is left and no other lab's command is
    under way (one may be building a lab that has no state file yet). Call with the lab's lock held."""
    shutil.rmtree(lab_dir(name), ignore_errors=True)
    with contextlib.suppress(OSError):
        (RUN_DIR / LOCKS / name).unlink()  # a command waiting on it sees another inode and locks afresh
    release_run_dir()


def prepare_run_dir() -> None:
    """Before `lab up` takes its first lock: where the machine's /run is a folder of its disk, a tmpfs of the
    lab's on the run folder and on /run/netns while labs exist (topo/memfs.py: each file there costs up to
    0.6 ms on this project's VM right after a `lab down`, and a pod has four). Only when the run folder is
    empty (no lab, no lab's command under way) and only on an empty /run/netns, so nothing anyone keeps
    there gets hidden; two commands decide one after the other (a lock on the folder itself)."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    if memfs.in_memory(str(RUN_DIR)):
        return
    fd = os.open(RUN_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the folder beneath: a command that opens it after the mount skips
        if memfs.hold(str(RUN_DIR)):  # (a mount template made before this is made again: TEMPLATE_WITNESSES)
            if not netns.list_names():
                memfs.hold(netns.NETNS_DIR)
    finally:
        os.close(fd)


def release_run_dir() -> None:
    """The whole run folder once no lab is left and no other lab's command is under way (one may be building
    a lab that has no state file yet), with the tmpfs mounts `prepare_run_dir` made: `lab down` of the last
    lab, `lab clean`."""
    with locked():
        if known_labs() or _locks_held():
            return
        memfs.release(str(RUN_DIR))
        shutil.rmtree(RUN_DIR, ignore_errors=True)  # what is on disk (or the empty folder beneath the mount)
        if not netns.list_names():
            memfs.release(netns.NETNS_DIR)


def _locks_held() -> bool:
    """Whether any lab's lock is held right now (tried without waiting)."""
    for path in (RUN_DIR / LOCKS).glob("*") if (RUN_DIR / LOCKS).is_dir() else ():
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False
