"""`lab graph` of a cilium lab without root: cilium_host and lxc veths in place of cni0, routes per pod,
cilium_vxlan with its tunnel map, services read from the service maps (never "no kube-proxy rules"), from
hand-made observations as in test_graph.py."""
from __future__ import annotations

from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import yaml

from observe import graph, graph_render
from observe.kernel import NsView, Observation, RouteView
from services import endpoints
from tests.unit.test_graph import SEED, _link, draw, model
from topo import names


def cilium_text(mode: str = "tunnel") -> str:
    data = yaml.safe_load(SEED.read_text())
    data["spec"].pop("network", None)
    data["spec"]["cni"] = {"profile": "cilium", "routingMode": mode}
    return yaml.safe_dump(data, sort_keys=False)


def healthy(lab, running) -> Observation:  # type: ignore[no-untyped-def]
    """What a cilium node holds after `lab up`: cilium_host /32, one lxc veth and /32 route per pod,
    cilium_vxlan and its routes (tunnel) or routes via the nodes (native), the maps' contents."""
    from tests.unit.test_graph import healthy as plain

    obs = plain(lab, running)
    for node in lab.nodes:
        ns = lab.node_netns(node.name)
        old = obs.namespaces[ns]
        view = NsView(ns, links={"eth0": old.links["eth0"], "cilium_host": _link("cilium_host", "veth")},
                      addrs={"eth0": old.addrs["eth0"], "cilium_host": [IPv4Interface(f"{node.gateway.ip}/32")]},
                      routes=[r for r in old.routes if r.dev == "eth0" and not r.dst.overlaps(lab.cluster.pod_cidr)])
        for rp in running:
            if rp.pod.node == node.name:
                veth = names.host_veth(names.sandbox_id(lab.name, rp.pod.namespace, rp.pod.name), prefix="lxc")
                view.links[veth] = _link(veth, "veth")
                view.routes.append(RouteView(IPv4Network(f"{rp.ip}/32"), None, veth, "static"))
        others = [n for n in lab.nodes if n.name != node.name]
        if lab.network.backend == "vxlan":
            view.links["cilium_vxlan"] = _link("cilium_vxlan", "vxlan")
            view.routes += [RouteView(n.pod_cidr, None, "cilium_vxlan", "static") for n in others]
            obs.tunnels[node.name] = {str(n.pod_cidr.network_address): str(n.ip) for n in others}
        else:
            view.routes += [RouteView(n.pod_cidr, n.ip, "eth0", "static") for n in others]
        obs.namespaces[ns] = view
    return obs


def test_a_healthy_cilium_lab_is_drawn_with_its_own_devices_and_no_problems(tmp_path: Path) -> None:
    lab, running = model(cilium_text(), tmp_path)
    obs = healthy(lab, running)
    g = draw(lab, running, obs)
    assert g.problems == []
    node1 = g.nodes[0]
    assert node1.cni0.name == "cilium_host" and node1.cni0.address == "10.244.1.1/32"
    assert node1.tunnel is not None and node1.tunnel.name == "cilium_vxlan"
    assert "tunnel map: 10.244.2.0/24 → 192.168.1.11" in node1.tunnel.detail
    assert all(p.veth.startswith("lxc") for n in g.nodes for p in n.pods)
    assert [r.dst for r in node1.routes][-1] == "10.244.2.0/24" and all(r.status == "ok" for r in node1.routes)
    text = graph_render.to_text(g)
    assert "cni0" not in text and "flannel.1" not in text and "kube-proxy replaced by cilium" in text


def test_a_lost_tunnel_map_entry_and_a_pod_veth_on_a_bridge_are_problems(tmp_path: Path) -> None:
    lab, running = model(cilium_text(), tmp_path)
    obs = healthy(lab, running)
    obs.tunnels["node1"] = {}
    veth = next(iter(l for l in obs.namespaces[lab.node_netns("node2")].links if l.startswith("lxc")))
    obs.namespaces[lab.node_netns("node2")].links[veth] = _link(veth, "veth", "cni0")
    problems = draw(lab, running, obs).problems
    assert "node1: cilium_vxlan: cilium_tunnel_map lacks 10.244.2.0 → 192.168.1.11" in problems
    assert any(veth in p and "no bridge" in p for p in problems), problems


def test_services_come_from_the_maps_and_a_missing_backend_entry_is_named(tmp_path: Path) -> None:
    lab, running = model(cilium_text("native"), tmp_path)
    obs = healthy(lab, running)
    assert draw(lab, running, obs).problems == []  # no "no rules" although no node has a KUBE-* chain
    sp = next(s for s in endpoints.resolve(lab.services, running) if s.service.name == "web" and s.protocol == "tcp")
    key = (str(sp.service.cluster_ip), "tcp", sp.port.port)
    obs.services["node2"][key] = obs.services["node2"][key][1:]
    problems = draw(lab, running, obs).problems
    assert any("not in the service map entries of node2" in p for p in problems), problems
    assert graph.build(lab, running, [], obs).nodes[0].tunnel is None  # native: no cilium_vxlan
