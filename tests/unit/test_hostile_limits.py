"""Issue 16, points 2, 3 and 5: size limits, the cluster DNS pod counted in its node's PodCIDR, and file
errors that say what is wrong (a symlink loop is not "no such file").

Each file just over a limit is refused in one line, cheaply: memory is measured with tracemalloc (the
refusal happens before the file, or the rest of it, is read); wall time only has a generous bound.
No test needs root.
"""
from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from apiserver.spec import load_spec, parse_objects, parse_spec_text, read_manifest
from lab.cli import main
from tests.conftest import assert_golden
from topo import schema
from topo.errors import SpecError

GOLDEN = Path(__file__).resolve().parent / "golden" / "hostile"
HEADER = "apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: t}\nspec:\n"
NODES = "  nodes:\n    - {name: node1, ip: 192.168.1.10}\n"


def _measured(action: Callable[[], Any]) -> tuple[list[str], int, float]:
    """The lines of the SpecError `action` raises, the peak memory it allocated, and the time it took."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(SpecError) as info:
            action()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return info.value.lines(), peak, time.monotonic() - start


def _one_line(lines: list[str], *words: str) -> str:
    assert len(lines) == 1, lines
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- the file itself


@pytest.mark.parametrize("size", [schema.MAX_FILE_BYTES + 1, 2 * 1024 ** 3])
def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path, size: int) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:  # sparse: costs no disk
        fh.truncate(size)
    lines, peak, _seconds = _measured(lambda: load_spec(big))
    _one_line(lines, str(big), "MiB")
    assert peak < 1_000_000  # bounded memory; time is lab bench's business, not a unit test's


def test_a_stream_over_the_size_limit_stops_reading_at_the_limit(tmp_path: Path) -> None:
    """A file whose size stat cannot tell (a FIFO, /dev/zero) is refused, never read to its end."""
    lines, peak, _ = _measured(lambda: read_manifest("/dev/zero"))
    _one_line(lines, "/dev/zero", "not a regular file")
    assert peak < 1_000_000


def test_the_size_limit_is_one_line_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.truncate(150 * 1024 * 1024)
    assert main(["validate", str(big)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{big}: ") and "150.0 MiB" in err[0]


def test_a_symlink_loop_is_not_reported_as_a_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.symlink("b.yaml", "a.yaml")
    os.symlink("a.yaml", "b.yaml")
    with pytest.raises(SpecError) as info:
        load_spec("a.yaml")
    assert_golden(GOLDEN / "symlink-loop.err", "\n".join(info.value.lines()) + "\n")


def test_a_dangling_symlink_names_its_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.symlink("gone.yaml", "lab.yaml")
    with pytest.raises(SpecError) as info:
        load_spec("lab.yaml")
    assert_golden(GOLDEN / "dangling-symlink.err", "\n".join(info.value.lines()) + "\n")


def test_a_folder_given_as_the_objects_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        read_manifest(tmp_path)
    _one_line(info.value.lines(), "a folder")


# ---------------------------------------------------------------------------- counts and lengths


def _namespaces(count: int) -> str:
    return "".join(f"    - {{apiVersion: v1, kind: Namespace, metadata: {{name: n{i}}}}}\n" for i in range(count))


def test_one_object_over_the_limit_is_refused_before_any_object_is_checked() -> None:
    text = HEADER + NODES + "  objects:\n" + _namespaces(schema.MAX_OBJECTS + 1)
    lines, peak, _seconds = _measured(lambda: parse_spec_text(text, "t.yaml"))
    _one_line(lines, "t.yaml:7: spec.objects:", str(schema.MAX_OBJECTS))
    assert peak < 100_000_000  # bounded memory; time is lab bench's business, not a unit test's


def test_an_objects_file_over_the_object_limit_is_refused() -> None:
    lab = parse_spec_text(HEADER + NODES, "t.yaml")
    docs = "---\n".join(f"{{apiVersion: v1, kind: Namespace, metadata: {{name: n{i}}}}}\n"
                        for i in range(schema.MAX_OBJECTS + 1))
    lines, _, _ = _measured(lambda: parse_objects(docs, lab, "objs.yaml"))
    _one_line(lines, "objs.yaml", str(schema.MAX_OBJECTS))


def test_one_node_over_the_limit_is_refused() -> None:
    nodes = "".join(f"    - {{name: n{i}, ip: 10.1.{i // 250}.{i % 250 + 1}}}\n" for i in range(schema.MAX_NODES + 1))
    text = HEADER + "  underlay: {subnet: 10.1.0.0/16}\n  nodes:\n" + nodes
    lines, peak, _ = _measured(lambda: parse_spec_text(text, "t.yaml"))
    _one_line(lines, "spec.nodes", str(schema.MAX_NODES))
    assert peak < 50_000_000


def test_a_string_over_the_length_limit_is_refused() -> None:
    text = HEADER + NODES + f"  objects: [{{apiVersion: v1, kind: Namespace, metadata: {{name: {'a' * (schema.MAX_STRING + 1)}}}}}]\n"
    lines, peak, _ = _measured(lambda: parse_spec_text(text, "t.yaml"))
    _one_line(lines, "spec.objects[0].metadata.name", f"{schema.MAX_STRING + 1} characters")
    assert peak < 50_000_000


def test_a_key_over_the_length_limit_is_refused() -> None:
    text = HEADER + NODES + f"  {'k' * (schema.MAX_KEY + 1)}: 1\n"
    lines, _, _ = _measured(lambda: parse_spec_text(text, "t.yaml"))
    assert any("characters" in line and str(schema.MAX_KEY) in line for line in lines), lines


def _deployment(replicas: int, mask: int = 24, nodes: int = 1) -> str:
    listed = "".join(f"    - {{name: node{i + 1}, ip: 192.168.1.{10 + i}}}\n" for i in range(nodes))
    return (HEADER + f"  cluster: {{podCIDR: 10.0.0.0/8, serviceCIDR: 172.16.0.0/16, nodeCIDRMaskSize: {mask}}}\n  nodes:\n" + listed
            + "  dns: {enabled: false}\n  objects:\n"
            + "    - apiVersion: apps/v1\n      kind: Deployment\n      metadata: {name: web}\n"
            + f"      spec:\n        replicas: {replicas}\n        selector: {{matchLabels: {{app: web}}}}\n"
            + "        template:\n          metadata: {labels: {app: web}}\n"
            + "          spec: {containers: [{name: app, image: pause}]}\n")


def test_huge_replicas_are_refused_without_making_them() -> None:
    """A /9 per node would hold millions of pods: the per-node cap bounds what a Deployment may ask for."""
    lines, peak, _seconds = _measured(lambda: parse_spec_text(_deployment(2 ** 62, mask=9), "t.yaml"))
    _one_line(lines, "spec.objects[0].spec.replicas", f"({schema.MAX_PODS_PER_NODE} pods in all)")
    assert peak < 10_000_000  # bounded memory; time is lab bench's business, not a unit test's


def test_pods_over_the_lab_limit_are_refused_before_they_are_named() -> None:
    nodes = schema.MAX_PODS // schema.MAX_PODS_PER_NODE + 2  # room on the nodes: the lab limit is what refuses
    lines, peak, _ = _measured(lambda: parse_spec_text(_deployment(schema.MAX_PODS + 1, 16, nodes=nodes), "t.yaml"))
    _one_line(lines, "spec.objects[0].spec.replicas", f"at most {schema.MAX_PODS} pods")
    assert peak < 10_000_000


def test_pods_per_node_are_capped_even_where_the_podcidr_holds_more() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec_text(_deployment(schema.MAX_PODS_PER_NODE + 1, mask=16), "t.yaml")
    _one_line(info.value.lines(), "spec.objects[0].spec.replicas", f"({schema.MAX_PODS_PER_NODE} pods in all)")
    text = _deployment(schema.MAX_PODS_PER_NODE + 1, mask=16, nodes=2).replace(
        "metadata: {labels: {app: web}}\n          spec: {", "metadata: {labels: {app: web}}\n          spec: {nodeName: node1, ")
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, "t.yaml")
    _one_line(info.value.lines(), "node1", f"at most {schema.MAX_PODS_PER_NODE}")
    parse_spec_text(_deployment(schema.MAX_PODS_PER_NODE, mask=16), "t.yaml")


# ---------------------------------------------------------------------------- point 3: addons take a pod address


def _pods(count: int, node: str) -> str:
    return "".join(f"    - {{apiVersion: v1, kind: Pod, metadata: {{name: p{i}}}, spec: {{nodeName: {node}, "
                   f"containers: [{{name: app, image: pause}}]}}}}\n" for i in range(count))


def test_the_cluster_dns_pod_counts_in_its_nodes_podcidr() -> None:
    """A /29 holds 5 pods; the cluster DNS pod runs on the last node, so only 4 of the user's fit there."""
    base = HEADER + "  cluster: {nodeCIDRMaskSize: 29}\n" + NODES + "  objects:\n"
    parse_spec_text(base + _pods(4, "node1"), "t.yaml")
    with pytest.raises(SpecError) as info:
        parse_spec_text(base + _pods(5, "node1"), "t.yaml")
    _one_line(info.value.lines(), "cluster DNS", "kube-system/coredns")
    parse_spec_text(base.replace("spec:\n", "spec:\n  dns: {enabled: false}\n") + _pods(5, "node1"), "t.yaml")


def test_every_pod_of_an_accepted_spec_gets_an_address() -> None:
    """What validation accepts, `lab up` can place: user pods plus the addons fit every node's PodCIDR."""
    from services.addons import with_addons
    base = HEADER + "  cluster: {nodeCIDRMaskSize: 29}\n" + NODES + "  objects:\n" + _pods(4, "node1")
    lab = with_addons(parse_spec_text(base, "t.yaml"), Path("/nonexistent"))
    for node in lab.nodes:
        assert len(lab.pods_on(node.name)) <= node.pod_capacity


def test_the_hostile_file_cases_are_counted(tmp_path: Path) -> None:
    """Sanity of the limits' own numbers: every limit is far above what the exercises use."""
    root = Path(__file__).resolve().parents[2]
    for spec in sorted(root.glob("labs/*/lab.yaml")):
        assert spec.stat().st_size * 10 < schema.MAX_FILE_BYTES
        data = yaml.safe_load(spec.read_text())
        assert len(data["spec"].get("objects") or []) * 5 < schema.MAX_OBJECTS
        assert len(data["spec"]["nodes"]) * 5 < schema.MAX_NODES
