"""Network namespaces created, entered and removed from inside this process.

Spawning one `ip` per operation, or letting pyroute2 fork a helper per namespace, costs 10-30 ms a pod
(see the project's kernel notes); entering a namespace with setns(2) in-process and opening a plain
netlink socket there costs well under a millisecond. Namespaces are pinned as bind mounts under
/run/netns, exactly where `ip netns` looks, so `ip netns exec` and `ip -n` work on every lab object.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from topo.rtnl import Rtnl

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNS = 0x00020000
CLONE_FS = 0x00000200
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 2

# The C library the interpreter itself runs on (dlopen(NULL)): ctypes.util.find_library would run
# `ldconfig -p` in a subprocess, a fork of this process in every command, only to name the same library.
_libc = ctypes.CDLL(None, use_errno=True)
_home_fd: int | None = None


def libc() -> ctypes.CDLL:
    """The C library, for the few calls Python's os module lacks (prctl)."""
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _other_threads() -> list[str]:
    """The names the kernel shows for this process's other threads, for a message."""
    out = []
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != threading.get_native_id():
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm") as fh:
                out.append(fh.read().strip())
    return out


def setns(fd: int, nstype: int = 0) -> None:
    if nstype & CLONE_NEWNS:
        _single_threaded(lambda: _libc.setns(fd, nstype), "setns")
    else:
        _check(_libc.setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    if flags & CLONE_NEWNS:
        _single_threaded(lambda: _libc.unshare(flags), "unshare")
    else:
        _check(_libc.unshare(flags), "unshare")


def _single_threaded(call: Callable[[], int], what: str, wait: float = 2.0) -> None:
    """Entering or making a mount namespace: the kernel refuses it (EINVAL) while another thread of this
    process shares its filesystem attributes (setns(2), unshare(2)). A thread Python has joined may still be
    leaving the kernel for a moment (a pool of parallel loads just finished), so wait for it; a thread that
    stays is a bug of ours, told as such."""
    deadline = time.monotonic() + wait
    alone = 0  # failed calls with no other thread listed: the first may have raced the thread's exit
    while True:
        if call() == 0:
            return
        err = ctypes.get_errno()
        others = len(os.listdir("/proc/self/task")) - 1
        alone = alone + 1 if others == 0 else 0
        if err != errno.EINVAL or alone > 1:
            raise OSError(err, f"{what}: {os.strerror(err)}")
        if time.monotonic() > deadline:
            raise OSError(err, f"{what} of a mount namespace: {others} other thread(s) of this process are still "
                               f"running ({', '.join(_other_threads())}), and the kernel allows it only to a "
                               "single-threaded process")
        time.sleep(0.001)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def _mount(src: str, target: str, fstype: str | None, flags: int) -> int:
    return _libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None, flags, None)


def make_slave(target: str) -> None:
    """After unshare(CLONE_NEWNS): mounts made here stay here, while unmounts on the machine still reach
    here (as `ip netns exec` does), so a long-lived copy never keeps another lab's pins alive."""
    _check(_mount("", target, "none", MS_REC | MS_SLAVE), f"mount --make-rslave {target}")


def remount_sys() -> None:
    """Give this process a /sys of its current network namespace, as `ip netns exec` does.

    sysfs shows the devices of the namespace that mounted it, so without this `ls /sys/class/net` or
    `brctl show` inside a node would list the machine's own interfaces. Call after unshare(CLONE_NEWNS)
    and make_slave("/"), so the change stays with this process.
    """
    _libc.umount2(b"/sys", MNT_DETACH)
    _check(_mount("sysfs", "/sys", "sysfs", 0), "mount sysfs")


def umount_detached(target: str) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH) != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        _check(-1, f"umount {target}")


def bind_mount(source: str, target: str) -> None:
    _check(_mount(source, target, "none", MS_BIND), f"mount --bind {source} {target}")


_template: int | None = None
_template_seen: tuple[int, ...] = ()
# Folders whose mount may change while a process lives (the run folder's tmpfs, apiserver/state.py): a
# template copied before the change would show pods the folder as it was, so it is made afresh.
TEMPLATE_WITNESSES: list[str] = []


def _witnessed() -> tuple[int, ...]:
    return tuple(_device(p) for p in TEMPLATE_WITNESSES)


def forget_template() -> None:
    """Drop this process's mount template: the next pod or shell copies the machine's table again."""
    global _template
    if _template is not None:
        os.close(_template)
        _template = None


def mount_template() -> int:
    """A mount namespace to copy new mount namespaces from: the machine's, minus /run/netns and /sys.

    A new mount namespace copies every mount of the one it comes from, and each pinned network namespace is
    a mount under /run/netns: with ten thousand pins on the machine, one copy (and its teardown when its last
    process exits) costs tens of ms. Pods and Mininet's node shells never need those pins, so their mount
    namespaces are copied from this one. Each pod mounts a sysfs of its own on /sys (and Mininet's mnexec
    does the same for its shells): the machine's /sys and the dozen cgroup hierarchies under it go here
    once, instead of being copied into every new namespace and detached again there (1 ms a pod)."""
    global _template, _template_seen
    seen = _witnessed()
    if seen != _template_seen:
        forget_template()
    if _template is None:
        with _coming_back():
            unshare(CLONE_NEWNS)
            make_slave("/")
            while _libc.umount2(NETNS_DIR.encode(), MNT_DETACH) == 0:
                pass  # every mount there: `ip netns`'s bind of the folder may lie beneath a tmpfs (memfs.py)
            umount_detached("/sys")
            _template = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        _template_seen = seen
    return _template


def has_template() -> bool:
    """Whether this process has its mount template already (`mount_template` or `template_from`)."""
    return _template is not None


def template_from(pid: int, drop: Sequence[str]) -> None:
    """Make `mount_template` a copy of process `pid`'s mount namespace minus the mounts at `drop`, unless
    there is one already: the caller knows `pid` started from a template and what it mounted since (a
    pod's pause process). Its table is a few dozen mounts, so the copy costs well under a millisecond where
    one of the machine's costs 27 ms with 10,000 pins (strace of a one-pod `lab apply`).

    Anything else mounted there since (`mount` run in that pod through `lab exec`) would reach every pod
    made from the copy: each mount the copy keeps must be the machine's own at that place (same device,
    seen from both), else the copy is dropped and `mount_template` makes one from the machine's."""
    global _template, _template_seen
    if _template is not None:
        return
    # Entering a mount namespace needs filesystem attributes this thread does not share (a library's thread,
    # OpenBLAS's under matplotlib, would otherwise refuse it): what unshare(CLONE_NEWNS) does implicitly in
    # `mount_template`, done here first.
    unshare(CLONE_FS)
    with _coming_back():
        source = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(source, CLONE_NEWNS)
        finally:
            os.close(source)
        unshare(CLONE_NEWNS)
        for target in drop:
            umount_detached(target)
        copy = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        devices = _mount_devices()
    if devices and devices == {point: _device(point) for point in devices}:  # the same, seen from here
        _template, _template_seen = copy, _witnessed()
    else:
        os.close(copy)


def _mount_devices() -> dict[str, int]:
    """Each mount point of this thread's mount namespace and the device seen there."""
    out = {}
    with open("/proc/thread-self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            point = unescape_mount_point(line.split(" ", 5)[4])
            out[point] = _device(point)
    return out


def unescape_mount_point(field: str) -> str:
    """A mount point as /proc/PID/mountinfo writes it, back to its path."""
    return _MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m[1], 8)), field)


def _device(point: str) -> int:
    try:
        return os.stat(point, follow_symlinks=False).st_dev
    except OSError:
        return -1


_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes space, tab, newline, backslash as \ooo


@contextlib.contextmanager
def in_mount_template() -> Iterator[None]:
    """Run a block (single-threaded) in `mount_template`'s namespace: processes it starts copy the small
    table; it returns to this process's own mount namespace and working folder, whatever happens."""
    template = mount_template()
    with _coming_back():
        setns(template, CLONE_NEWNS)
        yield


@contextlib.contextmanager
def _coming_back() -> Iterator[None]:
    """A block that enters or makes mount namespaces: the thread is back in its own, and in its working
    folder (entering a mount namespace moves it to that namespace's /), whatever happens."""
    home = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    cwd = os.open(".", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            yield
        finally:
            setns(home, CLONE_NEWNS)
            os.fchdir(cwd)
    finally:
        os.close(home)
        os.close(cwd)


def home_fd() -> int:
    """A handle on the namespace this process started in, to come back to after every setns."""
    global _home_fd
    if _home_fd is None:
        _home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    return _home_fd


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def ensure_dir() -> None:
    """Make /run/netns a shared mount point, as `ip netns add` does, so pins propagate."""
    os.makedirs(NETNS_DIR, exist_ok=True)
    if _mount("", NETNS_DIR, "none", MS_SHARED | MS_REC) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:
        _check(-1, f"mount --make-shared {NETNS_DIR}")
    _check(_mount(NETNS_DIR, NETNS_DIR, "none", MS_BIND | MS_REC), f"mount --bind {NETNS_DIR}")
    _check(_mount("", NETNS_DIR, "none", MS_SHARED | MS_REC), f"mount --make-shared {NETNS_DIR}")


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def _pin(source: str, name: str) -> None:
    target = path(name)
    fd = os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
    os.close(fd)
    if _mount(source, target, "none", MS_BIND) != 0:
        err = ctypes.get_errno()
        os.unlink(target)
        raise OSError(err, f"pin namespace {name}: {os.strerror(err)}")


def pin_pid(name: str, pid: int) -> None:
    """Keep a process's namespace alive under a name (what `ip netns attach NAME PID` does).

    Refuses the machine's own namespace: should the process have died and its pid been reused, the
    pin would otherwise name the root namespace, and tearing the lab down would stop every process there.
    """
    source = f"/proc/{pid}/ns/net"
    if os.stat(source).st_ino in protected_inodes():
        raise OSError(errno.EINVAL, f"refusing to pin the root network namespace as {name} (pid {pid})")
    _pin(source, name)


def protected_inodes() -> set[int]:
    """Namespaces no lab may ever own: the one this process started in, and PID 1's where readable."""
    inodes = {os.fstat(home_fd()).st_ino}
    try:
        inodes.add(os.stat("/proc/1/ns/net").st_ino)
    except OSError:
        pass  # some sandboxes hide PID 1's namespaces even from root
    return inodes


def create(name: str) -> None:
    """Create a new, empty, pinned namespace; the calling thread stays where it was."""
    home_fd()
    unshare(CLONE_NEWNET)
    try:
        _pin("/proc/thread-self/ns/net", name)
    finally:
        setns(home_fd(), CLONE_NEWNET)


def delete(name: str) -> bool:
    """Unpin a namespace; the kernel frees it once no process or socket holds it. Missing is fine."""
    target = path(name)
    umount_detached(target)
    try:
        os.unlink(target)
    except FileNotFoundError:
        return False
    return True


def list_names(prefix: str = "") -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def inode(name: str) -> int | None:
    """The namespace a pin holds, or None: missing, not a namespace (a pin file left empty by a crash
    between its creation and its mount), or a protected namespace."""
    try:
        st = os.stat(path(name))
    except OSError:
        return None
    if st.st_dev != os.fstat(home_fd()).st_dev or st.st_ino in protected_inodes():
        return None
    return st.st_ino


def entered(name: str) -> contextlib.AbstractContextManager[None]:
    """Run a block inside a named namespace; always return to the starting one."""
    return entered_path(path(name))


def _resolve(name_or_path: str) -> str:
    """A pinned namespace's name (under /run/netns) or any namespace file's path (CNI_NETNS, /proc/PID/ns/net)."""
    return name_or_path if name_or_path.startswith("/") else path(name_or_path)


def open_fd(name_or_path: str) -> int:
    return os.open(_resolve(name_or_path), os.O_RDONLY | os.O_CLOEXEC)


def rtnl_in(name_or_path: str) -> Rtnl:
    """A netlink handle bound to a namespace: the socket is opened while inside it, then we leave.

    The handle keeps working after we return to the starting namespace, because a netlink socket
    belongs to the namespace it was created in. Close it when done: an open handle keeps a deleted
    namespace (and its veth) alive.
    """
    with entered_path(_resolve(name_or_path)):
        return Rtnl()


@contextlib.contextmanager
def entered_path(target: str) -> Iterator[None]:
    """Like `entered`, for a namespace given by file path (CNI_NETNS, /proc/PID/ns/net)."""
    home_fd()
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd, CLONE_NEWNET)
        try:
            yield
        finally:
            setns(home_fd(), CLONE_NEWNET)
    finally:
        os.close(fd)
