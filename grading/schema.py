"""The shape of an exercise's checks.yaml: its limits and the pydantic models of every probe, check and task.

Kept apart from the checks of meaning (grading/fields.py) and the loader (grading/checks.py), so the field
reference a learner reads (docs/exercises.md) has one place in code: the probes' own models, which
grading/probes.py reads when it runs them.
"""
from __future__ import annotations

import re
from typing import Any

from pydantic import Field

from apiserver.spec import API_VERSION
from topo.schema import StrictModel

CHECKS_FILE = "checks.yaml"
ANSWERS_FILE = "answers.yaml"
KIND = "Exercise"
WAIT_MAX = 120.0  # seconds; a check that needs longer to converge is measuring something else
TIMEOUT_MAX = 60.0
POINTS_MAX = 100
NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", re.ASCII)  # check and task ids: DNS-1123 labels, like objects
ANSWER_KEY = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", re.ASCII)
AFTER_FILE = "AFTER.md"  # "what you should have seen": `lab grade` points to it once every check passes
# Route protocols by name, as iproute2's rt_protos names them (the numbers are the kernel's RTPROT_*; 186
# is bgp, what FRR's zebra installs BGP routes with). A route check's `proto` is one of these or a number.
ROUTE_PROTOCOLS = {"unspec": 0, "redirect": 1, "kernel": 2, "boot": 3, "static": 4, "gated": 8, "ra": 9,
                   "mrt": 10, "zebra": 11, "bird": 12, "dnrouted": 13, "xorp": 14, "ntk": 15, "dhcp": 16,
                   "keepalived": 18, "babel": 42, "openr": 99, "bgp": 186, "isis": 187, "ospf": 188, "rip": 189,
                   "eigrp": 192}
HTTP_HOST = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:[0-9]{1,5})?", re.ASCII)  # a Host header: name[:port]
HTTP_PATH = re.compile(r"/[\x21-\x7e]*")  # visible ASCII only: no space, no CR/LF, nothing to inject
IPERF_FRACTION_MAX = 1.0


# ---------------------------------------------------------------------------- structure (pydantic)


class _Bounds(StrictModel):
    min: int | None = None
    max: int | None = None


class ReachIn(StrictModel):
    source: str = Field(alias="from", examples=["from: web-1"])
    to: str = Field(examples=["to: 10.244.2.2"])
    port: int = Field(examples=["port: 8080"])
    protocol: str = "tcp"  # tcp, udp
    # allowed; blocked: dropped (the attempt times out, as a NetworkPolicy or a DROP rule does); refused:
    # an RST or ICMP port unreachable came back (nothing listens, a REJECT rule). "Network is unreachable"
    # and other local errors are neither: a check never passes because its source is broken.
    expect: str = "allowed"
    source_ip: str | None = Field(None, alias="sourceIP")
    timeout: float = 1.0


class HttpIn(StrictModel):
    source: str = Field(alias="from", examples=["from: web-1"])
    to: str = Field(examples=["to: service/web"])
    port: int = 80
    path: str = "/"
    host: str | None = None  # the Host header (Ingress routing)
    status: int = 200
    body: str | None = None  # a regular expression the body must contain
    timeout: float = 2.0
    # `to` is a Service: GET until every ready endpoint has answered (its body, /hostname, naming the pod);
    # every answer must pass, and each endpoint gets 20 tries on average before the probe gives up
    spread: bool = False


class DnsIn(StrictModel):
    source: str = Field(alias="from", examples=["from: web-1"])
    name: str = Field(examples=["name: api.example.com"])
    family: str = "any"  # any (A and AAAA), inet, inet6
    answer: list[str] | None = None  # addresses, or targets whose address is meant (service/web, node1)
    resolves: bool | None = None
    queries: _Bounds | None = None  # queries the cluster DNS received for the lookup
    # queries the pod sent for the lookup: its node's cache received them (NodeLocal DNSCache), else the cluster DNS
    sent: _Bounds | None = None


class RouteIn(StrictModel):
    on: str = Field(alias="in", examples=["in: node1"])
    to: str = Field(examples=["to: 10.244.2.0/24"])
    present: bool = True
    via: str | None = None  # an address or a host whose address is meant
    dev: str | None = None
    proto: str | None = None  # a name of ROUTE_PROTOCOLS (kernel, boot, static, bgp, ...) or a number 0-255


class BgpIn(StrictModel):
    on: str = Field(alias="in", examples=["in: tor-rack1"])
    peer: str | None = None  # an address or a host name; all peers when left out
    state: str = "Established"
    prefixes: list[str] = []  # prefixes the speaker's BGP table must hold


class RuleIn(StrictModel):
    on: str = Field(alias="in", examples=["in: node1"])
    tool: str = "iptables"  # iptables (the backend the lab loads: spec.kubeProxy.iptables), nft
    table: str = "filter"  # iptables: nat, filter, ...; nft: "[family] name", e.g. "ip kube-proxy"
    chain: str | None = None
    match: str | None = None  # a regular expression a rule of the chain (or table) must match
    present: bool = True


class LinkIn(StrictModel):
    on: str | None = Field(None, alias="in")
    dev: str | None = None
    host_veth_of: str | None = Field(None, alias="hostVethOf")  # the node-side veth of a pod
    present: bool = True
    mtu: int | None = None
    master: str | None = None
    type: str | None = None
    up: bool | None = None
    hairpin: bool | None = None  # a bridge port's hairpin mode (the CNI's hairpinMode: a pod reaching itself)


class CommandIn(StrictModel):
    on: str = Field(alias="in", examples=["in: node1"])
    argv: list[str] = Field(examples=["argv: [ip, route]"])
    match: str | None = None  # a regular expression the output (stdout and stderr) must contain
    not_match: str | None = Field(None, alias="notMatch")
    exit_code: int | None = Field(None, alias="exitCode")  # default 0: a command that fails proves nothing
    timeout: float = 10.0


class LbMapIn(StrictModel):
    on: str = Field(alias="in", examples=["in: node1"])
    service: str = Field(examples=["service: web"])  # NAME or NAMESPACE/NAME


class PathIn(StrictModel):
    source: str = Field(alias="from", examples=["from: a"])
    to: str = Field(examples=["to: b"])


class IperfIn(PathIn):
    port: int = 5201
    seconds: float = 1.0
    min_mbit: float | None = Field(None, alias="minMbit")
    min_fraction: float | None = Field(None, alias="minFraction")
    baseline: PathIn | None = None  # measured in the same grading run


class PodsIn(StrictModel):
    namespace: str = "default"
    name: str | None = None
    selector: dict[str, str] | None = None
    running: _Bounds = _Bounds(min=1)
    containers: int | None = None  # container processes each matching pod must run


class CommandValueIn(StrictModel):
    """A command's output: the one group of `group`, the number of lines matching `count`, or (neither)
    the whole output, stripped."""

    on: str = Field(alias="in", examples=["in: node1"])
    argv: list[str] | None = Field(None, examples=["argv: [ip, -d, link, show, flannel.1]"])
    # Alternatives, tried in order: the first that exits 0 gives the output (a value read one way in one
    # mode of the lab and another way in another, e.g. iptables or nftables rules), never through a shell.
    argvs: list[list[str]] | None = None
    group: str | None = None  # a regular expression with one group
    count: str | None = None  # a regular expression; the value is how many output lines match it


class DnsQueriesIn(StrictModel):
    """How many queries one lookup from a pod costs (what `lab dns-count` counts)."""

    source: str = Field(alias="from", examples=["from: probe"])
    name: str = Field(examples=["name: api.example.com"])
    family: str = "any"
    upstream: bool = False  # count the queries forwarded to the upstream DNS instead
    sent: bool = False  # count the queries the pod sent (to its node's cache with NodeLocal DNSCache) instead


class DevIn(StrictModel):
    on: str = Field(alias="in", examples=["in: node1"])
    dev: str = Field(examples=["dev: eth0"])


class RouteViaIn(StrictModel):
    on: str = Field(alias="in", examples=["in: node1"])
    to: str = Field(examples=["to: 10.244.2.0/24"])


class ValueIn(StrictModel):
    """Where an answer's true value comes from: computed from the running lab at grading time."""

    pause_pid: str | None = Field(None, alias="pausePid")
    pod_ip: str | None = Field(None, alias="podIP")
    host_veth: str | None = Field(None, alias="hostVeth")
    node_of: str | None = Field(None, alias="nodeOf")
    mac: DevIn | None = None
    mtu: DevIn | None = None
    pod_capacity: str | None = Field(None, alias="podCapacity")
    free_pod_ips: str | None = Field(None, alias="freePodIPs")
    max_pods: str | None = Field(None, alias="maxPods")  # aws-vpc: EKS's max pods of the node's instance type
    subnet_free: str | None = Field(None, alias="subnetFree")  # aws-vpc: free addresses of the node's pod subnet
    route_via: RouteViaIn | None = Field(None, alias="routeVia")
    command: CommandValueIn | None = None
    dns_queries: DnsQueriesIn | None = Field(None, alias="dnsQueries")


class AnswerIn(StrictModel):
    key: str = Field(examples=["key: web-1-host-veth"])
    value: ValueIn = Field(examples=["value: {hostVeth: web-1}"])


PROBES: dict[str, type[StrictModel]] = {
    "reach": ReachIn, "http": HttpIn, "dns": DnsIn, "route": RouteIn, "bgp": BgpIn, "rule": RuleIn,
    "link": LinkIn, "command": CommandIn, "iperf": IperfIn, "pods": PodsIn, "answer": AnswerIn,
    "lbmap": LbMapIn,
}


class CheckIn(StrictModel):
    name: str = Field(examples=["name: pods-reach-across-nodes"])
    task: str = Field(examples=["task: fix-route"])
    description: str = Field(examples=["description: web-1 reaches web-2 across nodes"])
    points: int = 1
    hint: str = ""
    # On the fresh lab (faults applied), before any task is done: fail, pass, or any (it depends on which
    # random faults were drawn, as in the capstone).
    initially: str = "fail"
    wait: float | None = None  # retry until it passes or this many seconds have passed
    # Earlier checks (guards) this one counts only with: when one of them fails, this one fails too. An
    # absence or a measured value (blocked, 0 replies) proves nothing on a lab whose source is broken.
    needs: list[str] = []
    requires: list[str] = []  # kernel features (ipvs, dummy, ipip, netem): skipped on a kernel without them
    reach: ReachIn | None = None
    http: HttpIn | None = None
    dns: DnsIn | None = None
    route: RouteIn | None = None
    bgp: BgpIn | None = None
    rule: RuleIn | None = None
    link: LinkIn | None = None
    command: CommandIn | None = None
    iperf: IperfIn | None = None
    pods: PodsIn | None = None
    answer: AnswerIn | None = None
    lbmap: LbMapIn | None = None


class TaskIn(StrictModel):
    id: str = Field(examples=["id: fix-route"])
    title: str = Field(examples=["title: Put the route back"])


class ExerciseIn(StrictModel):
    api_version: str = Field(alias="apiVersion", examples=[f"apiVersion: {API_VERSION}"])
    kind: str = Field(examples=[f"kind: {KIND}"])
    title: str = Field(examples=["title: VXLAN and the MTU black hole"])
    claim: str = ""  # the explainer's claim the exercise makes real
    tasks: list[TaskIn] = Field(examples=["tasks: [{id: fix-mtu, title: ...}]"])
    faults: list[dict[str, Any]] = []
    checks: list[CheckIn] = Field(examples=["checks: [{name: ..., task: ..., description: ..., reach: {...}}]"])
