"""Compile the BPF C sources of `cilium/bpf/` with Debian's clang, once per source version: objects are
cached under /var/cache/kubenet-lab/bpf/ keyed by a hash of the sources (the .c file and every header of
the folder), so an edited source is recompiled on first use and an unchanged one never is. `install.sh`
warms the cache."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from topo.errors import ApplyError, FeatureMissing

SOURCES = Path(__file__).resolve().parent / "bpf"
CACHE = Path(os.environ.get("KUBENET_LAB_BPF_CACHE", "/var/cache/kubenet-lab/bpf"))
PROGRAMS = ("bpf_sock", "bpf_overlay", "bpf_host")
# Debian puts asm/types.h under the multiarch folder, where clang -target bpf does not look by itself.
CFLAGS = ["-O2", "-g", "-target", "bpf", "-Wall", "-Werror", "-I/usr/include/x86_64-linux-gnu"]


def source_hash(name: str) -> str:
    digest = hashlib.sha256()
    for path in [SOURCES / f"{name}.c", *sorted(SOURCES.glob("*.h"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    return digest.hexdigest()[:16]


def object_path(name: str) -> Path:
    """The compiled object of `cilium/bpf/NAME.c`, compiled now if its version is not in the cache."""
    target = CACHE / f"{name}-{source_hash(name)}.o"
    if target.exists():
        return target
    clang = shutil.which("clang")
    if clang is None:
        raise FeatureMissing("cni.profile cilium compiles its BPF programs with clang: install clang and "
                             "libbpf-dev (./install.sh does)")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    proc = subprocess.run([clang, *CFLAGS, "-c", str(SOURCES / f"{name}.c"), "-o", str(tmp)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((l for l in proc.stderr.splitlines() if "error" in l), proc.stderr.strip()[:200])
        raise ApplyError(f"compiling {name}.c failed: {first}")
    os.replace(tmp, target)
    return target


def compile_all() -> list[Path]:
    return [object_path(name) for name in PROGRAMS]
