"""A fresh lab's grade gives no answer away: the README asks, the values the checks grade wait in AFTER.md
(docs/exercises.md), so neither the table nor the `--json` details of `lab grade` on a lab nobody touched
may hold them. The values are read from the running lab by the grading engine's own answer sources, so the
test knows them without an answer key. Only the fresh grades are checked here; that the reference
solutions still reach full marks is test_exercises.py's and test_exercises_late.py's.

Defects this pins: 04's route check printed the route to add (`expected 10.244.2.0/24 via 192.168.1.11 dev
eth0`); 11's pin-egress check printed the body partner returned to worker (`body '192.168.1.10:63557'`,
egress_source); 16's fix-ndots checks printed the query counts (`10 queries at the cluster DNS`, the answer
lookup_queries).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from apiserver import state
from apiserver.desired import current_lab
from grading import answers, checks, probes
from observe import targets
from tests.conftest import require_tool
from tests.integration import test_exercises as base
from tests.integration.conftest import lab, leftovers, unique

pytestmark = pytest.mark.integration


def _truths(name: str, ex: checks.Exercise) -> dict[str, str]:
    """answer key -> the value the lab gives now (what answers.yaml must say), from the grading engine."""
    st = state.load(name)
    assert st is not None
    ctx = probes.Context(targets.Lookup(st, current_lab(st)), None)
    return {c.probe.key: str(answers.true_value(ctx, c.probe.value)) for c in ex.checks if c.kind == "answer"}


def _number(value: str) -> re.Pattern[str]:
    """A count standing alone: not a digit of an IP address, a path, a score "0/10" or a time."""
    return re.compile(rf"(?<![\w.:/-]){re.escape(value)}(?![\w.]|/\d)")


def _host_gw(truth: dict[str, str], ex: checks.Exercise) -> list[re.Pattern[str]]:
    mac = truth["node2-mac"]
    return [re.compile(r"via 192\.168\.1\.11"),  # the route to add: its next hop
            re.compile(r"10\.244\.2\.0/24 via"),
            re.compile("[-:]".join(re.escape(b) for b in mac.split(":")), re.IGNORECASE),
            re.compile(re.escape(truth["node1-onlink-prefix"]))]


def _egress_nat(truth: dict[str, str], ex: checks.Exercise) -> list[re.Pattern[str]]:
    egress = re.escape(truth["egress_source"])
    # node1's address may be named as a NodePort destination ("-> 192.168.1.10:30200/tcp"); what partner saw
    # (a client ADDRESS:PORT in a body, a source IP seen) is the answer
    return [re.compile(rf"'{egress}:\d+"), re.compile(rf"seen: {egress}\b"),
            re.compile(rf"{re.escape(truth['pod_source'])}(?![\d])")]


def _dns_storm(truth: dict[str, str], ex: checks.Exercise) -> list[re.Pattern[str]]:
    return [_number(truth["lookup_queries"]), _number(truth["search_domains"]),
            re.compile(r"\d+ quer(y|ies) (at|sent)"), re.compile(r"queries sent"), re.compile(r"expected at most")]


CASES: dict[str, Callable[[dict[str, str], checks.Exercise], list[re.Pattern[str]]]] = {
    "04-host-gw": _host_gw,
    "11-egress-nat": _egress_nat,
    "16-dns-storm": _dns_storm,
}


@pytest.mark.parametrize("slug", list(CASES))
def test_a_fresh_grade_shows_none_of_the_graded_values(slug: str, tmp_path: Path) -> None:
    if slug == "16-dns-storm":
        require_tool("dnsmasq")
    name = unique("exa")
    folder = base.copy_exercise(slug, tmp_path, name)
    try:
        lab("up", str(folder))
        ex = checks.load(folder)
        truth = _truths(name, ex)
        table = lab("grade", "--lab", name, check=False, timeout=180)
        assert table.returncode == 1, table.stderr
        report = json.loads(lab("grade", "--lab", name, "--json", check=False, timeout=180).stdout)
        texts = {"table": table.stdout.replace(str(folder), "FOLDER")}
        for c in report["checks"]:
            texts[c["name"]] = (c["detail"] + "\n" + c["hint"]).replace(str(folder), "FOLDER")
        leaks = [(where, pattern.pattern, text[max(0, m.start() - 60):m.end() + 20])
                 for pattern in CASES[slug](truth, ex) for where, text in texts.items()
                 if (m := pattern.search(text))]
        assert leaks == [], leaks
    finally:
        lab("down", name, check=False)
        assert leftovers(name) == {"netns": [], "state": []}
