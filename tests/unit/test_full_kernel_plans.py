"""The kernel-gated features as plans (no root, no kernel): Calico IP-in-IP routes and zebra config, netem
trees for link impairment and `lab link`, IPVS syncs one server at a time, and the one-line refusals
`lab up` prints on a kernel without IPVS, IP-in-IP, dummy devices or netem.

The same features run for real in the test VM (tests/integration/test_full_kernel.py, `-m fullkernel`).
"""
from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from apiserver.spec import load_spec, parse_spec_text
from lab import lifecycle
from lab import link as lablink
from routing import bgp, ipip
from services import kube_proxy, kube_proxy_ipvs as ipvs
from services.endpoints import Endpoint, ServicePortEndpoints
from topo import kernel, underlay
from topo.errors import FeatureMissing, SpecError
from topo.link_spec import link_option
from topo.model import LinkSpec, Service, ServicePort

SPECS = Path(__file__).parent / "specs" / "valid"
HEADER = "apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: t}\nspec:\n"
RACKS = HEADER + """\
  underlay:
    racks:
      - {name: rack1, subnet: 192.168.1.0/24}
      - {name: rack2, subnet: 192.168.2.0/24}
  network: {backend: ipip, ipipMode: MODE}
  nodes:
    - {name: node1, ip: 192.168.1.10, rack: rack1}
    - {name: node2, ip: 192.168.1.11, rack: rack1}
    - {name: node3, ip: 192.168.2.10, rack: rack2}
"""


# ------------------------------------------------------------------ Calico IP-in-IP


def test_ipip_spec_defaults_follow_calico() -> None:
    lab = load_spec(SPECS / "30-ipip-racks-crosssubnet.yaml")
    assert (lab.network.backend, lab.network.ipip_mode, lab.network.mtu) == ("ipip", "CrossSubnet", 1480)
    assert (lab.network.bgp.peering, lab.network.bgp.asn) == ("mesh", 64512)
    always = parse_spec_text(HEADER + "  network: {backend: ipip}\n  nodes: [{name: a, ip: 192.168.1.10}]\n")
    assert always.network.ipip_mode == "Always"  # calico.yaml's CALICO_IPV4POOL_IPIP default


def test_tunl0_holds_the_first_address_of_the_podcidr_with_mtu_1480() -> None:
    lab = parse_spec_text(RACKS.replace("MODE", "Always"))
    t = ipip.tunnel(lab.node("node3"))
    assert (t.address, t.mtu) == (IPv4Interface("10.244.3.0/32"), 1480)


def test_crosssubnet_encapsulates_only_between_racks() -> None:
    lab = parse_spec_text(RACKS.replace("MODE", "CrossSubnet"))
    got = {(r.node, str(r)) for r in ipip.expected_routes(lab)}
    assert ("node1", "10.244.2.0/24 via 192.168.1.11 dev eth0") in got
    assert ("node1", "10.244.3.0/24 via 192.168.2.10 dev tunl0 onlink") in got
    assert ("node3", "10.244.1.0/24 via 192.168.1.10 dev tunl0 onlink") in got
    assert len(got) == 6


def test_always_encapsulates_towards_every_node() -> None:
    lab = parse_spec_text(RACKS.replace("MODE", "Always"))
    assert all(r.encap and r.dev == "tunl0" for r in ipip.expected_routes(lab))


def test_only_pod_routes_learned_from_peers_are_installed() -> None:
    lab = parse_spec_text(RACKS.replace("MODE", "CrossSubnet"))
    learned = {IPv4Network("10.244.3.0/24"): IPv4Address("192.168.2.10"),
               IPv4Network("10.244.1.0/24"): IPv4Address("192.168.1.10"),  # its own block, echoed back
               IPv4Network("192.168.2.0/24"): IPv4Address("192.168.1.1")}  # not a pod route
    assert [str(r) for r in ipip.routes(lab, lab.node("node1"), learned)] == [
        "10.244.3.0/24 via 192.168.2.10 dev tunl0 onlink"]


def test_learned_routes_read_frr_json_best_paths_from_peers() -> None:
    table = {"routes": {
        "10.244.1.0/24": [{"valid": True, "bestpath": True, "nexthops": [{"ip": "0.0.0.0", "used": True}]}],
        "10.244.2.0/24": [{"valid": True, "bestpath": True, "nexthops": [{"ip": "192.168.1.11", "used": True}]}],
        "10.244.3.0/24": [{"valid": True, "nexthops": [{"ip": "192.168.2.99"}]},
                          {"valid": True, "bestpath": True, "nexthops": [{"ip": "192.168.2.10"}]}],
        "10.244.4.0/24": [{"valid": False, "bestpath": True, "nexthops": [{"ip": "192.168.2.11"}]}]}}
    assert ipip.learned_routes(json.dumps(table)) == {IPv4Network("10.244.2.0/24"): IPv4Address("192.168.1.11"),
                                                      IPv4Network("10.244.3.0/24"): IPv4Address("192.168.2.10")}
    assert ipip.learned_routes("") == {} and ipip.learned_routes("not json") == {}


def test_ipip_nodes_form_a_mesh_whose_zebra_installs_no_bgp_route() -> None:
    lab = parse_spec_text(RACKS.replace("MODE", "CrossSubnet"))
    speakers = bgp.node_speakers(lab)
    assert [len(s.neighbors) for s in speakers] == [2, 2, 2] and {s.asn for s in speakers} == {64512}
    zebra = bgp.render_zebra(speakers[0])
    assert "route-map KUBENET-IPIP deny 10" in zebra and "ip protocol bgp route-map KUBENET-IPIP" in zebra
    assert "ip nht resolve-via-default" in zebra
    plain = parse_spec_text(RACKS.replace("backend: ipip, ipipMode: MODE", "backend: bgp, bgp: {peering: tor}"))
    assert "route-map" not in bgp.render_zebra(bgp.node_speakers(plain)[0])
    # the racks' routers still only carry rack subnets: pod routes stay among the nodes
    assert all(not any(n.subnet_of(lab.cluster.pod_cidr) for n in r.expected) for r in bgp.router_speakers(lab))


# ------------------------------------------------------------------ netem: spec links and `lab link`


def test_link_impairment_goes_to_mininet_tclink_as_netem_parameters() -> None:
    spec = LinkSpec(bandwidth_mbit=50.0, delay_ms=50.0, jitter_ms=5.0, loss_percent=1.0)
    assert underlay.tc_params(spec) == {"bw": 50.0, "delay": "50000us", "jitter": "5000us", "loss": 1.0}
    assert underlay.tc_params(LinkSpec(mtu=1400)) == {}


def test_jitter_is_inherited_with_the_delay_it_varies() -> None:
    lab = load_spec(SPECS / "31-links-jitter.yaml")
    assert (lab.nodes[0].link.delay_ms, lab.nodes[0].link.jitter_ms, lab.nodes[0].link.loss_percent) == (50, 5, 0.5)
    assert (lab.nodes[1].link.delay_ms, lab.nodes[1].link.jitter_ms) == (10, 2)
    assert lab.nodes[0].link.impaired and not LinkSpec(mtu=1400, bandwidth_mbit=5).impaired


def test_link_only_tree_is_what_mininet_builds() -> None:
    assert lablink.link_only("eth0", LinkSpec()) == []
    assert lablink.link_only("eth0", LinkSpec(delay_ms=20, jitter_ms=1)) == [
        "qdisc add dev eth0 root handle 10: netem delay 20000us 1000us"]
    assert lablink.link_only("eth0", LinkSpec(bandwidth_mbit=50, loss_percent=1)) == [
        "qdisc add dev eth0 root handle 5:0 htb default 1",
        "class add dev eth0 parent 5:0 classid 5:1 htb rate 50.000000Mbit burst 15k",
        "qdisc add dev eth0 parent 5:1 handle 10: netem loss 1.00000%"]


def _peer(name: str) -> object:
    lab = parse_spec_text(RACKS.replace("MODE", "Always"))
    return lab.node(name)


def test_a_pair_gets_its_own_netem_chosen_by_the_peers_ip_and_podcidr() -> None:
    cmds = lablink.tc_script("eth0", LinkSpec(), [(_peer("node3"), lablink.Impairment(50, None, 1))])
    assert cmds == [
        "qdisc add dev eth0 root handle 1: prio bands 2 priomap 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0",
        "qdisc add dev eth0 parent 1:2 handle 20: netem delay 50000us loss 1.00000%",
        "filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip dst 192.168.2.10/32 flowid 1:2",
        "filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip dst 10.244.3.0/24 flowid 1:2"]


def test_a_pair_adds_to_the_links_own_shaping() -> None:
    own = LinkSpec(bandwidth_mbit=90, delay_ms=20, loss_percent=10)
    cmds = lablink.tc_script("eth0", own, [(_peer("node2"), lablink.Impairment(10, 2, 10)),
                                           (_peer("node3"), lablink.Impairment(5, None, None))])
    assert cmds[:2] == ["qdisc add dev eth0 root handle 1: htb default 10",
                        "class add dev eth0 parent 1: classid 1:1 htb rate 90.000000Mbit burst 15k"]
    assert "class add dev eth0 parent 1:1 classid 1:11 htb rate 30.000000Mbit ceil 90.000000Mbit burst 15k" in cmds
    assert "qdisc add dev eth0 parent 1:10 handle 10: netem delay 20000us loss 10.00000%" in cmds
    # 20 + 10 ms, the pair's jitter, and 1 - 0.9 * 0.9 of the packets lost
    assert "qdisc add dev eth0 parent 1:11 handle 20: netem delay 30000us 2000us loss 19.00000%" in cmds
    assert "qdisc add dev eth0 parent 1:12 handle 21: netem delay 25000us loss 10.00000%" in cmds
    assert sum(c.startswith("filter") for c in cmds) == 4


def test_lab_link_options_are_read_like_the_spec() -> None:
    assert (link_option("delay", "50ms"), link_option("delay", "50"), link_option("jitter", "250us"),
            link_option("loss", "1%"), link_option("loss", "0.5")) == (50, 50, 0.25, 1, 0.5)
    with pytest.raises(SpecError, match="lab link: delay: unknown unit 'minutes'"):
        link_option("delay", "5 minutes")
    with pytest.raises(SpecError, match="loss 150% is more than 100%"):
        link_option("loss", "150%")


def test_impairment_is_described_each_way_and_round_trip() -> None:
    assert lablink.Impairment(50, 5, 1).describe() == ("delay 50 ms each way (+100 ms round trip), jitter 5 ms, "
                                                       "loss 1 % each way")
    assert lablink.pair_key("node2", "node1") == lablink.pair_key("node1", "node2") == "node1 node2"


# ------------------------------------------------------------------ IPVS syncs


def _sps(*endpoints: str, affinity: str = "None") -> list[ServicePortEndpoints]:
    svc = Service("web", "default", IPv4Address("10.96.0.100"), (ServicePort("http", 80, 8080),), (("app", "web"),),
                  session_affinity=affinity)
    eps = tuple(Endpoint(IPv4Address(ip), 8080, "node1", f"default/{ip}") for ip in endpoints)
    return [ServicePortEndpoints(svc, svc.ports[0], eps)]


def _plan(sps: list[ServicePortEndpoints]) -> ipvs.IpvsPlan:
    lab = parse_spec_text(RACKS.replace("MODE", "Always"))
    return ipvs.build(lab.node("node1"), sps, lab.cluster)


def test_ipvs_delta_changes_only_what_changed() -> None:
    old = _plan(_sps("10.244.1.2", "10.244.2.2"))
    new = _plan(_sps("10.244.2.2", "10.244.3.2"))
    assert ipvs.render_ipvsadm_delta(old, new).splitlines() == [
        "-d -t 10.96.0.100:80 -r 10.244.1.2:8080",
        "-a -t 10.96.0.100:80 -r 10.244.3.2:8080 -m -w 1"]
    assert ipvs.render_ipvsadm_delta(new, new) == ""
    sticky = _plan(_sps("10.244.2.2", "10.244.3.2", affinity="ClientIP"))
    assert ipvs.render_ipvsadm_delta(new, sticky).splitlines() == ["-E -t 10.96.0.100:80 -s rr -p 10800"]
    gone = _plan([])
    assert ipvs.render_ipvsadm_delta(new, gone).splitlines() == ["-D -t 10.96.0.100:80"]
    assert ipvs.render_ipvsadm_delta(gone, new).splitlines()[0] == "-A -t 10.96.0.100:80 -s rr"


def test_ipvs_plan_survives_its_json_and_loads_without_comments() -> None:
    plan = _plan(_sps("10.244.1.2", "10.244.2.2"))
    assert ipvs.from_json(json.loads(json.dumps(ipvs.to_json(plan)))) == plan
    text = ipvs.loadable(ipvs.render_ipvsadm(plan))
    assert text.splitlines()[0] == "-C" and not any(line.startswith("#") for line in text.splitlines())


def test_kube_ipvs0_addresses_are_synced_not_recreated() -> None:
    plan = _plan(_sps("10.244.1.2"))
    assert ipvs.render_address_batch(plan, None).splitlines() == [
        "link add kube-ipvs0 type dummy", "address add 10.96.0.100/32 dev kube-ipvs0"]
    assert ipvs.render_address_batch(plan, {IPv4Address("10.96.0.100")}) == ""
    assert ipvs.render_address_batch(plan, {IPv4Address("10.96.0.7")}).splitlines() == [
        "address del 10.96.0.7/32 dev kube-ipvs0", "address add 10.96.0.100/32 dev kube-ipvs0"]


# ------------------------------------------------------------------ refusals on a kernel without the features


@pytest.fixture
def bare_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probes answering as this project's CI kernel does: none of the four features."""
    monkeypatch.setattr(kernel, "PROBES", {f: (lambda: False) for f in kernel.PROBES})


def _lab(text: str):
    return parse_spec_text(HEADER + text)


NODES = "  nodes: [{name: a, ip: 192.168.1.10}, {name: b, ip: 192.168.1.11, link: {delay: 50ms}}]\n"


def test_each_missing_feature_is_one_line_naming_the_kernel_option(bare_kernel: None) -> None:
    lab = _lab("  kubeProxy: {mode: ipvs}\n  network: {backend: ipip}\n" + NODES)
    with pytest.raises(FeatureMissing) as info:
        lifecycle.require_kernel_features(lab)
    where = "a normal Linux host, the Vagrant VM (vagrant up) or the test VM (tests/vm/run)"
    assert str(info.value).splitlines() == [
        "kubeProxy.mode ipvs needs IPVS (CONFIG_IP_VS) and dummy devices (CONFIG_DUMMY), which this kernel lacks: "
        f"use kubeProxy.mode nftables here, or {where}",
        "network.backend ipip (Calico IP-in-IP, tunl0) needs IP-in-IP tunnels (CONFIG_NET_IPIP), which this kernel "
        f"lacks: use backend bgp (no encapsulation) or vxlan here, or {where}",
        "link delay, jitter and loss (spec.nodes[1].link) needs the netem qdisc (CONFIG_NET_SCH_NETEM), which this "
        f"kernel lacks: use bandwidth without them here, or {where}"]
    assert info.value.exit_code == 3


def test_only_what_is_missing_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "PROBES", {**{f: (lambda: True) for f in kernel.PROBES}, kernel.DUMMY: lambda: False})
    with pytest.raises(FeatureMissing, match=r"^kubeProxy.mode ipvs needs dummy devices \(CONFIG_DUMMY\), which"):
        kube_proxy.require(_lab("  kubeProxy: {mode: ipvs}\n" + NODES))


def test_a_lab_without_gated_features_asks_nothing_of_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def probe() -> bool:
        raise AssertionError("probed")
    monkeypatch.setattr(kernel, "PROBES", {f: probe for f in kernel.PROBES})
    lifecycle.require_kernel_features(_lab("  nodes: [{name: a, ip: 192.168.1.10, link: {bandwidth: 10}}]\n"))
