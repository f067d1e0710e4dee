"""Issue 16: property-based fuzzing of the spec loader and the objects loader (hypothesis).

Inputs are YAML documents generated from the loaders' own schema (the pydantic input models, walked field by
field, with valid and hostile values mixed), and the exercises' and valid test specs mutated: a value replaced
by a hostile one (a trailing newline, a NUL, a look-alike, a huge number, the wrong type), a field removed,
renamed or added, a list item repeated, the YAML text itself cut or spliced. For every input, either a clean
result whose kernel names are all plain, or one-line errors naming the file and exit 2, never a traceback
and never a kernel call. The suite runs a few hundred examples in seconds; `-m fuzz` runs many more
(KUBENET_FUZZ_EXAMPLES, default 5000), and prints how many inputs were tried and refused.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import types
import typing
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from apiserver import spec as apiserver_spec
from apiserver.spec import INTERNAL_ERROR, parse_objects, parse_spec_text
from cni.spec import _NetworkPolicyIn
from lab.cli import main
from services.ingress_spec import _IngressIn
from services.spec import _ServiceIn
from topo import names, netns
from topo.errors import SpecError
from topo.object_spec import _NamespaceIn
from topo.workload_spec import _DeploymentIn, _PodIn

ROOT = Path(__file__).resolve().parents[2]
SEEDS = [yaml.safe_load(p.read_text()) for p in sorted(ROOT.glob("labs/*/lab.yaml")) + sorted(
    (ROOT / "tests/unit/specs/valid").glob("*.yaml")) if p.stat().st_size < 4000]
OBJECT_SEEDS = [obj for seed in SEEDS for obj in seed["spec"].get("objects") or []]
RUNNING = parse_spec_text((ROOT / "labs/00-seed/lab.yaml").read_text(), "lab.yaml")
TALLY = {"tried": 0, "refused": 0}

# ---------------------------------------------------------------------------- values

VALID_TEXT = ["node1", "node2", "web", "default", "kube-system", "app", "http", "a", "shop", "agnhost", "pause",
              "netexec", "--http-port=8080", "10.244.0.0/16", "10.96.0.0/12", "192.168.1.10", "192.168.1.0/24",
              "10.96.0.100", "host-gw", "vxlan", "bgp", "TCP", "UDP", "iptables", "nftables", "ClusterIP", "NodePort",
              "Prefix", "Exact", "web.example.com", "/app", "v1", "apps/v1", "Pod", "Service", "ALL",
              "NET_BIND_SERVICE", "ClusterFirst", "cluster.local", "Ingress", "Egress", "dns", "ndots", "5"]
LOOKALIKES = str.maketrans({"a": "\u0430", "e": "\u0435", "o": "\u043e", "1": "\u0661", "k": "\u212a"})
HOSTILE_TEXT = st.one_of(
    st.sampled_from(VALID_TEXT).map(lambda v: v + "\n"),
    st.sampled_from(VALID_TEXT).map(lambda v: v[:1] + "\0" + v[1:]),
    st.sampled_from(VALID_TEXT).map(lambda v: v.translate(LOOKALIKES)),
    st.sampled_from(["", " ", "\t", "-", "..", "*", "a" * 300, "A" * 64, "$(reboot)", "'; rm -rf /", "%s%n",
                     "x\r\ny", "\u202eevil", "../../etc/passwd", "web\u200b", "\ufeffweb", "--comment", "{}", "*.*"]),
    st.text(max_size=12),
)
TEXT = st.one_of(st.sampled_from(VALID_TEXT), HOSTILE_TEXT)
INT = st.one_of(st.sampled_from([0, 1, 2, 3, 24, 80, 8080, 30080, 65535, 65536, -1, 2**31, 2**63 - 1]),
                st.integers(-10, 70000))
ANY = st.one_of(TEXT, INT, st.booleans(), st.none(), st.floats(allow_nan=True), st.builds(list), st.builds(dict),
                st.lists(TEXT, max_size=2), st.dictionaries(TEXT, TEXT, max_size=2))


def _wrong_or(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the right type, sometimes anything (a type error is as worth trying as a bad value)."""
    return st.one_of(strategy, strategy, strategy, strategy, ANY)


def _for_type(annotation: Any, depth: int) -> st.SearchStrategy:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[_for_type(a, depth) for a in args if a is not type(None)])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return from_model(annotation, depth + 1)
    if origin is list:
        return st.lists(_for_type(args[0], depth + 1), max_size=3 if depth < 4 else 1)
    if origin is dict:
        return st.dictionaries(TEXT, _for_type(args[1], depth + 1), max_size=3)
    if annotation is str:
        return TEXT
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return INT
    return ANY


def from_model(model: type[BaseModel], depth: int = 0) -> st.SearchStrategy:
    """Documents shaped by a pydantic input model: required fields always, optional ones sometimes, each
    value valid or hostile; sometimes an unknown field too."""
    if depth > 6:
        return st.just({})
    required, optional = {}, {}
    for name, info in model.model_fields.items():
        key = info.alias or name
        value = _wrong_or(_for_type(info.annotation, depth)) if depth < 6 else ANY
        (required if info.is_required() else optional)[key] = value
    return st.fixed_dictionaries(required, optional=optional)


KIND_MODELS = {("v1", "Namespace"): _NamespaceIn, ("v1", "Pod"): _PodIn, ("apps/v1", "Deployment"): _DeploymentIn,
               ("v1", "Service"): _ServiceIn, ("networking.k8s.io/v1", "Ingress"): _IngressIn,
               ("networking.k8s.io/v1", "NetworkPolicy"): _NetworkPolicyIn}
OBJECT = st.one_of(*[from_model(m).map(lambda d, a=a, k=k: {**d, "apiVersion": a, "kind": k})
                     for (a, k), m in KIND_MODELS.items()])


@st.composite
def lab_documents(draw: st.DrawFn) -> dict:
    data = draw(from_model(apiserver_spec._LabIn))
    data.update(apiVersion=draw(st.sampled_from([apiserver_spec.API_VERSION, apiserver_spec.API_VERSION,
                                                 "v1"])), kind=draw(st.sampled_from(["Lab", "Lab", "Pod"])))
    if isinstance(data.get("spec"), dict) and draw(st.booleans()):
        data["spec"]["objects"] = draw(st.lists(OBJECT, max_size=3))
    return data


# ---------------------------------------------------------------------------- mutations


def _paths(data: Any, here: tuple = ()) -> list[tuple]:
    found = [here]
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, here + (key,))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += _paths(value, here + (index,))
    return found


@st.composite
def mutated(draw: st.DrawFn, seeds: list) -> Any:
    data = draw(st.sampled_from(seeds))
    data = yaml.safe_load(yaml.safe_dump(data))  # a private copy
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        key = path[-1]
        op = draw(st.sampled_from(["replace", "replace", "hostile", "delete", "add", "repeat", "rename"]))
        if op == "replace":
            parent[key] = draw(ANY)
        elif op == "hostile" and isinstance(parent[key], str):
            parent[key] = draw(HOSTILE_TEXT)
        elif op == "hostile":
            parent[key] = draw(st.one_of(HOSTILE_TEXT, INT))
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(TEXT)] = draw(ANY)
        elif op == "repeat" and isinstance(parent, list):
            parent.append(yaml.safe_load(yaml.safe_dump(parent[key])))
        elif op == "rename" and isinstance(parent, dict) and isinstance(key, str):
            parent[draw(st.sampled_from([key + "\n", key.translate(LOOKALIKES), key.lower(), key + "s"]))] = (
                parent.pop(key))
    return data


@st.composite
def as_text(draw: st.DrawFn, documents: st.SearchStrategy) -> str:
    text = yaml.safe_dump(draw(documents), allow_unicode=draw(st.booleans()), sort_keys=False)
    edit = draw(st.sampled_from(["none", "none", "none", "cut", "splice"]))
    if edit != "none" and text:
        at = draw(st.integers(0, len(text)))
        if edit == "cut":
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
        else:
            text = text[:at] + draw(st.sampled_from(["\n", ":", "- ", "&a ", "*a", "!!python/object:os.system ",
                                                     "{", "]", "'", '"', "\t", "\0", "<<: ", "---\n", "%YAML 1.1\n",
                                                     "? ", "\x85", "\ud800"[:0] + "\u2028"])) + text[at:]
    return text


SPEC_INPUTS = st.one_of(as_text(lab_documents()), as_text(mutated(SEEDS)))
OBJECT_INPUTS = st.one_of(as_text(OBJECT), as_text(mutated(OBJECT_SEEDS)),
                          st.lists(as_text(st.one_of(OBJECT, mutated(OBJECT_SEEDS))), min_size=2, max_size=3)
                          .map("---\n".join))

# ---------------------------------------------------------------------------- the properties

_PLAIN = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)


def _clean_error(error: SpecError, file: str) -> None:
    lines = error.lines()
    assert lines, "a SpecError with nothing in it"
    for line in lines:
        assert line.startswith(file), line
        assert "\n" not in line and "\r" not in line and "\0" not in line, repr(line)
    assert INTERNAL_ERROR not in str(error), str(error)
    assert error.exit_code == 2


def _check_spec(text: str) -> None:
    TALLY["tried"] += 1
    try:
        lab = parse_spec_text(text, "fuzz.yaml")
    except SpecError as exc:
        TALLY["refused"] += 1
        _clean_error(exc, "fuzz.yaml")
        return
    # Accepted: every name that becomes a kernel object is plain.
    kernel_names = [names.node_netns(lab.name, n.name) for n in lab.nodes]
    kernel_names += [names.pod_netns(lab.name, p.namespace, p.name) for p in lab.pods]
    kernel_names += [s.name for s in lab.services] + [p.name for s in lab.services for p in s.ports if p.name]
    for name in kernel_names:
        assert _PLAIN.fullmatch(name), repr(name)


def _check_objects(text: str) -> None:
    TALLY["tried"] += 1
    try:
        manifests = parse_objects(text, RUNNING, "objects.yaml")
    except SpecError as exc:
        TALLY["refused"] += 1
        _clean_error(exc, "objects.yaml")
        return
    for manifest in manifests:
        assert _PLAIN.fullmatch(manifest["metadata"]["name"]), manifest["metadata"]["name"]


def _forbid_kernel() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    from lab import apply
    for target, attr in ((apply, "apply"), (apply, "teardown"), (netns, "create"), (netns, "ensure_dir")):
        stack.enter_context(mock.patch.object(target, attr, side_effect=AssertionError("reached the kernel")))
    return stack


FAST = settings(max_examples=80, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=int(os.environ.get("KUBENET_FUZZ_EXAMPLES", "5000")), deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@FAST
@given(SPEC_INPUTS)
def test_the_spec_loader_never_fails_with_a_traceback(text: str) -> None:
    with _forbid_kernel():
        _check_spec(text)


@FAST
@given(OBJECT_INPUTS)
def test_the_objects_loader_never_fails_with_a_traceback(text: str) -> None:
    with _forbid_kernel():
        _check_objects(text)


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(SPEC_INPUTS)
def test_lab_validate_exits_0_or_2_with_one_line_per_problem(tmp_path_factory: pytest.TempPathFactory,
                                                             text: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    err, out = io.StringIO(), io.StringIO()
    with _forbid_kernel(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(["validate", str(path)])
    assert code in (0, 2), err.getvalue()
    assert "Traceback" not in err.getvalue()
    for line in err.getvalue().splitlines():
        assert line.startswith(str(path)) or line.startswith("warning: "), line
    if code == 0:
        assert out.getvalue().startswith(f"{path}: valid")


@pytest.fixture
def selected_with_m_fuzz(request: pytest.FixtureRequest) -> None:
    """The long run is opt-in: it runs only when `-m fuzz` selects it (the suite keeps its seconds)."""
    if "fuzz" not in (request.config.option.markexpr or "") or "not fuzz" in request.config.option.markexpr:
        pytest.skip("the long fuzz run: select it with -m fuzz (KUBENET_FUZZ_EXAMPLES=N sets its size)")


@pytest.mark.fuzz
@pytest.mark.usefixtures("selected_with_m_fuzz")
@LONG
@given(st.one_of(SPEC_INPUTS.map(lambda t: ("spec", t)), OBJECT_INPUTS.map(lambda t: ("objects", t))))
def test_long_fuzz_of_both_loaders(case: tuple[str, str]) -> None:
    kind, text = case
    with _forbid_kernel():
        (_check_spec if kind == "spec" else _check_objects)(text)


def teardown_module() -> None:
    if os.environ.get("KUBENET_FUZZ_REPORT"):
        print(f"\nfuzz: {TALLY['tried']} inputs tried, {TALLY['refused']} refused with one-line errors, "
              f"{TALLY['tried'] - TALLY['refused']} accepted")
