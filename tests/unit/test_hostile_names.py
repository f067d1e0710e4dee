"""Issue 16, point 1: every name of a spec is matched in full, so a trailing newline, a NUL or a non-ASCII
look-alike never reaches a namespace name, an iptables-restore comment or a dnsmasq config.

`re.match` with `$` accepts "web\n" (`$` matches before a final newline); each name field below is given
three hostile variants of a valid value, and each must be refused with the field's path. No test needs root.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from apiserver.spec import parse_objects, parse_spec_text
from topo.errors import SpecError

ROOT = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "apiVersion": "kubenet-lab/v1alpha1",
    "kind": "Lab",
    "metadata": {"name": "hostile"},
    "spec": {
        "cluster": {"podCIDR": "10.244.0.0/16", "serviceCIDR": "10.96.0.0/12"},
        "underlay": {"subnet": "192.168.1.0/24"},
        "dns": {"domain": "cluster.local"},
        "nodes": [{"name": "node1", "ip": "192.168.1.10"}, {"name": "node2", "ip": "192.168.1.11"}],
        "external": [{"name": "ext", "ip": "192.168.1.200", "serves": ["http", "dns"], "names": ["api.example.com"]}],
        "objects": [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web", "tier": "front"}},
             "spec": {"nodeName": "node1", "containers": [
                 {"name": "app", "image": "agnhost", "args": ["netexec", "--http-port=8080"],
                  "ports": [{"name": "http", "containerPort": 8080}], "env": [{"name": "MODE", "value": "x"}]}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
             "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
            {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "web", "namespace": "shop"},
             "spec": {"rules": [{"host": "web.example.com", "http": {"paths": [
                 {"path": "/app", "pathType": "Prefix",
                  "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}},
        ],
    },
}

# (where the value is, the field path the error must name): every name a spec gives.
FIELDS: list[tuple[tuple[Any, ...], str]] = [
    (("metadata", "name"), "metadata.name"),
    (("spec", "nodes", 0, "name"), "spec.nodes[0].name"),
    (("spec", "nodes", 0, "ip"), "spec.nodes[0].ip"),
    (("spec", "cluster", "podCIDR"), "spec.cluster.podCIDR"),
    (("spec", "dns", "domain"), "spec.dns.domain"),
    (("spec", "external", 0, "name"), "spec.external[0].name"),
    (("spec", "external", 0, "names", 0), "spec.external[0].names[0]"),
    (("spec", "objects", 0, "metadata", "name"), "spec.objects[0].metadata.name"),
    (("spec", "objects", 1, "metadata", "name"), "spec.objects[1].metadata.name"),
    (("spec", "objects", 1, "metadata", "namespace"), "spec.objects[1].metadata.namespace"),
    (("spec", "objects", 1, "metadata", "labels", "app"), "spec.objects[1].metadata.labels.app"),
    (("spec", "objects", 1, "spec", "containers", 0, "name"), "spec.objects[1].spec.containers[0].name"),
    (("spec", "objects", 1, "spec", "containers", 0, "ports", 0, "name"),
     "spec.objects[1].spec.containers[0].ports[0].name"),
    (("spec", "objects", 1, "spec", "containers", 0, "env", 0, "name"),
     "spec.objects[1].spec.containers[0].env[0].name"),
    (("spec", "objects", 2, "metadata", "name"), "spec.objects[2].metadata.name"),
    (("spec", "objects", 2, "spec", "ports", 0, "name"), "spec.objects[2].spec.ports[0].name"),
    (("spec", "objects", 3, "spec", "rules", 0, "host"), "spec.objects[3].spec.rules[0].host"),
    (("spec", "objects", 3, "spec", "rules", 0, "http", "paths", 0, "path"),
     "spec.objects[3].spec.rules[0].http.paths[0].path"),
]

# Non-ASCII characters that look like ASCII ones: Cyrillic letters, the Kelvin sign (which `[a-z]` with
# re.IGNORECASE matches), Arabic-Indic digits (which `\d` matches).
LOOKALIKE = {"a": "\u0430", "e": "\u0435", "o": "\u043e", "p": "\u0440", "c": "\u0441", "x": "\u0445",
             "k": "\u212a", "1": "\u0661", "0": "\u0660", "2": "\u0662", "M": "\u041c", "O": "\u041e"}


def lookalike(value: str) -> str:
    for index, ch in enumerate(value):
        if ch in LOOKALIKE:
            return value[:index] + LOOKALIKE[ch] + value[index + 1:]
    raise AssertionError(f"no look-alike for {value!r}")


VARIANTS = {
    "trailing-newline": lambda v: v + "\n",
    "nul": lambda v: v[:1] + "\0" + v[1:],
    "lookalike": lookalike,
}


def _get(data: Any, where: tuple[Any, ...]) -> Any:
    for part in where:
        data = data[part]
    return data


def _set(data: Any, where: tuple[Any, ...], value: Any) -> None:
    _get(data, where[:-1])[where[-1]] = value


def _text(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def test_the_base_spec_is_valid() -> None:
    parse_spec_text(_text(BASE), "t.yaml")


def _refused(data: Any, path: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec_text(_text(data), "t.yaml")
    lines = info.value.lines()
    assert any(f": {path}: " in line or f": {path}[" in line for line in lines), lines
    assert all(line.startswith("t.yaml") and "\n" not in line for line in lines)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("where,path", FIELDS, ids=[p for _, p in FIELDS])
def test_a_hostile_name_is_refused_with_its_field_path(where: tuple[Any, ...], path: str, variant: str) -> None:
    data = copy.deepcopy(BASE)
    _set(data, where, VARIANTS[variant](_get(data, where)))
    _refused(data, path)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_hostile_label_key_is_refused(variant: str) -> None:
    data = copy.deepcopy(BASE)
    labels = data["spec"]["objects"][1]["metadata"]["labels"]
    labels[VARIANTS[variant]("tier")] = labels.pop("tier")
    with pytest.raises(SpecError) as info:
        parse_spec_text(_text(data), "t.yaml")
    assert any("spec.objects[1].metadata.labels[" in line and "label key" in line for line in info.value.lines())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_service_named_with_a_hostile_name_is_refused_by_lab_apply(variant: str) -> None:
    """The issue's "evil\\n" Service applied to a running lab: refused, with its path."""
    lab = parse_spec_text(_text(BASE), "t.yaml")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": VARIANTS[variant]("evil")},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    with pytest.raises(SpecError) as info:
        parse_objects(_text(service), lab, "svc.yaml")
    assert any(line.startswith("svc.yaml:") and ": metadata.name: " in line for line in info.value.lines())


# Modules whose patterns parse the kernel's own output (not spec text); anchoring there is about parsing.
_PARSERS = {"observe/kernel.py", "services/dns.py", "grading/probes.py", "grading/faults.py"}


def test_no_validation_pattern_relies_on_a_dollar_anchor() -> None:
    """`$` in a pattern matches before a final newline: validation patterns use fullmatch (or end in \\Z)."""
    offenders = []
    for file in sorted(ROOT.glob("*/*.py")):
        rel = str(file.relative_to(ROOT))
        if rel.startswith(("tests/", "bench/", ".")) or rel in _PARSERS:
            continue
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if re.search(r"""re\.(compile|match|search|fullmatch)\(r?["'][^"']*\$["']""", line):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize(("given", "shown"), [("node1", "node1"), ("default/web", "default/web"),
                                              ("node1\n", "'node1\\n'"), ("", "''"), ("a b", "'a b'"),
                                              ("x\x00", "'x\\x00'")])
def test_a_name_typed_on_the_command_line_is_quoted_in_messages_when_not_one_printable_word(
        given: str, shown: str) -> None:
    """What the CLI's lookups ("no pod NAME in lab ...") print: a newline must not split the one-line error."""
    from topo import names

    assert names.shown(given) == shown
