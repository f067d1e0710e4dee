"""The kubelet and container-runtime role: pod sandboxes (pause) and containers as plain processes.

A Kubernetes pod is a network namespace (and a UTS namespace: `hostname` prints the pod name) held open
by a pause process, which every container of the pod joins, so they share one IP and one localhost.
Here a container is a process started inside those namespaces; there are no images. Processes are
spawned from this process after setns(2) (posix_spawn inherits the calling thread's namespaces), which
is what keeps a thousand pods fast, and with setsid, so they outlive `lab up` (see topo/process.py). A
spec's container runs as its securityContext's user (nobody unless it asks for root) with its capabilities,
set by setpriv just before the program runs (`confined`).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from kubelet import cgroups
from topo import netns, process
from topo.errors import ApplyError
from topo.model import Container, Pod, SecurityContext

PAUSE_NAME = "pause"
# Kubernetes' pause image is a tiny static C program that sleeps in pause(2) until a signal ends it (its
# SIGINT/SIGTERM handlers exit; SIGCHLD reaping matters only as PID 1 of a shared PID namespace, which
# pods here do not have, and the default action of SIGTERM/SIGINT ends the process as well). The same in
# x86-64 machine code: `mov eax, 34 (pause); syscall; jmp back`, in the smallest executable ELF file (one
# loadable segment, no sections). Coreutils sleep does the same but is dynamically linked: its loader costs
# 0.5-0.6 ms of CPU a start here (0.69 against 0.18 ms, 1,000 starts of each), five seconds of a
# 10,000-pod `lab up`.
_PAUSE_CODE = bytes.fromhex("b822000000" "0f05" "ebf7")
_ELF_BASE = 0x400000
_ELF_HEADERS = 64 + 56  # the ELF header, one program header


def _pause_elf() -> bytes:
    size = _ELF_HEADERS + len(_PAUSE_CODE)
    header = (b"\x7fELF" + bytes((2, 1, 1, 0)) + bytes(8)  # 64-bit, little-endian, version 1, System V ABI
              + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, _ELF_BASE + _ELF_HEADERS, 64, 0, 0, 64, 56, 1, 0, 0, 0))
    segment = struct.pack("<IIQQQQQQ", 1, 5, 0, _ELF_BASE, _ELF_BASE, size, size, 0x1000)  # PT_LOAD, R+X
    return header + segment + _PAUSE_CODE


def pause_binary(bin_dir: Path) -> tuple[str, ...]:
    """The argv of a `pause` process: the ELF file above on x86-64 where `bin_dir` may hold programs (not on a
    file system mounted noexec), else coreutils sleep exec'd through a link named pause. The kernel names a
    process after the file it executed, so `ps` shows `pause` as on a real node, without a Python interpreter
    per pod (a thousand pods must stay cheap)."""
    path = bin_dir / PAUSE_NAME
    bin_dir.mkdir(parents=True, exist_ok=True)
    if os.uname().machine == "x86_64" and not os.statvfs(bin_dir).f_flag & os.ST_NOEXEC:
        elf = _pause_elf()
        if path.is_symlink() or not path.is_file() or path.read_bytes() != elf:  # new, or an older tool's link
            _replace(path, lambda tmp: (tmp.write_bytes(elf), tmp.chmod(0o755)))
        return (str(path),)
    if not path.is_symlink():
        sleep = shutil.which("sleep")
        if sleep is None:
            raise ApplyError("coreutils 'sleep' not found")
        _replace(path, lambda tmp: tmp.symlink_to(os.path.realpath(sleep)))
    return (str(path), "infinity")


def _replace(path: Path, make: Callable[[Path], object]) -> None:
    """Write the file at a temporary name and rename it over `path`: a pod starting meanwhile (another lab's
    command) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    make(tmp)
    os.replace(tmp, path)


POD_FILES = ("resolv.conf", "hosts")  # what kubelet writes for each pod and mounts into its containers


@contextlib.contextmanager
def _in_pod(pod_netns: str, pause_pid: int | None = None, hostname: str | None = None,
            files: Path | None = None, sysfs: bool = True) -> Iterator[None]:
    """Inside a pod's network, UTS and mount namespaces: those of its pause process (`pause_pid`), or,
    for the pause process itself, new ones: the host name set to the pod's name, and a private mount
    namespace with the pod's own /etc/resolv.conf and /etc/hosts (from `files`) and, with `sysfs`, a /sys
    showing the pod's interfaces (else `ensure_sysfs` mounts it when someone first enters the pod). The
    calling thread always returns to where it was."""
    homes = {flag: os.open(f"/proc/thread-self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
             for kind, flag in (("uts", netns.CLONE_NEWUTS), ("mnt", netns.CLONE_NEWNS))}
    cwd = os.open(".", os.O_RDONLY | os.O_CLOEXEC)  # entering a mount namespace moves us to its /
    joined: list[int] = []
    try:
        with netns.entered(pod_netns):
            try:
                if pause_pid is not None:
                    for kind, flag in (("uts", netns.CLONE_NEWUTS), ("mnt", netns.CLONE_NEWNS)):
                        fd = os.open(f"/proc/{pause_pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
                        joined.append(fd)
                        netns.setns(fd, flag)
                else:
                    netns.setns(netns.mount_template(), netns.CLONE_NEWNS)  # the machine's, minus the pins
                    netns.unshare(netns.CLONE_NEWUTS | netns.CLONE_NEWNS)
                    if hostname is not None:
                        netns.sethostname(hostname)
                    if sysfs:
                        netns.remount_sys()
                    for name, target in _file_targets() if files is not None else ():
                        if os.path.isfile(target):
                            netns.bind_mount(str(files / name), target)  # type: ignore[operator]
                yield
            finally:
                try:
                    netns.setns(homes[netns.CLONE_NEWNS], netns.CLONE_NEWNS)
                finally:
                    netns.setns(homes[netns.CLONE_NEWUTS], netns.CLONE_NEWUTS)
                    os.fchdir(cwd)
    finally:
        for fd in [*homes.values(), *joined, cwd]:
            os.close(fd)


def _file_targets() -> list[tuple[str, str]]:
    """Where each of POD_FILES is mounted in a pod: the machine's file, through its symbolic links."""
    return [(name, os.path.realpath(f"/etc/{name}")) for name in POD_FILES]


def template_from_sandboxes(sandboxes: Iterable[tuple[str, int]]) -> None:
    """Before a pod is made in a lab that runs others: the template new pods' mount namespaces are copied
    from, taken from a running pause process (`netns.template_from`, which drops what `_in_pod` mounted
    there) rather than from the machine's table, which holds a mount per pinned namespace. The first pod
    (netns, pause pid) still in its sandbox is used; none alive leaves it to the machine's. Once this process
    has a template, nothing is looked at (a Deployment's pods are made one after the other)."""
    if netns.has_template():
        return
    for pod_netns, pause_pid in sandboxes:
        if sandbox_alive(pod_netns, pause_pid):
            netns.template_from(pause_pid, [target for _, target in _file_targets()] + ["/sys"])
            return


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000  # linux/fs.h


def make_pods_folder(folder: Path) -> None:
    """The folder of every pod's folder, marked as the top of a directory hierarchy (`chattr +T`), where the
    file system has the flag (ext4): its subfolders are then spread over the disk's block groups (ext4's
    Orlov allocator), instead of all going to the group of their parent. On ext4 without a journal (a /run
    that is not a tmpfs, as on this project's VM), a new inode is looked for from the start of its group,
    past every inode deleted in the last seconds (fs/ext4/ialloc.c, recently_deleted), and a `lab down` has
    just deleted thousands there: 1,000 pods' files took 0.74-1.0 s in one group, 0.09-0.11 s spread.
    Elsewhere (tmpfs) the flag does not exist and nothing changes."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(4)))[0]  # an int, whatever the name says
        if not flags & FS_TOPDIR_FL:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags | FS_TOPDIR_FL))
    except OSError:
        pass  # no such flag here (tmpfs, overlayfs): the folders go where the file system puts them
    finally:
        os.close(fd)


def write_pod_files(folder: Path, resolv_conf: str, hosts: str | None = None) -> None:
    """The pod's resolv.conf and hosts, written in place: containers see the bind-mounted files change."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("resolv.conf", resolv_conf), ("hosts", hosts)):
        if text is not None or not (folder / name).exists():
            with open(folder / name, "w") as fh:  # same inode: a bind mount keeps showing it
                fh.write(text or "")


def start_sandbox(pod_netns: str, hostname: str, pause: tuple[str, ...], files: Path | None = None,
                  sysfs: bool = True) -> int:
    """Start the pause process in the pod's network namespace and new UTS and mount namespaces.

    `sysfs` False: the pod's /sys is left unmounted until someone enters the pod (`ensure_sysfs`), for a pod
    that runs no process of its own (only the pause image). Each sysfs mount is a superblock of its network
    namespace, and the kernel looks through all of them on every new one: 1 ms a pod at 1,000 pods, 20 ms at
    10,000 (three minutes of a 10,000-pod `lab up`), for a /sys nobody would read."""
    with _in_pod(pod_netns, hostname=hostname, files=files, sysfs=sysfs):
        return process.spawn(pause, None)


def start_container(pod_netns: str, pause_pid: int, container: Container, log: Path,
                    lab: str | None = None) -> int | None:
    """Start a container's process in the pod's namespaces (those of its pause process); with a CPU limit,
    in its cgroup of `lab`'s tree (kubelet/cgroups.py)."""
    if not container.argv:
        return None  # the `pause` image: the sandbox's own pause process is the container
    if not sandbox_alive(pod_netns, pause_pid):
        raise ApplyError(f"pause process {pause_pid} of {pod_netns} is gone")
    log.parent.mkdir(parents=True, exist_ok=True)
    argv, env = container.argv, dict(container.env)
    if container.security is not None:
        argv = confined(container.argv, container.security)
        env = {"HOME": "/", **env} if not container.security.root else env
    with _in_pod(pod_netns, pause_pid):
        pid = process.spawn(argv, str(log), env)
    if container.cpu_limit_millis is not None and lab is not None:
        try:
            cgroups.limit(lab, pod_netns, container.name, pid, container.cpu_limit_millis)
        except BaseException:
            process.kill_all([pid])
            raise
    return pid


def confined(argv: tuple[str, ...], security: SecurityContext) -> tuple[str, ...]:
    """`argv` run as `security` says: through setpriv (util-linux), which sets the user, the group (no
    supplementary groups) and the capabilities, then executes the program: one exec, no extra process.

    The program is found here, on this process's PATH, so a missing one fails `lab up` with its name."""
    exe = argv[0] if "/" in argv[0] else shutil.which(argv[0])
    if exe is None:
        raise ApplyError(f"command {argv[0]!r} not found on this machine")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise ApplyError("setpriv (util-linux) not found: it runs containers as their securityContext's user")
    caps = ",".join(f"+{c.lower()}" for c in security.capabilities)
    ambient = ",".join(f"+{c.lower()}" for c in security.ambient)
    flags = [f"--reuid={security.run_as_user}", f"--regid={security.run_as_group}", "--clear-groups",
             f"--bounding-set=-all{',' + caps if caps else ''}", f"--inh-caps=-all{',' + ambient if ambient else ''}"]
    if ambient:
        flags.append(f"--ambient-caps=-all,{ambient}")
    if security.no_new_privs:
        flags.append("--no-new-privs")
    return (setpriv, *flags, "--", exe, *argv[1:])


def sandbox_alive(pod_netns: str, pause_pid: int) -> bool:
    """The pause process lives, and is still the one in this pod (a pid can be reused after a crash)."""
    return in_pod(pause_pid, pod_netns)


def in_pod(pid: int, pod_netns: str) -> bool:
    """`pid` is alive and inside this pod's network namespace: safe to signal as one of the pod's."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == netns.inode(pod_netns) and process.alive(pid)
    except OSError:
        return False


def needs_sysfs(pod: Pod) -> bool:
    """Whether a pod runs a process of its own (a container with a command) that could read /sys."""
    return any(c.argv for c in pod.containers)


def ensure_sysfs() -> None:
    """After joining a pod's namespaces (`lab exec`, graders): its /sys, mounted now if the pod was made
    without one (`start_sandbox`). Mounted in the pod's own mount namespace, so it stays for every later
    process of the pod."""
    if not os.path.ismount("/sys"):
        netns.remount_sys()


def sandboxes_alive(sandboxes: dict[str, tuple[str, int]]) -> dict[str, bool]:
    """`sandbox_alive` for many pods at once (key -> (netns, pause pid)): two stats a pod, the machine's own
    namespaces looked up once. A process that has exited (a zombie too) has no namespace links any more, so
    the stat of /proc/PID/ns/net alone tells it is alive; `lab status` and every change look at all pods,
    which cost 55 ms a thousand pods one by one."""
    home = os.fstat(netns.home_fd())
    protected = netns.protected_inodes()
    out = {}
    for key, (pod_netns, pid) in sandboxes.items():
        try:
            pin = os.stat(netns.path(pod_netns))
            out[key] = (pin.st_dev == home.st_dev and pin.st_ino not in protected
                        and os.stat(f"/proc/{pid}/ns/net").st_ino == pin.st_ino)
        except OSError:
            out[key] = False
    return out


def start_pod_containers(pod: Pod, pod_netns: str, pause_pid: int, logs: Path, lab: str | None = None) -> dict[str, int]:
    pids: dict[str, int] = {}
    for container in pod.containers:
        pid = start_container(pod_netns, pause_pid, container, logs / f"{pod.namespace}_{pod.name}_{container.name}.log",
                              lab)
        if pid is not None:
            pids[container.name] = pid
    return pids


def remove_sandbox(pod_netns: str) -> None:
    """Stop every process in a pod's namespace (pause and containers), then unpin the namespace."""
    inode = netns.inode(pod_netns)
    if inode is not None:
        process.kill_all(process.pids_in_netns([inode]))
    netns.delete(pod_netns)
