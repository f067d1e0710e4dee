"""The DNS clients `lab dns-count --resolver` and `lab bench dns` run inside pods, per resolver:

* glibc: `getent ahosts NAME` (Debian's C library, getaddrinfo with AF_UNSPEC);
* musl: images/dnsclient/dnsclient.c built with Debian's musl-tools (`musl-gcc -static`), so it calls
  musl's getaddrinfo, Alpine Linux's resolver, with nothing of glibc's;
* node-lookup / node-resolve: images/dnsclient/dnsclient.js under Debian's nodejs: `dns.lookup` (the C
  library's getaddrinfo on libuv's thread pool) and `dns.resolve4`+`dns.resolve6` (c-ares, which reads
  resolv.conf and applies ndots itself).

The C client is also built with gcc against glibc (`glibc-load`) for the storm, where a Python or
`getent` process per lookup would cost more than the DNS work measured. Binaries are built on first use
(install.sh builds them too) into /var/cache/kubenet-lab/dnsclient/<sha256 of the source>/, so a changed
source is rebuilt and an unchanged one never is; a build goes to a temporary name first and is renamed,
so two labs building at once never run half a file.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "dnsclient" / "dnsclient.c"
NODE_SCRIPT = Path(__file__).resolve().parent / "dnsclient" / "dnsclient.js"
CACHE = Path(os.environ.get("KUBENET_LAB_CACHE", "/var/cache/kubenet-lab")) / "dnsclient"
RESOLVERS = ("glibc", "musl", "node-lookup", "node-resolve")
COMPILERS = {"musl": ("musl-gcc", ["-static"], "musl-tools"), "glibc": ("gcc", [], "gcc")}


class ClientMissing(Exception):
    """A resolver's client cannot be run here (a package is missing); the message says which."""


def source_hash() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def binary(libc: str) -> Path:
    """The C client linked against `libc` ("musl" or "glibc"), built into the cache when missing."""
    compiler, flags, package = COMPILERS[libc]
    target = CACHE / source_hash() / f"dnsclient-{libc}"
    if target.exists():
        return target
    exe = shutil.which(compiler)
    if exe is None:
        raise ClientMissing(f"{compiler} not found: the {libc} DNS client is built with it "
                            f"(apt-get install {package}, or ./install.sh)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    proc = subprocess.run([exe, "-O2", *flags, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ClientMissing(f"building the {libc} DNS client failed: {proc.stderr.strip().splitlines()[-1:]}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    return target


def once_argv(resolver: str, name: str) -> list[str]:
    """The command that resolves `name` once with `resolver` (inside a pod)."""
    if resolver == "glibc":
        return ["getent", "ahosts", name]
    if resolver == "musl":
        return [str(binary("musl")), "once", name]
    if resolver in ("node-lookup", "node-resolve"):
        node = shutil.which("node") or shutil.which("nodejs")
        if node is None:
            raise ClientMissing("node not found: the Node.js resolvers need Debian's nodejs (./install.sh)")
        return [node, str(NODE_SCRIPT), resolver.split("-", 1)[1], name]
    raise ValueError(f"unknown resolver {resolver!r} (one of {', '.join(RESOLVERS)})")


def load_argv(libc: str, name: str, rate: float, seconds: float) -> list[str]:
    """The paced storm client: `rate` lookups per second of `name` for `seconds`, one JSON line out."""
    return [str(binary(libc)), "load", name, f"{rate:g}", f"{seconds:g}"]


def addresses(resolver: str, stdout: str) -> list[str]:
    """The addresses a client printed, sorted and each once."""
    import json

    if resolver.startswith("node-"):
        for line in stdout.splitlines():
            if line.startswith("{"):
                return sorted(set(json.loads(line)["addresses"]))
        return []
    return sorted({line.split()[0] for line in stdout.splitlines() if line.strip() and not line.startswith("#")})
