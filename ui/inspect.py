"""What a click on the diagram shows: a pod (IP, both ends of its veth, node, containers, resolv.conf, the
Services that select it) or a node (routes, tunnels, and one Service's rules in the active kube-proxy mode).

Read from the kernel and the lab's recorded state each time, never cached: an inspection shows the lab as it
is now. Needs root (it enters the lab's namespaces).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from apiserver import state
from apiserver.desired import current_lab
from kubelet.pods import running_pods
from observe import ipvs, kernel
from observe.kernel import NsView, Rule
from routing import ipip, vxlan
from services import endpoints
from topo import names
from topo.errors import StateError
from topo.model import BRIDGE, NODE_IFNAME, POD_IFNAME, Lab, Pod


def _context(lab_name: str) -> tuple[state.LabState, Lab, list, list]:
    st = state.resolve(lab_name)
    lab = current_lab(st)
    running = running_pods(st, lab)
    return st, lab, running, endpoints.resolve(lab.services, running)


def _link(view: NsView | None, dev: str) -> dict[str, Any] | None:
    if view is None or dev not in view.links:
        return None
    link = view.links[dev]
    return {"name": link.name, "index": link.index, "mac": link.mac, "mtu": link.mtu, "up": link.up,
            "carrier": link.carrier, "master": link.master, "kind": link.kind,
            "addresses": [str(a) for a in view.addrs.get(dev, [])]}


def pod_key(st: state.LabState, given: str) -> str:
    """`ns/name`, or a bare name: the pod of that name in `default`, else the only pod of that name."""
    if given in st.pods:
        return given
    found = [k for k in st.pods if k.split("/", 1)[1] == given]
    if f"default/{given}" in found:
        return f"default/{given}"
    if len(found) == 1:
        return found[0]
    raise StateError(f"no pod {names.shown(given)} in lab {st.name}" if not found else
                     f"{names.shown(given)} names pods in several namespaces: {', '.join(sorted(found))}")


def _cmdline(pid: int) -> list[str] | None:
    """The argv of process `pid` as the kernel holds it; None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]] if raw else None


def containers(ps: state.PodState, spec: Pod | None) -> list[dict[str, Any]]:
    """Each container the lab started for the pod (its state: name -> pid), with the command line that
    actually runs (/proc/PID/cmdline), not the one a spec asks for: a pod applied later has no spec here
    and a container may have died. The spec adds its image and ports, and its argv for a dead process."""
    declared = {c.name: c for c in (spec.containers if spec else ())}
    out = []
    for name, pid in ps.containers.items():
        c = declared.get(name)
        argv = _cmdline(pid) if state.pid_alive(pid) else None
        out.append({"name": name, "image": c.image if c else None,
                    "argv": argv if argv is not None else list(c.argv) if c else [],
                    "ports": [f"{p.container_port}/{p.protocol}" for p in c.ports] if c else [],
                    "pid": pid, "running": argv is not None})
    for name, c in declared.items():  # no process of its own: the pause image, which the sandbox's pause is
        if name not in ps.containers:
            out.append({"name": name, "image": c.image, "argv": list(c.argv),
                        "ports": [f"{p.container_port}/{p.protocol}" for p in c.ports],
                        "pid": ps.pause_pid, "running": state.pid_alive(ps.pause_pid)})
    return out


def pod(lab_name: str, given: str) -> dict[str, Any]:
    st, lab, running, sps = _context(lab_name)
    key = pod_key(st, given)
    ps = st.pods[key]
    spec = next((rp.pod for rp in running if rp.pod.key == key), None)
    namespace, name = key.split("/", 1)
    veth = names.host_veth(names.sandbox_id(lab.name, namespace, name))
    node_view = kernel.read_namespace(lab.node_netns(ps.node))
    pod_view = kernel.read_namespace(ps.netns)
    inside, outside = _link(pod_view, POD_IFNAME), _link(node_view, veth)
    resolv = state.pod_dir_of(st.name, key) / "resolv.conf"
    selecting = []
    for sp in sps:
        mine = [str(ep) for ep in sp.endpoints if ep.pod == key]
        if mine:
            svc = sp.service
            selecting.append({"name": f"{svc.namespace}/{svc.name}", "clusterIP": str(svc.cluster_ip),
                              "port": sp.port.port, "protocol": sp.port.protocol, "endpoint": mine[0]})
    return {
        "kind": "pod", "key": key, "name": name, "namespace": namespace, "ip": ps.ip, "node": ps.node,
        "alive": state.pid_alive(ps.pause_pid), "containerPids": dict(ps.containers),
        "netns": ps.netns,
        "veth": {"pod": inside, "node": outside,
                 "pair": f"{POD_IFNAME}@if{outside['index'] if outside else '?'} (in the pod) = "
                         f"{veth}@if{inside['index'] if inside else '?'} (on {ps.node}, master "
                         f"{(outside or {}).get('master') or 'none'})"},
        "routes": [r.text() for r in pod_view.routes] if pod_view else [],
        "labels": dict(spec.labels) if spec else {},
        "containers": containers(ps, spec),
        "resolvConf": resolv.read_text() if resolv.is_file() else "",
        "services": selecting,
    }


def _tunnels(lab: Lab, view: NsView | None) -> list[dict[str, Any]]:
    out = []
    for dev in (vxlan.DEVICE, ipip.DEVICE):
        link = _link(view, dev)
        if link is None:
            continue
        if dev == vxlan.DEVICE and view is not None:
            link["fdb"] = [f"{e.mac} dst {e.dst}" for e in view.fdb if e.dev == dev]
            link["neighbours"] = [f"{n.ip} lladdr {n.mac} {n.state}" for n in view.neigh if n.dev == dev]
        out.append(link)
    return out


def _service_choices(sps: list) -> list[str]:
    return [f"{sp.service.namespace}/{sp.service.name}:{sp.port.port}/{sp.port.protocol}" for sp in sps]


def _rule(r: Rule) -> dict[str, Any]:
    return {"where": r.where, "chain": r.chain, "text": r.text, "packets": r.packets}


def service_rules(ns: str, mode: str, cluster_ip: str, protocol: str, port: int) -> dict[str, Any]:
    """The rules one Service's traffic meets on a node, in the active mode: iptables' KUBE-SERVICES rule,
    its KUBE-SVC chain and KUBE-SEP chains; nftables' service-ips map element, service chain and endpoint
    chains (and every element of the map); IPVS's virtual server and real servers."""
    proto = protocol.lower()
    if mode == "iptables":
        rules = [r for r in kernel.iptables_rules(ns, "nat") if r.where.startswith("iptables nat ")]
        by_chain: dict[str, list[Rule]] = {}
        for r in rules:
            by_chain.setdefault(r.chain, []).append(r)
        pattern = re.compile(rf"-d {re.escape(cluster_ip)}(?:/32)? -p {proto} .*--dport {port}\b")
        entry = [r for r in by_chain.get("KUBE-SERVICES", []) if pattern.search(r.text)]
        chosen = list(entry)
        for r in entry:
            svc_chain = (r.verdict or "").split(":", 1)[-1]
            for svc_rule in by_chain.get(svc_chain, []):
                chosen.append(svc_rule)
                sep = (svc_rule.verdict or "").split(":", 1)[-1]
                if sep.startswith("KUBE-SEP-"):
                    chosen += by_chain.get(sep, [])
        return {"mode": mode, "rules": [_rule(r) for r in chosen], "map": []}
    if mode == "nftables":
        rules, maps = kernel.nft_rules(ns, "kube-proxy")
        by_chain = {}
        for r in rules:
            by_chain.setdefault(r.chain, []).append(r)
        elements = maps.get("ip kube-proxy service-ips", {})
        key = f"{cluster_ip} . {proto} . {port}"
        chosen = []
        verdict = elements.get(key, "")
        if verdict.startswith(("goto ", "jump ")):
            for r in by_chain.get(verdict.split(" ", 1)[1], []):
                chosen.append(r)
                target = (r.verdict or "").split(":", 1)[-1]
                if target.startswith("endpoint-"):
                    chosen += by_chain.get(target, [])
        return {"mode": mode, "element": f"{key} : {verdict}" if verdict else "",
                "map": [f"{k} : {v}" for k, v in elements.items()], "rules": [_rule(r) for r in chosen]}
    if mode == "ipvs":
        servers = [vs for vs in ipvs.ipvs_servers(ns) if (vs.ip, vs.protocol, vs.port) == (cluster_ip, proto, port)]
        return {"mode": mode, "rules": [], "map": [],
                "virtual": [{"server": f"{vs.protocol.upper()} {vs.ip}:{vs.port} {vs.scheduler}",
                             "reals": [f"-> {real} {fwd}" for real, fwd in vs.reals]} for vs in servers]}
    return {"mode": mode, "rules": [], "map": []}


def node(lab_name: str, name: str, service: str | None = None) -> dict[str, Any]:
    st, lab, _running, sps = _context(lab_name)
    if name not in {n.name for n in lab.nodes}:
        raise StateError(f"no node {name} in lab {st.name} (nodes: {', '.join(n.name for n in lab.nodes)})")
    spec = lab.node(name)
    ns = lab.node_netns(name)
    view = kernel.read_namespace(ns)
    choices = _service_choices(sps)
    if service is not None and service not in choices:
        raise StateError(f"no service port {service} (known: {', '.join(choices)})")
    # The first Service that is not the cluster DNS, by default: the one a learner is most likely after.
    chosen = service or next((c for c in choices if not c.startswith("kube-system/")), choices[0] if choices else None)
    rules: dict[str, Any] = {"mode": lab.kube_proxy.mode, "rules": [], "map": []}
    if chosen is not None and view is not None:
        sp = sps[choices.index(chosen)]
        rules = service_rules(ns, lab.kube_proxy.mode, str(sp.service.cluster_ip), sp.port.protocol, sp.port.port)
    return {
        "kind": "node", "name": name, "ip": str(spec.ip), "podCIDR": str(spec.pod_cidr), "netns": ns,
        "alive": view is not None,
        "links": [x for x in (_link(view, NODE_IFNAME), _link(view, BRIDGE)) if x],
        "routes": [r.text() for r in view.routes] if view else [],
        "tunnels": _tunnels(lab, view),
        "services": choices, "service": chosen, "serviceRules": rules,
    }
