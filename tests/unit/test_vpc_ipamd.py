"""The aws-vpc profile's ipamd model against the Amazon VPC CNI's documented examples (eni-and-ip-target.md and
prefix-and-ip-target.md of amazon-vpc-cni-k8s: t3.small, 3 ENIs x 4 IPv4 addresses), the max-pods formula, and
subnet accounting with AWS's 5 reserved addresses."""
from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from apiserver.spec import parse_spec_text
from cni import vpc_ipamd
from cni.vpc_instances import INSTANCE_TYPES
from topo.errors import SpecError
from topo.model import VpcCni

SPEC = """
apiVersion: kubenet-lab/v1alpha1
kind: Lab
metadata: {name: vpc}
spec:
  underlay: {subnet: SUBNET}
  dns: {enabled: false}
  cni: {profile: aws-vpc, env: ENV EXTRA}
  nodes:
NODES
"""


def lab_of(subnet="10.0.0.0/22", env="{}", nodes=(("node1", "10.0.0.10", "t3.small"),), extra=""):
    lines = "\n".join(f"    - {{name: {n}, ip: {ip}, instanceType: {t}}}" for n, ip, t in nodes)
    return parse_spec_text(SPEC.replace("SUBNET", subnet).replace("ENV", env).replace("NODES", lines)
                           .replace("EXTRA", extra))


def pods(ipamd, node, count):
    for i in range(count):
        ipamd.assign(node, f"c{i}")


def enis(ipamd, node):
    pool = ipamd.nodes[node]
    return [len(e.ips) for e in pool.enis], len(ipamd.available(pool))


@pytest.mark.parametrize("env,count,secondaries,unused", [
    # WARM_ENI_TARGET 1 (default): Pods, ENIs' secondary IPs, unused IPs as the docs' table gives them
    ("{}", 0, [3], 3), ("{}", 5, [3, 3, 3], 4), ("{}", 9, [3, 3, 3], 0),
    ("{WARM_IP_TARGET: 1, MINIMUM_IP_TARGET: 1}", 0, [1], 1),
    ("{WARM_IP_TARGET: 1, MINIMUM_IP_TARGET: 1}", 5, [3, 3], 1),
    ("{WARM_IP_TARGET: 1, MINIMUM_IP_TARGET: 1}", 9, [3, 3, 3], 0),
    ("{WARM_IP_TARGET: 2, MINIMUM_IP_TARGET: 5}", 0, [3, 2], 5),
    ("{WARM_IP_TARGET: 2, MINIMUM_IP_TARGET: 5}", 5, [3, 3, 1], 2),
])
def test_warm_pool_follows_the_vpc_cni_docs_table(env, count, secondaries, unused):
    ipamd = vpc_ipamd.fresh(lab_of(env=env))
    pods(ipamd, "node1", count)
    assert enis(ipamd, "node1") == (secondaries, unused)


@pytest.mark.parametrize("env,count,prefixes", [
    ("{ENABLE_PREFIX_DELEGATION: true}", 0, 1), ("{ENABLE_PREFIX_DELEGATION: true}", 5, 2),
    ("{ENABLE_PREFIX_DELEGATION: true}", 16, 2), ("{ENABLE_PREFIX_DELEGATION: true}", 17, 3),
    ("{ENABLE_PREFIX_DELEGATION: true}", 58, 5),
    ("{ENABLE_PREFIX_DELEGATION: true, WARM_IP_TARGET: 1, MINIMUM_IP_TARGET: 1}", 5, 1),
    ("{ENABLE_PREFIX_DELEGATION: true, WARM_IP_TARGET: 1, MINIMUM_IP_TARGET: 1}", 17, 2),
    ("{ENABLE_PREFIX_DELEGATION: true, WARM_IP_TARGET: 1, MINIMUM_IP_TARGET: 1}", 58, 4),
])
def test_prefix_delegation_follows_the_docs_table(env, count, prefixes):
    lab = lab_of(env=env)
    ipamd = vpc_ipamd.fresh(lab)
    pods(ipamd, "node1", count)
    assert sum(len(e.prefixes) for e in ipamd.nodes["node1"].enis) == prefixes
    assert all(p.prefixlen == 28 for e in ipamd.nodes["node1"].enis for p in e.prefixes)


def test_max_pods_formula():
    assert INSTANCE_TYPES["t3.medium"].max_pods() == 17
    assert INSTANCE_TYPES["m5.large"].max_pods() == 29
    assert INSTANCE_TYPES["m5.xlarge"].max_pods() == 58
    assert INSTANCE_TYPES["m5.large"].max_pods(custom_networking=True) == 20
    assert INSTANCE_TYPES["m5.large"].max_pods(prefix_delegation=True) == 110
    assert INSTANCE_TYPES["m5.8xlarge"].max_pods(prefix_delegation=True) == 250
    lab = lab_of(nodes=(("node1", "10.0.0.10", "m5.large"),))
    assert lab.nodes[0].max_pods == 29 and lab.nodes[0].pod_capacity == 27


def test_subnet_runs_dry_with_the_vpc_cni_message():
    # a /27: 32 - 5 reserved = 27; two t3.medium nodes (3 ENIs x 6) hold 2 x 6 at start
    lab = lab_of(subnet="10.0.0.0/27", nodes=(("node1", "10.0.0.10", "t3.medium"), ("node2", "10.0.0.11", "t3.medium")))
    ipamd = vpc_ipamd.fresh(lab)
    assert len(ipamd.free(IPv4Network("10.0.0.0/27"))) == 27 - 12
    assert IPv4Address("10.0.0.1") not in ipamd.free(IPv4Network("10.0.0.0/27"))
    placed = 0
    with pytest.raises(vpc_ipamd.IpamdExhausted) as err:
        for i in range(100):
            ipamd.assign(f"node{i % 2 + 1}", f"c{i}")
            placed += 1
    assert "failed to assign an IP address to container" in str(err.value)
    assert "InsufficientFreeAddressesInSubnet" in str(err.value)
    assert any("InsufficientFreeAddressesInSubnet" in line for line in ipamd.log)
    # 27 usable: each node starts with its primary ENI (1 + 5); the first pod on each attaches a second ENI
    # (1 + 5): 24 taken, 3 left. node1's 7th pod leaves 4 free (< 5, a full ENI): a third ENI takes the last 3
    # addresses (primary + 2 of the 5 asked). node1 holds 12 pod addresses, node2 10: node2's 11th pod
    # (pod 21, placed alternately) is the first without one. docs/vpc-ipam.md works the same example.
    assert placed == 21
    assert not ipamd.free(IPv4Network("10.0.0.0/27"))


def test_release_gives_the_address_back_and_warm_ip_target_shrinks():
    lab = lab_of(env="{WARM_IP_TARGET: 2}")
    ipamd = vpc_ipamd.fresh(lab)
    pods(ipamd, "node1", 3)
    assert ipamd.total(ipamd.nodes["node1"]) == 5
    ipamd.release("node1", "c2")
    ipamd.release("node1", "c1")
    assert ipamd.total(ipamd.nodes["node1"]) == 3


def test_custom_networking_takes_pod_addresses_from_the_eniconfig_subnet():
    lab = lab_of(env="{AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG: true}", extra=", eniConfig: {subnet: 100.64.0.0/24}")
    assert lab.vpc.custom_network == IPv4Network("100.64.0.0/24")
    ipamd = vpc_ipamd.fresh(lab)
    ip = ipamd.assign("node1", "c0")
    assert ip in IPv4Network("100.64.0.0/24")
    assert lab.nodes[0].max_pods == 8  # t3.small: (3 - 1) x (4 - 1) + 2


@pytest.mark.parametrize("env,needle", [
    ("{WARM_IP_TARGT: 2}", "did you mean WARM_IP_TARGET?"),
    ("{WARM_IP_TARGET: two}", "whole number"),
    ("{AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG: true}", "needs an ENIConfig"),
])
def test_bad_settings_are_one_line_errors(env, needle):
    with pytest.raises(SpecError) as err:
        lab_of(env=env)
    assert needle in str(err.value) and "spec.cni.env" in str(err.value)


def test_unknown_instance_type_and_reserved_node_address():
    with pytest.raises(SpecError) as err:
        lab_of(nodes=(("node1", "10.0.0.10", "m5.larg"),))
    assert "spec.nodes[0].instanceType" in str(err.value) and "did you mean m5.large?" in str(err.value)
    with pytest.raises(SpecError) as err:
        lab_of(nodes=(("node1", "10.0.0.2", "m5.large"),))
    assert "spec.nodes[0].ip" in str(err.value) and "AWS reserves" in str(err.value)


def test_aws_node_and_node_objects_are_checked_against_the_lab():
    from apiserver.spec import parse_objects

    vpc = lab_of()
    flannel = parse_spec_text(SPEC.replace("cni: {profile: aws-vpc, env: ENV EXTRA}", "cni: {profile: flannel}")
                              .replace("SUBNET", "10.0.0.0/22").replace("NODES", "    - {name: node1, ip: 10.0.0.10}"))
    ds = ("apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: aws-node, namespace: kube-system}\nspec:\n"
          "  template:\n    spec:\n      containers:\n        - name: aws-node\n          env:\n"
          "            - {name: WARM_IP_TARGET, value: \"2\"}\n")
    assert parse_objects(ds, vpc, "ds.yaml")[0]["metadata"]["name"] == "aws-node"
    with pytest.raises(SpecError) as err:
        parse_objects(ds, flannel, "ds.yaml")
    assert "ds.yaml:2: kind: kube-system/aws-node holds the Amazon VPC CNI's settings" in str(err.value)
    with pytest.raises(SpecError) as err:
        parse_objects(ds.replace("WARM_IP_TARGET", "ENABLE_PREFIX_DELEGATION"), vpc, "ds.yaml")
    assert "on a running lab" in str(err.value) and "spec.template.spec.containers[0].env" in str(err.value)
    # EnvVar.value is a string in Kubernetes: an unquoted number is refused by the API server, so here too
    with pytest.raises(SpecError) as err:
        parse_objects(ds.replace('value: "2"', "value: 2"), vpc, "ds.yaml")
    assert "ds.yaml:10: spec.template.spec.containers[0].env[0].value" in str(err.value), str(err.value)
    assert 'write "2"' in str(err.value), str(err.value)
    node = "apiVersion: v1\nkind: Node\nmetadata:\n  name: NAME\n  labels: {node.kubernetes.io/instance-type: TYPE}\n"
    assert parse_objects(node.replace("NAME", "node2").replace("TYPE", "t3.small"), vpc, "n.yaml")
    for name, kind, needle in (("node1", "t3.small", "already a node"), ("node2", "t3.smal", "did you mean t3.small?"),
                               ("Node_2", "t3.small", "metadata.name")):
        with pytest.raises(SpecError) as err:
            parse_objects(node.replace("NAME", name).replace("TYPE", kind), vpc, "n.yaml")
        assert needle in str(err.value) and str(err.value).startswith("n.yaml:"), str(err.value)


def test_a_lab_spec_takes_no_node_or_aws_node_objects():
    text = SPEC.replace("SUBNET", "10.0.0.0/22").replace("ENV", "{}").replace("EXTRA", "").replace(
        "NODES", "    - {name: node1, ip: 10.0.0.10}") + "  objects:\n    - {apiVersion: v1, kind: Node, metadata: {name: x}}\n"
    with pytest.raises(SpecError) as err:
        parse_spec_text(text, "t.yaml")
    assert "spec.objects[0].kind: a lab spec lists its nodes in spec.nodes" in str(err.value)


@pytest.mark.parametrize("value", ["'²'", "'1 '", "-1", "1.5", "'0x10'"])
def test_targets_are_plain_whole_numbers(value):
    with pytest.raises(SpecError) as err:
        lab_of(env=f"{{WARM_IP_TARGET: {value}}}")
    assert "spec.cni.env.WARM_IP_TARGET: WARM_IP_TARGET must be a whole number" in str(err.value)


def test_aws_snat_returns_vpc_traffic_and_snats_the_rest_to_the_node():
    from services.kube_proxy_iptables import aws_snat

    lines = aws_snat(IPv4Address("10.0.0.10"), [IPv4Network("10.0.0.0/27")], [IPv4Address("10.0.0.20")])
    assert lines[0].startswith("-A POSTROUTING ") and lines[0].endswith("-j AWS-SNAT-CHAIN-0")
    # the external host (the lab's internet) is sent to SNAT before the VPC's RETURN would keep the pod address
    order = [l.split(" -j ")[-1] for l in lines[1:]]
    assert order[:3] == ["AWS-SNAT-CHAIN-1", "RETURN", "AWS-SNAT-CHAIN-1"]
    assert "-d 10.0.0.20/32" in lines[1] and "-d 10.0.0.0/27" in lines[2]
    assert lines[-1].startswith("-A AWS-SNAT-CHAIN-1 ! -o vlan+") and "SNAT --to-source 10.0.0.10" in lines[-1]


def test_lab_ipam_shows_address_runs():
    from lab.ipam import _ranges

    assert _ranges(["10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.9", "10.0.0.13", "10.0.0.14"]) == \
        "10.0.0.4-6, 10.0.0.9, 10.0.0.13-14"
    assert _ranges(["10.0.0.16/28"]) == "10.0.0.16/28"
