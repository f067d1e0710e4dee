"""Tests of the spec loader: valid labs build the right model, every invalid one fails with a clear message.

Invalid specs live in specs/invalid/NN-what.yaml, each with NN-what.err holding the exact expected lines
(file shown as the basename: the test loads each spec from inside that folder). To rewrite the goldens
after a deliberate message change, run with KUBENET_UPDATE_GOLDEN=1 and read every diff before committing.
No test needs root.
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
import sys
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
import yaml

from apiserver import spec
from apiserver.spec import (ingresses_from_objects, load_spec, parse_objects, parse_spec_text, pods_from_objects,
                            services_from_objects)
from topo import model, names, schema
from topo.errors import SpecError
from topo.model import (Bgp, ClusterDns, DnsConfig, ExternalHost, Fabric, Ingress, IngressBackend, IngressController,
                        IngressPath, IngressRule, KubeProxy, Lab, LinkSpec, Network, Rack, Service, ServicePort,
                        Underlay)
from topo.object_spec import Parsed
from topo.workload_spec import image_base

ROOT = Path(__file__).resolve().parents[2]
SPECS = Path(__file__).resolve().parent / "specs"
INVALID = sorted(p.name for p in (SPECS / "invalid").glob("*.yaml"))
VALID = sorted(p.name for p in (SPECS / "valid").glob("*.yaml"))
SEED = ROOT / "labs" / "00-seed" / "lab.yaml"


def _agnhost_available() -> bool:
    try:
        from images import agnhost  # noqa: F401
    except Exception:
        return False
    return True


def _errors(text: str, file: str = "t.yaml") -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, file)
    return info.value.lines()


HEADER = """\
apiVersion: kubenet-lab/v1alpha1
kind: Lab
metadata: {name: t}
spec:
"""


# ------------------------------------------------------------------ valid labs


def test_seed_lab_loads_with_the_explainers_numbers() -> None:
    lab = load_spec(ROOT / "labs" / "00-seed")
    assert lab.name == "seed"
    assert [(n.name, n.ip, n.pod_cidr, n.index) for n in lab.nodes] == [
        ("node1", IPv4Address("192.168.1.10"), IPv4Network("10.244.1.0/24"), 0),
        ("node2", IPv4Address("192.168.1.11"), IPv4Network("10.244.2.0/24"), 1),
    ]
    assert [(p.name, p.node) for p in lab.pods] == [
        ("node1-pod1", "node1"), ("node1-pod2", "node1"), ("node2-pod1", "node2")]
    assert all(p.namespace == "default" and p.label_map == {"app": "web"} for p in lab.pods)
    assert lab.pods[0].containers[0].argv == (
        sys.executable, "-m", "images.agnhost", "netexec", "--http-port=8080", "--udp-port=8081")
    assert lab.cluster.service_cidr == IPv4Network("10.96.0.0/12")
    assert lab.network.backend == "host-gw" and lab.network.mtu == 1500
    assert lab.namespaces == {"default": {}, "kube-system": {}}
    assert len(lab.objects) == 4
    assert [(s.key, s.cluster_ip) for s in lab.services] == [("default/web", IPv4Address("10.96.0.100"))]
    assert lab.dns == model.ClusterDns(enabled=True, node="node2", domain="cluster.local")
    assert lab.external == (ExternalHost("external-web", IPv4Address("192.168.1.200"), ("http", "dns"), None, 0,
                                         ("api.example.com",)),)
    assert all(p.dns_policy == "ClusterFirst" and p.dns_config is None for p in lab.pods)
    assert lab.source == str(SEED) and lab.exercise == str(SEED.parent)


def test_a_spec_file_given_directly_has_no_exercise() -> None:
    lab = load_spec(str(SEED))
    assert lab.source == str(SEED) and lab.exercise is None


@pytest.mark.parametrize("name", VALID)
def test_valid_specs_load(name: str) -> None:
    assert isinstance(load_spec(SPECS / "valid" / name), Lab)


def test_defaults_apply_when_sections_are_left_out() -> None:
    lab = load_spec(SPECS / "valid" / "01-minimal.yaml")
    assert lab.cluster == model.Cluster()
    assert lab.underlay == model.Underlay()
    assert lab.network == model.Network()
    assert lab.nodes[0].pod_cidr == IPv4Network("10.244.1.0/24")
    assert lab.pods == () and lab.objects == ()


def test_podcidr_allocation_skips_blocks_given_explicitly() -> None:
    lab = load_spec(SPECS / "valid" / "02-explicit-podcidr.yaml")
    assert [str(n.pod_cidr) for n in lab.nodes] == ["10.244.2.0/24", "10.244.1.0/24", "10.244.3.0/24"]


def test_podcidr_allocation_skips_a_later_nodes_explicit_block_and_block_zero() -> None:
    text = HEADER + """\
  cluster: {podCIDR: 10.10.0.0/22, nodeCIDRMaskSize: 24}
  nodes:
    - {name: a, ip: 192.168.1.10}
    - {name: b, ip: 192.168.1.11}
    - {name: c, ip: 192.168.1.12, podCIDR: 10.10.2.0/24}
    - {name: d, ip: 192.168.1.13, podCIDR: 10.10.0.0/24}
"""
    lab = parse_spec_text(text)
    assert [str(n.pod_cidr) for n in lab.nodes] == ["10.10.1.0/24", "10.10.3.0/24", "10.10.2.0/24", "10.10.0.0/24"]


def test_deployments_spread_over_nodes_with_deterministic_names() -> None:
    lab = load_spec(SPECS / "valid" / "03-deployments.yaml")
    replicas = [p for p in lab.pods if p.owner == "web"]
    assert len(replicas) == 5
    assert [p.node for p in replicas] == ["node1", "node2", "node3", "node1", "node2"]
    for index, pod in enumerate(replicas):
        assert pod.name == f"web-{names.short_hash('shop', 'web', str(index), length=5)}"
        assert re.fullmatch(r"web-[0-9a-f]{5}", pod.name)
        assert pod.namespace == "shop" and pod.label_map == {"app": "web", "tier": "front"}
        assert pod.containers[0].ports[0] == model.ContainerPort(8080, "TCP", "http")
    # Deployments expand where they stand; the bare pod after them goes to the least loaded node.
    assert [p.name for p in lab.pods][5:] == ["client"]
    assert lab.pods[5].node == "node3" and lab.pods[5].owner is None
    assert lab.namespaces["shop"] == {"team": "checkout", "app.kubernetes.io/part-of": "shop"}
    assert [str(n.pod_cidr) for n in lab.nodes] == ["10.200.0.64/26", "10.200.0.128/26", "10.200.0.192/26"]
    assert load_spec(SPECS / "valid" / "03-deployments.yaml").pods == lab.pods


def test_normalized_objects_fill_in_defaults_and_keep_dns_fields() -> None:
    lab = load_spec(SPECS / "valid" / "03-deployments.yaml")
    deployment = lab.objects[1]
    assert deployment["metadata"] == {"name": "web", "namespace": "shop", "labels": {"app": "web"}}
    assert deployment["spec"]["replicas"] == 5
    port = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]
    assert port == {"containerPort": 8080, "protocol": "TCP", "name": "http"}
    assert lab.objects[3]["metadata"]["namespace"] == "default"
    pod = load_spec(SPECS / "valid" / "04-images-and-extras.yaml").objects[0]
    assert pod["spec"]["dnsPolicy"] == "None"
    assert pod["spec"]["dnsConfig"]["nameservers"] == ["10.96.0.10"]


def test_bare_pods_go_to_the_node_with_fewest_pods() -> None:
    pods = "".join(f"""\
    - apiVersion: v1
      kind: Pod
      metadata: {{name: p{i}}}
      spec: {{{node}containers: [{{name: c, image: pause}}]}}
""" for i, node in enumerate(["nodeName: a, ", "nodeName: a, ", "", "", "", ""]))
    text = HEADER + "  nodes: [{name: a, ip: 192.168.1.10}, {name: b, ip: 192.168.1.11}]\n  objects:\n" + pods
    lab = parse_spec_text(text)
    assert [p.node for p in lab.pods] == ["a", "a", "b", "b", "a", "b"]


def test_container_argv_for_built_in_and_local_programs() -> None:
    lab = load_spec(SPECS / "valid" / "04-images-and-extras.yaml")
    (pod,) = lab.pods
    argv = {c.name: c.argv for c in pod.containers}
    assert argv["server"] == (sys.executable, "-m", "images.agnhost", "netexec", "--http-port=8080",
                              "--udp-port=8081")
    assert argv["holder"] == ()
    assert argv["sleeper"] == ("sleep", "infinity")
    assert argv["own-agnhost"] == ("/usr/bin/env", "python3", "-c", "print(1)")
    assert pod.node == "node2" and pod.label_map == {"app": "mixed", "empty": ""}
    assert [n.name for n in lab.nodes] == ["node1", "node2"]  # merge key kept, name overridden


@pytest.mark.parametrize("image, base", [
    ("agnhost", "agnhost"), ("agnhost:2.47", "agnhost"), ("registry.k8s.io/e2e-test-images/agnhost:2.47", "agnhost"),
    ("localhost:5000/pause", "pause"), ("pause@sha256:abc", "pause"), ("nginx", "nginx"),
])
def test_image_base_name(image: str, base: str) -> None:
    assert image_base(image) == base


def test_agnhost_args_are_accepted_unchecked_without_the_image_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pod checks know no image's args: the API server hands in each built-in image's own check.
    monkeypatch.delitem(spec.IMAGE_ARGS, "agnhost")
    text = HEADER + """\
  nodes: [{name: node1, ip: 192.168.1.10}]
  objects:
    - {apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {containers: [{name: c, image: agnhost, args: [netexc]}]}}
"""
    assert parse_spec_text(text).pods[0].containers[0].argv[-1] == "netexc"


# ------------------------------------------------------------------ backends, racks and links

ONE_NODE = "  nodes: [{name: a, ip: 192.168.1.10}]\n"


def test_vxlan_pods_get_the_underlay_mtu_minus_the_vxlan_headers() -> None:
    lab = load_spec(SPECS / "valid" / "05-vxlan-flat.yaml")
    assert lab.network == Network(backend="vxlan", mtu=1450, bgp=Bgp())
    assert 1450 == model.DEFAULT_MTU - model.VXLAN_OVERHEAD
    assert lab.underlay == Underlay() and not lab.underlay.routed
    assert all(n.rack is None and n.link == LinkSpec() for n in lab.nodes)


def test_bgp_mesh_defaults_to_calicos_as_and_the_underlay_mtu() -> None:
    lab = load_spec(SPECS / "valid" / "06-bgp-mesh-flat.yaml")
    assert lab.network == Network(backend="bgp", mtu=9000, bgp=Bgp(asn=64512, peering="mesh"))
    assert lab.network.bgp.asn == model.CALICO_AS
    assert lab.underlay.link == LinkSpec(mtu=9000)
    assert [n.link.mtu for n in lab.nodes] == [9000, 9000, 9000]


def test_routed_spine_lab_fills_racks_routers_and_fabric() -> None:
    lab = load_spec(SPECS / "valid" / "07-routed-spine-bgp-tor.yaml")
    assert lab.underlay.subnet is None and lab.underlay.routed
    assert lab.underlay.racks == (
        Rack("rack1", IPv4Network("192.168.1.0/24"), "tor1", IPv4Address("192.168.1.254"), 65101, 0),
        # every default: named tor-<rack>, the subnet's first host, AS 65001 + rack index
        Rack("rack2", IPv4Network("192.168.2.0/24"), "tor-rack2", IPv4Address("192.168.2.1"), 65002, 1),
    )
    assert lab.underlay.fabric == Fabric(mode="spine", cidr=IPv4Network("10.255.0.0/29"), spine_asn=65100)
    assert lab.network == Network(backend="bgp", mtu=1500, bgp=Bgp(asn=model.CALICO_AS, peering="tor"))
    assert [(n.name, n.rack) for n in lab.nodes] == [("node1", "rack1"), ("node2", "rack1"), ("node3", "rack2")]
    assert lab.node_interface(lab.node("node3")) == IPv4Interface("192.168.2.10/24")
    assert lab.router_netns("tor1") == names.node_netns("racks", "tor1")


def test_routed_direct_lab_takes_the_default_fabric_range() -> None:
    lab = load_spec(SPECS / "valid" / "08-routed-direct-vxlan.yaml")
    assert lab.underlay.fabric == Fabric(mode="direct", cidr=Fabric().cidr, spine_asn=model.SPINE_AS)
    assert [(r.name, r.router, str(r.router_ip), r.asn) for r in lab.underlay.racks] == [
        ("rack-a", "tor-rack-a", "172.16.0.1", 65001),
        ("rack-b", "tor-rack-b", "172.16.0.65", 4200000001),
        ("rack-c", "tor-rack-c", "172.16.1.1", 65003),
    ]
    assert lab.network.backend == "vxlan" and lab.network.mtu == 1450 and lab.network.bgp == Bgp()
    assert [lab.node_subnet(n) for n in lab.nodes] == [r.subnet for r in lab.underlay.racks]


def test_node_links_override_the_underlay_default_field_by_field() -> None:
    lab = load_spec(SPECS / "valid" / "09-links.yaml")
    default = LinkSpec(mtu=1400, bandwidth_mbit=100.0, delay_ms=10.0, loss_percent=1.0)
    assert lab.underlay.link == default
    assert lab.network.mtu == 1400  # host-gw: pods take the underlay's MTU
    assert {n.name: n.link for n in lab.nodes} == {
        "node1": default,
        "node2": LinkSpec(mtu=9000, bandwidth_mbit=1000.0, delay_ms=1000.0, loss_percent=1.0),
        "node3": LinkSpec(mtu=1400, bandwidth_mbit=0.5, delay_ms=0.5, loss_percent=0.5),
        "node4": LinkSpec(mtu=1400, bandwidth_mbit=20.0, delay_ms=2.5, loss_percent=25.0),
        "node5": LinkSpec(mtu=1400, bandwidth_mbit=10.0, delay_ms=500.0, loss_percent=1.0),
    }


def test_vxlan_mtu_follows_the_underlay_link_unless_given() -> None:
    base = HEADER + "  underlay: {link: {mtu: 9000}}\n  nodes: [{name: a, ip: 192.168.1.10}]\n"
    assert parse_spec_text(base + "  network: {backend: vxlan}\n").network.mtu == 8950
    # An explicit MTU is taken as it is, even one too big for the tunnel: that is an exercise, not a typo.
    explicit = base.replace("9000", "1500") + "  network: {backend: vxlan, mtu: 1500}\n"
    assert parse_spec_text(explicit).network.mtu == 1500


def test_single_rack_labs_may_use_host_gw_and_a_bgp_mesh() -> None:
    text = HEADER + """\
  underlay:
    racks: [{name: rack1, subnet: 192.168.1.0/24}, {name: rack2, subnet: 192.168.2.0/24}]
  network: {backend: BACKEND}
  nodes:
    - {name: node1, ip: 192.168.1.10, rack: rack1}
    - {name: node2, ip: 192.168.1.11, rack: rack1}
"""
    for backend in ("host-gw", "bgp", "vxlan"):
        lab = parse_spec_text(text.replace("BACKEND", backend))
        assert lab.network.backend == backend and {n.rack for n in lab.nodes} == {"rack1"}


@pytest.mark.parametrize("value, mbit", [
    (100, 100.0), (2.5, 2.5), ("100Mbit", 100.0), ("100mbit", 100.0), ("10Mbps", 10.0), ("500kbit", 0.5),
    ("250kbps", 0.25), ("1Gbit", 1000.0), ("2gbps", 2000.0), ("1.5 Mbit", 1.5), ("100Gbit", 100000.0),
])
def test_bandwidth_units(value: object, mbit: float) -> None:
    text = HEADER + f"  nodes: [{{name: a, ip: 192.168.1.10, link: {{bandwidth: {value!s}}}}}]\n"
    assert parse_spec_text(text).nodes[0].link.bandwidth_mbit == pytest.approx(mbit)


@pytest.mark.parametrize("value, message", [
    ("10MB", "'10MB' is in bytes, but bandwidth counts bits: write 80Mbit (a byte is 8 bits)"),
    ("5MBps", "'5MBps' is in bytes, but bandwidth counts bits: write 40Mbit (a byte is 8 bits)"),
    ("3kB", "'3kB' is in bytes, but bandwidth counts bits: write 24kbit (a byte is 8 bits)"),
    ("200Gbit", "bandwidth 200Gbit is more than 100Gbit: use at most 100Gbit"),
    ("-1Mbit", "bandwidth -1Mbit must be more than 0: leave bandwidth out for an unshaped link"),
    ("0", "bandwidth 0Mbit must be more than 0: leave bandwidth out for an unshaped link"),
    (".inf", "bandwidth .inf is more than 100Gbit: use at most 100Gbit"),
    ("'" + "9" * 5000 + "'", "is not a bandwidth: write a number (Mbit) or a string with a unit"),
])
def test_bandwidth_problems(value: str, message: str) -> None:
    (line,) = _errors(HEADER + f"  nodes: [{{name: a, ip: 192.168.1.10, link: {{bandwidth: {value}}}}}]\n")
    assert line.startswith("t.yaml:5: spec.nodes[0].link.bandwidth: ") and message in line


@pytest.mark.parametrize("field, value, parsed", [
    ("delay", "10", 10.0), ("delay", "'250us'", 0.25), ("delay", "2s", 2000.0), ("delay", "60s", 60000.0),
    ("delay", "1.5ms", 1.5), ("loss", "0.1", 0.1), ("loss", "'2.5%'", 2.5), ("loss", "100%", 100.0),
])
def test_delay_and_loss_units(field: str, value: str, parsed: float) -> None:
    lab = parse_spec_text(HEADER + f"  underlay: {{link: {{{field}: {value}}}}}\n" + ONE_NODE)
    got = lab.underlay.link.delay_ms if field == "delay" else lab.underlay.link.loss_percent
    assert got == pytest.approx(parsed) and lab.nodes[0].link == lab.underlay.link


@pytest.mark.parametrize("field, value, message", [
    ("delay", "61s", "delay 61s is more than 60s: use at most 60s"),
    ("delay", "0", "delay 0ms must be more than 0: leave delay out for no added delay"),
    ("delay", "10 minutes", "unknown unit 'minutes' in '10 minutes': use us, ms or s, e.g. 10ms"),
    ("loss", "'1'", "'1' has no unit: write 1%, or the number 1 without quotes"),
    ("loss", "0%", "loss 0% must be more than 0: leave loss out for no loss"),
    ("loss", "true", "must be a number (%) or a string with a unit (%), e.g. 1%, but YAML reads true as a boolean"),
    ("mtu", "'1500'", "must be an integer, got the string '1500': remove the quotes"),
])
def test_delay_loss_and_mtu_problems(field: str, value: str, message: str) -> None:
    (line,) = _errors(HEADER + f"  underlay: {{link: {{{field}: {value}}}}}\n" + ONE_NODE)
    assert line == f"t.yaml:5: spec.underlay.link.{field}: {message}"


def test_routed_problems_are_reported_together() -> None:
    text = HEADER + """\
  underlay:
    racks:
      - {name: rack1, subnet: 192.168.1.0/24, router: {name: node1}}
      - {name: rack2, subnet: 192.168.1.128/25, router: {asNumber: 65000}}
    fabric: {cidr: 10.255.0.0/31}
  network: {backend: host-gw}
  nodes:
    - {name: node1, ip: 192.168.1.1, rack: rack1}
    - {name: node2, ip: 192.168.2.10}
"""
    assert _errors(text) == [
        "t.yaml:7: spec.underlay.racks[0].router.name: router name node1 is also the name of node spec.nodes[0]: "
        "routers and nodes are hosts of one lab and need different names; rename one",
        "t.yaml:8: spec.underlay.racks[1].subnet: 192.168.1.128/25 overlaps underlay.racks[0].subnet 192.168.1.0/24: "
        "each rack is its own segment behind its own router, so racks need separate subnets; pick another subnet "
        "for rack rack2",
        "t.yaml:8: spec.underlay.racks[1].router.asNumber: asNumber 65000 is also the spine's AS "
        "(fabric.spineASNumber): the spine and the top-of-rack routers peer by eBGP, which needs different ASes; "
        "pick another, e.g. 65002",
        "t.yaml:9: spec.underlay.fabric.cidr: 10.255.0.0/31 is too small for 2 racks: mode spine gives each "
        "top-of-rack router its own /30 link to the spine (4 addresses), so a /31 holds no rack; use a /29 or "
        "larger, e.g. 10.255.0.0/29",
        "t.yaml:13: spec.nodes[1].rack: missing; this lab's underlay has racks, so every node names the rack it "
        "sits in, e.g. rack: rack1 (racks: rack1, rack2)",
    ]
    # Once the racks are right, the node that took its router's address is reported too.
    fixed = text.replace("192.168.1.128/25", "192.168.2.0/24").replace("65000", "65002").replace("/31", "/24")
    fixed = fixed.replace("name: node1}", "name: tor1}").replace("192.168.2.10}", "192.168.2.10, rack: rack2}")
    assert _errors(fixed) == [
        "t.yaml:10: spec.network.backend: backend host-gw needs every node on one L2 segment: Flannel's host-gw "
        "routes a PodCIDR straight to the other node's IP, which must be on-link, but node1 is in rack1 and node2 "
        "in rack2; use backend vxlan or bgp, or put all nodes in one rack",
        "t.yaml:12: spec.nodes[0].ip: 192.168.1.1 is the address of tor1, the router of rack rack1 (its nodes' "
        "gateway): pick another address in 192.168.1.2..192.168.1.254",
    ]


def test_default_backend_across_racks_says_it_is_the_default() -> None:
    text = HEADER + """\
  underlay:
    racks: [{name: rack1, subnet: 192.168.1.0/24}, {name: rack2, subnet: 192.168.2.0/24}]
  nodes:
    - {name: node1, ip: 192.168.1.10, rack: rack1}
    - {name: node2, ip: 192.168.2.10, rack: rack2}
"""
    (line,) = _errors(text)
    assert line.startswith("t.yaml:4: spec.network.backend: backend host-gw (the default) needs every node on one "
                           "L2 segment")
    (line,) = _errors(text + "  network: {backend: bgp}\n")
    assert line.startswith("t.yaml:10: spec.network.bgp.peering: peering mesh (the default) leaves the racks' "
                           "routers without pod routes")


def test_a_node_may_not_take_the_spines_name_in_a_spine_fabric() -> None:
    text = HEADER + """\
  underlay:
    racks: [{name: rack1, subnet: 192.168.1.0/24}]
    fabric: {mode: MODE}
  network: {backend: vxlan}
  nodes: [{name: spine, ip: 192.168.1.10, rack: rack1}]
"""
    assert _errors(text.replace("MODE", "spine")) == [
        "t.yaml:9: spec.nodes[0].name: node name spine is the name of the fabric's spine router: rename the node"]
    assert parse_spec_text(text.replace("MODE", "direct")).nodes[0].name == "spine"


def test_unknown_backends_name_the_supported_ones() -> None:
    text = HEADER + "  network: {backend: BACKEND}\n  nodes: [{name: a, ip: 192.168.1.10}]\n"
    assert _errors(text.replace("BACKEND", "calico")) == [
        "t.yaml:5: spec.network.backend: unknown backend 'calico' (did you mean bgp?); supported: host-gw, vxlan, bgp, "
        "ipip, vpc"]
    assert _errors(text.replace("BACKEND", "udp")) == [
        "t.yaml:5: spec.network.backend: unknown backend 'udp'; supported: host-gw, vxlan, bgp, ipip, vpc"]


def test_the_exercise_labs_still_load() -> None:
    for folder in sorted((ROOT / "labs").iterdir()):
        if (folder / "lab.yaml").is_file():
            assert isinstance(load_spec(folder), Lab)


# ------------------------------------------------------------------ invalid labs


def test_there_are_enough_invalid_specs_each_with_a_golden_file() -> None:
    assert len(INVALID) >= 25
    for name in INVALID:
        assert (SPECS / "invalid" / name).with_suffix(".err").is_file(), name


@pytest.mark.parametrize("name", INVALID)
def test_invalid_spec_fails_with_the_golden_message(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if "agnhost" in name and not _agnhost_available():
        pytest.skip("images.agnhost is not importable here")
    folder = SPECS / "invalid"
    monkeypatch.chdir(folder)
    with pytest.raises(SpecError) as info:
        load_spec(name)
    got = info.value.lines()
    golden = folder / name.replace(".yaml", ".err")
    if os.environ.get("KUBENET_UPDATE_GOLDEN") == "1":
        golden.write_text("\n".join(got) + "\n")
    assert got == golden.read_text().splitlines()
    assert info.value.file == name
    assert all(line.startswith(name) for line in got)
    assert spec.INTERNAL_ERROR not in str(info.value)


def test_many_problems_are_reported_together() -> None:
    text = HEADER + """\
  cluster: {podCIDR: 10.244.0.5/16}
  network: {backend: wireguard, mtu: 100}
  nodes:
    - {name: Node1, ip: 192.168.1.300}
    - {name: node2, ip: 192.168.1.11, podCidr: 10.244.2.0/24}
  objects:
    - apiVersion: v1
      kind: Pod
      metadata: {name: a;reboot}
      spec: {containers: [{name: c, image: nginx}]}
    - {apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: deny}}
"""
    assert _errors(text) == [
        "t.yaml:9: spec.nodes[1].podCidr: unknown field 'podCidr' (did you mean 'podCIDR'?)",
        "t.yaml:13: spec.objects[0].metadata.name: 'a;reboot' is not a valid name: use lower-case letters, digits "
        "and '-', starting and ending with a letter or digit",
        "t.yaml:14: spec.objects[0].spec.containers[0].image: image nginx is not built in (built-ins: agnhost, "
        "pause): give command: [...] to run a program from this machine",
        "t.yaml:15: spec.objects[1].spec: missing; add it, e.g. spec: {podSelector: {}, policyTypes: [Ingress]}",
    ]
    # Once the structure is right, the semantic problems all come out at once too.
    fixed = text.replace("podCidr", "podCIDR")
    assert _errors(fixed) == [
        "t.yaml:5: spec.cluster.podCIDR: 10.244.0.5/16 has host bits set (did you mean 10.244.0.0/16?)",
        "t.yaml:6: spec.network.backend: backend wireguard is not implemented yet; supported: host-gw, vxlan, bgp, "
        "ipip, vpc",
        "t.yaml:6: spec.network.mtu: mtu 100 is out of range: use 576..9000 (1500 is Ethernet's usual size)",
        "t.yaml:8: spec.nodes[0].name: 'Node1' is not a valid name: use lower-case letters, digits and '-', "
        "starting and ending with a letter or digit",
        "t.yaml:8: spec.nodes[0].ip: '192.168.1.300' is not an IPv4 address: write it like 192.168.1.10",
        "t.yaml:13: spec.objects[0].metadata.name: 'a;reboot' is not a valid name: use lower-case letters, "
        "digits and '-', starting and ending with a letter or digit",
        "t.yaml:14: spec.objects[0].spec.containers[0].image: image nginx is not built in (built-ins: agnhost, "
        "pause): give command: [...] to run a program from this machine",
        "t.yaml:15: spec.objects[1].spec: missing; add it, e.g. spec: {podSelector: {}, policyTypes: [Ingress]}",
    ]


def test_spec_error_file_is_none_for_text_without_a_name() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec_text("kind: Lab\n")
    assert info.value.file is None
    assert info.value.lines()[0].startswith("<spec>:1: ")


# ------------------------------------------------------------------ files


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")


def test_folder_without_lab_yaml(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="folder without lab.yaml"):
        load_spec(tmp_path)


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: \xff}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.lines() == [f"{path}:3: the file is not UTF-8 text (byte 0xff cannot be decoded): save it as UTF-8"]


def test_exercise_folder_sets_exercise(tmp_path: Path) -> None:
    folder = tmp_path / "07-thing"
    folder.mkdir()
    (folder / "lab.yaml").write_text(SEED.read_text())
    lab = load_spec(folder)
    assert lab.exercise == str(folder.resolve())
    assert lab.source == str((folder / "lab.yaml").resolve())


# ------------------------------------------------------------------ robustness: only SpecError comes out

MALFORMED = [
    "", "   \n", "# only a comment\n", "~", "null", "42", "'text'", "[]", "[1, 2]", "{}", "- a\n- b\n",
    "apiVersion: [\n", "a: b: c\n", "\t- x\n", "\x00", "\x07abc", "key: \"unterminated\n", "&a [*a]", "a: *missing\n",
    "? [a, b]\n: c\n", "!!set {a, b}\n", "!!python/object:os.system {}\n", "!custom x\n", "{1: 2}\n", "on: yes\n",
    "apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: null\nspec: null\n",
    "apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: null}\nspec: {nodes: null}\n",
    "apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: x}\nspec: {nodes: [null, 1, [], {}]}\n",
    "apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: x}\nspec: {nodes: [{name: a, ip: 1}], "
    "objects: [null, 1, [], {}, {kind: null}, {apiVersion: v1, kind: Pod}, {apiVersion: v1, kind: Pod, "
    "metadata: null, spec: null}, {apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {containers: null}}]}\n",
    "apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: x}\nspec:\n  network: {mtu: 0x" + "f" * 5000 + "}\n"
    "  nodes: [{name: a, ip: 192.168.1.10}]\n",
    "apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: x}\nspec:\n  network: {mtu: " + "9" * 5000 + "}\n",
    "apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: x}\nspec:\n  cluster: {nodeCIDRMaskSize: -99999999999}\n"
    "  nodes: [{name: a, ip: 192.168.1.10}]\n",
    "apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: x}\nspec:\n  cluster: {podCIDR: 0.0.0.0/0, "
    "serviceCIDR: 255.255.255.255/32}\n  underlay: {subnet: 1.2.3.4/32}\n  nodes: [{name: a, ip: 1.2.3.4}]\n",
    "apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: x}\nspec:\n  cluster: {podCIDR: 10.0.0.0/29, "
    "nodeCIDRMaskSize: 30}\n  nodes: [{name: a, ip: 192.168.1.10, podCIDR: 10.0.0.0/30}, {name: b, ip: 192.168.1.11},\n"
    "    {name: c, ip: 192.168.1.12}]\n",
    "apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: x}\nspec:\n  nodes: [{name: a, ip: 2001:db8::1, "
    "podCIDR: 10.244.999.0/24}, {name: b, ip: '', podCIDR: ''}]\n",
    "apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: x}\nspec:\n  nodes: [{name: a, ip: 192.168.1.10}]\n"
    "  objects:\n    - {apiVersion: apps/v1, kind: Deployment, metadata: {name: d}, spec: {replicas: 99999999999999, "
    "selector: {matchLabels: {}}, template: {metadata: {}, spec: {containers: [{name: c, image: agnhost, "
    "command: [], args: [\"\\0\"]}]}}}}\n",
    "a: &a\n  b: *a\n",
    "a: &x {<<: *x}\n",
    "[" * 5000 + "]" * 5000,
    "- " * 3000 + "x\n",
    "x: " + "\U0001F600" * 10 + "\n",
    "\ufeffapiVersion: kubenet-lab/v1alpha1\n",
]


@pytest.mark.parametrize("text", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_input_raises_only_spec_error(text: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, "m.yaml")
    message = str(info.value)
    assert message and spec.INTERNAL_ERROR not in message
    assert len(info.value.issues) <= schema.MAX_ISSUES + 1


def test_billion_laughs_is_refused_quickly() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]"
              for i in range(1, 9)]
    with pytest.raises(SpecError, match="more than"):
        parse_spec_text("\n".join(lines) + "\n")


def _outcome(text: str) -> None:
    try:
        parse_spec_text(text, "f.yaml")
    except SpecError as exc:
        assert spec.INTERNAL_ERROR not in str(exc), str(exc)


def test_randomly_damaged_seed_specs_raise_only_spec_error() -> None:
    rng = random.Random(1234)
    seed = SEED.read_text()
    alphabet = [":", "-", " ", "\n", "{", "}", "[", "]", "'", '"', "&", "*", "!", "#", "/", "0", "9", "x", "\t", "|"]
    for _ in range(400):
        chars = list(seed)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(chars))
            action = rng.random()
            if action < 0.4:
                del chars[pos]
            elif action < 0.8:
                chars[pos] = rng.choice(alphabet)
            else:
                chars.insert(pos, rng.choice(alphabet))
        _outcome("".join(chars))


WEIRD_VALUES = [None, True, 0, -1, 2**40, 1.5, "", "x", "on", "A;B", "10.244.1.5/24", "::1", [], [None], {}, {"x": 1},
                "9" * 300]


def _subtrees(data: object, path: tuple = ()) -> list[tuple]:
    found = [path]
    if isinstance(data, dict):
        for key, value in data.items():
            found += _subtrees(value, path + (key,))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += _subtrees(value, path + (index,))
    return found


def _replaced(data: object, path: tuple, value: object) -> object:
    if not path:
        return value
    copy = dict(data) if isinstance(data, dict) else list(data)  # type: ignore[call-overload]
    copy[path[0]] = _replaced(copy[path[0]], path[1:], value)
    return copy


@pytest.mark.parametrize("path", [SEED, SPECS / "valid" / "07-routed-spine-bgp-tor.yaml",
                                  SPECS / "valid" / "09-links.yaml", SPECS / "valid" / "11-services-routed.yaml",
                                  SPECS / "valid" / "14-dns-and-ingress-small.yaml"],
                         ids=["seed", "routed", "links", "services", "dns-and-ingress"])
def test_every_field_of_the_seed_replaced_by_odd_values_raises_only_spec_error(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    for path in _subtrees(data):
        for value in WEIRD_VALUES:
            _outcome(yaml.safe_dump(_replaced(data, path, value)))


def test_public_functions_refuse_garbage_objects_with_spec_error() -> None:
    lab = load_spec(SEED)
    for objects in ([None], [1], [{"kind": 1}], [{"apiVersion": "v1", "kind": "Pod", (1, 2): 3}], "notalist",
                    [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": 2**5000}}]):
        for function in (pods_from_objects, services_from_objects, ingresses_from_objects):
            with pytest.raises(SpecError) as info:
                function(objects, lab, "o.yaml")  # type: ignore[arg-type]
            assert spec.INTERNAL_ERROR not in str(info.value)
    for text in ("", "---\n---\n", "kind: List\nitems: 3\n", "- 1\n", "a: [\n", "--- 1\n--- {}\n"):
        with pytest.raises(SpecError) as info:
            parse_objects(text, lab, "o.yaml")
        assert spec.INTERNAL_ERROR not in str(info.value)


# ------------------------------------------------------------------ objects applied to a running lab


POD = """\
apiVersion: v1
kind: Pod
metadata: {{name: {name}{extra}}}
spec:
  {node}
  containers: [{{name: c, image: agnhost, args: [netexec], ports: [{{containerPort: 8080}}]}}]
"""


def test_parse_objects_reads_documents_and_lists_and_normalizes() -> None:
    lab = load_spec(SEED)
    text = POD.format(name="extra", extra="", node="") + "---\n" + """\
apiVersion: v1
kind: List
items:
  - {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {name: cart, namespace: shop}
    spec:
      selector: {matchLabels: {app: cart}}
      template:
        metadata: {labels: {app: cart}}
        spec: {containers: [{name: c, image: pause}]}
"""
    objects = parse_objects(text, lab, "apply.yaml")
    assert [o["kind"] for o in objects] == ["Pod", "Namespace", "Deployment"]
    assert objects[0]["metadata"]["namespace"] == "default"
    assert objects[0]["spec"]["containers"][0]["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert objects[2]["spec"]["replicas"] == 1
    pods = pods_from_objects(objects, lab, "apply.yaml")
    assert [(p.key, p.node, p.owner) for p in pods] == [
        ("default/extra", "node2", None),  # node2 had one pod, node1 two
        (f"shop/cart-{names.short_hash('shop', 'cart', '0', length=5)}", "node1", "cart"),
    ]


def test_parse_objects_checks_against_the_running_lab() -> None:
    lab = load_spec(SEED)
    text = (POD.format(name="node1-pod1", extra="", node="") + "---\n"
            + POD.format(name="x", extra=", namespace: shop", node="nodeName: node9"))
    with pytest.raises(SpecError) as info:
        parse_objects(text, lab, "apply.yaml")
    assert info.value.lines() == [
        "apply.yaml:3: documents[0].metadata.name: pod default/node1-pod1 clashes with a pod already running in "
        "lab seed: rename one",
        "apply.yaml:10: documents[1].metadata.namespace: namespace shop does not exist: add a v1 Namespace object "
        "named shop",
        "apply.yaml:12: documents[1].spec.nodeName: nodeName node9 is not a node of this lab (nodes: node1, node2)",
    ]


def test_applied_pods_count_against_capacity_with_the_running_ones() -> None:
    text = HEADER + """\
  cluster: {nodeCIDRMaskSize: 29}
  nodes: [{name: node1, ip: 192.168.1.10}]
  objects:
    - apiVersion: apps/v1
      kind: Deployment
      metadata: {name: web}
      spec:
        replicas: 4
        selector: {matchLabels: {app: web}}
        template: {metadata: {labels: {app: web}}, spec: {containers: [{name: c, image: pause}]}}
"""
    lab = parse_spec_text(text)
    assert lab.nodes[0].pod_capacity == 5 and len(lab.pods) == 4
    assert len(pods_from_objects([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "one"},
                                   "spec": {"containers": [{"name": "c", "image": "pause"}]}}], lab, None)) == 1
    two = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": n},
            "spec": {"containers": [{"name": "c", "image": "pause"}]}} for n in ("one", "two")]
    with pytest.raises(SpecError) as info:
        pods_from_objects(two, lab, "apply.yaml")
    assert info.value.lines() == [
        "apply.yaml: objects[1]: node1 would have 6 pods (counting 4 already running) but its PodCIDR 10.244.0.8/29 "
        "holds 5 (10.244.0.9 is the gateway): "
        "give nodes larger PodCIDRs with a smaller cluster.nodeCIDRMaskSize (28 holds 13), or put fewer pods on node1"]


def test_pods_from_objects_uses_the_labs_namespaces() -> None:
    lab = dataclasses.replace(load_spec(SEED), namespaces={"default": {}, "kube-system": {}, "shop": {}})
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "shop"},
           "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "pause"}]}}
    (pod,) = pods_from_objects([obj], lab, None)
    assert (pod.key, pod.node, pod.containers[0].argv) == ("shop/p", "node1", ())


def test_the_kind_registry_takes_new_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    def read_config_map(obj: object, loc: tuple, issues: schema.Issues) -> Parsed:
        assert isinstance(obj, dict)
        return Parsed("v1", "ConfigMap", loc, dict(obj), obj["metadata"]["name"], "default", {})

    monkeypatch.setitem(spec.KINDS, ("v1", "ConfigMap"), read_config_map)
    text = HEADER + """\
  nodes: [{name: node1, ip: 192.168.1.10}]
  objects: [{apiVersion: v1, kind: ConfigMap, metadata: {name: web}}]
"""
    lab = parse_spec_text(text)
    assert lab.objects == ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "web"}},)
    assert lab.pods == () and lab.services == ()


# ------------------------------------------------------------------ services, kube-proxy, external hosts

IP = IPv4Address


def _service(namespace: str, name: str, services: tuple[Service, ...] | list[Service]) -> Service:
    return next(s for s in services if s.namespace == namespace and s.name == name)


def test_labs_without_services_get_the_defaults() -> None:
    lab = load_spec(SPECS / "valid" / "01-minimal.yaml")
    assert lab.services == () and lab.external == ()
    assert lab.kube_proxy == KubeProxy(mode="iptables") and model.PROXY_MODES[0] == "iptables"


def test_services_of_every_kind_with_allocated_cluster_ips_and_node_ports() -> None:
    lab = load_spec(SPECS / "valid" / "10-services-flat.yaml")
    assert lab.kube_proxy == KubeProxy(mode="nftables")
    # Allocated from serviceCIDR + 100 in spec order; 10.96.0.101 is given to "pinned" (written later), so skipped.
    assert [(s.key, s.cluster_ip) for s in lab.services] == [
        ("shop/web", IP("10.96.0.100")), ("shop/pinned", IP("10.96.0.101")), ("shop/web-np", IP("10.96.0.102")),
        ("default/sticky", IP("10.96.0.103")), ("shop/web-headless", None), ("default/manual", IP("10.96.0.104")),
    ]
    services = lab.services
    assert _service("shop", "web", services) == Service(
        name="web", namespace="shop", cluster_ip=IP("10.96.0.100"),
        ports=(ServicePort(name="", port=80, target_port="http", protocol="TCP", node_port=None),),
        selector=(("app", "web"),), type="ClusterIP", session_affinity="None", affinity_timeout=10800,
        external_traffic_policy="Cluster")
    assert _service("shop", "pinned", services).ports == (
        ServicePort("http", 80, 8080, "TCP"), ServicePort("udp", 81, "udp", "UDP"))
    # Node ports: 30001 is given, so the first allocated one is 30000 and the next 30002.
    web_np = _service("shop", "web-np", services)
    assert web_np.type == "NodePort" and web_np.external_traffic_policy == "Local"
    assert [(p.name, p.node_port) for p in web_np.ports] == [("http", 30001), ("alt", 30000)]
    sticky = _service("default", "sticky", services)
    assert (sticky.session_affinity, sticky.affinity_timeout, sticky.external_traffic_policy) == ("ClientIP", 60,
                                                                                                   "Cluster")
    # 53/TCP and 53/UDP of one service share a node port, as kube-apiserver allocates them.
    assert [(p.port, p.protocol, p.node_port) for p in sticky.ports] == [(53, "TCP", 30002), (53, "UDP", 30002)]
    headless = _service("shop", "web-headless", services)
    assert headless.cluster_ip is None and headless.ports == () and headless.selects({"app": "web"})
    manual = _service("default", "manual", services)
    assert manual.selector == () and not manual.selects({"app": "web"})
    assert manual.ports == (ServicePort("", 5432, 5432, "TCP"),)
    assert lab.external == (ExternalHost("web-ext", IP("192.168.1.200"), ("http",), None, 0),
                            ExternalHost("client", IP("192.168.1.201"), (), None, 1))
    assert load_spec(SPECS / "valid" / "10-services-flat.yaml").services == services  # reproducible


def test_service_manifests_are_stored_with_defaults_and_allocations() -> None:
    lab = load_spec(SPECS / "valid" / "10-services-flat.yaml")
    stored = {o["metadata"]["name"]: o for o in lab.objects if o["kind"] == "Service"}
    assert stored["web"]["spec"] == {"selector": {"app": "web"}, "type": "ClusterIP", "sessionAffinity": "None",
                                     "clusterIP": "10.96.0.100",
                                     "ports": [{"port": 80, "targetPort": "http", "protocol": "TCP"}]}
    assert stored["web-np"]["spec"]["ports"][1] == {"name": "alt", "port": 8080, "targetPort": 8080,
                                                    "protocol": "TCP", "nodePort": 30000}
    assert stored["sticky"]["metadata"]["namespace"] == "default"
    assert stored["sticky"]["spec"]["externalTrafficPolicy"] == "Cluster"
    assert stored["web-headless"]["spec"]["clusterIP"] == "None"
    # The stored manifests read back into the same services, whatever order the allocations came in.
    bare = dataclasses.replace(lab, services=())
    assert services_from_objects(list(reversed(lab.objects)), bare, None) == list(reversed(lab.services))


def test_external_hosts_on_a_routed_underlay_sit_in_a_rack() -> None:
    lab = load_spec(SPECS / "valid" / "11-services-routed.yaml")
    assert lab.kube_proxy.mode == "ipvs"
    assert lab.external == (ExternalHost("outside", IP("192.168.2.200"), ("http",), "rack2", 0),)
    (service,) = lab.services
    assert service.cluster_ip == IP("10.100.0.100") and service.ports[0].node_port == 30000


def test_services_from_objects_allocates_after_the_labs_services() -> None:
    lab = load_spec(SPECS / "valid" / "10-services-flat.yaml")
    new = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "more"},
            "spec": {"type": "NodePort", "selector": {"app": "web"}, "ports": [{"port": 80}]}},
           {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "fixed"},
            "spec": {"clusterIP": "10.96.0.105", "ports": [{"port": 80}]}}]
    more, fixed = services_from_objects(new, lab, "apply.yaml")
    assert (more.cluster_ip, more.ports[0].node_port, more.ports[0].target_port) == (IP("10.96.0.106"), 30003, 80)
    assert fixed.cluster_ip == IP("10.96.0.105") and fixed.ports[0].node_port is None
    assert lab.services[0].key == "shop/web"  # the lab itself is not changed


def test_services_from_objects_catches_clashes_with_the_labs_services() -> None:
    lab = load_spec(SPECS / "valid" / "10-services-flat.yaml")
    clashing = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
                 "spec": {"ports": [{"port": 80}]}},
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "other"},
                 "spec": {"clusterIP": "10.96.0.101", "type": "NodePort", "ports": [{"port": 80, "nodePort": 30001}]}}]
    with pytest.raises(SpecError) as info:
        services_from_objects(clashing, lab, "apply.yaml")
    assert info.value.lines() == [
        "apply.yaml: objects[0].metadata.name: service shop/web clashes with service shop/web, already in lab "
        "services: rename one",
        "apply.yaml: objects[1].spec.clusterIP: clusterIP 10.96.0.101 is already the cluster IP of service "
        "shop/pinned, already in lab services: give each service its own, or leave clusterIP out to have one "
        "allocated",
        "apply.yaml: objects[1].spec.ports[0].nodePort: nodePort 30001 is already used by service shop/web-np, "
        "already in lab services: every node listens on a node port for one service only; pick another, or leave "
        "nodePort out to have one allocated",
    ]


def test_services_from_objects_ignores_pods_and_pods_from_objects_ignores_services() -> None:
    lab = load_spec(SEED)
    objects = parse_objects(POD.format(name="extra", extra=", labels: {app: web}", node="") + """\
---
apiVersion: v1
kind: Service
metadata: {name: web2}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
""", lab, "apply.yaml")
    assert objects[1]["spec"]["clusterIP"] == "10.96.0.101"  # the seed's own service web has .100
    assert [p.key for p in pods_from_objects(objects, lab, None)] == ["default/extra"]
    assert [s.key for s in services_from_objects(objects, lab, None)] == ["default/web2"]
    # Each function checks only its own kind against the lab: a pod clashing with a running one is no
    # concern of services_from_objects (lab apply runs both, and parse_objects checks everything).
    clash = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "node1-pod1"},
             "spec": {"containers": [{"name": "c", "image": "pause"}]}}
    assert [s.key for s in services_from_objects([clash, objects[1]], lab, None)] == ["default/web2"]
    with pytest.raises(SpecError, match="clashes with a pod already running"):
        pods_from_objects([clash, objects[1]], lab, None)


def test_parse_objects_reports_service_clashes_with_lines() -> None:
    lab = load_spec(SPECS / "valid" / "10-services-flat.yaml")
    text = """\
apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  clusterIP: 10.96.0.100
  ports: [{port: 80}]
"""
    with pytest.raises(SpecError) as info:
        parse_objects(text, lab, "apply.yaml")
    assert info.value.lines() == [
        "apply.yaml:3: metadata.name: service default/sticky clashes with service default/sticky, already in lab "
        "services: rename one",
        "apply.yaml:5: spec.clusterIP: clusterIP 10.96.0.100 is already the cluster IP of service shop/web, already "
        "in lab services: give each service its own, or leave clusterIP out to have one allocated",
    ]


def _services_lab(cidr: str, count: int, extra: str = "", dns: str = "") -> Lab:
    objects = "".join(f"    - {{apiVersion: v1, kind: Service, metadata: {{name: s{i}}}, spec: {{ports: [{{port: 80}}]}}}}\n"
                      for i in range(count))
    return parse_spec_text(HEADER + f"  cluster: {{serviceCIDR: {cidr}}}\n" + dns + ONE_NODE + "  objects:\n" + extra
                           + objects)


def test_cluster_ip_allocation_never_hands_out_the_reserved_addresses() -> None:
    # A range too small to start at + 100 starts at + 2, skipping .10 (kube-dns) and the broadcast address.
    lab = _services_lab("10.96.0.0/28", 12)
    assert [str(s.cluster_ip) for s in lab.services] == [f"10.96.0.{i}" for i in (2, 3, 4, 5, 6, 7, 8, 9, 11, 12,
                                                                                  13, 14)]
    with pytest.raises(SpecError, match=r"no address of cluster.serviceCIDR 10.96.0.0/28 is left"):
        _services_lab("10.96.0.0/28", 13)
    # In a range large enough, allocation wraps to the low addresses once + 100 .. broadcast are used.
    lab = _services_lab("10.96.0.0/25", 29)  # + 100 .. + 126 holds 27
    assert [str(s.cluster_ip) for s in lab.services][-3:] == ["10.96.0.126", "10.96.0.2", "10.96.0.3"]


def test_the_dns_address_may_be_given_and_an_empty_cluster_ip_is_allocated() -> None:
    # Only with the cluster DNS addon off: it owns .10 and the name kube-dns in kube-system otherwise.
    extra = ("    - {apiVersion: v1, kind: Service, metadata: {name: kube-dns, namespace: kube-system}, "
             "spec: {clusterIP: 10.96.0.10, ports: [{name: dns, port: 53, protocol: UDP}]}}\n"
             "    - {apiVersion: v1, kind: Service, metadata: {name: empty}, spec: {clusterIP: '', ports: [{port: 1}]}}\n")
    lab = _services_lab("10.96.0.0/12", 1, extra, dns="  dns: {enabled: false}\n")
    assert [(s.key, str(s.cluster_ip)) for s in lab.services] == [
        ("kube-system/kube-dns", "10.96.0.10"), ("default/empty", "10.96.0.100"), ("default/s0", "10.96.0.101")]


@pytest.mark.parametrize("mode, message", [
    ("IPVS", "unknown kube-proxy mode 'IPVS' (did you mean ipvs?)"),
    ("nft", "unknown kube-proxy mode 'nft' (did you mean nftables?)"),
    ("ebpf", "unknown kube-proxy mode 'ebpf'; supported: iptables, nftables, ipvs"),
    ("kernelspace", "kernelspace is kube-proxy's mode on Windows nodes: use one of iptables, nftables, ipvs"),
])
def test_kube_proxy_mode_problems(mode: str, message: str) -> None:
    (line,) = _errors(HEADER + f"  kubeProxy: {{mode: {mode}}}\n" + ONE_NODE)
    assert line.startswith("t.yaml:5: spec.kubeProxy.mode: ") and message in line


@pytest.mark.parametrize("mode", model.PROXY_MODES)
def test_every_kube_proxy_mode_loads(mode: str) -> None:
    assert parse_spec_text(HEADER + f"  kubeProxy: {{mode: {mode}}}\n" + ONE_NODE).kube_proxy == KubeProxy(mode)


def test_services_and_external_hosts_are_checked_while_the_cluster_is_wrong() -> None:
    text = HEADER + """\
  cluster: {serviceCIDR: 10.96.0.0/33}
  nodes: [{name: a, ip: 192.168.1.10}]
  external: [{name: a, ip: 192.168.1.10}]
  objects:
    - {apiVersion: v1, kind: Service, metadata: {name: Web}, spec: {ports: [{port: 80}]}}
    - {apiVersion: v1, kind: Service, metadata: {name: ok}, spec: {clusterIP: 1.2.3.4, ports: [{port: 80}]}}
"""
    assert _errors(text) == [
        "t.yaml:5: spec.cluster.serviceCIDR: 10.96.0.0/33 is not an IPv4 network (each address part is 0..255 "
        "without leading zeros, the prefix 0..32): write ADDRESS/PREFIX, e.g. 10.96.0.0/12",
        "t.yaml:7: spec.external[0].name: external host name a is also the name of node spec.nodes[0]: nodes, "
        "routers and external hosts are hosts of one lab and need different names; rename the external host",
        "t.yaml:7: spec.external[0].ip: 192.168.1.10 is already the address of node a (spec.nodes[0]): give the "
        "external host an address of its own in underlay.subnet 192.168.1.0/24",
        "t.yaml:9: spec.objects[0].metadata.name: 'Web' is not a valid Service name: use lower-case letters, "
        "digits and '-', starting with a letter and ending with a letter or digit",
    ]  # objects[1]'s clusterIP is not checked against a serviceCIDR that is itself wrong


# ------------------------------------------------------------------ cluster DNS, pod DNS settings, external names


def test_labs_run_the_cluster_dns_and_an_automatic_ingress_controller_by_default() -> None:
    lab = load_spec(SPECS / "valid" / "01-minimal.yaml")
    assert lab.dns == ClusterDns(enabled=True, node=None, domain="cluster.local")
    assert lab.ingress_controller == IngressController(enabled=None, node=None, node_port=30080)
    assert lab.ingresses == ()


def test_cluster_dns_placement_domain_and_external_names() -> None:
    lab = load_spec(SPECS / "valid" / "12-dns.yaml")
    assert lab.dns == ClusterDns(enabled=True, node="node2", domain="lab.internal")
    assert lab.external == (
        ExternalHost("ext", IP("192.168.1.200"), ("http", "dns"), None, 0, ("api.example.com", "www.example.com")),
        ExternalHost("db", IP("192.168.1.201"), (), None, 1, ("db.example.com",)),
    )


def test_pods_carry_their_dns_policy_and_config() -> None:
    lab = load_spec(SPECS / "valid" / "12-dns.yaml")
    pods = {p.name: p for p in lab.pods}
    assert (pods["first"].dns_policy, pods["first"].dns_config) == ("ClusterFirst", None)
    assert pods["tuned"].dns_policy == "ClusterFirst"
    assert pods["tuned"].dns_config == DnsConfig(nameservers=(), searches=("example.com", "corp.example.com."),
                                                 options=(("ndots", "2"), ("edns0", None)))
    assert pods["host-net"].dns_policy == "ClusterFirstWithHostNet" and pods["host-net"].dns_config is None
    assert pods["node-dns"].dns_policy == "Default"
    assert pods["own"].dns_policy == "None"
    assert pods["own"].dns_config == DnsConfig(("192.168.1.200",), ("example.com",), (("ndots", "0"), ("timeout", "2")))
    replicas = [p for p in lab.pods if p.owner == "web"]
    assert len(replicas) == 2
    assert all(p.dns_policy == "None" and p.dns_config == DnsConfig(("10.96.0.10", "192.168.1.200"), (),
                                                                    (("ndots", "15"),)) for p in replicas)


def test_dns_disabled_leaves_its_address_and_names_to_the_user() -> None:
    text = HEADER + """\
  dns: {enabled: ENABLED}
  nodes: [{name: a, ip: 192.168.1.10}]
  external: [{name: ext, ip: 192.168.1.200, serves: [dns], names: [web.cluster.local]}]
  objects:
    - apiVersion: v1
      kind: Service
      metadata: {name: kube-dns, namespace: kube-system}
      spec: {clusterIP: 10.96.0.10, ports: [{name: dns, port: 53, protocol: UDP}]}
"""
    lab = parse_spec_text(text.replace("ENABLED", "false"))
    assert lab.dns == ClusterDns(enabled=False) and lab.services[0].cluster_ip == IP("10.96.0.10")
    assert [line.split(": ", 2)[1] for line in _errors(text.replace("ENABLED", "true"))] == [
        "spec.external[0].names[0]", "spec.objects[0].metadata.name", "spec.objects[0].spec.clusterIP"]


def test_ndots_must_be_written_as_a_string() -> None:
    text = HEADER + ONE_NODE + """\
  objects:
    - apiVersion: v1
      kind: Pod
      metadata: {name: p}
      spec: {dnsConfig: {options: [{name: ndots, value: 2}]}, containers: [{name: c, image: pause}]}
"""
    assert _errors(text) == ['t.yaml:10: spec.objects[0].spec.dnsConfig.options[0].value: must be a string, but YAML '
                             'reads 2 as an integer: quote it ("2")']


def test_the_dns_addons_names_are_refused_when_applied_to_a_running_lab() -> None:
    lab = load_spec(SEED)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "coredns", "namespace": "kube-system"},
           "spec": {"containers": [{"name": "c", "image": "pause"}]}}
    with pytest.raises(SpecError) as info:
        pods_from_objects([pod], lab, "apply.yaml")
    assert info.value.lines() == [
        "apply.yaml: objects[0].metadata.name: Pod kube-system/coredns: the names kube-dns and coredns in namespace "
        "kube-system belong to the cluster DNS addon this lab runs (spec.dns): rename the object or put it in another "
        "namespace, or set dns.enabled: false to run your own"]
    assert services_from_objects([pod], lab, None) == []  # not its kind: left to pods_from_objects
    off = dataclasses.replace(lab, dns=ClusterDns(enabled=False))
    assert [p.key for p in pods_from_objects([pod], off, None)] == ["kube-system/coredns"]


# ------------------------------------------------------------------ ingresses and the ingress controller


def test_ingresses_with_hosts_paths_a_default_backend_and_named_ports() -> None:
    lab = load_spec(SPECS / "valid" / "13-ingress.yaml")
    assert lab.ingress_controller == IngressController(enabled=None, node="node2", node_port=30000)
    shop, any_host = lab.ingresses
    assert shop == Ingress(
        name="shop", namespace="shop", class_name="nginx",
        default_backend=IngressBackend("docs", 8000),
        rules=(
            IngressRule("web.example.com", (IngressPath("/", "Prefix", IngressBackend("web", "http")),
                                            IngressPath("/admin", "Exact", IngressBackend("web", 8080)))),
            IngressRule("api.example.com", (IngressPath("/v1", "Prefix", IngressBackend("api", "http")),
                                            # an ImplementationSpecific path left out is /
                                            IngressPath("/", "ImplementationSpecific", IngressBackend("api", 80)))),
            IngressRule("*.docs.example.com", (IngressPath("/", "Prefix", IngressBackend("docs", 8000)),)),
        ))
    assert shop.key == "shop/shop"
    assert any_host == Ingress("any-host", "shop", (IngressRule(None, (IngressPath("/web/", "Prefix",
                                                                                    IngressBackend("web", 80)),)),))
    # The controller runs (the lab has Ingresses), so its node port 30000 is not allocated to a service.
    assert _service("shop", "api", lab.services).ports[0].node_port == 30001
    stored = [o for o in lab.objects if o["kind"] == "Ingress"]
    assert stored[1]["metadata"] == {"name": "any-host", "namespace": "shop"}
    assert stored[0]["spec"]["rules"][1]["http"]["paths"][1] == {
        "pathType": "ImplementationSpecific", "backend": {"service": {"name": "api", "port": {"number": 80}}}}


@pytest.mark.parametrize("controller, ingress, node_port", [
    ("{nodePort: 30000}", False, 30000), ("{nodePort: 30000}", True, 30001),
    ("{enabled: true, nodePort: 30000}", False, 30001), ("{enabled: false, nodePort: 30000}", True, 30000),
])
def test_node_ports_skip_the_controllers_only_while_it_runs(controller: str, ingress: bool, node_port: int) -> None:
    text = HEADER + f"  ingressController: {controller}\n" + ONE_NODE + """\
  objects:
    - {apiVersion: v1, kind: Service, metadata: {name: web}, spec: {type: NodePort, ports: [{port: 80}]}}
"""
    if ingress:
        text += ("    - {apiVersion: networking.k8s.io/v1, kind: Ingress, metadata: {name: i}, spec: {defaultBackend: "
                 "{service: {name: web, port: {number: 80}}}}}\n")
    lab = parse_spec_text(text)
    assert lab.services[0].ports[0].node_port == node_port
    assert len(lab.ingresses) == int(ingress)


def test_a_given_node_port_of_30080_is_fine_while_the_controller_does_not_run() -> None:
    text = HEADER + ONE_NODE + """\
  objects:
    - apiVersion: v1
      kind: Service
      metadata: {name: web}
      spec: {type: NodePort, ports: [{port: 80, nodePort: 30080}]}
"""
    assert parse_spec_text(text).services[0].ports[0].node_port == 30080
    with_ingress = text + ("    - {apiVersion: networking.k8s.io/v1, kind: Ingress, metadata: {name: i}, spec: "
                           "{defaultBackend: {service: {name: web, port: {number: 80}}}}}\n")
    (line,) = _errors(with_ingress)
    assert line.startswith("t.yaml:10: spec.objects[0].spec.ports[0].nodePort: nodePort 30080 is the ingress "
                           "controller's node port") and "(the lab has Ingress objects)" in line


INGRESS = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "more", "namespace": "shop"},
           "spec": {"rules": [{"host": "more.example.com", "http": {"paths": [
               {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"name": "admin"}}}},
               {"path": "/new", "pathType": "Exact", "backend": {"service": {"name": "new", "port": {"number": 81}}}},
           ]}}]}}


def test_ingresses_from_objects_checks_backends_against_the_lab_and_the_batch() -> None:
    lab = load_spec(SPECS / "valid" / "13-ingress.yaml")
    new_service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "new", "namespace": "shop"},
                   "spec": {"ports": [{"port": 81}]}}
    (more,) = ingresses_from_objects([new_service, INGRESS], lab, "apply.yaml")
    assert more.rules[0].paths == (IngressPath("/", "Prefix", IngressBackend("web", "admin")),
                                   IngressPath("/new", "Exact", IngressBackend("new", 81)))
    clash = dict(INGRESS, metadata={"name": "shop", "namespace": "shop"},
                 spec={"rules": [{"host": "web.example.com", "http": {"paths": [
                     {"path": "/admin", "pathType": "Exact",
                      "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]})
    with pytest.raises(SpecError) as info:
        ingresses_from_objects([INGRESS, clash], lab, "apply.yaml")
    assert info.value.lines() == [
        "apply.yaml: objects[0].spec.rules[0].http.paths[1].backend.service.name: service shop/new does not exist: "
        "a backend must be a Service in the Ingress's namespace shop (services there: api, docs, web); add the "
        "Service, or fix the name",
        "apply.yaml: objects[1].metadata.name: ingress shop/shop clashes with ingress shop/shop, already in lab "
        "ingress: rename one",
        "apply.yaml: objects[1].spec.rules[0].http.paths[0]: Exact path /admin of host web.example.com is already "
        "routed by ingress shop/shop, already in lab ingress: a host and path go to one backend; remove one, or "
        "change the path",
    ]


def test_the_first_ingress_applied_to_a_running_lab_needs_the_controllers_node_port_free() -> None:
    text = HEADER + ONE_NODE + """\
  objects:
    - apiVersion: v1
      kind: Service
      metadata: {name: web}
      spec: {type: NodePort, ports: [{port: 80, nodePort: 30080}]}
"""
    lab = parse_spec_text(text)
    ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "i"},
               "spec": {"defaultBackend": {"service": {"name": "web", "port": {"number": 80}}}}}
    with pytest.raises(SpecError) as info:
        ingresses_from_objects([ingress], lab, "apply.yaml")
    assert info.value.lines() == [
        "apply.yaml: objects[0].metadata.name: this lab's first Ingress starts the ingress controller, which listens "
        "on node port 30080 of every node (spec.ingressController.nodePort), but service default/web already uses "
        "that node port: delete that service (or give it another node port) first, or bring the lab up with another "
        "ingressController.nodePort"]
    off = dataclasses.replace(lab, ingress_controller=IngressController(enabled=False))
    assert [i.key for i in ingresses_from_objects([ingress], off, None)] == ["default/i"]


def test_parse_objects_checks_ingresses_with_lines() -> None:
    lab = load_spec(SPECS / "valid" / "13-ingress.yaml")
    text = """\
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: extra, namespace: shop}
spec:
  rules:
    - host: extra.example.com
      http:
        paths:
          - {path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 8081}}}}
"""
    with pytest.raises(SpecError) as info:
        parse_objects(text, lab, "apply.yaml")
    assert info.value.lines() == [
        "apply.yaml:9: spec.rules[0].http.paths[0].backend.service.port.number: service shop/web has no port 8081 "
        "(its ports: 80/TCP named http, 8080/TCP named admin): use one of them; an Ingress backend names the "
        "Service's port, not its targetPort"]
    (manifest,) = parse_objects(text.replace("8081", "8080"), lab, "apply.yaml")
    assert manifest["metadata"] == {"name": "extra", "namespace": "shop"}


def test_an_ingress_to_a_service_with_its_own_problems_is_not_reported_twice() -> None:
    text = HEADER + ONE_NODE + """\
  objects:
    - {apiVersion: v1, kind: Service, metadata: {name: web}, spec: {type: Bogus, ports: [{port: 80}]}}
    - apiVersion: networking.k8s.io/v1
      kind: Ingress
      metadata: {name: i}
      spec: {defaultBackend: {service: {name: web, port: {number: 80}}}}
"""
    (line,) = _errors(text)
    assert line.startswith("t.yaml:7: spec.objects[0].spec.type: unknown type 'Bogus'")


@pytest.mark.parametrize("wrong, right", [("container", "containers"), ("apiVersio", "apiVersion")])
def test_a_misspelt_required_field_is_one_line_not_two(wrong: str, right: str) -> None:
    """`container:` for `containers:` said both "containers: missing" and "unknown field 'container' (did you
    mean 'containers'?)": the second line says it all, and says where."""
    pod = ("  nodes: [{name: node1, ip: 192.168.1.10}]\n  objects:\n"
           "    - apiVersion: v1\n      kind: Pod\n      metadata: {name: a}\n"
           "      spec: {nodeName: node1, containers: [{name: c, image: pause}]}\n")
    text = HEADER + pod.replace(right, wrong, 1)
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, "t.yaml")
    lines = info.value.lines()
    assert len(lines) == 1 and f"unknown field '{wrong}' (did you mean '{right}'?)" in lines[0], lines
