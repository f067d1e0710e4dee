"""The validation core that every layer's spec checks share: strict YAML with positions, issues, structure.

The tool runs as root and turns every name and address of a spec into kernel objects, so nothing reaches
the model unchecked. Every check collects all the problems it finds before the whole lot is raised as one
`SpecError` (a learner fixes a file in one go, not one line per run). What those checks have in common
lives here, below every layer:

- YAML -> plain data, remembering the line of every field (`Source`, `compose`), so each message points at
  a line. Keys must be strings and given once, numbers fit in int64, documents stay small and shallow.
- `Issues`, the collector: field paths printed as Kubernetes prints them, sorted by line, capped.
- Structure: types, required and unknown fields, by pydantic models with `extra="forbid"` (`StrictModel`);
  `validate` turns pydantic's errors into messages that say how YAML read a value and how to fix it.
- Small helpers for messages (`short`, `show`, `close_match`, ...). The IPv4 network and address readers
  several layers use are in `topo.address_spec`.

`StrictDocument` reads another strictly checked file of the project (an exercise's checks.yaml) the same way.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Callable

import yaml

# The lab uses no pydantic plugin, and looking for one reads the metadata of every installed distribution
# when the first model is built: 30 ms of every `lab` command (one-pod `lab apply` on the seed lab, best of
# 8: 0.35 -> 0.31 s). PYDANTIC_DISABLE_PLUGINS is pydantic's documented switch; a value the user set wins.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
from pydantic import BaseModel, ConfigDict, ValidationError  # noqa: E402 (after the switch above)

from topo.errors import SpecError, SpecIssue

MAX_VALUES = 1_000_000  # YAML values after alias expansion: stops "billion laughs" documents
MAX_DEPTH = 64  # nesting depth of YAML values; real manifests stay under 15
MAX_ISSUES = 50  # issues shown; more only bury the first ones
INT_LIMIT = 2**63  # Kubernetes numbers are int64 at most; larger ones are almost surely typos

# Limits a real lab never meets, so a huge or hostile file is refused in one line, cheaply, before the rest of
# it is read or built. Kubernetes refuses an object over about 1.5 MiB (etcd's request limit); the largest
# exercise (labs/08-proxy-scale, 300 Services) is 46 KB, and `lab bench` runs 50 nodes x 20 pods.
MIB = 1024 * 1024
MAX_FILE_BYTES = 1 * MIB  # a lab spec or an objects file: checked by size before it is read
MAX_OBJECTS = 2000  # objects of one spec or objects file
MAX_NODES = 200  # nodes of a lab (each is a network namespace with its own daemons)
MAX_PODS = 20_000  # pods of a lab, replicas included (checked before replicas are named); `lab bench scale` goes to 10,000
MAX_PODS_PER_NODE = 1024  # even where the PodCIDR holds more (kubelet's default maxPods is 110)
MAX_STRING = 64 * 1024  # characters of one YAML value (names are 253 at most; a command line may be long)
MAX_KEY = 512  # characters of one key (a label key is 253 + 1 + 63 at most)

Loc = tuple[Any, ...]  # a field's position: keys and list indexes from the document's top


# ---------------------------------------------------------------------------- YAML with line numbers


@dataclass
class Source:
    """Where each value of a YAML text was written: the line of every field, the text of every scalar."""

    lines: dict[Loc, int] = field(default_factory=dict)
    raw: dict[Loc, str] = field(default_factory=dict)
    bad: set[Loc] = field(default_factory=set)  # values already reported while reading the YAML

    def line(self, loc: Loc) -> int | None:
        """The line of `loc`, or of the nearest enclosing value that exists (for a missing field)."""
        for end in range(len(loc), -1, -1):
            try:
                hit = self.lines.get(tuple(loc[:end]))
            except TypeError:  # an unhashable key from a caller's dict
                hit = None
            if hit is not None:
                return hit
        return None


class Issues:
    """Collects every problem found, so one run reports them all."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.items: list[SpecIssue] = []
        # (kind, namespace, name) of objects a reader refused: references to them are not reported again
        self.refused: set[tuple[str, str, str]] = set()

    def add(self, loc: Loc, message: str, line: int | None = None) -> None:
        if loc in self.source.bad:
            return  # the YAML reader already said what is wrong with this value
        self.items.append(SpecIssue(field_path(loc), message, line if line is not None else self.source.line(loc)))

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self, file: str | None) -> None:
        if not self.items:
            return
        unique: list[SpecIssue] = []
        seen: set[tuple[str, str, int | None]] = set()
        for issue in self.items:
            if (issue.path, issue.message, issue.line) not in seen:
                seen.add((issue.path, issue.message, issue.line))
                unique.append(issue)
        unique.sort(key=lambda i: i.line if i.line is not None else 0)  # stable: same line keeps order
        if len(unique) > MAX_ISSUES:
            rest = len(unique) - MAX_ISSUES
            unique = unique[:MAX_ISSUES] + [SpecIssue("", f"... and {rest} more problems; fix these first")]
        raise SpecError(file, unique)


class _Abort(Exception):
    """Stops reading a YAML document that is too big or too deep; the issue is already recorded."""


_TAG = "tag:yaml.org,2002:"
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*", re.ASCII)
_BRACKET_KEY = re.compile(r"[A-Za-z0-9_./-]+", re.ASCII)


def field_path(loc: Loc) -> str:
    """Field path as Kubernetes prints it: spec.nodes[1].podCIDR, metadata.labels[app.kubernetes.io/name]."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        elif isinstance(part, str) and _BRACKET_KEY.fullmatch(part):
            out += f"[{part}]"
        else:
            out += f"[{short(json.dumps(part, ensure_ascii=True, default=repr), 60)}]"
    return out


class _Walker:
    """Builds plain data from a composed YAML node tree, recording each field's line as it goes.

    It gives what yaml.safe_load gives, with three deliberate differences that Kubernetes' own YAML
    reading also has: keys must be strings, a key may not be given twice, and numbers beyond int64 are
    refused (rather than silently becoming huge Python ints).
    """

    def __init__(self, loader: yaml.SafeLoader, source: Source, issues: Issues) -> None:
        self.loader = loader
        self.source = source
        self.issues = issues
        self.count = 0
        self.active: set[int] = set()  # nodes being built: an alias to one of them is a cycle

    def value(self, node: yaml.Node, loc: Loc, depth: int = 0) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            self._stop(node, loc, f"the YAML expands to more than {MAX_VALUES} values (too many repeated "
                                  "aliases?): a lab spec is far smaller")
        if depth > MAX_DEPTH:
            self._stop(node, loc, f"the YAML is nested more than {MAX_DEPTH} levels deep: a lab spec is far flatter")
        if id(node) in self.active:
            self._problem(node, loc, "this alias repeats a value that contains it; YAML may repeat a value "
                                     "with an alias, but not inside itself")
            return None
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, loc)
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node, loc, depth)
            return self._mapping(node, loc, depth)
        finally:
            self.active.discard(id(node))

    def _stop(self, node: yaml.Node, loc: Loc, message: str) -> None:
        self._problem(node, loc, message)
        raise _Abort()

    def _problem(self, node: yaml.Node, loc: Loc, message: str) -> None:
        self.issues.add(loc, message, node.start_mark.line + 1)
        self.source.bad.add(loc)

    def _scalar(self, node: yaml.ScalarNode, loc: Loc) -> Any:
        if len(node.value) > MAX_STRING:
            self._problem(node, loc, f"this value is {len(node.value)} characters; at most {MAX_STRING} are allowed "
                                     "in one value of a lab spec: shorten it")
            return None
        self.source.raw[loc] = node.value
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            self._problem(node, loc, f"YAML tag {short(node.tag, 40)} is not supported here: remove it "
                                     f"({short(str(exc.problem), 80)})")
            return None
        except Exception:  # int() beyond Python's digit limit, impossible dates, ...
            what = "a number this large" if node.tag == _TAG + "int" else short(repr(node.value), 40)
            self._problem(node, loc, f"cannot read {what}: check the value (quote it if it is text)")
            return None
        if isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value < INT_LIMIT:
            self._problem(node, loc, f"the number {short(node.value, 30)} is too large: Kubernetes numbers are "
                                     "64-bit at most")
            return None
        return value

    def _sequence(self, node: yaml.SequenceNode, loc: Loc, depth: int) -> list[Any] | None:
        if node.tag != _TAG + "seq":
            self._problem(node, loc, f"YAML tag {short(node.tag, 40)} is not supported here: write a plain list")
            return None
        items = []
        for index, child in enumerate(node.value):
            self.source.lines[loc + (index,)] = child.start_mark.line + 1
            items.append(self.value(child, loc + (index,), depth + 1))
        return items

    def _mapping(self, node: yaml.MappingNode, loc: Loc, depth: int) -> dict[str, Any] | None:
        if node.tag != _TAG + "map":
            self._problem(node, loc, f"YAML tag {short(node.tag, 40)} is not supported here: write a plain mapping")
            return None
        result: dict[str, Any] = {}
        merges = [value for key, value in node.value if key.tag == _TAG + "merge"]
        for merged in self._merged(merges, loc, depth):
            result.update(merged)
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _TAG + "merge":
                continue
            key = self._key(key_node, loc)
            if key is None:
                continue
            key_line = key_node.start_mark.line + 1
            if key in first_line:
                self.issues.add(loc + (key,), f"key {key!r} is given twice (first on line {first_line[key]}): "
                                              "keep one", key_line)
            first_line.setdefault(key, key_line)
            self.source.lines[loc + (key,)] = key_line
            result[key] = self.value(value_node, loc + (key,), depth + 1)
        return result

    def _merged(self, merges: list[yaml.Node], loc: Loc, depth: int) -> list[dict[str, Any]]:
        """YAML merge keys (<<: *base): earlier sources win over later ones, explicit keys over all."""
        sources: list[yaml.Node] = []
        for merge in merges:
            parts = merge.value if isinstance(merge, yaml.SequenceNode) else [merge]
            for part in parts:
                if isinstance(part, yaml.MappingNode):
                    sources.append(part)
                else:
                    self._problem(part, loc, "'<<' merges a mapping (or a list of mappings) into this one")
        built = [self.value(part, loc, depth + 1) for part in reversed(sources)]
        return [b for b in built if isinstance(b, dict)]

    def _key(self, node: yaml.Node, loc: Loc) -> str | None:
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.ScalarNode):
            self.issues.add(loc, "a key must be a plain string, not a list or mapping", line)
            return None
        if len(node.value) > MAX_KEY:
            self.issues.add(loc, f"a key of {len(node.value)} characters: at most {MAX_KEY} are allowed "
                                 f"({short(repr(node.value), 40)})", line)
            return None
        try:
            key = self.loader.construct_object(node, deep=True)
        except Exception:
            key = None
        if isinstance(key, str):
            return key
        text = short(node.value, 40)
        self.issues.add(loc, f"key {text or '(empty)'} is read by YAML as {describe(key)}, but keys must be "
                             f"strings: quote it ({json.dumps(node.value)})", line)
        return None


def yaml_error(exc: yaml.YAMLError, text: str) -> SpecIssue:
    """One issue for a YAML syntax error, at the line where the reader noticed it, with a likely fix (also for
    the project's other YAML files: an exercise's answers)."""
    if isinstance(exc, yaml.reader.ReaderError):
        line = text[: max(exc.position, 0)].count("\n") + 1
        char = exc.character
        code = f"#x{char:04x}" if isinstance(char, int) else f"#x{ord(char):04x}" if isinstance(char, str) and char else "?"
        return SpecIssue("", f"the text holds a character YAML does not allow ({code}, {exc.reason}): remove it", line)
    problem = str(getattr(exc, "problem", None) or exc)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    if "but found another document" in problem:
        return SpecIssue("", "a lab spec is a single YAML document, but a second one starts here: remove the "
                             "'---' (Kubernetes objects go under spec.objects)", line)
    return SpecIssue("", f"YAML syntax error: {short(problem, 120)}: {_yaml_hint(problem)}", line)


def _yaml_hint(problem: str) -> str:
    if "\\t" in problem or "tab" in problem:
        return "indent with spaces; YAML does not allow tabs"
    if "mapping values are not allowed" in problem:
        return "a ': ' inside a value starts a new key; quote the value or fix the indentation"
    if "could not find expected ':'" in problem:
        return "every line of a mapping needs 'key: value'; check the indentation of this line and the one before"
    if "undefined alias" in problem:
        return "an alias *name needs an anchor &name defined before it"
    if "expected <block end>" in problem:
        return "this line is indented differently from the entries around it; align it"
    if "found unexpected end of stream" in problem or "found unexpected" in problem or "'<stream end>'" in problem:
        return "a quote or bracket is not closed; close it"
    return "check the indentation and quoting here"


def compose(text: str, source: Source, issues: Issues, prefix: Callable[[int, int], Loc] | None
            ) -> list[Any] | None:
    """Read the YAML documents of `text` into plain data (None: a syntax error, already recorded).

    With prefix None the text must hold one document; otherwise every document is read and prefix(index,
    count) gives the path under which its fields are recorded.
    """
    if not isinstance(text, str):
        issues.add((), "the spec must be text")
        return None
    try:
        loader = yaml.SafeLoader(text)  # the reader already rejects control characters here
    except yaml.YAMLError as exc:
        issue = yaml_error(exc, text)
        issues.add((), issue.message, issue.line)
        return None
    try:
        try:
            if prefix is None:
                nodes = [loader.get_single_node()]
            else:
                nodes = []
                while loader.check_node():
                    nodes.append(loader.get_node())
        except yaml.YAMLError as exc:
            issue = yaml_error(exc, text)
            issues.add((), issue.message, issue.line)
            return None
        real = [n for n in nodes if n is not None and not _is_null(n)]
        walker = _Walker(loader, source, issues)
        documents: list[Any] = []
        for index, node in enumerate(real):
            base = prefix(index, len(real)) if prefix is not None else ()
            source.lines[base] = node.start_mark.line + 1
            try:
                documents.append(walker.value(node, base))
            except _Abort:
                return None
        return documents
    finally:
        loader.dispose()


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _TAG + "null"


# ---------------------------------------------------------------------------- structure: pydantic models


class StrictModel(BaseModel):
    """Structural rules shared by every model: no unknown keys, no type coercion.

    Strict mode is what makes a YAML 1.1 surprise an error instead of a silent conversion: `name: on`
    is a boolean, `name: 0123` an integer, and neither becomes a string behind the learner's back.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StrictDocument:
    """Another strictly checked YAML file of the project (an exercise's checks.yaml) read with this module's
    reader, so its messages look like a spec's: `file:line: field.path: message`, every problem at once.

    `model` is validated structurally (a `StrictModel`); callers then check meaning with `add()` at field
    paths (tuples of keys and list indexes) and finish with `raise_if_any()`.
    """

    def __init__(self, text: str, file: str | None, model: type[BaseModel], what: str) -> None:
        self.file = file
        self.issues = Issues(Source())
        try:
            documents = compose(text, self.issues.source, self.issues, None)
            self.issues.raise_if_any(file)
            data = documents[0] if documents else None
            if not isinstance(data, dict):
                self.issues.add((), f"the top level must be a mapping: {what}")
                self.issues.raise_if_any(file)
            self.data: dict[str, Any] = data  # type: ignore[assignment]
            self.model = validate(model, data, (), self.issues)
        except SpecError:
            raise
        except RecursionError:
            raise SpecError(file, [SpecIssue("", "the YAML is nested too deeply")]) from None

    def add(self, loc: Loc, message: str) -> None:
        self.issues.add(loc, message)

    def raise_if_any(self) -> None:
        self.issues.raise_if_any(self.file)


_M = typing.TypeVar("_M", bound=BaseModel)


def validate(model: type[_M], value: Any, loc: Loc, issues: Issues) -> _M | None:
    """Validate `value` against `model`, turning each pydantic error into an issue at its own path."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False)
        # A misspelt required field is one mistake: its unknown-field line names the field meant, so the
        # field's "missing" line is left out (it said the same thing twice, the second time on no line of its own).
        meant = {tuple(e["loc"][:-1]) + (close,) for e in errors if e["type"] == "extra_forbidden"
                 and (close := meant_field(str(e["loc"][-1]), _allowed_fields(model, tuple(e["loc"][:-1]))))}
        for err in errors:
            rel = tuple(err["loc"])
            if rel and rel[-1] == "[key]":
                issues.add(loc + rel[:-1], "keys must be strings")
                continue
            if err["type"] == "missing" and rel in meant:
                continue
            issues.add(loc + rel, _pydantic_message(model, rel, err, issues.source.raw.get(loc + rel)))
        return None


_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "bool_type": "true or false",
    "float_type": "a number",
    "list_type": "a list",
    "dict_type": "a mapping (key: value)",
    "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)",
}


def _pydantic_message(model: type[BaseModel], rel: Loc, err: Any, raw: str | None) -> str:
    kind = err["type"]
    if kind == "missing":
        example = _field_example(model, rel)
        return f"missing; add it, e.g. {example}" if example else "missing; add it"
    if kind == "extra_forbidden":
        return unknown_field(str(rel[-1]), _allowed_fields(model, rel[:-1]))
    if kind == "invalid_key":
        return "keys must be strings"
    if kind in _EXPECTED:
        return wrong_type(_EXPECTED[kind], err.get("input"), raw)
    return str(err.get("msg", "invalid value"))


def meant_field(key: str, allowed: list[str] | tuple[str, ...]) -> str | None:
    """The allowed field a misspelt key stands for, if one is close; the match ignores case, the usual slip
    (podCidr)."""
    lowered = {a.lower(): a for a in allowed}
    close = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.75)
    return lowered[close[0]] if close else None


def unknown_field(key: str, allowed: list[str] | tuple[str, ...]) -> str:
    """Unknown-key message with a suggestion (meant_field)."""
    close = meant_field(key, allowed)
    shown = short(repr(key), 60)
    if close:
        return f"unknown field {shown} (did you mean {close!r}?)"
    if allowed:
        return f"unknown field {shown} (allowed here: {', '.join(allowed)})"
    return f"unknown field {shown}"


def wrong_type(expected: str, value: Any, raw: str | None) -> str:
    """Type mismatch message; for YAML's implicit typing it says how YAML read the text and how to fix it."""
    text = raw if raw is not None and "\n" not in raw and raw != "" else None
    if value is None and raw == "":
        return f"must be {expected}, but no value is given: write one after the colon"
    if value is None:
        return f"must be {expected}, got null"
    if expected == "a string" and isinstance(value, (bool, int, float, date)):
        shown = text if text is not None else show(value)
        return f"must be a string, but YAML reads {shown} as {describe(value)}: quote it ({json.dumps(shown)})"
    if isinstance(value, str) and expected in ("an integer", "a number") and looks_numeric(value):
        return f"must be {expected}, got the string {short(repr(value), 30)}: remove the quotes"
    if isinstance(value, bool) and expected != "true or false":
        shown = text if text is not None else show(value)
        return f"must be {expected}, but YAML reads {shown} as a boolean"
    return f"must be {expected}, got {describe(value)}"


def looks_numeric(value: str) -> bool:
    return re.fullmatch(r"\s*-?\d+(\.\d*)?\s*", value, re.ASCII) is not None


def describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, str):
        return f"the string {short(repr(value), 40)}"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def show(value: Any) -> str:
    """A value for a message, never long and never failing (str() of a huge int raises in Python 3.11)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if -INT_LIMIT <= value < INT_LIMIT else "a very large number"
    if isinstance(value, str):
        return short(value, 60)
    return short(repr(value), 60)


def short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unwrap(annotation: Any) -> Any:
    """X | None -> X (pydantic reports errors of an optional field at the field itself)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _model_at(model: type[BaseModel], rel: Loc) -> type[BaseModel] | None:
    """The model class that validates the value at `rel` inside `model`, if it is one."""
    current: Any = model
    for part in rel:
        current = _unwrap(current)
        if isinstance(part, int):
            if typing.get_origin(current) is not list:
                return None
            current = typing.get_args(current)[0]
        elif isinstance(current, type) and issubclass(current, BaseModel):
            info = _field_by_alias(current, part)
            if info is None:
                return None
            current = info.annotation
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _field_by_alias(model: type[BaseModel], key: Any) -> Any:
    for name, info in model.model_fields.items():
        if (info.alias or name) == key:
            return info
    return None


def _allowed_fields(model: type[BaseModel], rel: Loc) -> list[str]:
    target = _model_at(model, rel)
    return [info.alias or name for name, info in target.model_fields.items()] if target else []


def _field_example(model: type[BaseModel], rel: Loc) -> str | None:
    parent = _model_at(model, rel[:-1])
    info = _field_by_alias(parent, rel[-1]) if parent is not None and rel else None
    return info.examples[0] if info is not None and info.examples else None


# ---------------------------------------------------------------------------- helpers shared by every layer's checks


def close_match(value: str, allowed: tuple[str, ...] | list[str], cutoff: float = 0.6) -> str | None:
    """The allowed value `value` was probably meant to be (case ignored), or None."""
    lowered = {a.lower(): a for a in allowed}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=cutoff)
    if close:
        return lowered[close[0]]
    starts = [a for low, a in lowered.items() if len(value) >= 3 and low.startswith(value.lower())]
    return starts[0] if len(starts) == 1 else None  # an abbreviation: nft for nftables


def count(number: int, noun: str) -> str:
    return f"no {noun}" if number == 0 else f"{number} {noun}{'' if number == 1 else 's'}"


def written_at(loc: Loc, issues: Issues) -> str:
    line = issues.source.line(loc)
    return f"{field_path(loc) or 'the top'}" + (f" (line {line})" if line is not None else "")
