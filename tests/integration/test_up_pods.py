"""`lab up`'s pods in bulk (lab/apply.py add_pods, every other node's in a forked worker): every pod wired to
its own sandbox, whose pause process may run on every CPU again (spawns pin the spawning thread to its CPU,
topo/process.py on_this_cpu), and a `lab up` killed mid-way leaves nothing that `lab down` does not remove."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from topo import netns, process

from tests.integration.conftest import in_lab, kill_up_mid_way, lab, leftovers, pause_pod, unique, write_spec

pytestmark = pytest.mark.integration


def spec(name: str, pods: int) -> dict:
    return {"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"dns": {"enabled": False},
                     "nodes": [{"name": "node1", "ip": "192.168.1.10"}, {"name": "node2", "ip": "192.168.1.11"}],
                     "objects": [pause_pod(f"p{i}", node=f"node{i % 2 + 1}") for i in range(pods)]}}


def test_every_pod_has_its_own_sandbox_and_address(tmp_path: Path) -> None:
    name = unique("sbx")
    try:
        lab("up", str(write_spec(tmp_path, spec(name, 120))))
        pods = [n for n in os.listdir("/run/netns") if n.startswith(f"klab_{name}_p_")]
        assert len(pods) == 120
        everywhere = os.sched_getaffinity(0)
        for ns in pods:  # each pod's namespace is held by one pause process, which may run on every CPU
            pids = [p for p in process.pids_in_netns([netns.inode(ns)]) if process.alive(p)]
            assert [Path(f"/proc/{p}/comm").read_text().strip() for p in pids] == ["pause"], ns
            assert os.sched_getaffinity(pids[0]) == everywhere, ns
        addresses = {in_lab(name, f"p{i}", "ip", "-4", "-o", "addr", "show", "eth0").split()[3]
                     for i in (0, 1, 118, 119)}
        assert len(addresses) == 4
        ip = in_lab(name, "p119", "ip", "-4", "-o", "addr", "show", "eth0").split()[3].split("/")[0]
        assert " 0% packet loss" in in_lab(name, "p0", "ping", "-c", "1", "-W", "2", ip)  # node1 -> node2
        assert in_lab(name, "p7", "hostname").strip() == "p7"
        # half of the pods were made by the forked worker (lab/apply.py add_pods_split): every one recorded
        recorded = json.loads(lab("status", "--json", name).stdout)["pods"]
        assert sorted(p["name"] for p in recorded) == sorted(f"p{i}" for i in range(120))
        assert {p["status"] for p in recorded} == {"Running"} and len({p["ip"] for p in recorded}) == 120
        assert {p["node"] for p in recorded} == {"node1", "node2"}
    finally:
        lab("down", name, check=False)
    assert leftovers(name) == {"netns": [], "state": []}


def test_up_killed_mid_way_then_down_leaves_nothing(tmp_path: Path) -> None:
    name = unique("sbxk")
    path = write_spec(tmp_path, spec(name, 400))
    try:
        kill_up_mid_way(path, name, "-q")
        time.sleep(0.2)  # forked helpers get their SIGKILL from the kernel (PR_SET_PDEATHSIG)
        helpers = [int(p) for p in filter(str.isdigit, os.listdir("/proc"))
                   if _cmdline(p).startswith(f"{sys.executable}\0-m\0lab.cli\0up\0-q\0{path}")]
        assert not [p for p in helpers if process.alive(p)], "a forked helper outlived the command"
        made = leftovers(name)
        assert made.get("processes"), "pause processes should have survived the crash"
        lab("down", name)
        assert leftovers(name) == {"netns": [], "state": []}
        assert not [p for p in made["processes"] if process.alive(p)]
    finally:
        lab("down", name, check=False)


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""
