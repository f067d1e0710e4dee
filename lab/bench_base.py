"""What every `lab bench` suite is made of: a case (one measurement and its samples), a suite (cases, a table,
a plot), the bench/ scripts loaded from the source tree, and the two ways a suite leaves nothing behind
(`remove_lab`, and the scripts' command line `script_main`, which runs `lab bench SUITE` in a child
process). Kept apart from the suites so lab/bench.py (the scheduler and the first suites) and
lab/bench_suites.py (scale, the DNS storm, VPC subnet fit) share one implementation.
"""
from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from topo import names, netns
from topo.errors import FeatureMissing, StateError

REPO = Path(__file__).resolve().parent.parent


def script_main(suite: str, doc: str) -> int:
    """The bench/ scripts' command line: `lab bench SUITE` under another name (one implementation).

    Run as `python -m lab.cli bench ...` in a child process, from this source tree and in the caller's
    folder (so relative --json and --plot paths mean the same): the scheduler never imports the CLI that
    imports it. A Ctrl-C reaches the child too (same process group), which cleans up and exits; its exit
    status is the script's."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write every sample and the machine description here")
    parser.add_argument("--plot", help="write a PNG into this folder")
    args = parser.parse_args()
    extra = [*(["--json", args.json] if args.json else []), *(["--plot", args.plot] if args.plot else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-m", "lab.cli", "bench", suite, "--repeat", str(args.repeat), *extra],
                             env=env)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            continue  # the child got the same Ctrl-C: let it finish its cleanup

def remove_lab(name: str) -> None:
    """Take a lab down as a user would; if that fails (a build killed before its state was written),
    remove whatever namespaces and state of that name are left, as `lab clean` does."""
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "down", name], cwd=REPO, capture_output=True)
    if proc.returncode == 0:
        return
    from apiserver import state
    from lab import apply

    if netns.list_names(f"{names.NETNS_PREFIX}{name}{names.SEP}") or state.lab_dir(name).exists():
        with state.locked(name):
            apply.teardown(name)
            state.remove(name)

def bench_script(name: str) -> ModuleType:
    """One of the bench/ scripts, imported from the source tree (bench/ is not an installed package)."""
    key = f"_kubenet_bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    path = REPO / "bench" / f"{name}.py"
    if not path.exists():
        raise FeatureMissing(f"lab bench needs the source tree's bench/ scripts ({path} is missing)")
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module

def _lab_cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StateError(f"lab {' '.join(args)} failed: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout

@dataclass
class Case:
    name: str
    run: Callable[[], dict[str, float]]  # one sample of every metric
    info: dict = field(default_factory=dict)  # fixed facts of the case (MTU, mode, service count)
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, sample: dict[str, float]) -> None:
        for key, value in sample.items():
            self.samples.setdefault(key, []).append(value)

    def median(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items()}

    def to_json(self) -> dict:
        return {"name": self.name, **self.info, "samples": self.samples, "median": self.median(),
                "min": {k: min(v) for k, v in self.samples.items()},
                "max": {k: max(v) for k, v in self.samples.items()}}

def _spread(case: Case, key: str, fmt: str) -> str:
    values = case.samples[key]
    med = format(statistics.median(values), fmt)
    if len(values) == 1:
        return med
    return f"{med} ({format(min(values), fmt)}-{format(max(values), fmt)})"

def _ratio(value: float, base: float, fmt: str) -> str:
    return format(value / base, fmt) if base else "n/a"

def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])

class Suite:
    name = ""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.cases: list[Case] = []

    def setup(self, stack: ExitStack, folder: Path) -> None:
        """Build what the cases measure; register its removal on `stack`."""

    def table(self) -> str:
        raise NotImplementedError

    def plot(self, plt, path: Path) -> None:
        raise NotImplementedError

    def to_json(self) -> dict:
        return {"cases": [c.to_json() for c in self.cases]}
