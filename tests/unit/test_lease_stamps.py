"""The shortcut `reconcile.recover` takes over lease files that are as the lab last left them in step: trusted
only at the generation they were stamped at, and only while each file is the very file that was stamped."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from apiserver import state
from reconcile import recover


@pytest.fixture
def st(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> state.LabState:
    monkeypatch.setattr(state, "RUN_DIR", tmp_path)
    lab = state.LabState(name="stamps", phase="up", pid=0, spec_file=None, spec_text="", generation=7)
    ipam = state.ipam_dir(lab.name)
    ipam.mkdir(parents=True)
    for node in ("node1", "node2", "node3"):
        (ipam / f"{node}.json").write_text('{"leases": {}}')
    recover.stamp_leases(lab)
    return lab


def test_files_as_stamped_are_trusted(st: state.LabState) -> None:
    assert recover._unchanged_lease_files(st) == {"node1.json", "node2.json", "node3.json"}


def test_a_file_replaced_edited_or_lost_since_is_read_again(st: state.LabState) -> None:
    ipam = state.ipam_dir(st.name)
    tmp = ipam / "replacement"
    tmp.write_text('{"leases": {}}')  # the same bytes, another file (as an editor saves, or a restore)
    os.replace(tmp, ipam / "node1.json")
    with open(ipam / "node2.json", "a") as fh:  # edited in place
        fh.write(" ")
    (ipam / "node3.json").unlink()
    assert recover._unchanged_lease_files(st) == set()


def test_nothing_is_trusted_at_another_generation_or_from_a_damaged_stamp(st: state.LabState) -> None:
    st.generation += 1  # a command recorded a change since (and may have died before its end)
    assert recover._unchanged_lease_files(st) == set()
    st.generation -= 1
    (state.lab_dir(st.name) / recover.LEASE_STAMPS).write_text("{not json")
    assert recover._unchanged_lease_files(st) == set()
