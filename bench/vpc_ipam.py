#!/usr/bin/env python3
"""How many pods fit in one small VPC subnet under each Amazon VPC CNI setting (the aws-vpc profile), computed
from the ipamd model and observed on a running lab, against a PodCIDR overlay; and how long `lab apply` of one
pod takes when ipamd's warm pool holds an address and when it must grow first.

The subnet is 10.0.0.0/27 (32 addresses, 27 after AWS's 5 reserved) with three t3.medium nodes (3 ENIs x 6
addresses, max pods 17). A Deployment's replicas are placed in turn on node1, node2, node3 (the lab's
scheduler). Two numbers per setting: "first waits after" is how many pods run when the first one is left
without an address (the cluster "stops scaling"), "fit at most" how many run when the Deployment asks for
everything the nodes' max pods allow (the rest stay ContainerCreating). The computed numbers come from the
same placement run through `cni.vpc_ipamd` without a kernel; the observed ones from `lab status` of a running
lab: built with the first number of replicas, scaled by one (that pod must wait), then scaled to the nodes'
max pods. docs/vpc-ipam.md explains each row by hand.

    .venv/bin/python bench/vpc_ipam.py [--repeat 3] [--json FILE] [--plot DIR]   (= lab bench ipam)
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SUBNET = "10.0.0.0/27"
INSTANCE = "t3.medium"
NODES = 3
SETTINGS: dict[str, dict | None] = {  # name -> spec.cni (None: a Flannel PodCIDR overlay, /24 per node)
    "default (WARM_ENI_TARGET=1)": {"profile": "aws-vpc"},
    "WARM_IP_TARGET=1": {"profile": "aws-vpc", "env": {"WARM_IP_TARGET": "1"}},
    "WARM_IP_TARGET=2, MINIMUM_IP_TARGET=4": {"profile": "aws-vpc",
                                              "env": {"WARM_IP_TARGET": "2", "MINIMUM_IP_TARGET": "4"}},
    "prefix delegation": {"profile": "aws-vpc", "env": {"ENABLE_PREFIX_DELEGATION": "true"}},
    "custom networking (100.64.0.0/24)": {"profile": "aws-vpc", "env": {"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true"},
                                          "eniConfig": {"subnet": "100.64.0.0/24"}},
    "PodCIDR overlay (flannel, /24 per node)": None,
}
QUICK = ("default (WARM_ENI_TARGET=1)", "WARM_IP_TARGET=1")


def spec(name: str, setting: str, replicas: int = 0) -> dict:
    cni = SETTINGS[setting]
    nodes = [{"name": f"node{i + 1}", "ip": f"10.0.0.{10 + i}", **({"instanceType": INSTANCE} if cni else {})}
             for i in range(NODES)]
    body: dict = {"underlay": {"subnet": SUBNET}, "dns": {"enabled": False}, "nodes": nodes}
    body["cni"] = cni if cni else {"profile": "flannel"}
    if replicas:
        body["objects"] = [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "fill"},
                            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "fill"}},
                                     "template": {"metadata": {"labels": {"app": "fill"}},
                                                  "spec": {"containers": [{"name": "pause", "image": "pause"}]}}}}]
    return {"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name}, "spec": body}


def capacity(setting: str) -> int:
    """The replicas asked for: what the nodes' max pods (or PodCIDRs) allow, so the subnet is what limits."""
    from apiserver.spec import parse_spec_text

    lab = parse_spec_text(yaml.safe_dump(spec("bench-x", setting)))
    return sum(n.pod_capacity for n in lab.nodes)


def computed(setting: str) -> tuple[int, int]:
    """(first waits after, fit at most) from the ipamd model alone (replica i on node i mod 3, as placed)."""
    from apiserver.spec import parse_spec_text
    from cni import vpc_ipamd

    replicas = capacity(setting)
    lab = parse_spec_text(yaml.safe_dump(spec("bench-x", setting)))
    if lab.cni.profile != "aws-vpc":
        return replicas, replicas  # a PodCIDR holds its pods whatever the subnet: only node addresses use it
    ipamd = vpc_ipamd.fresh(lab)
    fit, first = 0, None
    for i in range(replicas):
        try:
            ipamd.assign(lab.nodes[i % NODES].name, f"c{i}")
            fit += 1
        except vpc_ipamd.IpamdExhausted:
            first = fit if first is None else first
    return (fit if first is None else first), fit


def _cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lab {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _running(name: str) -> int:
    return sum(p["status"] == "Running" for p in json.loads(_cli("status", name, "--json"))["pods"])


def _scale(name: str, setting: str, replicas: int, folder: Path) -> None:
    path = folder / f"{name}-{replicas}.yaml"
    path.write_text(yaml.safe_dump(spec(name, setting, replicas)["spec"]["objects"][0]))
    _cli("apply", "--lab", name, "-f", str(path))


def observed(setting: str, folder: Path) -> dict[str, float]:
    """The lab built with `first` replicas (all must run), scaled to first + 1 (that one must wait), then to
    the nodes' capacity; what runs at each step, as `lab status` shows it."""
    first, most = computed(setting)
    name = f"bench-ipam-{uuid.uuid4().hex[:4]}"
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec(name, setting, first), sort_keys=False))
    try:
        _cli("up", str(path))
        running = _running(name)
        out = {"computed_first": first, "computed_most": most}
        if SETTINGS[setting] is not None and first < capacity(setting):
            _scale(name, setting, first + 1, folder)
            out["observed_first"] = running if _running(name) == running else running + 1
            _scale(name, setting, capacity(setting), folder)
            out["observed_most"] = _running(name)
        else:  # max pods (or the overlay's PodCIDRs) are reached at `first`: nothing more can be placed
            out["observed_first"] = out["observed_most"] = running
        return {k: float(v) for k, v in out.items()}
    finally:
        subprocess.run([sys.executable, "-m", "lab.cli", "down", name], cwd=REPO, capture_output=True)


def wait_for_address(folder: Path, warm: bool) -> float:
    """Seconds `lab apply` takes for one pod when the node's pool has a warm address (default settings) and
    when it is empty (WARM_IP_TARGET=0, MINIMUM_IP_TARGET=0: ipamd assigns on demand)."""
    name = f"bench-ipam-{uuid.uuid4().hex[:4]}"
    data = spec(name, "default (WARM_ENI_TARGET=1)")
    if not warm:
        data["spec"]["cni"] = {"profile": "aws-vpc", "env": {"WARM_IP_TARGET": "0", "MINIMUM_IP_TARGET": "0"}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    pod = folder / f"{name}-pod.yaml"
    pod.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "one"},
                                   "spec": {"nodeName": "node1", "containers": [{"name": "pause", "image": "pause"}]}}))
    try:
        _cli("up", str(path))
        started = time.perf_counter()
        _cli("apply", "--lab", name, "-f", str(pod))
        return time.perf_counter() - started
    finally:
        subprocess.run([sys.executable, "-m", "lab.cli", "down", name], cwd=REPO, capture_output=True)


if __name__ == "__main__":
    from lab.bench_base import script_main

    sys.exit(script_main("ipam", __doc__))
