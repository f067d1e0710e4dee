"""What the running kernel can do, found by trying, not by version numbers.

Kernels are built with different options (this project's CI kernel has no netem, IPVS, IP-in-IP or
dummy devices), so a feature is probed in a throwaway namespace the first time a lab asks for it, and a
lab that needs a missing one is refused at `lab up` with a message naming the kernel option.
"""
from __future__ import annotations

import functools
import os
import subprocess

from topo import names, netns


def _probe_netns() -> str:
    # A lab-shaped name, so that `lab clean` would remove it should this process die mid-probe.
    return names.node_netns(f"probe{os.getpid()}", "probe")


@functools.cache
def has_netem() -> bool:
    """Can a netem qdisc (delay, loss) be attached? Tried on `lo` of a scratch namespace."""
    ns = _probe_netns()
    netns.ensure_dir()
    netns.create(ns)
    try:
        proc = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                               "delay", "1ms"], capture_output=True, text=True)
        return proc.returncode == 0
    finally:
        netns.delete(ns)


def has_ipvs() -> bool:
    return os.path.exists("/proc/net/ip_vs")
