"""The cilium profile on the real kernel: pods wired the Cilium way (lxc veths, /32 routes, cilium_host, no
cni0), the tunnel driven by cilium_tunnel_map or native routes, socket-level load balancing (the pod never
sends a packet to the ClusterIP, yet sees it as its peer), the maps pinned per lab and node, incremental
map updates on `lab apply`/`lab delete`, nothing left after `lab down` even after a kill -9, and
a NetworkPolicy enforced. Service behaviour itself is shared with the other modes in test_services.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool
from tests.integration.conftest import REPO, in_lab, lab, leftovers, unique, write_spec

pytestmark = pytest.mark.integration

AGNHOST = [{"name": "app", "image": "agnhost", "args": ["netexec", "--http-port=8080", "--udp-port=8081"]}]


def pod(name: str, node: str, app: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": AGNHOST}}


def service(name: str, app: str, **spec: object) -> dict:
    port = {"name": "http", "port": 80, "targetPort": 8080}
    if "nodePort" in spec:
        port["nodePort"] = spec.pop("nodePort")
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": app}, "ports": [port], **spec}}


def cilium_lab(name: str, mode: str) -> dict:
    return {"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"cni": {"profile": "cilium", "routingMode": mode},
                     "nodes": [{"name": "node1", "ip": "192.168.1.10"}, {"name": "node2", "ip": "192.168.1.11"}],
                     "external": [{"name": "ext", "ip": "192.168.1.200"}],
                     "objects": [pod("web-1", "node1", "web"), pod("client", "node2", "client"),
                                 service("web", "web"), service("web-np", "web", type="NodePort", nodePort=30080)]}}


@pytest.fixture(scope="module", params=["tunnel", "native"])
def cil(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    require_root()
    require_tool("mnexec")
    require_tool("clang")
    name = unique(f"cil-{request.param[:3]}")
    lab("up", str(write_spec(tmp_path_factory.mktemp(name), cilium_lab(name, request.param))))
    info = json.loads(lab("status", name, "--json").stdout)
    yield {"name": name, "mode": request.param, "ips": {p["name"]: p["ip"] for p in info["pods"]},
           "vip": {s["name"]: s["clusterIP"] for s in info["services"]}}
    lab("down", name)
    assert leftovers(name) == {"netns": [], "state": []}


def test_pods_are_routed_through_lxc_veths_with_no_bridge(cil: dict) -> None:
    links = in_lab(cil["name"], "node1", "ip", "-o", "link")
    assert "cni0" not in links and "cilium_host" in links and "cilium_net" in links
    lxc = [l.split(":")[1].strip().split("@")[0] for l in links.splitlines() if ": lxc" in l]
    assert len(lxc) == 1 and len(lxc[0]) == 11, links  # lxc + 8 hex digits
    assert "10.244.1.1/32" in in_lab(cil["name"], "node1", "ip", "-o", "addr", "show", "cilium_host")
    assert f"{cil['ips']['web-1']} dev {lxc[0]} scope link" in in_lab(cil["name"], "node1", "ip", "route")
    assert "default via 10.244.2.1 dev eth0" in in_lab(cil["name"], "client", "ip", "route")
    assert f"{cil['ips']['client']}/32" in in_lab(cil["name"], "client", "ip", "-o", "addr", "show", "eth0")


def test_cross_node_traffic_takes_the_routing_mode(cil: dict) -> None:
    routes = in_lab(cil["name"], "node2", "ip", "route")
    if cil["mode"] == "tunnel":
        assert "10.244.1.0/24 dev cilium_vxlan" in routes
        details = in_lab(cil["name"], "node2", "ip", "-d", "link", "show", "cilium_vxlan")
        assert "external" in details and "dstport 8472" in details
        pinned = f"/sys/fs/bpf/kubenet-lab/{cil['name']}/node2/cilium_tunnel_map"
        dump = json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "pinned", pinned], capture_output=True,
                                         text=True, check=True).stdout)
        assert len(dump) == 1  # node1's PodCIDR -> node1's IP
    else:
        assert "10.244.1.0/24 via 192.168.1.10 dev eth0" in routes and "cilium_vxlan" not in routes
    out = in_lab(cil["name"], "client", "curl", "-s", "--max-time", "5", f"http://{cil['ips']['web-1']}:8080/clientip")
    assert out.split(":")[0] == cil["ips"]["client"]


def test_the_pod_never_sends_to_the_clusterip_yet_sees_it_as_its_peer(cil: dict) -> None:
    vip, backend = cil["vip"]["web"], cil["ips"]["web-1"]
    script = ("tcpdump -lni eth0 -c 4 tcp > /tmp/.cap 2>/dev/null & sleep 0.7; "
              f"python3 -c \"import socket; s=socket.create_connection(('{vip}', 80), 3); print(s.getpeername()[0])\"; "
              "wait; cat /tmp/.cap")
    out = in_lab(cil["name"], "client", "sh", "-c", script, timeout=30)
    peer, capture = out.splitlines()[0], "\n".join(out.splitlines()[1:])
    assert peer == vip  # getpeername4 translates back
    assert f"> {backend}.8080" in capture and vip not in capture, capture


def test_maps_are_pinned_with_ciliums_names_and_follow_apply_and_delete(cil: dict, tmp_path: Path) -> None:
    pinned = Path(f"/sys/fs/bpf/kubenet-lab/{cil['name']}/node2")
    names = {p.name for p in pinned.iterdir()}
    assert {"cilium_lb4_services_v2", "cilium_lb4_backends_v3", "cilium_lb4_reverse_nat",
            "cilium_tunnel_map"} <= names

    def backends() -> int:
        out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pinned / "cilium_lb4_backends_v3")],
                             capture_output=True, text=True, check=True).stdout
        return len(json.loads(out))

    before = backends()
    extra = tmp_path / "web-2.yaml"
    extra.write_text(json.dumps(pod("web-2", "node2", "web")))
    lab("apply", "--lab", cil["name"], "-f", str(extra))
    assert backends() == before + 1
    lab("delete", "--lab", cil["name"], "pod", "web-2")
    assert backends() == before


def test_a_network_policy_is_enforced_on_the_lxc_veths_and_removed(cil: dict, tmp_path: Path) -> None:
    """web-1 admits only pods labelled app=client (on 8080): the client still gets through the ClusterIP
    (the socket LB picked web-1, the policy judged the real destination), a NodePort connection from outside
    (SNATed to node2: identity remote-node) is dropped, and deleting the policy opens it again.
    tests/integration/test_policy.py runs the full truth tables in this profile."""
    policy = tmp_path / "web-from-client.yaml"
    policy.write_text(json.dumps({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                  "metadata": {"name": "web-from-client"},
                                  "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
                                      {"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                       "ports": [{"port": 8080}]}]}}))
    url = "http://192.168.1.11:30080/hostname"
    assert lab("apply", "--lab", cil["name"], "-f", str(policy)).stderr == ""  # enforced: no warning
    try:
        assert in_lab(cil["name"], "client", "curl", "-s", "--max-time", "5", f"http://{cil['vip']['web']}/hostname") == "web-1"
        proc = lab("exec", "--lab", cil["name"], "ext", "--", "curl", "-s", "--max-time", "1", url, check=False)
        assert proc.returncode == 28  # a drop: curl's timeout, no answer at all
    finally:
        lab("delete", "--lab", cil["name"], "networkpolicy", "web-from-client")
    assert in_lab(cil["name"], "ext", "curl", "-s", "--max-time", "5", url) == "web-1"


def test_nothing_is_left_after_a_killed_lab_up(tmp_path: Path) -> None:
    require_root()
    require_tool("clang")
    name = unique("cil-kill")
    spec = write_spec(tmp_path, cilium_lab(name, "tunnel"))
    env = dict(os.environ, KUBENET_LAB_CRASH_AT="up-pod:2")
    try:
        killed = subprocess.run([sys.executable, "-m", "lab.cli", "up", str(spec)], capture_output=True, text=True,
                                timeout=120, cwd=REPO, env=env)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert leftovers(name).get("bpf"), "the killed lab up should have pinned maps and made cgroups"
        lab("down", name)
        assert leftovers(name) == {"netns": [], "state": []}
    finally:
        lab("down", name, check=False)


RST_CLIENT = """
import socket, struct, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"GET /hostname HTTP/1.1\\r\\nHost: np\\r\\n\\r\\n")  # keep-alive: the server holds it open
s.recv(1)
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
"""


def ct_entries(lab_name: str, node: str, port: int) -> list[dict]:
    rows = json.loads(lab("cilium", "--lab", lab_name, "--json", node, "bpf", "ct", "list", "global").stdout)
    return [r for r in rows if f":{port} " in r["tuple"] + " " or r["snat"].endswith(f":{port}")]


def test_nodeport_from_outside_reaches_a_backend_on_the_other_node(cil: dict) -> None:
    """The external host has no socket LB: cil_from_netdev on node2's eth0 translates its connection to
    web-1 on node1 (through cilium_vxlan or the native route), SNATed to node2, and the reply back."""
    got = in_lab(cil["name"], "ext", "curl", "-s", "--max-time", "5", "http://192.168.1.11:30080/clientip")
    assert got.split(":")[0] == "192.168.1.11", got  # externalTrafficPolicy Cluster: SNAT to the node
    assert in_lab(cil["name"], "ext", "curl", "-s", "--max-time", "5", "http://192.168.1.11:30080/hostname") == "web-1"


def test_nodeport_connections_are_tracked_and_removed_by_fin_timeout_and_rst(cil: dict) -> None:
    """cilium_ct4_global: a connection from outside holds an OUT entry (client -> node port, with the
    backend and the SNAT address) and an IN entry (the backend's replies); a FIN leaves both closing for
    10 s at most; an RST removes both at once."""
    port = int(in_lab(cil["name"], "ext", "curl", "-s", "--max-time", "5", "-w", "%{local_port}", "-o",
                      "/dev/null", "http://192.168.1.11:30080/hostname"))
    rows = ct_entries(cil["name"], "node2", port)
    out = [r for r in rows if r["direction"] == "OUT"]
    assert len(out) == 1 and out[0]["tuple"] == f"192.168.1.200:{port} -> 192.168.1.11:30080", rows
    assert out[0]["snat"].startswith("192.168.1.11:") and out[0]["nat"].endswith(":8080")
    assert [r["direction"] for r in rows].count("IN") == 1
    assert all(r["closing"] and r["remaining"] <= 10 for r in rows), rows  # FIN: the close timeout
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "exec", "--lab", cil["name"], "ext", "--",
                             sys.executable, "-c", RST_CLIENT, "192.168.1.11", "30080"], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        held = int(proc.stdout.readline())
        rows = ct_entries(cil["name"], "node2", held)
        assert len(rows) == 2 and not any(r["closing"] for r in rows) and all(r["remaining"] > 3600 for r in rows)
        proc.communicate("\n", timeout=10)
    finally:
        proc.kill()
    assert ct_entries(cil["name"], "node2", held) == []  # the RST removed both directions


def test_lab_cilium_mirrors_the_debug_cli(cil: dict) -> None:
    out = lab("cilium", "--lab", cil["name"], "node2", "service", "list").stdout
    assert out.splitlines()[0].split() == ["ID", "Frontend", "Service", "Type", "Backend"]
    assert f"{cil['vip']['web']}:80/TCP" in out and f"{cil['ips']['web-1']}:8080/TCP (active)" in out
    lb = lab("cilium", "--lab", cil["name"], "node2", "bpf", "lb", "list").stdout
    assert "BACKEND ADDRESS (REVNAT_ID) (SLOT)" in lb
    tunnels = json.loads(lab("cilium", "--lab", cil["name"], "--json", "node2", "bpf", "tunnel", "list").stdout)
    assert tunnels == ([{"tunnel": "10.244.1.0:0", "value": "192.168.1.10:0"}] if cil["mode"] == "tunnel" else [])
    maps_out = lab("cilium", "--lab", cil["name"], "node1", "map", "list").stdout
    assert "cilium_lb4_services_v2" in maps_out and "Num entries" in maps_out
    eps = json.loads(lab("cilium", "--lab", cil["name"], "--json", "node1", "endpoint", "list").stdout)
    assert [e["ipv4"] for e in eps] == [cil["ips"]["web-1"]]
    unknown = lab("cilium", "--lab", cil["name"], "node9", "service", "list", check=False)
    assert unknown.returncode == 2 and unknown.stderr.strip() == (
        f"lab cilium: no node node9 in lab {cil['name']} (nodes: node1, node2)"), unknown.stderr


def test_lab_graph_draws_the_cilium_wiring_and_names_a_lost_tunnel_map_entry(cil: dict) -> None:
    g = json.loads(lab("graph", cil["name"], "--json").stdout)
    assert g["problems"] == [] and g["kube_proxy"].startswith("replaced by cilium")
    node2 = next(n for n in g["nodes"] if n["name"] == "node2")
    assert node2["cni0"]["name"] == "cilium_host" and all(p["veth"].startswith("lxc") for p in node2["pods"])
    if cil["mode"] == "native":
        assert node2["tunnel"] is None
        return
    assert "10.244.1.0/24 → 192.168.1.10" in node2["tunnel"]["detail"]
    pinned = f"/sys/fs/bpf/kubenet-lab/{cil['name']}/node2/cilium_tunnel_map"
    key = ["10", "244", "1", "0"] + ["0"] * 12 + ["1", "0", "0", "0"]
    subprocess.run(["bpftool", "map", "delete", "pinned", pinned, "key", *key], check=True)
    try:
        problems = json.loads(lab("graph", cil["name"], "--json").stdout)["problems"]
        assert problems == ["node2: cilium_vxlan: cilium_tunnel_map lacks 10.244.1.0 → 192.168.1.10"]
    finally:
        subprocess.run(["bpftool", "map", "update", "pinned", pinned, "key", *key, "value",
                        "192", "168", "1", "10"] + ["0"] * 12 + ["1", "0", "0", "0"], check=True)
