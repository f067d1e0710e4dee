"""The dataplane plans, without root: who peers with whom, what flannel.1 gets, what the fabric looks like."""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from apiserver.spec import load_spec
from routing import bgp, frr, vxlan
from topo import underlay

VALID = Path(__file__).parent / "specs" / "valid"


def test_vxlan_follows_flannels_conventions() -> None:
    lab = load_spec(VALID / "05-vxlan-flat.yaml")
    plans = {p.vtep.node: p for p in vxlan.plan(lab)}
    node1 = plans[lab.nodes[0].name]
    assert (vxlan.DEVICE, vxlan.VNI, vxlan.PORT) == ("flannel.1", 1, 8472)
    assert node1.vtep.address == IPv4Interface(f"{lab.nodes[0].pod_cidr.network_address}/32")
    assert node1.vtep.mtu == 1450 and lab.network.mtu == 1450
    assert [p.node for p in node1.peers] == [n.name for n in lab.nodes[1:]]
    mac = node1.vtep.mac
    assert int(mac.split(":")[0], 16) & 0b11 == 0b10  # locally administered, unicast
    assert mac == vxlan.vtep_mac(lab.name, lab.nodes[0].name)


def test_bgp_mesh_is_ibgp_in_as_64512_announcing_each_podcidr() -> None:
    lab = load_spec(VALID / "06-bgp-mesh-flat.yaml")
    speakers = bgp.node_speakers(lab)
    assert {s.asn for s in speakers} == {64512}
    first = speakers[0]
    assert first.networks == (lab.nodes[0].pod_cidr,)
    assert {n.ip for n in first.neighbors} == {n.ip for n in lab.nodes[1:]}
    config = bgp.render(first)
    assert "router bgp 64512" in config and f"network {lab.nodes[0].pod_cidr}" in config
    assert "no bgp ebgp-requires-policy" in config and "timers bgp 1 3" in config
    assert bgp.router_speakers(lab) == []


def test_tor_peering_makes_the_tor_a_route_reflector_and_the_spine_ebgp() -> None:
    lab = load_spec(VALID / "07-routed-spine-bgp-tor.yaml")
    nodes = {s.name: s for s in bgp.node_speakers(lab)}
    routers = {s.name: s for s in bgp.router_speakers(lab)}
    assert nodes["node1"].asn == 65101 and [n.ip for n in nodes["node1"].neighbors] == [IPv4Address("192.168.1.254")]
    tor1 = routers["tor1"]
    clients = [n for n in tor1.neighbors if n.rr_client]
    assert {str(n.ip) for n in clients} == {"192.168.1.10", "192.168.1.11"}
    assert all(n.next_hop_self and n.remote_as == 65101 for n in clients)
    spine = routers["spine"]
    assert spine.asn == 65100 and {n.remote_as for n in spine.neighbors} == {65101, lab.underlay.racks[1].asn}
    assert IPv4Network("10.244.3.0/24") in spine.expected
    config = bgp.render(tor1)
    assert "neighbor 192.168.1.10 route-reflector-client" in config and "redistribute connected" in config


def test_routed_underlay_plan_wires_racks_tors_and_a_spine() -> None:
    lab = load_spec(VALID / "07-routed-spine-bgp-tor.yaml")
    plan = underlay.plan(lab)
    assert [s.switch for s in plan.segments] == ["r0", "r1"]
    hosts = {h.name: h for h in plan.hosts}
    assert hosts["node1"].gateway == IPv4Address("192.168.1.254") and hosts["tor1"].router
    uplinks = [l for l in plan.links if l.peer == "spine"]
    assert [(l.host, str(l.address), str(l.peer_address)) for l in uplinks] == [
        ("tor1", "10.255.0.2/30", "10.255.0.1/30"), (lab.underlay.racks[1].router, "10.255.0.6/30", "10.255.0.5/30")]
    assert all(l.segment in l.port for l in plan.links if l.segment)


def test_direct_fabric_puts_every_tor_on_one_segment() -> None:
    lab = load_spec(VALID / "08-routed-direct-vxlan.yaml")
    plan = underlay.plan(lab)
    assert plan.segments[-1].switch == "fab" and "spine" not in {h.name for h in plan.hosts}
    speakers = bgp.router_speakers(lab)
    assert all(len(s.neighbors) == len(lab.underlay.racks) - 1 for s in speakers)


def test_convergence_timeout_names_the_peer_that_is_not_up(monkeypatch, tmp_path: Path) -> None:
    lab = load_spec(VALID / "06-bgp-mesh-flat.yaml")
    speakers = bgp.node_speakers(lab)
    monkeypatch.setattr(frr, "peer_states", lambda folder: {"node2": "Active"})
    text = frr.explain(speakers, {s.name: tmp_path for s in speakers}, {speakers[0].name: ["10.244.2.0/24"]})
    assert f"{speakers[0].name} lacks 10.244.2.0/24" in text and "node2 Active" in text
