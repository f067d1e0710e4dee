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


def cni(node: str, command: str, conf: dict, netns: str | None, pod: str, ifname: str = "eth0",
        plugin: list[str] | None = None) -> tuple[int, dict | None]:
    """Run a plugin the way a runtime does (CNI SPEC.md "Parameters" and "Section 2: Execution Protocol"):
    the parameters in environment variables, the network configuration on stdin, the result or error on
    stdout. `plugin` defaults to kubenet-cni; the reference plugins are run from /usr/lib/cni."""
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": f"test.{pod}", "CNI_IFNAME": ifname,
           "CNI_PATH": "/usr/lib/cni", "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"}  # as containerd passes them
    if netns:
        env["CNI_NETNS"] = netns if netns.startswith("/") else f"/run/netns/{netns}"
    if command in ("STATUS", "GC", "VERSION"):  # CNI 1.1.0: these take no container parameters
        for name in ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS", "CNI_ARGS"):
            env.pop(name, None)
    argv = plugin or [sys.executable, "-m", "cni.main"]
    proc = subprocess.run(["ip", "netns", "exec", node, *argv], input=json.dumps(conf),
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

    # CNI SPEC.md 1.0.0, ADD: "If an interface of the requested name already exists in the container, the
    # CNI plugin MUST return with an error." The first attachment keeps working.
    rc, err = cni(node, "ADD", conf, pod, "p0")
    assert rc == 1 and err["msg"] == "container veth name provided (eth0) already exists", err
    sh(pod, "ping", "-c1", "-W2", "10.244.7.1")
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


def test_add_of_an_existing_attachment_fails_and_keeps_it(spaces: dict) -> None:
    """CNI SPEC.md 1.0.0 "ADD: Add container to network": "If an interface of the requested name already
    exists in the container, the CNI plugin MUST return with an error." (Before issue 17 the second ADD
    answered success.) Nothing of the first attachment may be undone by the failed second one."""
    node, pod, conf = spaces["node"], spaces["pods"][0], spaces["conf"]
    rc, first = cni(node, "ADD", conf, pod, "p0")
    assert rc == 0, first
    rc, err = cni(node, "ADD", conf, pod, "p0")
    assert rc == 1 and err["code"] == 999, err  # what libcni's skel reports for the reference bridge's error
    assert "already exists" in err["msg"]
    # a second sandbox id but the same interface name in the same namespace: refused too
    rc, err = cni(node, "ADD", conf, pod, "other")
    assert rc == 1 and "(eth0) already exists" in err["msg"]
    leases = json.loads((spaces["dir"] / "node.json").read_text())["leases"]
    assert [v["containerID"] for v in leases.values()] == ["test.p0"]
    assert "10.244.7.2/29" in sh(pod, "ip", "-4", "-o", "addr", "show", "eth0")
    assert names.host_veth("test.p0") in sh(node, "ip", "-o", "link")
    assert cni(node, "CHECK", {**conf, "prevResult": first}, pod, "p0") == (0, None)



def test_lab_ups_add_without_lookups_still_refuses_an_existing_interface(spaces: dict) -> None:
    """`lab up` makes each pod's namespace right before its ADD and lets the plugin skip looking for an
    interface of the same name (BridgePlugin.new_sandboxes). Should one exist after all, the exclusive veth
    creation fails and ADD still refuses with the reference plugin's message, leaving the first attachment,
    its veth and its lease alone."""
    from cni.plugin import BridgePlugin, CniArgs, CniError, NetConf
    from topo import netns

    node, pod, conf = spaces["node"], spaces["pods"][0], spaces["conf"]
    rc, first = cni(node, "ADD", conf, pod, "p0")
    assert rc == 0, first
    with netns.rtnl_in(node) as host:
        plugin = BridgePlugin(NetConf.from_json(conf), host)
        plugin.new_sandboxes = True
        for container_id in ("test.p0", "other"):  # the same attachment, and another sandbox into the same eth0
            with pytest.raises(CniError, match=r"container veth name provided \(eth0\) already exists"):
                plugin.add(CniArgs(container_id, f"/run/netns/{pod}", pod_namespace="default", pod_name="p0"))
        made = plugin.add(CniArgs("test.p1", f"/run/netns/{spaces['pods'][1]}", pod_namespace="default",
                                  pod_name="p1"))
    assert made["ips"][0]["address"] == "10.244.7.3/29" and made["interfaces"][2]["name"] == "eth0", made
    leases = json.loads((spaces["dir"] / "node.json").read_text())["leases"]
    assert sorted(v["containerID"] for v in leases.values()) == ["test.p0", "test.p1"]
    assert names.host_veth("test.p0") in sh(node, "ip", "-o", "link")
    assert "10.244.7.3/29" in sh(spaces["pods"][1], "ip", "-4", "-o", "addr", "show", "eth0")
    assert cni(node, "CHECK", {**conf, "prevResult": first}, pod, "p0") == (0, None)


@pytest.mark.parametrize("ifname", ["a" * 16, "eth/0", ".", "..", "eth 0", "eth:0", "eth\t0"])
def test_invalid_ifname_is_code_4_naming_the_variable(spaces: dict, ifname: str) -> None:
    """CNI SPEC.md "Parameters": CNI_IFNAME is the interface name to create inside the container; error
    code 4, "Invalid necessary environment variables ... The error message will contain the names of
    invalid variables." (Before issue 17: code 11, "try again later", with an errno text.)"""
    rc, err = cni(spaces["node"], "ADD", spaces["conf"], spaces["pods"][0], "p0", ifname=ifname)
    assert rc == 1 and err["code"] == 4 and "CNI_IFNAME" in err["msg"], err
    assert not (spaces["dir"] / "node.json").exists() or json.loads(
        (spaces["dir"] / "node.json").read_text())["leases"] == {}
    assert "eth" not in sh(spaces["pods"][0], "ip", "-o", "link").replace("lo:", "")


def test_add_into_a_missing_namespace_is_code_3_not_11(spaces: dict) -> None:
    """CNI SPEC.md "Error": code 3 "Container unknown or does not exist. This error implies the runtime
    does not need to perform any container network cleanup"; 11 ("try again later") is for a transient
    condition, and a namespace that does not exist will not appear by retrying."""
    rc, err = cni(spaces["node"], "ADD", spaces["conf"], "klab_nonexistent_p_x_y", "p6")
    assert rc == 1 and err["code"] == 3 and "CNI_NETNS" in err["msg"], err
    assert "veth" not in sh(spaces["node"], "ip", "-o", "link")


def test_status_and_gc_of_cni_1_1_0(spaces: dict) -> None:
    """CNI SPEC.md 1.1.0 "STATUS": success when the plugin can serve ADD, error 50 when it cannot (here: the
    PodCIDR is full). "GC": "the plugin should remove any resources ... not in cni.dev/valid-attachments"
    (leases and interfaces), and nothing else. VERSION lists 1.1.0."""
    node, pods = spaces["node"], spaces["pods"]
    conf = {**spaces["conf"], "cniVersion": "1.1.0"}
    rc, out = cni(node, "VERSION", {"cniVersion": "1.1.0"}, None, "x")
    assert rc == 0 and "1.1.0" in out["supportedVersions"] and "1.0.0" in out["supportedVersions"]
    assert cni(node, "STATUS", conf, None, "x") == (0, None)
    rc, err = cni(node, "STATUS", spaces["conf"], None, "x")  # a 1.0.0 config does not allow STATUS
    assert rc == 1 and err["code"] == 1
    results = {}
    for i in range(5):  # a /29: five pods fill it
        rc, results[i] = cni(node, "ADD", conf, pods[i], f"p{i}")
        assert rc == 0 and results[i]["cniVersion"] == "1.1.0", results[i]
    rc, err = cni(node, "STATUS", conf, None, "x")
    assert rc == 1 and err["code"] == 50 and "10.244.7.0/29" in err["details"], err
    rc, err = cni(node, "GC", conf, None, "x")  # without the list GC refuses rather than removing everything
    assert rc == 1 and err["code"] == 7
    valid = [{"containerID": f"test.p{i}", "ifname": "eth0"} for i in (0, 2, 4)]
    assert cni(node, "GC", {**conf, "cni.dev/valid-attachments": valid}, None, "x") == (0, None)
    leases = json.loads((spaces["dir"] / "node.json").read_text())["leases"]
    assert sorted(v["containerID"] for v in leases.values()) == ["test.p0", "test.p2", "test.p4"]
    links = sh(node, "ip", "-o", "link")
    for i in range(5):
        assert (names.host_veth(f"test.p{i}") in links) == (i in (0, 2, 4)), i
    assert "eth0" not in sh(pods[1], "ip", "-o", "link") and "eth0" in sh(pods[2], "ip", "-o", "link")
    for i in (0, 2, 4):  # the valid attachments still work
        assert cni(node, "CHECK", {**conf, "prevResult": results[i]}, pods[i], f"p{i}") == (0, None)
    assert cni(node, "STATUS", conf, None, "x") == (0, None)  # two addresses are free again


REFERENCE = Path("/usr/lib/cni")


def test_same_config_as_the_reference_bridge_and_host_local(tmp_path: Path) -> None:
    """The same network configuration through the reference `bridge` + `host-local` plugins (Debian's
    containernetworking-plugins, installed by ./install.sh --test) and through kubenet-cni, each in a node
    namespace of its own: the ADD results (CNI SPEC.md "Success": interfaces, ips, routes, dns) agree field by
    field except the generated veth names and MACs, and so do the kernel objects a learner would inspect
    (the bridge port's hairpin mode, the host veth's MTU, the pod's address and default route)."""
    if not (REFERENCE / "bridge").exists() or not (REFERENCE / "host-local").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("the reference CNI plugins are missing: ./install.sh --test installs containernetworking-plugins")
        pytest.skip("the reference CNI plugins are missing (apt-get install containernetworking-plugins)")
    lab = unique("cniref")
    spaces = {kind: (names.node_netns(lab, kind), names.pod_netns(lab, "default", kind)) for kind in ("ref", "ours")}
    for node, pod in spaces.values():
        subprocess.run(["ip", "netns", "add", node], check=True)
        subprocess.run(["ip", "netns", "add", pod], check=True)
    base = {"cniVersion": "1.0.0", "name": "kubenet", "bridge": "cni0", "isGateway": True, "isDefaultGateway": True,
            "hairpinMode": True, "mtu": 1400}
    confs = {
        "ref": {**base, "type": "bridge",
                "ipam": {"type": "host-local", "subnet": "10.244.9.0/24", "dataDir": str(tmp_path / "ref")}},
        "ours": {**base, "type": "kubenet-bridge",
                 "ipam": {"type": "host-local", "subnet": "10.244.9.0/24", "dataDir": str(tmp_path / "ours"),
                          "node": "node"}},
    }
    try:
        results, kernel = {}, {}
        for kind, (node, pod) in spaces.items():
            plugin = [str(REFERENCE / "bridge")] if kind == "ref" else None
            rc, results[kind] = cni(node, "ADD", confs[kind], pod, "p0", plugin=plugin)
            assert rc == 0, (kind, results[kind])
            veth = results[kind]["interfaces"][1]["name"]
            kernel[kind] = {
                "hairpin": sh(node, "cat", f"/sys/class/net/{veth}/brport/hairpin_mode").strip(),
                "host_mtu": sh(node, "cat", f"/sys/class/net/{veth}/mtu").strip(),
                "bridge_mtu": sh(node, "cat", "/sys/class/net/cni0/mtu").strip(),
                "pod_mtu": sh(pod, "cat", "/sys/class/net/eth0/mtu").strip(),
                "pod_addr": sh(pod, "ip", "-4", "-o", "addr", "show", "dev", "eth0").split()[3],
                "bridge_addr": sh(node, "ip", "-4", "-o", "addr", "show", "dev", "cni0").split()[3],
                "pod_default": sh(pod, "ip", "route", "show", "default").split()[:5],
            }
        ref, ours = results["ref"], results["ours"]
        assert ours["cniVersion"] == ref["cniVersion"]
        assert ours["ips"] == ref["ips"]
        assert ours["routes"] == ref["routes"]
        assert ours["dns"] == ref["dns"]
        assert [sorted(i) for i in ours["interfaces"]] == [sorted(i) for i in ref["interfaces"]]  # the same keys
        assert [i["name"] for i in ours["interfaces"]][::2] == [i["name"] for i in ref["interfaces"]][::2]
        assert ours["interfaces"][2]["sandbox"] == f"/run/netns/{spaces['ours'][1]}"
        assert ref["interfaces"][1]["name"].startswith("veth") and ours["interfaces"][1]["name"].startswith("veth")
        assert kernel["ours"] == kernel["ref"], kernel
        assert kernel["ref"]["hairpin"] == "1" and kernel["ref"]["host_mtu"] == "1400"
        # both refuse a second ADD of the same attachment the same way
        for kind, (node, pod) in spaces.items():
            plugin = [str(REFERENCE / "bridge")] if kind == "ref" else None
            rc, err = cni(node, "ADD", confs[kind], pod, "p0", plugin=plugin)
            assert rc == 1 and err["code"] == 999 and err["msg"] == "container veth name provided (eth0) already exists"
        for kind, (node, pod) in spaces.items():
            plugin = [str(REFERENCE / "bridge")] if kind == "ref" else None
            assert cni(node, "DEL", confs[kind], pod, "p0", plugin=plugin)[0] == 0
    finally:
        for node, pod in spaces.values():
            subprocess.run(["ip", "netns", "del", pod], check=False)
            subprocess.run(["ip", "netns", "del", node], check=False)
