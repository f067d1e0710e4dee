"""What the running kernel can do, found by trying, not by version numbers.

Kernels are built with different options (this project's CI kernel has no netem, IPVS, IP-in-IP or
dummy devices; Debian's stock kernel has them all as modules), so a feature is probed in a throwaway
namespace the first time a lab asks for it: the probe creates the very kind of object the lab would (a
dummy link, an ipip device, a netem qdisc) or asks for IPVS after a `modprobe`, which is also what makes
a modular kernel load the module. Results are cached for the life of the process. A lab that needs a
missing feature is refused at `lab up`, before anything is built, with one line per feature naming the
kernel option and the ways to get a kernel that has it.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from topo import names, netns
from topo.errors import FeatureMissing

# Where to get a kernel with everything: said at the end of every refusal.
FULL_KERNEL = "a normal Linux host, the Vagrant VM (vagrant up) or the test VM (tests/vm/run)"


@dataclass(frozen=True)
class Feature:
    """A kernel capability a lab may need: what to call it in a message, and the build option."""

    name: str
    config: str

    def __str__(self) -> str:
        return f"{self.name} ({self.config})"


IPVS = Feature("IPVS", "CONFIG_IP_VS")
DUMMY = Feature("dummy devices", "CONFIG_DUMMY")
IPIP = Feature("IP-in-IP tunnels", "CONFIG_NET_IPIP")
NETEM = Feature("the netem qdisc", "CONFIG_NET_SCH_NETEM")


def require_root() -> None:
    """Every command that changes or reads a lab's kernel objects; the CLI asks here, not in `lab.lifecycle`,
    so a `lab apply` does not import how a whole lab is built."""
    if os.geteuid() != 0:
        raise FeatureMissing("needs root (it reads and changes network namespaces and processes of the lab): "
                             "run with sudo")


def _run(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def scratch() -> Iterator[str]:
    """A throwaway namespace for one probe. Its name is lab-shaped (klab_probe<pid>_n_probe), so `lab clean`
    removes it should this process die mid-probe."""
    ns = names.node_netns(f"probe{os.getpid()}", "probe")
    netns.ensure_dir()
    netns.delete(ns)  # a leftover of a process that had our pid
    netns.create(ns)
    try:
        yield ns
    finally:
        netns.delete(ns)


def _modprobe(module: str) -> None:
    """Ask a modular kernel to load `module`; harmless where it is built in, missing, or modprobe is absent."""
    if shutil.which("modprobe"):
        _run(["modprobe", "-q", module])


@functools.cache
def has_netem() -> bool:
    """Can a netem qdisc (delay, jitter, loss) be attached? Tried on `lo` of a scratch namespace."""
    with scratch() as ns:
        return _run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])


@functools.cache
def has_dummy() -> bool:
    """Can a dummy link (kube-proxy's kube-ipvs0) be created? Creating one also autoloads the module."""
    with scratch() as ns:
        return _run(["ip", "-n", ns, "link", "add", "kprobe0", "type", "dummy"])


@functools.cache
def has_ipip() -> bool:
    """Can a namespace have Calico's `tunl0`: the ipip fallback device (any local, any remote)?

    Asking for an ipip link loads the module on a modular kernel, and loading it gives every namespace a
    `tunl0`; the request itself then fails (an any/any device exists already). A namespace may also lack
    the fallback device (net.core.fb_tunnels_only_for_init_net), and then the request creates one."""
    with scratch() as ns:
        created = _run(["ip", "-n", ns, "link", "add", "kprobe0", "type", "ipip"])
        return created or _run(["ip", "-n", ns, "link", "show", "tunl0"])


@functools.cache
def has_ipvs() -> bool:
    """Does IPVS answer in a fresh namespace? IPVS is per namespace: its /proc/net/ip_vs appears in every
    namespace once the module is loaded (or built in)."""
    _modprobe("ip_vs")
    with scratch() as ns, netns.entered(ns):
        return os.path.exists("/proc/thread-self/net/ip_vs")


PROBES = {IPVS: has_ipvs, DUMMY: has_dummy, IPIP: has_ipip, NETEM: has_netem}


def missing(*features: Feature) -> list[Feature]:
    """The features, of those given, that this kernel lacks (each probed once per process)."""
    return [f for f in features if not PROBES[f]()]


def refusal(asker: str, lacking: list[Feature], instead: str = "") -> str:
    """One line: what asks for which missing features, and where to run it instead, e.g.
    "network.backend ipip needs IP-in-IP tunnels (CONFIG_NET_IPIP), which this kernel lacks: use a normal
    Linux host, ..."; `instead` is what would work on this kernel ("kubeProxy.mode nftables")."""
    need = " and ".join(str(f) for f in lacking)
    here = f"{instead} here, or " if instead else ""
    return f"{asker} needs {need}, which this kernel lacks: use {here}{FULL_KERNEL}"
