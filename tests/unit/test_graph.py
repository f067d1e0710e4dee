"""`lab graph` without root: the comparison of spec and kernel, and its renderings, from hand-made observations.

A healthy observation is built from the lab's own plan (what `lab up` would leave in the kernel); each test
then breaks one thing the way a learner would (a deleted route, a session down, a missing FDB entry) and
checks that the graph shows exactly that.
"""
from __future__ import annotations

import copy
import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
import yaml

from apiserver.spec import parse_spec_text
from lab import plan
from observe import graph, graph_render
from observe.kernel import FdbEntry, LinkView, NeighEntry, NsView, Observation, RouteView
from routing import bgp, host_gw, ipip, vxlan
from services import endpoints
from services.addons import with_addons
from services.endpoints import RunningPod
from tests.conftest import require_tool
from topo import names, underlay
from topo.model import Lab

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "labs" / "00-seed" / "lab.yaml"


def seed_text(backend: str = "host-gw", proxy: str | None = None) -> str:
    data = yaml.safe_load(SEED.read_text())
    data["spec"]["network"]["backend"] = backend
    if proxy:
        data["spec"]["kubeProxy"] = {"mode": proxy}
    return yaml.safe_dump(data, sort_keys=False)


def model(text: str, tmp: Path) -> tuple[Lab, list[RunningPod]]:
    lab = with_addons(parse_spec_text(text, "lab.yaml"), tmp)
    ops = plan.build(lab, tmp / "ipam").pods
    return lab, [RunningPod(op.pod, op.address.ip) for op in ops]


def _link(name: str, kind: str | None, master: str | None = None, mtu: int = 1500) -> LinkView:
    return LinkView(name, kind, True, True, mtu, master)


def healthy(lab: Lab, running: list[RunningPod]) -> Observation:
    """What the kernel holds right after `lab up` (the parts `lab graph` reads)."""
    obs = Observation()
    up = underlay.plan(lab)
    for seg in up.segments:
        view = NsView(seg.netns, links={seg.switch: _link(seg.switch, "bridge")})
        for link in up.links:
            if link.segment == seg.switch and link.port:
                view.links[link.port] = _link(link.port, "veth", seg.switch)
        obs.namespaces[seg.netns] = view
    for host in up.hosts:
        view = NsView(host.netns)
        for link in up.links:
            for name, intf, address in ((link.host, link.intf, link.address),
                                        (link.peer, link.peer_intf, link.peer_address)):
                if name == host.name and intf:
                    view.links[intf] = _link(intf, "veth")
                    view.addrs.setdefault(intf, []).append(address)
                    view.routes.append(RouteView(address.network, None, intf, "kernel"))
        obs.namespaces[host.netns] = view
    vteps = {p.vtep.node: p for p in vxlan.plan(lab)} if lab.network.backend == "vxlan" else {}
    for node in lab.nodes:
        view = obs.namespaces[lab.node_netns(node.name)]
        view.links["cni0"] = _link("cni0", "bridge")
        view.addrs["cni0"] = [node.gateway]
        view.routes.append(RouteView(node.pod_cidr, None, "cni0", "kernel"))
        for rp in running:
            if rp.pod.node == node.name:
                veth = names.host_veth(names.sandbox_id(lab.name, rp.pod.namespace, rp.pod.name))
                view.links[veth] = _link(veth, "veth", "cni0")
                obs.namespaces[lab.pod_netns(rp.pod)] = NsView(
                    lab.pod_netns(rp.pod), links={"eth0": _link("eth0", "veth")},
                    addrs={"eth0": [IPv4Interface(f"{rp.ip}/{node.pod_cidr.prefixlen}")]})
        if lab.network.backend == "host-gw":
            view.routes += [RouteView(r.dst, r.via, r.dev, "static") for r in host_gw.routes(lab) if r.node == node.name]
        elif lab.network.backend == "vxlan":
            p = vteps[node.name]
            view.links["flannel.1"] = _link("flannel.1", "vxlan", mtu=1450)
            view.addrs["flannel.1"] = [p.vtep.address]
            for peer in p.peers:
                view.routes.append(RouteView(peer.pod_cidr, peer.address.ip, "flannel.1", "static", onlink=True))
                view.fdb.append(FdbEntry("flannel.1", peer.mac, peer.ip))
                view.neigh.append(NeighEntry("flannel.1", peer.address.ip, peer.mac, "permanent"))
        elif lab.network.backend == "ipip":
            t = ipip.tunnel(node)
            view.links["tunl0"] = _link("tunl0", "ipip", mtu=t.mtu)
            view.addrs["tunl0"] = [t.address]
            view.routes += [RouteView(r.dst, r.via, r.dev, "bgp", onlink=r.encap) for r in ipip.expected_routes(lab)
                            if r.node == node.name]
        else:
            view.routes += [RouteView(p.pod_cidr, p.ip, "eth0", "bgp") for p in lab.nodes if p.name != node.name]
    for s in bgp.node_speakers(lab) + bgp.router_speakers(lab):
        obs.bgp[s.name] = {peer.name: "Established" for peer in s.neighbors}
    sps = endpoints.resolve(lab.services, running)
    for node in lab.nodes:
        obs.services[node.name] = {(str(sp.service.cluster_ip), sp.protocol, sp.port.port): [str(e) for e in sp.endpoints]
                                   for sp in sps}
    return obs


def draw(lab: Lab, running: list[RunningPod], obs: Observation) -> graph.Graph:
    return graph.build(lab, running, endpoints.resolve(lab.services, running), obs)


@pytest.fixture
def seed(tmp_path: Path) -> tuple[Lab, list[RunningPod], Observation]:
    lab, running = model(seed_text(), tmp_path)
    return lab, running, healthy(lab, running)


def test_the_seed_lab_as_the_kernel_holds_it_has_no_problems(seed) -> None:
    lab, running, obs = seed
    g = draw(lab, running, obs)
    assert g.problems == []
    assert [n.name for n in g.nodes] == ["node1", "node2"]
    assert {p.ip for n in g.nodes for p in n.pods} == {"10.244.1.2", "10.244.1.3", "10.244.2.2", "10.244.2.3"}
    assert all(n.cni0.name == "cni0" and n.cni0.status == graph.OK for n in g.nodes)
    assert [p.role for p in g.nodes[1].pods if p.name == "coredns"] == ["dns"]
    node1 = g.nodes[0]
    assert [(r.dst, r.status) for r in node1.routes] == [("10.244.1.0/24", "ok"), ("10.244.2.0/24", "ok")]
    assert node1.routes[1].observed == "10.244.2.0/24 via 192.168.1.11 dev eth0 proto static"
    assert [e.name for e in g.external] == ["external-web"]
    web = next(s for s in g.services if s.name == "web")
    assert web.cluster_ip == "10.96.0.100" and [e.address for e in web.endpoints] == [
        "10.244.1.2:8080", "10.244.1.3:8080", "10.244.2.2:8080"]


def test_text_names_every_node_pod_ip_bridge_and_route(seed) -> None:
    text = graph_render.to_text(draw(*seed))
    for needle in ("node node1  192.168.1.10/24  PodCIDR 10.244.1.0/24", "cni0 bridge  10.244.2.1/24",
                   "pod default/node1-pod1  10.244.1.2", "pod kube-system/coredns  10.244.2.3  [cluster DNS]",
                   "✓ 10.244.1.0/24 via 192.168.1.10 dev eth0 proto static", "external host external-web",
                   "default/web  10.96.0.100:80/TCP", "everything the spec expects is in the kernel"):
        assert needle in text, needle
    assert "\033[" not in text
    assert "\033[31m" in graph_render.to_text(graph.build(*_broken_route(seed)), color=True)


def _broken_route(seed):
    lab, running, obs = seed
    obs = copy.deepcopy(obs)
    view = obs.namespaces[lab.node_netns("node1")]
    view.routes = [r for r in view.routes if r.dst != IPv4Network("10.244.2.0/24")]
    return lab, running, endpoints.resolve(lab.services, running), obs


def test_a_deleted_route_is_drawn_missing(seed) -> None:
    g = graph.build(*_broken_route(seed))
    assert g.problems == ["node1: missing route 10.244.2.0/24 via 192.168.1.11 dev eth0"]
    line = g.nodes[0].routes[1]
    assert (line.status, line.observed, line.expected) == ("missing", "", "10.244.2.0/24 via 192.168.1.11 dev eth0")
    text = graph_render.to_text(g)
    assert "✗ 10.244.2.0/24 via 192.168.1.11 dev eth0  <- MISSING ROUTE" in text
    dot = graph_render.to_dot(g)
    assert "missing route to 10.244.2.0/24" in dot and graph_render.PALETTE["bad"] in dot
    assert "1 problem" in dot


def test_a_wrong_route_and_an_unexpected_one_are_told_apart(seed) -> None:
    lab, running, obs = seed
    view = obs.namespaces[lab.node_netns("node2")]
    view.routes = [RouteView(r.dst, IPv4Address("192.168.1.200"), r.dev, r.proto)
                   if r.dst == IPv4Network("10.244.1.0/24") else r for r in view.routes]
    view.routes.append(RouteView(IPv4Network("10.244.9.0/24"), None, None, "boot", type="blackhole"))
    g = draw(lab, running, obs)
    assert g.problems == [
        "node2: via 192.168.1.200 instead of 192.168.1.10 10.244.1.0/24 via 192.168.1.10 dev eth0 "
        "(kernel has: 10.244.1.0/24 via 192.168.1.200 dev eth0 proto static)",
        "node2: unexpected route blackhole 10.244.9.0/24"]
    assert [r.status for r in g.nodes[1].routes] == ["ok", "wrong", "extra"]


def test_pods_bridges_and_links_that_are_gone_or_down(seed) -> None:
    lab, running, obs = seed
    node1 = obs.namespaces[lab.node_netns("node1")]
    pod = next(rp for rp in running if rp.pod.name == "node1-pod2")
    veth = names.host_veth(names.sandbox_id(lab.name, "default", "node1-pod2"))
    del node1.links[veth]
    node1.links["cni0"] = LinkView("cni0", "bridge", False, False, 1500)
    obs.namespaces[lab.underlay_netns()].links["ul-eth1"] = LinkView("ul-eth1", "veth", True, False, 1500, "ul")
    running = [RunningPod(rp.pod, rp.ip, ready=rp.pod.name != "node2-pod1") for rp in running]
    g = draw(lab, running, obs)
    assert g.problems == ["node1: cni0: cni0 is down", f"node1: pod default/node1-pod2: no {veth}",
                          "node2: pod default/node2-pod1: not running", "node2 eth0: ul-eth1 has no carrier",
                          # kube-proxy's rules (as observed) still hold the pod that stopped: stale
                          "service default/web:80/TCP: endpoint 10.244.2.2:8080: stale: no such endpoint"]
    assert pod.ip  # the pod is still drawn with its address
    dot = graph_render.to_dot(g)
    assert "NOT RUNNING" in dot and "CNI0 IS DOWN" in dot


def test_a_node_whose_namespace_is_gone(seed) -> None:
    lab, running, obs = seed
    obs.namespaces[lab.node_netns("node2")] = None
    g = draw(lab, running, obs)
    assert g.nodes[1].status == "missing"
    assert g.problems[0] == "node2: namespace gone"


def test_vxlan_draws_the_tunnel_and_a_lost_fdb_entry(tmp_path: Path) -> None:
    lab, running = model(seed_text("vxlan", "nftables"), tmp_path)
    obs = healthy(lab, running)
    g = draw(lab, running, obs)
    assert g.problems == []
    assert [(n.tunnel.name, n.tunnel.address, n.tunnel.status) for n in g.nodes] == [
        ("flannel.1", "10.244.1.0/32", "ok"), ("flannel.1", "10.244.2.0/32", "ok")]
    assert g.nodes[0].routes[1].observed == "10.244.2.0/24 via 10.244.2.0 dev flannel.1 proto static onlink"
    dot = graph_render.to_dot(g)
    assert "VXLAN VNI 1 · UDP 8472" in dot
    obs.namespaces[lab.node_netns("node1")].fdb = []
    g = draw(lab, running, obs)
    assert g.problems == ["node1: flannel.1: no FDB entry for node2"]
    assert "no FDB entry for node2" in graph_render.to_text(g)


def test_bgp_sessions_and_one_that_is_not_established(tmp_path: Path) -> None:
    lab, running = model(seed_text("bgp"), tmp_path)
    obs = healthy(lab, running)
    g = draw(lab, running, obs)
    assert g.problems == []
    assert [(s.a, s.b, s.status, s.ibgp) for s in g.sessions] == [("node1", "node2", "ok", True)]
    assert "node1 ── node2  iBGP Established" in graph_render.to_text(g)
    obs.bgp["node2"]["node1"] = "Active"
    obs.bgp["node1"] = {}  # bgpd not answering
    g = draw(lab, running, obs)
    assert g.sessions[0].status == "down"
    assert g.problems == ["BGP session node1 - node2 not Established "
                          "(node1 says bgpd not answering, node2 says Active)"]
    assert graph_render.PALETTE["bad"] in graph_render.to_dot(g)


def test_routed_underlay_draws_racks_routers_and_fabric(tmp_path: Path) -> None:
    text = (REPO / "labs" / "examples" / "bgp-racks.yaml").read_text()
    lab, running = model(text, tmp_path)
    g = draw(lab, running, healthy(lab, running))
    assert g.problems == []
    assert [s.name for s in g.segments] == ["r0", "r1"]
    assert {h.name for h in g.routers} == {"tor-rack1", "tor-rack2", "spine"}
    assert {(s.a, s.b, s.ibgp) for s in g.sessions} == {
        ("node1", "tor-rack1", True), ("node2", "tor-rack1", True), ("node3", "tor-rack2", True),
        ("tor-rack1", "spine", False), ("tor-rack2", "spine", False)}
    text = graph_render.to_text(g)
    assert "tor-rack1 eth1 10.255.0.2/30 ── spine eth0 10.255.0.1/30" in text


def test_service_rules_missing_on_a_node_and_stale_endpoints(seed) -> None:
    lab, running, obs = seed
    key = ("10.96.0.100", "tcp", 80)
    obs.services["node2"] = {k: v for k, v in obs.services["node2"].items() if k != key}
    obs.services["node1"][key] = obs.services["node1"][key] + ["10.244.1.9:8080"]
    g = draw(lab, running, obs)
    web = next(s for s in g.services if s.name == "web")
    assert web.status == "missing" and web.note == "no rules on node2"
    assert [e.status for e in web.endpoints] == ["missing"] * 3 + ["extra"]
    assert "service default/web:80/TCP: endpoint 10.244.1.9:8080: stale: no such endpoint" in g.problems


def test_json_is_the_whole_model(seed) -> None:
    data = draw(*seed).to_json()
    assert data["lab"] == "seed" and data["backend"] == "host-gw"
    assert data["nodes"][0]["pods"][0]["ip"] == "10.244.1.2"


def test_render_writes_dot_svg_and_png(seed, tmp_path: Path) -> None:
    g = draw(*seed)
    dot = graph_render.render(g, tmp_path / "seed.dot")
    assert "cluster_n_node1" in dot.read_text()
    require_tool("dot")
    svg = graph_render.render(g, tmp_path / "seed.svg").read_text()
    for needle in ("10.244.1.2", "10.244.2.3", "cni0 bridge", "switch ul", "External Web", "CoreDNS", "10.96.0.10"):
        assert needle in svg, needle
    png = graph_render.render(g, tmp_path / "seed.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    with pytest.raises(Exception, match="use a .svg, .png or .dot"):
        graph_render.render(g, tmp_path / "seed.jpg")


def test_the_dot_source_is_valid_graphviz(seed) -> None:
    if shutil.which("dot") is None:
        pytest.skip("needs Graphviz's dot")
    proc = subprocess.run(["dot", "-Tcanon"], input=graph_render.to_dot(draw(*seed)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr


def _racks_ipip(tmp: Path, mode: str) -> tuple[Lab, list[RunningPod]]:
    data = yaml.safe_load((REPO / "labs" / "examples" / "bgp-racks.yaml").read_text())
    data["spec"]["network"] = {"backend": "ipip", "ipipMode": mode, "bgp": {"peering": "mesh"}}
    return model(yaml.safe_dump(data, sort_keys=False), tmp)


def test_ipip_always_expects_every_route_through_tunl0_onlink(tmp_path: Path) -> None:
    lab, running = model(seed_text("ipip"), tmp_path)
    obs = healthy(lab, running)
    g = draw(lab, running, obs)
    assert g.problems == []
    assert [(n.tunnel.name, n.tunnel.address, n.tunnel.status) for n in g.nodes] == [
        ("tunl0", "10.244.1.0/32", "ok"), ("tunl0", "10.244.2.0/32", "ok")]
    assert g.nodes[0].tunnel.detail == "IP-in-IP (proto 4) · Always · MTU 1480"
    assert g.nodes[0].routes[1].observed == "10.244.2.0/24 via 192.168.1.11 dev tunl0 proto bgp onlink"
    assert "IP-in-IP (proto 4)" in graph_render.to_dot(g) and "backend ipip (Always)" in graph_render.to_text(g)
    # A route straight out of eth0 (as backend bgp would have it) is wrong here, and a tunl0 that lost
    # its MTU is drawn so.
    view = obs.namespaces[lab.node_netns("node1")]
    view.routes = [RouteView(r.dst, r.via, "eth0", "bgp") if r.dev == "tunl0" else r for r in view.routes]
    view.links["tunl0"] = LinkView("tunl0", "ipip", True, True, 1500)
    g = draw(lab, running, obs)
    assert g.problems == ["node1: tunl0: MTU 1500, not 1480",
                          "node1: dev eth0 instead of tunl0 10.244.2.0/24 via 192.168.1.11 dev tunl0 proto bgp "
                          "(kernel has: 10.244.2.0/24 via 192.168.1.11 dev eth0 proto bgp)"]


def test_ipip_cross_subnet_encapsulates_only_between_racks(tmp_path: Path) -> None:
    lab, running = _racks_ipip(tmp_path, "CrossSubnet")
    obs = healthy(lab, running)
    g = draw(lab, running, obs)
    assert g.problems == []
    node1 = g.nodes[0]
    assert [r.observed for r in node1.routes[1:]] == ["10.244.2.0/24 via 192.168.1.11 dev eth0 proto bgp",
                                                      "10.244.3.0/24 via 192.168.2.10 dev tunl0 proto bgp onlink"]
    assert "IP-in-IP (proto 4) between racks" in graph_render.to_dot(g)
    del obs.namespaces[lab.node_netns("node3")].links["tunl0"]
    assert draw(lab, running, obs).problems == ["node3: tunl0: no tunl0"]


def test_ipvs_mode_services_are_read_from_the_ipvs_table(tmp_path: Path) -> None:
    """kube-proxy's IPVS mode: the graph compares the spec with the node's virtual servers (as
    observe.kernel reads them from /proc/net/ip_vs), not with iptables rules it does not have."""
    from observe import ipvs

    lab, running = model(seed_text(proxy="ipvs"), tmp_path)
    obs = healthy(lab, running)
    sps = endpoints.resolve(lab.services, running)
    lines = ["IP Virtual Server version 1.2.1 (size=4096)", "Prot LocalAddress:Port Scheduler Flags",
             "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn"]
    for sp in sps:
        ip = f"{int(sp.service.cluster_ip):08X}"
        lines.append(f"{sp.protocol.upper()}  {ip}:{sp.port.port:04X} rr ")
        lines += [f"  -> {int(e.ip):08X}:{e.port:04X}      Masq    1      0          0         " for e in sp.endpoints]
    table = ipvs.ipvs_services(ipvs.parse_ip_vs("\n".join(lines) + "\n"))
    obs.services = {n.name: table for n in lab.nodes}
    g = draw(lab, running, obs)
    assert g.kube_proxy == "ipvs" and g.problems == []
    assert all(e.status == "ok" for s in g.services for e in s.endpoints)
    obs.services["node2"] = {}  # node2's IPVS table is empty
    assert "service default/web:80/TCP: no rules on node2" in draw(lab, running, obs).problems


def test_a_pod_whose_eth0_is_down_is_named_so_not_its_veth(seed) -> None:
    """`ip link set eth0 down` in a pod (lab break link-down): the node's veth loses its carrier as a
    consequence, but the fault, and what to fix, is the pod's own eth0."""
    lab, running, obs = seed
    pod = next(rp for rp in running if rp.pod.name == "node1-pod1")
    obs.namespaces[lab.pod_netns(pod.pod)].links["eth0"] = LinkView("eth0", "veth", False, False, 1500)
    veth = names.host_veth(names.sandbox_id(lab.name, "default", "node1-pod1"))
    obs.namespaces[lab.node_netns("node1")].links[veth] = LinkView(veth, "veth", True, False, 1500, "cni0")
    g = draw(lab, running, obs)
    assert g.problems == ["node1: pod default/node1-pod1: eth0 is down (in the pod)"]
