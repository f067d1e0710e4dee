"""The kubelet and container-runtime role: pod sandboxes (pause) and containers as plain processes.

A Kubernetes pod is a network namespace (and a UTS namespace: `hostname` prints the pod name) held open
by a pause process, which every container of the pod joins, so they share one IP and one localhost.
Here a container is a process started inside those namespaces; there are no images. Processes are
spawned from this process after setns(2) (posix_spawn inherits the calling thread's namespaces), which
is what keeps a thousand pods fast, and with setsid, so they outlive `lab up` (see topo/process.py).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from topo import netns, process
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


@contextlib.contextmanager
def _pod_uts(pod_netns: str, join: int | None, hostname: str | None = None) -> Iterator[None]:
    """Inside the pod's network namespace and its UTS namespace: a new one named `hostname`, or the one
    `join` (an fd) refers to. The calling thread always returns to where it was."""
    uts_home = os.open("/proc/thread-self/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with netns.entered(pod_netns):
            if join is not None:
                netns.setns(join, netns.CLONE_NEWUTS)
            else:
                netns.unshare(netns.CLONE_NEWUTS)
            try:
                if hostname is not None:
                    netns.sethostname(hostname)
                yield
            finally:
                netns.setns(uts_home, netns.CLONE_NEWUTS)
    finally:
        os.close(uts_home)


def start_sandbox(pod_netns: str, hostname: str, pause: str) -> int:
    """Start the pause process in the pod's network namespace and a new UTS namespace named after the pod."""
    with _pod_uts(pod_netns, None, hostname):
        return process.spawn((pause, "infinity"), None)


def start_container(pod_netns: str, pause_pid: int, container: Container, log: Path) -> int | None:
    """Start a container's process in the pod's namespaces (those of its pause process)."""
    if not container.argv:
        return None  # the `pause` image: the sandbox's own pause process is the container
    if not sandbox_alive(pod_netns, pause_pid):
        raise ApplyError(f"pause process {pause_pid} of {pod_netns} is gone")
    uts = os.open(f"/proc/{pause_pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _pod_uts(pod_netns, uts):
            log.parent.mkdir(parents=True, exist_ok=True)
            return process.spawn(container.argv, str(log), dict(container.env))
    finally:
        os.close(uts)


def sandbox_alive(pod_netns: str, pause_pid: int) -> bool:
    """The pause process lives, and is still the one in this pod (a pid can be reused after a crash)."""
    try:
        return os.stat(f"/proc/{pause_pid}/ns/net").st_ino == netns.inode(pod_netns) and process.alive(pause_pid)
    except OSError:
        return False


def start_pod_containers(pod: Pod, pod_netns: str, pause_pid: int, logs: Path) -> dict[str, int]:
    pids: dict[str, int] = {}
    for container in pod.containers:
        pid = start_container(pod_netns, pause_pid, container, logs / f"{pod.namespace}_{pod.name}_{container.name}.log")
        if pid is not None:
            pids[container.name] = pid
    return pids
