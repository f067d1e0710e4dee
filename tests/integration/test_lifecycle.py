"""A lab's life: side by side with another, crashed mid-build, cleaned, changed while running."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require
from topo import memfs, netns, process

from tests.integration.conftest import (in_lab, kill_up_mid_way, lab, leftovers, pause_pod, unique,
                                        write_spec)

pytestmark = pytest.mark.integration
RUN = "/run/kubenet-lab"


def agnhost_pod(name: str, node: str, *ports: int) -> dict:
    containers = [{"name": f"c{p}", "image": "agnhost", "args": ["netexec", f"--http-port={p}"]} for p in ports]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeName": node, "containers": containers}}


def two_node_spec(name: str, pods: list[dict], mask: int = 24) -> dict:
    return {"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"cluster": {"podCIDR": "10.244.0.0/16", "nodeCIDRMaskSize": mask},
                     "dns": {"enabled": False},  # these tests count pod IPs; the DNS pod would take one
                     "nodes": [{"name": "node1", "ip": "192.168.1.10"}, {"name": "node2", "ip": "192.168.1.11"}],
                     "objects": pods}}


def test_containers_of_a_pod_share_localhost(lab_up) -> None:
    name = unique("lo")
    lab_up(two_node_spec(name, [agnhost_pod("duo", "node1", 8080, 9090)]))
    # The container on 9090 dials the one on 8080 over 127.0.0.1: only possible in one network namespace.
    out = in_lab(name, "duo", "curl", "-s", "--max-time", "5",
                 "http://127.0.0.1:9090/dial?request=hostname&protocol=http&host=127.0.0.1&port=8080&tries=1")
    assert json.loads(out)["responses"] == ["duo"]


def test_two_labs_with_the_same_cidrs_do_not_interfere(lab_up) -> None:
    a, b = unique("twin-a"), unique("twin-b")
    lab_up(two_node_spec(a, [agnhost_pod("a1", "node1", 8080), agnhost_pod("a2", "node2", 8080)]))
    lab_up(two_node_spec(b, [agnhost_pod("b1", "node1", 8080), agnhost_pod("b2", "node2", 8080)]))
    # Same addresses in both labs; each lab's pod reaches its own twin only.
    assert in_lab(a, "a1", "curl", "-s", "--max-time", "5", "http://10.244.2.2:8080/hostname") == "a2"
    assert in_lab(b, "b1", "curl", "-s", "--max-time", "5", "http://10.244.2.2:8080/hostname") == "b2"
    lab("down", b)
    assert leftovers(b) == {"netns": [], "state": []}
    assert in_lab(a, "a2", "curl", "-s", "--max-time", "5", "http://10.244.1.2:8080/hostname") == "a1"


def test_name_is_needed_when_two_labs_run(lab_up) -> None:
    a, b = unique("pick-a"), unique("pick-b")
    lab_up(two_node_spec(a, []))
    lab_up(two_node_spec(b, []))
    proc = lab("status", check=False)
    assert proc.returncode == 2 and "name one" in proc.stderr


def test_up_twice_is_refused_and_down_of_unknown_lab_is_clear(lab_up, tmp_path: Path) -> None:
    name = unique("twice")
    spec = two_node_spec(name, [pause_pod("p", node="node1")])
    lab_up(spec)
    before = leftovers(name)
    again = lab("up", str(write_spec(tmp_path, spec)), check=False)
    assert again.returncode == 2 and f"lab {name} is already up" in again.stderr and "Traceback" not in again.stderr
    assert leftovers(name) == before
    in_lab(name, "p", "true")
    # a pod of only the pause image gets its /sys when first entered: its own interfaces, as for any pod
    assert sorted(in_lab(name, "p", "ls", "/sys/class/net").split()) == ["eth0", "lo"]
    ghost = unique("ghost")
    down = lab("down", ghost, check=False)
    assert down.returncode == 2 and "is not running" in down.stderr
    assert not os.path.exists(f"{RUN}/.locks/{ghost}")  # its lock is not left behind
    bad = lab("down", "../../etc", check=False)
    assert bad.returncode == 2 and "not a lab name" in bad.stderr


def test_kill_9_mid_up_then_clean_leaves_nothing(tmp_path: Path) -> None:
    name = unique("crash")
    pods = [pause_pod(f"p{i}", node=f"node{i % 2 + 1}") for i in range(400)]
    spec = write_spec(tmp_path, two_node_spec(name, pods))
    try:
        kill_up_mid_way(spec, name)
        made = leftovers(name)
        assert len(made["netns"]) >= 60
        pids = made.get("processes", [])
        assert pids, "pause processes should have survived the crash"
        out = lab("clean").stdout
        assert name in out
        assert leftovers(name) == {"netns": [], "state": []}
        assert not [p for p in pids if process.alive(p)]
    finally:
        lab("clean", check=False)


def test_clean_spares_running_labs(lab_up) -> None:
    name = unique("spare")
    lab_up(two_node_spec(name, [pause_pod("p", node="node1")]))
    lab("clean")
    assert leftovers(name)["netns"], "lab clean removed a running lab"
    in_lab(name, "p", "true")


def test_invalid_spec_exits_2_with_one_line_and_creates_nothing(tmp_path: Path) -> None:
    name = unique("bad")

    def spaces() -> list[str]:  # every namespace but other labs' (another lab may be changing meanwhile)
        found = sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []
        return [n for n in found if not n.startswith("klab_") or n.startswith(f"klab_{name}_")]

    before = spaces()
    bad = two_node_spec(name, [pause_pod("a;reboot", node="node1")])
    spec = write_spec(tmp_path, bad)
    proc = lab("up", str(spec), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "a;reboot" in lines[0] and spec.name in lines[0] and "Traceback" not in proc.stderr
    assert spaces() == before
    assert leftovers(name) == {"netns": [], "state": []}


def test_apply_and_delete_follow_host_local_ipam(lab_up, tmp_path: Path) -> None:
    name = unique("churn")
    lab_up(two_node_spec(name, [pause_pod("first", node="node1")]))
    extra = tmp_path / "extra.yaml"
    extra.write_text(json.dumps(agnhost_pod("web", "node2", 8080)))
    out = lab("apply", "--lab", name, "-f", str(extra)).stdout
    assert "pod default/web created (node2, 10.244.2.2)" in out
    assert in_lab(name, "first", "curl", "-s", "--max-time", "5", "http://10.244.2.2:8080/hostname") == "web"
    assert "unchanged" in lab("apply", "--lab", name, "-f", str(extra)).stdout
    lab("delete", "--lab", name, "pod", "web")
    assert "web" not in lab("status", name).stdout
    # host-local resumes after the last address it handed out: the recreated pod gets .3, not .2.
    assert "10.244.2.3" in lab("apply", "--lab", name, "-f", str(extra)).stdout
    leases = json.loads(Path(f"/run/kubenet-lab/{name}/ipam/node2.json").read_text())["leases"]
    assert list(leases) == ["10.244.2.3"]


def test_a_slash_24_node_takes_253_pods_and_refuses_the_254th(lab_up, tmp_path: Path) -> None:
    """The 254th pod is refused before any kernel work (the node's capacity is known); the runtime
    IPAM path (host-local exhaustion and rollback) is exercised in test_cni."""
    name = unique("full")
    spec = {"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"dns": {"enabled": False},  # its pod would be the 254th
                     "nodes": [{"name": "node1", "ip": "192.168.1.10"}],
                     "objects": [pause_pod(f"p{i}") for i in range(253)]}}
    lab_up(spec)
    info = json.loads(lab("status", name, "--json").stdout)
    assert len(info["pods"]) == 253
    assert {p["ip"] for p in info["pods"]} == {f"10.244.1.{i}" for i in range(2, 255)}
    one_more = tmp_path / "one-more.yaml"
    one_more.write_text(json.dumps(pause_pod("p253")))
    before = leftovers(name)["netns"]
    proc = lab("apply", "--lab", name, "-f", str(one_more), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "10.244.1.0/24" in proc.stderr and "253" in proc.stderr and "node1" in proc.stderr
    assert leftovers(name)["netns"] == before


@pytest.fixture
def run_folder_on_disk() -> None:
    """The tmpfs mounts of topo/memfs.py are made only where /run is a folder of a disk (this project's VM)
    and only when no lab exists."""
    if memfs.in_memory("/run"):
        pytest.skip("/run is held in memory on this machine already: the lab mounts nothing there")
    require(not os.path.exists(RUN), f"another lab or command uses {RUN} now (under CI: a leftover)")


def test_a_run_folder_on_disk_is_held_in_memory_while_labs_exist(lab_up, run_folder_on_disk) -> None:
    name = unique("memfs")
    pins_before = netns.list_names()
    lab_up(two_node_spec(name, [pause_pod("p", node="node1")]))
    assert memfs.ours(RUN) and memfs.in_memory(f"{RUN}/{name}/state.json")
    if not pins_before:  # (never over someone's pins: the next test)
        assert memfs.ours(netns.NETNS_DIR)
    assert "nameserver" in in_lab(name, "p", "cat", "/etc/resolv.conf")  # the pod's own file, from the tmpfs
    lab("down", name)
    assert not os.path.exists(RUN) and not memfs.ours(RUN) and not memfs.ours(netns.NETNS_DIR)


def test_a_namespace_pinned_by_someone_else_stays_visible(lab_up, run_folder_on_disk) -> None:
    name, theirs = unique("pins"), unique("theirs")
    subprocess.run(["ip", "netns", "add", theirs], check=True)
    try:
        folder = os.stat(netns.NETNS_DIR).st_dev
        lab_up(two_node_spec(name, [pause_pod("p", node="node1")]))
        assert os.stat(netns.NETNS_DIR).st_dev == folder and theirs in netns.list_names()  # nothing mounted over
        subprocess.run(["ip", "netns", "exec", theirs, "true"], check=True)
        lab("down", name)
        assert theirs in netns.list_names()
    finally:
        subprocess.run(["ip", "netns", "del", theirs], check=False)


def test_kill_9_right_after_the_run_folder_is_held_then_clean_releases_it(tmp_path: Path,
                                                                          run_folder_on_disk) -> None:
    name = unique("held")
    spec = write_spec(tmp_path, two_node_spec(name, [pause_pod("p", node="node1")]))
    crashed = lab("up", str(spec), check=False, env={"KUBENET_LAB_CRASH_AT": "up-run-dir"})
    assert crashed.returncode == -9 and memfs.ours(RUN)
    lab("clean")
    assert not os.path.exists(RUN) and not memfs.ours(RUN) and not memfs.ours(netns.NETNS_DIR)


def test_a_mount_template_made_before_the_run_folder_was_held_is_made_again(run_folder_on_disk) -> None:
    """A process that outlives labs (a test run, a benchmark) keeps its mount template: one copied before the
    run folder's tmpfs came would show the pods it makes the folder beneath, without their files."""
    from apiserver import state

    os.makedirs(RUN)
    try:
        netns.forget_template()
        netns.mount_template()  # copied while the run folder is on the disk
        state.prepare_run_dir()
        assert memfs.ours(RUN)
        with netns.in_mount_template():
            seen = os.stat(RUN).st_dev
        assert seen == os.stat(RUN).st_dev  # the tmpfs, as the machine shows it
    finally:
        netns.forget_template()
        state.release_run_dir()
    assert not os.path.exists(RUN) and not memfs.ours(RUN) and not memfs.ours(netns.NETNS_DIR)
