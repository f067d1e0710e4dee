"""Issue 16, point 4: a spec's container is not root on the host unless it asks to be.

Containers run as processes of this machine, in its file system. By default they run as nobody with no
capabilities, so a `touch` of a root-owned host path fails; `securityContext.runAsUser: 0` runs one as root
(and `lab up` says so in one line); `capabilities.add: [NET_BIND_SERVICE]` lets agnhost bind port 80, as on
a cluster. `lab exec` stays what the person at the keyboard asked for: root. The built-in images of every
exercise are exercised by tests/integration/test_exercises*.py.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from apiserver import state
from tests.integration.conftest import in_lab, unique

pytestmark = pytest.mark.integration


def _pod(name: str, container: dict, **pod_spec: object) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeName": "node1", "containers": [{"name": "app", **container}], **pod_spec}}


def _spec(name: str, pods: list[dict]) -> dict:
    return {"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"dns": {"enabled": False}, "nodes": [{"name": "node1", "ip": "192.168.1.10"}], "objects": pods}}


def _wait(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_a_spec_container_cannot_write_the_host_unless_it_asks_for_root(lab_up, tmp_path: Path) -> None:
    target = tmp_path / "root-owned"
    target.mkdir(mode=0o755)
    os.chown(target, 0, 0)
    os.chmod(tmp_path, 0o755)  # nobody may reach the folder, not write in it
    touch = lambda file: {"image": "pause", "command": ["touch", str(target / file)]}  # noqa: E731
    name = unique("sec")
    pods = [
        _pod("default-user", touch("by-default")),
        _pod("asks-root", {**touch("by-root"), "securityContext": {"runAsUser": 0}}),
        _pod("pod-level-root", touch("by-pod-root"), securityContext={"runAsUser": 0}),
        _pod("nonroot-wins", {**touch("by-1000"), "securityContext": {"runAsUser": 1000}},
             securityContext={"runAsUser": 0}),
        _pod("web80", {"image": "agnhost", "args": ["netexec", "--http-port=80"],
                       "securityContext": {"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}}),
        _pod("web80-no-cap", {"image": "agnhost", "args": ["netexec", "--http-port=80"]}),
        _pod("sleeper", {"image": "pause", "command": ["sleep", "300"]}),
    ]
    up = lab_up(_spec(name, pods))
    warning = [line for line in up.stderr.splitlines() if "root" in line]
    assert warning == [f"warning: 2 containers of this spec run as root on this machine, in its own file system "
                       f"(securityContext runAsUser: 0): default/asks-root/app, default/pod-level-root/app"]

    assert _wait(lambda: (target / "by-root").exists() and (target / "by-pod-root").exists())
    assert (target / "by-root").stat().st_uid == 0
    time.sleep(0.3)  # the unprivileged writers have had as long as the root ones
    assert not (target / "by-default").exists() and not (target / "by-1000").exists()
    logs = state.log_dir(name)
    assert "Permission denied" in (logs / "default_default-user_app.log").read_text()

    pods_state = json.loads((state.lab_dir(name) / "state.json").read_text())["pods"]
    sleeper = _status_of(pods_state["default/sleeper"]["containers"]["app"])
    assert sleeper["Uid"].split()[0] == "65534" and sleeper["Gid"].split()[0] == "65534"
    assert sleeper["Groups"] == "" and int(sleeper["CapEff"], 16) == 0 and int(sleeper["CapAmb"], 16) == 0

    # NET_BIND_SERVICE added: agnhost serves on port 80 as nobody; without it, binding port 80 fails.
    web = pods_state["default/web80"]
    assert _wait(lambda: in_lab(name, "web80", "curl", "-s", "--max-time", "2", "http://127.0.0.1:80/hostname",
                                check=False) == "web80")
    assert _status_of(web["containers"]["app"])["Uid"].split()[0] == "65534"
    assert int(_status_of(web["containers"]["app"])["CapEff"], 16) == 1 << 10  # CAP_NET_BIND_SERVICE only
    assert in_lab(name, "web80-no-cap", "curl", "-s", "--max-time", "2", "http://127.0.0.1:80/hostname",
                  check=False) != "web80-no-cap"

    # lab exec is the person at the keyboard: root, as before.
    assert in_lab(name, "sleeper", "id", "-u").strip() == "0"
