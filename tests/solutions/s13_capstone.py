"""Reference solution of labs/13-capstone: undo whatever random faults the lab got.

Unlike a learner, the solution reads which faults were applied (the lab's faults.json, where `lab break`
and `lab up` record them, and which `lab status` does not show for random faults) instead of diagnosing
them; each repair uses only what a learner has: `lab exec` (ip, bridge), `lab delete` and `lab apply`,
with values read off the live lab.
"""
from __future__ import annotations

import json
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import yaml

from tests.solutions.late_common import apply, lab, main, run_in, status

RUN_DIR = Path("/run/kubenet-lab")
UNDERLAY_MTU = 1500


def applied_faults(name: str) -> list[dict[str, Any]]:
    path = RUN_DIR / name / "faults.json"
    return json.loads(path.read_text()) if path.exists() else []


def _pod(info: dict, key: str) -> dict:
    namespace, _, pod = key.rpartition("/")
    return next(p for p in info["pods"] if p["name"] == pod and p["namespace"] == (namespace or "default"))


def _node(info: dict, name: str) -> dict:
    return next(n for n in info["nodes"] if n["name"] == name)


def fix_route(name: str, info: dict, on: str, to: str) -> None:
    owner = next(n for n in info["nodes"] if n["podCIDR"] == to)
    if run_in(name, on, "ip", "link", "show", "flannel.1", check=False).strip():
        via = str(IPv4Network(to).network_address)  # Flannel's VXLAN route: via the remote VTEP's /32
        run_in(name, on, "ip", "route", "replace", to, "via", via, "dev", "flannel.1", "onlink")
    else:
        run_in(name, on, "ip", "route", "replace", to, "via", owner["ip"])


def fix_link_down(name: str, info: dict, target: str, dev: str) -> None:
    run_in(name, target, "ip", "link", "set", "dev", dev, "up")
    if any(n["name"] == target for n in info["nodes"]):
        return
    pod = _pod(info, target)  # the kernel dropped the pod's default route with its link
    run_in(name, target, "ip", "route", "replace", "default", "via", _node(info, pod["node"])["gateway"])


def fix_fdb(name: str, info: dict, on: str, dev: str) -> None:
    for other in info["nodes"]:
        if other["name"] == on:
            continue
        mac = json.loads(run_in(name, other["name"], "ip", "-j", "link", "show", "dev", dev))[0]["address"]
        run_in(name, on, "bridge", "fdb", "replace", mac, "dev", dev, "dst", other["ip"], "self", "permanent")


def resync_kube_proxy(name: str) -> None:
    """Missing kube-proxy rules, on any number of nodes: kube-proxy rewrites every node's rules when a
    Service changes, so make a change and take it back (a throwaway Service, applied and deleted). Copying
    the rule from another node would fail when the same rule is gone on every node."""
    apply(name, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "resync"},
                 "spec": {"selector": {"app": "resync"}, "ports": [{"name": "http", "port": 80}]}})
    lab("delete", "--lab", name, "service", "resync")


def fix_label(name: str, info: dict, key: str) -> None:
    """Re-apply the pod's manifest from the exercise's lab.yaml: like kubectl apply, a pod whose labels
    differ is relabelled in place, and the Service selects it again."""
    _namespace, _, pod = key.rpartition("/")
    spec = yaml.safe_load((Path(info["exercise"]) / "lab.yaml").read_text())
    manifest = next(o for o in spec["spec"]["objects"] if o["kind"] == "Pod" and o["metadata"]["name"] == pod)
    apply(name, manifest)


def fix_veth(name: str, info: dict, key: str) -> None:
    pod = _pod(info, key)
    peer = json.loads(run_in(name, key, "ip", "-j", "link", "show", "dev", "eth0"))[0]["link_index"]
    links = json.loads(run_in(name, pod["node"], "ip", "-j", "link", "show"))
    veth = next(link["ifname"] for link in links if link["ifindex"] == peer)
    run_in(name, pod["node"], "ip", "link", "set", "dev", veth, "master", "cni0")
    run_in(name, pod["node"], "bridge", "link", "set", "dev", veth, "hairpin", "on")


def solve(name: str) -> None:
    rules_gone = False
    for fault in applied_faults(name):
        info = status(name)  # fresh: an earlier repair may have recreated a pod
        p = fault["params"]
        kind = fault["fault"]
        if kind == "route-delete":
            fix_route(name, info, p["in"], p["to"])
        elif kind == "link-mtu":
            run_in(name, p["in"], "ip", "link", "set", "dev", p["dev"], "mtu", str(UNDERLAY_MTU))
        elif kind == "link-down":
            fix_link_down(name, info, p["in"], p["dev"])
        elif kind == "fdb-flush":
            fix_fdb(name, info, p["in"], p["dev"])
        elif kind == "rule-delete":
            rules_gone = True  # one resync at the end restores them all
        elif kind == "label":
            fix_label(name, info, p["pod"])
        elif kind == "veth-detach":
            fix_veth(name, info, p["pod"])
        else:
            raise RuntimeError(f"the capstone's solution does not know fault {kind}")
    if rules_gone:
        resync_kube_proxy(name)


if __name__ == "__main__":
    main(solve)
