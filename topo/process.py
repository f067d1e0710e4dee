"""Processes inside lab namespaces: started from this process, found and stopped by namespace.

Anything a lab runs (pause, containers, FRR daemons) is spawned after setns(2) into the target namespace
(posix_spawn inherits the calling thread's namespaces), in a new session so it outlives the command
that started it, and is later found by the namespace it lives in, never by its name.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from topo import netns
from topo.errors import ApplyError


def spawn(argv: tuple[str, ...] | list[str], log: str | None, env: dict[str, str] | None = None) -> int:
    """Start `argv` (never through a shell) in the calling thread's namespaces, output to `log`.

    The environment is a small fixed one plus `env` (a container's own variables), not this process's.
    """
    exe = argv[0] if "/" in argv[0] else shutil.which(argv[0])
    if exe is None:
        raise ApplyError(f"command {argv[0]!r} not found on this machine")
    out = log or os.devnull
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    base = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": "/root", "LANG": "C.UTF-8"}
    if os.environ.get("PYTHONPATH"):
        base["PYTHONPATH"] = os.environ["PYTHONPATH"]
    with on_this_cpu():  # a block of its own, or the caller's (the child gets its CPUs back at the block's end)
        pid = os.posix_spawn(exe, list(argv), {**base, **(env or {})}, file_actions=actions, setsid=True)
        children = getattr(_pinned, "children", None)
        if children is not None:
            children.append(pid)
    return pid


_pinned = threading.local()  # .children: pids spawned inside `on_this_cpu` on this thread


@contextlib.contextmanager
def on_this_cpu() -> Iterator[None]:
    """Keep the calling thread on the CPU it runs on for a block of spawns (`spawn` makes one of its own when
    not inside one); every process spawned in the block gets the thread's usual CPUs back when it ends (it
    inherited the one CPU).

    posix_spawn is a vfork: this thread sleeps until the child has exec'd, and the kernel starts a new task
    on the least loaded CPU, which is the other one as soon as anything else runs there; the child then
    waits behind that (4-4.5 ms a spawn measured with a busy second core, 0.9-1.1 ms on this thread's own,
    idle while it waits). A spawn's own block frees its child at once, so what the child does after its
    exec (0.8 ms of CPU for coreutils sleep) can go to the other core."""
    if getattr(_pinned, "children", None) is not None:  # nested: the outer block does it
        yield
        return
    cpu = netns.libc().sched_getcpu()
    try:
        cpus = os.sched_getaffinity(0)
    except OSError:
        cpus = set()
    if cpu < 0 or len(cpus) < 2 or cpu not in cpus:
        yield
        return
    os.sched_setaffinity(0, {cpu})
    _pinned.children = children = []
    try:
        yield
    finally:
        _pinned.children = None
        os.sched_setaffinity(0, cpus)
        for pid in children:
            with contextlib.suppress(OSError):  # the child may have exited already
                os.sched_setaffinity(pid, cpus)


def spawn_in(ns: str, argv: tuple[str, ...] | list[str], log: str | None) -> int:
    """Start a process inside a named network namespace."""
    with netns.entered(ns):
        return spawn(argv, log)


def pids_in_netns(inodes: Iterable[int]) -> list[int]:
    """Every process whose network namespace is one of `inodes` (found via /proc, not by name).

    The root namespace is never a match, whatever the caller passes.
    """
    wanted = set(inodes) - netns.protected_inodes()
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
    left = pids
    while left and time.monotonic() < deadline:
        _reap()
        left = [p for p in left if alive(p)]
        if left:
            time.sleep(0.01)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while left:
        _reap()
        left = [p for p in left if alive(p)]
        if left:
            time.sleep(0.005)


def alive(pid: int) -> bool:
    """Running (a zombie, waiting for its parent or PID 1 to reap it, no longer counts)."""
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


PR_SET_PDEATHSIG = 1


_FRAME = struct.Struct("<cI")  # kind (b"i" an item, b"o" returned, b"e" a pickled exception, b"t" its text), length


class Forked:
    """A function running in a forked copy of this process (`fork_call`): what it yields as it goes
    (`ready`), everything once it has returned (`wait`), or `stop` it. Items and the end come through a pipe as
    frames, so the caller can take them between steps of its own work."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid, self._fd, self._buffer, self._items = pid, fd, b"", []
        self._end: tuple[bytes, bytes] | None = None

    def ready(self) -> list:
        """The items yielded since the last call, without waiting."""
        os.set_blocking(self._fd, False)
        try:
            while self._end is None and (chunk := os.read(self._fd, 1 << 16)):
                self._take(chunk)
        except BlockingIOError:
            pass
        finally:
            os.set_blocking(self._fd, True)
        items, self._items = self._items, []
        return items

    def wait(self) -> list:
        """Return once the function has returned in the copy, with the items not taken by `ready`; raise what
        it raised (or an ApplyError saying how it ended, when that cannot be carried over)."""
        try:
            while self._end is None and (chunk := os.read(self._fd, 1 << 16)):
                self._take(chunk)
        finally:
            self._close()
        status = self._reap()
        kind, data = self._end or (b"", b"")
        if kind == b"o":
            items, self._items = self._items, []
            return items
        if kind == b"e":
            raise pickle.loads(data)
        text = data.decode(errors="replace") if kind == b"t" else f"ended with status {status}"
        raise ApplyError(f"forked worker {self.pid}: {text}") from None

    def _take(self, chunk: bytes) -> None:
        self._buffer += chunk
        while len(self._buffer) >= _FRAME.size:
            kind, size = _FRAME.unpack_from(self._buffer)
            if len(self._buffer) < _FRAME.size + size:
                return
            data, self._buffer = self._buffer[_FRAME.size:_FRAME.size + size], self._buffer[_FRAME.size + size:]
            if kind == b"i":
                self._items.append(pickle.loads(data))
            else:
                self._end = (kind, data)

    def stop(self) -> None:
        """End the copy now (the caller is failing, and will remove what the copy would have worked on)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._close()
        self._reap()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _reap(self) -> int | None:
        try:
            return os.waitpid(self.pid, 0)[1]
        except ChildProcessError:  # reaped already (kill_all's _reap takes every child)
            return None


def fork_call(fn: Callable[[], Iterable[object] | None]) -> Forked:
    """Run `fn` in a forked copy of this process, on the machine's other core, while this one goes on; what
    it returns, if iterable, is iterated there and each item sent back (`Forked.ready`, `Forked.wait`).

    Not a thread: this process enters mount namespaces, which the kernel refuses to a process with a second
    thread (topo/netns.py `_single_threaded`); call it only while single-threaded (a fork copies one thread).
    The copy dies with this process (PR_SET_PDEATHSIG), so a crash of the command leaves no worker behind
    writing into a lab that is being removed. What `fn` raises is re-raised by `Forked.wait`."""
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the copy: never return into the caller's code, never run its atexit handlers
        code = 1
        try:
            os.close(read_fd)
            netns.libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
            for item in fn() or ():
                _send(write_fd, b"i", pickle.dumps(item))
            _send(write_fd, b"o", b"")
            code = 0
        except BaseException as exc:  # noqa: BLE001 (everything goes back to the parent)
            try:
                data = pickle.dumps(exc)
                pickle.loads(data)
                kind = b"e"
            except Exception:  # noqa: BLE001
                data, kind = f"{type(exc).__name__}: {exc}".encode(), b"t"
            try:
                _send(write_fd, kind, data)
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(write_fd)
    return Forked(pid, read_fd)


def _send(fd: int, kind: bytes, data: bytes) -> None:
    frame = memoryview(_FRAME.pack(kind, len(data)) + data)
    while frame:
        frame = frame[os.write(fd, frame):]
