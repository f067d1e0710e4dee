"""Reading a lab spec or an objects file from disk: the one place a manifest file is opened.

Both `lab up`/`lab validate` (`apiserver.spec.load_spec`) and `lab apply -f` read their file here, so each gets
the same refusals, in one line naming the file: a file over `topo.schema.MAX_FILE_BYTES` is refused by its
size before a byte is read (and a file that grows meanwhile is never read past the limit); anything but a
regular file (a folder, a FIFO, /dev/zero) is refused without opening it; a symbolic link loop or a link to
nothing says so, instead of "no such file"; the text must be UTF-8.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from topo.errors import SpecError, SpecIssue
from topo.schema import MAX_FILE_BYTES, MIB

SPEC_MISSING = "no such file: give the path of a lab spec (e.g. labs/00-seed/lab.yaml) or of an exercise folder"
OBJECTS_MISSING = "no such file: give the path of a YAML file of Kubernetes manifests"


def read_manifest(path: str | Path, missing: str = OBJECTS_MISSING) -> str:
    """The text of the YAML file at `path`, or a SpecError (one line, naming the file as given).

    `missing` is the message for a path that does not exist (a lab spec's says what to give instead)."""
    file = str(path)
    try:
        info = os.stat(path)  # follows links; lstat below tells a dangling link from a missing file
    except OSError as exc:
        raise _error(file, _stat_problem(path, exc, missing)) from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise _error(file, f"{kind}: give the path of a YAML file" if kind == "a folder" else
                     f"{kind} (a device, FIFO or socket): give the path of a YAML file")
    if info.st_size > MAX_FILE_BYTES:
        raise _error(file, _too_big(info.st_size))
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)  # never more, even if the file grew since stat
    except OSError as exc:
        raise _error(file, f"cannot read the file: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise _error(file, _too_big(len(data), grew=True))
    return decode(data, file)


def decode(data: bytes, file: str) -> str:
    """Spec files are UTF-8 (YAML's default); a leading byte-order mark is allowed."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        byte = data[exc.start]
        raise SpecError(file, [SpecIssue("", f"the file is not UTF-8 text (byte 0x{byte:02x} cannot be decoded): "
                                             "save it as UTF-8", line)]) from None


def _stat_problem(path: str | Path, exc: OSError, missing: str) -> str:
    if exc.errno == errno.ELOOP:
        return ("a loop of symbolic links (following them leads back to where they started): point the link at "
                "the real file")
    if exc.errno == errno.ENOENT:
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return (f"a symbolic link to {os.readlink(path)!r}, which does not exist: fix the link, or give the "
                        "real file")
        except OSError:
            pass
        return missing
    if exc.errno == errno.ENOTDIR:
        return "a part of this path is a file, not a folder: check the path"
    if exc.errno == errno.ENAMETOOLONG:
        return "the path is too long for this machine: check it"
    return f"cannot read the file: {exc.strerror or exc}"


def _too_big(size: int, grew: bool = False) -> str:
    shown = f"{size / MIB:.1f} MiB" if size >= 10 * MIB else f"{size} bytes"
    what = "grew past the limit while being read" if grew else f"is {shown}"
    return (f"the file {what}: a lab spec or objects file is at most {MAX_FILE_BYTES // MIB} MiB ({MAX_FILE_BYTES} "
            "bytes; Kubernetes refuses an object over 1.5 MiB, the largest exercise is 46 KB): make it smaller")


def _error(file: str, message: str) -> SpecError:
    return SpecError(file, [SpecIssue("", message)])
