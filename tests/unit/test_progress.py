"""The progress bar draws from the caller's own thread: a refresh thread would make every pod's mount
namespace unreachable while the bar is up (setns(2) refuses CLONE_NEWNS in a multithreaded process)."""
from __future__ import annotations

import os
import threading

import pytest

from lab import progress
from topo import netns


def test_the_bar_runs_no_thread_of_its_own() -> None:
    with progress.bar("pods", 100, force=True) as advance:
        for _ in range(100):
            advance(1)
        assert threading.active_count() == 1, [t.name for t in threading.enumerate()]


def test_a_mount_namespace_can_be_entered_while_the_bar_is_drawn() -> None:
    if os.geteuid() != 0:
        pytest.skip("setns(2) into a mount namespace needs root")
    home = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with progress.bar("pods", 100, force=True) as advance:
            advance(1)
            netns.setns(home, netns.CLONE_NEWNS)  # raised EINVAL with rich's refresh thread
    finally:
        os.close(home)


def test_a_thread_just_joined_does_not_fail_the_next_setns() -> None:
    """kube-proxy's parallel node loads end just before pods are made: Python has joined the pool's threads
    while the kernel may still count them, which failed `lab apply` at random with `setns: Invalid argument`."""
    if os.geteuid() != 0:
        pytest.skip("setns(2) into a mount namespace needs root")
    home = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for _ in range(100):
            worker = threading.Thread(target=lambda: None)
            worker.start()
            worker.join()
            netns.setns(home, netns.CLONE_NEWNS)
    finally:
        os.close(home)
