"""`lab graph` for the cilium profile: what a Cilium node holds instead of cni0, flannel.1 and kube-proxy's
rules, compared with what the kernel and the pinned maps hold (cilium/agent.py builds it).

- `cilium_host` holding the router address (the PodCIDR's .1) as a /32, in place of the cni0 bridge;
- each pod on its own `lxc` veth with no master, reached by a /32 route `dev lxc...`;
- remote PodCIDRs `dev cilium_vxlan` (tunnel) or via the other node (native);
- `cilium_vxlan` with the entries of `cilium_tunnel_map` (a remote PodCIDR -> that node's IP);
- services as the service maps hold them (frontend -> backends), never as KUBE-* rules.

Pure given an Observation (observe/kernel.py) whose `services` and `tunnels` `fill` reads from the maps."""
from __future__ import annotations

from ipaddress import IPv4Network

from cilium import agent, maps
from observe.graph_status import MISSING, OK, WRONG, device_state
from observe.kernel import NsView, Observation
from routing import host_gw
from services.endpoints import RunningPod
from topo.model import Lab

HOST = "cilium_host"
ROUTER = "router · pods routed on lxc veths, no bridge"
DeviceRow = tuple[str, str, str, str, str]  # name, address, detail, status, note (observe/graph.py's Device)


def fill(lab: Lab, obs: Observation) -> None:
    """Read each node's service and tunnel maps into the observation (needs root)."""
    from observe import cilium as debug

    for node in lab.nodes:
        if obs.namespaces.get(lab.node_netns(node.name)) is None or not agent.pins(lab.name, node.name).is_dir():
            continue
        programmed: dict[tuple[str, str, int], list[str]] = {}
        for row in debug.service_list(lab.name, node.name):
            address, rest = row["frontend"].split(":")
            port, proto = rest.split("/")
            programmed[(address, proto.lower(), int(port))] = [b["address"].split("/")[0] for b in row["backends"]
                                                              if b["state"] == "active"]
        obs.services[node.name] = programmed
        obs.tunnels[node.name] = {r["tunnel"].split(":")[0]: r["value"].split(":")[0]
                                  for r in debug.tunnel_list(lab.name, node.name)}


def host_device(lab: Lab, node: str, view: NsView | None) -> DeviceRow:
    me = lab.node(node)
    status, note = device_state(view, HOST, need_carrier=False)
    if status == OK and view is not None and not view.has_addr(HOST, me.gateway.ip):
        status, note = WRONG, f"lacks {me.gateway.ip}/32"
    return HOST, f"{me.gateway.ip}/32", ROUTER, status, note


def tunnel_device(lab: Lab, node: str, view: NsView | None, obs: Observation) -> DeviceRow | None:
    if not agent.tunnel(lab):
        return None
    want = {str(n.pod_cidr.network_address): str(n.ip) for n in lab.nodes if n.name != node}
    have = obs.tunnels.get(node, {})
    entries = ", ".join(f"{n.pod_cidr} → {n.ip}" for n in lab.nodes if n.name != node)
    detail = f"VNI {maps.VNI} · UDP {agent.VXLAN_PORT} · tunnel map: {entries}"
    status, note = device_state(view, agent.VXLAN_DEVICE, need_carrier=False)
    if status == OK:
        lacking = [f"{cidr} → {ip}" for cidr, ip in want.items() if have.get(cidr) != ip]
        stale = [f"{cidr} → {ip}" for cidr, ip in have.items() if cidr not in want]
        if lacking:
            status, note = MISSING, f"cilium_tunnel_map lacks {', '.join(lacking)}"
        elif stale:
            status, note = WRONG, f"cilium_tunnel_map has stale {', '.join(stale)}"
    return agent.VXLAN_DEVICE, "", detail, status, note


def expected_routes(lab: Lab, node: str, running: list[RunningPod]) -> list[tuple[IPv4Network, object, str]]:
    """(dst, via, dev) of every route the profile puts in a node: one /32 per local pod on its lxc veth, and
    each remote PodCIDR through cilium_vxlan (tunnel) or via its node (native)."""
    from topo import names

    out: list[tuple[IPv4Network, object, str]] = []
    for rp in running:
        if rp.pod.node == node and rp.ip is not None:
            veth = names.host_veth(names.sandbox_id(lab.name, rp.pod.namespace, rp.pod.name), prefix="lxc")
            out.append((IPv4Network(f"{rp.ip}/32"), None, veth))
    if agent.tunnel(lab):
        out += [(n.pod_cidr, None, agent.VXLAN_DEVICE) for n in lab.nodes if n.name != node]
    else:
        out += [(r.dst, r.via, r.dev) for r in host_gw.routes(lab) if r.node == node]
    return out


def pod_state(view: NsView | None, veth: str) -> tuple[str, str]:
    """A pod's lxc veth: up, on no bridge (Cilium routes every pod)."""
    state, note = device_state(view, veth)
    link = view.links.get(veth) if view else None
    if state == OK and link is not None and link.master:
        state, note = WRONG, f"{veth} is on {link.master}: Cilium's lxc veths belong to no bridge"
    return state, note
