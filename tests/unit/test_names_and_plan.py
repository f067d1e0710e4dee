"""Names and the plan of kernel operations for the seed lab: all decided without root."""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from apiserver.spec import load_spec
from lab import plan
from topo import names, rtnl

SEED = Path(__file__).resolve().parents[2] / "labs" / "00-seed"


@pytest.fixture(scope="module")
def seed_plan() -> plan.Plan:
    return plan.build(load_spec(SEED), Path("/run/kubenet-lab/seed/ipam"))


def test_host_veth_names_fit_the_kernel_and_are_stable() -> None:
    sandbox = names.sandbox_id("a" * 40, "default", "b" * 63)
    name = names.host_veth(sandbox)
    assert len(name) <= names.IFNAMSIZ and name.startswith("veth")
    assert name == names.host_veth(sandbox)
    assert name != names.host_veth(names.sandbox_id("a" * 40, "default2", "b" * 63))


def test_namespace_names_carry_the_lab_and_parse_back() -> None:
    assert names.pod_netns("seed", "default", "web-1") == "klab_seed_p_default_web-1"
    assert names.lab_of_netns("klab_seed_p_default_web-1") == "seed"
    assert names.lab_of_netns("klab_my-lab_n_node1") == "my-lab"
    assert names.lab_of_netns("cni-1234") is None
    assert names.lab_of_netns("klab_Bad;Name_n_x") is None


def test_seed_pods_get_the_explainer_ips(seed_plan: plan.Plan) -> None:
    got = {op.pod.name: (op.node, op.address) for op in seed_plan.pods}
    assert got == {"node1-pod1": ("node1", IPv4Interface("10.244.1.2/24")),
                   "node1-pod2": ("node1", IPv4Interface("10.244.1.3/24")),
                   "node2-pod1": ("node2", IPv4Interface("10.244.2.2/24"))}
    assert {op.args.netns for op in seed_plan.pods} == {
        "/run/netns/klab_seed_p_default_node1-pod1", "/run/netns/klab_seed_p_default_node1-pod2",
        "/run/netns/klab_seed_p_default_node2-pod1"}


def test_seed_nodes_get_cni0_at_dot_1_and_host_gw_routes(seed_plan: plan.Plan) -> None:
    node1, node2 = seed_plan.nodes
    assert node1.netconf.gateway == IPv4Interface("10.244.1.1/24")
    assert node2.netconf.gateway == IPv4Interface("10.244.2.1/24")
    assert [(r.dst, r.via, r.dev) for r in node1.routes] == [
        (IPv4Network("10.244.2.0/24"), IPv4Address("192.168.1.11"), "eth0")]
    assert [(r.dst, r.via) for r in node2.routes] == [(IPv4Network("10.244.1.0/24"), IPv4Address("192.168.1.10"))]
    assert ("net/ipv4/ip_forward", "1") in plan.HOST_SYSCTLS
    assert node1.vxlan is None and seed_plan.speakers == () and seed_plan.routers == ()


def test_underlay_plan_puts_every_node_on_one_switch(seed_plan: plan.Plan) -> None:
    up = seed_plan.underlay
    assert up.switch_netns == ("klab_seed_u_ul",)
    assert [(h.name, h.netns, h.gateway, h.external) for h in up.hosts] == [
        ("node1", "klab_seed_n_node1", None, False), ("node2", "klab_seed_n_node2", None, False),
        ("external-web", "klab_seed_n_external-web", None, True)]
    assert [(l.host, l.intf, str(l.address), l.segment, l.port) for l in up.links] == [
        ("node1", "eth0", "192.168.1.10/24", "ul", "ul-eth0"), ("node2", "eth0", "192.168.1.11/24", "ul", "ul-eth1"),
        ("external-web", "eth0", "192.168.1.200/24", "ul", "ul-eth2")]
    assert all(l.segment in l.port for l in up.links)  # LinuxBridge only enslaves such ports


def test_netlink_attributes_pack_and_parse_back() -> None:
    packed = rtnl._str(rtnl.IFLA_IFNAME, "cni0") + rtnl._u32(rtnl.IFLA_MTU, 1450)
    assert len(packed) % 4 == 0
    attrs = rtnl.parse_attrs(packed)
    assert rtnl._cstr(attrs[rtnl.IFLA_IFNAME]) == "cni0"
    assert int.from_bytes(attrs[rtnl.IFLA_MTU], "little") == 1450
