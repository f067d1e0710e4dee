"""The pods a node's kubelet reports: each pod of the lab's model with its IP, ready while its sandbox lives.

This is what the endpoints controller reads (services, DNS, policies): kept next to the runtime that knows
whether a sandbox is alive.
"""
from __future__ import annotations

from ipaddress import IPv4Address

from apiserver import state
from kubelet import runtime
from services.endpoints import RunningPod
from topo.model import Lab


def running_pods(st: state.LabState, lab: Lab) -> list[RunningPod]:
    """The lab's pods with their IPs, ready while their sandbox lives (what the endpoints controller sees)."""
    out = []
    for pod in lab.pods:
        ps = st.pods.get(pod.key)
        if ps is None:
            continue  # not started yet
        out.append(RunningPod(pod, IPv4Address(ps.ip), runtime.sandbox_alive(ps.netns, ps.pause_pid)))
    return out
