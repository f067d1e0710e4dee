"""The lab spec: read a YAML file, check every rule, and build the `topo.model.Lab` the other layers use.

The tool runs as root and turns every name and address of a spec into kernel objects, so nothing reaches
the model unchecked. Checking happens in three passes, and each pass collects every problem it finds
before the whole lot is raised as one `SpecError` (a learner fixes a file in one go, not one line per run):

1. YAML -> plain data, remembering the line of every field (`_Source`), so each message points at a line.
2. Structure: types, required and unknown fields, by pydantic models with `extra="forbid"` (`_Strict`).
3. Meaning: addresses, names, PodCIDR allocation, racks and their routers, whether the pod backend can
   cross the underlay, link shaping, kube-proxy's mode, the cluster DNS and ingress controller addons,
   external hosts (and the DNS names they serve), object references, pod placement and capacity, pods' DNS
   settings, Services' cluster IPs and node ports (given ones checked, the rest allocated), and Ingresses'
   backends (Services of their namespace, and ports those Services have).

Kubernetes objects (`spec.objects`, or a file given to `lab apply -f`) are read through `KINDS`, a registry
from (apiVersion, kind) to a reader (Namespace, Pod, Deployment, Service, Ingress, NetworkPolicy), so later
layers add kinds in one place. `spec.cni.profile` picks the CNI the lab plays (Flannel: policies stored, not
enforced; Calico: enforced) and with it the backend's default.
"""
from __future__ import annotations

import difflib
import importlib
import ipaddress
import itertools
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field, replace
from datetime import date
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from topo import names
from topo.errors import SpecError, SpecIssue
from topo.model import (CNI_PROFILES, PLANNED_CNI_PROFILES, Cni, IPBlock, LabelSelector, NetworkPolicy,
                        PolicyPeer, PolicyPort, PolicyRule, SelectorRequirement)
from topo.model import (BACKENDS, CALICO_AS, DEFAULT_MTU, IPIP_MODES, IPIP_OVERHEAD, NODE_PORT_RANGE, PROXY_MODES,
                        SPINE_AS, VXLAN_OVERHEAD,
                        Bgp, Cluster, ClusterDns, Container, ContainerPort, DnsConfig, ExternalHost, Fabric, Ingress,
                        IngressBackend, IngressController, IngressPath, IngressRule, KubeProxy, Lab, LinkSpec, Network,
                        Node, Pod, Rack, Service, ServicePort, Underlay)

API_VERSION = "kubenet-lab/v1alpha1"
LAB_KIND = "Lab"
SPEC_FILE = "lab.yaml"  # what an exercise folder under labs/ holds

# Backends that later versions may add: named so a learner who asks for one hears "not yet", not "unknown".
PLANNED_BACKENDS = ("wireguard",)
# Names learners reach for that are a CNI, not a backend: the hint names the backend that does the same.
BACKEND_HINTS = {"calico": "bgp", "flannel": "vxlan", "hostgw": "host-gw", "host-gateway": "host-gw"}
MTU_MIN = 576  # the smallest datagram every IPv4 host must accept (RFC 791)
MTU_MAX = 9000  # a common jumbo-frame size
DEFAULTS = Cluster(), Underlay(), Network()
# kube-apiserver refuses a Service range larger than /12 (2^20 addresses) for IPv4.
SERVICE_CIDR_MIN_PREFIX = 12
# The smallest node block that still holds a pod: a /30 has 4 addresses minus network, broadcast, gateway.
NODE_MASK_MAX = 30

BUILTIN_IMAGES = ("agnhost", "pause")
AGNHOST_MODULE = "lab.images.agnhost"
# Namespaces every cluster has before any object is created.
SYSTEM_NAMESPACES = ("default", "kube-system")
DEPLOYMENT_NAME_MAX = names.DNS1123_LABEL_MAX - 6  # replicas are "<deployment>-<5 hex>" and must stay labels

# Routed underlays. The spine and the direct fabric's segment are named like this by topo.underlay (which
# the spec layer does not import: it needs Mininet), so no router, node or rack may take these names.
SPINE_ROUTER = "spine"
FABRIC_SEGMENT = "fabric"
FABRIC_MODES = ("spine", "direct")
PEERINGS = ("mesh", "tor")
TOR_AS_BASE = SPINE_AS + 1  # rack i's router defaults to AS 65001 + i: eBGP to the spine (65000) needs distinct ASes
ASN_MAX = 2**32 - 1  # 4-byte AS numbers (RFC 6793)
ASN_HINT = "the private ranges 64512-65534 and 4200000000-4294967294 are the usual choice"
BANDWIDTH_MAX_MBIT = 100_000.0  # 100 Gbit/s: far above what a veth pair carries
DELAY_MAX_MS = 60_000.0  # a minute: anything longer only makes every TCP connection time out

# Ranges that never belong to a pod, Service or node network.
_RESERVED = (
    (IPv4Network("0.0.0.0/8"), "'this network'"),
    (IPv4Network("127.0.0.0/8"), "loopback"),
    (IPv4Network("169.254.0.0/16"), "link-local"),
    (IPv4Network("224.0.0.0/4"), "multicast"),
    (IPv4Network("240.0.0.0/4"), "reserved"),
)

MAX_VALUES = 1_000_000  # YAML values after alias expansion: stops "billion laughs" documents
MAX_DEPTH = 64  # nesting depth of YAML values; real manifests stay under 15
MAX_ISSUES = 50  # issues shown; more only bury the first ones
INT_LIMIT = 2**63  # Kubernetes numbers are int64 at most; larger ones are almost surely typos
INTERNAL_ERROR = "please report this as a bug of kubenet-lab"

Loc = tuple[Any, ...]  # a field's position: keys and list indexes from the document's top


# ============================================================================ public API


def load_spec(path: str | Path) -> Lab:
    """Read a lab from a YAML file, or from an exercise folder holding lab.yaml.

    Messages name the file as the caller gave it; Lab.source and Lab.exercise are absolute, so a lab's
    recorded origin stays valid whatever the current directory is later.
    """
    given = Path(path)
    file = str(given)
    exercise: Path | None = None
    try:
        if given.is_dir():
            exercise = given
            given = given / SPEC_FILE
            file = str(given)
            if not given.is_file():
                raise _file_error(file, f"{exercise} is a folder without {SPEC_FILE}: give a lab spec file or an "
                                        f"exercise folder such as labs/00-seed")
        if not given.exists():
            raise _file_error(file, "no such file: give the path of a lab spec (e.g. labs/00-seed/lab.yaml) "
                                    "or of an exercise folder")
        if not given.is_file():
            raise _file_error(file, "not a regular file: give the path of a lab spec YAML file")
        data = given.read_bytes()
        text = _decode(data, file)
        lab = parse_spec_text(text, file)
        lab.source = str(given.resolve())
        lab.exercise = str(exercise.resolve()) if exercise is not None else None
        return lab
    except SpecError:
        raise
    except OSError as exc:
        raise _file_error(file, f"cannot read the file: {exc.strerror or exc}") from None
    except Exception as exc:  # the promise: only SpecError leaves this module
        raise _internal(file, exc) from exc


def parse_spec_text(text: str, file: str | None = None) -> Lab:
    """Validate a lab spec given as text; `file` is only used in messages and as Lab.source."""
    try:
        lab = _parse_lab(text, file)
        lab.text = text
        return lab
    except SpecError:
        raise
    except RecursionError:
        raise SpecError(file, [SpecIssue("", "the YAML is nested too deeply to be a lab spec")]) from None
    except Exception as exc:
        raise _internal(file, exc) from exc


def parse_objects(text: str, lab: Lab, file: str | None = None) -> list[dict]:
    """Validate Kubernetes manifests for `lab apply -f FILE` against the object rules and the running lab.

    The file holds one or more YAML documents (separated by ---), each an object or a `kind: List` with
    `items`. Returns the normalized manifests (defaults filled in), in file order, List items flattened.
    """
    try:
        source = _Source()
        issues = _Issues(source)
        entries = _object_documents(text, source, issues)
        if not issues and not entries:
            issues.add((), "the file holds no objects: give one or more Kubernetes manifests "
                            "(apiVersion, kind, metadata, spec), separated by ---")
        parsed = _read_objects(entries, issues)
        _objects_against_lab(parsed, lab, issues)
        issues.raise_if_any(file)
        return [p.manifest for p in parsed]  # with allocated cluster IPs and node ports filled in
    except SpecError:
        raise
    except RecursionError:
        raise SpecError(file, [SpecIssue("", "the YAML is nested too deeply to hold Kubernetes objects")]) from None
    except Exception as exc:
        raise _internal(file, exc) from exc


def pods_from_objects(objects: list[dict], lab: Lab, file: str | None) -> list[Pod]:
    """The pods that `objects` add to `lab`: Pods as they are, Deployments expanded into replicas.

    Shared by spec loading and `lab apply`, so a pod is named and placed the same way both times.
    Existing pods of `lab` count when placing new ones, and their names may not be reused.
    Issues name the objects as `objects[i]`, since manifests carry no line numbers.
    """
    return _of_kind(objects, lab, file, "pods")  # type: ignore[return-value]


def services_from_objects(objects: list[dict], lab: Lab, file: str | None) -> list[Service]:
    """The Services that `objects` add to `lab`, with their cluster IPs and node ports.

    Shared by spec loading and `lab apply`, so a service gets its addresses the same way both times.
    What a manifest leaves out is allocated against the services already in `lab.services` (the next
    free cluster IP and node port), and their names, cluster IPs and node ports may not be reused.
    Issues name the objects as `objects[i]`, since manifests carry no line numbers.
    """
    return _of_kind(objects, lab, file, "services")  # type: ignore[return-value]


def ingresses_from_objects(objects: list[dict], lab: Lab, file: str | None) -> list[Ingress]:
    """The Ingresses that `objects` add to `lab`, for `lab apply` (spec loading fills Lab.ingresses itself).

    Backends are checked against the Services among `objects` and those in `lab.services`; names and routes
    may not clash with `lab.ingresses` (drop an Ingress being replaced from the lab first). Issues name the
    objects as `objects[i]`, since manifests carry no line numbers.
    """
    return _of_kind(objects, lab, file, "ingresses")  # type: ignore[return-value]


def _of_kind(objects: list[dict], lab: Lab, file: str | None, kind: str) -> list:
    """Read manifests and check one kind of object they make against the lab ("pods", "services",
    "ingresses"); the other kinds are read but not checked against the lab."""
    try:
        issues = _Issues(_Source())
        if not isinstance(objects, (list, tuple)):
            issues.add((), "objects must be a list of Kubernetes manifests")
            issues.raise_if_any(file)
        parsed = _read_objects([(("objects", i), obj) for i, obj in enumerate(objects)], issues)
        made = _objects_against_lab(parsed, lab, issues, pods=kind == "pods", services=kind == "services",
                                    ingresses=kind == "ingresses")
        issues.raise_if_any(file)
        return made[("pods", "services", "ingresses").index(kind)]
    except SpecError:
        raise
    except RecursionError:
        raise SpecError(file, [SpecIssue("", "an object is nested too deeply")]) from None
    except Exception as exc:
        raise _internal(file, exc) from exc


class StrictDocument:
    """Another strictly checked YAML file of the project (an exercise's checks.yaml) read with this module's
    reader, so its messages look like a spec's: `file:line: field.path: message`, every problem at once.

    `model` is validated structurally (a `StrictModel`); callers then check meaning with `add()` at field
    paths (tuples of keys and list indexes) and finish with `raise_if_any()`.
    """

    def __init__(self, text: str, file: str | None, model: type[BaseModel], what: str) -> None:
        self.file = file
        self.issues = _Issues(_Source())
        try:
            documents = _compose(text, self.issues.source, self.issues, None)
            self.issues.raise_if_any(file)
            data = documents[0] if documents else None
            if not isinstance(data, dict):
                self.issues.add((), f"the top level must be a mapping: {what}")
                self.issues.raise_if_any(file)
            self.data: dict[str, Any] = data  # type: ignore[assignment]
            self.model = _validate(model, data, (), self.issues)
        except SpecError:
            raise
        except RecursionError:
            raise SpecError(file, [SpecIssue("", "the YAML is nested too deeply")]) from None

    def add(self, loc: Loc, message: str) -> None:
        self.issues.add(loc, message)

    def raise_if_any(self) -> None:
        self.issues.raise_if_any(self.file)


def _file_error(file: str, message: str) -> SpecError:
    return SpecError(file, [SpecIssue("", message)])


def _internal(file: str | None, exc: BaseException) -> SpecError:
    """Last resort: a bug of ours still reaches the user as a SpecError, with a pointer to report it."""
    detail = _short(" ".join(f"{type(exc).__name__}: {exc}".split()), 200)
    return SpecError(file, [SpecIssue("", f"kubenet-lab could not check this spec ({detail}); {INTERNAL_ERROR}")])


def _decode(data: bytes, file: str) -> str:
    """Spec files are UTF-8 (YAML's default); a leading byte-order mark is allowed."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        byte = data[exc.start]
        raise SpecError(file, [SpecIssue("", f"the file is not UTF-8 text (byte 0x{byte:02x} cannot be decoded): "
                                             "save it as UTF-8", line)]) from None


# ============================================================================ YAML with line numbers


@dataclass
class _Source:
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


class _Issues:
    """Collects every problem found, so one run reports them all."""

    def __init__(self, source: _Source) -> None:
        self.source = source
        self.items: list[SpecIssue] = []
        # (kind, namespace, name) of objects a reader refused: references to them are not reported again
        self.refused: set[tuple[str, str, str]] = set()

    def add(self, loc: Loc, message: str, line: int | None = None) -> None:
        if loc in self.source.bad:
            return  # the YAML reader already said what is wrong with this value
        self.items.append(SpecIssue(_path(loc), message, line if line is not None else self.source.line(loc)))

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
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_BRACKET_KEY = re.compile(r"^[A-Za-z0-9_./-]+$")


def _path(loc: Loc) -> str:
    """Field path as Kubernetes prints it: spec.nodes[1].podCIDR, metadata.labels[app.kubernetes.io/name]."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        elif isinstance(part, str) and _BRACKET_KEY.match(part):
            out += f"[{part}]"
        else:
            out += f"[{_short(json.dumps(part, ensure_ascii=True, default=repr), 60)}]"
    return out


class _Walker:
    """Builds plain data from a composed YAML node tree, recording each field's line as it goes.

    It gives what yaml.safe_load gives, with three deliberate differences that Kubernetes' own YAML
    reading also has: keys must be strings, a key may not be given twice, and numbers beyond int64 are
    refused (rather than silently becoming huge Python ints).
    """

    def __init__(self, loader: yaml.SafeLoader, source: _Source, issues: _Issues) -> None:
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
        self.source.raw[loc] = node.value
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            self._problem(node, loc, f"YAML tag {_short(node.tag, 40)} is not supported here: remove it "
                                     f"({_short(str(exc.problem), 80)})")
            return None
        except Exception:  # int() beyond Python's digit limit, impossible dates, ...
            what = "a number this large" if node.tag == _TAG + "int" else _short(repr(node.value), 40)
            self._problem(node, loc, f"cannot read {what}: check the value (quote it if it is text)")
            return None
        if isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value < INT_LIMIT:
            self._problem(node, loc, f"the number {_short(node.value, 30)} is too large: Kubernetes numbers are "
                                     "64-bit at most")
            return None
        return value

    def _sequence(self, node: yaml.SequenceNode, loc: Loc, depth: int) -> list[Any] | None:
        if node.tag != _TAG + "seq":
            self._problem(node, loc, f"YAML tag {_short(node.tag, 40)} is not supported here: write a plain list")
            return None
        items = []
        for index, child in enumerate(node.value):
            self.source.lines[loc + (index,)] = child.start_mark.line + 1
            items.append(self.value(child, loc + (index,), depth + 1))
        return items

    def _mapping(self, node: yaml.MappingNode, loc: Loc, depth: int) -> dict[str, Any] | None:
        if node.tag != _TAG + "map":
            self._problem(node, loc, f"YAML tag {_short(node.tag, 40)} is not supported here: write a plain mapping")
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
        try:
            key = self.loader.construct_object(node, deep=True)
        except Exception:
            key = None
        if isinstance(key, str):
            return key
        text = _short(node.value, 40)
        self.issues.add(loc, f"key {text or '(empty)'} is read by YAML as {_describe(key)}, but keys must be "
                             f"strings: quote it ({json.dumps(node.value)})", line)
        return None


def _yaml_error(exc: yaml.YAMLError, text: str) -> SpecIssue:
    """One issue for a YAML syntax error, at the line where the reader noticed it, with a likely fix."""
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
    return SpecIssue("", f"YAML syntax error: {_short(problem, 120)}: {_yaml_hint(problem)}", line)


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
    if "found unexpected end of stream" in problem or "found unexpected" in problem:
        return "a quote or bracket is not closed; close it"
    return "check the indentation and quoting here"


def _compose(text: str, source: _Source, issues: _Issues, prefix: Callable[[int, int], Loc] | None
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
        issue = _yaml_error(exc, text)
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
            issue = _yaml_error(exc, text)
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


# ============================================================================ structure: pydantic models


class _Strict(BaseModel):
    """Structural rules shared by every model: no unknown keys, no type coercion.

    Strict mode is what makes a YAML 1.1 surprise an error instead of a silent conversion: `name: on`
    is a boolean, `name: 0123` an integer, and neither becomes a string behind the learner's back.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


StrictModel = _Strict  # the public name, for other strictly checked files (see StrictDocument)


class _LabMetaIn(_Strict):
    name: str = Field(examples=["name: seed"])


class _ClusterIn(_Strict):
    pod_cidr: str | None = Field(None, alias="podCIDR")
    service_cidr: str | None = Field(None, alias="serviceCIDR")
    node_cidr_mask_size: int | None = Field(None, alias="nodeCIDRMaskSize")


class _LinkIn(_Strict):
    """An underlay link. bandwidth, delay and loss take a number or a string with a unit, so they are read
    as Any here and checked by `_quantity`, which says which units exist (pydantic's union errors would not)."""

    mtu: int | None = None
    bandwidth: Any = None
    delay: Any = None
    loss: Any = None
    jitter: Any = None


class _RouterIn(_Strict):
    name: str | None = None
    ip: str | None = None
    as_number: int | None = Field(None, alias="asNumber")


class _RackIn(_Strict):
    name: str = Field(examples=["name: rack1"])
    subnet: str = Field(examples=["subnet: 192.168.1.0/24"])
    router: _RouterIn | None = None


class _FabricIn(_Strict):
    mode: str | None = None
    cidr: str | None = None
    spine_as_number: int | None = Field(None, alias="spineASNumber")


class _UnderlayIn(_Strict):
    subnet: str | None = None
    link: _LinkIn | None = None
    racks: list[_RackIn] | None = None
    fabric: _FabricIn | None = None


class _BgpIn(_Strict):
    as_number: int | None = Field(None, alias="asNumber")
    peering: str | None = None


class _NetworkIn(_Strict):
    backend: str | None = None
    mtu: int | None = None
    bgp: _BgpIn | None = None
    ipip_mode: str | None = Field(None, alias="ipipMode")  # Calico's IPPool field name and values


class _NodeIn(_Strict):
    name: str = Field(examples=["name: node1"])
    ip: str = Field(examples=["ip: 192.168.1.10"])
    pod_cidr: str | None = Field(None, alias="podCIDR")
    rack: str | None = None
    link: _LinkIn | None = None


class _KubeProxyIn(_Strict):
    mode: str | None = None


class _ExternalIn(_Strict):
    name: str = Field(examples=["name: web"])
    ip: str = Field(examples=["ip: 192.168.1.200"])
    serves: list[str] | None = None
    rack: str | None = None
    names: list[str] | None = None


class _DnsIn(_Strict):
    """The cluster DNS addon: whether it runs, on which node, and the cluster domain it answers for."""

    enabled: bool | None = None
    node: str | None = None
    domain: str | None = None


class _IngressControllerIn(_Strict):
    """The ingress controller addon; enabled left out: it runs when the lab has Ingress objects."""

    enabled: bool | None = None
    node: str | None = None
    node_port: int | None = Field(None, alias="nodePort")


class _CniIn(_Strict):
    """The CNI the lab plays (see topo.model.CNI_PROFILES)."""

    profile: str | None = None


class _SpecIn(_Strict):
    cluster: _ClusterIn | None = None
    underlay: _UnderlayIn | None = None
    network: _NetworkIn | None = None
    kube_proxy: _KubeProxyIn | None = Field(None, alias="kubeProxy")
    dns: _DnsIn | None = None
    ingress_controller: _IngressControllerIn | None = Field(None, alias="ingressController")
    cni: _CniIn | None = None
    nodes: list[_NodeIn] = Field(examples=["nodes: [{name: node1, ip: 192.168.1.10}]"])
    external: list[_ExternalIn] | None = None
    objects: list[Any] | None = None


class _LabIn(_Strict):
    api_version: str = Field(alias="apiVersion", examples=[f"apiVersion: {API_VERSION}"])
    kind: str = Field(examples=[f"kind: {LAB_KIND}"])
    metadata: _LabMetaIn = Field(examples=["metadata: {name: mylab}"])
    spec: _SpecIn = Field(examples=["spec: {nodes: [{name: node1, ip: 192.168.1.10}]}"])


class _ObjectMetaIn(_Strict):
    name: str = Field(examples=["name: web"])
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class _TemplateMetaIn(_Strict):
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class _PortIn(_Strict):
    container_port: int = Field(alias="containerPort", examples=["containerPort: 8080"])
    protocol: str | None = None
    name: str | None = None


class _EnvIn(_Strict):
    name: str = Field(examples=["name: MODE"])
    value: str | None = None


class _ContainerIn(_Strict):
    name: str = Field(examples=["name: app"])
    image: str = Field(examples=["image: agnhost"])
    command: list[str] | None = None
    args: list[str] | None = None
    ports: list[_PortIn] | None = None
    env: list[_EnvIn] | None = None


class _DnsOptionIn(_Strict):
    name: str = Field(examples=["name: ndots"])
    value: str | None = None


class _DnsConfigIn(_Strict):
    nameservers: list[str] | None = None
    searches: list[str] | None = None
    options: list[_DnsOptionIn] | None = None


class _PodSpecIn(_Strict):
    """The Pod spec subset a lab runs. restartPolicy and terminationGracePeriodSeconds are accepted and do not
    change the emulation; dnsPolicy and dnsConfig become Pod.dns_policy and Pod.dns_config; hostname and
    subdomain stay in the normalized manifest for the DNS layer."""

    node_name: str | None = Field(None, alias="nodeName")
    containers: list[_ContainerIn] = Field(examples=["containers: [{name: app, image: agnhost, args: [netexec]}]"])
    restart_policy: str | None = Field(None, alias="restartPolicy")
    termination_grace_period_seconds: int | None = Field(None, alias="terminationGracePeriodSeconds")
    dns_policy: str | None = Field(None, alias="dnsPolicy")
    dns_config: _DnsConfigIn | None = Field(None, alias="dnsConfig")
    hostname: str | None = None
    subdomain: str | None = None


class _NamespaceIn(_Strict):
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: _ObjectMetaIn = Field(examples=["metadata: {name: shop}"])


class _PodIn(_Strict):
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: _ObjectMetaIn = Field(examples=["metadata: {name: web}"])
    spec: _PodSpecIn = Field(examples=["spec: {containers: [{name: app, image: agnhost, args: [netexec]}]}"])


class _SelectorIn(_Strict):
    match_labels: dict[str, str] = Field(alias="matchLabels", examples=["matchLabels: {app: web}"])


class _TemplateIn(_Strict):
    metadata: _TemplateMetaIn = Field(examples=["metadata: {labels: {app: web}}"])
    spec: _PodSpecIn = Field(examples=["spec: {containers: [{name: app, image: agnhost, args: [netexec]}]}"])


class _DeploymentSpecIn(_Strict):
    replicas: int | None = None
    selector: _SelectorIn = Field(examples=["selector: {matchLabels: {app: web}}"])
    template: _TemplateIn = Field(examples=["template: {metadata: {labels: {app: web}}, spec: {containers: [...]}}"])


class _DeploymentIn(_Strict):
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: _ObjectMetaIn = Field(examples=["metadata: {name: web}"])
    spec: _DeploymentSpecIn = Field(examples=["spec: {replicas: 2, selector: ..., template: ...}"])


class _ServicePortIn(_Strict):
    """targetPort is a number or a container port's name (Kubernetes' IntOrString), so it is read as Any and
    checked by `_target_port`, which can say which of the two was meant."""

    name: str | None = None
    port: int = Field(examples=["port: 80"])
    target_port: Any = Field(None, alias="targetPort")
    protocol: str | None = None
    node_port: int | None = Field(None, alias="nodePort")


class _ClientIPConfigIn(_Strict):
    timeout_seconds: int | None = Field(None, alias="timeoutSeconds")


class _AffinityConfigIn(_Strict):
    client_ip: _ClientIPConfigIn | None = Field(None, alias="clientIP")


class _ServiceSpecIn(_Strict):
    """The Service spec subset a lab runs. ipFamilies, ipFamilyPolicy and internalTrafficPolicy are accepted
    only with Kubernetes' default values (an IPv4 single-stack lab; traffic policy Cluster)."""

    type: str | None = None
    cluster_ip: str | None = Field(None, alias="clusterIP")
    selector: dict[str, str] | None = None
    ports: list[_ServicePortIn] | None = None
    session_affinity: str | None = Field(None, alias="sessionAffinity")
    session_affinity_config: _AffinityConfigIn | None = Field(None, alias="sessionAffinityConfig")
    external_traffic_policy: str | None = Field(None, alias="externalTrafficPolicy")
    internal_traffic_policy: str | None = Field(None, alias="internalTrafficPolicy")
    ip_families: list[str] | None = Field(None, alias="ipFamilies")
    ip_family_policy: str | None = Field(None, alias="ipFamilyPolicy")


class _ServiceIn(_Strict):
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: _ObjectMetaIn = Field(examples=["metadata: {name: web}"])
    spec: _ServiceSpecIn = Field(examples=["spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}"])


class _IngressPortIn(_Strict):
    """A backend's service port: `number` or `name` (one of the two, as Kubernetes' ServiceBackendPort)."""

    number: int | None = None
    name: str | None = None


class _IngressServiceIn(_Strict):
    name: str = Field(examples=["name: web"])
    port: _IngressPortIn = Field(examples=["port: {number: 80}"])


class _IngressBackendIn(_Strict):
    """A backend is a Service of the Ingress's namespace; `resource` backends (a custom object) are read so the
    message can say they are not supported, rather than calling the field unknown."""

    service: _IngressServiceIn | None = None
    resource: Any = None


class _IngressPathIn(_Strict):
    path: str | None = None
    path_type: str = Field(alias="pathType", examples=["pathType: Prefix"])
    backend: _IngressBackendIn = Field(examples=["backend: {service: {name: web, port: {number: 80}}}"])


class _IngressHttpIn(_Strict):
    paths: list[_IngressPathIn] = Field(examples=["paths: [{path: /, pathType: Prefix, backend: {service: "
                                                  "{name: web, port: {number: 80}}}}]"])


class _IngressRuleIn(_Strict):
    host: str | None = None
    http: _IngressHttpIn | None = None


class _IngressSpecIn(_Strict):
    """The v1 Ingress spec. tls is read as Any only to refuse it with a clear message."""

    ingress_class_name: str | None = Field(None, alias="ingressClassName")
    default_backend: _IngressBackendIn | None = Field(None, alias="defaultBackend")
    rules: list[_IngressRuleIn] | None = None
    tls: Any = None


class _IngressIn(_Strict):
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: _ObjectMetaIn = Field(examples=["metadata: {name: web}"])
    spec: _IngressSpecIn = Field(examples=["spec: {rules: [{host: web.example.com, http: {paths: [...]}}]}"])


_M = typing.TypeVar("_M", bound=BaseModel)


def _validate(model: type[_M], value: Any, loc: Loc, issues: _Issues) -> _M | None:
    """Validate `value` against `model`, turning each pydantic error into an issue at its own path."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        for err in exc.errors(include_url=False, include_context=False):
            rel = tuple(err["loc"])
            if rel and rel[-1] == "[key]":
                issues.add(loc + rel[:-1], "keys must be strings")
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
        return _unknown_field(str(rel[-1]), _allowed_fields(model, rel[:-1]))
    if kind == "invalid_key":
        return "keys must be strings"
    if kind in _EXPECTED:
        return _wrong_type(_EXPECTED[kind], err.get("input"), raw)
    return str(err.get("msg", "invalid value"))


def _unknown_field(key: str, allowed: list[str]) -> str:
    """Unknown-key message with a suggestion; the match ignores case, the usual slip (podCidr)."""
    lowered = {a.lower(): a for a in allowed}
    close = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.75)
    shown = _short(repr(key), 60)
    if close:
        return f"unknown field {shown} (did you mean {lowered[close[0]]!r}?)"
    if allowed:
        return f"unknown field {shown} (allowed here: {', '.join(allowed)})"
    return f"unknown field {shown}"


def _wrong_type(expected: str, value: Any, raw: str | None) -> str:
    """Type mismatch message; for YAML's implicit typing it says how YAML read the text and how to fix it."""
    text = raw if raw is not None and "\n" not in raw and raw != "" else None
    if value is None and raw == "":
        return f"must be {expected}, but no value is given: write one after the colon"
    if value is None:
        return f"must be {expected}, got null"
    if expected == "a string" and isinstance(value, (bool, int, float, date)):
        shown = text if text is not None else _show(value)
        return f"must be a string, but YAML reads {shown} as {_describe(value)}: quote it ({json.dumps(shown)})"
    if isinstance(value, str) and expected in ("an integer", "a number") and _looks_numeric(value):
        return f"must be {expected}, got the string {_short(repr(value), 30)}: remove the quotes"
    if isinstance(value, bool) and expected != "true or false":
        shown = text if text is not None else _show(value)
        return f"must be {expected}, but YAML reads {shown} as a boolean"
    return f"must be {expected}, got {_describe(value)}"


def _looks_numeric(value: str) -> bool:
    return re.fullmatch(r"\s*-?\d+(\.\d*)?\s*", value) is not None


def _describe(value: Any) -> str:
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
        return f"the string {_short(repr(value), 40)}"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _show(value: Any) -> str:
    """A value for a message, never long and never failing (str() of a huge int raises in Python 3.11)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if -INT_LIMIT <= value < INT_LIMIT else "a very large number"
    if isinstance(value, str):
        return _short(value, 60)
    return _short(repr(value), 60)


def _short(text: str, limit: int) -> str:
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


# ============================================================================ the lab spec


def _parse_lab(text: str, file: str | None) -> Lab:
    source = _Source()
    issues = _Issues(source)
    documents = _compose(text, source, issues, None)
    issues.raise_if_any(file)
    if not documents:
        issues.add((), f"the file is empty: a lab spec needs apiVersion: {API_VERSION}, kind: {LAB_KIND}, "
                        "metadata and spec (see labs/00-seed/lab.yaml)")
        issues.raise_if_any(file)
    data = documents[0]
    if not isinstance(data, dict):
        issues.add((), f"the top level must be a mapping (apiVersion: {API_VERSION}, kind: {LAB_KIND}, "
                        f"metadata, spec), not {_describe(data)}")
        issues.raise_if_any(file)
    if _not_a_lab(data, issues):
        issues.raise_if_any(file)
    lab_in = _validate(_LabIn, data, (), issues)
    if lab_in is None:
        _read_raw_objects(data, issues)  # structure errors elsewhere do not hide the objects' own problems
        issues.raise_if_any(file)
    assert lab_in is not None
    lab = _build_lab(lab_in, issues)
    issues.raise_if_any(file)
    lab.source = file
    return lab


def _not_a_lab(data: dict[str, Any], issues: _Issues) -> bool:
    """A file whose kind is not Lab (say, a Pod manifest) gets one clear message, not a field-by-field list."""
    kind = data.get("kind")
    if not isinstance(kind, str) or kind == LAB_KIND:
        return False
    hint = ""
    if data.get("apiVersion") != API_VERSION:
        hint = (": this looks like a Kubernetes manifest; put it under spec.objects of a lab spec, or give it to "
                "a running lab with `lab apply -f`")
    issues.add(("kind",), f"must be {LAB_KIND}, got {_short(repr(kind), 40)}{hint}")
    return True


def _read_raw_objects(data: dict[str, Any], issues: _Issues) -> None:
    spec = data.get("spec")
    objects = spec.get("objects") if isinstance(spec, dict) else None
    if isinstance(objects, list):
        _read_objects([(("spec", "objects", i), obj) for i, obj in enumerate(objects)], issues)


def _build_lab(lab_in: _LabIn, issues: _Issues) -> Lab:
    """Semantic checks of a structurally valid spec, then the model with its pods."""
    if lab_in.api_version != API_VERSION:
        issues.add(("apiVersion",), f"must be {API_VERSION} (the version this tool reads), got "
                                    f"{_short(repr(lab_in.api_version), 40)}")
    name_problem = names.dns_label_problem(lab_in.metadata.name, names.LAB_NAME_MAX)
    if name_problem:
        issues.add(("metadata", "name"), name_problem)
    spec = lab_in.spec
    underlay_in = spec.underlay or _UnderlayIn()
    network_in = spec.network or _NetworkIn()
    cni = _check_cni(spec.cni, issues)
    if cni is not None and network_in.backend is None:  # a profile sets the backend's default only
        network_in = network_in.model_copy(update={"backend": CNI_PROFILES[cni.profile][0]})
    racks = _rack_names(underlay_in)
    cluster = _check_cluster(spec.cluster or _ClusterIn(), issues)
    underlay = _check_underlay(underlay_in, issues)
    network = _check_network(network_in, underlay, issues)
    if cluster is not None and underlay is not None:
        _check_disjoint(spec, cluster, underlay, issues)
    nodes = _check_nodes(spec.nodes, cluster, underlay, racks, issues)
    _check_host_names(spec.nodes, underlay_in, issues)
    if network is not None:
        _check_routing(network_in, network, spec.nodes, racks, issues)
    kube_proxy = _check_kube_proxy(spec.kube_proxy or _KubeProxyIn(), issues)
    dns = _check_dns(spec.dns or _DnsIn(), spec.nodes, cluster, issues)
    controller = _check_ingress_controller(spec.ingress_controller or _IngressControllerIn(), spec.nodes, issues)
    external = _check_external(spec.external or [], spec.nodes, underlay_in, underlay, racks, dns, issues)
    entries = [(("spec", "objects", i), obj) for i, obj in enumerate(spec.objects or [])]
    parsed = _read_objects(entries, issues)
    namespaces = _namespaces(parsed, {}, issues)
    lab = Lab(name=lab_in.metadata.name, cluster=cluster or DEFAULTS[0], underlay=underlay or DEFAULTS[1],
              network=network or DEFAULTS[2], nodes=tuple(nodes or ()), namespaces=namespaces,
              kube_proxy=kube_proxy or KubeProxy(), external=tuple(external or ()), dns=dns,
              ingress_controller=controller)
    _check_reserved_names(parsed, lab, issues)
    service_cidr = cluster.service_cidr if cluster is not None else None
    lab.services = tuple(_services(parsed, lab, service_cidr, set(namespaces), issues))
    lab.ingresses = tuple(_ingresses(parsed, lab, set(namespaces), issues, running=False))
    lab.cni = cni or _profile_of(lab.network.backend)
    lab.network_policies = tuple(_network_policies(parsed, lab, set(namespaces), issues))
    lab.objects = tuple(p.manifest for p in parsed)  # after _services: it fills in allocated addresses and ports
    lab.pods = tuple(_expand(parsed, lab, set(namespaces), issues, place=nodes is not None and not issues))
    return lab


# ---------------------------------------------------------------------------- addresses


_CIDR_TEXT = re.compile(r"^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}/\d{1,2}$")
_ADDRESS_TEXT = re.compile(r"^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}$")


def _network(text: str, loc: Loc, example: str, issues: _Issues, reserved: bool = True) -> IPv4Network | None:
    """An IPv4 network written ADDRESS/PREFIX with no host bits set (what Kubernetes' CIDR flags demand).
    `reserved` False: a range that is no lab's own (a NetworkPolicy ipBlock, 0.0.0.0/0 included)."""
    shown = _short(text, 60)
    if ":" in text:
        issues.add(loc, f"{shown} is IPv6; kubenet-lab labs are IPv4 only: use a network like {example}")
        return None
    if _ADDRESS_TEXT.match(text):
        issues.add(loc, f"{shown} has no prefix length: write ADDRESS/PREFIX, e.g. {example}")
        return None
    if not _CIDR_TEXT.match(text):
        issues.add(loc, f"{shown!r} is not an IPv4 network: write ADDRESS/PREFIX, e.g. {example}")
        return None
    try:
        loose = IPv4Network(text, strict=False)
    except ValueError:
        issues.add(loc, f"{shown} is not an IPv4 network (each address part is 0..255 without leading zeros, "
                        f"the prefix 0..32): write ADDRESS/PREFIX, e.g. {example}")
        return None
    if str(loose.network_address) != text.split("/")[0]:
        issues.add(loc, f"{shown} has host bits set (did you mean {loose}?)")
        return None
    for bad, what in _RESERVED if reserved else ():
        if loose.overlaps(bad):
            issues.add(loc, f"{loose} overlaps {bad} ({what} addresses): choose a private range such as "
                            f"{example}")
            return None
    return loose


def _address(text: str, loc: Loc, issues: _Issues, prefix_from: str = "underlay.subnet",
             example: str = "192.168.1.10") -> IPv4Address | None:
    if "/" in text and _ADDRESS_TEXT.match(text.split("/")[0]):
        issues.add(loc, f"{_short(text, 40)} must be an address without a prefix: write {text.split('/')[0]} "
                        f"(the prefix comes from {prefix_from})")
        return None
    try:
        if not _ADDRESS_TEXT.match(text):
            raise ValueError
        return IPv4Address(text)
    except ValueError:
        issues.add(loc, f"{_short(repr(text), 40)} is not an IPv4 address: write it like {example}")
        return None


def _given(value: str | None, default: IPv4Network) -> str:
    return value if value is not None else str(default)


def _default_note(given: object) -> str:
    return "" if given is not None else " (the default)"


def _check_cluster(cluster_in: _ClusterIn, issues: _Issues) -> Cluster | None:
    base = ("spec", "cluster")
    default = Cluster()
    pod = _network(_given(cluster_in.pod_cidr, default.pod_cidr), base + ("podCIDR",), "10.244.0.0/16", issues)
    service = _network(_given(cluster_in.service_cidr, default.service_cidr), base + ("serviceCIDR",),
                       "10.96.0.0/12", issues)
    mask = cluster_in.node_cidr_mask_size
    mask = default.node_cidr_mask_size if mask is None else mask
    ok = pod is not None and service is not None
    if service is not None and service.prefixlen < SERVICE_CIDR_MIN_PREFIX:
        issues.add(base + ("serviceCIDR",), f"{service} is larger than Kubernetes allows for Services: use a prefix "
                                            f"of /{SERVICE_CIDR_MIN_PREFIX} or longer, e.g. 10.96.0.0/12")
        ok = False
    if pod is not None:
        ok = _check_mask(pod, mask, cluster_in, issues) and ok
    if pod is not None and service is not None and pod.overlaps(service):
        _overlap(("spec", "cluster", "podCIDR"), pod, cluster_in.pod_cidr,
                 ("spec", "cluster", "serviceCIDR"), service, cluster_in.service_cidr,
                 "pod and Service addresses must come from separate ranges; change one of them (the defaults "
                 f"{default.pod_cidr} and {default.service_cidr} do not overlap)", issues)
        ok = False
    if not ok or pod is None or service is None:
        return None
    return Cluster(pod_cidr=pod, service_cidr=service, node_cidr_mask_size=mask)


def _check_mask(pod: IPv4Network, mask: int, cluster_in: _ClusterIn, issues: _Issues) -> bool:
    """Each node's PodCIDR is a /mask block cut out of the cluster's podCIDR (kube-controller-manager's
    --node-cidr-mask-size), so the mask must be longer than the cluster prefix and leave room for a pod."""
    loc = ("spec", "cluster")
    if pod.prefixlen > NODE_MASK_MAX - 1:
        issues.add(loc + ("podCIDR",), f"{pod} is too small to be split into node PodCIDRs: use a prefix of "
                                       f"/{NODE_MASK_MAX - 1} or shorter, e.g. 10.244.0.0/16")
        return False
    low, high = pod.prefixlen + 1, NODE_MASK_MAX
    if not low <= mask <= high:
        issues.add(loc + ("nodeCIDRMaskSize",),
                   f"{_show(mask)} is out of range: use {low}..{high}; each node gets a /nodeCIDRMaskSize block of "
                   f"podCIDR {pod}{_default_note(cluster_in.pod_cidr)}, so it must be longer than /{pod.prefixlen}, "
                   f"and /{high} is the smallest block that still holds a pod (.1 is the gateway)")
        return False
    return True


# ---------------------------------------------------------------------------- underlay


def _check_underlay(underlay_in: _UnderlayIn, issues: _Issues) -> Underlay | None:
    """A flat segment (subnet) or a routed underlay (racks), with the default link of every node."""
    link = _check_link(underlay_in.link, ("spec", "underlay", "link"), issues)
    if underlay_in.racks is None:
        underlay = _check_flat(underlay_in, issues)
    else:
        if underlay_in.subnet is not None:
            issues.add(("spec", "underlay", "subnet"),
                       "give either subnet (one flat segment for every node) or racks (a subnet per rack, behind its "
                       "top-of-rack router), not both: remove subnet, or remove racks")
        underlay = _check_routed(underlay_in, issues)
    if underlay is None or link is None:
        return None
    return replace(underlay, link=link)


def _check_flat(underlay_in: _UnderlayIn, issues: _Issues) -> Underlay | None:
    if underlay_in.fabric is not None:
        issues.add(("spec", "underlay", "fabric"), "fabric joins top-of-rack routers: it needs underlay.racks; "
                                                   "remove fabric for a flat underlay")
    loc = ("spec", "underlay", "subnet")
    subnet = _network(_given(underlay_in.subnet, Underlay().subnet), loc, "192.168.1.0/24", issues)
    if subnet is None:
        return None
    if subnet.prefixlen > NODE_MASK_MAX:
        issues.add(loc, f"{subnet} leaves no room for node addresses: use a prefix of /{NODE_MASK_MAX} or shorter, "
                        "e.g. 192.168.1.0/24")
        return None
    return Underlay(subnet=subnet)


def _rack_names(underlay_in: _UnderlayIn) -> tuple[str, ...] | None:
    """The racks as written (None: a flat underlay), so nodes can be checked even when a rack is wrong."""
    return None if underlay_in.racks is None else tuple(r.name for r in underlay_in.racks)


def _rack_loc(index: int) -> Loc:
    return ("spec", "underlay", "racks", index)


def _check_routed(underlay_in: _UnderlayIn, issues: _Issues) -> Underlay | None:
    """Racks, each an L2 segment with its own subnet behind a top-of-rack router, and the fabric joining them."""
    racks_in = underlay_in.racks or []
    if not racks_in:
        issues.add(("spec", "underlay", "racks"), "no racks: give at least one, e.g. racks: [{name: rack1, subnet: "
                                                  "192.168.1.0/24}], or remove racks for one flat segment")
        return None
    before = len(issues)
    fabric = _check_fabric(underlay_in.fabric or _FabricIn(), len(racks_in), issues)
    racks = [rack for i, r in enumerate(racks_in) if (rack := _check_rack(r, i, issues)) is not None]
    _check_rack_names(racks_in, racks, issues)
    _check_rack_subnets(racks, fabric, underlay_in.fabric, issues)
    _check_rack_asns(racks_in, racks, underlay_in.fabric or _FabricIn(), issues)
    if len(issues) > before or fabric is None or len(racks) != len(racks_in):
        return None
    return Underlay(subnet=None, racks=tuple(racks), fabric=fabric)


def _check_rack(rack_in: _RackIn, index: int, issues: _Issues) -> Rack | None:
    loc = _rack_loc(index)
    before = len(issues)
    problem = names.dns_label_problem(rack_in.name)
    if problem:
        issues.add(loc + ("name",), problem)
    elif rack_in.name == FABRIC_SEGMENT:
        issues.add(loc + ("name",), f"rack name {FABRIC_SEGMENT} is taken by the segment of a direct fabric: "
                                    "pick another")
    example = f"192.168.{index + 1 if index < 255 else 1}.0/24"
    subnet = _network(rack_in.subnet, loc + ("subnet",), example, issues)
    if subnet is not None and subnet.prefixlen > NODE_MASK_MAX:
        issues.add(loc + ("subnet",), f"{subnet} leaves no room for a router and a node: use a prefix of "
                                      f"/{NODE_MASK_MAX} or shorter, e.g. {example}")
        subnet = None
    router_in = rack_in.router or _RouterIn()
    router = _router_name(rack_in, loc, issues)
    router_ip = _router_ip(router_in, rack_in.name, subnet, loc + ("router", "ip"), issues)
    # Calico's AS-per-rack model: every rack is an AS of its own, its ToR speaking eBGP upstream.
    asn = router_in.as_number if router_in.as_number is not None else TOR_AS_BASE + index
    _check_asn(asn, "asNumber", loc + ("router", "asNumber"), issues)
    if len(issues) > before or subnet is None or router_ip is None:
        return None
    return Rack(name=rack_in.name, subnet=subnet, router=router, router_ip=router_ip, asn=asn, index=index)


def _router_name(rack_in: _RackIn, loc: Loc, issues: _Issues) -> str:
    """The ToR's name: given, or tor-<rack>. It names a host (and its namespace) like a node's name does."""
    name = _router_name_of(rack_in)
    if rack_in.router is not None and rack_in.router.name is not None:
        problem = names.dns_label_problem(name)
        if problem:
            issues.add(loc + ("router", "name"), problem)
    elif names.is_dns_label(rack_in.name) and not names.is_dns_label(name):
        issues.add(loc + ("name",), f"the rack's router would be named {name}, which is {len(name)} characters; at "
                                    f"most {names.DNS1123_LABEL_MAX} are allowed: shorten the rack name or give "
                                    "router.name")
    return name


def _router_name_of(rack_in: _RackIn) -> str:
    """The ToR's name as written: router.name, or tor-<rack>."""
    given = rack_in.router.name if rack_in.router is not None else None
    return given if given is not None else f"tor-{rack_in.name}"


def _router_ip(router_in: _RouterIn, rack: str, subnet: IPv4Network | None, loc: Loc,
               issues: _Issues) -> IPv4Address | None:
    """The ToR's address in its rack, the nodes' gateway: given, or the subnet's first host."""
    if router_in.ip is None:
        return subnet.network_address + 1 if subnet is not None else None
    ip = _address(router_in.ip, loc, issues, "the rack's subnet")
    if ip is None or subnet is None:
        return None
    problem = _host_problem(ip, subnet, f"rack {rack}'s subnet {subnet}")
    if problem:
        issues.add(loc, problem)
        return None
    return ip


def _check_asn(asn: int, key: str, loc: Loc, issues: _Issues) -> bool:
    if 1 <= asn <= ASN_MAX:
        return True
    issues.add(loc, f"{key} {_show(asn)} is out of range: use 1..{ASN_MAX} ({ASN_HINT})")
    return False


def _check_rack_names(racks_in: list[_RackIn], racks: list[Rack], issues: _Issues) -> None:
    """Rack names and router names are each unique; routers are hosts, so none may be called like the spine."""
    first: dict[str, int] = {}
    for index, rack_in in enumerate(racks_in):
        if rack_in.name in first:
            issues.add(_rack_loc(index) + ("name",), f"rack name {rack_in.name} is already used by "
                                                     f"spec.underlay.racks[{first[rack_in.name]}]: give each rack "
                                                     "its own name")
        first.setdefault(rack_in.name, index)
    routers: dict[str, Rack] = {}
    for rack in racks:
        given = _router_given(racks_in, rack.index, "name")
        loc = _rack_loc(rack.index) + (("router", "name") if given else ("name",))
        other = routers.get(rack.router)
        if rack.router == SPINE_ROUTER:
            issues.add(loc, f"router name {SPINE_ROUTER} is the name of the fabric's spine router: pick another")
        elif other is not None and (given or _router_given(racks_in, other.index, "name")):
            issues.add(loc, f"router name {rack.router}{'' if given else ' (the default tor-<rack>)'} is already "
                            f"used by the router of rack {other.name} (spec.underlay.racks[{other.index}]): give "
                            "each router its own name")
        routers.setdefault(rack.router, rack)


def _router_given(racks_in: list[_RackIn], index: int, key: str) -> bool:
    """Whether rack `index` sets router.<key> itself (messages then point at it, not at a default)."""
    router = racks_in[index].router
    return router is not None and getattr(router, key) is not None


def _check_rack_subnets(racks: list[Rack], fabric: Fabric | None, fabric_in: _FabricIn | None,
                        issues: _Issues) -> None:
    """Each rack is its own L2 segment reached by routing, so rack subnets and the fabric never overlap."""
    for later, rack in enumerate(racks):
        loc = _rack_loc(rack.index) + ("subnet",)
        for earlier in racks[:later]:
            if rack.subnet.overlaps(earlier.subnet):
                _overlap(_rack_loc(earlier.index) + ("subnet",), earlier.subnet, "given", loc, rack.subnet, "given",
                         "each rack is its own segment behind its own router, so racks need separate subnets; "
                         f"pick another subnet for rack {rack.name}", issues)
        if fabric is not None and rack.subnet.overlaps(fabric.cidr):
            _overlap(loc, rack.subnet, "given", ("spec", "underlay", "fabric", "cidr"), fabric.cidr,
                     fabric_in.cidr if fabric_in is not None else None,
                     "the fabric's links between routers need a range of their own; pick ranges that do not "
                     "overlap", issues)


def _check_rack_asns(racks_in: list[_RackIn], racks: list[Rack], fabric_in: _FabricIn, issues: _Issues) -> None:
    """Routers of different racks peer by eBGP (with the spine, or each other on a direct fabric), and eBGP
    needs a different AS at each end: every rack's AS is its own and differs from the spine's."""
    seen: dict[int, Rack] = {}
    spine = _spine_asn(fabric_in)
    used = {r.asn for r in racks} | ({spine} if spine is not None else set())
    for rack in racks:
        given = _router_given(racks_in, rack.index, "as_number")
        loc = _rack_loc(rack.index) + ("router", "asNumber")
        note = "" if given else f" (the default, {TOR_AS_BASE} + rack index)"
        if rack.asn in seen:
            issues.add(loc, f"asNumber {rack.asn}{note} is already the AS of rack {seen[rack.asn].name}: each rack is "
                            f"an AS of its own, its router peering by eBGP; pick another, e.g. {_free_asn(used)}")
        elif rack.asn == spine and (given or fabric_in.spine_as_number is None):
            issues.add(loc, f"asNumber {rack.asn}{note} is also the spine's AS (fabric.spineASNumber): the spine "
                            f"and the top-of-rack routers peer by eBGP, which needs different ASes; pick another, "
                            f"e.g. {_free_asn(used)}")
        elif rack.asn == spine:
            issues.add(("spec", "underlay", "fabric", "spineASNumber"),
                       f"spineASNumber {spine} is also the AS of rack {rack.name}'s router{note}: the spine and the "
                       f"top-of-rack routers peer by eBGP, which needs different ASes; pick another, e.g. {SPINE_AS}")
        seen.setdefault(rack.asn, rack)


def _spine_asn(fabric_in: _FabricIn) -> int | None:
    """The spine's AS as written or defaulted (even if another fabric field is wrong); None without a spine."""
    mode = fabric_in.mode if fabric_in.mode is not None else Fabric().mode
    if mode != "spine":
        return None
    return fabric_in.spine_as_number if fabric_in.spine_as_number is not None else Fabric().spine_asn


def _free_asn(used: set[int]) -> int:
    asn = TOR_AS_BASE
    while asn in used:
        asn += 1
    return asn


def _check_fabric(fabric_in: _FabricIn, rack_count: int, issues: _Issues) -> Fabric | None:
    """How the ToRs are joined; its addresses come from fabric.cidr as topo.underlay.fabric_links cuts it."""
    loc = ("spec", "underlay", "fabric")
    default = Fabric()
    before = len(issues)
    mode = fabric_in.mode if fabric_in.mode is not None else default.mode
    if mode not in FABRIC_MODES:
        issues.add(loc + ("mode",), f"mode must be spine (one spine router, a point-to-point link to each "
                                    f"top-of-rack router) or direct (every top-of-rack router on one segment), got "
                                    f"{_short(repr(mode), 40)}")
    cidr = _network(_given(fabric_in.cidr, default.cidr), loc + ("cidr",), str(default.cidr), issues)
    spine_asn = fabric_in.spine_as_number if fabric_in.spine_as_number is not None else default.spine_asn
    _check_asn(spine_asn, "spineASNumber", loc + ("spineASNumber",), issues)
    if mode == "direct" and fabric_in.spine_as_number is not None:
        issues.add(loc + ("spineASNumber",), "spineASNumber is only used by mode spine (with mode direct the "
                                             "top-of-rack routers peer with each other): remove it")
    if cidr is not None and mode in FABRIC_MODES:
        _check_fabric_room(mode, cidr, fabric_in.cidr, rack_count, loc + ("cidr",), issues)
    if len(issues) > before or cidr is None:
        return None
    return Fabric(mode=mode, cidr=cidr, spine_asn=spine_asn)


def _fabric_room(mode: str, prefixlen: int) -> int:
    """Racks a fabric range of this size joins: spine, one /30 per ToR (spine .1, ToR .2); direct, one
    address per ToR on a shared segment, less the network and broadcast addresses."""
    addresses = 2 ** (32 - prefixlen)
    if mode == "spine":
        return addresses // 4 if prefixlen <= 30 else 0
    return max(addresses - 2, 0)


def _check_fabric_room(mode: str, cidr: IPv4Network, given: str | None, racks: int, loc: Loc,
                       issues: _Issues) -> None:
    room = _fabric_room(mode, cidr.prefixlen)
    if room >= racks:
        return
    needed = max(p for p in range(0, 31) if _fabric_room(mode, p) >= racks)
    example = IPv4Network(f"{cidr.network_address}/{needed}", strict=False)
    why = ("mode spine gives each top-of-rack router its own /30 link to the spine (4 addresses)" if mode == "spine"
           else "mode direct puts every top-of-rack router on one segment (an address each, plus the network and "
                "broadcast addresses)")
    issues.add(loc, f"{cidr}{_default_note(given)} is too small for {_count(racks, 'rack')}: {why}, so a "
                    f"/{cidr.prefixlen} holds {_count(room, 'rack')}; use a /{needed} or larger, e.g. {example}")


def _count(number: int, noun: str) -> str:
    return f"no {noun}" if number == 0 else f"{number} {noun}{'' if number == 1 else 's'}"


# ---------------------------------------------------------------------------- links


@dataclass(frozen=True)
class _Unit:
    """How one link property is written: a bare number counts in `suffix`, a string carries one of `units`."""

    field: str
    suffix: str  # what a bare number means, e.g. Mbit
    units: dict[str, float]  # lower-case unit -> factor to `suffix`
    shown: str  # the units, for messages
    example: str
    maximum: float  # in `suffix`
    maximum_text: str
    absent: str  # what leaving the field out means


_BANDWIDTH = _Unit("bandwidth", "Mbit",
                   {"kbit": 1e-3, "kbps": 1e-3, "mbit": 1.0, "mbps": 1.0, "gbit": 1e3, "gbps": 1e3}, "kbit, Mbit or Gbit", "100Mbit", BANDWIDTH_MAX_MBIT, "100Gbit", "an unshaped link")
_DELAY = _Unit("delay", "ms", {"us": 1e-3, "usec": 1e-3, "ms": 1.0, "msec": 1.0, "s": 1e3, "sec": 1e3},
               "us, ms or s", "10ms", DELAY_MAX_MS, "60s", "no added delay")
_LOSS = _Unit("loss", "%", {"%": 1.0}, "%", "1%", 100.0, "100%", "no loss")
_JITTER = _Unit("jitter", "ms", _DELAY.units, _DELAY.shown, "5ms", DELAY_MAX_MS, "60s", "a constant delay")
_QUANTITY_TEXT = re.compile(r"^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*(\S*)\s*$")
_QUANTITY_MAX_TEXT = 40  # "100Mbit" needs far less; longer text is refused before any regex runs
# Byte units (MB, KiB/s, MBps): the capital B, or a spelled-out byte, is what tells them from bits.
_BYTES_UNIT = re.compile(r"^([kmg])(i?)(b|bytes?)(/s|ps)?$", re.IGNORECASE)


def _check_link(link_in: _LinkIn | None, loc: Loc, issues: _Issues, default: LinkSpec | None = None
                ) -> LinkSpec | None:
    """A link's MTU and shaping. delay, jitter and loss need the kernel's netem, which `lab up` checks, not the
    spec. `default` is what a node's link inherits (underlay.link)."""
    if link_in is None:
        return LinkSpec()
    before = len(issues)
    if link_in.mtu is not None and not MTU_MIN <= link_in.mtu <= MTU_MAX:
        issues.add(loc + ("mtu",), f"mtu {_show(link_in.mtu)} is out of range: use {MTU_MIN}..{MTU_MAX} "
                                   f"({DEFAULT_MTU} is Ethernet's usual size)")
    bandwidth = _quantity(link_in.bandwidth, _BANDWIDTH, loc + ("bandwidth",), issues)
    delay = _quantity(link_in.delay, _DELAY, loc + ("delay",), issues)
    loss = _quantity(link_in.loss, _LOSS, loc + ("loss",), issues)
    jitter = _quantity(link_in.jitter, _JITTER, loc + ("jitter",), issues)
    if jitter is not None and delay is None and (default is None or default.delay_ms is None):
        # netem varies a delay by up to the jitter (tc's `delay 50ms 5ms`): there is nothing to vary without one
        issues.add(loc + ("jitter",), f"jitter needs a delay to vary: add delay (e.g. delay: 50ms, jitter: "
                                      f"{_shown_quantity(link_in.jitter, _JITTER, None)}), or remove jitter")
    if len(issues) > before:
        return None
    return LinkSpec(mtu=link_in.mtu, bandwidth_mbit=bandwidth, delay_ms=delay, loss_percent=loss, jitter_ms=jitter)


def link_option(name: str, value: str) -> float:
    """A `lab link` option (delay, jitter or loss) read exactly as the spec's link field of that name (so
    "50ms", "250us", "1%" and a bare 50 mean the same in both); a bad value raises SpecError naming it."""
    issues = _Issues(_Source())
    given: str | float = value
    try:
        given = float(value)  # a bare number on the command line is what a YAML number is in the spec
    except ValueError:
        pass
    number = _quantity(given, {"delay": _DELAY, "jitter": _JITTER, "loss": _LOSS}[name], (name,), issues)
    issues.raise_if_any("lab link")
    assert number is not None
    return number


def _quantity(value: Any, unit: _Unit, loc: Loc, issues: _Issues) -> float | None:
    """A number in unit.suffix, or a string with a unit, as a float in unit.suffix; None if absent or wrong."""
    if value is None:
        return None
    raw = issues.source.raw.get(loc)
    number, problem = _read_quantity(value, unit, raw)
    if problem is None and number is not None:
        shown = _shown_quantity(value, unit, raw)
        if not number > 0:
            problem = f"{unit.field} {shown} must be more than 0: leave {unit.field} out for {unit.absent}"
        elif number > unit.maximum:
            problem = f"{unit.field} {shown} is more than {unit.maximum_text}: use at most {unit.maximum_text}"
    if problem is not None:
        issues.add(loc, problem)
        return None
    return number


def _shown_quantity(value: float | str, unit: _Unit, raw: str | None) -> str:
    """The value as written: a string as it is, a bare number with the unit it implies (10 -> 10Mbit)."""
    if isinstance(value, str):
        return _short(value, 40)
    if not math.isfinite(value):
        return _short(raw or str(value), 40)
    return f"{_num(value)}{unit.suffix}"


def _read_quantity(value: Any, unit: _Unit, raw: str | None) -> tuple[float | None, str | None]:
    expected = f"a number ({unit.suffix}) or a string with a unit ({unit.shown}), e.g. {unit.example}"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None, _wrong_type(expected, value, raw)
    if not isinstance(value, str):
        return (None, f"must be {expected}, got {value}") if math.isnan(value) else (float(value), None)
    match = _QUANTITY_TEXT.match(value) if len(value) <= _QUANTITY_MAX_TEXT else None
    if match is None:
        return None, f"{_short(repr(value), 40)} is not a {unit.field}: write {expected}"
    number, suffix = float(match[1]), match[2]
    if unit is _BANDWIDTH:
        problem = _bytes_problem(number, suffix, value)
        if problem:
            return None, problem
    factor = unit.units.get(suffix.lower())
    if factor is not None:
        return number * factor, None
    if suffix == "":
        return None, (f"{_short(repr(value), 40)} has no unit: write {match[1]}{unit.suffix}, or the number "
                      f"{match[1]} without quotes")
    return None, (f"unknown unit {_short(repr(suffix), 20)} in {_short(repr(value), 40)}: use {unit.shown}, "
                  f"e.g. {unit.example}")


def _bytes_problem(number: float, suffix: str, value: str) -> str | None:
    """tc and link speeds count bits; a size unit in bytes is the usual slip (10MB meant as 10 Mbit/s).
    kbps/mbps/gbps count bits here, as on network gear (tc would read them as bytes); MBps stays bytes."""
    match = _BYTES_UNIT.match(suffix)
    if match is None or (suffix.lower() in _BANDWIDTH.units and "B" not in suffix):
        return None
    prefix = {"k": "k", "m": "M", "g": "G"}[match[1].lower()]
    binary = (1.024 ** "kmg".index(match[1].lower()) * 1.024) if match[2] else 1.0
    return (f"{_short(repr(value), 40)} is in bytes, but bandwidth counts bits: write "
            f"{_num(number * 8 * binary)}{prefix}bit (a byte is 8 bits)")


def _num(value: float) -> str:
    """A number for a message: 10, not 10.0; 0.5 as it is."""
    return str(int(value)) if math.isfinite(value) and value == int(value) and abs(value) < 1e15 else f"{value:g}"


# ---------------------------------------------------------------------------- network


def _check_network(network_in: _NetworkIn, underlay: Underlay | None, issues: _Issues) -> Network | None:
    base = ("spec", "network")
    backend = network_in.backend if network_in.backend is not None else Network().backend
    ok = _check_backend(backend, issues)
    link_mtu = underlay.link.mtu if underlay is not None else None
    mtu = network_in.mtu if network_in.mtu is not None else _default_mtu(backend, link_mtu)
    if not MTU_MIN <= mtu <= MTU_MAX:
        if network_in.mtu is not None:
            issues.add(base + ("mtu",), f"mtu {_show(mtu)} is out of range: use {MTU_MIN}..{MTU_MAX} "
                                        f"({DEFAULT_MTU} is Ethernet's usual size)")
        else:
            overhead = _OVERHEAD.get(backend, 0)
            issues.add(("spec", "underlay", "link", "mtu"),
                       f"mtu {link_mtu} leaves pods {mtu} bytes once {backend} adds its {overhead} bytes of "
                       f"headers, below the minimum {MTU_MIN}: use {MTU_MIN + overhead} or more, or set "
                       "network.mtu")
        ok = False
    bgp = _check_bgp(network_in.bgp, backend, issues)
    ipip_mode = _check_ipip_mode(network_in.ipip_mode, backend, issues)
    if not ok or bgp is None or ipip_mode is None:
        return None
    return Network(backend=backend, mtu=mtu, bgp=bgp, ipip_mode=ipip_mode)


def _check_ipip_mode(mode: str | None, backend: str, issues: _Issues) -> str | None:
    """Calico's IPPool ipipMode: Always or CrossSubnet (Never is what backend bgp already is)."""
    loc = ("spec", "network", "ipipMode")
    if mode is None:
        return Network().ipip_mode
    if backend != "ipip":
        if backend in BACKENDS:
            issues.add(loc, "ipipMode is only used by backend ipip: remove it, or set backend: ipip")
        return None
    if mode in IPIP_MODES:
        return mode
    if mode == "Never":
        issues.add(loc, "ipipMode Never is Calico's BGP mode without encapsulation: use backend: bgp instead")
        return None
    known = {m.lower(): m for m in IPIP_MODES}
    hint = f" (did you mean {known[mode.lower()]}?)" if isinstance(mode, str) and mode.lower() in known else ""
    issues.add(loc, f"unknown ipipMode {_short(repr(mode), 40)}{hint}: use Always (every packet between nodes "
                    "is encapsulated) or CrossSubnet (only between nodes in different subnets), as in Calico's IPPool")
    return None


def _check_backend(backend: str, issues: _Issues) -> bool:
    if backend in BACKENDS:
        return True
    loc = ("spec", "network", "backend")
    supported = ", ".join(BACKENDS)
    if backend in PLANNED_BACKENDS:
        issues.add(loc, f"backend {backend} is not implemented yet; supported: {supported}")
    elif backend.lower() in BACKEND_HINTS:
        hint = BACKEND_HINTS[backend.lower()]
        issues.add(loc, f"unknown backend {_short(repr(backend), 40)} (did you mean {hint}?); supported: {supported}")
    else:
        issues.add(loc, f"unknown backend {_short(repr(backend), 40)}; supported: {supported}")
    return False


_OVERHEAD = {"vxlan": VXLAN_OVERHEAD, "ipip": IPIP_OVERHEAD}


def _default_mtu(backend: str, link_mtu: int | None) -> int:
    """The pods' MTU when none is given. Flannel's vxlan wraps every pod packet in 50 bytes of outer headers,
    so pods get the underlay's MTU minus 50 (1450 on a 1500-byte underlay); Calico's IP-in-IP adds one IPv4
    header, 20 bytes (1480, Calico's own figure; with CrossSubnet too, as Calico sizes every pod for the
    tunnel); host-gw and Calico's BGP mode (without IPIP) route pod packets as they are, so pods get the
    underlay's MTU."""
    underlay = link_mtu if link_mtu is not None else DEFAULT_MTU
    return underlay - _OVERHEAD.get(backend, 0)


def _check_bgp(bgp_in: _BgpIn | None, backend: str, issues: _Issues) -> Bgp | None:
    loc = ("spec", "network", "bgp")
    if bgp_in is None:
        return Bgp()
    if backend not in ("bgp", "ipip"):
        if backend in BACKENDS:
            issues.add(loc, "network.bgp is only used by backends bgp and ipip: remove it, or set backend: bgp")
        return None
    ok = True
    peering = bgp_in.peering if bgp_in.peering is not None else Bgp().peering
    if backend == "ipip" and peering == "tor":
        # The routers would reflect pod routes with themselves as next hop, and a router does not
        # decapsulate: Calico's IP-in-IP runs over the node mesh, the underlay only carries node addresses.
        issues.add(loc + ("peering",), "peering tor does not work with backend ipip: the racks' routers would "
                                       "become the next hop of pod routes and cannot unwrap IP-in-IP; use "
                                       "peering: mesh (the tunnel crosses the racks), or backend: bgp with "
                                       "peering: tor (no encapsulation)")
        ok = False
    if peering not in PEERINGS:
        issues.add(loc + ("peering",), f"peering must be mesh (every node peers with every other) or tor (each node "
                                       f"peers with its rack's router), got {_short(repr(peering), 40)}")
        ok = False
    # Calico's default AS for the cluster's nodes; with peering tor the nodes take their rack's AS instead.
    asn = bgp_in.as_number if bgp_in.as_number is not None else CALICO_AS
    ok = _check_asn(asn, "asNumber", loc + ("asNumber",), issues) and ok
    if peering == "tor" and bgp_in.as_number is not None:
        issues.add(loc + ("asNumber",), "asNumber is not used with peering tor: as in Calico's AS-per-rack model, "
                                        "each node takes its rack's AS (underlay.racks[].router.asNumber); remove it, "
                                        "or use peering: mesh")
        ok = False
    return Bgp(asn=asn, peering=peering) if ok else None


def _check_routing(network_in: _NetworkIn, network: Network, nodes_in: list[_NodeIn], racks: tuple[str, ...] | None,
                   issues: _Issues) -> None:
    """Whether the pod backend can carry traffic between nodes over this underlay."""
    base = ("spec", "network")
    spread = _two_racks(nodes_in, racks)
    if network.backend == "host-gw" and spread is not None:
        # Flannel's host-gw installs "PodCIDR via <node IP>" routes: the next hop must be on the same L2 segment.
        (first, first_rack), (other, other_rack) = spread
        issues.add(base + ("backend",),
                   f"backend host-gw{_default_note(network_in.backend)} needs every node on one L2 segment: Flannel's "
                   "host-gw routes a PodCIDR straight to the other node's IP, which must be on-link, but "
                   f"{first} is in {first_rack} and {other} in {other_rack}; use backend vxlan or bgp, or put all "
                   "nodes in one rack")
    if network.backend != "bgp":
        return
    given = (network_in.bgp or _BgpIn()).peering
    if network.bgp.peering == "tor" and not racks:
        issues.add(base + ("bgp", "peering"), "peering tor needs top-of-rack routers: give underlay.racks, or use "
                                              "peering: mesh")
    if network.bgp.peering == "mesh" and spread is not None:
        # A node mesh keeps pod routes among the nodes; the ToRs only know rack subnets, and a pod packet for
        # another rack is routed by them (the next hop, a node of another rack, is not on-link).
        (first, first_rack), (other, other_rack) = spread
        issues.add(base + ("bgp", "peering"),
                   f"peering mesh{_default_note(given)} leaves the racks' routers without pod routes: the nodes "
                   f"announce their PodCIDRs only to each other, so a packet from a pod on {first} ({first_rack}) "
                   f"to a pod on {other} ({other_rack}) goes to {first_rack}'s router, which has no route to "
                   f"{other}'s PodCIDR and drops it; use peering: tor (each node peers with its rack's router, "
                   "the route reflector of Calico's AS-per-rack model), or backend: ipip with ipipMode: "
                   "CrossSubnet (Calico's IP-in-IP between racks)")


def _two_racks(nodes_in: list[_NodeIn], racks: tuple[str, ...] | None
               ) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """The first two nodes (with their racks) that sit in different racks, or None if all share one."""
    placed = [(n.name, n.rack) for n in nodes_in if racks and n.rack in racks]
    for name, rack in placed[1:]:
        if rack != placed[0][1]:
            return (placed[0][0], placed[0][1]), (name, rack)  # type: ignore[return-value]
    return None


# ---------------------------------------------------------------------------- address ranges apart


def _check_disjoint(spec: _SpecIn, cluster: Cluster, underlay: Underlay, issues: _Issues) -> None:
    """Pod, Service and node addresses must be told apart by destination alone, so their ranges are disjoint."""
    given = spec.cluster or _ClusterIn()
    for other, key, given_other in ((cluster.pod_cidr, "podCIDR", given.pod_cidr),
                                    (cluster.service_cidr, "serviceCIDR", given.service_cidr)):
        for loc, net, given_net, why in _underlay_ranges(spec.underlay or _UnderlayIn(), underlay):
            if net.overlaps(other):
                _overlap(("spec", "cluster", key), other, given_other, loc, net, given_net, why, issues)


def _underlay_ranges(underlay_in: _UnderlayIn, underlay: Underlay) -> list[tuple[Loc, IPv4Network, str | None, str]]:
    """The underlay's ranges: where each is written, the range, whether it was given, and how to fix an overlap."""
    why = "node addresses must not come from the pod or Service ranges; pick a separate "
    if underlay.subnet is not None:
        return [(("spec", "underlay", "subnet"), underlay.subnet, underlay_in.subnet,
                 why + f"underlay.subnet (the default {Underlay().subnet} is one)")]
    ranges = [(_rack_loc(r.index) + ("subnet",), r.subnet, "given", why + f"subnet for rack {r.name}")
              for r in underlay.racks]
    if underlay.fabric is not None:
        fabric_in = underlay_in.fabric or _FabricIn()
        ranges.append((("spec", "underlay", "fabric", "cidr"), underlay.fabric.cidr, fabric_in.cidr,
                       "the routers' fabric links must not use pod or Service addresses; pick a separate fabric.cidr "
                       f"(the default {Fabric().cidr} is one)"))
    return ranges


def _overlap(first: Loc, first_net: IPv4Network, first_given: str | None, second: Loc, second_net: IPv4Network,
             second_given: str | None, why: str, issues: _Issues) -> None:
    """Report two overlapping ranges at the one the user wrote (the later one if both were written)."""
    here, there = (second, first) if second_given is not None or first_given is None else (first, second)
    nets = {first: (first_net, first_given), second: (second_net, second_given)}
    here_net, here_given = nets[here]
    there_net, there_given = nets[there]
    issues.add(here, f"{here_net}{_default_note(here_given)} overlaps {_path(there[1:])} {there_net}"
                     f"{_default_note(there_given)}: {why}")


# ---------------------------------------------------------------------------- nodes


def _check_nodes(nodes_in: list[_NodeIn], cluster: Cluster | None, underlay: Underlay | None,
                 racks: tuple[str, ...] | None, issues: _Issues) -> list[Node] | None:
    """Names, addresses, racks, links and PodCIDRs of the nodes; None when any of them is wrong."""
    before = len(issues)
    if not nodes_in:
        issues.add(("spec", "nodes"), "no nodes: a lab needs at least one, e.g. nodes: [{name: node1, ip: 192.168.1.10}]")
        return None
    seen_names: dict[str, int] = {}
    seen_ips: dict[IPv4Address, int] = {}
    ips: list[IPv4Address | None] = []
    links: list[LinkSpec | None] = []
    for index, node in enumerate(nodes_in):
        loc = ("spec", "nodes", index)
        problem = names.dns_label_problem(node.name)
        if problem:
            issues.add(loc + ("name",), problem)
        elif node.name in seen_names:
            issues.add(loc + ("name",), f"node name {node.name} is already used by spec.nodes[{seen_names[node.name]}]: "
                                        "give each node its own name")
        seen_names.setdefault(node.name, index)
        ip = _check_node_ip(node, loc, underlay, racks, issues)
        if ip is not None and ip in seen_ips:
            first = seen_ips[ip]
            issues.add(loc + ("ip",), f"{ip} is already the address of {nodes_in[first].name} (spec.nodes[{first}]): "
                                      "give each node its own IP")
            ip = None
        if ip is not None:
            seen_ips[ip] = index
        ips.append(ip)
        links.append(_check_link(node.link, loc + ("link",), issues, underlay.link if underlay else None))
    cidrs = _node_pod_cidrs(nodes_in, cluster, issues) if cluster is not None else None
    if cidrs is None or underlay is None or len(issues) > before:
        return None
    return [Node(name=n.name, ip=ip, pod_cidr=cidr, index=i, rack=n.rack,  # type: ignore[arg-type]
                 link=link.merged(underlay.link))  # type: ignore[union-attr]
            for i, (n, ip, cidr, link) in enumerate(zip(nodes_in, ips, cidrs, links))]


def _check_node_ip(node: _NodeIn, loc: Loc, underlay: Underlay | None, racks: tuple[str, ...] | None,
                   issues: _Issues) -> IPv4Address | None:
    segment = _node_segment(node.rack, loc, underlay, racks, issues)
    ip = _address(node.ip, loc + ("ip",), issues, "underlay.subnet" if racks is None else "its rack's subnet")
    if ip is None or segment is None:
        return ip
    subnet, where, rack = segment
    taken = rack.router_ip if rack is not None else None
    problem = _host_problem(ip, subnet, where, taken)
    if problem and rack is not None and ip not in subnet:
        problem += _other_rack_hint(ip, underlay)
    if problem is None and rack is not None and ip == rack.router_ip:
        problem = (f"{ip} is the address of {rack.router}, the router of rack {rack.name} (its nodes' gateway): "
                   f"pick another address in {_hosts(subnet, taken)}")
    if problem:
        issues.add(loc + ("ip",), problem)
        return None
    return ip


def _node_segment(rack_name: str | None, loc: Loc, underlay: Underlay | None, racks: tuple[str, ...] | None,
                  issues: _Issues, what: str = "node") -> tuple[IPv4Network, str, Rack | None] | None:
    """The subnet a host's IP must be in, how messages name it, and the host's rack; None when unknown.
    `what` names the kind of host (a node, an external host) in messages."""
    if racks is None:
        if rack_name is not None:
            issues.add(loc + ("rack",), "rack needs underlay.racks; this lab's underlay is one flat segment: remove "
                                        "rack, or give underlay.racks")
        if underlay is None or underlay.subnet is None:
            return None
        return underlay.subnet, f"underlay.subnet {underlay.subnet}", None
    if not racks:
        return None  # "no racks" is reported at underlay.racks
    if rack_name is None:
        issues.add(loc + ("rack",), f"missing; this lab's underlay has racks, so every {what} names the rack it sits "
                                    f"in, e.g. rack: {racks[0]} (racks: {', '.join(racks)})")
        return None
    if rack_name not in racks:
        issues.add(loc + ("rack",), f"rack {_short(rack_name, 60)} is not a rack of this lab "
                                    f"(racks: {', '.join(racks)})")
        return None
    if underlay is None or not underlay.routed:
        return None
    rack = underlay.rack(rack_name)
    return rack.subnet, f"rack {rack.name}'s subnet {rack.subnet}", rack


def _hosts(subnet: IPv4Network, taken: IPv4Address | None = None) -> str:
    """The host addresses of `subnet`, for a message; `taken` (a router's address) left out."""
    first, last = subnet.network_address + 1, subnet.broadcast_address - 1
    if taken == first and first < last:
        first += 1
    elif taken == last and first < last:
        last -= 1
    elif taken is not None and first < taken < last:
        return f"{first}..{last} except {taken}"
    return f"{first}..{last}"


def _host_problem(ip: IPv4Address, subnet: IPv4Network, where: str, taken: IPv4Address | None = None) -> str | None:
    """Why `ip` cannot be a host of `subnet` (named `where` in the message), or None."""
    hosts = _hosts(subnet, taken)
    if ip not in subnet:
        return f"{ip} is outside {where}: pick an address in {hosts}"
    if ip == subnet.network_address:
        return f"{ip} is the network address of {where}, not a host address: pick one of {hosts}"
    if ip == subnet.broadcast_address:
        return f"{ip} is the broadcast address of {where}, not a host address: pick one of {hosts}"
    return None


def _other_rack_hint(ip: IPv4Address, underlay: Underlay | None) -> str:
    for rack in underlay.racks if underlay is not None else ():
        if ip in rack.subnet:
            return f" ({ip} is in rack {rack.name}'s subnet: did you mean rack: {rack.name}?)"
    return ""


def _check_host_names(nodes_in: list[_NodeIn], underlay_in: _UnderlayIn, issues: _Issues) -> None:
    """Routers are hosts of the lab like nodes (each has a namespace named after it), so their names differ.
    Checked on the racks as written, so a clash shows up even while another rack field is wrong."""
    racks_in = underlay_in.racks or []
    routers: dict[str, int] = {}
    for index, rack_in in enumerate(racks_in):
        routers.setdefault(_router_name_of(rack_in), index)
    spine = _spine_asn(underlay_in.fabric or _FabricIn()) is not None
    for index, node in enumerate(nodes_in):
        loc = ("spec", "nodes", index, "name")
        rack = routers.get(node.name)
        if racks_in and spine and node.name == SPINE_ROUTER:
            issues.add(loc, f"node name {SPINE_ROUTER} is the name of the fabric's spine router: rename the node")
        elif rack is not None and _router_given(racks_in, rack, "name"):
            issues.add(_rack_loc(rack) + ("router", "name"),
                       f"router name {node.name} is also the name of node spec.nodes[{index}]: routers and nodes "
                       "are hosts of one lab and need different names; rename one")
        elif rack is not None:
            issues.add(loc, f"node name {node.name} is the default name of rack {racks_in[rack].name}'s router "
                            f"(tor-<rack>): rename the node, or give the router another name with "
                            f"underlay.racks[{rack}].router.name")


def _node_pod_cidrs(nodes_in: list[_NodeIn], cluster: Cluster, issues: _Issues) -> list[IPv4Network] | None:
    """Every node's PodCIDR: the one given, or the next free block. This is the only place it is computed.

    Kubernetes' range allocator hands each node a /nodeCIDRMaskSize block of the cluster podCIDR; on a
    real cluster the first node usually gets block 0 (10.244.0.0/24). Here block N goes to the Nth node
    without one, counting from 1, so node1 gets 10.244.1.0/24 as in the explainer's picture; block 0 is
    never handed out, and blocks given explicitly to other nodes are skipped.
    """
    explicit: dict[int, IPv4Network] = {}
    owner: dict[IPv4Network, int] = {}
    for index, node in enumerate(nodes_in):
        if node.pod_cidr is None:
            continue
        cidr = _check_given_pod_cidr(node.pod_cidr, ("spec", "nodes", index, "podCIDR"), cluster, issues)
        if cidr is None:
            continue
        if cidr in owner:
            first = owner[cidr]
            issues.add(("spec", "nodes", index, "podCIDR"),
                       f"{cidr} is already the PodCIDR of {nodes_in[first].name} (spec.nodes[{first}]): each node "
                       "needs its own block")
            continue
        owner[cidr] = index
        explicit[index] = cidr
    allocated = _allocate(nodes_in, explicit, cluster, issues)
    if allocated is None or len(explicit) + len(allocated) != len(nodes_in):
        return None
    return [explicit[i] if i in explicit else allocated[i] for i in range(len(nodes_in))]


def _check_given_pod_cidr(text: str, loc: Loc, cluster: Cluster, issues: _Issues) -> IPv4Network | None:
    mask = cluster.node_cidr_mask_size
    cidr = _network(text, loc, f"10.244.1.0/{mask}", issues)
    if cidr is None:
        return None
    if not cidr.subnet_of(cluster.pod_cidr):
        issues.add(loc, f"{cidr} is outside cluster.podCIDR {cluster.pod_cidr}: a node's PodCIDR is a block of the "
                        f"cluster's, e.g. {_block(cluster, 1)}")
        return None
    if cidr.prefixlen != mask:
        fixed = IPv4Network(f"{cidr.network_address}/{mask}", strict=False)
        issues.add(loc, f"{cidr} is a /{cidr.prefixlen} but cluster.nodeCIDRMaskSize is {mask}: use a /{mask} such as "
                        f"{fixed}, or change cluster.nodeCIDRMaskSize")
        return None
    return cidr


def _block(cluster: Cluster, index: int) -> IPv4Network:
    size = 2 ** (32 - cluster.node_cidr_mask_size)
    return IPv4Network(f"{cluster.pod_cidr.network_address + index * size}/{cluster.node_cidr_mask_size}")


def _allocate(nodes_in: list[_NodeIn], explicit: dict[int, IPv4Network], cluster: Cluster,
              issues: _Issues) -> dict[int, IPv4Network] | None:
    taken = set(explicit.values())
    blocks = 2 ** (cluster.node_cidr_mask_size - cluster.pod_cidr.prefixlen)
    allocated: dict[int, IPv4Network] = {}
    next_block = 1
    for index, node in enumerate(nodes_in):
        if node.pod_cidr is not None:
            continue
        while next_block < blocks and _block(cluster, next_block) in taken:
            next_block += 1
        if next_block >= blocks:
            fits = blocks - 1 + (1 if _block(cluster, 0) in taken else 0)
            issues.add(("spec", "nodes", index),
                       f"no PodCIDR left for {node.name}: cluster.podCIDR {cluster.pod_cidr} has room for {fits} node "
                       f"PodCIDR{'' if fits == 1 else 's'} of /{cluster.node_cidr_mask_size} (block 0, "
                       f"{_block(cluster, 0)}, is not handed "
                       f"out) but the lab has {len(nodes_in)} nodes; use a larger cluster.podCIDR (a shorter prefix) "
                       "or a larger cluster.nodeCIDRMaskSize")
            return None
        allocated[index] = _block(cluster, next_block)
        next_block += 1
    return allocated


# ---------------------------------------------------------------------------- kube-proxy and external hosts


# kube-proxy modes that are gone or belong to another platform: named so the message says why, not "unknown".
PROXY_MODE_HINTS = {
    "userspace": "the userspace mode was removed from kube-proxy in Kubernetes 1.26",
    "kernelspace": "kernelspace is kube-proxy's mode on Windows nodes",
}
# What an external host can run: http is agnhost netexec on port 80 (it shows the client IP it sees); dns an
# authoritative DNS server for the external hosts' `names`, which the cluster DNS forwards other names to.
EXTERNAL_SERVES = ("http", "dns")
PLANNED_SERVES: tuple[str, ...] = ()


def _addon_node(node: str | None, nodes_in: list[_NodeIn], loc: Loc, what: str, default: str,
                issues: _Issues) -> None:
    """An addon's `node` must name a node of the lab (its pod runs there)."""
    known = [n.name for n in nodes_in]
    if node is not None and known and node not in known:
        issues.add(loc, f"node {_short(node, 60)} is not a node of this lab (nodes: {', '.join(known)}): name the "
                        f"node {what} runs on, or leave node out for {default}")


def _check_dns(dns_in: _DnsIn, nodes_in: list[_NodeIn], cluster: Cluster | None, issues: _Issues) -> ClusterDns:
    """The cluster DNS addon (CoreDNS's role). Its Service, kube-dns in kube-system, takes serviceCIDR + 10 (the
    address kubeadm gives it and kubelet's --cluster-dns names), so that address must be inside the range.
    What is written is kept even when wrong, so the other checks see whether the addon runs."""
    loc = ("spec", "dns")
    default = ClusterDns()
    enabled = dns_in.enabled if dns_in.enabled is not None else default.enabled
    _addon_node(dns_in.node, nodes_in, loc + ("node",), "the cluster DNS pod", "the last node", issues)
    domain = dns_in.domain if dns_in.domain is not None else default.domain
    problem = _dns_name_problem(domain, "cluster domain", default.domain)
    if problem:
        issues.add(loc + ("domain",), problem)
        domain = default.domain
    if enabled and cluster is not None:
        cidr = cluster.service_cidr
        address = cidr.network_address + DNS_SERVICE_OFFSET
        if DNS_SERVICE_OFFSET >= cidr.num_addresses - 1:
            issues.add(("spec", "cluster", "serviceCIDR"),
                       f"{cidr} is too small for the cluster DNS: its kube-dns Service takes serviceCIDR + "
                       f"{DNS_SERVICE_OFFSET} ({address}), which must be a usable address of the range; use a /28 or "
                       "larger (e.g. 10.96.0.0/12), or set dns.enabled: false")
    return ClusterDns(enabled=enabled, node=dns_in.node, domain=domain)


def _check_ingress_controller(controller_in: _IngressControllerIn, nodes_in: list[_NodeIn],
                              issues: _Issues) -> IngressController:
    """The ingress controller addon (ingress-nginx's role): one pod, reached on a node port of every node.
    enabled left out (None) means it runs exactly when the lab has Ingress objects."""
    loc = ("spec", "ingressController")
    default = IngressController()
    _addon_node(controller_in.node, nodes_in, loc + ("node",), "the ingress controller pod", "the first node",
                issues)
    port = controller_in.node_port if controller_in.node_port is not None else default.node_port
    low, high = NODE_PORT_RANGE
    if not low <= port <= high:
        issues.add(loc + ("nodePort",), f"nodePort {_show(port)} is outside the node port range {low}-{high} "
                                        "(kube-apiserver's --service-node-port-range), where the controller's node "
                                        f"port comes from like a NodePort service's: pick one in it, e.g. "
                                        f"{default.node_port}")
        port = default.node_port
    return IngressController(enabled=controller_in.enabled, node=controller_in.node, node_port=port)


def _check_kube_proxy(proxy_in: _KubeProxyIn, issues: _Issues) -> KubeProxy | None:
    """kube-proxy's mode. Whether the kernel has what ipvs (or nftables) needs is checked at `lab up`."""
    mode = proxy_in.mode if proxy_in.mode is not None else KubeProxy().mode
    if mode in PROXY_MODES:
        return KubeProxy(mode=mode)
    loc = ("spec", "kubeProxy", "mode")
    supported = ", ".join(PROXY_MODES)
    if mode.lower() in PROXY_MODE_HINTS:
        issues.add(loc, f"{PROXY_MODE_HINTS[mode.lower()]}: use one of {supported}")
        return None
    close = _close_match(mode, PROXY_MODES)
    hint = f" (did you mean {close}?)" if close else ""
    issues.add(loc, f"unknown kube-proxy mode {_short(repr(mode), 40)}{hint}; supported: {supported} "
                    f"(iptables is Kubernetes' default)")
    return None


def _close_match(value: str, allowed: tuple[str, ...] | list[str], cutoff: float = 0.6) -> str | None:
    """The allowed value `value` was probably meant to be (case ignored), or None."""
    lowered = {a.lower(): a for a in allowed}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=cutoff)
    if close:
        return lowered[close[0]]
    starts = [a for low, a in lowered.items() if len(value) >= 3 and low.startswith(value.lower())]
    return starts[0] if len(starts) == 1 else None  # an abbreviation: nft for nftables


def _check_external(hosts_in: list[_ExternalIn], nodes_in: list[_NodeIn], underlay_in: _UnderlayIn,
                    underlay: Underlay | None, racks: tuple[str, ...] | None, dns: ClusterDns | None,
                    issues: _Issues) -> list[ExternalHost] | None:
    """Machines outside the cluster, plugged into the underlay like a node (a flat segment, or a rack), so
    their names and addresses share the nodes' and routers' rules and may not clash with them."""
    before = len(issues)
    taken_names = _host_names(nodes_in, underlay_in)
    taken_ips: dict[IPv4Address, str] = {}
    for index, node in enumerate(nodes_in):
        if _ADDRESS_TEXT.match(node.ip):
            try:
                taken_ips.setdefault(IPv4Address(node.ip), f"the address of node {node.name} (spec.nodes[{index}])")
            except ValueError:
                pass
    seen: dict[str, int] = {}
    hosts = []
    for index, host in enumerate(hosts_in):
        loc = ("spec", "external", index)
        problem = names.dns_label_problem(host.name)
        if problem:
            issues.add(loc + ("name",), problem)
        elif host.name in seen:
            issues.add(loc + ("name",), f"external host name {host.name} is already used by spec.external"
                                        f"[{seen[host.name]}]: give each external host its own name")
        elif host.name in taken_names:
            issues.add(loc + ("name",), f"external host name {host.name} is {taken_names[host.name]}: nodes, routers "
                                        "and external hosts are hosts of one lab and need different names; rename "
                                        "the external host")
        seen.setdefault(host.name, index)
        ip = _check_external_ip(host, loc, underlay, racks, taken_ips, issues)
        if ip is not None:
            taken_ips[ip] = f"the address of external host {host.name} (spec.external[{index}])"
        serves = _check_serves(host.serves, loc + ("serves",), issues)
        if ip is not None and serves is not None:
            hosts.append(ExternalHost(name=host.name, ip=ip, serves=serves, rack=host.rack, index=index,
                                      names=tuple(host.names or ())))
    _check_dns_server(hosts_in, issues)
    _check_external_names(hosts_in, dns, issues)
    return hosts if len(issues) == before else None


def _check_dns_server(hosts_in: list[_ExternalIn], issues: _Issues) -> None:
    """One external host at most serves dns: the cluster DNS forwards names outside the cluster to one
    upstream, and every external host's `names` are answered by that one server."""
    server: int | None = None
    for index, host in enumerate(hosts_in):
        if "dns" not in (host.serves or ()):
            continue
        if server is None:
            server = index
            continue
        position = (host.serves or []).index("dns")
        issues.add(("spec", "external", index, "serves", position),
                   f"external host {hosts_in[server].name} (spec.external[{server}]) already serves dns; at most one "
                   "external host may serve dns (it answers every external host's names, and the cluster DNS "
                   "forwards to it): remove dns from this host's serves")


def _check_external_names(hosts_in: list[_ExternalIn], dns: ClusterDns | None, issues: _Issues) -> None:
    """`names` are DNS names of an external host, answered by the external host that serves dns; each name
    belongs to one host, and none may fall inside the cluster domain, which the cluster DNS answers itself."""
    owners: dict[str, tuple[int, int]] = {}
    first_with_names: int | None = None
    for index, host in enumerate(hosts_in):
        loc = ("spec", "external", index, "names")
        if host.names and first_with_names is None:
            first_with_names = index
        for position, name in enumerate(host.names or []):
            problem = _dns_name_problem(name, "name", "api.example.com")
            if problem:
                issues.add(loc + (position,), problem)
                continue
            if name in owners:
                other, other_position = owners[name]
                where = (f"names[{other_position}]" if other == index else
                         f"spec.external[{other}].names[{other_position}] ({hosts_in[other].name})")
                issues.add(loc + (position,), f"name {name} is already given at {where}: a name points at one host; "
                                              "remove one")
                continue
            owners[name] = (index, position)
            if dns is not None and dns.enabled and (name == dns.domain or name.endswith("." + dns.domain)):
                issues.add(loc + (position,), f"{name} is inside the cluster domain {dns.domain}, which the cluster "
                                              "DNS answers itself and never forwards to the external DNS server: pick "
                                              "a name outside it, e.g. api.example.com")
    if first_with_names is not None and not any("dns" in (h.serves or ()) for h in hosts_in):
        issues.add(("spec", "external", first_with_names, "names"),
                   "no external host serves dns: add dns to one host's serves (e.g. serves: [http, dns]) so these "
                   "names are answered, or remove names")


def _host_names(nodes_in: list[_NodeIn], underlay_in: _UnderlayIn) -> dict[str, str]:
    """Names of the lab's nodes and routers, each with how a message names its owner."""
    taken: dict[str, str] = {}
    for index, node in enumerate(nodes_in):
        taken.setdefault(node.name, f"also the name of node spec.nodes[{index}]")
    for index, rack_in in enumerate(underlay_in.racks or []):
        taken.setdefault(_router_name_of(rack_in), f"the name of rack {rack_in.name}'s router "
                                                   f"(spec.underlay.racks[{index}])")
    if underlay_in.racks and _spine_asn(underlay_in.fabric or _FabricIn()) is not None:
        taken.setdefault(SPINE_ROUTER, "the name of the fabric's spine router")
    return taken


def _check_external_ip(host: _ExternalIn, loc: Loc, underlay: Underlay | None, racks: tuple[str, ...] | None,
                       taken: dict[IPv4Address, str], issues: _Issues) -> IPv4Address | None:
    segment = _node_segment(host.rack, loc, underlay, racks, issues, what="external host")
    ip = _address(host.ip, loc + ("ip",), issues, "underlay.subnet" if racks is None else "its rack's subnet")
    if ip is None or segment is None:
        return None
    subnet, where, rack = segment
    router_ip = rack.router_ip if rack is not None else None
    problem = _host_problem(ip, subnet, where, router_ip)
    if problem and rack is not None and ip not in subnet:
        problem += _other_rack_hint(ip, underlay)
    if problem is None and rack is not None and ip == router_ip:
        problem = (f"{ip} is the address of {rack.router}, the router of rack {rack.name}: pick another address "
                   f"in {_hosts(subnet, router_ip)}")
    if problem is None and ip in taken:
        problem = f"{ip} is already {taken[ip]}: give the external host an address of its own in {where}"
    if problem:
        issues.add(loc + ("ip",), problem)
        return None
    return ip


def _check_serves(serves: list[str] | None, loc: Loc, issues: _Issues) -> tuple[str, ...] | None:
    """What the host runs; an empty list makes it a bare client (to reach NodePorts from outside, say)."""
    if serves is None:
        return ExternalHost.serves  # the model's default: a dataclass keeps it as the class attribute
    ok = True
    supported = ", ".join(EXTERNAL_SERVES)
    for index, item in enumerate(serves):
        if item in serves[:index]:
            issues.add(loc + (index,), f"{_short(item, 40)} is listed twice: keep one")
            ok = False
        elif item in PLANNED_SERVES:
            issues.add(loc + (index,), f"an external host cannot serve {item} yet; supported: {supported}")
            ok = False
        elif item not in EXTERNAL_SERVES:
            close = _close_match(item, EXTERNAL_SERVES)
            hint = f" (did you mean {close}?)" if close else ""
            issues.add(loc + (index,), f"unknown service {_short(repr(item), 40)} for an external host{hint}; "
                                       f"supported: {supported} (or [] for a host that only acts as a client)")
            ok = False
    return tuple(serves) if ok else None


# ============================================================================ Kubernetes objects


@dataclass(frozen=True)
class _PodTemplate:
    """What a Pod, or every replica of a Deployment, runs: the part of a Pod that does not depend on placement."""

    labels: tuple[tuple[str, str], ...]
    containers: tuple[Container, ...]
    node_name: str | None
    node_loc: Loc  # where nodeName is (or would be) written, for messages
    dns_policy: str = "ClusterFirst"
    dns_config: DnsConfig | None = None


@dataclass
class _Parsed:
    """One object after its own checks, before the checks that involve other objects or the lab."""

    api_version: str
    kind: str
    loc: Loc
    manifest: dict[str, Any]
    name: str
    namespace: str | None  # None for cluster-scoped kinds (Namespace)
    labels: dict[str, str]
    template: _PodTemplate | None = None  # objects that make pods
    replicas: int | None = None  # None: one pod named like the object (a bare Pod)
    service: _ServiceDraft | None = None  # Services
    ingress: _IngressDraft | None = None  # Ingresses
    policy: NetworkPolicy | None = None  # NetworkPolicies


@dataclass(frozen=True)
class _IngressDraft:
    """An Ingress after its own checks; its backends and routes are checked against the lab's services and the
    other Ingresses later, so each is kept with where it is written."""

    ingress: Ingress
    backends: tuple[tuple[Loc, IngressBackend], ...]
    routes: tuple[tuple[Loc, str | None, str, str], ...]  # (where, host, path, pathType) of every path


@dataclass(frozen=True)
class _ServiceDraft:
    """A Service after its own checks, before the lab gives it what was left out: its `service` holds the
    clusterIP and nodePorts as given (None: to be allocated, unless `headless`)."""

    service: Service
    headless: bool


Reader = Callable[[Any, Loc, "_Issues"], "_Parsed | None"]


def _object_documents(text: str, source: _Source, issues: _Issues) -> list[tuple[Loc, Any]]:
    """The objects of an apply file: each document, or each item of a `kind: List` document."""
    documents = _compose(text, source, issues, lambda i, n: ("documents", i) if n > 1 else ())
    if documents is None:
        return []
    entries: list[tuple[Loc, Any]] = []
    for index, doc in enumerate(documents):
        base: Loc = ("documents", index) if len(documents) > 1 else ()
        if isinstance(doc, dict) and doc.get("kind") == "List":
            items = doc.get("items")
            if not isinstance(items, list):
                issues.add(base + ("items",), "a kind: List document needs items: a list of objects")
                continue
            entries.extend((base + ("items", i), item) for i, item in enumerate(items))
        else:
            entries.append((base, doc))
    return entries


def _read_objects(entries: list[tuple[Loc, Any]], issues: _Issues) -> list[_Parsed]:
    """Each object's own checks, through the KINDS registry; objects with problems are left out."""
    parsed = []
    for loc, obj in entries:
        result = _read_object(obj, loc, issues)
        if result is not None:
            parsed.append(result)
    return parsed


def _read_object(obj: Any, loc: Loc, issues: _Issues) -> _Parsed | None:
    if not isinstance(obj, dict):
        issues.add(loc, f"an object must be a mapping with apiVersion, kind, metadata (and spec), not {_describe(obj)}")
        return None
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    ok = True
    for key, value, example in (("apiVersion", api_version, "apiVersion: v1"), ("kind", kind, "kind: Pod")):
        if key not in obj:
            issues.add(loc + (key,), f"missing; every object needs apiVersion and kind, e.g. {example}")
            ok = False
        elif not isinstance(value, str):
            issues.add(loc + (key,), _wrong_type("a string", value, issues.source.raw.get(loc + (key,))))
            ok = False
    if not ok:
        return None
    reader = KINDS.get((api_version, kind))
    if reader is None and (api_version, kind) == (API_VERSION, LAB_KIND):
        issues.add(loc + ("kind",), "a Lab is a kubenet-lab spec, not a Kubernetes object: bring it up as a lab "
                                    "(lab up FILE); only Kubernetes objects go here")
        return None
    if reader is None:
        wrong_version = any(known == kind for _, known in KINDS)
        issues.add(loc + ("apiVersion" if wrong_version else "kind",), _unsupported_kind(api_version, kind))
        return None
    result = reader(obj, loc, issues)
    if result is None:
        meta = obj.get("metadata")
        if isinstance(meta, dict) and isinstance(meta.get("name"), str):
            namespace = meta.get("namespace")
            issues.refused.add((kind, namespace if isinstance(namespace, str) else "default", meta["name"]))
    return result


def _unsupported_kind(api_version: str, kind: str) -> str:
    supported = ", ".join(f"{a} {k}" for a, k in KINDS)
    for known_api, known_kind in KINDS:
        if known_kind == kind:
            return f"kind {kind} is served by apiVersion {known_api} here, not {_short(api_version, 40)}: set apiVersion: {known_api}"
    close = difflib.get_close_matches(kind.lower(), [k.lower() for _, k in KINDS], n=1, cutoff=0.8)
    if close:
        match = next(k for _, k in KINDS if k.lower() == close[0])
        return f"unknown kind {_short(repr(kind), 40)} (did you mean {match}?)"
    return (f"kind {_short(kind, 40)} ({_short(api_version, 40)}) is not supported by this version of kubenet-lab "
            f"(supported: {supported})")


# ---------------------------------------------------------------------------- metadata


_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_MAX = 63
_SUBDOMAIN_MAX = 253


def _label_key_problem(key: str) -> str | None:
    """Kubernetes label key syntax: [prefix/]name, prefix a DNS-1123 subdomain, name at most 63 characters."""
    parts = key.split("/")
    if len(parts) > 2:
        return f"label key {_short(repr(key), 60)} has more than one '/': write [prefix/]name, e.g. app.kubernetes.io/name"
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix or len(prefix) > _SUBDOMAIN_MAX or not _DNS_SUBDOMAIN.match(prefix):
            return (f"label key prefix {_short(repr(prefix), 60)} is not a DNS subdomain: use lower-case letters, "
                    "digits, '-' and '.', e.g. example.com/")
    name = parts[-1]
    if not name or len(name) > _LABEL_MAX or not _LABEL_NAME.match(name):
        return (f"label key {_short(repr(key), 60)} is not valid: the name part must be 1..63 letters, digits, '-', "
                "'_' or '.', starting and ending with a letter or digit")
    return None


def _label_value_problem(value: str) -> str | None:
    if value == "" or (len(value) <= _LABEL_MAX and _LABEL_NAME.match(value)):
        return None
    return (f"label value {_short(repr(value), 60)} is not valid: use at most 63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit (or leave it empty)")


def _check_labels(labels: dict[str, str] | None, loc: Loc, issues: _Issues) -> bool:
    ok = True
    for key, value in (labels or {}).items():
        problem = _label_key_problem(key) or _label_value_problem(value)
        if problem:
            issues.add(loc + (key,), problem)
            ok = False
    return ok


def _check_meta(meta: _ObjectMetaIn, loc: Loc, issues: _Issues, name_max: int = names.DNS1123_LABEL_MAX,
                service: bool = False) -> bool:
    """Object names and namespaces are DNS-1123 labels: they become parts of network namespace names.
    Service names are stricter (DNS-1035 labels), see `_service_name_problem`."""
    ok = True
    problem = _service_name_problem(meta.name) if service else names.dns_label_problem(meta.name, name_max)
    if problem:
        issues.add(loc + ("name",), problem)
        ok = False
    if meta.namespace is not None:
        problem = names.dns_label_problem(meta.namespace)
        if problem:
            issues.add(loc + ("namespace",), problem)
            ok = False
    return _check_labels(meta.labels, loc + ("labels",), issues) and ok


def _manifest(model: BaseModel) -> dict[str, Any]:
    """The normalized manifest: what was given, in Kubernetes' spelling, without nulls."""
    return model.model_dump(by_alias=True, exclude_none=True)


# ---------------------------------------------------------------------------- pods and containers


_RESTART_POLICIES = ("Always", "OnFailure", "Never")
_DNS_POLICIES = ("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None")
_PROTOCOLS = ("TCP", "UDP", "SCTP")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")  # Kubernetes' env var name rule
_PORT_NAME = re.compile(r"^[-a-z0-9]+$")
_PORT_NAME_MAX = 15  # IANA service names
_MAX_NAMESERVERS = 3  # glibc's resolver uses three at most; Kubernetes enforces it
_MAX_SEARCHES = 32
_MAX_SEARCH_CHARS = 2048  # Kubernetes' limit on the search list's total length
_NDOTS_MAX = 15  # glibc's resolver caps ndots at 15
_NDOTS_CLUSTER_FIRST = 5  # what kubelet writes for ClusterFirst pods


def _check_pod_spec(spec: _PodSpecIn, loc: Loc, labels: dict[str, str], issues: _Issues) -> _PodTemplate | None:
    before = len(issues)
    if not spec.containers:
        issues.add(loc + ("containers",), "no containers: a pod needs at least one, e.g. "
                                          "containers: [{name: app, image: agnhost, args: [netexec]}]")
    containers = []
    seen: dict[str, int] = {}
    port_names: dict[str, Loc] = {}
    for index, container_in in enumerate(spec.containers):
        cloc = loc + ("containers", index)
        if container_in.name in seen:
            issues.add(cloc + ("name",), f"container name {container_in.name} is already used by containers"
                                         f"[{seen[container_in.name]}]: give each container of a pod its own name")
        seen.setdefault(container_in.name, index)
        container = _check_container(container_in, cloc, port_names, issues)
        if container is not None:
            containers.append(container)
    _check_pod_extras(spec, loc, issues)
    if len(issues) > before:
        return None
    return _PodTemplate(labels=tuple(labels.items()), containers=tuple(containers), node_name=spec.node_name,
                        node_loc=loc + ("nodeName",), dns_policy=spec.dns_policy or _DNS_POLICIES[0],
                        dns_config=_dns_config(spec.dns_config))


def _check_pod_extras(spec: _PodSpecIn, loc: Loc, issues: _Issues) -> None:
    """Fields that do not change the emulation are still checked, so a typo in them is not silently kept."""
    if spec.restart_policy is not None and spec.restart_policy not in _RESTART_POLICIES:
        issues.add(loc + ("restartPolicy",), f"restartPolicy must be one of {', '.join(_RESTART_POLICIES)}, "
                                             f"got {_short(repr(spec.restart_policy), 40)}")
    if spec.dns_policy is not None and spec.dns_policy not in _DNS_POLICIES:
        issues.add(loc + ("dnsPolicy",), f"dnsPolicy must be one of {', '.join(_DNS_POLICIES)}, "
                                         f"got {_short(repr(spec.dns_policy), 40)}")
    # Kubernetes: with dnsPolicy None the pod's resolv.conf is made from dnsConfig alone, so the API server
    # refuses it without at least one nameserver there.
    if spec.dns_policy == "None" and not (spec.dns_config and spec.dns_config.nameservers):
        issues.add(loc + ("dnsPolicy",), "dnsPolicy None takes all DNS settings from dnsConfig: add dnsConfig with "
                                         "at least one nameserver")
    if spec.termination_grace_period_seconds is not None and spec.termination_grace_period_seconds < 0:
        issues.add(loc + ("terminationGracePeriodSeconds",), "must be 0 or more")
    for key, value in (("hostname", spec.hostname), ("subdomain", spec.subdomain)):
        problem = names.dns_label_problem(value) if value is not None else None
        if problem:
            issues.add(loc + (key,), problem)
    if spec.dns_config is not None:
        _check_dns_config(spec.dns_config, loc + ("dnsConfig",), issues)


def _check_dns_config(config: _DnsConfigIn, loc: Loc, issues: _Issues) -> None:
    """Kubernetes' dnsConfig rules (it becomes the pod's resolv.conf, merged into what dnsPolicy gives):
    at most 3 nameservers, each an IP address (IPv4 here); at most 32 search domains, each a DNS name, and at
    most 2048 characters of them together; every option named. An ndots value is what glibc's resolver reads
    (a whole number, capped at 15), so it is checked too: the API server takes any string and the resolver
    would silently ignore a wrong one."""
    servers = config.nameservers or []
    if len(servers) > _MAX_NAMESERVERS:
        issues.add(loc + ("nameservers",), f"{len(servers)} nameservers given; the resolver uses at most "
                                           f"{_MAX_NAMESERVERS}: remove some")
    for index, server in enumerate(servers):
        try:
            address = ipaddress.ip_address(server)
        except ValueError:
            issues.add(loc + ("nameservers", index), f"{_short(repr(server), 40)} is not an IP address: write one like 10.96.0.10")
            continue
        if address.version == 6:
            issues.add(loc + ("nameservers", index), f"{_short(server, 40)} is IPv6; kubenet-lab labs are IPv4 only: "
                                                     "write an IPv4 address like 10.96.0.10")
    searches = config.searches or []
    if len(searches) > _MAX_SEARCHES:
        issues.add(loc + ("searches",), f"at most {_MAX_SEARCHES} search domains are allowed")
    for index, search in enumerate(searches):
        # A trailing dot (an absolute name) is fine in a search list, as Kubernetes allows it.
        problem = _dns_name_problem(search[:-1] if search.endswith(".") and search != "." else search,
                                    "search domain", "default.svc.cluster.local")
        if problem:
            issues.add(loc + ("searches", index), problem)
    if len(" ".join(searches)) > _MAX_SEARCH_CHARS:
        issues.add(loc + ("searches",), f"the search domains take {len(' '.join(searches))} characters together; "
                                        f"Kubernetes allows at most {_MAX_SEARCH_CHARS}: remove or shorten some")
    for index, option in enumerate(config.options or []):
        oloc = loc + ("options", index)
        if not option.name:
            issues.add(oloc + ("name",), "must not be empty (e.g. ndots)")
        elif ":" in option.name:
            name, _, value = option.name.partition(":")
            issues.add(oloc + ("name",), f"{_short(repr(option.name), 40)} holds a value: write the name and the value "
                                         f"apart, name: {_short(name, 20)}, value: {json.dumps(_short(value, 20))} "
                                         "(resolv.conf's name:value form is made from them)")
        elif option.name == "ndots":
            _check_ndots(option.value, oloc + ("value",), issues)


def _check_ndots(value: str | None, loc: Loc, issues: _Issues) -> None:
    """ndots: names with fewer dots than this are tried with the search domains first. glibc reads a whole
    number and caps it at 15; Kubernetes' ClusterFirst gives 5."""
    example = f'value: "{_NDOTS_CLUSTER_FIRST}"'
    if value is None:
        issues.add(loc, f"missing; ndots needs a number of dots 0..{_NDOTS_MAX}, e.g. {example}")
    elif not re.fullmatch(r"[0-9]+", value):
        issues.add(loc, f"ndots {_short(repr(value), 30)} is not a whole number: write 0..{_NDOTS_MAX} as a string, "
                        f"e.g. {example}")
    elif int(value[:4]) > _NDOTS_MAX:
        issues.add(loc, f"ndots {_short(value, 30)} is more than {_NDOTS_MAX}, the most the resolver uses: write "
                        f"0..{_NDOTS_MAX}, e.g. {example}")


def _dns_config(config: _DnsConfigIn | None) -> DnsConfig | None:
    if config is None:
        return None
    return DnsConfig(nameservers=tuple(config.nameservers or ()), searches=tuple(config.searches or ()),
                     options=tuple((o.name, o.value) for o in config.options or ()))


_DNS_NAME_MAX = 253


def _dns_name_problem(value: str, what: str, example: str, wildcard: bool = False) -> str | None:
    """Why `value` is not a DNS name (lower-case DNS-1123 labels joined by dots, 253 characters at most, as
    Kubernetes' DNS-1123 subdomain rule), or None. With `wildcard`, the first label may be `*` (`*.example.com`
    matches one label in its place, as an Ingress host)."""
    shown = _short(repr(value), 60)
    if value == "":
        return f"the {what} is empty: write a DNS name, e.g. {example}"
    if value.endswith(".") and value != ".":
        return f"{shown} ends with a dot: write the {what} without it, {_short(value[:-1], 60)}"
    if len(value) > _DNS_NAME_MAX:
        return f"the {what} {shown} is {len(value)} characters; a DNS name has at most {_DNS_NAME_MAX}"
    labels = value.split(".")
    if wildcard and labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    if "*" in ".".join(labels):
        if wildcard:
            return f"{shown} is not a valid {what}: '*' may only be the whole first label, e.g. *.example.com"
        return f"{shown} is not a valid {what}: a '*' (wildcard) is not allowed here"
    if _ADDRESS_TEXT.match(value):
        return f"{shown} is an IP address, but a {what} must be a DNS name, e.g. {example}"
    if value != value.lower() and all(names.is_dns_label(label) for label in value.lower().split(".")[-len(labels):]):
        return f"{shown} has upper-case letters: write DNS names in lower case, {_short(value.lower(), 60)}"
    for label in labels:
        if not names.is_dns_label(label):
            return (f"{shown} is not a valid {what}: each dot-separated part must be 1..63 lower-case letters, digits "
                    f"and '-', starting and ending with a letter or digit, e.g. {example}")
    return None


def _check_container(container: _ContainerIn, loc: Loc, port_names: dict[str, Loc],
                     issues: _Issues) -> Container | None:
    before = len(issues)
    problem = names.dns_label_problem(container.name)
    if problem:
        issues.add(loc + ("name",), problem)
    if not container.image or any(ch.isspace() or not ch.isprintable() for ch in container.image):
        issues.add(loc + ("image",), f"{_short(repr(container.image), 60)} is not an image name: write one like agnhost "
                                     "or registry.k8s.io/e2e-test-images/agnhost:2.47")
    for key in ("command", "args"):
        for index, arg in enumerate(getattr(container, key) or []):
            if "\0" in arg:
                issues.add(loc + (key, index), "contains a NUL character, which no program argument can hold: remove it")
    for index, env in enumerate(container.env or []):
        if not _ENV_NAME.match(env.name):
            issues.add(loc + ("env", index, "name"), f"{_short(repr(env.name), 40)} is not a valid variable name: use "
                                                     "letters, digits, '_', '-' and '.', not starting with a digit")
    ports = _check_ports(container.ports or [], loc + ("ports",), port_names, issues)
    argv = _argv(container, loc, issues) if len(issues) == before else None
    if argv is None or len(issues) > before:
        return None
    env = tuple((e.name, e.value or "") for e in container.env or [])
    return Container(name=container.name, image=container.image, argv=argv, ports=ports, env=env)


def _check_ports(ports_in: list[_PortIn], loc: Loc, port_names: dict[str, Loc],
                 issues: _Issues) -> tuple[ContainerPort, ...]:
    ports = []
    for index, port in enumerate(ports_in):
        ploc = loc + (index,)
        protocol = port.protocol if port.protocol is not None else "TCP"
        if not 1 <= port.container_port <= 65535:
            issues.add(ploc + ("containerPort",), f"{_show(port.container_port)} is not a port number: use 1..65535")
        problem = _protocol_problem(protocol)
        if problem:
            issues.add(ploc + ("protocol",), problem)
        if port.name is not None:
            problem = _port_name_problem(port.name)
            if problem:
                issues.add(ploc + ("name",), problem)
            elif port.name in port_names:
                issues.add(ploc + ("name",), f"port name {port.name} is already used at {_path(port_names[port.name])}: "
                                             "port names must be unique within a pod")
            else:
                port_names[port.name] = ploc + ("name",)
        ports.append(ContainerPort(container_port=port.container_port, protocol=protocol, name=port.name))
    return tuple(ports)


def _protocol_problem(protocol: str) -> str | None:
    if protocol in _PROTOCOLS:
        return None
    hint = f" (write {protocol.upper()})" if protocol.upper() in _PROTOCOLS else ""
    return f"protocol must be one of {', '.join(_PROTOCOLS)}, got {_short(repr(protocol), 30)}{hint}"


def _port_name_problem(name: str) -> str | None:
    """IANA service name rules, as Kubernetes applies them to port names."""
    if (len(name) <= _PORT_NAME_MAX and _PORT_NAME.match(name) and re.search("[a-z]", name)
            and "--" not in name and not name.startswith("-") and not name.endswith("-")):
        return None
    return (f"{_short(repr(name), 40)} is not a valid port name: at most {_PORT_NAME_MAX} lower-case letters, digits "
            "and single '-', with at least one letter, e.g. http")


def image_base(image: str) -> str:
    """The image's own name: the last path component, without tag or digest.

    `registry.k8s.io/e2e-test-images/agnhost:2.47` and `agnhost@sha256:...` both name agnhost.
    """
    without_digest = image.split("@", 1)[0]
    return without_digest.rsplit("/", 1)[-1].split(":", 1)[0]


def _argv(container: _ContainerIn, loc: Loc, issues: _Issues) -> tuple[str, ...] | None:
    """What the container runs on this machine (never through a shell).

    A built-in image without `command` runs its stand-in: agnhost as a Python module, pause as nothing at
    all (the pod's own pause process holds the namespaces, so an empty argv means "nothing to start").
    `command` replaces the image's entrypoint, as in Kubernetes, and `args` follow it.
    """
    args = tuple(container.args or ())
    if container.command is not None:
        if not container.command or not container.command[0]:
            issues.add(loc + ("command",), "command is empty: give the program to run, e.g. command: [sleep, infinity]")
            return None
        return (*container.command, *args)
    base = image_base(container.image)
    if base == "agnhost":
        where, problem = _agnhost_problem(args)
        if problem:
            issues.add(loc + where, problem)
            return None
        return (sys.executable, "-m", AGNHOST_MODULE, *args)
    if base == "pause":
        if args:
            issues.add(loc + ("args",), "image pause runs nothing and takes no args: remove args (or give "
                                        "command: [...] to run a program)")
            return None
        return ()
    issues.add(loc + ("image",), f"image {_short(container.image, 60)} is not built in (built-ins: "
                                 f"{', '.join(BUILTIN_IMAGES)}): give command: [...] to run a program from this machine")
    return None


def _agnhost_problem(args: tuple[str, ...]) -> tuple[Loc, str | None]:
    """Check agnhost args with the stand-in's own rules, so a typo fails at validation, not inside a pod.

    The stand-in is imported only here: the spec layer must load even where the lab layer is absent.
    """
    if not args:
        return ("args",), "agnhost needs a subcommand as its first arg, e.g. args: [netexec, --http-port=8080]"
    try:
        agnhost = importlib.import_module(AGNHOST_MODULE)
    except Exception:  # absent or broken: accept the args unchecked rather than refuse every lab
        return ("args",), None
    subcommands = getattr(agnhost, "SUBCOMMANDS", None)
    try:
        if subcommands is not None and args[0] not in subcommands:
            known = sorted(str(s) for s in subcommands)
            close = difflib.get_close_matches(args[0], known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; supported: {', '.join(known)}"
            return ("args", 0), f"agnhost has no subcommand {_short(repr(args[0]), 40)}{hint}"
        problem = agnhost.validate_args(list(args))
    except Exception:
        return ("args",), None
    return ("args",), (_short(problem, 200) if isinstance(problem, str) and problem else None)


# ---------------------------------------------------------------------------- the kinds


def _read_namespace(obj: Any, loc: Loc, issues: _Issues) -> _Parsed | None:
    model = _validate(_NamespaceIn, obj, loc, issues)
    if model is None:
        return None
    ok = _check_meta(model.metadata, loc + ("metadata",), issues)
    if model.metadata.namespace is not None:
        issues.add(loc + ("metadata", "namespace"), "a Namespace is not inside a namespace: remove metadata.namespace")
        ok = False
    if not ok:
        return None
    return _Parsed(model.api_version, model.kind, loc, _manifest(model), model.metadata.name, None,
                   dict(model.metadata.labels or {}))


def _read_pod(obj: Any, loc: Loc, issues: _Issues) -> _Parsed | None:
    model = _validate(_PodIn, obj, loc, issues)
    if model is None:
        return None
    labels = dict(model.metadata.labels or {})
    ok = _check_meta(model.metadata, loc + ("metadata",), issues)
    template = _check_pod_spec(model.spec, loc + ("spec",), labels, issues)
    if not ok or template is None:
        return None
    manifest = _manifest(model)
    manifest["metadata"].setdefault("namespace", "default")
    _fill_pod_spec_defaults(manifest["spec"])
    return _Parsed(model.api_version, model.kind, loc, manifest, model.metadata.name,
                   model.metadata.namespace or "default", labels, template=template)


def _read_deployment(obj: Any, loc: Loc, issues: _Issues) -> _Parsed | None:
    model = _validate(_DeploymentIn, obj, loc, issues)
    if model is None:
        return None
    spec, sloc = model.spec, loc + ("spec",)
    ok = _check_meta(model.metadata, loc + ("metadata",), issues, DEPLOYMENT_NAME_MAX)
    replicas = spec.replicas if spec.replicas is not None else 1
    if replicas < 0:
        issues.add(sloc + ("replicas",), f"replicas {_show(replicas)} must be 0 or more")
        ok = False
    template_labels = dict(spec.template.metadata.labels or {})
    ok = _check_labels(template_labels, sloc + ("template", "metadata", "labels"), issues) and ok
    ok = _check_selector(spec.selector.match_labels, template_labels, sloc, issues) and ok
    template = _check_pod_spec(spec.template.spec, sloc + ("template", "spec"), template_labels, issues)
    if not ok or template is None:
        return None
    manifest = _manifest(model)
    manifest["metadata"].setdefault("namespace", "default")
    manifest["spec"]["replicas"] = replicas
    _fill_pod_spec_defaults(manifest["spec"]["template"]["spec"])
    return _Parsed(model.api_version, model.kind, loc, manifest, model.metadata.name,
                   model.metadata.namespace or "default", dict(model.metadata.labels or {}),
                   template=template, replicas=replicas)


def _check_selector(match_labels: dict[str, str], template_labels: dict[str, str], loc: Loc,
                    issues: _Issues) -> bool:
    """A Deployment owns the pods its selector matches, so the selector must match its own template."""
    sel = loc + ("selector", "matchLabels")
    if not match_labels:
        issues.add(sel, "matchLabels is empty: a Deployment selects its pods by labels, e.g. matchLabels: {app: web}")
        return False
    if not _check_labels(match_labels, sel, issues):
        return False
    shown = ", ".join(f"{k}={v}" for k, v in template_labels.items()) or "none"
    for key, value in match_labels.items():
        if template_labels.get(key) != value:
            wanted = value or '""'
            issues.add(sel + (key,), f"selector {key}={value} does not match the pod template's labels ({shown}): "
                                     f"set spec.template.metadata.labels.{key}: {wanted}, or change the selector")
            return False
    return True


def _fill_pod_spec_defaults(spec: dict[str, Any]) -> None:
    for container in spec.get("containers", []):
        for port in container.get("ports", []):
            port.setdefault("protocol", "TCP")


# ---------------------------------------------------------------------------- services


SERVICE_TYPES = ("ClusterIP", "NodePort")
# Types Kubernetes has and a lab cannot build: named so a learner hears why and what to use instead.
UNSUPPORTED_SERVICE_TYPES = {
    "LoadBalancer": "type LoadBalancer is not supported: a lab has no cloud to provision a load balancer; use type "
                    "NodePort (a LoadBalancer service is a NodePort service with a load balancer in front of the "
                    "nodes) and reach it at a node's IP",
    "ExternalName": "type ExternalName is not supported: it is only a DNS alias (CNAME) that kube-proxy never "
                    "programs; use type ClusterIP",
}
HEADLESS = "None"  # clusterIP: None (the string) makes a headless service: DNS names, no virtual IP
SESSION_AFFINITIES = ("None", "ClientIP")
TRAFFIC_POLICIES = ("Cluster", "Local")
AFFINITY_TIMEOUT_DEFAULT = 10800  # Kubernetes' default for ClientIP affinity: three hours
AFFINITY_TIMEOUT_MAX = 86400  # Kubernetes' limit: a day
DUAL_STACK_POLICIES = ("PreferDualStack", "RequireDualStack")
# ClusterIP allocation (see `_cluster_ips`): offsets from the serviceCIDR's network address.
KUBERNETES_SERVICE_OFFSET = 1  # 10.96.0.1: the `kubernetes` service, the API server's cluster IP
DNS_SERVICE_OFFSET = 10  # 10.96.0.10: the cluster DNS (kube-dns), by convention
CLUSTER_IP_OFFSET = 100  # the first allocated cluster IP: 10.96.0.100, the explainer's example
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _service_name_problem(value: object) -> str | None:
    """Kubernetes requires Service names to be DNS-1035 labels: a DNS-1123 label that starts with a letter
    (a Service name becomes a DNS name and the prefix of its environment variables in pods)."""
    problem = names.dns_label_problem(value)
    if problem is None and _DNS1035_LABEL.match(value):  # type: ignore[arg-type]
        return None
    if problem is None:
        return (f"{value!r} starts with a digit, but Kubernetes requires a Service name to start with a letter "
                f"(a DNS-1035 label): rename it, e.g. svc-{value}")
    if isinstance(value, str) and 0 < len(value) <= names.DNS1123_LABEL_MAX:
        return (f"{_short(repr(value), 60)} is not a valid Service name: use lower-case letters, digits and '-', "
                "starting with a letter and ending with a letter or digit")
    return problem


def _read_service(obj: Any, loc: Loc, issues: _Issues) -> _Parsed | None:
    """A v1 Service's own rules; what depends on the lab (serviceCIDR, other services) is `_services`'s."""
    model = _validate(_ServiceIn, obj, loc, issues)
    if model is None:
        return None
    before = len(issues)
    meta, spec, sloc = model.metadata, model.spec, loc + ("spec",)
    _check_meta(meta, loc + ("metadata",), issues, service=True)
    service_type = _service_type(spec.type, sloc + ("type",), issues)
    headless, cluster_ip = _given_cluster_ip(spec.cluster_ip, service_type, sloc + ("clusterIP",), issues)
    ports = _service_ports(spec.ports or [], service_type, headless, sloc + ("ports",), issues)
    selector = dict(spec.selector or {})
    _check_labels(selector, sloc + ("selector",), issues)
    affinity, timeout = _session_affinity(spec, sloc, issues)
    policy = _external_traffic_policy(spec.external_traffic_policy, service_type, sloc, issues)
    _check_defaults_only(spec, sloc, issues)
    if len(issues) > before or service_type is None or affinity is None or policy is None:
        return None
    namespace = meta.namespace or "default"
    manifest = _manifest(model)
    manifest["metadata"].setdefault("namespace", "default")
    _fill_service_defaults(manifest["spec"], service_type, affinity, timeout)
    service = Service(name=meta.name, namespace=namespace, cluster_ip=cluster_ip, ports=ports,
                      selector=tuple(selector.items()), type=service_type, session_affinity=affinity,
                      affinity_timeout=timeout, external_traffic_policy=policy)
    return _Parsed(model.api_version, model.kind, loc, manifest, meta.name, namespace, dict(meta.labels or {}),
                   service=_ServiceDraft(service, headless))


def _service_type(given: str | None, loc: Loc, issues: _Issues) -> str | None:
    service_type = given if given is not None else SERVICE_TYPES[0]
    if service_type in SERVICE_TYPES:
        return service_type
    if service_type in UNSUPPORTED_SERVICE_TYPES:
        issues.add(loc, UNSUPPORTED_SERVICE_TYPES[service_type])
        return None
    close = _close_match(service_type, SERVICE_TYPES + tuple(UNSUPPORTED_SERVICE_TYPES))
    hint = f" (did you mean {close}?)" if close else ""
    issues.add(loc, f"unknown type {_short(repr(service_type), 40)}{hint}; supported: {', '.join(SERVICE_TYPES)}")
    return None


def _given_cluster_ip(text: str | None, service_type: str | None, loc: Loc,
                      issues: _Issues) -> tuple[bool, IPv4Address | None]:
    """(headless, the address given). Absent or "" (as in Kubernetes): one is allocated."""
    if text is None or text == "":
        return False, None
    if text == HEADLESS:
        if service_type == "NodePort":
            issues.add(loc, "clusterIP None makes a headless service, which has no cluster IP for node ports to "
                            "forward to, so Kubernetes refuses it for type NodePort: remove clusterIP: None, or use "
                            "type: ClusterIP")
        return True, None
    if text.lower() == HEADLESS.lower():
        issues.add(loc, f"{_short(repr(text), 40)} is not an address: write None, with a capital N, for a headless "
                        "service (Kubernetes matches it exactly)")
        return False, None
    return False, _address(text, loc, issues, "cluster.serviceCIDR", "10.96.0.50")


def _service_ports(ports_in: list[_ServicePortIn], service_type: str | None, headless: bool, loc: Loc,
                   issues: _Issues) -> tuple[ServicePort, ...]:
    if not ports_in and not headless:
        issues.add(loc, "no ports: a service needs at least one, e.g. ports: [{port: 80, targetPort: 8080}] (only a "
                        "headless service, clusterIP: None, may have none)")
    named: dict[str, int] = {}
    served: dict[tuple[int, str], int] = {}
    node_ports: dict[tuple[int, str], int] = {}
    ports = []
    for index, port_in in enumerate(ports_in):
        ploc = loc + (index,)
        name = port_in.name or ""
        protocol = port_in.protocol if port_in.protocol is not None else "TCP"
        if name:
            problem = names.dns_label_problem(name)
            if problem:
                issues.add(ploc + ("name",), problem)
            elif name in named:
                issues.add(ploc + ("name",), f"port name {name} is already used by ports[{named[name]}]: give each "
                                             "port of a service its own name")
            named.setdefault(name, index)
        elif len(ports_in) > 1:
            issues.add(ploc + ("name",), "missing; a service with more than one port needs a name for each (its "
                                         "endpoints and kube-proxy's rules tell the ports apart by name): add one, "
                                         f"e.g. name: {_port_example(port_in.port)}")
        problem = _protocol_problem(protocol)
        if problem:
            issues.add(ploc + ("protocol",), problem)
        if not 1 <= port_in.port <= 65535:
            issues.add(ploc + ("port",), f"{_show(port_in.port)} is not a port number: use 1..65535")
        elif (port_in.port, protocol) in served:
            issues.add(ploc + ("port",), f"port {port_in.port}/{protocol} is already served by ports"
                                         f"[{served[(port_in.port, protocol)]}]: a service serves each port and "
                                         "protocol once; remove one, or change its port")
        served.setdefault((port_in.port, protocol), index)
        target = _target_port(port_in.target_port, port_in.port, ploc + ("targetPort",), issues)
        node_port = port_in.node_port
        if node_port is not None and service_type is not None:
            _check_node_port(node_port, protocol, service_type, node_ports, ploc + ("nodePort",), issues)
            node_ports.setdefault((node_port, protocol), index)
        ports.append(ServicePort(name=name, port=port_in.port, target_port=target if target is not None else 0,
                                 protocol=protocol, node_port=node_port))
    return tuple(ports)


def _port_example(port: int) -> str:
    return {53: "dns", 80: "http", 443: "https"}.get(port, f"port-{port}" if 1 <= port <= 65535 else "http")


def _target_port(value: Any, port: int, loc: Loc, issues: _Issues) -> int | str | None:
    """targetPort: a number, or the name of a container port (looked up in each endpoint pod); the service's
    port when left out."""
    if value is None:
        return port
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        issues.add(loc, _wrong_type("a port number or the name of a container port", value,
                                    issues.source.raw.get(loc)))
        return None
    if isinstance(value, int):
        if 1 <= value <= 65535:
            return value
        issues.add(loc, f"{_show(value)} is not a port number: use 1..65535, or the name of a container port")
        return None
    if _looks_numeric(value):
        issues.add(loc, f"{_short(repr(value), 30)} is a string, so it would name a container port, and port names "
                        f"need a letter: remove the quotes for port number {value.strip()}")
        return None
    problem = _port_name_problem(value)
    if problem:
        issues.add(loc, problem + " (targetPort names a port of the pods' containers)")
        return None
    return value


def _check_node_port(node_port: int, protocol: str, service_type: str, seen: dict[tuple[int, str], int], loc: Loc,
                     issues: _Issues) -> None:
    low, high = NODE_PORT_RANGE
    if service_type != "NodePort":
        issues.add(loc, f"nodePort is only used by type NodePort, and this service is type {service_type}: remove "
                        "nodePort, or set type: NodePort")
    elif not low <= node_port <= high:
        issues.add(loc, f"nodePort {_show(node_port)} is outside the node port range {low}-{high} (kube-apiserver's "
                        f"--service-node-port-range): pick one in it, or leave nodePort out to have one allocated")
    elif (node_port, protocol) in seen:
        issues.add(loc, f"nodePort {node_port}/{protocol} is already used by ports[{seen[(node_port, protocol)]}]: "
                        "give each port its own, or leave nodePort out to have one allocated")


def _session_affinity(spec: _ServiceSpecIn, loc: Loc, issues: _Issues) -> tuple[str | None, int]:
    affinity = spec.session_affinity if spec.session_affinity is not None else SESSION_AFFINITIES[0]
    timeout = AFFINITY_TIMEOUT_DEFAULT
    if affinity not in SESSION_AFFINITIES:
        close = _close_match(affinity, SESSION_AFFINITIES)
        hint = f" (did you mean {close}?)" if close else ""
        issues.add(loc + ("sessionAffinity",), f"sessionAffinity must be None or ClientIP, got "
                                               f"{_short(repr(affinity), 40)}{hint}")
        return None, timeout
    config = spec.session_affinity_config
    if config is None:
        return affinity, timeout
    if affinity != "ClientIP":
        note = "" if spec.session_affinity is not None else " (the default)"
        issues.add(loc + ("sessionAffinityConfig",),
                   f"sessionAffinityConfig only applies to sessionAffinity ClientIP, but sessionAffinity is "
                   f"{affinity}{note}: set sessionAffinity: ClientIP, or remove sessionAffinityConfig")
        return None, timeout
    given = config.client_ip.timeout_seconds if config.client_ip is not None else None
    if given is not None and not 1 <= given <= AFFINITY_TIMEOUT_MAX:
        issues.add(loc + ("sessionAffinityConfig", "clientIP", "timeoutSeconds"),
                   f"timeoutSeconds {_show(given)} is out of range: use 1..{AFFINITY_TIMEOUT_MAX} (a day); "
                   f"Kubernetes' default is {AFFINITY_TIMEOUT_DEFAULT} (three hours)")
        return None, timeout
    return affinity, given if given is not None else timeout


def _external_traffic_policy(given: str | None, service_type: str | None, loc: Loc, issues: _Issues) -> str | None:
    loc = loc + ("externalTrafficPolicy",)
    if given is None:
        return TRAFFIC_POLICIES[0]
    if given not in TRAFFIC_POLICIES:
        close = _close_match(given, TRAFFIC_POLICIES)
        hint = f" (did you mean {close}?)" if close else ""
        issues.add(loc, f"externalTrafficPolicy must be Cluster or Local, got {_short(repr(given), 40)}{hint}")
        return None
    if service_type == "ClusterIP":
        issues.add(loc, "externalTrafficPolicy is about traffic from outside the cluster, and Kubernetes allows it "
                        "only for services reachable from outside (here: type NodePort); this service is type "
                        "ClusterIP: remove externalTrafficPolicy, or set type: NodePort")
        return None
    return given


def _check_defaults_only(spec: _ServiceSpecIn, loc: Loc, issues: _Issues) -> None:
    """Fields a lab does not vary: accepted (manifests copied from a cluster carry them) with Kubernetes'
    defaults for an IPv4 single-stack cluster only, so a value that would change the behaviour is not ignored."""
    if spec.ip_families is not None and spec.ip_families != ["IPv4"]:
        issues.add(loc + ("ipFamilies",), f"ipFamilies {_short(json.dumps(spec.ip_families), 40)} is not supported: "
                                          "kubenet-lab labs are IPv4 only; remove ipFamilies, or write [IPv4]")
    policy = spec.ip_family_policy
    if policy is not None and policy != "SingleStack":
        why = "asks for dual-stack, but" if policy in DUAL_STACK_POLICIES else "is not a policy here:"
        issues.add(loc + ("ipFamilyPolicy",), f"ipFamilyPolicy {_short(repr(policy), 40)} {why} kubenet-lab labs are "
                                              "IPv4 only; remove ipFamilyPolicy, or write SingleStack")
    internal = spec.internal_traffic_policy
    if internal == "Local":
        issues.add(loc + ("internalTrafficPolicy",), "internalTrafficPolicy Local is not supported by kubenet-lab: "
                                                     "remove it (the default, Cluster, sends traffic to ready "
                                                     "endpoints on every node)")
    elif internal is not None and internal != "Cluster":
        close = _close_match(internal, TRAFFIC_POLICIES)
        hint = f" (did you mean {close}?)" if close else ""
        issues.add(loc + ("internalTrafficPolicy",), f"internalTrafficPolicy must be Cluster, got "
                                                     f"{_short(repr(internal), 40)}{hint}: remove it, or write Cluster")


def _fill_service_defaults(spec: dict[str, Any], service_type: str, affinity: str, timeout: int) -> None:
    """Kubernetes' defaults, as kube-apiserver stores them; the allocated clusterIP and nodePorts come later."""
    spec["type"] = service_type
    spec["sessionAffinity"] = affinity
    for port in spec.get("ports", []):
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port["port"])
    if service_type == "NodePort":
        spec.setdefault("externalTrafficPolicy", TRAFFIC_POLICIES[0])
    if affinity == "ClientIP":
        config = spec.setdefault("sessionAffinityConfig", {})
        config.setdefault("clientIP", {})["timeoutSeconds"] = timeout


# ---------------------------------------------------------------------------- ingresses


PATH_TYPES = ("Prefix", "Exact", "ImplementationSpecific")
# Kubernetes refuses these in Prefix and Exact paths (they would let a path escape its prefix once normalized).
_BAD_PATH_PARTS = ("//", "/./", "/../", "%2f", "%2F")
_BAD_PATH_ENDINGS = ("/..", "/.")
# The characters ingress-nginx's strict path check allows: what a controller can match without escaping.
_INGRESS_PATH = re.compile(r"^/[A-Za-z0-9._~/-]*$")
_INGRESS_PATH_MAX = 1024


def _read_ingress(obj: Any, loc: Loc, issues: _Issues) -> _Parsed | None:
    """A networking.k8s.io/v1 Ingress's own rules; whether its backends exist is `_ingresses`'s check."""
    model = _validate(_IngressIn, obj, loc, issues)
    if model is None:
        return None
    before = len(issues)
    meta, spec, sloc = model.metadata, model.spec, loc + ("spec",)
    _check_meta(meta, loc + ("metadata",), issues)
    if spec.ingress_class_name is not None:
        problem = _dns_name_problem(spec.ingress_class_name, "ingressClassName", "nginx")
        if problem:
            issues.add(sloc + ("ingressClassName",), problem)
    if spec.tls is not None and spec.tls != []:
        issues.add(sloc + ("tls",), "tls is not supported by kubenet-lab: its ingress controller serves plain HTTP on "
                                    "its node port and terminates no TLS; remove tls and reach the hosts with http://")
    backends: list[tuple[Loc, IngressBackend]] = []
    routes: list[tuple[Loc, str | None, str, str]] = []
    default = None
    if spec.default_backend is not None:
        default = _ingress_backend(spec.default_backend, sloc + ("defaultBackend",), backends, issues)
    rules = [_ingress_rule(rule, sloc + ("rules", index), backends, routes, issues)
             for index, rule in enumerate(spec.rules or [])]
    if not spec.rules and spec.default_backend is None:
        # Kubernetes' rule: an Ingress routes nothing without one of the two.
        issues.add(sloc, "an Ingress needs rules or a defaultBackend (Kubernetes refuses one with neither): add "
                         "rules: [{host: web.example.com, http: {paths: [{path: /, pathType: Prefix, backend: "
                         "{service: {name: web, port: {number: 80}}}}]}}], or defaultBackend: {service: {name: web, "
                         "port: {number: 80}}}")
    if len(issues) > before:
        return None
    namespace = meta.namespace or "default"
    manifest = _manifest(model)
    manifest["metadata"].setdefault("namespace", "default")
    ingress = Ingress(name=meta.name, namespace=namespace, rules=tuple(r for r in rules if r is not None),
                      default_backend=default, class_name=spec.ingress_class_name)
    return _Parsed(model.api_version, model.kind, loc, manifest, meta.name, namespace, dict(meta.labels or {}),
                   ingress=_IngressDraft(ingress, tuple(backends), tuple(routes)))


def _ingress_rule(rule: _IngressRuleIn, loc: Loc, backends: list[tuple[Loc, IngressBackend]],
                  routes: list[tuple[Loc, str | None, str, str]], issues: _Issues) -> IngressRule | None:
    host = rule.host or None  # "" is no host, as in Kubernetes: the rule matches every host
    if host is not None:
        problem = _dns_name_problem(host, "host", "web.example.com", wildcard=True)
        if problem:
            issues.add(loc + ("host",), problem)
    if rule.http is None:
        # Kubernetes accepts a rule without http, but it routes nothing: most likely http was forgotten.
        issues.add(loc + ("http",), "missing; a rule routes the HTTP paths of its host: add http: {paths: [{path: /, "
                                    "pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}]}")
        return None
    if not rule.http.paths:
        issues.add(loc + ("http", "paths"), "no paths: a rule needs at least one (Kubernetes requires it), e.g. paths: "
                                            "[{path: /, pathType: Prefix, backend: {service: {name: web, port: "
                                            "{number: 80}}}}]")
    paths = []
    for index, path_in in enumerate(rule.http.paths):
        ploc = loc + ("http", "paths", index)
        path_type = _path_type(path_in.path_type, ploc + ("pathType",), issues)
        path = _ingress_path(path_in.path, path_type, ploc + ("path",), issues)
        backend = _ingress_backend(path_in.backend, ploc + ("backend",), backends, issues)
        if path_type is None or path is None or backend is None:
            continue
        routes.append((ploc, host, path, path_type))
        paths.append(IngressPath(path=path, path_type=path_type, backend=backend))
    return IngressRule(host=host, paths=tuple(paths))


def _path_type(value: str, loc: Loc, issues: _Issues) -> str | None:
    """pathType is required in networking.k8s.io/v1 (v1beta1 defaulted it)."""
    if value in PATH_TYPES:
        return value
    close = _close_match(value, PATH_TYPES)
    hint = f" (did you mean {close}?)" if close else ""
    issues.add(loc, f"pathType must be one of {', '.join(PATH_TYPES)}, got {_short(repr(value), 40)}{hint}")
    return None


def _ingress_path(path: str | None, path_type: str | None, loc: Loc, issues: _Issues) -> str | None:
    """An HTTP path: absolute (Kubernetes requires it of Prefix and Exact paths, and of any path given), free of
    the sequences Kubernetes refuses, and of characters a controller would have to escape."""
    if path is None or path == "":
        if path_type == "ImplementationSpecific":
            return "/"  # Kubernetes allows it empty; ingress-nginx reads it as /
        issues.add(loc, f"missing; pathType {path_type or 'Prefix'} needs a path starting with '/', e.g. path: /")
        return None
    shown = _short(repr(path), 60)
    if not path.startswith("/"):
        issues.add(loc, f"path {shown} must start with '/' (an absolute URL path): write /{_short(path, 58)}")
        return None
    if len(path) > _INGRESS_PATH_MAX:
        issues.add(loc, f"path {shown} is {len(path)} characters; at most {_INGRESS_PATH_MAX} are allowed here")
        return None
    bad = next((part for part in _BAD_PATH_PARTS if part in path), None)
    if bad is None:
        bad = next((end for end in _BAD_PATH_ENDINGS if path.endswith(end)), None)
    if bad is not None:
        issues.add(loc, f"path {shown} contains {bad!r}, which Kubernetes refuses in an Ingress path: write the path "
                        "without empty, '.' or '..' segments")
        return None
    if not _INGRESS_PATH.match(path):
        issues.add(loc, f"path {shown} may only hold letters, digits and '/', '-', '_', '.', '~' (the characters "
                        "ingress-nginx's strict path check allows): remove the others")
        return None
    return path


def _ingress_backend(backend_in: _IngressBackendIn, loc: Loc, backends: list[tuple[Loc, IngressBackend]],
                     issues: _Issues) -> IngressBackend | None:
    """A backend: a Service of the Ingress's namespace and one of its ports, by number or by name."""
    example = "service: {name: web, port: {number: 80}}"
    if backend_in.resource is not None:
        issues.add(loc + ("resource",), f"resource backends are not supported by kubenet-lab (its controller routes "
                                        f"to Services only): remove resource and give {example}")
        return None
    if backend_in.service is None:
        issues.add(loc + ("service",), f"missing; a backend names a Service of the Ingress's namespace, e.g. {example}")
        return None
    service, sloc = backend_in.service, loc + ("service",)
    ok = True
    problem = _service_name_problem(service.name)
    if problem:
        issues.add(sloc + ("name",), problem)
        ok = False
    number, name = service.port.number, service.port.name
    port: int | str | None = None
    if number is not None and name is not None:
        issues.add(sloc + ("port",), "give the service port's number or its name, not both (Kubernetes refuses both): "
                                     f"e.g. port: {{number: {_show(number)}}}")
    elif number is not None:
        if 1 <= number <= 65535:
            port = number
        else:
            issues.add(sloc + ("port", "number"), f"{_show(number)} is not a port number: use 1..65535, the port of "
                                                  "the service (not its targetPort)")
    elif name is not None:
        problem = _port_name_problem(name)
        if problem:
            issues.add(sloc + ("port", "name"), problem + " (it names a port of the service)")
        else:
            port = name
    else:
        issues.add(sloc + ("port",), "missing the port: give the service port's number or name, e.g. port: "
                                     "{number: 80} or port: {name: http}")
    if not ok or port is None:
        return None
    backend = IngressBackend(service=service.name, port=port)
    backends.append((loc, backend))
    return backend


def _ingresses(parsed: list[_Parsed], lab: Lab, namespaces: set[str], issues: _Issues,
               running: bool) -> list[Ingress]:
    """The Ingresses among `parsed`, checked against each other, the lab's Ingresses and the Services they send
    to: those of the lab (lab.services) and those among `parsed`. `running`: `lab` is a running lab that the
    objects are applied to (its services were there before)."""
    objs = [p for p in parsed if p.ingress is not None]
    if not objs:
        return []
    services = {s.key: s for s in lab.services}
    for obj in parsed:
        if obj.service is not None:
            services.setdefault(f"{obj.namespace}/{obj.name}", obj.service.service)
    defined = {i.key: f"ingress {i.key}, already in lab {lab.name}" for i in lab.ingresses}
    routes: dict[tuple[str, str, str], str] = {}
    default_owner: str | None = None
    for ingress in lab.ingresses:
        where = f"ingress {ingress.key}, already in lab {lab.name}"
        for rule in ingress.rules:
            for path in rule.paths:
                routes.setdefault(_route_key(rule.host, path.path, path.path_type), where)
        if ingress.default_backend is not None and default_owner is None:
            default_owner = where
    found = []
    for obj in objs:
        assert obj.ingress is not None and obj.namespace is not None
        key = f"{obj.namespace}/{obj.name}"
        if obj.namespace not in namespaces:
            issues.add(obj.loc + ("metadata", "namespace"),
                       f"namespace {obj.namespace} does not exist: add a v1 Namespace object named {obj.namespace}")
        if key in defined:
            issues.add(obj.loc + ("metadata", "name"), f"ingress {key} clashes with {defined[key]}: rename one")
        defined.setdefault(key, f"the ingress at {_where(obj.loc, issues)}")
        for loc, backend in obj.ingress.backends:
            _check_ingress_backend(backend, obj.namespace, services, loc, issues)
        for loc, host, path, path_type in obj.ingress.routes:
            route = _route_key(host, path, path_type)
            if route in routes:
                owner = f"host {host}" if host else "any host"
                issues.add(loc, f"{path_type} path {path} of {owner} is already routed by {routes[route]}: a host and "
                                "path go to one backend; remove one, or change the path")
            routes.setdefault(route, _where(loc, issues))
        if obj.ingress.ingress.default_backend is not None:
            if default_owner is not None:
                issues.add(obj.loc + ("spec", "defaultBackend"),
                           f"the default backend is already given by {default_owner}: the ingress controller has one "
                           "default backend (for requests no rule matches); remove one of them")
            default_owner = default_owner or f"the ingress at {_where(obj.loc, issues)}"
        found.append(obj.ingress.ingress)
    if running:
        _controller_starts(objs, lab, issues)
    return found


def _route_key(host: str | None, path: str, path_type: str) -> tuple[str, str, str]:
    """Routes that match the same requests: ImplementationSpecific is read as Prefix (as ingress-nginx does),
    and a Prefix path matches with or without its trailing '/' (Kubernetes' prefix matching is by segment)."""
    if path_type == "Exact":
        return host or "", path, "Exact"
    return host or "", path.rstrip("/") or "/", "Prefix"


def _check_ingress_backend(backend: IngressBackend, namespace: str, services: dict[str, Service], loc: Loc,
                           issues: _Issues) -> None:
    """An Ingress sends to a Service of its own namespace (Kubernetes has no cross-namespace backends), on
    one of the Service's ports: by number, its `port` (not the targetPort), or by the port's name."""
    key = f"{namespace}/{backend.service}"
    service = services.get(key)
    if service is None:
        if ("Service", namespace, backend.service) in issues.refused:
            return  # the Service has problems of its own, reported where it is written
        there = sorted(s.name for s in services.values() if s.namespace == namespace)
        listed = f"services there: {', '.join(there)}" if there else "it has no services"
        issues.add(loc + ("service", "name"), f"service {key} does not exist: a backend must be a Service in the "
                                              f"Ingress's namespace {namespace} ({listed}); add the Service, or fix "
                                              "the name")
        return
    ports = ", ".join(f"{p.port}/{p.protocol}" + (f" named {p.name}" if p.name else "") for p in service.ports)
    ports = f"its ports: {ports}" if ports else "it has no ports"
    if isinstance(backend.port, int):
        matching = [p for p in service.ports if p.port == backend.port]
        where, what = loc + ("service", "port", "number"), f"port {backend.port}"
    else:
        matching = [p for p in service.ports if p.name and p.name == backend.port]
        where, what = loc + ("service", "port", "name"), f"port named {backend.port}"
    if not matching:
        fix = "use one of them" if service.ports else "add ports to the Service"
        issues.add(where, f"service {key} has no {what} ({ports}): {fix}; an Ingress backend names the Service's "
                          "port, not its targetPort")
    elif not any(p.protocol == "TCP" for p in matching):
        issues.add(where, f"{what} of service {key} is {matching[0].protocol}, but an Ingress sends HTTP, over TCP "
                          f"({ports}): use a TCP port")


def _controller_starts(objs: list[_Parsed], lab: Lab, issues: _Issues) -> None:
    """Applied to a running lab whose controller is automatic and not running yet, the first Ingress starts it:
    its node port must still be free of the lab's services."""
    controller = lab.ingress_controller
    if controller.enabled is not None or lab.ingresses:
        return
    for service in lab.services:
        if any(p.node_port == controller.node_port for p in service.ports):
            issues.add(objs[0].loc + ("metadata", "name"),
                       f"this lab's first Ingress starts the ingress controller, which listens on node port "
                       f"{controller.node_port} of every node (spec.ingressController.nodePort), but service "
                       f"{service.key} already uses that node port: delete that service (or give it another node "
                       "port) first, or bring the lab up with another ingressController.nodePort")
            return


# ---------------------------------------------------------------------------- network policies


POLICY_TYPES = ("Ingress", "Egress")
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
# Every namespace carries this label with its own name (Kubernetes sets it since 1.21), so a
# namespaceSelector can pick namespaces by name.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
_PEER_EXAMPLE = "{podSelector: {matchLabels: {app: web}}}, {namespaceSelector: {...}} or {ipBlock: {cidr: ...}}"


class _SelectorRequirementIn(_Strict):
    key: str = Field(examples=["key: app"])
    operator: str = Field(examples=["operator: In"])
    values: list[str] | None = None


class _LabelSelectorIn(_Strict):
    """A metav1.LabelSelector: `{}` selects everything."""

    match_labels: dict[str, str] | None = Field(None, alias="matchLabels")
    match_expressions: list[_SelectorRequirementIn] | None = Field(None, alias="matchExpressions")


class _IPBlockIn(_Strict):
    cidr: str = Field(examples=["cidr: 172.17.0.0/16"])
    except_: list[str] | None = Field(None, alias="except")


class _PolicyPeerIn(_Strict):
    pod_selector: _LabelSelectorIn | None = Field(None, alias="podSelector")
    namespace_selector: _LabelSelectorIn | None = Field(None, alias="namespaceSelector")
    ip_block: _IPBlockIn | None = Field(None, alias="ipBlock")


class _PolicyPortIn(_Strict):
    """port is a number or a container port's name (IntOrString), so it is read as Any and checked by
    `_policy_port`."""

    protocol: str | None = None
    port: Any = None
    end_port: int | None = Field(None, alias="endPort")


class _PolicyIngressRuleIn(_Strict):
    from_: list[_PolicyPeerIn] | None = Field(None, alias="from")
    ports: list[_PolicyPortIn] | None = None


class _PolicyEgressRuleIn(_Strict):
    to: list[_PolicyPeerIn] | None = None
    ports: list[_PolicyPortIn] | None = None


class _NetworkPolicySpecIn(_Strict):
    pod_selector: _LabelSelectorIn = Field(alias="podSelector", examples=[
        "podSelector: {} (every pod of the namespace), or podSelector: {matchLabels: {app: web}}"])
    policy_types: list[str] | None = Field(None, alias="policyTypes")
    ingress: list[_PolicyIngressRuleIn] | None = None
    egress: list[_PolicyEgressRuleIn] | None = None


class _NetworkPolicyIn(_Strict):
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: _ObjectMetaIn = Field(examples=["metadata: {name: default-deny}"])
    spec: _NetworkPolicySpecIn = Field(examples=["spec: {podSelector: {}, policyTypes: [Ingress]}"])


def _read_network_policy(obj: Any, loc: Loc, issues: _Issues) -> _Parsed | None:
    """A networking.k8s.io/v1 NetworkPolicy's own rules (Kubernetes' validation); whether its namespace
    exists and its name is free is `_network_policies`'s check. policyTypes is defaulted as the API server
    does: Ingress, plus Egress when egress rules are given."""
    model = _validate(_NetworkPolicyIn, obj, loc, issues)
    if model is None:
        return None
    before = len(issues)
    meta, spec, sloc = model.metadata, model.spec, loc + ("spec",)
    _check_meta(meta, loc + ("metadata",), issues)
    selector = _label_selector(spec.pod_selector, sloc + ("podSelector",), issues)
    types_given = spec.policy_types
    if types_given is None:
        policy_types = ("Ingress", "Egress") if spec.egress else ("Ingress",)
    else:
        policy_types = _policy_types(types_given, sloc + ("policyTypes",), issues)
    ingress = tuple(_policy_rule(rule.from_, rule.ports, sloc + ("ingress", i), "from", issues)
                    for i, rule in enumerate(spec.ingress or []))
    egress = tuple(_policy_rule(rule.to, rule.ports, sloc + ("egress", i), "to", issues)
                   for i, rule in enumerate(spec.egress or []))
    if len(issues) > before or selector is None:
        return None
    namespace = meta.namespace or "default"
    manifest = _manifest(model)
    manifest["metadata"].setdefault("namespace", "default")
    manifest["spec"]["policyTypes"] = list(policy_types)
    policy = NetworkPolicy(name=meta.name, namespace=namespace, pod_selector=selector, policy_types=policy_types,
                           ingress=tuple(r for r in ingress if r is not None),
                           egress=tuple(r for r in egress if r is not None))
    return _Parsed(model.api_version, model.kind, loc, manifest, meta.name, namespace, dict(meta.labels or {}),
                   policy=policy)


def _policy_types(given: list[str], loc: Loc, issues: _Issues) -> tuple[str, ...]:
    found: list[str] = []
    if not given:
        issues.add(loc, "policyTypes is empty: give Ingress, Egress or both, or leave policyTypes out (then it is "
                        "Ingress, plus Egress when egress rules are given)")
    for index, value in enumerate(given):
        if value not in POLICY_TYPES:
            close = _close_match(value, POLICY_TYPES)
            hint = f" (did you mean {close}?)" if close else ""
            issues.add(loc + (index,), f"policy type must be Ingress or Egress, got {_short(repr(value), 40)}{hint}")
        elif value in found:
            issues.add(loc + (index,), f"{value} is given twice: keep one")
        else:
            found.append(value)
    return tuple(t for t in POLICY_TYPES if t in found)  # Kubernetes' order, whatever the manifest's


def _label_selector(selector: _LabelSelectorIn, loc: Loc, issues: _Issues) -> LabelSelector | None:
    before = len(issues)
    labels = dict(selector.match_labels or {})
    _check_labels(labels, loc + ("matchLabels",), issues)
    expressions = []
    for index, expr in enumerate(selector.match_expressions or []):
        eloc = loc + ("matchExpressions", index)
        problem = _label_key_problem(expr.key)
        if problem:
            issues.add(eloc + ("key",), problem)
        values = list(expr.values or [])
        if expr.operator not in SELECTOR_OPERATORS:
            close = _close_match(expr.operator, SELECTOR_OPERATORS)
            hint = f" (did you mean {close}?)" if close else ""
            issues.add(eloc + ("operator",), f"operator must be one of {', '.join(SELECTOR_OPERATORS)}, got "
                                             f"{_short(repr(expr.operator), 40)}{hint}")
        elif expr.operator in ("In", "NotIn") and not values:
            issues.add(eloc + ("values",), f"operator {expr.operator} needs values: a non-empty list, e.g. "
                                           "values: [web, api]")
        elif expr.operator in ("Exists", "DoesNotExist") and values:
            issues.add(eloc + ("values",), f"operator {expr.operator} takes no values: remove them")
        for vindex, value in enumerate(values):
            problem = _label_value_problem(value)
            if problem:
                issues.add(eloc + ("values", vindex), problem)
        expressions.append(SelectorRequirement(expr.key, expr.operator, tuple(values)))
    if len(issues) > before:
        return None
    return LabelSelector(tuple(sorted(labels.items())), tuple(expressions))


def _policy_rule(peers_in: list[_PolicyPeerIn] | None, ports_in: list[_PolicyPortIn] | None, loc: Loc,
                 direction: str, issues: _Issues) -> PolicyRule | None:
    before = len(issues)
    peers = [_policy_peer(peer, loc + (direction, i), issues) for i, peer in enumerate(peers_in or [])]
    ports = [_policy_port(port, loc + ("ports", i), issues) for i, port in enumerate(ports_in or [])]
    if len(issues) > before:
        return None
    return PolicyRule(tuple(p for p in peers if p is not None), tuple(p for p in ports if p is not None))


def _policy_peer(peer: _PolicyPeerIn, loc: Loc, issues: _Issues) -> PolicyPeer | None:
    """Kubernetes' rules: at least one of the three, and ipBlock alone."""
    given = [k for k, v in (("podSelector", peer.pod_selector), ("namespaceSelector", peer.namespace_selector),
                            ("ipBlock", peer.ip_block)) if v is not None]
    if not given:
        issues.add(loc, f"an empty peer selects nothing Kubernetes accepts: give {_PEER_EXAMPLE} (to allow every "
                        "source or destination, leave the whole from/to list out)")
        return None
    if peer.ip_block is not None and len(given) > 1:
        issues.add(loc + ("ipBlock",), "ipBlock cannot be combined with podSelector or namespaceSelector in one peer: "
                                       "make them separate entries of the list (alternatives)")
        return None
    if peer.ip_block is not None:
        block = _ip_block(peer.ip_block, loc + ("ipBlock",), issues)
        return PolicyPeer(ip_block=block) if block is not None else None
    pods = _label_selector(peer.pod_selector, loc + ("podSelector",), issues) if peer.pod_selector else None
    spaces = (_label_selector(peer.namespace_selector, loc + ("namespaceSelector",), issues)
              if peer.namespace_selector else None)
    if (peer.pod_selector is not None and pods is None) or (peer.namespace_selector is not None and spaces is None):
        return None
    return PolicyPeer(pod_selector=pods, namespace_selector=spaces)


def _ip_block(block_in: _IPBlockIn, loc: Loc, issues: _Issues) -> IPBlock | None:
    cidr = _network(block_in.cidr, loc + ("cidr",), "172.17.0.0/16", issues, reserved=False)
    excepts = []
    ok = cidr is not None
    for index, text in enumerate(block_in.except_ or []):
        net = _network(text, loc + ("except", index), "172.17.1.0/24", issues, reserved=False)
        if net is None:
            ok = False
        elif cidr is not None and not (net.subnet_of(cidr) and net != cidr):
            # Kubernetes: "except values ... must be a strict subset of cidr"
            issues.add(loc + ("except", index), f"{net} is not inside cidr {cidr}: except lists parts of the block "
                                                "to leave out, each strictly inside it")
            ok = False
        else:
            excepts.append(net)
    return IPBlock(cidr, tuple(excepts)) if ok and cidr is not None else None


def _policy_port(port_in: _PolicyPortIn, loc: Loc, issues: _Issues) -> PolicyPort | None:
    protocol = port_in.protocol if port_in.protocol is not None else "TCP"
    ok = True
    problem = _protocol_problem(protocol)
    if problem:
        issues.add(loc + ("protocol",), problem)
        ok = False
    port = port_in.port
    if isinstance(port, bool) or (port is not None and not isinstance(port, (int, str))):
        issues.add(loc + ("port",), _wrong_type("a port number or a container port's name", port,
                                                issues.source.raw.get(loc + ("port",))))
        return None
    if isinstance(port, int) and not 1 <= port <= 65535:
        issues.add(loc + ("port",), f"port {_show(port)} is out of range 1..65535")
        ok = False
    if isinstance(port, str):
        if _looks_numeric(port):
            issues.add(loc + ("port",), f"port {port!r} is a number written as a string: remove the quotes")
            ok = False
        else:
            problem = _port_name_problem(port)
            if problem:
                issues.add(loc + ("port",), problem + " (a name is looked up among the pods' container ports)")
                ok = False
    end = port_in.end_port
    if end is not None:
        if not isinstance(port, int):
            issues.add(loc + ("endPort",), "endPort needs a numeric port where the range starts (Kubernetes does not "
                                           "take a named port with endPort)")
            ok = False
        elif not port <= end <= 65535:
            issues.add(loc + ("endPort",), f"endPort {_show(end)} must be between port {port} and 65535")
            ok = False
    return PolicyPort(protocol, port, end) if ok else None


def _network_policies(parsed: list[_Parsed], lab: Lab, namespaces: set[str], issues: _Issues) -> list[NetworkPolicy]:
    """The NetworkPolicies among `parsed`, checked against the lab: their namespace exists, their name is free
    (drop a policy being replaced from the lab first)."""
    defined = {p.key: f"networkpolicy {p.key}, already in lab {lab.name}" for p in lab.network_policies}
    found = []
    for obj in parsed:
        if obj.policy is None:
            continue
        key = obj.policy.key
        if obj.namespace not in namespaces:
            issues.add(obj.loc + ("metadata", "namespace"),
                       f"namespace {obj.namespace} does not exist: add a v1 Namespace object named {obj.namespace}")
        if key in defined:
            issues.add(obj.loc + ("metadata", "name"), f"networkpolicy {key} clashes with {defined[key]}: rename one")
        defined.setdefault(key, f"the networkpolicy at {_where(obj.loc, issues)}")
        found.append(obj.policy)
    return found


def _check_cni(cni_in: _CniIn | None, issues: _Issues) -> Cni | None:
    """spec.cni.profile, or None when not given (the profile then follows the backend, `_profile_of`)."""
    if cni_in is None or cni_in.profile is None:
        return None
    profile = cni_in.profile
    if profile in CNI_PROFILES:
        return Cni(profile=profile, given=True)
    loc = ("spec", "cni", "profile")
    available = ", ".join(CNI_PROFILES)
    if profile.lower() in PLANNED_CNI_PROFILES:
        issues.add(loc, f"profile {profile.lower()} ({PLANNED_CNI_PROFILES[profile.lower()]}) is not available yet; "
                        f"available: {available}")
        return None
    close = _close_match(profile, tuple(CNI_PROFILES) + tuple(PLANNED_CNI_PROFILES))
    hint = f" (did you mean {close}?)" if close else ""
    issues.add(loc, f"unknown CNI profile {_short(repr(profile), 40)}{hint}; available: {available} (flannel: "
                    "VXLAN, no NetworkPolicy; calico: BGP, NetworkPolicy enforced)")
    return None


# A lab without spec.cni plays the CNI its backend comes from: Calico's BGP, Flannel's host-gw and vxlan.
_PROFILE_OF_BACKEND = {"bgp": "calico"}


def _profile_of(backend: str) -> Cni:
    return Cni(profile=_PROFILE_OF_BACKEND.get(backend, "flannel"), given=False)


def network_policies_from_objects(objects: list[dict], lab: Lab, file: str | None) -> list[NetworkPolicy]:
    """The NetworkPolicies that `objects` add to `lab`, for `lab apply` (spec loading fills
    Lab.network_policies itself). Their names may not clash with `lab.network_policies` (drop a policy being
    replaced from the lab first). Issues name the objects as `objects[i]`, since manifests carry no lines."""
    try:
        issues = _Issues(_Source())
        parsed = _read_objects([(("objects", i), obj) for i, obj in enumerate(objects)], issues)
        found = _network_policies(parsed, lab, set(_namespaces(parsed, lab.namespaces, issues)), issues)
        issues.raise_if_any(file)
        return found
    except SpecError:
        raise
    except Exception as exc:
        raise _internal(file, exc) from exc


# ---------------------------------------------------------------------------- names of the addons


# The cluster DNS addon's objects in kube-system: the kube-dns Service and the coredns Deployment and pods.
DNS_ADDON_NAMESPACE = "kube-system"
DNS_ADDON_NAMES = ("kube-dns", "coredns")


def _check_reserved_names(parsed: list[_Parsed], lab: Lab, issues: _Issues,
                          wanted: Callable[[_Parsed], bool] = lambda obj: True) -> None:
    """While the lab runs the cluster DNS, its objects' names are taken: a user object of any kind named like
    them in kube-system would clash with the addon's (or be mistaken for it)."""
    if not lab.dns.enabled:
        return
    for obj in parsed:
        if obj.namespace == DNS_ADDON_NAMESPACE and obj.name in DNS_ADDON_NAMES and wanted(obj):
            issues.add(obj.loc + ("metadata", "name"),
                       f"{obj.kind} {DNS_ADDON_NAMESPACE}/{obj.name}: the names {' and '.join(DNS_ADDON_NAMES)} in "
                       f"namespace {DNS_ADDON_NAMESPACE} belong to the cluster DNS addon this lab runs (spec.dns): "
                       "rename the object or put it in another namespace, or set dns.enabled: false to run your own")


# Registry of the object kinds a lab understands: (apiVersion, kind) -> reader. A reader validates one
# object and returns it parsed (or None after recording issues), recording each problem in the Issues it is
# given. Later layers add kinds here; Parsed and Issues are the public names of what a reader deals with.
KINDS: dict[tuple[str, str], Reader] = {
    ("v1", "Namespace"): _read_namespace,
    ("v1", "Pod"): _read_pod,
    ("apps/v1", "Deployment"): _read_deployment,
    ("v1", "Service"): _read_service,
    ("networking.k8s.io/v1", "Ingress"): _read_ingress,
    ("networking.k8s.io/v1", "NetworkPolicy"): _read_network_policy,
}
Parsed = _Parsed
Issues = _Issues


# ============================================================================ objects against the lab


def _objects_against_lab(parsed: list[_Parsed], lab: Lab, issues: _Issues, pods: bool = True,
                         services: bool = True,
                         ingresses: bool = True) -> tuple[list[Pod], list[Service], list[Ingress]]:
    """The checks of objects that involve each other and the lab: the pods they make (placed on nodes), the
    services (with what is allocated to them) and the ingresses, each only if asked for."""
    namespaces = _namespaces(parsed, lab.namespaces, issues)
    place = bool(lab.nodes) and not issues

    def wanted(obj: _Parsed) -> bool:
        if pods and services and ingresses:
            return True  # every kind, those added to KINDS later too
        return ((pods and obj.template is not None) or (services and obj.service is not None)
                or (ingresses and obj.ingress is not None))

    _check_reserved_names(parsed, lab, issues, wanted)
    found_services = _services(parsed, lab, lab.cluster.service_cidr, set(namespaces), issues) if services else []
    found_ingresses = _ingresses(parsed, lab, set(namespaces), issues, running=True) if ingresses else []
    found_pods = _expand(parsed, lab, set(namespaces), issues, place=place) if pods else []
    if pods and services and ingresses:  # every kind: NetworkPolicies too
        _network_policies(parsed, lab, set(namespaces), issues)
    return found_pods, found_services, found_ingresses


def _services(parsed: list[_Parsed], lab: Lab, service_cidr: IPv4Network | None, namespaces: set[str],
              issues: _Issues) -> list[Service]:
    """The Services among `parsed`, checked against each other and the lab's services, with their cluster IPs
    and node ports allocated; the allocated values are written into the normalized manifests, as kube-apiserver
    stores them. service_cidr None: the cluster is wrong, so cluster IPs are neither checked nor allocated."""
    objs = [p for p in parsed if p.service is not None]
    if not objs:
        return []
    defined = {s.key: f"service {s.key}, already in lab {lab.name}" for s in lab.services}
    for obj in objs:
        key = f"{obj.namespace}/{obj.name}"
        if obj.namespace not in namespaces:
            issues.add(obj.loc + ("metadata", "namespace"),
                       f"namespace {obj.namespace} does not exist: add a v1 Namespace object named {obj.namespace}")
        if key in defined:
            issues.add(obj.loc + ("metadata", "name"), f"service {key} clashes with {defined[key]}: rename one")
        defined.setdefault(key, f"the service at {_where(obj.loc, issues)}")
    ips = _cluster_ips(objs, lab, service_cidr, issues)
    ports = _node_ports(objs, lab, _controller_port(lab, parsed), issues)
    services = []
    for index, obj in enumerate(objs):
        assert obj.service is not None
        service = replace(obj.service.service, cluster_ip=ips.get(index), ports=ports[index])
        spec = obj.manifest["spec"]
        if obj.service.headless:
            spec["clusterIP"] = HEADLESS
        elif service.cluster_ip is not None:
            spec["clusterIP"] = str(service.cluster_ip)
        if service.type == "NodePort":
            for port, manifest_port in zip(service.ports, spec.get("ports", [])):
                if port.node_port is not None:
                    manifest_port["nodePort"] = port.node_port
        services.append(service)
    return services


def _cluster_ip_problem(ip: IPv4Address, cidr: IPv4Network) -> str | None:
    """Why `ip` cannot be a given clusterIP in serviceCIDR `cidr`, or None. The DNS address (.10) may be given."""
    usable = f"{cidr.network_address + 2}..{cidr.broadcast_address - 1}"
    fix = f"pick one in {usable}, or leave clusterIP out to have one allocated"
    if ip not in cidr:
        return f"{ip} is outside cluster.serviceCIDR {cidr}, where cluster IPs come from: {fix}"
    if ip == cidr.network_address:
        return f"{ip} is the network address of cluster.serviceCIDR {cidr}, not a usable address: {fix}"
    if ip == cidr.broadcast_address:
        return f"{ip} is the broadcast address of cluster.serviceCIDR {cidr}, not a usable address: {fix}"
    if ip == cidr.network_address + KUBERNETES_SERVICE_OFFSET:
        return (f"{ip} is the first address of cluster.serviceCIDR {cidr}, which Kubernetes reserves for the "
                f"`kubernetes` service (the API server's cluster IP): {fix}")
    return None


def _cluster_ip_candidates(cidr: IPv4Network) -> typing.Iterator[IPv4Address]:
    """The addresses a service without clusterIP may get, in the order they are handed out.

    kube-apiserver picks a random free address; a lab picks deterministically, so a spec always gives the
    same addresses: from network + 100 upward (10.96.0.100, .101, ...: the explainer's example ClusterIP
    is 10.96.0.100), then, in a range too small for that, from network + 2. Never the network address,
    .1 (the `kubernetes` service), .10 (the cluster DNS, kube-dns) or the broadcast address.
    """
    network, broadcast = int(cidr.network_address), int(cidr.broadcast_address)
    reserved = {network + KUBERNETES_SERVICE_OFFSET, network + DNS_SERVICE_OFFSET}
    start = min(network + CLUSTER_IP_OFFSET, broadcast)
    for address in itertools.chain(range(start, broadcast), range(network + 2, start)):  # lazily: a /12 is 2^20
        if address not in reserved:
            yield IPv4Address(address)


def _cluster_ips(objs: list[_Parsed], lab: Lab, cidr: IPv4Network | None, issues: _Issues) -> dict[int, IPv4Address]:
    """Each non-headless service's cluster IP (by position in `objs`): the one given, checked, else the lowest
    free candidate. Given addresses are taken first, so a later service's address is never handed out earlier."""
    owners = {s.cluster_ip: f"service {s.key}, already in lab {lab.name}" for s in lab.services
              if s.cluster_ip is not None}
    result: dict[int, IPv4Address] = {}
    for index, obj in enumerate(objs):
        assert obj.service is not None
        ip = obj.service.service.cluster_ip
        if ip is None:
            continue
        loc = obj.loc + ("spec", "clusterIP")
        problem = _cluster_ip_problem(ip, cidr) if cidr is not None else None
        if problem is None and cidr is not None and lab.dns.enabled and ip == cidr.network_address + DNS_SERVICE_OFFSET:
            # The cluster DNS addon's kube-dns Service owns serviceCIDR + 10 (kubelet points pods' resolv.conf at it).
            problem = (f"clusterIP {ip} is serviceCIDR + {DNS_SERVICE_OFFSET}, the cluster DNS's address (its kube-dns "
                       "Service; the addon runs unless spec.dns.enabled is false): pick another address, or leave "
                       "clusterIP out to have one allocated; or set dns.enabled: false to run your own DNS there")
        if problem is None and ip in owners:
            problem = (f"clusterIP {ip} is already the cluster IP of {owners[ip]}: give each service its own, or "
                       "leave clusterIP out to have one allocated")
        if problem:
            issues.add(loc, problem)
            continue
        owners[ip] = f"service {obj.namespace}/{obj.name} at {_where(obj.loc, issues)}"
        result[index] = ip
    if cidr is None:
        return result
    candidates = _cluster_ip_candidates(cidr)  # one pass: every address before the last one handed out is taken
    for index, obj in enumerate(objs):
        assert obj.service is not None
        if obj.service.headless or obj.service.service.cluster_ip is not None:
            continue
        ip = next((c for c in candidates if c not in owners), None)
        if ip is None:
            issues.add(obj.loc + ("spec",), f"no address of cluster.serviceCIDR {cidr} is left for this service's "
                                            "cluster IP (.1 and .10 are reserved): use a larger serviceCIDR (a "
                                            "shorter prefix), or give fewer services a cluster IP")
            return result
        owners[ip] = f"service {obj.namespace}/{obj.name}"
        result[index] = ip
    return result


def _controller_port(lab: Lab, parsed: list[_Parsed]) -> tuple[int, str] | None:
    """The ingress controller's node port, and why the controller runs, if it does: enabled, or left automatic
    (None) while the lab has Ingress objects (already, or among `parsed`). Services may not use it then."""
    controller = lab.ingress_controller
    if controller.enabled:
        return controller.node_port, "ingressController.enabled is true"
    if controller.enabled is None and (lab.ingresses or any(p.ingress is not None for p in parsed)):
        return controller.node_port, "the lab has Ingress objects"
    return None


def _node_ports(objs: list[_Parsed], lab: Lab, controller: tuple[int, str] | None,
                issues: _Issues) -> dict[int, tuple[ServicePort, ...]]:
    """Each service's ports with their node ports: given ones checked (a node port belongs to one service,
    since every node listens on it), missing ones of NodePort services allocated, lowest free from 30000 up
    in spec order (kube-apiserver picks at random). As kube-apiserver does, ports of one service with the
    same number (53/TCP and 53/UDP) share one allocated node port. A running ingress controller's node port
    (`controller`: the port, and why it runs) is neither given nor allocated to a service."""
    controller_port = controller[0] if controller is not None else None
    owners: dict[int, str] = {}
    for service in lab.services:
        for port in service.ports:
            if port.node_port is not None:
                owners.setdefault(port.node_port, f"service {service.key}, already in lab {lab.name}")
    for obj in objs:
        assert obj.service is not None
        mine: set[int] = set()
        for index, port in enumerate(obj.service.service.ports):
            if port.node_port is None:
                continue
            if controller is not None and port.node_port == controller_port:
                issues.add(obj.loc + ("spec", "ports", index, "nodePort"),
                           f"nodePort {port.node_port} is the ingress controller's node port "
                           f"(spec.ingressController.nodePort), and the controller runs in this lab ({controller[1]}): "
                           "every node listens on it for the controller; pick another nodePort, or leave nodePort out "
                           "to have one allocated")
                continue
            if port.node_port in owners and port.node_port not in mine:
                issues.add(obj.loc + ("spec", "ports", index, "nodePort"),
                           f"nodePort {port.node_port} is already used by {owners[port.node_port]}: every node "
                           "listens on a node port for one service only; pick another, or leave nodePort out to "
                           "have one allocated")
                continue
            mine.add(port.node_port)
            owners[port.node_port] = f"service {obj.namespace}/{obj.name} at {_where(obj.loc, issues)}"
    if controller_port is not None:
        owners.setdefault(controller_port, "the ingress controller")  # never allocated to a service
    low, high = NODE_PORT_RANGE
    free = iter(range(low, high + 1))  # one pass, as for cluster IPs
    result: dict[int, tuple[ServicePort, ...]] = {}
    for position, obj in enumerate(objs):
        assert obj.service is not None
        ports = list(obj.service.service.ports)
        if obj.service.service.type == "NodePort":
            for index, port in enumerate(ports):
                if port.node_port is not None:
                    continue
                number = _shared_node_port(ports, port)
                if number is None:
                    number = next((n for n in free if n not in owners), None)
                    if number is None:
                        issues.add(obj.loc + ("spec", "ports", index),
                                   f"no node port is left in {low}-{high} for this port: every node port is taken; "
                                   "use type ClusterIP for some services")
                        break
                    owners[number] = f"service {obj.namespace}/{obj.name}"
                ports[index] = replace(port, node_port=number)
        result[position] = tuple(ports)
    return result


def _shared_node_port(ports: list[ServicePort], port: ServicePort) -> int | None:
    """The node port another port of the same service with the same number already has, if this port's
    protocol is still free on it."""
    for other in ports:
        if other.port == port.port and other.node_port is not None and not any(
                p.node_port == other.node_port and p.protocol == port.protocol for p in ports):
            return other.node_port
    return None


def _namespaces(parsed: list[_Parsed], existing: dict[str, dict[str, str]],
                issues: _Issues) -> dict[str, dict[str, str]]:
    """Lab.namespaces: the ones every cluster has, those already in the lab, and the Namespace objects."""
    result: dict[str, dict[str, str]] = {name: {} for name in SYSTEM_NAMESPACES}
    result.update({name: dict(labels) for name, labels in existing.items()})
    defined: dict[str, Loc] = {}
    for obj in parsed:
        if (obj.api_version, obj.kind) != ("v1", "Namespace"):
            continue
        if obj.name in defined:
            issues.add(obj.loc + ("metadata", "name"), f"Namespace {obj.name} is already defined at "
                                                       f"{_where(defined[obj.name], issues)}: remove one")
            continue
        defined[obj.name] = obj.loc
        result.setdefault(obj.name, {}).update(obj.labels)
    return result


def _where(loc: Loc, issues: _Issues) -> str:
    line = issues.source.line(loc)
    return f"{_path(loc) or 'the top'}" + (f" (line {line})" if line is not None else "")


@dataclass
class _Draft:
    """A pod before placement."""

    name: str
    namespace: str
    template: _PodTemplate
    obj: _Parsed
    replica: int | None


def _expand(parsed: list[_Parsed], lab: Lab, namespaces: set[str], issues: _Issues, place: bool) -> list[Pod]:
    """Pods in spec order (a Deployment's replicas where the Deployment is), then placed on nodes.

    With place False (the nodes themselves are wrong) only the checks that need no node run.
    """
    drafts: list[_Draft] = []
    owners: dict[tuple[str, str, str], Loc] = {}
    taken: dict[str, str] = {pod.key: f"a pod already running in lab {lab.name}" for pod in lab.pods}
    for obj in parsed:
        if obj.template is None:
            continue
        if not _object_ok(obj, lab, namespaces, owners, issues):
            continue
        for draft in _drafts(obj, lab, issues, place):
            key = f"{draft.namespace}/{draft.name}"
            if key in taken:
                issues.add(obj.loc + ("metadata", "name"), f"pod {key} clashes with {taken[key]}: rename one")
                continue
            taken[key] = _describe_origin(draft, issues)
            drafts.append(draft)
    if not place:
        return []
    return _place(drafts, lab, issues)


def _object_ok(obj: _Parsed, lab: Lab, namespaces: set[str], owners: dict[tuple[str, str, str], Loc],
               issues: _Issues) -> bool:
    ok = True
    assert obj.namespace is not None and obj.template is not None
    if obj.namespace not in namespaces:
        issues.add(obj.loc + ("metadata", "namespace"),
                   f"namespace {obj.namespace} does not exist: add a v1 Namespace object named {obj.namespace}")
        ok = False
    node = obj.template.node_name
    if node is not None and lab.nodes and node not in {n.name for n in lab.nodes}:
        issues.add(obj.template.node_loc, f"nodeName {_short(node, 60)} is not a node of this lab "
                                          f"(nodes: {', '.join(n.name for n in lab.nodes)})")
        ok = False
    ident = (obj.kind, obj.namespace, obj.name)
    if obj.replicas is not None and ident in owners:
        issues.add(obj.loc + ("metadata", "name"), f"{obj.kind} {obj.namespace}/{obj.name} is already defined at "
                                                   f"{_where(owners[ident], issues)}: rename one")
        ok = False
    owners.setdefault(ident, obj.loc)
    return ok


def _describe_origin(draft: _Draft, issues: _Issues) -> str:
    where = _where(draft.obj.loc, issues)
    if draft.replica is None:
        return f"the pod at {where}"
    return f"replica {draft.replica} of {draft.obj.kind} {draft.obj.name} at {where}"


def _drafts(obj: _Parsed, lab: Lab, issues: _Issues, place: bool) -> list[_Draft]:
    assert obj.template is not None and obj.namespace is not None
    if obj.replicas is None:
        return [_Draft(obj.name, obj.namespace, obj.template, obj, None)]
    if not place:
        return []  # replica names only matter once the lab is otherwise valid
    room = sum(node.pod_capacity for node in lab.nodes)
    if obj.replicas > room:
        issues.add(obj.loc + ("spec", "replicas"), f"replicas {obj.replicas} is more than this lab's nodes can hold "
                                                   f"({room} pods in all): lower replicas, or give nodes larger "
                                                   "PodCIDRs with a smaller cluster.nodeCIDRMaskSize")
        return []
    used: set[str] = set()
    drafts = []
    for index in range(obj.replicas):
        name = _replica_name(obj.namespace, obj.name, index, used)
        used.add(name)
        drafts.append(_Draft(name, obj.namespace, obj.template, obj, index))
    return drafts


def _replica_name(namespace: str, deployment: str, index: int, used: set[str]) -> str:
    """`<deployment>-<5 hex>`, like the random suffix of a ReplicaSet's pods, but derived from the
    replica's identity so every load of a spec gives the same names. A clash between two replicas of the
    same Deployment (likely past a few hundred replicas) is resolved by rehashing, still deterministically."""
    attempt = 0
    while True:
        parts = (namespace, deployment, str(index)) + ((str(attempt),) if attempt else ())
        name = f"{deployment}-{names.short_hash(*parts, length=5)}"
        if name not in used:
            return name
        attempt += 1


def _place(drafts: list[_Draft], lab: Lab, issues: _Issues) -> list[Pod]:
    """Pick each pod's node: its nodeName; for replica i, nodes[i mod count]; otherwise the node with the
    fewest pods so far (earlier node on a tie), a stand-in for the scheduler's spreading. Existing pods count."""
    counts = {node.name: len(lab.pods_on(node.name)) for node in lab.nodes}
    overflow_at: dict[str, Loc] = {}
    def veth_of(namespace: str, name: str) -> str:
        return names.host_veth(names.sandbox_id(lab.name, namespace, name))

    veths: dict[tuple[str, str], str] = {(pod.node, veth_of(pod.namespace, pod.name)): pod.key for pod in lab.pods}
    pods = []
    for draft in drafts:
        node = _node_for(draft, lab, counts)
        counts[node] += 1
        if counts[node] == lab.node(node).pod_capacity + 1:
            overflow_at[node] = draft.obj.loc
        veth = veth_of(draft.namespace, draft.name)
        key = f"{draft.namespace}/{draft.name}"
        if (node, veth) in veths:
            issues.add(draft.obj.loc + ("metadata", "name"),
                       f"pods {veths[(node, veth)]} and {key} on {node} would get the same host veth name {veth} "
                       "(a hash collision): rename one of them")
        veths[(node, veth)] = key
        pods.append(Pod(name=draft.name, namespace=draft.namespace, node=node, labels=draft.template.labels,
                        containers=draft.template.containers,
                        owner=draft.obj.name if draft.replica is not None else None,
                        dns_policy=draft.template.dns_policy, dns_config=draft.template.dns_config))
    for node_name, loc in overflow_at.items():
        issues.add(loc, _capacity_message(lab, lab.node(node_name), counts[node_name]))
    return pods


def _node_for(draft: _Draft, lab: Lab, counts: dict[str, int]) -> str:
    if draft.template.node_name is not None:
        return draft.template.node_name
    if draft.replica is not None:
        return lab.nodes[draft.replica % len(lab.nodes)].name
    return min(lab.nodes, key=lambda n: (counts[n.name], n.index)).name


def _capacity_message(lab: Lab, node: Node, count: int) -> str:
    """host-local IPAM hands out the PodCIDR minus network, broadcast and the bridge's .1 gateway."""
    mask = lab.cluster.node_cidr_mask_size
    bigger = ""
    if mask - 1 > lab.cluster.pod_cidr.prefixlen:
        bigger = f" ({mask - 1} holds {2 ** (32 - mask + 1) - 3})"
    return (f"{node.name} would have {count} pods but its PodCIDR {node.pod_cidr} holds {node.pod_capacity} "
            f"(.1 is the gateway): give nodes larger PodCIDRs with a smaller cluster.nodeCIDRMaskSize{bigger}, "
            f"or put fewer pods on {node.name}")
