"""An exercise's checks.yaml: what `lab grade` verifies, read and checked as strictly as a lab spec.

An exercise folder (`labs/NN-slug/`) holds README.md (the story and the tasks), lab.yaml (the lab) and
checks.yaml: the tasks' ids, the faults `lab up` applies after building the lab, and named checks. Each
check belongs to a task, is worth points, carries a hint for when it fails, and holds exactly one probe:
a declarative question about the running lab (can A reach B, is this route there, does the answer file
say what the kernel says). Probes only look: grading never changes a lab. The reference of every field is
docs/exercises.md; `lab/probes.py` runs the probes.

Errors are reported as spec errors are, all at once, `checks.yaml:LINE: checks[2].route.to: message`,
and a bad file stops `lab up` and `lab grade` with exit code 2 before anything is built or graded.
"""
from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from topo import names
from topo.errors import SpecError, SpecIssue
from topo.spec import API_VERSION, StrictDocument, StrictModel, _close_match

CHECKS_FILE = "checks.yaml"
ANSWERS_FILE = "answers.yaml"
KIND = "Exercise"
WAIT_MAX = 120.0  # seconds; a check that needs longer to converge is measuring something else
TIMEOUT_MAX = 60.0
POINTS_MAX = 100
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # check and task ids: DNS-1123 labels, like objects
ANSWER_KEY = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
AFTER_FILE = "AFTER.md"  # "what you should have seen": `lab grade` points to it once every check passes
# Route protocols by name, as iproute2's rt_protos names them (the numbers are the kernel's RTPROT_*; 186
# is bgp, what FRR's zebra installs BGP routes with). A route check's `proto` is one of these or a number.
ROUTE_PROTOCOLS = {"unspec": 0, "redirect": 1, "kernel": 2, "boot": 3, "static": 4, "gated": 8, "ra": 9,
                   "mrt": 10, "zebra": 11, "bird": 12, "dnrouted": 13, "xorp": 14, "ntk": 15, "dhcp": 16,
                   "keepalived": 18, "babel": 42, "openr": 99, "bgp": 186, "isis": 187, "ospf": 188, "rip": 189,
                   "eigrp": 192}
HTTP_HOST = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:[0-9]{1,5})?$")  # a Host header: name[:port]
HTTP_PATH = re.compile(r"^/[\x21-\x7e]*$")  # visible ASCII only: no space, no CR/LF, nothing to inject
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


class DnsIn(StrictModel):
    source: str = Field(alias="from", examples=["from: web-1"])
    name: str = Field(examples=["name: api.example.com"])
    family: str = "any"  # any (A and AAAA), inet, inet6
    answer: list[str] | None = None  # addresses, or targets whose address is meant (service/web, node1)
    resolves: bool | None = None
    queries: _Bounds | None = None  # queries the cluster DNS received for the lookup


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
    tool: str = "iptables"  # iptables (the legacy backend, as the lab loads), nft
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
    route_via: RouteViaIn | None = Field(None, alias="routeVia")
    command: CommandValueIn | None = None
    dns_queries: DnsQueriesIn | None = Field(None, alias="dnsQueries")


class AnswerIn(StrictModel):
    key: str = Field(examples=["key: web-1-host-veth"])
    value: ValueIn = Field(examples=["value: {hostVeth: web-1}"])


PROBES: dict[str, type[StrictModel]] = {
    "reach": ReachIn, "http": HttpIn, "dns": DnsIn, "route": RouteIn, "bgp": BgpIn, "rule": RuleIn,
    "link": LinkIn, "command": CommandIn, "iperf": IperfIn, "pods": PodsIn, "answer": AnswerIn,
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


# ---------------------------------------------------------------------------- the checked model


@dataclass(frozen=True)
class Check:
    name: str
    task: str
    description: str
    points: int
    hint: str
    initially: str
    wait: float | None
    kind: str  # a key of PROBES
    probe: Any  # the probe's model (ReachIn, ...)
    requires: tuple[str, ...] = ()  # names of FEATURES
    needs: tuple[str, ...] = ()  # names of earlier checks


@dataclass(frozen=True)
class Task:
    id: str
    title: str


@dataclass
class Exercise:
    folder: Path
    file: Path
    title: str
    claim: str
    tasks: list[Task]
    faults: list[dict[str, Any]]  # {"fault": NAME, params...}, validated against lab.faults
    checks: list[Check] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return self.folder.name

    @property
    def max_points(self) -> int:
        return sum(c.points for c in self.checks)

    @property
    def after_file(self) -> Path:
        """The notes to read once every check passes (the numbers the README does not give away)."""
        return self.folder / AFTER_FILE


def checks_file(folder: str | Path) -> Path:
    return Path(folder) / CHECKS_FILE


def load(folder: str | Path, shown: str | None = None) -> Exercise:
    """Read and check `folder`/checks.yaml (`shown`: the folder as the user gave it, for messages)."""
    path = checks_file(folder)
    file = str(Path(shown) / CHECKS_FILE) if shown is not None else str(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise SpecError(file, [SpecIssue("", f"no {CHECKS_FILE} here: {folder} is not a graded exercise "
                                             "(see docs/exercises.md)")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(file, [SpecIssue("", f"cannot read: {exc}")]) from None
    return parse(text, file, Path(folder))


def parse(text: str, file: str, folder: Path) -> Exercise:
    doc = StrictDocument(text, file, ExerciseIn, f"apiVersion: {API_VERSION}, kind: {KIND}, title, tasks, checks")
    data = doc.data
    if data.get("apiVersion") not in (None, API_VERSION):
        doc.add(("apiVersion",), f"must be {API_VERSION}, got {data.get('apiVersion')!r}")
    if data.get("kind") not in (None, KIND):
        doc.add(("kind",), f"must be {KIND}, got {data.get('kind')!r}")
    model: ExerciseIn | None = doc.model  # type: ignore[assignment]
    _check_faults(doc, data.get("faults"))
    if model is None:
        doc.raise_if_any()
    assert model is not None
    tasks = _check_tasks(doc, model.tasks)
    checks = []
    seen: dict[str, int] = {}
    for index, check in enumerate(model.checks):
        loc: tuple = ("checks", index)
        if not NAME.match(check.name) or len(check.name) > names.DNS1123_LABEL_MAX:
            doc.add(loc + ("name",), f"{check.name!r} is not a check name: use lower-case letters, digits and '-'")
        if check.name in seen:
            doc.add(loc + ("name",), f"{check.name!r} is also the name of checks[{seen[check.name]}]: names are unique")
        seen.setdefault(check.name, index)
        if check.task not in tasks:
            doc.add(loc + ("task",), f"{check.task!r} is not a task of this exercise (tasks: {', '.join(tasks) or 'none'})")
        if not 0 <= check.points <= POINTS_MAX:
            doc.add(loc + ("points",), f"must be between 0 and {POINTS_MAX}")
        _choice(doc, loc + ("initially",), check.initially, CHOICES["initially"])
        if check.wait is not None and not 0 < check.wait <= WAIT_MAX:
            doc.add(loc + ("wait",), f"must be between 0 and {WAIT_MAX:.0f} seconds")
        given = [kind for kind in PROBES if getattr(check, kind) is not None]
        if len(given) != 1:
            doc.add(loc, f"needs exactly one probe ({', '.join(PROBES)}), got "
                         f"{', '.join(given) if given else 'none'}")
            continue
        kind = given[0]
        probe = getattr(check, kind)
        _check_probe(doc, loc + (kind,), kind, probe)
        for i, feature in enumerate(check.requires):
            _choice(doc, loc + ("requires", i), feature, tuple(FEATURES))
        for i, needed in enumerate(check.needs):
            if needed not in seen or needed == check.name:
                close = _close_match(needed, [c.name for c in checks])
                doc.add(loc + ("needs", i), f"{needed!r} is not an earlier check of this file"
                                            + (f" (did you mean {close!r}?)" if close else ""))
        checks.append(Check(check.name, check.task, check.description, check.points, check.hint, check.initially,
                            check.wait, kind, probe, tuple(check.requires), tuple(check.needs)))
    if not model.checks:
        doc.add(("checks",), "an exercise needs at least one check")
    doc.raise_if_any()
    return Exercise(folder, folder / CHECKS_FILE, model.title, model.claim, [Task(t.id, t.title) for t in model.tasks],
                    list(model.faults), checks)


def _check_tasks(doc: StrictDocument, tasks: list[TaskIn]) -> list[str]:
    ids: list[str] = []
    for index, task in enumerate(tasks):
        if not NAME.match(task.id):
            doc.add(("tasks", index, "id"), f"{task.id!r} is not a task id: use lower-case letters, digits and '-'")
        if task.id in ids:
            doc.add(("tasks", index, "id"), f"{task.id!r} is given twice")
        ids.append(task.id)
    return ids


def _check_faults(doc: StrictDocument, faults: Any) -> None:
    from lab import faults as registry

    if not isinstance(faults, list):
        return  # absent, or the structural pass already said it must be a list
    for index, item in enumerate(faults):
        if not isinstance(item, dict):
            continue  # the structural pass says it must be a mapping
        for path, message in registry.problems(item):
            doc.add(("faults", index) + path, message)


# ---------------------------------------------------------------------------- meaning of probe fields


def target_problem(value: str) -> str | None:
    """A node, router, external host or pod name (`name` or `namespace/name`)."""
    parts = value.split("/")
    if len(parts) > 2 or not all(names.is_dns_label(p) for p in parts):
        return (f"{value!r} is not a node, router, external host or pod name (a pod may be given as "
                "namespace/name)")
    return None


def address_problem(value: str) -> str | None:
    """An IPv4 address, a target (its address is meant), or service/NAME or service/NAMESPACE/NAME."""
    try:
        ipaddress.IPv4Address(value)
        return None
    except ValueError:
        pass
    if value.startswith("service/"):
        parts = value.split("/")[1:]
        if 1 <= len(parts) <= 2 and all(names.is_dns_label(p) for p in parts):
            return None
        return f"{value!r}: write service/NAME or service/NAMESPACE/NAME"
    return target_problem(value)


def _regex(doc: StrictDocument, loc: tuple, value: str | None, groups: int | None = None) -> None:
    if value is None:
        return
    try:
        compiled = re.compile(value)
    except re.error as exc:
        doc.add(loc, f"not a regular expression: {exc}")
        return
    if groups is not None and compiled.groups != groups:
        doc.add(loc, f"needs exactly {groups} group (in parentheses), has {compiled.groups}")


def _cidr(doc: StrictDocument, loc: tuple, value: str) -> None:
    try:
        ipaddress.IPv4Network(value)
    except ValueError as exc:
        doc.add(loc, f"not an IPv4 network (e.g. 10.244.2.0/24): {exc}")


def _port(doc: StrictDocument, loc: tuple, value: int) -> None:
    if not 1 <= value <= 65535:
        doc.add(loc, "must be a port number, 1-65535")


def route_protocol(value: str) -> int | None:
    """A route protocol's number, from its name (ROUTE_PROTOCOLS) or as a number 0-255; None if neither."""
    if value in ROUTE_PROTOCOLS:
        return ROUTE_PROTOCOLS[value]
    if value.isdigit() and int(value) <= 255:
        return int(value)
    return None


def _bounds(doc: StrictDocument, loc: tuple, b: _Bounds, least: int) -> None:
    """{min, max}: each at least `least`, and min not above max (a range nothing can be in passes nothing,
    or, for a max only, everything)."""
    for key in ("min", "max"):
        value = getattr(b, key)
        if value is not None and value < least:
            doc.add(loc + (key,), f"must be at least {least}")
    if b.min is not None and b.max is not None and b.min > b.max:
        doc.add(loc, f"min {b.min} is above max {b.max}: no count is in that range")


def _timeout(doc: StrictDocument, loc: tuple, value: float) -> None:
    if not 0 < value <= TIMEOUT_MAX:
        doc.add(loc, f"must be between 0 and {TIMEOUT_MAX:.0f} seconds")


def _target(doc: StrictDocument, loc: tuple, value: str | None) -> None:
    if value is not None and (problem := target_problem(value)):
        doc.add(loc, problem)


def _address(doc: StrictDocument, loc: tuple, value: str | None) -> None:
    if value is not None and (problem := address_problem(value)):
        doc.add(loc, problem)


def _argv(doc: StrictDocument, loc: tuple, argv: list[str]) -> None:
    if not argv or not argv[0]:
        doc.add(loc, "needs a command: argv: [COMMAND, ARG, ...] (run as given, never through a shell)")


def _features() -> dict[str, Any]:
    from topo import kernel

    return {"ipvs": kernel.IPVS, "dummy": kernel.DUMMY, "ipip": kernel.IPIP, "netem": kernel.NETEM}


FEATURES = _features()  # what `requires` may name: kernel features this project's CI kernel lacks
CHOICES = {"initially": ("fail", "pass", "any"), "protocol": ("tcp", "udp"), "expect": ("allowed", "blocked", "refused"),
           "family": ("any", "inet", "inet6"), "tool": ("iptables", "nft")}


def _choice(doc: StrictDocument, loc: tuple, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        doc.add(loc, f"must be one of {', '.join(options)}, got {value!r}")


def _check_probe(doc: StrictDocument, loc: tuple, kind: str, p: Any) -> None:
    """What pydantic cannot know: names, addresses, CIDRs, regular expressions, ranges, choices."""
    for key, options in CHOICES.items():
        if key != "initially" and hasattr(p, key):
            _choice(doc, loc + (key,), getattr(p, key), options)
    if kind in ("reach", "http", "iperf", "dns"):
        _target(doc, loc + ("from",), p.source)
    if kind in ("reach", "http", "iperf"):
        _address(doc, loc + ("to",), p.to)
        _port(doc, loc + ("port",), p.port)
    if kind in ("route", "bgp", "rule", "command"):
        _target(doc, loc + ("in",), p.on)
    if kind in ("reach", "http", "command"):
        _timeout(doc, loc + ("timeout",), p.timeout)
    if kind == "reach":
        _address(doc, loc + ("sourceIP",), p.source_ip)
    elif kind == "http":
        if not HTTP_PATH.match(p.path):
            doc.add(loc + ("path",), "must start with / and hold only visible ASCII characters (no spaces: "
                                     "write %20)")
        if p.host is not None and not HTTP_HOST.match(p.host):
            doc.add(loc + ("host",), f"{p.host!r} is not a Host header: a host name, optionally with :PORT")
        if not 100 <= p.status <= 599:
            doc.add(loc + ("status",), "must be an HTTP status code, 100-599")
        _regex(doc, loc + ("body",), p.body)
    elif kind == "dns":
        for i, value in enumerate(p.answer or []):
            _address(doc, loc + ("answer", i), value)
        if p.answer is None and p.resolves is None and p.queries is None:
            doc.add(loc, "says nothing to check: give answer, resolves or queries")
        if p.queries is not None:
            _bounds(doc, loc + ("queries",), p.queries, least=0)
    elif kind == "route":
        _cidr(doc, loc + ("to",), p.to)
        _address(doc, loc + ("via",), p.via)
        if p.proto is not None and route_protocol(p.proto) is None:
            doc.add(loc + ("proto",), f"{p.proto!r} is not a route protocol: a number 0-255 or one of "
                                      f"{', '.join(ROUTE_PROTOCOLS)}")
    elif kind == "bgp":
        _address(doc, loc + ("peer",), p.peer)
        for i, prefix in enumerate(p.prefixes):
            _cidr(doc, loc + ("prefixes", i), prefix)
    elif kind == "rule":
        _regex(doc, loc + ("match",), p.match)
        if p.chain is None and p.match is None:
            doc.add(loc, "needs a chain, a match, or both")
    elif kind == "link":
        if (p.dev is None) == (p.host_veth_of is None):
            doc.add(loc, "give either dev (with in) or hostVethOf (a pod: its node-side veth)")
        if p.dev is not None and p.on is None:
            doc.add(loc + ("in",), "missing: the node, router or pod holding the device")
        _target(doc, loc + ("in",), p.on)
        _target(doc, loc + ("hostVethOf",), p.host_veth_of)
    elif kind == "command":
        _argv(doc, loc + ("argv",), p.argv)
        if p.exit_code is not None and not 0 <= p.exit_code <= 255:
            doc.add(loc + ("exitCode",), "must be an exit status, 0-255")
        _regex(doc, loc + ("match",), p.match)
        _regex(doc, loc + ("notMatch",), p.not_match)
    elif kind == "iperf":
        if p.min_mbit is None and p.min_fraction is None:
            doc.add(loc, "needs minMbit, or minFraction with a baseline")
        if p.min_mbit is not None and not (math.isfinite(p.min_mbit) and p.min_mbit > 0):
            doc.add(loc + ("minMbit",), "must be a number of Mbit/s above 0")
        if p.min_fraction is not None and not (math.isfinite(p.min_fraction)
                                               and 0 < p.min_fraction <= IPERF_FRACTION_MAX):
            doc.add(loc + ("minFraction",), f"must be a fraction above 0 and at most {IPERF_FRACTION_MAX:g}")
        if p.min_fraction is not None and p.baseline is None:
            doc.add(loc + ("baseline",), "missing: minFraction is a fraction of a baseline path {from, to}")
        if p.baseline is not None:
            _target(doc, loc + ("baseline", "from"), p.baseline.source)
            _address(doc, loc + ("baseline", "to"), p.baseline.to)
        if not 0 < p.seconds <= 10:
            doc.add(loc + ("seconds",), "must be between 0 and 10 seconds")
        _port(doc, loc + ("port",), p.port)
    elif kind == "pods":
        if p.name is None and p.selector is None:
            doc.add(loc, "give a pod name or a label selector")
        if p.running.min is None or p.running.min < 1:
            doc.add(loc + ("running", "min"), "must be at least 1: a check must not pass on an empty lab")
        else:
            _bounds(doc, loc + ("running",), p.running, least=1)
        if p.containers is not None and p.containers < 1:
            doc.add(loc + ("containers",), "must be at least 1")
        if not names.is_dns_label(p.namespace):
            doc.add(loc + ("namespace",), f"{p.namespace!r} is not a namespace name")
    elif kind == "answer":
        _check_answer(doc, loc, p)


def _check_answer(doc: StrictDocument, loc: tuple, p: AnswerIn) -> None:
    if not ANSWER_KEY.match(p.key):
        doc.add(loc + ("key",), f"{p.key!r} is not an answer key: letters, digits, '-', '_' and '.'")
    value = p.value
    given = [name for name in ValueIn.model_fields if getattr(value, name) is not None]
    if len(given) != 1:
        shown = ", ".join(ValueIn.model_fields[n].alias or n for n in ValueIn.model_fields)
        doc.add(loc + ("value",), f"needs exactly one source of the true value ({shown})")
        return
    inner = getattr(value, given[0])
    alias = ValueIn.model_fields[given[0]].alias or given[0]
    where = loc + ("value", alias)
    if isinstance(inner, str):
        _target(doc, where, inner)
    elif isinstance(inner, DnsQueriesIn):
        _target(doc, where + ("from",), inner.source)
        _choice(doc, where + ("family",), inner.family, CHOICES["family"])
    else:
        _target(doc, where + ("in",), inner.on)
        if isinstance(inner, RouteViaIn):
            _cidr(doc, where + ("to",), inner.to)
        if isinstance(inner, CommandValueIn):
            if (inner.argv is None) == (inner.argvs is None):
                doc.add(where, "give argv (one command) or argvs (alternatives, the first that exits 0 counts)")
            given = [(("argv",), inner.argv)] if inner.argv is not None else []
            for key, argv in given + [(("argvs", i), a) for i, a in enumerate(inner.argvs or [])]:
                _argv(doc, where + key, argv)
            if inner.argvs is not None and not inner.argvs:
                doc.add(where + ("argvs",), "needs at least one command")
            _regex(doc, where + ("group",), inner.group, groups=1)
            _regex(doc, where + ("count",), inner.count)
            if inner.group is not None and inner.count is not None:
                doc.add(where, "give group or count, not both")
