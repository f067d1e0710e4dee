"""`lab up`, `lab down` and `lab clean`: a lab's whole life, with nothing left behind at any exit.

`lab up` marks the lab as building (with its own pid) before touching the kernel, so a crash at any point
leaves something `lab clean` recognises as dead and removes, by the lab's namespace prefix.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from lab import apply, plan, state
from topo import names, netns
from topo.errors import FeatureMissing, StateError
from topo.model import Lab
from topo.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
DEFAULT_LAB = REPO / "labs" / "00-seed"


def require_root() -> None:
    if os.geteuid() != 0:
        raise FeatureMissing("building a lab needs root (network namespaces, netlink): run with sudo")


def resolve_spec(spec: str | None) -> Path:
    """A file, a folder holding lab.yaml, or the name of an exercise folder under labs/."""
    if spec is None:
        return DEFAULT_LAB
    path = Path(spec)
    if not path.exists() and (REPO / "labs" / spec).exists():
        return REPO / "labs" / spec
    return path


@dataclass
class UpResult:
    lab: Lab
    state: state.LabState
    seconds: float
    cleaned_leftovers: bool


def up(spec: str | None, keep_on_failure: bool = False) -> UpResult:
    started = time.monotonic()
    lab = load_spec(resolve_spec(spec))
    require_root()
    with state.locked(lab.name):
        existing = state.load(lab.name)
        if state.is_live(existing):
            raise StateError(f"lab {lab.name} is already up: 'lab down {lab.name}' first")
        leftovers = bool(apply.lab_namespaces(lab.name)) or existing is not None
        if leftovers:  # a crashed run of this same lab: ours by name, and dead
            apply.teardown(lab.name)
            apply.remove_files(lab.name)
        st = state.LabState(name=lab.name, phase="building", pid=os.getpid(), spec_file=lab.source,
                            spec_text=Path(lab.source).read_text() if lab.source else "",
                            exercise=lab.exercise)
        state.save(st)
        try:
            apply.apply(plan.build(lab, state.ipam_dir(lab.name)), st)
            st.phase = "up"
            state.save(st)
        except BaseException:
            if not keep_on_failure:
                apply.teardown(lab.name)
                apply.remove_files(lab.name)
            raise
    return UpResult(lab, st, time.monotonic() - started, leftovers)


def down(name: str | None) -> tuple[str, float]:
    started = time.monotonic()
    require_root()
    st = state.resolve(name)
    with state.locked(st.name):
        apply.teardown(st.name)
        apply.remove_files(st.name)
    return st.name, time.monotonic() - started


def clean(everything: bool = False) -> list[str]:
    """Remove what crashed or half-built labs left; with `everything`, running labs too.

    Found by prefix (namespace names, state folders), never by guessing at process names.
    """
    require_root()
    labs = {names.lab_of_netns(ns) for ns in netns.list_names(names.NETNS_PREFIX)}
    labs |= set(state.known_labs())
    labs.discard(None)
    removed = []
    for lab in sorted(labs):  # type: ignore[type-var]
        if not everything and state.is_live(state.load(lab)):
            continue
        with state.locked(lab):
            apply.teardown(lab)
            apply.remove_files(lab)
        removed.append(lab)
    return removed
