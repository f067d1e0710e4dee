"""The plugin driven as an executable, the way a container runtime drives a CNI plugin."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, unique
from topo import names

pytestmark = pytest.mark.integration


@pytest.fixture
def spaces(tmp_path: Path) -> Iterator[dict]:
    lab = unique("cni")
    node, pods = names.node_netns(lab, "node"), [names.pod_netns(lab, "default", f"p{i}") for i in range(7)]
    for ns in [node, *pods]:
        subprocess.run(["ip", "netns", "add", ns], check=True)
    conf = {"cniVersion": "1.0.0", "name": "kubenet", "type": "kubenet-bridge", "bridge": "cni0", "mtu": 1500,
            "ipam": {"type": "host-local", "subnet": "10.244.7.0/29", "dataDir": str(tmp_path), "node": "node"}}
    yield {"node": node, "pods": pods, "conf": conf, "dir": tmp_path}
    for ns in [node, *pods]:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def cni(node: str, command: str, conf: dict, netns: str | None, pod: str) -> tuple[int, dict | None]:
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": f"test.{pod}", "CNI_IFNAME": "eth0",
           "CNI_PATH": "/usr/lib/cni", "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"}
    if netns:
        env["CNI_NETNS"] = f"/run/netns/{netns}"
    proc = subprocess.run(["ip", "netns", "exec", node, sys.executable, "-m", "cni.main"], input=json.dumps(conf),
                          env=env, capture_output=True, text=True, cwd=REPO, timeout=30)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None


def sh(ns: str, *cmd: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True, text=True).stdout


def test_add_check_del_speak_the_spec(spaces: dict) -> None:
    node, pod, conf = spaces["node"], spaces["pods"][0], spaces["conf"]
    rc, result = cni(node, "ADD", conf, pod, "p0")
    assert rc == 0, result
    assert result["ips"] == [{"address": "10.244.7.2/29", "gateway": "10.244.7.1", "interface": 2}]
    assert [i["name"] for i in result["interfaces"]] == ["cni0", names.host_veth("test.p0"), "eth0"]
    assert result["interfaces"][2]["sandbox"] == f"/run/netns/{pod}"
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.244.7.1"}]
    assert "10.244.7.2/29" in sh(pod, "ip", "-4", "-o", "addr", "show", "eth0")
    sh(pod, "ping", "-c1", "-W2", "10.244.7.1")

    again = cni(node, "ADD", conf, pod, "p0")  # idempotent: same answer, nothing new
    assert again == (0, result)
    assert cni(node, "CHECK", {**conf, "prevResult": result}, pod, "p0") == (0, None)
    sh(pod, "ip", "addr", "flush", "dev", "eth0")
    rc, err = cni(node, "CHECK", {**conf, "prevResult": result}, pod, "p0")
    assert rc == 1 and "does not hold" in err["msg"]

    assert cni(node, "DEL", conf, pod, "p0") == (0, None)
    assert cni(node, "DEL", conf, pod, "p0") == (0, None)  # DEL tolerates what is already gone
    assert cni(node, "DEL", conf, None, "p0") == (0, None)
    assert names.host_veth("test.p0") not in sh(node, "ip", "-o", "link")
    leases = json.loads((spaces["dir"] / "node.json").read_text())["leases"]
    assert leases == {}


def test_version_and_bad_config_give_spec_errors(spaces: dict) -> None:
    rc, out = cni(spaces["node"], "VERSION", {}, None, "x")
    assert rc == 0 and "1.0.0" in out["supportedVersions"]
    rc, out = cni(spaces["node"], "ADD", {"cniVersion": "9.9.9"}, spaces["pods"][0], "x")
    assert rc == 1 and out["code"] == 1
    rc, out = cni(spaces["node"], "ADD", {"cniVersion": "1.0.0"}, spaces["pods"][0], "x")
    assert rc == 1 and out["code"] == 7


def test_exhaustion_and_failed_add_roll_back(spaces: dict) -> None:
    node, conf = spaces["node"], spaces["conf"]
    for i in range(5):  # a /29 holds five pods: .2 to .6 (.1 is the gateway, .7 broadcast)
        assert cni(node, "ADD", conf, spaces["pods"][i], f"p{i}")[0] == 0
    rc, err = cni(node, "ADD", conf, spaces["pods"][5], "p5")
    assert rc == 1 and "10.244.7.0/29" in err["msg"] and "5 pod IPs" in err["msg"]
    assert "eth0" not in sh(spaces["pods"][5], "ip", "-o", "link")
    assert names.host_veth("test.p5") not in sh(node, "ip", "-o", "link")
    # A namespace that does not exist: the ADD fails, and neither a lease nor a veth stays behind.
    assert cni(node, "DEL", conf, spaces["pods"][4], "p4")[0] == 0
    rc, err = cni(node, "ADD", conf, "klab_nonexistent_p_x_y", "p6")
    assert rc == 1
    leases = json.loads((spaces["dir"] / "node.json").read_text())["leases"]
    assert len(leases) == 4 and all(v["pod"] != "default/p6" for v in leases.values())
    assert names.host_veth("test.p6") not in sh(node, "ip", "-o", "link")
