"""The files that set a machine up: the Vagrantfile is valid, the scripts are the ones the README names."""
from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[2]


def test_vagrantfile_validates() -> None:
    require_tool("vagrant")
    proc = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "\n    ./run-tests.sh\n" in readme and "./run-tests.sh" in ci
    assert "\n    ./install.sh && .venv/bin/lab up\n" in readme
    assert "./install.sh" in (REPO / "Vagrantfile").read_text()


def test_every_lab_spec_in_the_repository_is_valid() -> None:
    from apiserver.spec import load_spec

    # An exercise's checks.yaml (and a learner's answers.yaml) are no lab specs: tests/unit/test_grade.py
    # checks those.
    specs = sorted(p for p in REPO.glob("labs/**/*.yaml") if p.name not in ("checks.yaml", "answers.yaml"))
    assert len(specs) >= 5
    for spec in specs:
        load_spec(spec)
