"""`lab grade`: run an exercise's checks against the running lab and report a score.

The running lab remembers the exercise folder it was built from (`lab up labs/05-vxlan`), so `lab grade`
needs no argument. The report is a table for people (pass/fail per check, the hint of each failure, the
score), JSON for scripts, and JUnit XML for autograders; the exit code says it all for CI systems such as
GitHub Classroom: 0 every check passes, 1 some check fails, 2 the lab or the exercise cannot be graded
(no lab running, a bad checks.yaml, a lab not built from an exercise, an --only naming no check or task,
an --answers file that is not there, nothing left to count).

Checks run in file order; a check with `wait` is retried until it passes or `wait` seconds after grading
started (routing protocols take a moment to converge after a fix; the lab converges for every check at
once, so the waits of a fresh lab's failing checks overlap instead of adding up); a check that `needs`
guards fails without running when one of them fails. Once every check passes, the report points to the
exercise's AFTER.md. Grading never changes the lab.
"""
from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apiserver import state
from grading import checks, probes
from grading.fields import FEATURES
from grading.schema import ANSWERS_FILE
from observe import targets
from topo.errors import SpecError, StateError, one_line
from topo.schema import close_match

RETRY_INTERVAL = 0.25  # seconds between attempts of a check with `wait`


@dataclass
class Outcome:
    check: checks.Check
    passed: bool
    detail: str
    seconds: float
    attempts: int = 1
    skipped: bool = False  # the kernel lacks a feature the check requires: not counted either way

    @property
    def score(self) -> int:
        return self.check.points if self.passed and not self.skipped else 0

    def to_json(self) -> dict[str, Any]:
        c = self.check
        return {"name": c.name, "task": c.task, "description": c.description, "kind": c.kind, "points": c.points,
                "score": self.score, "passed": self.passed, "detail": self.detail,
                "hint": "" if self.passed else c.hint, "initially": c.initially, "seconds": round(self.seconds, 3),
                "attempts": self.attempts, "skipped": self.skipped}


@dataclass
class Report:
    exercise: checks.Exercise
    lab: str
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    warning: str | None = None  # said on stderr: e.g. graded against an exercise other than its own

    @property
    def score(self) -> int:
        return sum(o.score for o in self.outcomes)

    @property
    def max_score(self) -> int:
        return sum(o.check.points for o in self.outcomes if not o.skipped)

    @property
    def counted(self) -> int:
        return sum(not o.skipped for o in self.outcomes)

    @property
    def passed(self) -> bool:
        """Every check counted passes, and there was at least one: 0 of 0 is no pass."""
        return self.counted > 0 and all(o.passed or o.skipped for o in self.outcomes)

    @property
    def exit_code(self) -> int:
        if self.counted == 0:
            return 2  # nothing was graded (every check skipped): an autograder must not read it as a pass
        return 0 if self.passed else 1

    @property
    def after(self) -> Path | None:
        """The exercise's AFTER.md, once everything passes (and only if the exercise has one)."""
        path = self.exercise.after_file
        return path if self.passed and path.is_file() else None

    def to_json(self) -> dict[str, Any]:
        return {"exercise": self.exercise.slug, "folder": str(self.exercise.folder), "title": self.exercise.title,
                "lab": self.lab, "score": self.score, "maxScore": self.max_score,
                "after": str(self.after) if self.after else None,
                "passed": sum(o.passed and not o.skipped for o in self.outcomes), "total": len(self.outcomes),
                "skipped": sum(o.skipped for o in self.outcomes),
                "seconds": round(self.seconds, 3), "checks": [o.to_json() for o in self.outcomes]}


def exercise_of(st: state.LabState, given: str | None) -> tuple[Path, str]:
    """The exercise folder to grade against: the one given, or the one the lab was built from."""
    if given is not None:
        from apiserver.desired import resolve_spec

        folder = resolve_spec(given)
        if not folder.is_dir():
            raise StateError(f"{given} is not an exercise folder (one holding lab.yaml and checks.yaml)")
        return folder, given
    if st.exercise is None:
        raise StateError(f"lab {st.name} was not built from an exercise folder (its spec is {st.spec_file}): "
                         "give the exercise folder, e.g. lab grade labs/05-vxlan-mtu")
    return Path(st.exercise), st.exercise


def grade(lab_name: str | None, exercise: str | None = None, answers: str | None = None,
          only: list[str] | None = None) -> Report:
    """Grade the running lab. Raises StateError/SpecError (exit 2) when it cannot be graded at all."""
    given = given_answers(answers)
    st = state.resolve(lab_name)
    folder, shown = exercise_of(st, exercise)
    ex = checks.load(folder, shown)
    from apiserver.desired import current_lab

    ctx = probes.Context(targets.Lookup(st, current_lab(st)), given or folder / ANSWERS_FILE)
    chosen = selected(ex, only)
    report = Report(ex, st.name, warning=_another_exercise(st, folder, ex) if exercise is not None else None)
    started = time.monotonic()
    done: dict[str, Outcome] = {}
    for check in ex.checks:
        if check.name not in chosen:
            continue
        outcome = _unmet(check, done) or run_check(ctx, check, since=started)
        done[check.name] = outcome
        report.outcomes.append(outcome)
    report.seconds = time.monotonic() - started
    return report


def _another_exercise(st: state.LabState, folder: Path, ex: checks.Exercise) -> str | None:
    """A warning when the folder given is another exercise than the one the lab was built from (`lab grade
    FOLDER` is meant for another copy of the same exercise): every check would fail for a reason of its own."""
    if st.exercise is None or Path(st.exercise).resolve() == folder.resolve():
        return None
    try:
        built = checks.load(Path(st.exercise), st.exercise)
    except (SpecError, StateError, OSError):
        return None  # its own folder is gone or changed: nothing to compare with
    if built.title == ex.title:
        return None
    return (f"lab {st.name} was built from {st.exercise} ({built.title}), not from this exercise ({ex.title}): "
            "its checks will fail for that reason")


def given_answers(answers: str | None) -> Path | None:
    """The answers file given with --answers, which must be a file: a missing one is a typo or a wrong
    folder, a usage error (exit 2) found before anything is graded, not a row of "does not exist yet"
    failures. The default, answers.yaml in the exercise folder, may be missing: nothing answered yet."""
    if answers is None:
        return None
    path, shown = Path(answers), one_line(answers)
    if not path.exists():
        raise StateError(f"--answers {shown}: no such file (leave --answers out to use {ANSWERS_FILE} in the "
                         "exercise folder)")
    if not path.is_file():
        raise StateError(f"--answers {shown}: not a file (give the answers file, e.g. {ANSWERS_FILE})")
    return path


def selected(ex: checks.Exercise, only: list[str] | None) -> set[str]:
    """The names of the checks to run: all, or those `only` names (by check or task) with the guards they
    need. An `only` entry naming nothing is an error (exit 2), not an empty pass."""
    if not only:
        return {c.name for c in ex.checks}
    known = [c.name for c in ex.checks] + [t.id for t in ex.tasks]
    unknown = [x for x in only if x not in known]
    if unknown:
        hints = []
        for x in unknown:
            close = close_match(x, known)
            hints.append(f"{x!r}" + (f" (did you mean {close!r}?)" if close else ""))
        raise StateError(f"--only: no check or task {', '.join(hints)} in {ex.slug} "
                         f"(tasks: {', '.join(t.id for t in ex.tasks)})")
    chosen = {c.name for c in ex.checks if c.name in only or c.task in only}
    by_name = {c.name: c for c in ex.checks}
    todo = list(chosen)
    while todo:
        for needed in by_name[todo.pop()].needs:
            if needed not in chosen:
                chosen.add(needed)
                todo.append(needed)
    return chosen


def _unmet(check: checks.Check, done: dict[str, Outcome]) -> Outcome | None:
    """A failed (or skipped) outcome for a check whose guard failed (or was skipped); None to run it."""
    for needed in check.needs:
        guard = done[needed]
        if guard.skipped:
            return Outcome(check, False, f"skipped: it needs {needed}, which was skipped", 0.0, 0, skipped=True)
        if not guard.passed:
            return Outcome(check, False, f"not run: it counts only when {needed} passes, which fails "
                                         f"({guard.detail})", 0.0, 0)
    return None


def run_check(ctx: probes.Context, check: checks.Check, since: float | None = None) -> Outcome:
    """Run one check, retrying a failing one with `wait` until `wait` seconds after `since` (when grading
    started; this check's own start when not given). The clock is the run's, not the check's: grading never
    changes the lab, so by the time a later check runs the lab has had the earlier checks' seconds to
    converge as well; five failing checks with `wait: 2` on a fresh lab take 2 s together, not 10."""
    if check.requires:
        from topo import kernel

        lacking = kernel.missing(*(FEATURES[f] for f in check.requires))
        if lacking:
            names = ", ".join(f"{f.name} ({f.config})" for f in lacking)
            return Outcome(check, False, f"skipped: this kernel lacks {names}", 0.0, 0, skipped=True)
    started = time.monotonic()
    deadline = (started if since is None else since) + (check.wait or 0)  # one attempt at least, always
    attempts = 0
    while True:
        attempts += 1
        result = _attempt(ctx, check)
        if result.passed or time.monotonic() + RETRY_INTERVAL > deadline:
            return Outcome(check, result.passed, result.detail, time.monotonic() - started, attempts)
        time.sleep(RETRY_INTERVAL)


def _attempt(ctx: probes.Context, check: checks.Check) -> probes.Result:
    try:
        return probes.RUNNERS[check.kind](ctx, check.probe)
    except StateError as exc:  # a pod that is gone, a name the lab does not have: the check fails
        return probes.Result(False, str(exc))
    except OSError as exc:
        return probes.Result(False, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a bug of ours: still a failed check with the reason, never a lost report
        if os.environ.get("KUBENET_LAB_DEBUG"):
            raise
        return probes.Result(False, f"internal error: {type(exc).__name__}: {exc} (please report it)")


# ---------------------------------------------------------------------------- reports


def render(report: Report) -> str:
    ex = report.exercise
    titles = {t.id: t.title for t in ex.tasks}
    lines = [f"{ex.slug}: {ex.title} (lab {report.lab})", ""]
    rows = [["", "TASK", "CHECK", "POINTS"]]
    notes: dict[int, list[str]] = {}
    for index, o in enumerate(report.outcomes):
        mark = "SKIP" if o.skipped else "PASS" if o.passed else "FAIL"
        rows.append([mark, o.check.task, o.check.name, "-" if o.skipped else f"{o.score}/{o.check.points}"])
        notes[index + 1] = [o.check.description] + ([o.detail] if o.skipped else []) if o.passed or o.skipped else [
            o.check.description, f"why:  {o.detail}"] + ([f"hint: {o.check.hint}"] if o.check.hint else [])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        for note in notes.get(index, []):
            lines.append(f"      {note}")
    failed_tasks = sorted({o.check.task for o in report.outcomes if not o.passed and not o.skipped},
                          key=list(titles).index)
    lines.append("")
    if failed_tasks:
        lines.append("to do: " + "; ".join(f"{t} ({titles[t]})" for t in failed_tasks))
    passed = sum(o.passed and not o.skipped for o in report.outcomes)
    skipped = sum(o.skipped for o in report.outcomes)
    counted = len(report.outcomes) - skipped
    lines.append(f"score {report.score}/{report.max_score}: {passed} of {counted} checks pass"
                 + (f", {skipped} skipped" if skipped else "") + f" ({report.seconds:.1f} s)")
    if report.after is not None:
        lines.append(f"every check passes: now read {_shown(report.after)} (what you should have seen, precisely)")
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """A path as short as it is clear: relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def junit(report: Report) -> str:
    """JUnit XML, one testcase per check (classname: exercise.task), for CI systems and autograders."""
    failures = sum(not o.passed and not o.skipped for o in report.outcomes)
    skipped = sum(o.skipped for o in report.outcomes)
    suites = ET.Element("testsuites", name="lab grade", tests=str(len(report.outcomes)), failures=str(failures),
                        time=f"{report.seconds:.3f}")
    suite = ET.SubElement(suites, "testsuite", name=report.exercise.slug, tests=str(len(report.outcomes)),
                          failures=str(failures), errors="0", skipped=str(skipped), time=f"{report.seconds:.3f}")
    ET.SubElement(ET.SubElement(suite, "properties"), "property", name="score",
                  value=f"{report.score}/{report.max_score}")
    for o in report.outcomes:
        case = ET.SubElement(suite, "testcase", classname=f"{report.exercise.slug}.{o.check.task}",
                             name=o.check.name, time=f"{o.seconds:.3f}")
        if o.skipped:
            ET.SubElement(case, "skipped", message=o.detail)
        elif not o.passed:
            failure = ET.SubElement(case, "failure", message=o.detail, type="CheckFailed")
            failure.text = f"{o.check.description}\nhint: {o.check.hint}" if o.check.hint else o.check.description
        ET.SubElement(case, "system-out").text = f"{o.check.description}: {o.detail}"
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
