"""What a change costs as a lab grows: `lab up` of N pods behind one Service, then one-pod `lab apply`
and `lab delete`, `lab status`, and `lab down`, each timed as the CLI runs it (a fresh process, as a user
types it). The seed lab is the baseline: a one-pod change should cost about the same at 1,000 or 10,000
pods (issue 15's targets), because the reconciler touches that pod, the rules of the services that
select it and nothing else. For `lab up` and the one-pod apply it also says where the CPU went meanwhile
(the command, the machine, PID 1), so a figure taken on a busy or shared machine can be read for what it is,
and what of `lab up`'s CPU is the kernel loading kube-proxy's rules into every node (estimated from three).

    python bench/scale.py [--sizes 1000,10000] [--repeat N] [--json FILE] [--plot DIR]
    (the same as: lab bench scale --sizes 1000,10000 ...)
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from lab_updown import scale_spec as deployment_spec, seed_spec, timed  # noqa: E402 (bench/ on the path)

__all__ = ["measure", "scale_spec", "seed_spec", "shape"]  # what lab bench scale uses (seed_spec: the baseline)
CHANGES = 3  # one-pod apply/delete pairs per lab: their median is the sample


def shape(pods: int) -> tuple[int, int]:
    """Nodes x pods per node for a size: 1,000 is 50 x 20 and 10,000 is 100 x 100 (the issue's shapes)."""
    if pods >= 10_000:
        return 100, pods // 100
    return max(2, min(50, pods // 20)), max(1, pods // max(2, min(50, pods // 20)))


def scale_spec(name: str, pods: int) -> dict:

    nodes, per_node = shape(pods)
    data = deployment_spec(name, nodes, per_node)
    data["spec"]["objects"].append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "all"},
                                    "spec": {"selector": {"app": "pause"}, "ports": [{"port": 80}]}})
    return data


def _timed(*args: str) -> float:
    quiet = ["-q"] if args[0] in ("up", "down", "apply", "delete") else []  # no progress bar in the timing
    return timed(*args, *quiet)


def _cpu_now() -> tuple[float, float, float]:
    """CPU seconds used so far by this process's finished children (a timed command and what it waited for),
    by the whole machine (busy time in /proc/stat), and by PID 1."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    with open("/proc/1/stat") as fh:
        pid1 = fh.read().rsplit(")", 1)[1].split()
    return _children_cpu(), busy / tick, (int(pid1[11]) + int(pid1[12])) / tick


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children, so far."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime


def _timed_cpu(prefix: str, *args: str) -> dict[str, float]:
    """A command's wall time, and where the CPU went meanwhile: the command itself with the processes it ran
    (`_cpu_s`), the whole machine (`_machine_cpu_s`: the kernel's work for the lab, softirqs, anything else)
    and PID 1 (`_pid1_cpu_s`). On an ordinary machine PID 1 (systemd) is idle; on the VM these figures were
    taken on, PID 1 is its supervisor, which was measured spending CPU on every process held in a network
    namespace of its own: a lab's pause processes (docs/benchmarks.md, issue 15's tenth step)."""
    before = _cpu_now()
    wall = _timed(*args)
    after = _cpu_now()
    own, machine, pid1 = (b - a for a, b in zip(before, after))
    return {f"{prefix}_s": wall, f"{prefix}_cpu_s": own, f"{prefix}_machine_cpu_s": machine, f"{prefix}_pid1_cpu_s": pid1}


def rule_loads_cpu(name: str) -> float | None:
    """CPU seconds that loading kube-proxy's rules costs in all of a running lab's nodes, estimated from three:
    the saved restore input of its first, middle and last node (the full text `lab up` loaded there), each
    loaded by the same loader into a fresh scratch namespace (empty tables, as at `lab up`; a lab-shaped
    name that `lab clean` removes after a crash); the median load times the number of nodes. Every node's
    rules hold every endpoint of the Service (kube-proxy's layout), so the loads are alike, and at 10,000
    pods they are most of the build's CPU. The loader's CPU (user + sys), not its wall time, which a busy
    machine stretches. None outside iptables mode. The lab itself is not touched."""
    from apiserver import desired, state
    from services import kube_proxy
    from topo import names, netns

    lab = desired.current_lab(state.load_running(name))
    if lab.kube_proxy.mode != "iptables" or not lab.nodes:
        return None
    backend = kube_proxy.iptables_backend(lab.kube_proxy)
    samples = []
    for node in sorted({lab.nodes[0].name, lab.nodes[len(lab.nodes) // 2].name, lab.nodes[-1].name}):
        saved = kube_proxy.saved_rules(state.kube_proxy_dir(name), node)
        scratch = names.node_netns(f"kpload{uuid.uuid4().hex[:6]}", "node")
        netns.create(scratch)
        try:
            before = _children_cpu()
            kube_proxy.load(scratch, kube_proxy.iptables_restore(backend), saved, kube_proxy.loader_env(backend, saved))
            samples.append(_children_cpu() - before)
        finally:
            netns.delete(scratch)
    return statistics.median(samples) * len(lab.nodes)


def namespaces_held() -> int | None:
    """Network namespaces the kernel holds, freed by nobody yet or not: the `net_namespace` slab's active
    objects in /proc/slabinfo (None where that cache is merged into another or the file is not readable)."""
    try:
        with open("/proc/slabinfo") as fh:
            for line in fh:
                if line.startswith("net_namespace "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


# The slab's count of active objects is not exact (objects cached per CPU count as used: it moved between
# 29 and 35 on an idle machine here), so "back to where it was" allows a few slabs' worth.
SLAB_SLACK = 32


def kernel_freed(before: int | None, started: float, timeout: float = 120.0) -> float | None:
    """Seconds from `started` until the kernel has freed the lab's namespaces (back to `before`): `lab down`
    returns once the lab's links are gone, and the kernel's cleanup worker goes on freeing the emptied
    namespaces. Waiting here keeps that work out of the next measurement, and the figure is reported."""
    if before is None:
        return None
    deadline = started + timeout
    while time.monotonic() < deadline:
        held = namespaces_held()
        if held is None or held <= before + SLAB_SLACK:
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def measure(make: callable, folder: Path) -> dict[str, float]:
    """One lab's life: up, CHANGES one-pod apply/delete pairs, status, kube-proxy's rule loads again outside
    the lab (`rule_loads_cpu`), down (and how long the kernel took to free the namespaces after it). If anything
    fails, the lab is taken down anyway (`lab down`, or the crash-safe teardown)."""
    name = f"bench-{uuid.uuid4().hex[:6]}"
    spec, pod = folder / f"{name}.yaml", folder / f"{name}-pod.yaml"
    spec.write_text(yaml.safe_dump(make(name)))
    pod.write_text(json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "one", "labels": {"app": "one"}},
                               "spec": {"nodeName": "node1", "containers": [{"name": "p", "image": "pause"}]}}))
    before = namespaces_held()
    try:
        up = _timed_cpu("up", "up", str(spec))
        applies, deletes = [], []
        for _ in range(CHANGES):
            applies.append(_timed_cpu("apply_one", "apply", "--lab", name, "-f", str(pod)))
            deletes.append(_timed("delete", "--lab", name, "-f", str(pod)))
        status = _timed("status", name)
        rules = rule_loads_cpu(name)
        started = time.monotonic()
        down = _timed("down", name)
        freed = kernel_freed(before, started)
    except BaseException:
        from lab.bench_base import remove_lab

        remove_lab(name)
        raise
    apply_one = {key: statistics.median(a[key] for a in applies) for key in applies[0]}
    return {**up, **({"up_rule_loads_cpu_s": rules} if rules is not None else {}), **apply_one,
            "delete_one_s": statistics.median(deletes),
            "status_s": status, "down_s": down, **({"down_freed_s": freed} if freed is not None else {})}


if __name__ == "__main__":
    from lab.bench_base import script_main

    sys.exit(script_main("scale", __doc__))
