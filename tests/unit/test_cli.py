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


def test_validate_an_exercise_counts_its_faults_in_words(capsys: pytest.CaptureFixture[str]) -> None:
    """"1 faults" read as a mistake; a capstone's {random: 3} is three faults, not one."""
    repo = Path(__file__).resolve().parents[2]
    for folder, words in (("05-vxlan-mtu", "1 fault\n"), ("13-capstone", "3 faults\n"), ("01-namespaces", "0 faults\n")):
        assert main(["validate", str(repo / "labs" / folder)]) == 0
        assert capsys.readouterr().out.endswith(words)


def test_a_folder_without_a_spec_is_named_as_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said "FOLDER/lab.yaml: FOLDER is a folder without lab.yaml", naming a file that is not there."""
    assert main(["validate", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"{tmp_path}: a folder without lab.yaml: give a lab spec file or an exercise " \
                                      "folder such as labs/00-seed\n"


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


@pytest.mark.parametrize("command", ["status", "down", "graph"])
def test_commands_naming_the_lab_by_argument_take_lab_too(command: str, capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"2 labs are running (a, b): name one (--lab NAME)" is what every command says when it cannot tell which
    lab is meant, so `--lab NAME` works for these three as well as their NAME argument (it was refused as an
    unrecognized argument); naming two different labs is refused in one line."""
    from apiserver import state

    monkeypatch.setattr(state, "RUN_DIR", tmp_path)
    if command == "graph":
        monkeypatch.setattr("topo.kernel.require_root", lambda: None)
    assert main([command, "--lab", "nosuch"]) == 2
    assert capsys.readouterr().err.strip() == f"lab {command}: lab nosuch is not running (running: none)"
    assert main([command, "one", "--lab", "other"]) == 2
    assert capsys.readouterr().err.strip() == f"lab {command}: name the lab once: one or --lab other, not both"


def test_output_cut_short_by_a_closed_pipe_ends_quietly() -> None:
    """`lab ... | head` closes the pipe early: the command stops without "[Errno 32] Broken pipe" or Python's
    "Exception ignored" lines, and exits as a process killed by SIGPIPE would (141), as other CLIs do."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "validate", "labs/00-seed"], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read()
    assert proc.wait(30) == 141 and err == ""


@pytest.mark.parametrize("command", ["status", "down"])
def test_a_user_without_root_is_told_so(command: str, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`lab status` without root showed every pod Dead and every service without endpoints (another user's
    processes and namespaces cannot be looked into), and `lab down` said "building a lab needs root"."""
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert main([command, "seed"]) == 3
    assert capsys.readouterr().err.strip() == (f"lab {command}: needs root (it reads and changes network namespaces "
                                               "and processes of the lab): run with sudo")


def test_exec_without_a_target_names_only_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    """The command is optional (a shell by default), so the usage error must not call it required."""
    with pytest.raises(SystemExit) as exit_:
        main(["exec"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "lab exec: the following arguments are required: target (see lab exec --help)\n"


@pytest.mark.parametrize("argv, line", [
    (["up", "--bogus"], "lab: unrecognized arguments: --bogus (see lab --help)"),
    (["trace", "--lab", "x"], "lab trace: the following arguments are required: FROM, TO[:PORT] (see lab trace --help)"),
    (["observe", "--verdict", "FOO"], "lab observe: argument --verdict: invalid choice: 'FOO' (choose from "),
    ([], "lab: the following arguments are required: COMMAND (see lab --help)"),
])
def test_a_usage_error_is_one_line(argv: list[str], line: str, capsys: pytest.CaptureFixture[str]) -> None:
    """As every other error (docs/commands.md): argparse printed its usage block first, 3 to 9 lines of it."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(line), err


def test_a_file_name_with_a_trailing_space_is_quoted(capsys: pytest.CaptureFixture[str]) -> None:
    """`lab up 'seed '` said "seed : no such file": the space was there but could not be seen."""
    assert main(["validate", "nosuch "]) == 2
    assert capsys.readouterr().err.startswith("'nosuch ': no such file: ")

