"""External hosts in a spec: machines outside the cluster, what they serve, and the DNS names they have.

An external host is a web server (http), the DNS server for names outside the cluster (dns), or a bare
client that reaches NodePorts from outside. The cluster DNS forwards names outside the cluster domain to the
one external host that serves dns, which answers every external host's `names`.
"""
from __future__ import annotations

from ipaddress import IPv4Address

from pydantic import Field

from topo import names
from topo.cluster_spec import NodeIn, node_segment, segment_ip_problem
from topo.model import ClusterDns, ExternalHost, Underlay
from topo.address_spec import ADDRESS_TEXT, parse_address
from topo.schema import Issues, Loc, StrictModel, close_match, short
from topo.workload_spec import dns_name_problem

# What an external host can run: http is agnhost netexec on port 80 (it shows the client IP it sees); dns an
# authoritative DNS server for the external hosts' `names`, which the cluster DNS forwards other names to.
EXTERNAL_SERVES = ("http", "dns")
PLANNED_SERVES: tuple[str, ...] = ()


class ExternalIn(StrictModel):
    name: str = Field(examples=["name: web"])
    ip: str = Field(examples=["ip: 192.168.1.200"])
    serves: list[str] | None = None
    rack: str | None = None
    names: list[str] | None = None


def check_external(hosts_in: list[ExternalIn], nodes_in: list[NodeIn], taken_names: dict[str, str],
                   underlay: Underlay | None, racks: tuple[str, ...] | None, dns: ClusterDns | None,
                   issues: Issues) -> list[ExternalHost] | None:
    """Machines outside the cluster, plugged into the underlay like a node (a flat segment, or a rack), so
    their names and addresses share the nodes' and routers' rules and may not clash with them. `taken_names`:
    the names of the lab's nodes and routers, each with how a message names its owner (`routing.spec.host_names`)."""
    before = len(issues)
    taken_ips: dict[IPv4Address, str] = {}
    for index, node in enumerate(nodes_in):
        if ADDRESS_TEXT.fullmatch(node.ip):
            try:
                taken_ips.setdefault(IPv4Address(node.ip), f"the address of node {node.name} (spec.nodes[{index}])")
            except ValueError:
                pass
    seen: dict[str, int] = {}
    hosts = []
    for index, host in enumerate(hosts_in):
        loc = ("spec", "external", index)
        problem = names.dns_label_problem(host.name)
        if problem:
            issues.add(loc + ("name",), problem)
        elif host.name in seen:
            issues.add(loc + ("name",), f"external host name {host.name} is already used by spec.external"
                                        f"[{seen[host.name]}]: give each external host its own name")
        elif host.name in taken_names:
            issues.add(loc + ("name",), f"external host name {host.name} is {taken_names[host.name]}: nodes, routers "
                                        "and external hosts are hosts of one lab and need different names; rename "
                                        "the external host")
        seen.setdefault(host.name, index)
        ip = _check_external_ip(host, loc, underlay, racks, taken_ips, issues)
        if ip is not None:
            taken_ips[ip] = f"the address of external host {host.name} (spec.external[{index}])"
        serves = _check_serves(host.serves, loc + ("serves",), issues)
        if ip is not None and serves is not None:
            hosts.append(ExternalHost(name=host.name, ip=ip, serves=serves, rack=host.rack, index=index,
                                      names=tuple(host.names or ())))
    _check_dns_server(hosts_in, issues)
    _check_external_names(hosts_in, dns, issues)
    return hosts if len(issues) == before else None


def _check_dns_server(hosts_in: list[ExternalIn], issues: Issues) -> None:
    """One external host at most serves dns: the cluster DNS forwards names outside the cluster to one
    upstream, and every external host's `names` are answered by that one server."""
    server: int | None = None
    for index, host in enumerate(hosts_in):
        if "dns" not in (host.serves or ()):
            continue
        if server is None:
            server = index
            continue
        position = (host.serves or []).index("dns")
        issues.add(("spec", "external", index, "serves", position),
                   f"external host {hosts_in[server].name} (spec.external[{server}]) already serves dns; at most one "
                   "external host may serve dns (it answers every external host's names, and the cluster DNS "
                   "forwards to it): remove dns from this host's serves")


def _check_external_names(hosts_in: list[ExternalIn], dns: ClusterDns | None, issues: Issues) -> None:
    """`names` are DNS names of an external host, answered by the external host that serves dns; each name
    belongs to one host, and none may fall inside the cluster domain, which the cluster DNS answers itself."""
    owners: dict[str, tuple[int, int]] = {}
    first_with_names: int | None = None
    for index, host in enumerate(hosts_in):
        loc = ("spec", "external", index, "names")
        if host.names and first_with_names is None:
            first_with_names = index
        for position, name in enumerate(host.names or []):
            problem = dns_name_problem(name, "name", "api.example.com")
            if problem:
                issues.add(loc + (position,), problem)
                continue
            if name in owners:
                other, other_position = owners[name]
                where = (f"names[{other_position}]" if other == index else
                         f"spec.external[{other}].names[{other_position}] ({hosts_in[other].name})")
                issues.add(loc + (position,), f"name {name} is already given at {where}: a name points at one host; "
                                              "remove one")
                continue
            owners[name] = (index, position)
            if dns is not None and dns.enabled and (name == dns.domain or name.endswith("." + dns.domain)):
                issues.add(loc + (position,), f"{name} is inside the cluster domain {dns.domain}, which the cluster "
                                              "DNS answers itself and never forwards to the external DNS server: pick "
                                              "a name outside it, e.g. api.example.com")
    if first_with_names is not None and not any("dns" in (h.serves or ()) for h in hosts_in):
        issues.add(("spec", "external", first_with_names, "names"),
                   "no external host serves dns: add dns to one host's serves (e.g. serves: [http, dns]) so these "
                   "names are answered, or remove names")


def _check_external_ip(host: ExternalIn, loc: Loc, underlay: Underlay | None, racks: tuple[str, ...] | None,
                       taken: dict[IPv4Address, str], issues: Issues) -> IPv4Address | None:
    segment = node_segment(host.rack, loc, underlay, racks, issues, what="external host")
    ip = parse_address(host.ip, loc + ("ip",), issues, "underlay.subnet" if racks is None else "its rack's subnet")
    if ip is None or segment is None:
        return None
    problem = segment_ip_problem(ip, segment, underlay)
    if problem is None and ip in taken:
        problem = f"{ip} is already {taken[ip]}: give the external host an address of its own in {segment[1]}"
    if problem:
        issues.add(loc + ("ip",), problem)
        return None
    return ip


def _check_serves(serves: list[str] | None, loc: Loc, issues: Issues) -> tuple[str, ...] | None:
    """What the host runs; an empty list makes it a bare client (to reach NodePorts from outside, say)."""
    if serves is None:
        return ExternalHost.serves  # the model's default: a dataclass keeps it as the class attribute
    ok = True
    supported = ", ".join(EXTERNAL_SERVES)
    for index, item in enumerate(serves):
        if item in serves[:index]:
            issues.add(loc + (index,), f"{short(item, 40)} is listed twice: keep one")
            ok = False
        elif item in PLANNED_SERVES:
            issues.add(loc + (index,), f"an external host cannot serve {item} yet; supported: {supported}")
            ok = False
        elif item not in EXTERNAL_SERVES:
            close = close_match(item, EXTERNAL_SERVES)
            hint = f" (did you mean {close}?)" if close else ""
            issues.add(loc + (index,), f"unknown service {short(repr(item), 40)} for an external host{hint}; "
                                       f"supported: {supported} (or [] for a host that only acts as a client)")
            ok = False
    return tuple(serves) if ok else None
