"""Issue 16, point 4, without root: how a spec's securityContext becomes a container's user and capabilities,
the setpriv command line that applies it, and the one-line warning about containers running as root.
The kernel side (a container cannot write a root-owned host path) is tests/integration/test_security.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from apiserver.spec import load_spec, parse_spec_text
from kubelet.runtime import confined
from lab.cli import main
from services.addons import with_addons
from tests.conftest import assert_golden
from topo.model import SecurityContext
from topo.security_spec import RUNTIME_DEFAULT_CAPABILITIES, root_warning

GOLDEN = Path(__file__).resolve().parent / "golden" / "hostile"
HEADER = ("apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: t}\nspec:\n"
          "  nodes:\n    - {name: node1, ip: 192.168.1.10}\n  objects:\n")


def _security(container_ctx: str | None = None, pod_ctx: str | None = None) -> SecurityContext | None:
    container = "{name: a, image: pause" + (f", securityContext: {container_ctx}" if container_ctx else "") + "}"
    pod = f"securityContext: {pod_ctx}, " if pod_ctx else ""
    text = HEADER + f"    - {{apiVersion: v1, kind: Pod, metadata: {{name: p}}, spec: {{{pod}containers: [{container}]}}}}\n"
    return parse_spec_text(text, "t.yaml").pods[0].containers[0].security


def test_a_container_runs_as_nobody_with_no_capabilities_by_default() -> None:
    ctx = _security()
    assert ctx is not None and (ctx.run_as_user, ctx.run_as_group, ctx.ambient, ctx.root) == (65534, 65534, (), False)


def test_root_must_be_asked_for_and_gets_the_runtime_default_capabilities() -> None:
    ctx = _security("{runAsUser: 0}")
    assert ctx is not None and ctx.root and ctx.run_as_group == 0
    assert set(ctx.capabilities) == set(RUNTIME_DEFAULT_CAPABILITIES) and ctx.ambient == ()


def test_the_containers_own_values_win_over_the_pods() -> None:
    ctx = _security("{runAsUser: 1000}", "{runAsUser: 0, runAsGroup: 2000}")
    assert ctx is not None and (ctx.run_as_user, ctx.run_as_group) == (1000, 2000)
    root = _security(None, "{runAsUser: 0}")
    assert root is not None and root.root


def test_drop_all_then_add_leaves_only_what_is_added() -> None:
    ctx = _security("{capabilities: {drop: [ALL], add: [CAP_NET_BIND_SERVICE]}, allowPrivilegeEscalation: false}")
    assert ctx == SecurityContext(65534, 65534, ("NET_BIND_SERVICE",), ("NET_BIND_SERVICE",), True)
    assert confined(("sleep", "1"), ctx)[1:] == (
        "--reuid=65534", "--regid=65534", "--clear-groups", "--bounding-set=-all,+net_bind_service",
        "--inh-caps=-all,+net_bind_service", "--ambient-caps=-all,+net_bind_service", "--no-new-privs", "--",
        confined(("sleep",), ctx)[-1], "1")


def test_a_default_container_is_exec_d_through_setpriv_with_nothing_ambient() -> None:
    argv = confined(("true",), SecurityContext())
    assert Path(argv[0]).name == "setpriv" and "--inh-caps=-all" in argv and Path(argv[-1]).name == "true"
    assert not any(flag.startswith("--ambient-caps") for flag in argv)


def test_the_addons_run_as_the_lab_does() -> None:
    lab = with_addons(load_spec(Path(__file__).resolve().parents[2] / "labs" / "00-seed"), Path("/nonexistent"))
    assert [c.security for p in lab.pods if p.namespace == "kube-system" for c in p.containers] == [None]


def test_validate_names_the_root_containers_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "root.yaml"
    pods = "".join(f"    - {{apiVersion: v1, kind: Pod, metadata: {{name: p{i}}}, spec: {{securityContext: {{runAsUser: 0}}, "
                   f"containers: [{{name: a, image: pause}}, {{name: b, image: pause}}]}}}}\n" for i in range(6))
    spec.write_text(HEADER + pods)
    assert main(["validate", str(spec)]) == 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert_golden(GOLDEN / "root-warning.txt", err)
    assert root_warning(parse_spec_text(HEADER + pods.replace("runAsUser: 0", "runAsUser: 7"), "t")) is None
