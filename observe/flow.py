"""One flow event as `lab observe` reports it, whatever the profile's source (BPF ringbuf in the cilium
profile; the kernel's conntrack events, nflog and packet sockets in flannel and calico).

Field and verdict names follow Hubble's flow API (observer.proto / flow.proto: `verdict`, `drop_reason_desc`,
`Type` L3_L4/TRACE/DROP/..., `source`/`destination` endpoints with namespace, pod_name, labels, identity,
`l4.TCP.flags`, `destination_service`, `traffic_direction`, `is_reply`, `node_name`, `l7.dns`), so a learner's
`--json` output reads like `hubble observe -o json`. Pure: sources fill it, the CLI filters and prints it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

# Hubble's Verdict enum names (those the lab can produce).
FORWARDED, DROPPED, TRANSLATED, TRACED = "FORWARDED", "DROPPED", "TRANSLATED", "TRACED"
VERDICTS = (FORWARDED, DROPPED, TRANSLATED, TRACED)
# `--type` values, as hubble observe spells them.
TYPE_L34, TYPE_DROP, TYPE_TRACE, TYPE_DNS, TYPE_POLICY = "l3-l4", "drop", "trace", "dns", "policy-verdict"


@dataclass(frozen=True)
class FlowEndpoint:
    """A flow's source or destination: a pod, or the node / an external host / the world by its IP."""
    ip: str
    namespace: str = ""
    pod_name: str = ""
    labels: tuple[str, ...] = ()  # "k=v", sorted
    identity: int = 0
    name: str = ""  # not a pod: the node's or external host's name ("" = world)

    def label(self) -> str:
        """What a line shows: namespace/pod, else the node or host name, else the IP."""
        if self.pod_name:
            return f"{self.namespace}/{self.pod_name}"
        return self.name or self.ip


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str


@dataclass(frozen=True)
class Dns:
    """Hubble's l7.dns: the query, its answers and the rcode (0 NOERROR, 3 NXDOMAIN)."""
    query: str
    qtypes: tuple[str, ...] = ("A",)
    ips: tuple[str, ...] = ()
    rcode: int = 0
    response: bool = False


@dataclass(frozen=True)
class Flow:
    time: datetime
    verdict: str
    type: str  # TYPE_*
    node_name: str
    source: FlowEndpoint
    destination: FlowEndpoint
    protocol: str  # "TCP" | "UDP" | "ICMPv4"
    source_port: int = 0
    destination_port: int = 0
    tcp_flags: tuple[str, ...] = ()  # Hubble's names: SYN, ACK, FIN, RST, PSH
    destination_service: Service | None = None  # the Service a translated flow was addressed to
    original_destination: str = ""  # "ip:port" of that Service's frontend, when translated
    drop_reason_desc: str = ""  # Hubble's text, e.g. "Policy denied"
    policies: tuple[str, ...] = ()  # namespace/name of the NetworkPolicies that decided
    traffic_direction: str = ""  # INGRESS | EGRESS
    is_reply: bool = False
    trace_observation_point: str = ""
    dns: Dns | None = None
    summary: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False)
