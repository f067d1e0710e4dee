"""Processes the lab starts without root: the forked worker's stream (topo/process.py fork_call), which `lab
up` uses to make half of its pods in a second process, and the pause binary every pod sandbox runs."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from kubelet import runtime
from topo import process
from topo.errors import ApplyError


def test_a_forked_worker_sends_its_items_as_it_makes_them() -> None:
    def slow():
        yield "first"
        time.sleep(0.3)
        yield {"second": [2]}

    worker = process.fork_call(slow)
    deadline = time.monotonic() + 5
    early = []
    while not early and time.monotonic() < deadline:
        early = worker.ready()
    assert early == ["first"]  # taken while the worker still sleeps
    assert worker.wait() == [{"second": [2]}]


def test_a_forked_worker_s_error_comes_back_after_its_items() -> None:
    def failing():
        yield 1
        raise ApplyError("no address left on node2")

    worker = process.fork_call(failing)
    with pytest.raises(ApplyError, match="no address left on node2"):
        worker.wait()


def test_a_worker_that_dies_is_an_error_not_a_short_list() -> None:
    def dying():
        yield 1
        os._exit(3)

    worker = process.fork_call(dying)
    with pytest.raises(ApplyError, match="ended with status"):
        worker.wait()


def test_items_larger_than_a_pipe_arrive_whole() -> None:
    worker = process.fork_call(lambda: (bytes([i]) * 200_000 for i in range(3)))
    assert [(len(b), b[0]) for b in worker.wait()] == [(200_000, 0), (200_000, 1), (200_000, 2)]


def test_stop_ends_the_worker_and_leaves_no_zombie() -> None:
    worker = process.fork_call(lambda: iter(lambda: time.sleep(1), 0))  # runs for ever
    worker.stop()
    with pytest.raises(ChildProcessError):
        os.waitpid(worker.pid, os.WNOHANG)
    worker.stop()  # a second stop (a caller's cleanup after a failed wait) is harmless


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the pause ELF is x86-64 code; elsewhere it is sleep")
def test_pause_sleeps_until_a_signal_ends_it_and_shows_as_pause(tmp_path: Path) -> None:
    argv = runtime.pause_binary(tmp_path)
    assert argv == (str(tmp_path / "pause"),)
    pid = os.posix_spawn(argv[0], list(argv), {})
    try:
        time.sleep(0.2)
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "pause"
        assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S"  # asleep, not spinning
        os.kill(pid, signal.SIGCHLD)  # ignored by default: pause(2) returns, and the loop sleeps again
        time.sleep(0.1)
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)
    finally:
        os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_pause_replaces_an_older_tool_s_link_to_sleep(tmp_path: Path) -> None:
    (tmp_path / "pause").symlink_to("/bin/sleep")
    argv = runtime.pause_binary(tmp_path)
    assert Path(argv[0]).is_symlink() == (os.uname().machine != "x86_64")
    assert runtime.pause_binary(tmp_path) == argv


def test_pause_on_a_noexec_file_system_is_sleep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.os, "statvfs", lambda _: type("Vfs", (), {"f_flag": os.ST_NOEXEC})())
    argv = runtime.pause_binary(tmp_path)  # an ELF written there could not be executed
    assert argv == (str(tmp_path / "pause"), "infinity") and Path(argv[0]).is_symlink()
