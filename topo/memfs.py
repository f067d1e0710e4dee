"""Folders a lab keeps in memory (a tmpfs of its own) on a machine whose /run is a folder of its disk.

/run is a tmpfs on most Linux machines (systemd mounts one there), so what a lab keeps under it (its state,
each pod's resolv.conf and hosts, the namespace pins under /run/netns) never touches a disk. Where /run is
part of the root file system instead (this project's VM: ext4 without a journal), each of those files
costs an inode allocation, and right after a `lab down` a slow one: ext4 without a journal looks for a free
inode past every inode freed in the last minute or more (fs/ext4/ialloc.c, recently_deleted). Measured
after a 1,000-pod `lab down`: 1,050 pins 0.45-0.58 s and 1,000 pods' files 0.31-0.61 s, against 0.006 and
0.03 s on a tmpfs; a 50 x 20 `lab up` spent a tenth of its CPU there.

So the lab mounts a tmpfs of its own on such a folder while labs exist (`hold`) and unmounts it when the
last lab is gone (`release`), where it would otherwise have removed the folder. Only an empty folder is
held (nothing anyone put there gets hidden), and only the mount this module made is released, found by its
source name in the mount table.
"""
from __future__ import annotations

import ctypes
import os
import struct

from topo import netns

SOURCE = "kubenet-lab"  # the mount's source name, as `findmnt` shows it: how `release` knows its own mounts
_TMPFS_MAGIC = 0x01021994  # statfs(2) f_type of file systems held in memory (linux/magic.h)
_RAMFS_MAGIC = 0x858458F6
_MS_NOSUID, _MS_NODEV = 0x2, 0x4
_STATFS_SIZE = 120  # sizeof(struct statfs) on 64-bit Linux; f_type is its first field, a long


def in_memory(path: str) -> bool:
    """Whether `path` is on a file system held in memory (tmpfs, ramfs). False when it cannot be told."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if netns.libc().statfs(os.fsencode(path), buf) != 0:
        return False
    return struct.unpack_from("l", buf)[0] & 0xFFFFFFFF in (_TMPFS_MAGIC, _RAMFS_MAGIC)


def hold(path: str) -> bool:
    """Mount a tmpfs of the lab's on `path` if it is an empty folder on a disk; True if mounted now. Left
    as it is otherwise, and where mounting is refused (no root, a container without CAP_SYS_ADMIN)."""
    os.makedirs(path, exist_ok=True)
    if in_memory(path):
        return False
    with os.scandir(path) as entries:
        if next(entries, None) is not None:
            return False
    ret = netns.libc().mount(SOURCE.encode(), os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755")
    return ret == 0


def ours(path: str) -> bool:
    """Whether the topmost mount at `path` is a tmpfs `hold` made."""
    found = False
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            fields = line.split(" ")
            if netns.unescape_mount_point(fields[4]) == path:
                tail = line.split(" - ", 1)[1].split(" ")
                found = tail[0] == "tmpfs" and tail[1] == SOURCE  # the last line for a point is the topmost
    return found


def release(path: str) -> bool:
    """Unmount the tmpfs `hold` made on `path` (its files go with it, at once); True if there was one. Lazily
    (MNT_DETACH): a command that still has a file of it open keeps only that file's copy."""
    if not ours(path):
        return False
    netns.umount_detached(path)
    return True
