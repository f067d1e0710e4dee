"""The kubelet and container-runtime role: pod sandboxes (pause) and containers as plain processes.

A Kubernetes pod is a network namespace (and a UTS namespace: `hostname` prints the pod name) held open
by a pause process, which every container of the pod joins, so they share one IP and one localhost.
Here a container is a process started inside those namespaces; there are no images. Processes are
spawned from this process after setns(2) (posix_spawn inherits the calling thread's namespaces), which
is what keeps a thousand pods fast, and with setsid, so they outlive `lab up`.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from topo import netns
from topo.errors import ApplyError
from topo.model import Container, Pod

PAUSE_NAME = "pause"


def pause_binary(bin_dir: Path) -> str:
    """A `pause` command: coreutils sleep, exec'd through a link named pause.

    The kernel names a process after the file it executed, so `ps` shows `pause` as on a real node,
    without a compiled binary or a Python interpreter per pod (a thousand pods must stay cheap).
    """
    link = bin_dir / PAUSE_NAME
    if not link.exists():
        sleep = shutil.which("sleep")
        if sleep is None:
            raise ApplyError("coreutils 'sleep' not found")
        bin_dir.mkdir(parents=True, exist_ok=True)
        tmp = bin_dir / f".{PAUSE_NAME}.{os.getpid()}"
        os.symlink(os.path.realpath(sleep), tmp)
        os.replace(tmp, link)
    return str(link)


def _spawn(argv: tuple[str, ...] | list[str], log: str | None) -> int:
    exe = argv[0] if "/" in argv[0] else shutil.which(argv[0])
    if exe is None:
        raise ApplyError(f"command {argv[0]!r} not found on this machine")
    out = log or os.devnull
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": "/root",
           "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "LANG": "C.UTF-8"}
    return os.posix_spawn(exe, list(argv), env, file_actions=actions, setsid=True)


def start_sandbox(pod_netns: str, hostname: str, pause: str) -> int:
    """Start the pause process in the pod's network namespace and a new UTS namespace named after the pod."""
    uts_home = os.open("/proc/thread-self/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with netns.entered(pod_netns):
            netns.unshare(netns.CLONE_NEWUTS)
            try:
                netns.sethostname(hostname)
                return _spawn((pause, "infinity"), None)
            finally:
                netns.setns(uts_home, netns.CLONE_NEWUTS)
    finally:
        os.close(uts_home)


def start_container(pod_netns: str, pause_pid: int, container: Container, log: Path) -> int | None:
    """Start a container's process in the pod's namespaces (those of its pause process)."""
    if not container.argv:
        return None  # the `pause` image: the sandbox's own pause process is the container
    uts_home = os.open("/proc/thread-self/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    try:
        uts = os.open(f"/proc/{pause_pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        os.close(uts_home)
        raise ApplyError(f"pause process {pause_pid} of {pod_netns} is gone") from exc
    try:
        with netns.entered(pod_netns):
            netns.setns(uts, netns.CLONE_NEWUTS)
            try:
                log.parent.mkdir(parents=True, exist_ok=True)
                return _spawn(container.argv, str(log))
            finally:
                netns.setns(uts_home, netns.CLONE_NEWUTS)
    finally:
        os.close(uts)
        os.close(uts_home)


def start_pod_containers(pod: Pod, pod_netns: str, pause_pid: int, logs: Path) -> dict[str, int]:
    pids: dict[str, int] = {}
    for container in pod.containers:
        pid = start_container(pod_netns, pause_pid, container, logs / f"{pod.namespace}_{pod.name}_{container.name}.log")
        if pid is not None:
            pids[container.name] = pid
    return pids


def pids_in_netns(inodes: Iterable[int]) -> list[int]:
    """Every process whose network namespace is one of `inodes` (found via /proc, not by name)."""
    wanted = set(inodes)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino in wanted:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_all(pids: list[int], grace: float = 1.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL what is left; reap our own children."""
    me = os.getpid()
    pids = [p for p in pids if p != me]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    alive = pids
    while alive and time.monotonic() < deadline:
        _reap()
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.01)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while alive:
        _reap()
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.005)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
