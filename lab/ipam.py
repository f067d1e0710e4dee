"""`lab ipam`: the aws-vpc profile's address books, as ipamd's introspection endpoint and `kubectl describe node`
tell an EKS operator: per subnet its size, AWS's reserved addresses, what nodes (ENI primaries) and pods hold,
the warm pool and what is free; per node its instance type, ENIs with their addresses or prefixes, max pods,
assigned and warm addresses; the last lines of ipamd's log."""
from __future__ import annotations

from typing import Any

from apiserver import state
from apiserver.desired import current_lab
from cni import vpc_ipamd
from kubelet.pods import ipamd_file
from lab.status import table
from topo.errors import StateError


def describe(st: state.LabState) -> dict[str, Any]:
    lab = current_lab(st)
    if lab.cni.profile != "aws-vpc":
        raise StateError(f"lab {st.name} plays {lab.cni.profile}: its pods take addresses from each node's PodCIDR "
                         "(lab status); lab ipam shows the aws-vpc profile's VPC subnet books")
    ipamd = ipamd_file(lab).read()
    subnets = list(ipamd.others) + ([lab.vpc.custom_network] if lab.vpc.custom_network else [])
    out_subnets = []
    for subnet in subnets:
        nodes = pods = warm = 0
        for pool in ipamd.nodes.values():
            for eni in pool.enis:
                nodes += eni.primary in subnet
                for ip in eni.pool():
                    if ip in subnet:
                        pods += ip in pool.assigned
                        warm += ip not in pool.assigned
        out_subnets.append({"subnet": str(subnet), "size": subnet.num_addresses, "reserved": vpc_ipamd.AWS_RESERVED,
                            "other": len(ipamd.others.get(subnet, ())), "nodes": nodes, "pods": pods, "warm": warm,
                            "free": len(ipamd.free(subnet))})
    waiting = {}
    for key, ps in st.pods.items():
        if ps.waiting:
            waiting[ps.node] = waiting.get(ps.node, 0) + 1
    out_nodes = []
    for node in lab.nodes:
        pool = ipamd.nodes[node.name]
        out_nodes.append({
            "node": node.name, "instanceType": pool.instance, "maxPods": node.max_pods,
            "enis": [{"id": e.id, "device": i, "subnet": str(e.subnet), "primary": str(e.primary),
                      "secondaryIPs": [str(ip) for ip in e.ips], "prefixes": [str(p) for p in e.prefixes]}
                     for i, e in enumerate(pool.enis)],
            "assigned": len(pool.assigned), "warm": len(ipamd.available(pool)), "waiting": waiting.get(node.name, 0)})
    return {"lab": st.name, "settings": lab.vpc.env(), "subnets": out_subnets, "nodes": out_nodes,
            "log": ipamd.log[-10:]}


def render(info: dict[str, Any]) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in info["settings"].items())
    parts = [f"lab {info['lab']}: aws-node {settings}"]
    parts.append(table([["SUBNET", "SIZE", "RESERVED", "OTHER", "NODES", "PODS", "WARM", "FREE"]] + [
        [s["subnet"], str(s["size"]), str(s["reserved"]), str(s["other"]), str(s["nodes"]), str(s["pods"]),
         str(s["warm"]), str(s["free"])] for s in info["subnets"]]))
    parts.append(table([["NODE", "INSTANCE", "MAX-PODS", "ENIS", "ASSIGNED", "WARM", "WAITING"]] + [
        [n["node"], n["instanceType"], str(n["maxPods"]), str(len(n["enis"])), str(n["assigned"]), str(n["warm"]),
         str(n["waiting"])] for n in info["nodes"]]))
    rows = [["NODE", "ENI", "DEVICE", "PRIMARY", "SECONDARY IPS / PREFIXES"]]
    for n in info["nodes"]:
        for e in n["enis"]:
            held = e["prefixes"] or e["secondaryIPs"]
            rows.append([n["node"], e["id"], str(e["device"]), e["primary"], _ranges(held) or "-"])
    parts.append(table(rows))
    if info["log"]:
        parts.append("IPAMD LOG (last lines)\n" + "\n".join(f"  {line}" for line in info["log"]))
    return "\n\n".join(parts)


def _ranges(addresses: list[str]) -> str:
    """10.0.0.4, 10.0.0.5, 10.0.0.6 -> 10.0.0.4-6 (prefixes are shown as they are)."""
    if not addresses or "/" in addresses[0]:
        return ", ".join(addresses)
    from ipaddress import IPv4Address

    ips = sorted(IPv4Address(a) for a in addresses)
    out, start, prev = [], ips[0], ips[0]
    for ip in ips[1:] + [None]:
        if ip is not None and int(ip) == int(prev) + 1:
            prev = ip
            continue
        out.append(str(start) if start == prev else f"{start}-{str(prev).rsplit('.', 1)[1]}")
        if ip is not None:
            start = prev = ip
    return ", ".join(out)
