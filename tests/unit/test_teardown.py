"""`lab down`'s namespace removal (lab/apply.py `_delete_watched`): every pin unpinned in parallel threads while
each namespace is held open, then all let go at once; it returns only once the watched peers are gone, and
gives back the open-files limit it raised. Real namespaces and veths, with a throwaway prefix."""
from __future__ import annotations

import os
import resource
import subprocess
import uuid
from pathlib import Path

import pytest

from lab import apply
from topo import netns


def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")


def test_pins_and_peers_are_gone_when_it_returns_and_the_limit_is_given_back() -> None:
    _root()
    tag = uuid.uuid4().hex[:6]
    watcher, pods = f"kltest-{tag}-w", [f"kltest-{tag}-p{i}" for i in range(40)]
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        for ns in [watcher, *pods]:
            netns.create(ns)
        batch = "".join(f"link add veth{tag}{i} type veth peer name eth0 netns {ns}\n" for i, ns in enumerate(pods))
        subprocess.run(["ip", "-n", watcher, "-b", "-"], input=batch.encode(), check=True)
        with netns.rtnl_in(watcher) as handle:
            assert apply._peer_count(handle, f"veth{tag}") == len(pods)
        apply._delete_watched(pods, [watcher], f"veth{tag}", wait=True)
        assert not netns.list_names(f"kltest-{tag}-p")
        with netns.rtnl_in(watcher) as handle:
            assert apply._peer_count(handle, f"veth{tag}") == 0  # the kernel destroyed them before the return
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == soft
    finally:
        for ns in [*pods, watcher]:
            netns.delete(ns)


def test_remove_tree_removes_every_folder_and_file(tmp_path: Path) -> None:
    root = tmp_path / "pods"
    for i in range(30):
        (root / f"default_pod{i}").mkdir(parents=True)
        (root / f"default_pod{i}" / "hosts").write_text("x")
    (root / "loose-file").write_text("y")
    apply.remove_tree(root)
    assert not root.exists()
    apply.remove_tree(root)  # missing is fine


def test_the_lead_namespaces_are_let_go_before_the_rest(monkeypatch) -> None:
    """The nodes go first, the pods a moment later, so the kernel takes the pods as one batch of their own
    (a batch taken while half the pods still lived walked every one of them for each: 10,000-pod `lab down`)."""
    _root()
    tag = uuid.uuid4().hex[:6]
    spaces = [f"kltest-{tag}-n{i}" for i in range(3)] + [f"kltest-{tag}-p{i}" for i in range(5)]
    opened: dict[int, str] = {}
    closed: list[tuple[float, int, int]] = []
    real_open, real_close = os.open, os.closerange

    def record_open(path, flags, *rest):
        fd = real_open(path, flags, *rest)
        opened[fd] = str(path)
        return fd

    def record_close(low, high):
        closed.append((apply.time.monotonic(), low, high))
        real_close(low, high)

    try:
        for ns in spaces:
            netns.create(ns)
        monkeypatch.setattr(apply.os, "open", record_open)  # from here on: only what `_held` opens and closes
        monkeypatch.setattr(apply.os, "closerange", record_close)
        with apply._held(spaces, lead=3):
            for ns in spaces:
                netns.delete(ns)
        monkeypatch.undo()
        by_name = {Path(path).name: fd for fd, path in opened.items()}
        assert sorted(by_name) == sorted(spaces)

        def when(fd: int) -> float:
            return next(t for t, low, high in closed if low <= fd < high)

        nodes, pods = [when(by_name[ns]) for ns in spaces[:3]], [when(by_name[ns]) for ns in spaces[3:]]
        assert min(pods) - max(nodes) >= apply.LEAD_SETTLE * 0.9
        for fd in opened:  # every descriptor closed
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        for ns in spaces:
            netns.delete(ns)
