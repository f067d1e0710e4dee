"""Where a running lab is remembered between commands.

`lab up` returns while the lab keeps running, so every later command (status, exec, apply, down) finds
the lab from a small JSON file under /run (tmpfs: a reboot forgets labs exactly when it forgets their
namespaces). The spec text is kept, not a copy of the model, so the model is always re-derived the one
way it is ever derived.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from topo.errors import StateError

RUN_DIR = Path(os.environ.get("KUBENET_LAB_RUN_DIR", "/run/kubenet-lab"))


@dataclass
class PodState:
    node: str
    ip: str
    netns: str
    pause_pid: int
    containers: dict[str, int] = field(default_factory=dict)  # container name -> pid
    owner: str | None = None  # the Deployment a replica belongs to
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class LabState:
    name: str
    phase: str  # "building" while `lab up` runs, "up" once it returned successfully
    pid: int  # the process building the lab (to tell a crashed build from a running one)
    spec_file: str | None
    spec_text: str
    exercise: str | None = None
    created: float = field(default_factory=time.time)
    objects: list[dict[str, Any]] = field(default_factory=list)  # manifests added by `lab apply`
    pods: dict[str, PodState] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabState:
        pods = {k: PodState(**v) for k, v in data.pop("pods", {}).items()}
        return cls(**data, pods=pods)


def lab_dir(name: str) -> Path:
    return RUN_DIR / name


def state_path(name: str) -> Path:
    return lab_dir(name) / "state.json"


def ipam_dir(name: str) -> Path:
    return lab_dir(name) / "ipam"


def log_dir(name: str) -> Path:
    return lab_dir(name) / "logs"


def save(state: LabState) -> None:
    path = state_path(state.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=1))
    os.replace(tmp, path)


def load(name: str) -> LabState | None:
    try:
        return LabState.from_json(json.loads(state_path(name).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise StateError(f"state of lab {name} is unreadable ({exc}): run 'lab clean'") from exc


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_live(state: LabState | None) -> bool:
    """Up, or still being built by a process that is alive. Anything else is a crash's leftover."""
    if state is None:
        return False
    return state.phase == "up" or (state.phase == "building" and pid_alive(state.pid) and state.pid != os.getpid())


def known_labs() -> list[str]:
    try:
        return sorted(p.name for p in RUN_DIR.iterdir() if (p / "state.json").exists())
    except FileNotFoundError:
        return []


def live_labs() -> list[str]:
    return [name for name in known_labs() if is_live(load(name))]


def resolve(name: str | None) -> LabState:
    """The lab a command means: the one named, or the only one running."""
    if name:
        state = load(name)
        if state is None or state.phase != "up":
            running = ", ".join(live_labs()) or "none"
            raise StateError(f"lab {name} is not running (running: {running})")
        return state
    live = [n for n in known_labs() if (s := load(n)) is not None and s.phase == "up"]
    if not live:
        raise StateError("no lab is running: start one with 'lab up [SPEC]'")
    if len(live) > 1:
        raise StateError(f"{len(live)} labs are running ({', '.join(live)}): name one (--lab NAME)")
    return load(live[0])  # type: ignore[return-value]


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """One command at a time changes a lab (two `lab up` of one name must not interleave)."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(RUN_DIR / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
