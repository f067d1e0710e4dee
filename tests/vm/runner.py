"""The test VM: run a pytest selection under Debian's stock kernel, in qemu, on a machine whose own kernel
lacks what those tests need (IPVS, IP-in-IP, dummy devices, netem). See tests/vm/__init__.py for the
whole picture; this module is `tests/vm/run`.

Steps, each cached under KUBENET_VM_CACHE (default /var/cache/kubenet-lab/vm):
1. the kernel: the version `linux-image-amd64` currently depends on, fetched with `apt-get download`,
   unpacked with `dpkg-deb -x` and indexed with `depmod -b` (nothing is installed, /boot is untouched);
2. the initramfs: busybox-static, tests/vm/init and the virtio, 9p and overlay modules in the order
   `modprobe --show-depends` prints (a hand-picked order fails with "unknown symbol"); rebuilt whenever
   one of those inputs changes;
3. the boot: qemu in software emulation (this machine kind has no usable KVM), no network device at all,
   the host root shared read-only, the checkout and a run folder read-write. The console is streamed,
   the guest's pytest exit code comes back in a file (qemu's own status says nothing about the tests),
   and qemu is killed on timeout, Ctrl-C, SIGTERM or the runner's own death.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

VM_DIR = Path(__file__).resolve().parent
REPO = VM_DIR.parents[1]
INIT = VM_DIR / "init"
MODULES = VM_DIR / "modules"
DEFAULT_CACHE = Path("/var/cache/kubenet-lab/vm")
DEFAULT_TIMEOUT = 480.0  # seconds from qemu's start; CI's whole VM stage must stay under 10 minutes
DEFAULT_MEMORY = 3072  # MiB: the overlay's upper layer, /tmp and /run are tmpfs inside it
META_PACKAGE = "linux-image-amd64"
# What stage 1 needs to reach the real root: virtio PCI transport, 9p over virtio, overlayfs.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# Variables the guest's pytest sees as on the host (CI=true turns missing tools into failures there too).
PASS_ENV = ("CI", "PYTEST_ADDOPTS")
PASS_ENV_PREFIX = "KUBENET_"

# Exit codes of the runner itself (pytest's own are 0-5): something missing on the machine, as `lab`'s
# FeatureMissing; a guest that never reported; the timeout, as timeout(1).
EXIT_MISSING = 3
EXIT_NO_RESULT = 125
EXIT_TIMEOUT = 124


class VmError(Exception):
    """A one-line reason the VM could not run, and the runner's exit code for it."""

    def __init__(self, message: str, code: int = EXIT_MISSING) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Kernel:
    """An unpacked linux-image package: vmlinuz and an indexed module tree."""
    version: str  # 6.1.0-56-amd64
    root: Path  # the dpkg-deb -x folder

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version


def cache_dir() -> Path:
    return Path(os.environ.get("KUBENET_VM_CACHE", DEFAULT_CACHE))


def module_names(path: Path = MODULES) -> list[str]:
    """tests/vm/modules without comments and blank lines."""
    return [word for line in path.read_text().splitlines() for word in line.split("#", 1)[0].split()]


def _run(argv: list[str], what: str, **kwargs) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise VmError(f"{what}: {argv[0]} not found (./install.sh --test installs it)") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise VmError(f"{what}: {' '.join(argv)} failed: {detail[-1] if detail else proc.returncode}")
    return proc


# -- 1. the kernel ---------------------------------------------------------------------------------------

def wanted_version() -> str:
    """The kernel release Debian's `linux-image-amd64` points at now (or KUBENET_VM_KERNEL), e.g.
    6.1.0-56-amd64. Read from the local package lists: no network."""
    if os.environ.get("KUBENET_VM_KERNEL"):
        return os.environ["KUBENET_VM_KERNEL"]
    out = _run(["apt-cache", "depends", META_PACKAGE], f"finding the kernel {META_PACKAGE} points at").stdout
    for line in out.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "Depends:" and words[1].startswith("linux-image-"):
            return words[1].removeprefix("linux-image-")
    raise VmError(f"apt-cache knows no {META_PACKAGE} (run apt-get update)")


def cached_kernels(cache: Path) -> list[Kernel]:
    found = []
    for child in sorted(cache.glob("*/.complete")):
        found.append(Kernel(child.parent.name, child.parent))
    return found


def fetch_kernel(cache: Path, version: str) -> Kernel:
    """Download, unpack and depmod linux-image-VERSION into cache/VERSION, atomically (a half-done fetch
    never looks complete). Other versions are removed afterwards: the tree is 400 MB."""
    kernel = Kernel(version, cache / version)
    if (kernel.root / ".complete").exists():
        return kernel
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
    try:
        # apt drops to the _apt user to download unless told otherwise; /var/cache/kubenet-lab is root's.
        _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"linux-image-{version}"],
             f"downloading linux-image-{version} (stale package lists? apt-get update)", cwd=work)
        debs = list(work.glob("*.deb"))
        if len(debs) != 1:
            raise VmError(f"apt-get download left {len(debs)} .deb files in {work}")
        tree = work / "tree"
        _run(["dpkg-deb", "-x", str(debs[0]), str(tree)], "unpacking the kernel")
        _run(["depmod", "-b", str(tree), version], "indexing the kernel's modules")
        if not (tree / "boot" / f"vmlinuz-{version}").exists():
            raise VmError(f"linux-image-{version} holds no boot/vmlinuz-{version}")
        (tree / ".complete").write_text(f"{debs[0].name}\n")
        if kernel.root.exists():
            shutil.rmtree(kernel.root)
        tree.rename(kernel.root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for old in cached_kernels(cache):
        if old.version != version:
            shutil.rmtree(old.root, ignore_errors=True)
    say(f"kernel {version} fetched into {kernel.root} in {time.monotonic() - started:.1f} s")
    return kernel


def kernel(cache: Path) -> Kernel:
    """The kernel to boot: the wanted one, fetched if needed; a cached one if fetching is impossible
    (no package lists, no network), so a machine that has run the VM once keeps working offline."""
    try:
        return fetch_kernel(cache, wanted_version())
    except VmError as err:
        have = cached_kernels(cache)
        if not have:
            raise
        say(f"{err}; using the cached kernel {have[-1].version}")
        return have[-1]


# -- 2. the initramfs ------------------------------------------------------------------------------------

def show_depends(kernel: Kernel, names: list[str] | tuple[str, ...]) -> list[tuple[Path, str]]:
    """(module file, parameters) for `names` and their dependencies, in load order, each once, as
    `modprobe --show-depends` resolves them against the kernel's own tree. Built-ins need no loading."""
    out = _run(["modprobe", "-d", str(kernel.root), "-S", kernel.version, "--show-depends", "-a", *names],
               "resolving modules").stdout
    order: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for line in out.splitlines():
        words = line.split(None, 2)
        if len(words) >= 2 and words[0] == "insmod" and Path(words[1]) not in seen:
            seen.add(Path(words[1]))
            order.append((Path(words[1]), words[2].strip() if len(words) > 2 else ""))
    return order


def busybox() -> Path:
    """A statically linked busybox: the initramfs holds no libraries."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.exists() and is_static(path):
            return path
    raise VmError("needs a static busybox (Debian's busybox-static; ./install.sh --test installs it)")


def is_static(path: Path) -> bool:
    """An ELF file without a PT_INTERP program header (no dynamic loader needed)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only: this is an x86_64 VM
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3a], "little")
    return all(int.from_bytes(data[phoff + i * phentsize:phoff + i * phentsize + 4], "little") != 3
               for i in range(phnum))


def cpio_newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """An uncompressed initramfs: (name, mode, data, rdev) entries in the kernel's `newc` cpio format.
    Written here rather than with cpio(1) so that /dev/console can be a device node without mknod."""
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], start=1):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev), len(raw), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


BUSYBOX_APPLETS = ("sh", "mount", "insmod", "mkdir", "switch_root", "poweroff", "sleep", "echo")


def initramfs_entries(kernel: Kernel, box: Path) -> list[tuple[str, int, bytes, int]]:
    modules = show_depends(kernel, BOOT_MODULES)
    d, f, x, ln = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755, stat.S_IFLNK | 0o777
    entries = [(name, d, b"", 0) for name in ("bin", "dev", "proc", "sys", "modules")]
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)))
    entries.append(("bin/busybox", x, box.read_bytes(), 0))
    entries += [(f"bin/{applet}", ln, b"busybox", 0) for applet in BUSYBOX_APPLETS]
    entries.append(("init", x, INIT.read_bytes(), 0))
    entries += [(f"modules/{path.name}", f, path.read_bytes(), 0) for path, _ in modules]
    order = "".join(f"{path.name} {params}".rstrip() + "\n" for path, params in modules)
    entries.append(("modules.order", f, order.encode(), 0))
    return entries


def initramfs(kernel: Kernel) -> Path:
    """cache/VERSION/initramfs-HASH.cpio, HASH covering everything inside: a changed tests/vm/init,
    busybox or module set gives a new file (older ones are removed)."""
    entries = initramfs_entries(kernel, busybox())
    digest = hashlib.sha256()
    for name, mode, data, rdev in entries:
        digest.update(f"{name}\0{mode}\0{rdev}\0{len(data)}\0".encode())
        digest.update(data)
    path = kernel.root / f"initramfs-{digest.hexdigest()[:16]}.cpio"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(cpio_newc(entries))
        tmp.rename(path)
        for old in kernel.root.glob("initramfs-*.cpio"):
            if old != path:
                old.unlink()
        say(f"initramfs built: {path.name} ({path.stat().st_size // 1024} KiB)")
    return path


@dataclass(frozen=True)
class Prepared:
    kernel: Kernel
    initrd: Path


def prepare() -> Prepared:
    """Kernel and initramfs, under a lock: two runs at once (two checkouts) share one cache."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        k = kernel(cache)
        return Prepared(k, initramfs(k))


# -- 3. the boot -----------------------------------------------------------------------------------------

def run_env(prepared: Prepared, pytest_args: list[str], environ: dict[str, str], columns: int,
            timeout: float = DEFAULT_TIMEOUT) -> str:
    """run.env, sourced by both guest stages: where things are, the environment, pytest's arguments.
    Every value is quoted for sh (argv goes through `set --`, never through word splitting)."""
    q = shlex.quote
    lines = [f"KVM_CHECKOUT={q(str(REPO))}", f"KVM_KVER={q(prepared.kernel.version)}",
             f"KVM_MODULES={q(str(prepared.kernel.modules))}", f"KVM_TIMEOUT={int(timeout)}",
             # Tests may ask whether they run in the VM (a missing kernel feature there is a failure).
             "export KUBENET_TEST_VM=1", f"export COLUMNS={columns}",
             f"export TERM={q(environ.get('TERM', 'dumb') if sys.stdout.isatty() else 'dumb')}"]
    for key in sorted(environ):
        if (key in PASS_ENV or key.startswith(PASS_ENV_PREFIX)) and key.isidentifier() and key != "KUBENET_TEST_VM":
            lines.append(f"export {key}={q(environ[key])}")
    lines.append("set -- " + " ".join(q(arg) for arg in pytest_args))
    return "\n".join(lines) + "\n"


def qemu_argv(prepared: Prepared, run_dir: Path, memory: int) -> list[str]:
    p9 = "security_model=passthrough,multidevs=remap"
    return [
        "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-m", str(memory), "-smp", "2",
        "-nic", "none",  # no network device at all: the VM reaches nothing
        "-display", "none", "-vga", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(prepared.kernel.vmlinuz), "-initrd", str(prepared.initrd),
        # panic=-1 and -no-reboot: should PID 1 ever die, qemu exits instead of hanging. tsc=reliable: under
        # emulation the kernel distrusts the TSC and reads the emulated HPET instead, which makes every
        # clock_gettime a trap (100,000 time.monotonic(): 0.36 s on the HPET, 0.06 s on the TSC).
        "-append", "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off tsc=reliable rdinit=/init",
        "-virtfs", f"local,path=/,mount_tag=hostroot,{p9},readonly=on",
        "-virtfs", f"local,path={REPO},mount_tag=checkout,{p9}",
        "-virtfs", f"local,path={run_dir},mount_tag=run,{p9}",
    ]


def _die_with_parent() -> None:
    """In the qemu child: SIGKILL it when the runner dies, however it dies (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def stream(proc: subprocess.Popen, deadline: float) -> Iterator[bytes]:
    """qemu's console output as it comes, until it exits; TimeoutError at the deadline."""
    fd = proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            yield chunk.replace(b"\r", b"")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


RUN_PREFIX = "kubenet-vm-"


def run_folder() -> Path:
    """A new run folder, /tmp/kubenet-vm-PID-XXXX; those of runners that were killed outright (SIGKILL
    leaves no chance to clean up) are removed first."""
    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob(f"{RUN_PREFIX}*-*"):
        pid = old.name.removeprefix(RUN_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=tmp))


def boot(prepared: Prepared, pytest_args: list[str], timeout: float, memory: int, keep: bool = False) -> int:
    run_dir = run_folder()
    (run_dir / "run.env").write_text(run_env(prepared, pytest_args, dict(os.environ),
                                             shutil.get_terminal_size((120, 24)).columns, timeout))
    argv = qemu_argv(prepared, run_dir, memory)
    if shutil.which(argv[0]) is None:
        raise VmError(f"needs {argv[0]} (Debian's qemu-system-x86; ./install.sh --test installs it)")
    say(f"booting kernel {prepared.kernel.version}: pytest {shlex.join(pytest_args)} (timeout {timeout:.0f} s)")
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_die_with_parent)
    out = sys.stdout.buffer
    try:
        for chunk in stream(proc, started + timeout):
            out.write(chunk)
            out.flush()
        proc.wait()
    except TimeoutError:
        stop(proc)
        raise VmError(f"timed out after {timeout:.0f} s; qemu killed (raise it with --vm-timeout=SECONDS)",
                      EXIT_TIMEOUT) from None
    finally:
        stop(proc)
        rc_file = run_dir / "rc"
        rc = rc_file.read_text().strip() if rc_file.exists() else ""
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    elapsed = time.monotonic() - started
    if not rc.isdigit():
        raise VmError(f"the guest reported no pytest result after {elapsed:.0f} s (qemu exited "
                      f"{proc.returncode}; see its console output above)", EXIT_NO_RESULT)
    if int(rc) == EXIT_TIMEOUT:  # guest.sh's timeout(1) interrupted pytest
        raise VmError(f"pytest interrupted in the guest to stay within the {timeout:.0f} s timeout "
                      "(raise it with --vm-timeout=SECONDS)", EXIT_TIMEOUT)
    say(f"guest pytest exited {rc}; {elapsed:.1f} s from qemu start to power-off")
    return int(rc)


# -- the command -----------------------------------------------------------------------------------------

USAGE = """usage: tests/vm/run [--vm-timeout=SECONDS] [--vm-memory=MIB] [--vm-prepare] [--vm-keep] [PYTEST ARGS...]

Runs `python -m pytest PYTEST ARGS` from this checkout's .venv inside a qemu VM booted with Debian's
stock kernel (IPVS, IP-in-IP, dummy, netem), and exits with pytest's exit code. Needs root.
  tests/vm/run -m fullkernel -q                   the kernel-gated subset, as CI runs it
  tests/vm/run tests/integration/test_seed.py -q  any selection
Options (before the pytest arguments):
  --vm-timeout=SECONDS  kill the VM after this long (default {timeout:.0f}); exit {to}
  --vm-memory=MIB       guest memory (default {memory})
  --vm-prepare          only fetch the kernel and build the initramfs (cached in {cache})
  --vm-keep             keep the run folder (run.env, rc)
Environment: KUBENET_VM_CACHE (cache folder), KUBENET_VM_KERNEL (kernel release instead of the one
{meta} points at). CI, PYTEST_ADDOPTS and KUBENET_* are passed to the guest; it sets KUBENET_TEST_VM=1.
"""


def say(message: str) -> None:
    print(f"tests/vm/run: {message}", file=sys.stderr, flush=True)


def _terminate(signum: int, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    timeout, memory, prepare_only, keep = DEFAULT_TIMEOUT, DEFAULT_MEMORY, False, False
    while args and args[0].startswith("--vm-"):
        option, _, value = args.pop(0).partition("=")
        try:
            if option == "--vm-timeout":
                timeout = float(value)
            elif option == "--vm-memory":
                memory = int(value)
            elif option == "--vm-prepare":
                prepare_only = True
            elif option == "--vm-keep":
                keep = True
            elif option == "--vm-help":
                print(USAGE.format(timeout=DEFAULT_TIMEOUT, to=EXIT_TIMEOUT, memory=DEFAULT_MEMORY,
                                   cache=cache_dir(), meta=META_PACKAGE), end="")
                return 0
            else:
                raise ValueError
        except ValueError:
            say(f"bad option {option}{'=' + value if value else ''} (see tests/vm/run --vm-help)")
            return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        if os.geteuid() != 0:
            raise VmError("needs root: the guest reads the whole host root through 9p with the host's "
                          "permissions, and the kernel cache is in /var/cache")
        started = time.monotonic()
        prepared = prepare()
        say(f"kernel and initramfs ready in {time.monotonic() - started:.1f} s")
        if prepare_only:
            return 0
        return boot(prepared, args, timeout, memory, keep)
    except VmError as err:
        say(str(err))
        return err.code
    except KeyboardInterrupt:
        say("interrupted; qemu killed")
        return 130
