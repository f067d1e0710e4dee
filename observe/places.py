"""`lab trace`'s names: the places of a running lab a probe can be seen in (pods, nodes, switches, routers,
external hosts), what a learner's FROM and TO mean, the two ends of every cable, and which places to watch.

Names are resolved as checks and faults name them (observe/targets.py); `svc/[NS/]NAME` and
`pod/[NS/]NAME` say which is meant, an address in the service CIDR is its Service, and a bare name that is
both a Service and a pod or host is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from apiserver import state
from observe import targets
from routing import ipip, vxlan
from topo import names, underlay
from topo.errors import StateError
from topo.model import BRIDGE, Lab

MAX_NODES = 16  # capture in every node of a lab up to this size
MAX_PODS = 64  # and in up to this many pods (the source, the destinations, the watched nodes' pods)
MAX_ENDPOINTS = 16  # of a service's endpoints (those on the source's node first)
Peers = dict[tuple[str, str], tuple[str, str]]  # (netns, dev) -> (netns, dev) at the other end of its cable


@dataclass(frozen=True)


class Place:
    """A namespace a probe can be seen in, as the learner names it."""

    netns: str
    name: str  # node1, node1-pod1, switch ul, tor-rack1, external-web
    kind: str  # pod, node, switch, router, external
    ip: IPv4Address | None = None
    node: str | None = None  # a pod's node


@dataclass(frozen=True)


class Target:
    kind: str  # pod, node, router, external, service, ip
    name: str
    ip: IPv4Address
    port: int | None
    protocol: str
    service: Any = None  # the ServicePortEndpoints behind a service target
    places: tuple[Place, ...] = ()  # where arriving means delivered (the pod, or the service's endpoints)


def _pod_label(key: str) -> str:
    namespace, name = key.split("/", 1)
    return name if namespace == "default" else key


class Lookup:
    """Names of a running lab: pods, nodes, routers, external hosts, services, switch ports, veths."""

    def __init__(self, st: state.LabState, lab: Lab, running: list, sps: list) -> None:
        self.st, self.lab, self.running, self.sps = st, lab, running, sps
        self.names = targets.Lookup(st, lab)  # pods and hosts by name, as checks and faults name them
        self.plan = underlay.plan(lab)
        self.places: dict[str, Place] = {}
        for host in self.plan.hosts:
            kind = "router" if host.router else "external" if host.external else "node"
            ip = next((l.address.ip for l in self.plan.links if l.host == host.name), None)
            if kind == "node":
                ip = lab.node(host.name).ip
            self.places[host.netns] = Place(host.netns, host.name, kind, ip)
        for seg in self.plan.segments:
            self.places[seg.netns] = Place(seg.netns, f"switch {seg.switch}", "switch")
        self.pods: dict[str, Place] = {}
        for key, ps in st.pods.items():
            place = Place(ps.netns, _pod_label(key), "pod", IPv4Address(ps.ip), ps.node)
            self.places[ps.netns] = place
            self.pods[key] = place
        self.cilium = lab.cni.profile == "cilium"
        prefix = "lxc" if self.cilium else "veth"  # Cilium names a pod's host-side veth lxc + hash
        self.veths = {names.host_veth(names.sandbox_id(lab.name, *key.split("/", 1)), prefix=prefix): key
                      for key in st.pods}
        self.veth_of = {st.pods[key].netns: veth for veth, key in self.veths.items()}  # pod netns -> its veth
        self.ports: dict[tuple[str, str], str] = {}  # (switch netns, port) -> host
        seg_ns = {s.switch: s.netns for s in self.plan.segments}
        for link in self.plan.links:
            if link.segment is not None and link.port is not None:
                self.ports[(seg_ns[link.segment], link.port)] = link.host
        self.by_ip: dict[str, Place] = {str(p.ip): p for p in self.places.values() if p.ip is not None}
        for node in lab.nodes:  # a node also answers from its cni0 address (ICMP errors to its pods)
            self.by_ip.setdefault(str(node.gateway.ip), self.places[lab.node_netns(node.name)])
        # Both ends of every cable: a pod's eth0 and its veth on the node, a host's NIC and its switch port
        # (or the other end of a point-to-point link).
        self.peers: Peers = self.plan.cables()
        for veth, key in self.veths.items():
            ps = st.pods[key]
            self._cable((ps.netns, "eth0"), (lab.node_netns(ps.node), veth))

    def _cable(self, a: tuple[str, str], b: tuple[str, str]) -> None:
        self.peers[a] = b
        self.peers[b] = a

    def known(self) -> str:
        hosts = [p.name for p in self.places.values() if p.kind in ("node", "router", "external")]
        return ", ".join(hosts + sorted(p.name for p in self.pods.values()) +
                         sorted({sp.service.name for sp in self.sps}))

    def source(self, text: str) -> Place:
        """Where the probe starts: a node, router or external host by name, or a pod (`pod/[NS/]NAME`, or
        a bare name no host has), alive."""
        kind, name = _form(text)
        if kind == "service":
            raise StateError(f"{names.shown(text)}: a trace starts in a pod, node or external host, not in a service")
        found = self.names.pod(name) if kind == "pod" else self.names.host(name) or self.names.pod(name)
        if found is None or found.netns not in self.places:
            raise StateError(f"no pod, node or external host named {names.shown(name)} in lab {self.st.name} "
                             f"(known: {self.known()})")
        self.names.require_alive(found)
        return self.places[found.netns]

    def target(self, text: str, protocol: str | None) -> Target:
        """Where the probe goes: `svc/[NS/]NAME` (or `service/...`), `pod/[NS/]NAME`, an IPv4 address (a
        ClusterIP is its Service), or a bare name; each optionally with :PORT. A bare name that is both a
        Service and a pod or host is refused: guessing would send the probe somewhere else than meant."""
        name, port = text, None
        if text.count(":") == 1 and text.rsplit(":", 1)[1].isdigit():
            name, port_text = text.rsplit(":", 1)
            port = int(port_text)
            if not 0 < port < 65536:
                raise StateError(f"port {port} is out of range (1-65535)")
        kind, rest = _form(name)
        if kind == "service":
            svc = self.names.service(name)
            return self._service_target([sp for sp in self.sps if sp.service.key == svc.key], name, port, protocol)
        if kind == "pod":
            pod = self.names.pod(rest)
            if pod is None:
                raise StateError(f"no pod {names.shown(rest)} in lab {self.st.name}")
            return self._place_target(self.pods[pod.key], port, protocol, name)
        try:
            return self._ip_target(IPv4Address(name), port, protocol)
        except ValueError:
            pass
        host = self.names.host(name)
        pod = self.names.pod(name) if host is None else None
        services = self._services_named(name)
        if services and (host or pod):
            svc = services[0].service
            what = f"pod {pod.key}" if pod else f"{host.kind} {name}"
            ref = f"svc/{svc.name if svc.namespace == 'default' else svc.key}"
            raise StateError(f"{name} is both the {what} and the service {svc.key}: give {ref} for the service"
                             + (f" or pod/{name} for the pod" if pod else ""))
        if host or pod:
            return self._place_target(self.places[host.netns] if host else self.pods[pod.key], port, protocol, name)
        if services:
            return self._service_target(services, name, port, protocol)
        raise StateError(f"no pod, node, external host or service named {names.shown(name)} in lab {self.st.name} "
                         f"(known: {self.known()})")

    def _place_target(self, place: Place, port: int | None, protocol: str | None, name: str) -> Target:
        if place.ip is None:
            raise StateError(f"{name} has no address to send to")
        return Target(place.kind, place.name, place.ip, port, _protocol(protocol, port, name), None, (place,))

    def _ip_target(self, ip: IPv4Address, port: int | None, protocol: str | None) -> Target:
        """An address. One in the service CIDR is a ClusterIP: the Service with that IP and port, built
        from the Service itself (never from a name, which a pod may share). A bare ClusterIP without a
        port is pinged as given, as the explainer's learner would (no kube-proxy rule matches ICMP)."""
        if ip in self.lab.cluster.service_cidr and (port is not None or protocol not in (None, "icmp")):
            fits = [sp for sp in self.sps if sp.service.cluster_ip == ip and (port is None or sp.port.port == port)
                    and (protocol is None or sp.protocol == protocol)]
            if fits:
                return self._from_service(fits[0], port, protocol)
        owner = self.by_ip.get(str(ip))
        return Target("ip", str(ip), ip, port, _protocol(protocol, port, str(ip)), None, (owner,) if owner else ())

    def _from_service(self, sp: Any, port: int | None, protocol: str | None) -> Target:
        eps = tuple(self.pods[e.pod] for e in sp.endpoints if e.pod in self.pods)
        return Target("service", sp.name, sp.service.cluster_ip, port or sp.port.port, protocol or sp.protocol, sp,
                      eps)

    def _services_named(self, name: str) -> list[Any]:
        """The service ports of the service NAME (any namespace, if only one has it) or NAMESPACE/NAME."""
        namespace, _, short = name.rpartition("/")
        found = [sp for sp in self.sps if sp.service.name == short and (not namespace or sp.service.namespace == namespace)]
        if len({sp.service.key for sp in found}) > 1:
            raise StateError(f"service {name} is in several namespaces "
                             f"({', '.join(sorted({sp.service.key for sp in found}))}): give svc/NAMESPACE/NAME")
        return found

    def _service_target(self, found: list[Any], name: str, port: int | None, protocol: str | None) -> Target:
        if not found:
            raise StateError(f"service {name} has no ports to trace")
        if found[0].service.cluster_ip is None:
            raise StateError(f"service {found[0].service.key} is headless (no ClusterIP): trace one of its pods")
        fits = [sp for sp in found if (port is None or sp.port.port == port) and
                (protocol is None or sp.protocol == protocol)]
        if not fits:
            ports = ", ".join(f"{sp.port.port}/{sp.protocol}" for sp in found)
            raise StateError(f"service {name} has no port {port or ''}{'/' + protocol if protocol else ''} "
                             f"(it has {ports})")
        return self._from_service(fits[0], port, protocol)

    def describe_dev(self, place: Place, dev: str) -> str:
        if place.kind == "switch":
            host = self.ports.get((place.netns, dev))
            return f"port to {host}" if host else "port"
        if place.kind == "node":
            if dev in self.veths:
                if self.cilium:  # no bridge: each pod's lxc veth is routed by a /32
                    return f"{_pod_label(self.veths[dev])}'s lxc veth, routed (/32)"
                if self.lab.cni.profile == "aws-vpc":  # routed, no bridge: the VPC CNI's host-side veth
                    return f"{_pod_label(self.veths[dev])}'s veth, routed (/32)"
                return f"{_pod_label(self.veths[dev])}'s veth on {BRIDGE}"
            gateway = f"bridge, gateway {self.lab.node(place.name).gateway.ip}"
            if self.cilium:
                return {"cilium_vxlan": "Cilium's VXLAN device, UDP 8472", "cilium_host":
                        f"router address {self.lab.node(place.name).gateway.ip}", "eth0": "underlay NIC"}.get(dev, "")
            return {BRIDGE: gateway, vxlan.DEVICE: f"VXLAN VNI {vxlan.VNI}", ipip.DEVICE: "IP-in-IP tunnel",
                    "eth0": "underlay NIC"}.get(dev, "")
        return ""


def _form(text: str) -> tuple[str | None, str]:
    """kubectl's TYPE/NAME forms: ("service", text) for svc/... and service/..., ("pod", rest) for
    pod/[NS/]NAME, (None, text) for a bare name."""
    if text.startswith(targets.SERVICE_PREFIXES):
        return "service", text
    if text.startswith("pod/"):
        return "pod", text[len("pod/"):]
    return None, text


def _protocol(given: str | None, port: int | None, name: str) -> str:
    if given:
        if given != "icmp" and port is None:
            raise StateError(f"--protocol {given} needs a port: {name}:PORT")
        return given
    return "tcp" if port is not None else "icmp"


def places_to_watch(lookup: Lookup, source: Place, target: Target) -> list[Place]:
    """Every switch and router, the nodes (all of them in a lab of up to MAX_NODES), the source and the
    destinations (a service's endpoints, up to MAX_ENDPOINTS: those on the source's node first), and the
    watched nodes' other pods, up to MAX_PODS pods in all."""
    spots = [p for p in lookup.places.values() if p.kind in ("switch", "router")]
    home = source.node or source.name
    dests = sorted(target.places, key=lambda p: p.kind == "pod" and p.node != home)  # stable: near ones first
    dests = dests[:MAX_ENDPOINTS]
    nodes = [p for p in lookup.places.values() if p.kind == "node"]
    if len(nodes) > MAX_NODES:
        wanted = {home, target.name} | {p.node for p in dests if p.node} | {p.name for p in dests}
        nodes = [n for n in nodes if n.name in wanted]
    spots += nodes
    spots += [source] + dests
    # The pods of the watched nodes too (up to the bound): a NodePort or a wrong route may lead anywhere.
    watched_nodes = {n.name for n in nodes}
    budget = max(0, MAX_PODS - sum(1 for p in spots if p.kind == "pod"))
    spots += [p for p in lookup.pods.values() if p.node in watched_nodes and p not in spots][:budget]
    spots += [p for p in lookup.places.values() if p.kind == "external" and (p == source or p.name == target.name)]
    seen: dict[str, Place] = {}
    for p in spots:
        seen.setdefault(p.netns, p)
    return list(seen.values())
