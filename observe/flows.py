"""`lab observe`'s pure half: naming a flow's ends (pods, nodes, external hosts, the world, Services), the
filters of `hubble observe` and the two ways of printing a flow (Hubble's compact line and its JSON).

The sources (observe/flows_ct.py: conntrack events and nflog for flannel and calico; observe/flows_cilium.py:
the cilium_events ringbuf; observe/flows_dns.py: DNS packets at the cluster DNS pod) fill observe/flow.Flow;
observe/flows_run.py reads them all. Nothing here needs root: unit tests drive it with made-up labs.

Fidelity: flag names and meanings follow `hubble observe` (--pod, --from-pod, --to-pod, --namespace,
--to-service, --port, --protocol, --verdict, --type, --follow, --last, -o json); the compact line is Hubble's
(`TIME: SRC:PORT (ID) -> DST:PORT (ID) POINT VERDICT (TCP Flags: SYN)`, the drop reason before DROPPED);
JSON keys are those of Hubble's flow.proto in `hubble observe -o json` (`flow.IP.source`, `l4.TCP.flags`,
`source.pod_name`, `destination_service`, `drop_reason_desc`, `ingress_denied_by`, `l7.dns`, ...).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from ipaddress import IPv4Network

from observe.flow import (DROPPED, TYPE_DNS, TYPE_DROP, TYPE_L34, TYPE_POLICY, TYPE_TRACE,
                          VERDICTS, Dns, Flow, FlowEndpoint, Service)
from topo.errors import StateError

PROTOCOLS = {"tcp": "TCP", "udp": "UDP", "icmp": "ICMPv4"}
TYPES = (TYPE_L34, TYPE_DROP, TYPE_TRACE, TYPE_DNS, TYPE_POLICY, "l7")
# Hubble's DropReason enum names for the texts the lab's sources give (flow.proto DropReason).
DROP_ENUM = {"Policy denied": "POLICY_DENIED", "Service backend not found": "SERVICE_BACKEND_NOT_FOUND",
             "Policy denied by denylist": "POLICY_DENY", "Invalid packet": "INVALID_PACKET_DROPPED"}
# Hubble's event_type.type numbers (Cilium's monitor message types; 129 is MessageTypeAccessLog, L7).
EVENT_TYPES = {TYPE_DROP: 1, TYPE_TRACE: 4, TYPE_L34: 4, TYPE_POLICY: 5, TYPE_DNS: 129}
TCP_FLAG_BITS = (("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08), ("ACK", 0x10), ("URG", 0x20),
                 ("ECE", 0x40), ("CWR", 0x80))
RCODE_TEXT = {0: "No Error", 1: "Format Error", 2: "Server Failure", 3: "Non-Existent Domain",
              4: "Not Implemented", 5: "Refused"}  # what Hubble's compact DNS line says (miekg/dns RcodeToString)
_POD_RE = re.compile(r"(?:([a-z0-9]([-a-z0-9]*[a-z0-9])?)/)?([a-z0-9]([-a-z0-9.]*[a-z0-9])?)")
_SINCE_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def tcp_flag_names(bits: int) -> tuple[str, ...]:
    return tuple(name for name, bit in TCP_FLAG_BITS if bits & bit)


# ---- names -------------------------------------------------------------------------------------

@dataclass
class Names:
    """Who an address is in a running lab: pods (by IP), nodes (their underlay IPs and bridge gateways),
    external hosts, and the Services' frontends (ClusterIP or node IP and port -> the Service)."""

    pods: dict[str, tuple[str, str, tuple[str, ...]]]  # ip -> (namespace, name, labels)
    hosts: dict[str, str]  # ip -> node or external host name
    services: dict[tuple[str, int, str], Service]  # (frontend ip, port, "TCP"/"UDP") -> Service
    pod_cidr: IPv4Network | None = None
    identities: dict[str, int] | None = None  # ip -> security identity (cilium), when known

    def __post_init__(self) -> None:
        self._frontends = {fip: svc for (fip, _port, _proto), svc in self.services.items() if fip not in self.hosts}

    def update(self, fresh: Names) -> None:
        """Take a fresh reading's names (the sources keep this object)."""
        self.pods, self.hosts, self.services = fresh.pods, fresh.hosts, fresh.services
        self._frontends = fresh._frontends

    def endpoint(self, ip: str) -> FlowEndpoint:
        ident = (self.identities or {}).get(ip, 0)
        if ip in self.pods:
            ns, name, labels = self.pods[ip]
            return FlowEndpoint(ip, ns, name, labels, ident)
        if ip in self.hosts:
            return FlowEndpoint(ip, name=self.hosts[ip], identity=ident)
        svc = self._frontends.get(ip)
        if svc is not None:  # a ClusterIP before translation: the Service, as `svc/NS/NAME`
            return FlowEndpoint(ip, name=f"svc/{svc.namespace}/{svc.name}", identity=ident)
        return FlowEndpoint(ip, identity=ident)

    def service(self, ip: str, port: int, protocol: str) -> Service | None:
        return self.services.get((ip, port, protocol))

    def is_lab(self, ip: str) -> bool:
        """A pod or a Service frontend (not only a node or the world)."""
        return ip in self.pods or ip in self._frontends


def names_of(st, lab, node_ips: dict[str, str] | None = None) -> Names:
    """Names from the lab's state (pods as they run) and model (nodes, external hosts, services)."""
    pods = {ps.ip: (*key.split("/", 1), tuple(sorted(f"{k}={v}" for k, v in ps.labels.items())))
            for key, ps in st.pods.items() if ps.ip}
    hosts: dict[str, str] = {}
    for node in lab.nodes:
        hosts[str(node.ip)] = node.name
        gateway = getattr(node, "gateway", None)
        if gateway is not None:
            hosts.setdefault(str(gateway.ip), node.name)
    for ext in lab.external:
        hosts[str(ext.ip)] = ext.name
    hosts.update(node_ips or {})
    services: dict[tuple[str, int, str], Service] = {}
    for svc in lab.services:
        for port in svc.ports:
            if svc.cluster_ip is not None:
                services[(str(svc.cluster_ip), port.port, port.protocol.upper())] = Service(svc.name, svc.namespace)
            if port.node_port:
                for node in lab.nodes:
                    services[(str(node.ip), port.node_port, port.protocol.upper())] = Service(svc.name, svc.namespace)
    return Names(pods, hosts, services, lab.cluster.pod_cidr)


# ---- filters -----------------------------------------------------------------------------------

def _pod_filter(text: str | None, flag: str) -> tuple[str | None, str] | None:
    """`[namespace/]pod-name-prefix` as hubble takes it; without a namespace, any namespace matches."""
    if text is None:
        return None
    m = _POD_RE.fullmatch(text)
    if not m:
        raise StateError(f"{flag} {text!r}: want [NAMESPACE/]POD (lowercase letters, digits, '-', '.')")
    return m.group(1), m.group(3)


def parse_since(text: str, flag: str = "--since") -> float:
    """`10s`, `500ms`, `2m`, `1h` -> seconds (`flag`: the option it came in, for the message)."""
    m = _SINCE_RE.fullmatch(text or "")
    if not m:
        raise StateError(f"{flag} {text!r}: want a duration like 10s, 500ms, 2m or 1h")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@dataclass(frozen=True)
class Filters:
    """`hubble observe`'s filters; a flow passes when it matches every filter given."""

    pod: tuple[str | None, str] | None = None
    from_pod: tuple[str | None, str] | None = None
    to_pod: tuple[str | None, str] | None = None
    namespace: str | None = None
    to_service: tuple[str | None, str] | None = None
    port: int | None = None
    protocol: str | None = None  # TCP | UDP | ICMPv4
    verdict: str | None = None
    type: str | None = None

    @classmethod
    def parse(cls, pod: str | None = None, from_pod: str | None = None, to_pod: str | None = None,
              namespace: str | None = None, to_service: str | None = None, port: int | None = None,
              protocol: str | None = None, verdict: str | None = None, type: str | None = None) -> Filters:
        if port is not None and not 0 < port < 65536:
            raise StateError(f"--port {port} is out of range (1-65535)")
        if protocol is not None and protocol.lower() not in PROTOCOLS:
            raise StateError(f"--protocol {protocol!r}: want one of {', '.join(PROTOCOLS)}")
        if verdict is not None and verdict.upper() not in VERDICTS:
            raise StateError(f"--verdict {verdict!r}: want one of {', '.join(VERDICTS)}")
        if type is not None and type not in TYPES:
            raise StateError(f"--type {type!r}: want one of {', '.join(TYPES)}")
        if namespace is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", namespace):
            raise StateError(f"--namespace {namespace!r} is not a namespace name")
        return cls(_pod_filter(pod, "--pod"), _pod_filter(from_pod, "--from-pod"), _pod_filter(to_pod, "--to-pod"),
                   namespace, _pod_filter(to_service, "--to-service"), port,
                   PROTOCOLS[protocol.lower()] if protocol else None, verdict.upper() if verdict else None,
                   "dns" if type == "l7" else type)

    def match(self, f: Flow) -> bool:
        if self.pod and not (_pod_match(self.pod, f.source) or _pod_match(self.pod, f.destination)):
            return False
        if self.from_pod and not _pod_match(self.from_pod, f.source):
            return False
        if self.to_pod and not _pod_match(self.to_pod, f.destination):
            return False
        if self.namespace and self.namespace not in (f.source.namespace, f.destination.namespace,
                                                     f.destination_service.namespace if f.destination_service else ""):
            return False
        if self.to_service:
            svc = f.destination_service
            ns, name = self.to_service
            if svc is None or svc.name != name or (ns is not None and svc.namespace != ns):
                return False
        if self.port and self.port not in (f.source_port, f.destination_port, _orig_port(f)):
            return False
        if self.protocol and f.protocol != self.protocol:
            return False
        if self.verdict and f.verdict != self.verdict:
            return False
        if self.type:
            if self.type == TYPE_L34:
                return f.type != TYPE_DNS
            if self.type == TYPE_DROP:
                return f.verdict == DROPPED
            return f.type == self.type
        return True


def _orig_port(f: Flow) -> int:
    return int(f.original_destination.rsplit(":", 1)[1]) if f.original_destination else 0


def _pod_match(want: tuple[str | None, str], ep: FlowEndpoint) -> bool:
    ns, prefix = want
    return bool(ep.pod_name) and ep.pod_name.startswith(prefix) and (ns is None or ep.namespace == ns)


# ---- printing ----------------------------------------------------------------------------------

def _ident(ep: FlowEndpoint, names: bool = True) -> str:
    """Hubble's bracket after an address: (ID:n) for an identity, else what kind of peer it is."""
    if ep.identity:
        return f"(ID:{ep.identity})"
    if ep.pod_name:
        return "(pod)"
    if ep.name.startswith("svc/"):
        return "(service)"
    return "(host)" if ep.name else "(world)"


def _end(ep: FlowEndpoint, port: int) -> str:
    return f"{ep.label()}:{port}" if port else ep.label()


def compact(f: Flow, with_node: bool = False) -> str:
    """One flow as `hubble observe` prints it (compact output)."""
    stamp = f.time.astimezone().strftime("%b %e %H:%M:%S.%f")[:-3]
    node = f" [{f.node_name}]" if with_node and f.node_name else ""
    src = f"{_end(f.source, f.source_port)} {_ident(f.source)}"
    dst = f"{_end(f.destination, f.destination_port)} {_ident(f.destination)}"
    point = f.trace_observation_point or ("dns-response" if f.dns and f.dns.response else
                                          "dns-request" if f.dns else "")
    verdict = f.verdict
    if f.type == TYPE_POLICY:  # Hubble's wording for policy verdicts: ALLOWED by an L3-L4 rule, or DENIED
        point = f"policy-verdict:{'none' if f.verdict == DROPPED else 'L3-L4'} {f.traffic_direction}".strip()
        verdict = "DENIED" if f.verdict == DROPPED else "ALLOWED"
    svc = ""
    if f.destination_service is not None and not f.destination.name.startswith("svc/"):
        svc = f" via svc {f.destination_service.namespace}/{f.destination_service.name}"
        svc += f" ({f.original_destination})" if f.original_destination else ""
    reason = f"{f.drop_reason_desc} " if f.verdict == DROPPED and f.drop_reason_desc and f.type != TYPE_POLICY else ""
    if "snat" in f.extra:
        svc += f" snat to {f.extra['snat']}"
    arrow = "->"
    if f.is_reply:  # Hubble keeps the client on the left: `client <- server`
        src, dst, arrow = dst, src, "<-"
    line = f"{stamp}{node}: {src} {arrow} {dst}{svc} {point + ' ' if point else ''}{reason}{verdict} ({_detail(f)})"
    if f.policies:
        line += f" by {', '.join(f.policies)}"
    return line


def _detail(f: Flow) -> str:
    if f.dns is not None:
        d = f.dns
        if not d.response:
            return f"DNS Query {d.query} {' '.join(d.qtypes)}"
        answer = " ".join(f'"{ip}"' for ip in d.ips)
        rcode = f"RCode: {RCODE_TEXT.get(d.rcode, d.rcode)} " if d.rcode else ""
        return f"DNS Answer {rcode}{answer + ' ' if answer else ''}(Query {d.query} {' '.join(d.qtypes)})"
    if f.protocol == "TCP":
        return f"TCP Flags: {', '.join(f.tcp_flags)}" if f.tcp_flags else "TCP"
    return f.protocol


def _endpoint_json(ep: FlowEndpoint) -> dict:
    out: dict = {"ID": 0, "identity": ep.identity}
    if ep.pod_name:
        out.update(namespace=ep.namespace, pod_name=ep.pod_name, labels=[f"k8s:{l}" for l in ep.labels])
    elif ep.name.startswith("svc/"):
        out["labels"] = []
        out["service"] = ep.name[4:]  # not Hubble's: the Service whose ClusterIP this is
    elif ep.name:
        out["labels"] = ["reserved:host"]
        out["node_name"] = ep.name
    else:
        out["labels"] = ["reserved:world"]
    return out


def to_json(f: Flow) -> dict:
    """One flow as a line of `hubble observe -o json`: {"flow": {...}, "node_name", "time"}."""
    time = f.time.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    flow: dict = {"time": time, "verdict": f.verdict, "IP": {"source": f.source.ip, "destination": f.destination.ip,
                                                             "ipVersion": "IPv4"},
                  "source": _endpoint_json(f.source), "destination": _endpoint_json(f.destination),
                  "Type": "L7" if f.type == TYPE_DNS else "L3_L4", "node_name": f.node_name,
                  "event_type": {"type": EVENT_TYPES.get(f.type, 4)}, "is_reply": f.is_reply,
                  "Summary": f.summary or _detail(f)}
    if f.protocol in ("TCP", "UDP"):
        l4: dict = {"source_port": f.source_port, "destination_port": f.destination_port}
        if f.protocol == "TCP":
            l4["flags"] = {name: True for name in f.tcp_flags}
        flow["l4"] = {f.protocol: l4}
    elif f.protocol == "ICMPv4":
        flow["l4"] = {"ICMPv4": {}}
    if f.traffic_direction:
        flow["traffic_direction"] = f.traffic_direction
    if f.trace_observation_point:
        flow["trace_observation_point"] = f.trace_observation_point.upper().replace("-", "_")
    if f.destination_service is not None and not f.destination.name.startswith("svc/"):
        flow["destination_service"] = {"name": f.destination_service.name,
                                       "namespace": f.destination_service.namespace}
    if f.original_destination:
        flow["original_destination"] = f.original_destination  # not Hubble's: the frontend before translation
    if f.verdict == DROPPED:
        flow["drop_reason_desc"] = DROP_ENUM.get(f.drop_reason_desc, f.drop_reason_desc.upper().replace(" ", "_"))
    if f.policies:
        key = "ingress" if f.traffic_direction == "INGRESS" else "egress"
        verb = "denied" if f.verdict == DROPPED else "allowed"
        flow[f"{key}_{verb}_by"] = [{"name": p.split("/", 1)[-1], "namespace": p.split("/", 1)[0] if "/" in p else "",
                                     "kind": "NetworkPolicy"} for p in f.policies]
    if f.dns is not None:
        flow["l7"] = {"type": "RESPONSE" if f.dns.response else "REQUEST",
                      "dns": {"query": f.dns.query, "ips": list(f.dns.ips), "rcode": f.dns.rcode,
                              "qtypes": list(f.dns.qtypes)}}
    if f.extra:
        flow["extra"] = dict(f.extra)
    return {"flow": flow, "node_name": f.node_name, "time": time}


def flow_from_json(data: dict) -> Flow:
    """The reverse of `to_json` (what tests and a learner's scripts read back)."""
    fl = data["flow"]

    def ep(d: dict, ip: str) -> FlowEndpoint:
        labels = tuple(l[4:] for l in d.get("labels", ()) if l.startswith("k8s:"))
        name = f"svc/{d['service']}" if "service" in d else d.get("node_name", "")
        return FlowEndpoint(ip, d.get("namespace", ""), d.get("pod_name", ""), labels, d.get("identity", 0), name)

    l4 = fl.get("l4", {})
    proto = next(iter(l4), "")
    ports = l4.get(proto, {})
    svc = fl.get("destination_service")
    dns = fl.get("l7", {}).get("dns")
    denied = fl.get("ingress_denied_by") or fl.get("egress_denied_by") or fl.get("ingress_allowed_by") or \
        fl.get("egress_allowed_by") or []
    reason = next((k for k, v in DROP_ENUM.items() if v == fl.get("drop_reason_desc")), fl.get("drop_reason_desc", ""))
    kind = TYPE_DNS if fl["Type"] == "L7" else {1: TYPE_DROP, 5: TYPE_POLICY}.get(fl["event_type"]["type"], TYPE_TRACE)
    return Flow(datetime.fromisoformat(fl["time"].replace("Z", "+00:00")), fl["verdict"], kind, fl["node_name"],
                ep(fl["source"], fl["IP"]["source"]), ep(fl["destination"], fl["IP"]["destination"]), proto,
                ports.get("source_port", 0), ports.get("destination_port", 0), tuple(ports.get("flags", {})),
                Service(svc["name"], svc["namespace"]) if svc else None, fl.get("original_destination", ""),
                reason, tuple(f"{p['namespace']}/{p['name']}" for p in denied), fl.get("traffic_direction", ""),
                fl.get("is_reply", False), fl.get("trace_observation_point", "").lower().replace("_", "-"),
                Dns(dns["query"], tuple(dns["qtypes"]), tuple(dns["ips"]), dns["rcode"],
                    fl["l7"]["type"] == "RESPONSE") if dns else None, fl.get("Summary", ""))


def now() -> datetime:
    return datetime.now(timezone.utc)

