"""Helpers for tests that build real labs: unique lab names, the CLI as a user runs it, leftover checks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kubelet import cgroups
from tests.conftest import require_root, require_tool
from topo import memfs, netns, process

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "labs" / "00-seed" / "lab.yaml"


@pytest.fixture(autouse=True)
def _needs_root_and_mininet() -> None:
    require_root()
    require_tool("mnexec")


def unique(prefix: str) -> str:
    """A lab name no developer's lab and no other test uses (labs are keyed by name)."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def lab(*args: str, check: bool = True, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `lab` CLI exactly as a user would (a separate process); `env` adds to the environment."""
    proc = subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **env} if env else None)
    if check and proc.returncode != 0:
        raise AssertionError(f"lab {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def in_lab(name: str, target: str, *cmd: str, check: bool = True, timeout: float = 30) -> str:
    return lab("exec", "--lab", name, target, "--", *cmd, check=check, timeout=timeout).stdout


def write_spec(tmp: Path, data: dict) -> Path:
    path = tmp / f"{data['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def seed_spec(name: str) -> dict:
    data = yaml.safe_load(SEED.read_text())
    data["metadata"]["name"] = name
    return data


def pause_pod(name: str, node: str | None = None, namespace: str = "default", **labels: str) -> dict:
    spec: dict = {"containers": [{"name": "pause", "image": "pause"}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": "x"}}, "spec": spec}


def leftovers(name: str) -> dict[str, list]:
    """Everything of a lab still on the machine: namespaces, processes (in them, or naming the lab, as
    FRR daemons' paths do), state files."""
    prefix = f"klab_{name}_"
    spaces = sorted(n for n in os.listdir("/run/netns") if n.startswith(prefix)) if os.path.isdir("/run/netns") else []
    inodes = [i for n in spaces if (i := netns.inode(n)) is not None]
    pids = [p for p in process.pids_in_netns(inodes) if process.alive(p)]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"/run/kubenet-lab/{name}/" in Path(f"/proc/{pid}/cmdline").read_text() and process.alive(int(pid)):
                pids.append(int(pid))
        except OSError:
            pass
    state_dir = Path("/run/kubenet-lab") / name
    found = {"netns": spaces, "state": [str(state_dir)] if state_dir.exists() else []}
    # the cilium profile's bpffs pins and cgroups (its programs hang off those and the lab's devices)
    bpf = [str(p) for p in (Path("/sys/fs/bpf/kubenet-lab") / name, Path(f"/sys/fs/cgroup/unified/{prefix[:-1]}"))
           if p.exists()]
    if bpf:
        found["bpf"] = bpf
    groups = cgroups.leftovers(name)  # CPU limits: the lab's cgroup tree (kubelet/cgroups.py)
    if groups:
        found["cgroups"] = groups
    if pids:
        found["processes"] = sorted(set(pids))
    if not Path("/run/kubenet-lab").exists():  # no lab left: nor the tmpfs mounts held for labs (topo/memfs.py;
        # /run/netns's stays while it holds someone else's pins, such as a test's scratch namespace)
        held = [p for p in ("/run/kubenet-lab", netns.NETNS_DIR) if memfs.ours(p)
                and not (p == netns.NETNS_DIR and netns.list_names())]
        if held:
            found["mounts"] = held
    return found


def kill_up_mid_way(spec: Path, name: str, *extra: str) -> None:
    """Start `lab up` of a spec big enough to take a while, and kill it (SIGKILL) once it has made 60 pod
    namespaces and started pause processes in some: what a crash in the middle of a build leaves. The
    command has ended when this returns."""
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "up", *extra, str(spec)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (len((made := leftovers(name))["netns"]) < 60
                                               or "pause" not in map(_comm, made.get("processes", []))):
            time.sleep(0.005)
        assert proc.poll() is None, "lab up finished before it could be killed: make the lab bigger"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.fixture
def lab_up(tmp_path: Path) -> Iterator:
    """Bring up labs from spec dicts; every lab brought up is taken down (and checked) at the end."""
    made: list[str] = []

    def up(data: dict, *extra: str) -> subprocess.CompletedProcess[str]:
        made.append(data["metadata"]["name"])
        return lab("up", str(write_spec(tmp_path, data)), *extra)

    yield up
    for name in made:
        lab("down", name, check=False)
        assert leftovers(name) == {"netns": [], "state": []}
