"""The aws-vpc profile (issue 20): pods take addresses of the VPC subnet itself, the underlay carries them bare,
and a small subnet runs dry the way an EKS cluster's does, Pending pods and all. docs/vpc-ipam.md works out
every number asserted here."""
from __future__ import annotations

import json
import os
import re
import subprocess
from ipaddress import IPv4Address, IPv4Network

import pytest

from tests.integration.conftest import in_lab, lab, unique
from tests.integration.test_dataplanes import Capture, ping_ok, source_seen

pytestmark = pytest.mark.integration

AGNHOST = {"name": "app", "image": "agnhost", "args": ["netexec", "--http-port=8080"]}
MESSAGE = "failed to assign an IP address to container"


def pod(name: str, node: str | None = None, **labels: str) -> dict:
    spec: dict = {"containers": [AGNHOST]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {"app": name}},
            "spec": spec}


def deployment(name: str, replicas: int) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": "default"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [AGNHOST]}}}}


def aws_node(**env: str) -> dict:
    return {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "aws-node", "namespace": "kube-system"},
            "spec": {"template": {"spec": {"containers": [
                {"name": "aws-node", "env": [{"name": k, "value": v} for k, v in env.items()]}]}}}}


def vpc_lab(name: str, subnet: str, instance: str, nodes: int, env: dict | None = None, **spec: object) -> dict:
    base = IPv4Network(subnet).network_address
    cni: dict = {"profile": "aws-vpc", **({"env": env} if env else {})}
    if "eniConfig" in spec:
        cni["eniConfig"] = spec.pop("eniConfig")
    return {"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"underlay": {"subnet": subnet}, "cni": cni,
                     "nodes": [{"name": f"node{i + 1}", "ip": str(base + 10 + i), "instanceType": instance}
                               for i in range(nodes)], **spec}}


def apply(name: str, tmp_path, *objects: dict) -> str:
    path = tmp_path / f"apply-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text("\n---\n".join(json.dumps(o) for o in objects))
    return lab("apply", "--lab", name, "-f", str(path)).stdout


def pods(name: str) -> list[dict]:
    return json.loads(lab("status", name, "--json").stdout)["pods"]


def ipam(name: str) -> dict:
    return json.loads(lab("ipam", "--lab", name, "--json").stdout)


# ---- the dataplane ------------------------------------------------------------------------------

def test_pods_are_subnet_addresses_routed_bare_across_nodes(lab_up, tmp_path) -> None:
    name = unique("vpc")
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "only-a"},
              "spec": {"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}]}]}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"selector": {"app": "b"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    lab_up(vpc_lab(name, "192.168.1.0/24", "m5.large", 2,
                   external=[{"name": "web-ext", "ip": "192.168.1.200", "serves": ["http"]}],
                   objects=[pod("a", "node1"), pod("b", "node2"), pod("c", "node2"), svc, policy]))
    ips = {p["name"]: p["ip"] for p in pods(name)}
    assert all(IPv4Address(ip) in IPv4Network("192.168.1.0/24") for ip in ips.values()), ips
    a, b = ips["a"], ips["b"]
    # no overlay, no PodCIDR routes: node1 knows only its own pods' /32s; the subnet route covers the rest
    routes = in_lab(name, "node1", "ip", "route")
    assert f"{a} dev veth" in routes and b not in routes and "10.244." not in routes, routes
    assert "flannel.1" not in in_lab(name, "node1", "ip", "link")
    assert "proxy" in in_lab(name, "node2", "ip", "neigh", "show", "proxy", b)
    assert "default via 169.254.1.1 dev eth0" in in_lab(name, "a", "ip", "route")
    # on the wire: the bare pod packet, source kept
    cap = Capture(f"klab_{name}_u_ul", "ul-eth0", "icmp or udp port 8472")
    assert ping_ok(name, "a", b)
    wire = cap.lines()
    assert f"{a} > {b}: ICMP echo request" in wire and "8472" not in wire, wire
    assert source_seen(name, "a", b) == a
    # Services and DNS as in the other profiles; the policy lets a in and keeps c out (calico-style rules)
    assert in_lab(name, "a", "curl", "-s", "-m", "5", "http://web.default.svc.cluster.local/hostname") == "b"
    assert lab("exec", "--lab", name, "c", "--", "curl", "-s", "-m", "2", f"http://{b}:8080/hostname",
               check=False).returncode != 0
    # leaving the VPC: SNAT to the node's primary address (AWS_VPC_K8S_CNI_EXTERNALSNAT=false)
    assert in_lab(name, "a", "curl", "-s", "-m", "5", "http://192.168.1.200/clientip").split(":")[0] == "192.168.1.10"
    assert "AWS-SNAT-CHAIN-0" in in_lab(name, "node1", "iptables-save", "-t", "nat")
    # lab graph compares this dataplane: no bridge, a /32 per pod; a lost /32 is named
    assert json.loads(lab("graph", name, "--json").stdout)["problems"] == []
    in_lab(name, "node1", "ip", "route", "del", f"{a}/32")
    assert f"node1: missing route {a}/32 dev veth" in " ".join(json.loads(lab("graph", name, "--json").stdout)["problems"])


def test_racks_are_subnets_and_pods_cross_them_by_the_routers(lab_up) -> None:
    """Routed underlay: one VPC subnet per rack; a rack's router ARPs for a pod address like any host and the
    node answers for it, so pods cross racks with their addresses, through the routers, unencapsulated."""
    name = unique("vpcrack")
    lab_up({"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"underlay": {"racks": [{"name": "rack1", "subnet": "192.168.1.0/24"},
                                            {"name": "rack2", "subnet": "192.168.2.0/24"}]},
                     "cni": {"profile": "aws-vpc"}, "dns": {"enabled": False},
                     "nodes": [{"name": "node1", "ip": "192.168.1.10", "rack": "rack1"},
                               {"name": "node2", "ip": "192.168.2.10", "rack": "rack2"}],
                     "objects": [pod("a", "node1"), pod("b", "node2")]}})
    ips = {p["name"]: p["ip"] for p in pods(name)}
    assert IPv4Address(ips["a"]) in IPv4Network("192.168.1.0/24") and IPv4Address(ips["b"]) in IPv4Network("192.168.2.0/24")
    assert source_seen(name, "a", ips["b"]) == ips["a"]
    books = ipam(name)
    assert [(s["subnet"], s["other"], s["nodes"], s["pods"]) for s in books["subnets"]] == [
        ("192.168.1.0/24", 0, 2, 1), ("192.168.2.0/24", 0, 2, 1)]  # the ToR at .1 is AWS's reserved router
    # a routed underlay has no one subnet: `lab status` names the racks' (it printed "underlay None")
    info = json.loads(lab("status", name, "--json").stdout)
    assert info["underlay"] == info["podCIDR"] == "rack1 192.168.1.0/24, rack2 192.168.2.0/24"  # pods: subnet addresses
    assert "underlay rack1 192.168.1.0/24, rack2 192.168.2.0/24, pods rack1 192.168.1.0/24" in lab("status", name).stdout


# ---- running dry, and the fixes -----------------------------------------------------------------

def test_a_small_subnet_runs_dry_and_warm_ip_target_frees_it(lab_up, tmp_path) -> None:
    """A /27 (27 usable after AWS's 5) with three t3.medium nodes and the default WARM_ENI_TARGET=1: 17 pods
    fit, the 18th stays ContainerCreating with the VPC CNI's message while every node has room by max pods (15).
    WARM_IP_TARGET=1 hands the warm addresses back and the 18th pod starts."""
    name = unique("vpcdry")
    lab_up(vpc_lab(name, "10.0.0.0/27", "t3.medium", 3, dns={"enabled": False}))
    out = apply(name, tmp_path, deployment("web", 18))
    assert MESSAGE in out and "InsufficientFreeAddressesInSubnet" in out
    listed = pods(name)
    running = [p for p in listed if p["status"] == "Running"]
    waiting = [p for p in listed if p["status"] == "ContainerCreating"]
    assert (len(running), len(waiting)) == (17, 1), listed
    assert MESSAGE in waiting[0]["message"] and waiting[0]["ip"] == ""
    status = lab("status", name).stdout
    assert re.search(rf"{waiting[0]['name']}\s+default\s+node3\s+0/1\s+ContainerCreating", status), status
    assert f"FailedCreatePodSandBox: {MESSAGE}" in status
    books = ipam(name)
    assert books["subnets"][0]["free"] == 0 and books["subnets"][0]["reserved"] == 5
    assert [n["maxPods"] for n in books["nodes"]] == [17, 17, 17]
    assert any("InsufficientFreeAddressesInSubnet" in line for line in books["log"])
    # the fix, applied as on EKS: the aws-node DaemonSet's env
    out = apply(name, tmp_path, aws_node(WARM_IP_TARGET="1"))
    assert f"pod default/{waiting[0]['name']} got an address" in out, out
    assert "daemonset.apps kube-system/aws-node configured" in out, out
    # the same settings again: nothing to change, and kubectl says so
    assert apply(name, tmp_path, aws_node(WARM_IP_TARGET="1")).splitlines() == [
        "daemonset.apps kube-system/aws-node unchanged"]
    listed = pods(name)
    assert all(p["status"] == "Running" for p in listed) and len(listed) == 18
    late = next(p for p in listed if p["name"] == waiting[0]["name"])
    assert ping_ok(name, late["name"], running[0]["ip"])
    assert sum(n["assigned"] for n in ipam(name)["nodes"]) == 18


def test_prefix_delegation_and_custom_networking_fit_what_the_docs_predict(lab_up, tmp_path) -> None:
    """Prefix delegation in a /26 with two t3.medium nodes: only two /28s are whole (the first holds AWS's
    reserved addresses and the nodes, the last the broadcast), one per node, so 32 pods fit and the 33rd waits
    (InsufficientCidrBlocks). Custom networking with three nodes puts pods in 100.64.0.0/26 and leaves the /27
    node subnet alone: 30 pods, capped by max pods ((3 - 1) x 5 + 2 = 12, minus 2 host-network pods), not by
    addresses."""
    name = unique("vpcpd")
    lab_up(vpc_lab(name, "10.0.0.0/26", "t3.medium", 2, env={"ENABLE_PREFIX_DELEGATION": "true"},
                   dns={"enabled": False}))
    books = ipam(name)
    assert [e["prefixes"] for n in books["nodes"] for e in n["enis"]] == [["10.0.0.16/28"], ["10.0.0.32/28"]]
    assert [n["maxPods"] for n in books["nodes"]] == [110, 110]
    out = apply(name, tmp_path, deployment("web", 33))
    assert out.count("Pending") == 1 and MESSAGE in out and "InsufficientCidrBlocks" in out, out
    assert sum(p["status"] == "Running" for p in pods(name)) == 32

    name = unique("vpccn")
    lab_up(vpc_lab(name, "10.0.0.0/27", "t3.medium", 3, env={"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true"},
                   eniConfig={"subnet": "100.64.0.0/26"}, dns={"enabled": False}))
    apply(name, tmp_path, deployment("web", 30))
    listed = pods(name)
    assert len(listed) == 30 and all(p["status"] == "Running" for p in listed)
    assert all(IPv4Address(p["ip"]) in IPv4Network("100.64.0.0/26") for p in listed)
    a, b = listed[0], next(p for p in listed if p["node"] != listed[0]["node"])
    assert source_seen(name, a["name"], b["ip"]) == a["ip"]
    with pytest.raises(AssertionError, match="max pods|can hold"):
        apply(name, tmp_path, pod("one-more"))


def test_a_killed_retry_keeps_the_waiting_pod_and_the_books_converge(lab_up, tmp_path) -> None:
    """kill -9 while the waiting pod is being given its address: the next command must neither roll the pod back
    (it is still wanted) nor leave its address assigned in ipamd's books."""
    name = unique("vpckill")
    lab_up(vpc_lab(name, "10.0.0.0/27", "t3.medium", 3, dns={"enabled": False}))
    apply(name, tmp_path, deployment("web", 18))
    waiting = next(p["name"] for p in pods(name) if p["status"] == "ContainerCreating")
    fix = tmp_path / "fix.yaml"
    fix.write_text(json.dumps(aws_node(WARM_IP_TARGET="1")))
    env = {**os.environ, "KUBENET_LAB_CRASH_AT": "pod-cni-added:1"}
    proc = subprocess.run([os.sys.executable, "-m", "lab.cli", "apply", "--lab", name, "-f", str(fix)],
                          capture_output=True, text=True, env=env, timeout=60, cwd=str(tmp_path.parent))
    assert proc.returncode != 0
    listed = {p["name"]: p for p in pods(name)}
    assert waiting in listed and listed[waiting]["status"] != "Running"
    out = lab("apply", "--lab", name, "-f", str(fix)).stdout
    assert f"pod default/{waiting} got an address" in out, out
    listed = pods(name)
    assert all(p["status"] == "Running" for p in listed) and len(listed) == 18
    books = ipam(name)
    assert sum(n["assigned"] for n in books["nodes"]) == 18
    assert len({p["ip"] for p in listed}) == 18


def test_a_node_joins_with_a_subnet_address_and_cannot_when_the_subnet_is_dry(lab_up, tmp_path) -> None:
    """`lab apply` of a Node launches one more instance: it takes the subnet's next free address and its own
    warm pool, and its pods reach the others; once the subnet is full the next Node waits NotReady with
    InsufficientFreeAddressesInSubnet, and joins when the warm pools give addresses back."""
    name = unique("vpcnode")
    lab_up(vpc_lab(name, "10.0.0.0/27", "t3.medium", 2, dns={"enabled": False}))
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node3", "labels": {"node.kubernetes.io/instance-type": "t3.medium"}}}
    out = apply(name, tmp_path, node)
    assert "node node3 joined (t3.medium, 10.0.0.16, max pods 17)" in out, out
    out = apply(name, tmp_path, pod("p1", "node1"), pod("p3", "node3"))
    ips = {p["name"]: p["ip"] for p in pods(name)}
    assert source_seen(name, "p3", ips["p1"]) == ips["p3"]
    apply(name, tmp_path, deployment("web", 12))
    assert ipam(name)["subnets"][0]["free"] == 0
    node4 = {**node, "metadata": {**node["metadata"], "name": "node4"}}
    out = apply(name, tmp_path, node4)
    assert "node node4 cannot join: InsufficientFreeAddressesInSubnet" in out, out
    status = lab("status", name).stdout
    assert re.search(r"node4\s+<none>\s+NotReady: cannot join: InsufficientFreeAddressesInSubnet", status), status
    with pytest.raises(AssertionError):
        in_lab(name, "node4", "true")  # not a node of the lab (yet)
    out = apply(name, tmp_path, aws_node(WARM_IP_TARGET="1"))
    assert "node node4 joined" in out, out
    assert "10.0.0." in in_lab(name, "node4", "ip", "-4", "addr", "show", "eth0")
    assert len([n for n in ipam(name)["nodes"]]) == 4
