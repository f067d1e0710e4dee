"""What a running lab consists of, as a table for people and JSON for scripts."""
from __future__ import annotations

from typing import Any

from lab import runtime, state
from topo.model import Lab
from topo.spec import parse_spec_text


def model_of(st: state.LabState) -> Lab:
    """The model of a running lab, re-derived from the spec text it was built from."""
    return parse_spec_text(st.spec_text, st.spec_file)


def describe(st: state.LabState) -> dict[str, Any]:
    lab = model_of(st)
    nodes = [{"name": n.name, "ip": str(n.ip), "podCIDR": str(n.pod_cidr), "gateway": str(n.gateway.ip),
              "netns": lab.node_netns(n.name)} for n in lab.nodes]
    pods = []
    for key, pod in sorted(st.pods.items(), key=lambda kv: (kv[1].node, kv[0])):
        namespace, name = key.split("/", 1)
        running = runtime.sandbox_alive(pod.netns, pod.pause_pid)
        pods.append({"namespace": namespace, "name": name, "node": pod.node, "ip": pod.ip,
                     "netns": pod.netns, "status": "Running" if running else "Dead",
                     "containers": pod.containers})
    return {"name": st.name, "phase": st.phase, "spec": st.spec_file, "exercise": st.exercise,
            "backend": lab.network.backend, "mtu": lab.network.mtu,
            "underlay": str(lab.underlay.subnet), "podCIDR": str(lab.cluster.pod_cidr),
            "serviceCIDR": str(lab.cluster.service_cidr), "nodes": nodes, "pods": pods}


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def render(info: dict[str, Any]) -> str:
    head = (f"lab {info['name']} ({info['phase']}): backend {info['backend']}, MTU {info['mtu']}, "
            f"underlay {info['underlay']}, pods {info['podCIDR']}, services {info['serviceCIDR']}")
    nodes = [["NODE", "IP", "PODCIDR", "CNI0"]] + [
        [n["name"], n["ip"], n["podCIDR"], n["gateway"]] for n in info["nodes"]]
    pods = [["POD", "NAMESPACE", "NODE", "IP", "STATUS"]] + [
        [p["name"], p["namespace"], p["node"], p["ip"], p["status"]] for p in info["pods"]]
    return "\n\n".join([head, table(nodes), table(pods) if info["pods"] else "(no pods)"])
