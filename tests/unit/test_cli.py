"""The CLI turns every spec problem into the golden one-line messages and exit 2, creating nothing."""
from __future__ import annotations

from pathlib import Path

import pytest

from lab.cli import main
from topo import netns

INVALID = sorted((Path(__file__).parent / "specs" / "invalid").glob("*.yaml"))


@pytest.mark.parametrize("spec", INVALID, ids=[p.stem for p in INVALID])
def test_validate_prints_the_golden_lines_and_exits_2(spec: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(spec.parent)
    assert main(["validate", spec.name]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == spec.with_suffix(".err").read_text().splitlines()
    assert "Traceback" not in err


def test_at_least_twenty_invalid_specs_are_covered() -> None:
    single = [p for p in INVALID if len(p.with_suffix(".err").read_text().splitlines()) == 1]
    assert len(single) >= 20


@pytest.mark.parametrize("spec", INVALID, ids=[p.stem for p in INVALID])
def test_up_refuses_invalid_specs_before_touching_the_kernel(spec: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is created because nothing that creates is ever called (the integration tests also
    compare the machine's namespaces around a refused `lab up`)."""
    from lab import apply, lifecycle

    def forbidden(*_a, **_k):
        raise AssertionError("an invalid spec reached the kernel layer")

    for target, attr in ((apply, "apply"), (apply, "teardown"), (lifecycle.state, "save"), (netns, "create"),
                         (netns, "ensure_dir")):
        monkeypatch.setattr(target, attr, forbidden)
    monkeypatch.setattr(lifecycle.kernel, "require_root", lambda: None)
    monkeypatch.chdir(spec.parent)
    assert main(["up", spec.name]) == 2
    assert capsys.readouterr().err.splitlines() == spec.with_suffix(".err").read_text().splitlines()


def test_validate_the_default_lab_needs_no_root(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate"]) == 0
    assert "lab seed, 2 nodes, 3 pods" in capsys.readouterr().out


def test_missing_file_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "/nonexistent/lab.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/nonexistent/lab.yaml" in err[0]


def test_status_with_no_lab_running_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from apiserver import state

    monkeypatch.setattr(state, "RUN_DIR", tmp_path)
    assert main(["status"]) == 0
    assert "no lab is running" in capsys.readouterr().out
    assert main(["down"]) in (2, 3)
