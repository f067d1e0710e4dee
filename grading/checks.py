"""An exercise's checks.yaml: what `lab grade` verifies, read and checked as strictly as a lab spec.

An exercise folder (`labs/NN-slug/`) holds README.md (the story and the tasks), lab.yaml (the lab) and
checks.yaml: the tasks' ids, the faults `lab up` applies after building the lab, and named checks. Each
check belongs to a task, is worth points, carries a hint for when it fails, and holds exactly one probe:
a declarative question about the running lab (can A reach B, is this route there, does the answer file
say what the kernel says). Probes only look: grading never changes a lab. The reference of every field is
docs/exercises.md; `grading/probes.py` runs the probes (grading/schema.py holds their
models, grading/fields.py the checks of their values).

Errors are reported as spec errors are, all at once, `checks.yaml:LINE: checks[2].route.to: message`,
and a bad file stops `lab up` and `lab grade` with exit code 2 before anything is built or graded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grading.fields import CHOICES, FEATURES, _check_probe, _choice
from grading.schema import (AFTER_FILE, CHECKS_FILE, KIND, NAME, POINTS_MAX, PROBES, WAIT_MAX, ExerciseIn,
                            TaskIn)
from topo import names
from topo.errors import SpecError, SpecIssue
from apiserver.spec import API_VERSION
from topo.schema import StrictDocument, close_match

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
    faults: list[dict[str, Any]]  # {"fault": NAME, params...}, validated against grading.faults
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


def is_exercise(folder: str | Path) -> bool:
    """Whether a folder is a graded exercise: one holding checks.yaml (labs/00-seed holds only a lab.yaml). A
    checks.yaml that is no file counts, so reading it says what is wrong with it."""
    return checks_file(folder).exists()


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
        if not NAME.fullmatch(check.name) or len(check.name) > names.DNS1123_LABEL_MAX:
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
                close = close_match(needed, [c.name for c in checks])
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
        if not NAME.fullmatch(task.id):
            doc.add(("tasks", index, "id"), f"{task.id!r} is not a task id: use lower-case letters, digits and '-'")
        if task.id in ids:
            doc.add(("tasks", index, "id"), f"{task.id!r} is given twice")
        ids.append(task.id)
    return ids


def _check_faults(doc: StrictDocument, faults: Any) -> None:
    from grading import faults as registry

    if not isinstance(faults, list):
        return  # absent, or the structural pass already said it must be a list
    for index, item in enumerate(faults):
        if not isinstance(item, dict):
            continue  # the structural pass says it must be a mapping
        for path, message in registry.problems(item):
            doc.add(("faults", index) + path, message)
