"""The kernel features this machine's kernel lacks, present in a full one: the smoke test of the test VM.

On this machine every case skips with the missing feature's reason; in the test VM (tests/vm/run, Debian's
stock kernel) every case must pass, because there a missing feature fails (tests.vm.require_kernel). The
objects are the ones the kernel-gated features build: an IPVS virtual service with a masquerading real
server (kube-proxy's IPVS mode), `kube-ipvs0` holding a ClusterIP, Calico's `tunl0`, a netem qdisc.
"""
from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import require_tool
from tests.integration.conftest import leftovers, unique
from tests.vm import require_kernel
from topo import kernel, names, netns

pytestmark = [pytest.mark.integration, pytest.mark.fullkernel]


@pytest.fixture
def scratch() -> Iterator[str]:
    """A lab-shaped namespace (so `lab clean` would catch it), gone afterwards."""
    name = unique("fullk")
    ns = names.node_netns(name, "scratch")
    netns.ensure_dir()
    netns.create(ns)
    yield ns
    netns.delete(ns)
    assert leftovers(name) == {"netns": [], "state": []}


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}"
    return proc.stdout


def test_ipvs_holds_a_virtual_service_with_a_masquerading_real_server(scratch: str) -> None:
    lacking = kernel.missing(kernel.IPVS, kernel.DUMMY)
    require_kernel(not lacking, f"this kernel lacks {' and '.join(map(str, lacking))}")
    require_tool("ipvsadm")
    # IPVS takes only real servers with a unicast route: the node's pod network, here on a dummy link.
    run("ip", "-n", scratch, "link", "add", "eth0", "up", "type", "dummy")
    run("ip", "-n", scratch, "addr", "add", "10.244.1.1/24", "dev", "eth0")
    run("ip", "netns", "exec", scratch, "ipvsadm", "-A", "-t", "10.96.0.100:80", "-s", "rr")
    run("ip", "netns", "exec", scratch, "ipvsadm", "-a", "-t", "10.96.0.100:80", "-r", "10.244.1.2:8080", "-m")
    table = run("ip", "netns", "exec", scratch, "ipvsadm", "-Ln")
    assert "TCP  10.96.0.100:80 rr" in table and "10.244.1.2:8080" in table and "Masq" in table


def test_a_dummy_device_holds_a_clusterip(scratch: str) -> None:
    require_kernel(kernel.has_dummy(), f"this kernel lacks {kernel.DUMMY}")
    run("ip", "-n", scratch, "link", "add", "kube-ipvs0", "type", "dummy")
    run("ip", "-n", scratch, "addr", "add", "10.96.0.100/32", "dev", "kube-ipvs0")
    assert "10.96.0.100/32" in run("ip", "-n", scratch, "-o", "addr", "show", "dev", "kube-ipvs0")


def test_every_namespace_gets_calicos_tunl0(scratch: str) -> None:
    require_kernel(kernel.has_ipip(), f"this kernel lacks {kernel.IPIP}")
    assert "ipip any remote any local any" in run("ip", "-n", scratch, "-d", "link", "show", "tunl0")


def test_netem_delays_and_drops(scratch: str) -> None:
    require_kernel(kernel.has_netem(), f"this kernel lacks {kernel.NETEM}")
    run("tc", "-n", scratch, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "20ms", "loss", "10%")
    shown = run("tc", "-n", scratch, "qdisc", "show", "dev", "lo")
    assert "netem" in shown and "delay 20ms" in shown and "loss 10%" in shown
