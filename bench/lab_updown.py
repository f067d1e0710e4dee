#!/usr/bin/env python3
"""How long `lab up` and `lab down` take, as a user sees them (the CLI, start to exit), for the seed lab
for the seed lab with the cilium profile
(side by side with the default profile), and for 50 nodes x 20 pods.

`lab down` returns only once the kernel has destroyed the pod and node namespaces (it waits for their
veth peers to vanish), so its time is counted until the kernel has finished, not just until the unmounts.

    .venv/bin/python bench/lab_updown.py [--repeat 3] [--json FILE] [--plot DIR]   (= lab bench updown)
"""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def scale_spec(name: str, nodes: int, pods_per_node: int) -> dict:
    return {
        "apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
        "spec": {
            "nodes": [{"name": f"node{i + 1}", "ip": f"192.168.1.{10 + i}"} for i in range(nodes)],
            "objects": [{
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "pause"},
                "spec": {"replicas": nodes * pods_per_node, "selector": {"matchLabels": {"app": "pause"}},
                         "template": {"metadata": {"labels": {"app": "pause"}},
                                      "spec": {"containers": [{"name": "pause", "image": "pause"}]}}},
            }],
        },
    }


def seed_spec(name: str) -> dict:
    data = yaml.safe_load((REPO / "labs" / "00-seed" / "lab.yaml").read_text())
    data["metadata"]["name"] = name
    return data


def cilium_seed_spec(name: str) -> dict:
    """The seed lab with `cni.profile: cilium` and nothing else changed (its host-gw backend makes it
    routingMode native): what issue 18's `lab up` ratio compares with the default profile."""
    data = seed_spec(name)
    data["spec"]["cni"] = {"profile": "cilium"}
    return data


def timed(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def updown_once(make: callable, folder: Path) -> tuple[float, float]:
    """Time one `lab up` and one `lab down` of the lab `make(name)` describes. If anything fails or is
    interrupted before the timed `lab down`, the lab is taken down anyway."""
    name = f"bench-{uuid.uuid4().hex[:6]}"
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(make(name)))
    try:
        up = timed("up", str(path))
        down = timed("down", name)
    except BaseException:
        from lab.bench_base import remove_lab  # `lab down`, or the crash-safe teardown if the build never finished

        remove_lab(name)
        raise
    return up, down


if __name__ == "__main__":
    from lab.bench_base import script_main

    sys.exit(script_main("updown", __doc__))
