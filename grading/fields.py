"""What pydantic cannot know about an exercise's probe fields: names, addresses, CIDRs, regular expressions,
ranges and choices, each reported at its place in checks.yaml.

`target_problem` is also what a fault's target parameter is checked with (grading/faults.py), which is why
these checks stand on their own, below both the loader and the fault registry.
"""
from __future__ import annotations

import ipaddress
import math
import re
from typing import Any

from grading.schema import (ANSWER_KEY, HTTP_HOST, HTTP_PATH, IPERF_FRACTION_MAX, ROUTE_PROTOCOLS, TIMEOUT_MAX,
                            AnswerIn, CommandValueIn, DnsQueriesIn, RouteViaIn, ValueIn, _Bounds)
from topo import names
from topo.schema import StrictDocument

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
    if value.isascii() and value.isdigit() and int(value) <= 255:
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
    if kind in ("route", "bgp", "rule", "command", "lbmap"):
        _target(doc, loc + ("in",), p.on)
    if kind in ("reach", "http", "command"):
        _timeout(doc, loc + ("timeout",), p.timeout)
    if kind == "reach":
        _address(doc, loc + ("sourceIP",), p.source_ip)
    elif kind == "http":
        if not HTTP_PATH.fullmatch(p.path):
            doc.add(loc + ("path",), "must start with / and hold only visible ASCII characters (no spaces: "
                                     "write %20)")
        if p.host is not None and not HTTP_HOST.fullmatch(p.host):
            doc.add(loc + ("host",), f"{p.host!r} is not a Host header: a host name, optionally with :PORT")
        if not 100 <= p.status <= 599:
            doc.add(loc + ("status",), "must be an HTTP status code, 100-599")
        _regex(doc, loc + ("body",), p.body)
        if p.spread and not p.to.startswith("service/"):
            doc.add(loc + ("spread",), "needs to: service/NAME (the Service whose endpoints must all answer)")
    elif kind == "dns":
        for i, value in enumerate(p.answer or []):
            _address(doc, loc + ("answer", i), value)
        if p.answer is None and p.resolves is None and p.queries is None and p.sent is None:
            doc.add(loc, "says nothing to check: give answer, resolves, queries or sent")
        if p.queries is not None:
            _bounds(doc, loc + ("queries",), p.queries, least=0)
        if p.sent is not None:
            _bounds(doc, loc + ("sent",), p.sent, least=0)
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
    if not ANSWER_KEY.fullmatch(p.key):
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
        if inner.upstream and inner.sent:
            doc.add(where, "give upstream or sent, not both")
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
