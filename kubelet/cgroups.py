"""A container's CPU limit (`resources.limits.cpu`) as kubelet enforces it: a CFS bandwidth quota on the
cgroup its process runs in.

kubelet turns a limit of M millicores into `quota = M * period / 1000` with a 100 ms period and a floor
of 1 ms of quota (its MilliCPUToQuota): 100m is 10 ms of CPU time every 100 ms. A process over its quota
is throttled until the next period, which is how an overloaded CoreDNS with a limit shows up: as latency
and timeouts, not as a server that is infinitely fast.

Where the cgroups live: in a per-lab tree `kubenet-lab/<lab>/<pod namespace>/<container>` under the
hierarchy that has the `cpu` controller, never in the machine's root cgroup itself:

* cgroup v1 (`/sys/fs/cgroup/cpu`, files `cpu.cfs_period_us` and `cpu.cfs_quota_us`), preferred when it
  is mounted: the hybrid layout this project's CI runs on (measured: /sys/fs/cgroup/unified offers only
  `hugetlb`, `cpu` is a v1 hierarchy) has the controller only there;
* cgroup v2 (`cpu.max` = "QUOTA PERIOD"), on a unified-only machine (`/sys/fs/cgroup` is cgroup2) or a
  hybrid one whose cgroup2 mount offers `cpu`: the controller is enabled in `kubenet-lab`'s
  subtree_control (and in the mount root's, which a v2 child needs).

A process is moved into its cgroup right after it is spawned (it runs unthrottled for that instant).
Removing: every lab cgroup is emptied of processes (they are the lab's) and removed bottom-up by
`remove_lab` (`lab down`, `lab clean`, also after kill -9) and `remove_pod`; the shared `kubenet-lab`
folder is left, empty, like /run/kubenet-lab.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from topo.errors import ApplyError

TREE = "kubenet-lab"
PERIOD_US = 100_000  # kubelet's CFS period (--cpu-cfs-quota-period default)
MIN_QUOTA_US = 1_000  # kubelet's MinQuotaPeriod
V1 = Path("/sys/fs/cgroup/cpu")
V2_CANDIDATES = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))


def quota_us(millis: int, period: int = PERIOD_US) -> int:
    """kubelet's MilliCPUToQuota: the quota in microseconds per `period` for `millis` millicores."""
    return max(millis * period // 1000, MIN_QUOTA_US)


def _v2_root() -> Path | None:
    for root in V2_CANDIDATES:
        controllers = root / "cgroup.controllers"
        with contextlib.suppress(OSError):
            if "cpu" in controllers.read_text().split():
                return root
    return None


def hierarchy() -> tuple[str, Path]:
    """("v1", /sys/fs/cgroup/cpu) or ("v2", the cgroup2 mount offering cpu); ApplyError when neither."""
    if (V1 / "cpu.cfs_quota_us").exists():
        return "v1", V1
    root = _v2_root()
    if root is not None:
        return "v2", root
    raise ApplyError("no cgroup hierarchy with the cpu controller (neither /sys/fs/cgroup/cpu nor a cgroup2 mount "
                     "offering cpu): a CPU limit cannot be enforced on this machine")


def lab_roots() -> list[Path]:
    """Every place a lab's cgroups can be (both versions), for removal."""
    roots = [V1 / TREE] + [root / TREE for root in V2_CANDIDATES]
    return [r for r in roots if r.is_dir()]


def path_of(lab: str, pod_netns: str, container: str) -> Path:
    return hierarchy()[1] / TREE / lab / pod_netns / container


def limit(lab: str, pod_netns: str, container: str, pid: int, millis: int) -> Path:
    """Put `pid` in its container's cgroup with a quota of `millis` millicores; returns the cgroup."""
    version, root = hierarchy()
    folder = root / TREE / lab / pod_netns / container
    if version == "v2":
        _enable_v2(root)
    folder.mkdir(parents=True, exist_ok=True)
    if version == "v1":
        (folder / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (folder / "cpu.cfs_quota_us").write_text(str(quota_us(millis)))
    else:
        for parent in [folder.parent.parent, folder.parent]:  # the controller must be on along the path
            _enable(parent)
        (folder / "cpu.max").write_text(f"{quota_us(millis)} {PERIOD_US}")
    (folder / "cgroup.procs").write_text(str(pid))
    return folder


def _enable(folder: Path) -> None:
    with contextlib.suppress(OSError):
        (folder / "cgroup.subtree_control").write_text("+cpu")


def _enable_v2(root: Path) -> None:
    (root / TREE).mkdir(exist_ok=True)
    _enable(root)
    _enable(root / TREE)


def quota_of(folder: Path) -> tuple[int, int] | None:
    """(quota, period) in microseconds as the kernel holds them (None: no limit or no such cgroup)."""
    try:
        if (folder / "cpu.cfs_quota_us").exists():
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            return (quota, int((folder / "cpu.cfs_period_us").read_text())) if quota > 0 else None
        text = (folder / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if text[0] == "max" else (int(text[0]), int(text[1]))


def throttled(folder: Path) -> dict[str, int]:
    """cpu.stat of a cgroup: nr_periods, nr_throttled, throttled time (v1 ns `throttled_time`, v2 µs)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in (folder / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
    return out


def _remove_tree(folder: Path) -> None:
    """Remove a cgroup tree bottom-up, killing what still runs in it (only lab processes are put there)."""
    if not folder.is_dir():
        return
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _remove_one(sub)
    _remove_one(folder)


def _remove_one(folder: Path) -> None:
    deadline = time.monotonic() + 2.0
    while True:
        with contextlib.suppress(OSError, ValueError):
            for pid in (folder / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
        try:
            folder.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # a killed process leaves its cgroup when it has exited


def remove_lab(lab: str) -> None:
    """The lab's cgroup tree, and the shared kubenet-lab folder above it once no lab has one (a cgroup folder
    is removed only when empty, so another lab's tree is never touched)."""
    for root in lab_roots():
        _remove_tree(root / lab)
        with contextlib.suppress(OSError):
            root.rmdir()


def remove_pod(lab: str, pod_netns: str) -> None:
    for root in lab_roots():
        _remove_tree(root / lab / pod_netns)


def leftovers(lab: str) -> list[str]:
    """The lab's cgroups still on the machine (for `lab down`'s checks and the tests)."""
    return [str(root / lab) for root in lab_roots() if (root / lab).exists()]
