"""Tests of the grading engine that need no root: checks.yaml validation (goldens), the reports, faults.

Invalid checks files live in checks/invalid/NN-what.yaml, each with NN-what.err holding the exact expected
lines. To rewrite the goldens after a deliberate message change, run with KUBENET_UPDATE_GOLDEN=1 and read
every diff before committing.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from apiserver import state
from grading import answers, checks, faults, grade, schema
from topo.errors import SpecError, StateError

ROOT = Path(__file__).resolve().parents[2]
CASES = Path(__file__).resolve().parent / "checks"
INVALID = sorted(p.name for p in (CASES / "invalid").glob("*.yaml"))
EXERCISES = sorted(p.parent for p in (ROOT / "labs").glob("[0-9][0-9]-*/checks.yaml"))


@pytest.mark.parametrize("name", INVALID)
def test_invalid_checks_fail_with_the_golden_message(name: str) -> None:
    path = CASES / "invalid" / name
    with pytest.raises(SpecError) as info:
        checks.parse(path.read_text(), name, path.parent)
    got = info.value.lines()
    golden = path.with_suffix(".err")
    if os.environ.get("KUBENET_UPDATE_GOLDEN") == "1":
        golden.write_text("\n".join(got) + "\n")
    assert got == golden.read_text().splitlines()
    assert all(line.startswith(f"{name}:") for line in got)


def test_the_invalid_cases_cover_every_rule_family() -> None:
    text = "\n".join((CASES / "invalid" / n).with_suffix(".err").read_text() for n in INVALID)
    for expected in ("is read by YAML as a boolean", "did you mean 'sourceIP'", "needs exactly one probe",
                     "is not a task of this exercise", "names are unique", "host bits set", "not a regular expression",
                     "unknown fault 'route-delet'", "missing; link-mtu", "must be at least 1", "YAML syntax error",
                     "is not a route protocol", "min 1 is above max 0", "is not a Host header", "visible ASCII",
                     "must be a number of Mbit/s above 0", "is not an earlier check", "give argv (one command) or argvs"):
        assert expected in text, expected


@pytest.mark.parametrize("folder", EXERCISES, ids=lambda p: p.name)
def test_every_bundled_exercise_loads(folder: Path) -> None:
    ex = checks.load(folder)
    assert ex.checks and ex.max_points > 0
    assert (folder / "lab.yaml").is_file() and (folder / "README.md").is_file()
    tasks = {t.id for t in ex.tasks}
    assert tasks == {c.task for c in ex.checks}, "every task has a check, every check a task"
    assert any(c.initially in ("fail", "any") and c.points > 0 for c in ex.checks)
    # A guard (true on the fresh lab) is worth nothing: a lab nobody touched scores 0.
    assert [c.name for c in ex.checks if c.initially == "pass" and c.points] == []
    # The numbers the checks grade are not in the README: they wait in AFTER.md, which lab grade points to.
    assert ex.after_file.is_file()
    assert "precise truth" not in (folder / "README.md").read_text()


def test_the_first_six_exercises_exist_in_order() -> None:
    slugs = [f.name for f in EXERCISES]
    for prefix in ("01-", "02-", "03-", "04-", "05-", "06-"):
        assert any(s.startswith(prefix) for s in slugs), prefix


def test_defaults_and_aliases() -> None:
    text = (CASES / "invalid" / "02-unknown-field.yaml").read_text().replace("sourceIp", "sourceIP")
    ex = checks.parse(text, "x.yaml", CASES)
    check = ex.checks[0]
    assert (check.kind, check.points, check.initially, check.wait) == ("reach", 1, "fail", None)
    assert (check.probe.source, check.probe.protocol, check.probe.expect, check.probe.source_ip) == \
        ("web-1", "tcp", "allowed", "web-1")


def test_a_folder_without_checks_is_no_exercise(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        checks.load(tmp_path, "mine")
    assert info.value.lines() == [f"mine/checks.yaml: no checks.yaml here: {tmp_path} is not a graded exercise "
                                  "(see docs/exercises.md)"]


# ------------------------------------------------------------------ reports


def _report() -> grade.Report:
    ex = checks.load(ROOT / "labs" / "04-host-gw")
    by_name = {c.name: c for c in ex.checks}
    outcomes = [grade.Outcome(by_name["route-back"], False, "node1: routes to 10.244.2.0/24: none", 0.01),
                grade.Outcome(by_name["node2-mac"], True, "node2-mac: aa is right", 0.002, 1)]
    return grade.Report(ex, "ex04", outcomes, 0.5)


def test_the_table_shows_results_hints_and_the_score() -> None:
    text = grade.render(_report())
    lines = text.splitlines()
    assert lines[0] == "04-host-gw: host-gw, and why it needs L2 (lab ex04)"
    assert lines[2].split() == ["TASK", "CHECK", "POINTS"]
    assert lines[3].split()[:4] == ["FAIL", "restore-route", "route-back", "0/2"]
    assert "      why:  node1: routes to 10.244.2.0/24: none" in lines
    assert any(line.startswith("      hint: lab exec node1 -- ip route") for line in lines)
    assert any(line.split()[:4] == ["PASS", "next-hop-mac", "node2-mac", "2/2"] for line in lines)
    assert lines[-2] == "to do: restore-route (put node1's route to node2's pods back)"
    assert lines[-1] == "score 2/4: 1 of 2 checks pass (0.5 s)"


def test_json_and_exit_code() -> None:
    report = _report()
    data = report.to_json()
    assert (data["score"], data["maxScore"], data["passed"], data["total"]) == (2, 4, 1, 2)
    assert data["checks"][0]["hint"] and not data["checks"][1]["hint"]
    assert report.exit_code == 1
    report.outcomes = report.outcomes[1:]
    assert report.exit_code == 0


def test_junit_has_one_testcase_per_check_and_the_failures() -> None:
    root = ET.fromstring(grade.junit(_report()).split("\n", 1)[1])
    suite = root.find("testsuite")
    assert suite is not None and suite.get("name") == "04-host-gw"
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
    cases = suite.findall("testcase")
    assert [c.get("classname") for c in cases] == ["04-host-gw.restore-route", "04-host-gw.next-hop-mac"]
    failure = cases[0].find("failure")
    assert failure is not None and failure.get("message") == "node1: routes to 10.244.2.0/24: none"
    assert "hint:" in (failure.text or "")
    assert cases[1].find("failure") is None


def test_a_check_that_raises_fails_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    ex = checks.load(ROOT / "labs" / "04-host-gw")

    def boom(ctx, probe):
        raise StateError("pod default/web-1 is not running")

    monkeypatch.setitem(grade.probes.RUNNERS, "route", boom)
    outcome = grade.run_check(None, ex.checks[0])  # type: ignore[arg-type]
    assert (outcome.passed, outcome.detail) == (False, "pod default/web-1 is not running")


def test_wait_retries_until_the_check_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    ex = checks.load(ROOT / "labs" / "06-bgp-tor")
    waiting = next(c for c in ex.checks if c.wait)
    calls = []

    def flaky(ctx, probe):
        calls.append(1)
        return grade.probes.Result(len(calls) >= 3, f"attempt {len(calls)}")

    monkeypatch.setattr(grade, "RETRY_INTERVAL", 0.001)
    monkeypatch.setitem(grade.probes.RUNNERS, waiting.kind, flaky)
    outcome = grade.run_check(None, waiting)  # type: ignore[arg-type]
    assert (outcome.passed, outcome.attempts, outcome.detail) == (True, 3, "attempt 3")


class _FakeClock:
    """time.monotonic and time.sleep for grade.py: sleeping moves the clock, so waits are counted, not waited."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_fresh_lab_waits_once_for_convergence_not_once_per_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercise 10's five http checks have `wait: 2`; on the fresh lab each retried its refused connection
    for its own 2 s, 8.8 s of a grade docs/grading.md says takes 0.2-3 s. Grading never changes the lab,
    so the wait counts from the start of grading: the later checks get the one attempt they need."""
    from apiserver import desired

    folder = ROOT / "labs" / "10-nodeport-ingress"
    st = state.LabState(name="unit-wait", phase="up", pid=1, spec_file=None, spec_text="", exercise=str(folder))
    clock = _FakeClock()
    monkeypatch.setattr(grade, "time", clock)
    monkeypatch.setattr(grade.state, "resolve", lambda name: st)
    monkeypatch.setattr(desired, "current_lab", lambda st: None)
    monkeypatch.setattr(grade.targets, "Lookup", lambda st, lab: None)
    refused = lambda ctx, probe: grade.probes.Result(False, "Connection refused")  # noqa: E731
    for kind in ("http", "answer"):
        monkeypatch.setitem(grade.probes.RUNNERS, kind, refused)
    report = grade.grade("unit-wait")
    waiting = [o for o in report.outcomes if o.check.wait]
    assert len(waiting) == 5 and max(o.check.wait or 0 for o in waiting) == 2
    assert waiting[0].attempts > 1  # the first still retries for the whole wait: a fix may be converging
    assert [o.attempts for o in waiting[1:]] == [1, 1, 1, 1]
    assert report.seconds <= 2 + grade.RETRY_INTERVAL  # on the fake clock: the longest wait, not their sum


# ------------------------------------------------------------------ faults


def test_fault_arguments_from_the_command_line() -> None:
    assert faults.parse_args("link-mtu", ["in=node2", "mtu=1400"]) == {"fault": "link-mtu", "in": "node2", "mtu": 1400}
    fault, params = faults.normalized({"fault": "link-mtu", "in": "node2", "mtu": 1400})
    assert (fault.name, params) == ("link-mtu", {"in": "node2", "dev": "eth0", "mtu": 1400})
    with pytest.raises(StateError, match="^unknown fault 'link-mtuu' \\(did you mean 'link-mtu'\\?\\)"):
        faults.normalized(faults.parse_args("link-mtuu", []))  # not "fault link-mtuu: fault: unknown fault ..."
    with pytest.raises(StateError, match="^unknown fault 'label\\\\n' \\(did you mean 'label'\\?\\)$"):
        faults.normalized(faults.parse_args("label\n", []))  # on one line: the name is quoted
    with pytest.raises(StateError, match="is not KEY=VALUE"):
        faults.parse_args("link-mtu", ["node2"])


def test_every_fault_is_listed_with_its_parameters() -> None:
    text = faults.describe()
    for name in ("route-delete", "link-mtu", "link-down", "fdb-flush", "bgpd-stop", "rule-delete", "ndots",
                 "label", "veth-detach"):
        assert name in faults.FAULTS and f"{name} " in text


def _seed_state() -> state.LabState:
    text = (ROOT / "labs" / "00-seed" / "lab.yaml").read_text().replace("name: seed", "name: unit-faults")
    st = state.LabState(name="unit-faults", phase="up", pid=1, spec_file=None, spec_text=text)
    for i, (key, node) in enumerate((("default/node1-pod1", "node1"), ("default/node1-pod2", "node1"),
                                     ("default/node2-pod1", "node2"), ("kube-system/coredns", "node2"))):
        labels = {"app": "web"} if key.startswith("default/") else {"k8s-app": "kube-dns"}
        st.pods[key] = state.PodState(node=node, ip=f"10.244.{1 + (node == 'node2')}.{2 + i}", netns="x",
                                      pause_pid=0, labels=labels)
    return st


def test_random_faults_are_reproducible_from_the_seed() -> None:
    st = _seed_state()
    first = faults.choose(st, seed=7, count=3)
    assert first == faults.choose(st, seed=7, count=3)
    assert len({yaml.safe_dump(f) for f in first}) == 3
    assert all(not faults.problems(f) for f in first)
    picks = {yaml.safe_dump(faults.choose(st, seed=s)[0]) for s in range(40)}
    assert len(picks) > 5  # the seed really chooses
    pool = [f for s in range(200) for f in faults.choose(st, seed=s)]
    assert not any("kube-system" in str(f.get("pod", "")) + str(f.get("in", "")) for f in pool)
    assert {"fault": "label", "pod": "default/node1-pod1", "key": "app", "value": "wbe"} in pool
    assert not any(f["fault"] in ("fdb-flush", "bgpd-stop") for f in pool)  # host-gw lab, no BGP


@pytest.mark.parametrize("seed,told", [
    (None, "an earlier fdb-flush there emptied it (lab status lists it)"),
    (23, "they were deleted already (by a fault, or by hand)")])  # a random one stays a puzzle
def test_a_second_fdb_flush_says_the_fdb_is_empty_not_that_the_backend_is_wrong(
        monkeypatch: pytest.MonkeyPatch, seed: int | None, told: str) -> None:
    """`lab break fdb-flush in=node1` run twice on a VXLAN lab answered "is the lab's backend vxlan, and does
    it have another node?" the second time. Like a second route-delete it is refused (nothing is left to
    break, nothing is recorded), with the state it found."""
    from apiserver.spec import parse_spec_text

    lookup = _FakeLookup()  # `bridge fdb show` prints nothing: the entries are gone
    vxlan = parse_spec_text((ROOT / "labs" / "05-vxlan-mtu" / "lab.yaml").read_text())  # two nodes
    lookup.lab = vxlan  # type: ignore[attr-defined]
    fault, params = faults.normalized({"fault": "fdb-flush", "in": "node1"})
    earlier = faults.Applied("fdb-flush", dict(params), "flushed 1 FDB entries of flannel.1 on node1", seed=seed)
    monkeypatch.setattr(faults, "recorded", lambda name: [earlier])
    with pytest.raises(StateError) as info:
        fault.apply(lookup, params)  # type: ignore[arg-type]
    assert str(info.value) == f"flannel.1 on node1 holds no FDB entries left to flush: {told}; nothing was done"


def test_random_fault_items_are_validated() -> None:
    from grading import faults

    assert faults.problems({"random": 2, "pool": ["route-delete", "ndots"]}) == []
    found = dict(faults.problems({"random": 9, "pool": ["ndost"], "seed": 1}))
    assert "1 to 5" in found[("random",)]
    assert "did you mean 'ndots'" in found[("pool", 0)]
    assert "unknown key 'seed'" in found[("seed",)]


# ------------------------------------------------------------------ honest passes (no vacuous ones)


def test_only_naming_no_check_or_task_is_an_error_with_a_suggestion() -> None:
    ex = checks.load(ROOT / "labs" / "04-host-gw")
    with pytest.raises(StateError, match="no check or task 'route-bak' \\(did you mean 'route-back'\\?\\)"):
        grade.selected(ex, ["route-bak"])
    assert grade.selected(ex, ["restore-route"]) == {"route-back", "web-1-reaches-web-2", "reply-path-was-fine"}
    assert grade.selected(ex, None) == {c.name for c in ex.checks}


def test_only_brings_the_guards_a_check_needs() -> None:
    ex = checks.load(ROOT / "labs" / "12-network-policy")
    assert grade.selected(ex, ["web-still-reaches-api"]) == {
        "web-still-reaches-api", "intruder-cannot-reach-api", "intruder-network-works"}


def test_an_empty_or_all_skipped_report_exits_2() -> None:
    report = _report()
    report.outcomes = []
    assert (report.passed, report.exit_code) == (False, 2)
    check = report.exercise.checks[0]
    report.outcomes = [grade.Outcome(check, False, "skipped: this kernel lacks IPVS", 0.0, 0, skipped=True)]
    assert (report.passed, report.exit_code) == (False, 2)


def test_a_check_counts_only_when_its_guards_pass() -> None:
    ex = checks.load(ROOT / "labs" / "12-network-policy")
    by_name = {c.name: c for c in ex.checks}
    needing = by_name["intruder-cannot-reach-db"]
    guard = by_name["intruder-network-works"]
    failed = {guard.name: grade.Outcome(guard, False, "the cluster DNS logged no query", 0.1)}
    outcome = grade._unmet(needing, failed)
    assert outcome is not None and not outcome.passed and not outcome.skipped
    assert "intruder-network-works" in outcome.detail and "no query" in outcome.detail
    skipped = {guard.name: grade.Outcome(guard, False, "skipped", 0.0, 0, skipped=True)}
    assert grade._unmet(needing, skipped).skipped  # type: ignore[union-attr]
    assert grade._unmet(needing, {guard.name: grade.Outcome(guard, True, "ok", 0.1)}) is None


def test_a_passing_report_points_to_after_md(tmp_path: Path) -> None:
    report = _report()
    assert report.after is None and "AFTER.md" not in grade.render(report)  # a check fails
    report.outcomes = report.outcomes[1:]
    assert report.after == ROOT / "labs" / "04-host-gw" / "AFTER.md"
    assert "now read " in grade.render(report).splitlines()[-1]
    assert report.to_json()["after"].endswith("04-host-gw/AFTER.md")


class _FakeLookup:
    """Enough of targets.Lookup for probes that need no kernel: every name is a live pod."""

    def __init__(self, runs: dict[str, tuple[int, str]] | None = None) -> None:
        self.runs = runs or {}
        self.st = state.LabState(name="unit", phase="up", pid=1, spec_file=None, spec_text="")

    def live(self, name: str):
        from ipaddress import IPv4Address

        from observe.targets import Target

        return Target(name, "pod", "x", 1, f"default/{name}", IPv4Address("10.244.1.2"))

    def address(self, value: str):
        from ipaddress import IPv4Address

        return IPv4Address("10.244.1.3")

    def run(self, target, argv, timeout: float = 10.0):
        import subprocess

        code, out = self.runs.get(argv[0], (0, ""))
        return subprocess.CompletedProcess(argv, code, out)


def _probe(kind: str, **fields):
    model = schema.PROBES[kind].model_validate(fields)
    return model


@pytest.mark.parametrize("detail,expect,passes", [
    ("timeout", "blocked", True), ("refused", "blocked", False), ("Network is unreachable", "blocked", False),
    ("refused", "refused", True), ("timeout", "refused", False), ("No route to host", "refused", False)])
def test_blocked_means_dropped_and_refused_only_when_asked(monkeypatch: pytest.MonkeyPatch, detail: str,
                                                          expect: str, passes: bool) -> None:
    from observe.probe import ProbeResult

    monkeypatch.setattr(grade.probes, "_connect", lambda st, src, ip, port, proto, timeout:
                        ProbeResult(src, ip, port, proto, False, detail))
    ctx = grade.probes.Context(_FakeLookup(), None)  # type: ignore[arg-type]
    result = grade.probes.reach(ctx, _probe("reach", **{"from": "a", "to": "b", "port": 80, "expect": expect}))
    assert result.passed is passes, result.detail


@pytest.mark.parametrize("fields", [{"resolves": False}, {"queries": {"max": 8}}, {"answer": []}])
def test_a_dns_check_fails_when_the_cluster_dns_saw_nothing(monkeypatch: pytest.MonkeyPatch, fields: dict) -> None:
    from observe import dnscount

    monkeypatch.setattr(dnscount, "count", lambda lab, pod, name, family, **_: dnscount.Count(
        pod, "10.244.1.2", name, "", answer=[], cluster=[], upstream=[]))
    ctx = grade.probes.Context(_FakeLookup(), None)  # type: ignore[arg-type]
    result = grade.probes.dns(ctx, _probe("dns", **{"from": "a", "name": "nothing.example.", **fields}))
    assert not result.passed and "logged no query" in result.detail


def test_a_command_that_fails_proves_nothing_even_with_only_notmatch() -> None:
    ctx = grade.probes.Context(_FakeLookup({"false": (1, "")}), None)  # type: ignore[arg-type]
    result = grade.probes.command(ctx, _probe("command", **{"in": "node1", "argv": ["false"], "notMatch": "x"}))
    assert not result.passed and "expected exit 0" in result.detail
    fine = grade.probes.command(ctx, _probe("command", **{"in": "node1", "argv": ["false"], "exitCode": 1}))
    assert fine.passed


def test_a_notmatch_failure_quotes_the_line_that_matched() -> None:
    """The why line quoted the output's first 120 characters: a healthy port, cut at "hairpin", while the
    port with hairpin off, further down, was not shown (the capstone's node2-ports-as-plugged)."""
    out = ("5: veth03b78ecf@eth0: <BROADCAST,UP> mtu 1450 master cni0 state forwarding priority 32 cost 2 hairpin on\n"
           "7: veth9e92a1bb@eth0: <BROADCAST,UP> mtu 1450 master cni0 state forwarding priority 32 cost 2 hairpin off\n")
    ctx = grade.probes.Context(_FakeLookup({"bridge": (0, out)}), None)  # type: ignore[arg-type]
    result = grade.probes.command(ctx, _probe("command", **{"in": "node2", "argv": ["bridge", "-d", "link"],
                                                            "match": "master cni0", "notMatch": "hairpin off"}))
    assert not result.passed and "veth9e92a1bb@eth0" in result.detail and "veth03b78ecf" not in result.detail
    assert result.detail.endswith("hairpin off' matches 'hairpin off', which it must not"), result.detail


def test_an_answer_from_alternative_commands_takes_the_first_that_succeeds() -> None:
    look = _FakeLookup({"nft": (1, "Error: No such file or directory"),
                        "iptables-legacy-save": (0, "-A KUBE-SERVICES x -j KUBE-SVC-A\n-A KUBE-SERVICES y -j KUBE-SVC-B\n")})
    value = schema.CommandValueIn.model_validate({"in": "node1", "argvs": [["nft", "list"], ["iptables-legacy-save"]],
                                                  "count": "-j KUBE-SVC-"})
    assert answers.command_value(look, value) == 2  # type: ignore[arg-type]
    failing = schema.CommandValueIn.model_validate({"in": "node1", "argv": ["nft", "list"], "count": "goto"})
    with pytest.raises(StateError, match="could not be computed"):
        answers.command_value(look, failing)  # type: ignore[arg-type]  # a failed command is no 0


# ------------------------------------------------------------------ fault and CLI input


def test_fault_inputs_are_checked_like_a_spec() -> None:
    found = dict(faults.problems({"fault": "label", "pod": "web-1", "key": "bad key!", "value": "-x"}))
    assert "label key 'bad key!' is not valid" in found[("key",)]
    assert "label value '-x' is not valid" in found[("value",)]
    assert faults.problems({"fault": "label", "pod": "web-1", "key": "app.kubernetes.io/name", "value": ""}) == []
    with pytest.raises(StateError) as info:
        faults.parse_args("link-mtu", ["node2"])
    assert str(info.value) == "'node2' is not KEY=VALUE"  # the CLI adds the one "lab break:" prefix


def test_a_fault_in_effect_is_not_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercise 04 deletes node1's route to 10.244.2.0/24 at `lab up`; `lab break --random` drew that same
    route-delete for some seeds and failed with "RTNETLINK answers: No such process"."""
    st = _seed_state()
    deleted = {"fault": "route-delete", "in": "node1", "to": "10.244.2.0/24"}
    everything = faults.choose(st, seed=1, count=1000)
    assert deleted in everything
    monkeypatch.setattr(faults, "recorded", lambda name: [
        faults.Applied("route-delete", faults.normalized(deleted)[1], "deleted the route")])
    left = faults.choose(st, seed=1, count=1000)
    assert deleted not in left and len(left) == len(everything) - 1


def test_the_capstone_can_draw_every_kind_its_test_repairs() -> None:
    """tests/integration/test_exercises_late.py applies one fault of each kind the capstone lab can draw;
    this pins that set, so a new kind of fault gets a repair in the reference solution too."""
    text = (ROOT / "labs" / "13-capstone" / "lab.yaml").read_text()
    st = state.LabState(name="unit-capstone", phase="up", pid=1, spec_file=None, spec_text=text)
    for key, node, app in (("default/web-1", "node1", "web"), ("default/web-2", "node2", "web"),
                           ("default/client-1", "node1", "client"), ("default/client-2", "node2", "client")):
        st.pods[key] = state.PodState(node=node, ip="10.244.1.2", netns="x", pause_pid=0, labels={"app": app})
    lookup = faults.lookup_of(st)
    kinds = {f.name for f in faults.FAULTS.values() if f.candidates(lookup.lab, st)}
    assert kinds == {"route-delete", "link-mtu", "link-down", "fdb-flush", "rule-delete", "label", "veth-detach"}


@pytest.mark.parametrize("argv,message", [
    (["break", "--random", "--count", "-1"], "--count must be 1 to 5"),
    (["break", "--random", "--count", "9"], "--count must be 1 to 5"),
    (["break", "link-down", "--count", "2"], "--count goes with --random"),
    (["grade", "--junit", "/nonexistent-dir/x.xml"], "cannot write there")])
def test_bad_break_and_grade_arguments_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    from lab import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count(f"lab {argv[0]}:") == 1


def test_a_broken_answers_file_is_told_as_a_spec_error_is(tmp_path) -> None:
    """file:line, what YAML found and a likely fix, on one line (it was PyYAML's own multi-part message, with
    `in "<unicode string>"` and a caret, cut at 120 characters)."""
    from grading import probes
    from grading.probe_base import Context

    answers = tmp_path / "answers.yaml"
    answers.write_text("web-1-host-veth: veth1\ndefault_queries: [\n")
    check = schema.AnswerIn.model_validate({"key": "default_queries", "value": {"podIP": "x"}})
    result = probes.answer(Context(None, answers), check)
    assert not result.passed
    assert result.detail == (f"{answers}:3: YAML syntax error: expected the node content, but found '<stream end>': "
                             "a quote or bracket is not closed; close it")


@pytest.mark.parametrize("text,line,what", [
    ("- ingress_source: 10.244.1.5\n", 1, "a list"),
    ("# my answers\n\n[10.244.1.5]\n", 3, "a list"),
    ("10.244.1.5\n", 1, "the string '10.244.1.5'"),
    ("false\n", 1, "a boolean")])
def test_an_answers_file_that_is_no_mapping_says_so_on_one_line(tmp_path: Path, text: str, line: int,
                                                                 what: str) -> None:
    """A list (or a scalar) at the top level of answers.yaml was reported as "has no answer KEY" for every
    answer: file:line and what the top level must be, as a spec's top level is told."""
    from grading import probes
    from grading.probe_base import Context

    answers = tmp_path / "answers.yaml"
    answers.write_text(text)
    check = schema.AnswerIn.model_validate({"key": "ingress_source", "value": {"podIP": "x"}})
    result = probes.answer(Context(None, answers), check)  # type: ignore[arg-type]
    assert not result.passed
    assert result.detail == (f"{answers}:{line}: the top level must be a mapping of answer names to values "
                             f"(ingress_source: YOUR ANSWER), not {what}")


def test_an_answers_file_given_but_missing_is_a_usage_error(tmp_path: Path) -> None:
    """`lab grade --answers FILE` with no FILE graded every answer check as "does not exist yet" (exit 1): a
    file named on the command line that is not there is a usage error (exit 2), before any grading. The
    default answers.yaml may be missing: that is "not answered yet", a failing check."""
    missing = tmp_path / "answrs.yaml"
    with pytest.raises(StateError) as info:
        grade.grade("unit-no-such-lab", answers=str(missing))
    assert str(info.value) == (f"--answers {missing}: no such file (leave --answers out to use answers.yaml in "
                               "the exercise folder)")
    assert info.value.exit_code == 2
    with pytest.raises(StateError, match=f"^--answers {tmp_path}: not a file"):
        grade.grade("unit-no-such-lab", answers=str(tmp_path))
    assert grade.given_answers(None) is None  # the default is the exercise's answers.yaml, checked by the probe


# ------------------------------------------------------------------ what the why lines say


@pytest.mark.parametrize("detail,word", [("Network is unreachable", "unreachable"), ("No route to host", "unreachable"),
                                         ("Operation not permitted", "failed"), ("timeout", "blocked"),
                                         ("refused", "refused")])
def test_a_reach_that_is_not_dropped_is_not_called_blocked(monkeypatch: pytest.MonkeyPatch, detail: str,
                                                          word: str) -> None:
    """docs/exercises.md: "blocked" means dropped (a timeout). A source whose eth0 is down got
    `... blocked (Network is unreachable)`: the why line must say what happened."""
    from observe.probe import ProbeResult

    monkeypatch.setattr(grade.probes, "_connect", lambda st, src, ip, port, proto, timeout:
                        ProbeResult(src, ip, port, proto, False, detail))
    ctx = grade.probes.Context(_FakeLookup(), None)  # type: ignore[arg-type]
    result = grade.probes.reach(ctx, _probe("reach", **{"from": "a", "to": "b", "port": 80}))
    assert not result.passed
    assert f"/tcp: {word}" in result.detail and (word == "blocked") is ("blocked" in result.detail), result.detail
    if detail not in ("timeout", "refused"):
        assert f"{word} ({detail})" in result.detail


class _FakeLink:
    def __init__(self, index: int, name: str, master: int | None = None, kind: str = "veth", mac: str = "") -> None:
        self.index, self.name, self.master, self.kind, self.mac = index, name, master, kind, mac
        self.mtu, self.up = 1500, True


class _FakeRtnl:
    def __init__(self, links: list[_FakeLink]) -> None:
        self._links = links

    def __enter__(self) -> "_FakeRtnl":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def links(self) -> list[_FakeLink]:
        return self._links

    def link(self, name: str) -> _FakeLink | None:
        return next((l for l in self._links if l.name == name), None)


def test_a_link_without_master_says_none_not_python_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """02's grade said `master none, ...; wrong: master None (expected cni0), hairpin None (expected on)`."""
    monkeypatch.setattr(grade.probes.netns, "rtnl_in", lambda ns: _FakeRtnl([_FakeLink(1, "veth1"),
                                                                             _FakeLink(2, "cni0", kind="bridge")]))
    ctx = grade.probes.Context(_FakeLookup(), None)  # type: ignore[arg-type]
    result = grade.probes.link(ctx, _probe("link", **{"in": "node1", "dev": "veth1", "master": "cni0",
                                                      "hairpin": True}))
    assert not result.passed and "None" not in result.detail, result.detail
    assert result.detail.endswith("wrong: master none (expected cni0), hairpin not a bridge port (expected on)")


def _answer(tmp_path: Path, text: str, key: str, value: dict) -> grade.probes.Result:
    answers = tmp_path / "answers.yaml"
    answers.write_text(text)
    ctx = grade.probes.Context(_FakeLookup(), answers)  # type: ignore[arg-type]
    return grade.probes.answer(ctx, schema.AnswerIn.model_validate({"key": key, "value": value}))


@pytest.mark.parametrize("given", ["0a:58:0a:f4:01:01", "0A-58-0A-F4-01-01", "0A:58:0a:F4:01:01",
                                   "'0a-58-0a-f4-01-01'"])
def test_a_mac_answer_is_compared_as_a_mac_whatever_its_case_and_separator(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, given: str) -> None:
    """`web-1-gateway-mac: 0A-58-0A-F4-01-01` (the form Windows and many vendors print) was "not what the
    lab says"; only the separator and the case differ (IEEE 802 writes hyphens, iproute2 colons)."""
    monkeypatch.setattr(grade.probes.netns, "rtnl_in", lambda ns: _FakeRtnl(
        [_FakeLink(3, "cni0", kind="bridge", mac="0a:58:0a:f4:01:01")]))
    result = _answer(tmp_path, f"gw: {given}\n", "gw", {"mac": {"in": "node1", "dev": "cni0"}})
    assert result.passed, result.detail


@pytest.mark.parametrize("given", ["0a:58:0a:f4:01:02", "0a580af40101", "0a:58:0a:f4:01", "cni0"])
def test_a_wrong_mac_answer_still_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, given: str) -> None:
    monkeypatch.setattr(grade.probes.netns, "rtnl_in", lambda ns: _FakeRtnl(
        [_FakeLink(3, "cni0", kind="bridge", mac="0a:58:0a:f4:01:01")]))
    result = _answer(tmp_path, f"gw: '{given}'\n", "gw", {"mac": {"in": "node1", "dev": "cni0"}})
    assert not result.passed and "0a:58:0a:f4:01:01" not in result.detail, result.detail


@pytest.mark.parametrize("given", ["10.244.1.2:39322", "10.244.1.9:39322"])
def test_an_address_answer_written_with_a_port_says_to_drop_the_port(tmp_path: Path, given: str) -> None:
    """`seen_source: 10.244.1.2:39322` (07: curl's /clientip prints ADDRESS:PORT) was only "not what the lab
    says"; the port is the client's ephemeral one, not part of the answer. Said whether or not the address is
    right, so the hint tells nothing about it."""
    result = _answer(tmp_path, f"seen_source: {given}\n", "seen_source", {"podIP": "client"})
    assert not result.passed and result.detail == (
        f"seen_source: {given}: write the address without the port (:39322, the client's own)"), result.detail


def test_a_veth_answer_written_as_ip_prints_it_says_to_drop_the_suffix(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """`web-1-host-veth: vethf3c2e917@if2` (as `ip link` prints it) was "not what the lab says": the @ifN is
    iproute2's note of the peer's interface index, not part of the name."""
    monkeypatch.setattr(grade.probes.targets, "host_veth", lambda look, pod: "vethf3c2e917")
    result = _answer(tmp_path, "v: vethf3c2e917@if2\n", "v", {"hostVeth": "web-1"})
    assert not result.passed
    assert result.detail == "v: vethf3c2e917@if2: write the name without @if2 (ip link adds @ifN: the peer's index)"
    assert _answer(tmp_path, "v: vethf3c2e917\n", "v", {"hostVeth": "web-1"}).passed
    assert not _answer(tmp_path, "v: vethf3c2e91\n", "v", {"hostVeth": "web-1"}).passed


def test_a_mac_answer_yaml_reads_as_a_number_says_to_quote_it(tmp_path: Path) -> None:
    """YAML 1.1 reads an unquoted 12:34:56:10:20:30 as a base-60 integer: say so, not "not what the lab says"."""
    result = _answer(tmp_path, "gw: 12:34:56:10:20:30\n", "gw", {"mac": {"in": "node1", "dev": "cni0"}})
    assert result.detail == "gw: YAML read it as the number 9783973230: put the MAC address in quotes"
