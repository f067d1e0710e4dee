"""The `answer` probe: a learner's answer (answers.yaml) against the value the running lab gives now, and
the answer sources that compute that value (docs/exercises.md, "Answer sources"). Apart from grading/probes.py,
whose reachability, routing and rule probes do not need it."""
from __future__ import annotations

import re
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import yaml

from grading import schema
from grading.probe_base import Context, Result, sent_queries
from observe import targets
from topo import netns
from topo import schema as topo_schema
from topo.errors import SpecIssue, StateError


def answer(ctx: Context, p: schema.AnswerIn) -> Result:
    """The learner's answer (answers.yaml) against the value the running lab gives now. The detail never
    shows the true value: the grade report must not become the answer key."""
    if ctx.answers_file is None:
        return Result(False, "no answers file (write answers.yaml in the exercise folder, or give --answers)")
    try:
        text = ctx.answers_file.read_text()
    except FileNotFoundError:
        return Result(False, f"{ctx.answers_file} does not exist yet: write `{p.key}: YOUR ANSWER` into it")
    except (OSError, UnicodeDecodeError) as exc:
        return Result(False, f"{ctx.answers_file} cannot be read: {exc}")
    try:
        answers = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # file:line: what and a likely fix, as a spec's syntax errors are told
        return Result(False, topo_schema.yaml_error(exc, text).format(str(ctx.answers_file)))
    if answers is None:  # an empty file (or only comments): nothing answered yet
        answers = {}
    if not isinstance(answers, dict):  # a list or a scalar holds no names: say so, not "has no answer KEY"
        return Result(False, _not_a_mapping(ctx.answers_file, text, answers, p.key))
    if p.key not in answers or answers[p.key] is None:
        return Result(False, f"{ctx.answers_file.name} has no answer {p.key}")
    given = _norm(answers[p.key])
    if p.value.host_veth is not None and (suffix := IP_PEER_SUFFIX.search(given)):
        # `ip link` prints a veth as NAME@ifN, N being its peer's index: a note of iproute2's, not the name
        return Result(False, f"{p.key}: {given}: write the name without {suffix.group(0)} "
                             "(ip link adds @ifN: the peer's index)")
    if (p.value.pod_ip is not None or p.value.route_via is not None) and (port := _PORT.search(given)):
        # an address copied with its port (curl's /clientip prints ADDRESS:PORT): the port is the caller's own
        return Result(False, f"{p.key}: {given}: write the address without the port ({port.group(0)}, the "
                             "client's own)")
    if p.value.mac is not None and isinstance(answers[p.key], int):  # YAML 1.1 reads 12:34:56:10:20:30 in base 60
        return Result(False, f"{p.key}: YAML read it as the number {given}: put the MAC address in quotes")
    truth = _norm(true_value(ctx, p.value))
    if p.value.mac is not None:
        given, truth = _mac(given), _mac(truth)
    if given == truth:
        return Result(True, f"{p.key}: {given} is right")
    return Result(False, f"{p.key}: {given} is not what the lab says")


def _not_a_mapping(file: Path, text: str, answers: Any, key: str) -> str:
    """`file:line: ...` for an answers file whose top level is not a mapping, at the line where it starts,
    worded as a lab spec's top level is."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)  # parsed once already: this cannot fail
    line = node.start_mark.line + 1 if node is not None else None
    return SpecIssue("", f"the top level must be a mapping of answer names to values ({key}: YOUR ANSWER), "
                     f"not {topo_schema.describe(answers)}", line).format(str(file))


def _norm(value: Any) -> str:
    """Every answer is compared as trimmed, case-insensitive text; kinds with more than one spelling are
    normalised further by their own rule (a MAC), never globally, so no wrong answer of another kind passes."""
    return str(value).strip().lower()


IP_PEER_SUFFIX = re.compile(r"@if\d+\Z")
_PORT = re.compile(r"(?<=\d):\d{1,5}\Z")  # after an IPv4 address's last digit
_MAC = re.compile(r"[0-9a-f]{2}([-:])[0-9a-f]{2}(\1[0-9a-f]{2}){4}")


def _mac(text: str) -> str:
    """A MAC address in iproute2's form (lower case, colons): IEEE 802 writes the same address with hyphens,
    upper case (0A-58-0A-F4-01-01). Anything else is left as given, to be compared as text."""
    return text.replace("-", ":") if _MAC.fullmatch(text) else text


def true_value(ctx: Context, v: schema.ValueIn) -> Any:
    look = ctx.lookup
    if v.pause_pid is not None:
        return look.live(v.pause_pid).pause_pid
    if v.pod_ip is not None:
        return look.live(v.pod_ip).ip
    if v.host_veth is not None:
        return targets.host_veth(look, look.live(v.host_veth))
    if v.node_of is not None:
        return ctx.st.pods[look.live(v.node_of).key].node
    if v.mac is not None or v.mtu is not None:
        where = v.mac or v.mtu
        assert where is not None
        target = look.live(where.on)
        with netns.rtnl_in(target.netns) as rt:
            found = rt.link(where.dev)
        if found is None:
            raise StateError(f"{where.on} has no interface {where.dev}")
        return found.mac if v.mac is not None else found.mtu
    if v.pod_capacity is not None or v.free_pod_ips is not None:
        name = v.pod_capacity or v.free_pod_ips
        node = look.lab.node(look.live(name).name)  # type: ignore[arg-type]
        if v.pod_capacity is not None:
            return node.pod_capacity
        return node.pod_capacity - sum(1 for ps in ctx.st.pods.values() if ps.node == node.name)
    if v.max_pods is not None or v.subnet_free is not None:
        node = look.lab.node(look.live(v.max_pods or v.subnet_free).name)  # type: ignore[arg-type]
        if node.max_pods is None:
            raise StateError(f"{node.name} has no max pods or VPC subnet: this lab does not play aws-vpc")
        if v.max_pods is not None:
            return node.max_pods
        from kubelet.pods import ipamd_file

        books = ipamd_file(look.lab).read()
        return len(books.free(books.pod_subnet(books.nodes[node.name])))
    if v.route_via is not None:
        target = look.live(v.route_via.on)
        with netns.rtnl_in(target.netns) as rt:
            found = [r for r in rt.routes() if r.dst == IPv4Network(v.route_via.to) and r.gateway is not None]
        if not found:
            raise StateError(f"{v.route_via.on} has no route via a gateway to {v.route_via.to}")
        return found[0].gateway
    if v.dns_queries is not None:
        from observe import dnscount

        q = v.dns_queries
        pod = look.live(q.source)
        got = dnscount.count(ctx.st.name, pod.key, q.name, q.family)
        if not sent_queries(got):  # a dead DNS costs 0 queries: no answer to compare with
            raise StateError(f"the pod's DNS server logged no query from {pod.key}: is it reachable and running?")
        if q.sent:
            return len(sent_queries(got))
        if not got.cluster:  # every query a cache hit: the cluster DNS's count of it is no stable answer
            raise StateError(f"no query of {pod.key}'s lookup reached the cluster DNS (the node's cache answered)")
        return len(got.upstream if q.upstream else got.cluster)
    assert v.command is not None
    return command_value(look, v.command)


def command_value(look: targets.Lookup, cmd: schema.CommandValueIn) -> str | int:
    """A command's output as the answer source says. A count or a whole output needs the command to
    succeed (a failed command counts 0 lines, which is no answer); with `group`, the match is what counts
    (ping's exit status is 1 when no reply came, and "0 received" is its answer)."""
    target = look.live(cmd.on)
    shown = " ".join(cmd.argv) if cmd.argv is not None else " | ".join(" ".join(a) for a in cmd.argvs or [])
    failed = StateError(f"the lab's own answer could not be computed ({shown} in {cmd.on})")
    if cmd.argvs is not None:
        proc = next((pr for argv in cmd.argvs if (pr := look.run(target, argv)).returncode == 0), None)
        if proc is None:
            raise failed
    else:
        assert cmd.argv is not None
        proc = look.run(target, cmd.argv)
        if cmd.group is None and proc.returncode != 0:
            raise failed
    if cmd.count is not None:
        return sum(1 for line in proc.stdout.splitlines() if re.search(cmd.count, line))
    if cmd.group is None:
        return proc.stdout.strip()
    match = re.search(cmd.group, proc.stdout, re.MULTILINE)
    if match is None:
        raise failed
    return match.group(1)
