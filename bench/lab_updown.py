#!/usr/bin/env python3
"""How long `lab up` and `lab down` take, as a user sees them (the CLI, start to exit), for the seed lab
and for 50 nodes x 20 pods.

`lab down` returns only once the kernel has destroyed the pod and node namespaces (it waits for their
veth peers to vanish), so its time is counted until the kernel has finished, not just until the unmounts.

    sudo .venv/bin/python bench/lab_updown.py [--repeat 3] [--json FILE] [--only seed|1000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
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
        from lab.bench import remove_lab  # `lab down`, or the crash-safe teardown if the build never finished

        remove_lab(name)
        raise
    return up, down


def run_case(label: str, make: callable, repeat: int, folder: Path) -> dict:
    ups, downs = [], []
    for _ in range(repeat):
        up, down = updown_once(make, folder)
        ups.append(up)
        downs.append(down)
    return {"case": label, "up_s": ups, "down_s": downs,
            "up_median_s": statistics.median(ups), "down_median_s": statistics.median(downs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write every sample and the machine description here")
    parser.add_argument("--only", choices=["seed", "1000"])
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (it builds real labs)", file=sys.stderr)
        return 3
    cases = {"seed": ("seed lab (2 nodes, 3 agnhost pods)", seed_spec),
             "1000": ("50 nodes x 20 pods (1,000 pause pods)", lambda n: scale_spec(n, 50, 20))}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, (label, make) in cases.items():
            if args.only and args.only != key:
                continue
            results.append(run_case(label, make, args.repeat, Path(tmp)))
    print(f"{'case':42} {'up median':>10} {'up range':>14} {'down median':>12} {'down range':>14}")
    for r in results:
        print(f"{r['case']:42} {r['up_median_s']:9.2f}s {min(r['up_s']):6.2f}-{max(r['up_s']):.2f}s "
              f"{r['down_median_s']:11.2f}s {min(r['down_s']):6.2f}-{max(r['down_s']):.2f}s")
    if args.json:
        machine = {"kernel": platform.release(), "cores": os.cpu_count(), "python": platform.python_version()}
        Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
