"""Capability gates shared by every test.

Outside CI a test that needs root or a tool this machine lacks is skipped with the reason. Under CI=true
the same gap is a failure: CI runs on the machine the project targets, where these capabilities exist,
so a skip there would hide a broken install. Kernel features this kernel genuinely lacks (IPVS, netem)
are gated separately, by probing, and skip everywhere.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"


def require(ok: bool, reason: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"CI=true, and this machine should have it: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (network namespaces, netlink)")


def require_tool(name: str) -> None:
    require(shutil.which(name) is not None, f"needs {name} (./install.sh installs it)")


def assert_golden(path: Path, text: str) -> None:
    """`text` equals the golden file at `path`; with KUBENET_UPDATE_GOLDEN=1 the file is (re)written first,
    to be read and committed."""
    if os.environ.get("KUBENET_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path.name}: run with KUBENET_UPDATE_GOLDEN=1 and read it"
    assert text == path.read_text()
