"""A small binding of libbpf (`libbpf.so.1`, Debian's libbpf1) through ctypes: open an object with its
maps pinned in a folder, load it, attach its programs to a cgroup or a tc hook, and batch map operations.

Everything runs in this process: one load per node, one attach per device, one batched write per map
(never a process per entry or per attach: docs/cilium.md has the costs). libbpf's own messages are
collected, not printed, and the last of them is put into the error when a load fails (the verifier's
complaint).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import sys
from collections.abc import Iterator

from topo.errors import ApplyError, FeatureMissing

BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_TC_INGRESS, BPF_TC_EGRESS = 1, 2
BPF_ANY = 0
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_F_NO_PREALLOC = 1


class _OpenOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("object_name", ctypes.c_char_p), ("relaxed_maps", ctypes.c_bool),
                ("pin_root_path", ctypes.c_char_p), ("_stub", ctypes.c_uint32), ("kconfig", ctypes.c_char_p),
                ("btf_custom_path", ctypes.c_char_p), ("kernel_log_buf", ctypes.c_char_p),
                ("kernel_log_size", ctypes.c_size_t), ("kernel_log_level", ctypes.c_uint32)]


class _TcHook(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("ifindex", ctypes.c_int), ("attach_point", ctypes.c_int),
                ("parent", ctypes.c_uint32)]


class _TcOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("prog_fd", ctypes.c_int), ("flags", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("handle", ctypes.c_uint32), ("priority", ctypes.c_uint32)]


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _MapCreateOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
                ("numa_node", ctypes.c_uint32), ("map_ifindex", ctypes.c_uint32)]


class _TestRunOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int),
                ("duration", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_messages: list[str] = []


@_PRINT_FN
def _collect(level: int, fmt: bytes, args: int) -> int:  # libbpf's va_list cannot be formatted here
    _messages.append(fmt.decode(errors="replace").strip())
    return 0


@functools.lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    try:  # by its soname first: find_library runs `ldconfig -p` in a subprocess
        so = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError:
        try:
            so = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so", use_errno=True)
        except OSError as exc:
            raise FeatureMissing("cni.profile cilium needs libbpf (libbpf1; ./install.sh installs it)") from exc
    vp, i, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    for name, res, args in (
            ("bpf_object__open_file", vp, [ctypes.c_char_p, ctypes.POINTER(_OpenOpts)]),
            ("bpf_object__load", i, [vp]), ("bpf_object__close", None, [vp]),
            ("bpf_object__find_program_by_name", vp, [vp, ctypes.c_char_p]),
            ("bpf_object__find_map_by_name", vp, [vp, ctypes.c_char_p]),
            ("bpf_program__fd", i, [vp]), ("bpf_map__fd", i, [vp]),
            ("bpf_prog_attach", i, [i, i, i, u32]), ("bpf_prog_detach2", i, [i, i, i]),
            ("bpf_tc_hook_create", i, [ctypes.POINTER(_TcHook)]),
            ("bpf_tc_attach", i, [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)]),
            ("bpf_tc_query", i, [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)]),
            ("bpf_program__pin", i, [vp, ctypes.c_char_p]),
            ("bpf_obj_get", i, [ctypes.c_char_p]),
            ("bpf_obj_pin", i, [i, ctypes.c_char_p]),
            ("bpf_obj_get_info_by_fd", i, [i, vp, ctypes.POINTER(u32)]),
            ("bpf_map_create", i, [i, ctypes.c_char_p, u32, u32, u32, ctypes.POINTER(_MapCreateOpts)]),
            ("bpf_map_update_batch", i, [i, vp, vp, ctypes.POINTER(u32), ctypes.POINTER(_BatchOpts)]),
            ("bpf_map_delete_batch", i, [i, vp, ctypes.POINTER(u32), ctypes.POINTER(_BatchOpts)]),
            ("bpf_map_lookup_batch", i, [i, vp, vp, vp, vp, ctypes.POINTER(u32), ctypes.POINTER(_BatchOpts)]),
            ("bpf_map_update_elem", i, [i, vp, vp, ctypes.c_uint64]),
            ("bpf_map_delete_elem", i, [i, vp]),
            ("bpf_map_lookup_elem", i, [i, vp, vp]),
            ("bpf_map_get_next_key", i, [i, vp, vp]),
            ("bpf_prog_test_run_opts", i, [i, ctypes.POINTER(_TestRunOpts)]),
            ("libbpf_set_print", vp, [_PRINT_FN])):
        fn = getattr(so, name)
        fn.restype, fn.argtypes = res, args
    so.libbpf_set_print(_collect)
    return so


def _fail(what: str, rc: int) -> ApplyError:
    code = -rc if rc < 0 else ctypes.get_errno()
    detail = next((m for m in reversed(_messages) if m), "")
    return ApplyError(f"{what}: {os.strerror(code)}" + (f" (libbpf: {detail[:200]})" if detail else ""))


class BpfObject:
    """A loaded object: its programs by name, its maps (pinned by name in `pin_root`) by name."""

    def __init__(self, path: str, pin_root: str) -> None:
        so = lib()
        _messages.clear()
        opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts), pin_root_path=pin_root.encode())
        self._obj = so.bpf_object__open_file(path.encode(), ctypes.byref(opts))
        if not self._obj:
            raise _fail(f"cannot open BPF object {path}", 0)
        rc = so.bpf_object__load(self._obj)
        if rc:
            so.bpf_object__close(self._obj)
            self._obj = None
            raise _fail(f"cannot load BPF object {os.path.basename(path)}", rc)

    def prog_fd(self, name: str) -> int:
        prog = lib().bpf_object__find_program_by_name(self._obj, name.encode())
        if not prog:
            raise ApplyError(f"BPF object has no program {name}")
        return lib().bpf_program__fd(prog)

    def pin_program(self, name: str, path: str) -> None:
        """Pin a program (replacing an older pin of the same name), so later commands attach it by path."""
        prog = lib().bpf_object__find_program_by_name(self._obj, name.encode())
        if not prog:
            raise ApplyError(f"BPF object has no program {name}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        rc = lib().bpf_program__pin(prog, path.encode())
        if rc:
            raise _fail(f"cannot pin {name} at {path}", rc)

    def map_fd(self, name: str) -> int:
        found = lib().bpf_object__find_map_by_name(self._obj, name.encode())
        if not found:
            raise ApplyError(f"BPF object has no map {name}")
        return lib().bpf_map__fd(found)

    def close(self) -> None:
        if self._obj:
            lib().bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach_cgroup(prog_fd: int, cgroup: str, attach_type: int) -> None:
    """Attach to a cgroup v2 folder, replacing this hook's program there (no BPF_F_ALLOW_MULTI: running
    the same sync again after a crash leaves one program per hook, not two)."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rc = lib().bpf_prog_attach(prog_fd, fd, attach_type, 0)
        if rc:
            raise _fail(f"cannot attach to cgroup {cgroup}", rc)
    finally:
        os.close(fd)


def attach_tc(prog_fd: int, ifindex: int, point: int) -> None:
    """Attach direct-action to a device's clsact hook (created when missing), in the CALLING THREAD's
    network namespace; an attach to the same hook, handle and priority replaces the program."""
    hook = _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=point)
    rc = lib().bpf_tc_hook_create(ctypes.byref(hook))
    if rc and rc != -errno.EEXIST:
        raise _fail(f"cannot create the clsact hook on ifindex {ifindex}", rc)
    opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), prog_fd=prog_fd, flags=1, handle=1, priority=1)  # BPF_TC_F_REPLACE
    rc = lib().bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts))
    if rc:
        raise _fail(f"cannot attach a tc program to ifindex {ifindex}", rc)


def tc_attached(ifindex: int, point: int) -> int:
    """The id of the program attached direct-action at this hook (handle 1, priority 1), 0 when none."""
    hook = _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=point)
    opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), handle=1, priority=1)
    return opts.prog_id if lib().bpf_tc_query(ctypes.byref(hook), ctypes.byref(opts)) == 0 else 0


def obj_get(path: str) -> int:
    fd = lib().bpf_obj_get(path.encode())
    if fd < 0:
        raise _fail(f"cannot open pinned {path}", fd)
    return fd


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int, flags: int = 0) -> int:
    """A new map (its fd; the caller pins or closes it). `name` is the kernel's short name (15 characters)."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    fd = lib().bpf_map_create(map_type, name[:15].encode(), key_size, value_size, max_entries, ctypes.byref(opts))
    if fd < 0:
        raise _fail(f"cannot create map {name}", fd)
    return fd


def obj_pin(fd: int, path: str) -> None:
    rc = lib().bpf_obj_pin(fd, path.encode())
    if rc:
        raise _fail(f"cannot pin {path}", rc)


def map_id(fd: int) -> int:
    """The kernel's id of an open map (struct bpf_map_info: u32 type, then u32 id): what a map-in-map lookup
    returns, and unique while the map lives (a map re-created under the same pin has another)."""
    info = ctypes.create_string_buffer(96)
    size = ctypes.c_uint32(96)
    rc = lib().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size))
    if rc:
        raise _fail("BPF_OBJ_GET_INFO_BY_FD failed", rc)
    return int.from_bytes(info.raw[4:8], "little")


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """One entry's value, None when the map has no such key."""
    value = ctypes.create_string_buffer(value_size)
    return value.raw if lib().bpf_map_lookup_elem(fd, key, value) == 0 else None


def update_batch(fd: int, keys: bytes, values: bytes, count: int) -> None:
    """All entries in one BPF_MAP_UPDATE_BATCH (the kernel may take them in chunks: loop until done)."""
    done = 0
    key_size, value_size = len(keys) // max(count, 1), len(values) // max(count, 1)
    while done < count:
        n = ctypes.c_uint32(count - done)
        kb = ctypes.create_string_buffer(keys[done * key_size:], (count - done) * key_size)
        vb = ctypes.create_string_buffer(values[done * value_size:], (count - done) * value_size)
        opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
        rc = lib().bpf_map_update_batch(fd, kb, vb, ctypes.byref(n), ctypes.byref(opts))
        if rc and n.value == 0:
            raise _fail("BPF_MAP_UPDATE_BATCH failed", rc)
        done += n.value


def delete_batch(fd: int, keys: bytes, count: int) -> None:
    if count == 0:
        return
    n = ctypes.c_uint32(count)
    kb = ctypes.create_string_buffer(keys, len(keys))
    opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
    rc = lib().bpf_map_delete_batch(fd, kb, ctypes.byref(n), ctypes.byref(opts))
    if rc and rc != -errno.ENOENT:
        raise _fail("BPF_MAP_DELETE_BATCH failed", rc)


def entries(fd: int, key_size: int, value_size: int) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of a map, read with BPF_MAP_LOOKUP_BATCH (hash maps) in chunks."""
    chunk = 4096
    keys = ctypes.create_string_buffer(key_size * chunk)
    values = ctypes.create_string_buffer(value_size * chunk)
    token_in, token_out = ctypes.create_string_buffer(key_size + 8), ctypes.create_string_buffer(key_size + 8)
    first = True
    while True:
        n = ctypes.c_uint32(chunk)
        opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
        rc = lib().bpf_map_lookup_batch(fd, None if first else token_in, token_out, keys, values,
                                        ctypes.byref(n), ctypes.byref(opts))
        kr, vr = keys.raw, values.raw  # .raw copies the whole buffer: once per chunk, not once per entry
        for i in range(n.value):
            yield kr[i * key_size:(i + 1) * key_size], vr[i * value_size:(i + 1) * value_size]
        if rc:
            if rc == -errno.ENOENT or ctypes.get_errno() == errno.ENOENT:
                return
            if rc == -errno.EINVAL or ctypes.get_errno() == errno.EINVAL:  # no batch support (array): walk
                yield from _walk(fd, key_size, value_size)
                return
            raise _fail("BPF_MAP_LOOKUP_BATCH failed", rc)
        ctypes.memmove(token_in, token_out, key_size + 8)
        first = False


def _walk(fd: int, key_size: int, value_size: int) -> Iterator[tuple[bytes, bytes]]:
    key, nxt = None, ctypes.create_string_buffer(key_size)
    value = ctypes.create_string_buffer(value_size)
    while lib().bpf_map_get_next_key(fd, key, nxt) == 0:
        if lib().bpf_map_lookup_elem(fd, nxt, value) == 0:
            yield nxt.raw, value.raw
        key = ctypes.create_string_buffer(nxt.raw, key_size)


def update(fd: int, key: bytes, value: bytes) -> None:
    rc = lib().bpf_map_update_elem(fd, key, value, BPF_ANY)
    if rc:
        raise _fail("map update failed", rc)


def delete(fd: int, key: bytes) -> None:
    lib().bpf_map_delete_elem(fd, key)


def test_run(prog_fd: int, packet: bytes, repeat: int = 1) -> tuple[int, bytes]:
    """BPF_PROG_TEST_RUN: run a program on a crafted packet; (return value, packet as it left)."""
    out = ctypes.create_string_buffer(len(packet) + 256)
    data = ctypes.create_string_buffer(packet, len(packet))
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.cast(data, ctypes.c_void_p),
                        data_size_in=len(packet), data_out=ctypes.cast(out, ctypes.c_void_p),
                        data_size_out=len(out), repeat=repeat)
    rc = lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if rc:
        raise _fail("BPF_PROG_TEST_RUN failed", rc)
    return opts.retval, out.raw[:opts.data_size_out]
