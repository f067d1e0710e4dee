"""Break operations for troubleshooting exercises: `lab break FAULT`, and an exercise's `faults:`.

Each fault is one thing that goes wrong on real clusters, done to a running lab the way it happens there:
a route deleted by hand, an interface with the wrong MTU, a VXLAN forwarding table flushed, a BGP daemon
that died, a kube-proxy rule gone, a pod resolv.conf with another ndots, a pod label with a typo, a veth
unplugged from cni0. Faults act inside the lab's namespaces only (never the machine's), with the same
tools a learner uses to fix them, and every one applied is recorded in the lab's state folder, so
`lab status` lists them (random ones only by their seed, unless `--reveal`) and `lab down` forgets them
with the lab.

`lab break --random --seed N` picks among the faults that make sense for the lab (deterministically from
the seed and the lab's model), which is what the capstone exercise uses: the same seed breaks the same
thing, so a grader can reproduce a learner's lab.
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from apiserver import state
from observe import targets
from topo import netns, process, underlay
from topo.errors import ApplyError, StateError
from topo.model import Lab
from topo.object_spec import label_key_problem, label_value_problem
from topo.schema import close_match

FAULTS_FILE = "faults.json"


@dataclass(frozen=True)
class Param:
    kind: str  # target, pod, cidr, int, str, regex, label-key, label-value
    help: str
    default: Any = None  # None: required

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class Fault:
    name: str
    summary: str
    params: dict[str, Param]
    apply: Callable[[targets.Lookup, dict[str, Any]], str]  # returns what was done, in words
    candidates: Callable[[Lab, state.LabState], list[dict[str, Any]]] = lambda lab, st: []


@dataclass
class Applied:
    fault: str
    params: dict[str, Any]
    detail: str
    time: float = field(default_factory=time.time)
    seed: int | None = None
    exercise: bool = False  # one of the exercise's own faults (checks.yaml): the puzzle, so told only with --reveal

    @property
    def secret(self) -> bool:
        """What it broke is the learner's to find: drawn at random, or the exercise's own."""
        return self.seed is not None or self.exercise

    def line(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.fault} {args}: {self.detail}"


# ---------------------------------------------------------------------------- the operations


def _run(lookup: targets.Lookup, on: str, argv: list[str]) -> str:
    target = lookup.live(on)
    proc = lookup.run(target, argv)
    if proc.returncode != 0:
        raise ApplyError(f"{' '.join(argv)} in {on} failed: {proc.stdout.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def _route_delete(lookup: targets.Lookup, p: dict[str, Any]) -> str:
    _run(lookup, p["in"], ["ip", "route", "del", p["to"]])
    return f"deleted the route to {p['to']} on {p['in']}"


def _link_mtu(lookup: targets.Lookup, p: dict[str, Any]) -> str:
    _run(lookup, p["in"], ["ip", "link", "set", "dev", p["dev"], "mtu", str(p["mtu"])])
    _wire_sized(lookup, p["in"], p["dev"])
    return f"set the MTU of {p['dev']} on {p['in']} to {p['mtu']}"


def _wire_sized(lookup: targets.Lookup, on: str, dev: str) -> None:
    """A host's NIC with a lowered MTU: the other end of its cable sends wire-sized frames from now on
    (topo.underlay.wire_sized says why), so bulk TCP is black-holed there as on real hardware. A pod's eth0
    is left alone (`lookup.host` names no pod): it is a veth in a real cluster too, where such packets pass
    whole as here."""
    host = lookup.host(on)  # `_run` found it alive a moment ago
    if host is None:
        return
    other = underlay.plan(lookup.lab).cables().get((host.netns, dev))
    if other is not None:  # None: not one of the lab's cables (a bridge, a tunnel device): no wire behind it
        underlay.wire_sized(*other)


def _link_down(lookup: targets.Lookup, p: dict[str, Any]) -> str:
    _run(lookup, p["in"], ["ip", "link", "set", "dev", p["dev"], "down"])
    return f"set {p['dev']} on {p['in']} down"


def _fdb_flush(lookup: targets.Lookup, p: dict[str, Any]) -> str:
    """Delete the permanent FDB entries Flannel programs on flannel.1 (MAC of each remote VTEP -> its
    node IP); with learning off, frames to those VTEPs have nowhere to go."""
    out = _run(lookup, p["in"], ["bridge", "fdb", "show", "dev", p["dev"]])
    entries = [m.groups() for line in out.splitlines() if (m := re.match(r"^([0-9a-f:]{17}) .*\bdst (\S+)", line))]
    if not entries:  # nothing would break: say so rather than record a fault that did nothing
        raise StateError(_no_fdb_entries(lookup, p))
    for mac, dst in entries:
        _run(lookup, p["in"], ["bridge", "fdb", "del", mac, "dev", p["dev"], "dst", dst, "self"])
    return f"flushed {len(entries)} FDB entries of {p['dev']} on {p['in']}"


def _no_fdb_entries(lookup: targets.Lookup, p: dict[str, Any]) -> str:
    """Why there is nothing to flush, from what was found: another backend, a lone node, or entries already
    gone. A second fdb-flush is refused as a second route-delete or bgpd-stop is (nothing left to break),
    and says so instead of blaming the backend of a VXLAN lab."""
    where = f"{p['dev']} on {p['in']} holds no FDB entries"
    lab = lookup.lab
    if lab.network.backend != "vxlan":
        return f"{where}: lab {lookup.st.name}'s backend is {lab.network.backend}, not vxlan, so there is none to flush"
    if len(lab.nodes) < 2:
        return f"{where}: lab {lookup.st.name} has one node, so there is no remote VTEP and no entry to flush"
    # A random fault or the exercise's own stays a puzzle: only one applied by name (lab status lists it) is named.
    if any(a.fault == "fdb-flush" and a.params == p and not a.secret for a in recorded(lookup.st.name)):
        return f"{where} left to flush: an earlier fdb-flush there emptied it (lab status lists it); nothing was done"
    return f"{where} left to flush: they were deleted already (by a fault, or by hand); nothing was done"


def _bgpd_stop(lookup: targets.Lookup, p: dict[str, Any]) -> str:
    target = lookup.live(p["in"])
    pid_file = state.lab_dir(lookup.st.name) / "frr" / target.name / "bgpd.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        raise ApplyError(f"{p['in']} runs no bgpd (no {pid_file})") from None
    try:
        inode = os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        inode = None
    if inode != netns.inode(target.netns) or not process.alive(pid):
        raise ApplyError(f"bgpd of {p['in']} is not running")
    process.kill_all([pid])
    return f"stopped bgpd on {p['in']} (pid {pid}); zebra keeps running"


def _rule_delete(lookup: targets.Lookup, p: dict[str, Any]) -> str:
    pattern = re.compile(p["match"])
    if p["tool"] == "iptables":
        from services.kube_proxy import iptables_backend, iptables_cmd, iptables_save

        backend = iptables_backend(lookup.lab.kube_proxy)
        out = _run(lookup, p["in"], iptables_save(backend) + ["-t", p["table"]])
        for line in out.splitlines():
            if line.startswith(f"-A {p['chain']} ") and pattern.search(line):
                _run(lookup, p["in"], iptables_cmd(backend) + ["-w", "-t", p["table"], "-D", *shlex.split(line)[1:]])
                return f"deleted from {p['table']}/{p['chain']} on {p['in']}: {line}"
    else:
        family, table = nft_table(p["table"])
        out = _run(lookup, p["in"], ["nft", "-a", "list", "chain", family, table, p["chain"]])
        for line in out.splitlines():
            handle = re.search(r"# handle (\d+)$", line)
            if handle and pattern.search(line):
                _run(lookup, p["in"], ["nft", "delete", "rule", family, table, p["chain"], "handle", handle.group(1)])
                return f"deleted from {family} {table} {p['chain']} on {p['in']}: {line.strip()}"
    raise ApplyError(f"no rule of {p['table']}/{p['chain']} on {p['in']} matches {p['match']!r}")


def nft_table(text: str) -> tuple[str, str]:
    """`[family] name` -> (family, name); the family defaults to ip, as nft's does."""
    parts = text.split()
    return (parts[0], parts[1]) if len(parts) == 2 else ("ip", parts[0])


def _ndots(lookup: targets.Lookup, p: dict[str, Any]) -> str:
    """Rewrite the pod's resolv.conf (the file kubelet wrote, bind-mounted into the pod) with another ndots."""
    from kubelet import runtime

    pod = lookup.live(p["pod"])
    folder = state.pod_dir_of(lookup.st.name, pod.key)
    text = (folder / "resolv.conf").read_text()
    options = [line for line in text.splitlines() if line.startswith("options")]
    words = [w for line in options for w in line.split()[1:] if not w.startswith("ndots:")] + [f"ndots:{p['value']}"]
    lines = [line for line in text.splitlines() if not line.startswith("options")] + ["options " + " ".join(words)]
    runtime.write_pod_files(folder, "\n".join(lines) + "\n")
    return f"set ndots:{p['value']} in {pod.key}'s resolv.conf"


def _label(lookup: targets.Lookup, p: dict[str, Any]) -> str:
    """Change one label of a running pod, then let services and DNS follow (as the endpoints controller
    would): a typo in a label drops the pod from every service that selected it."""
    from reconcile.resync import resync

    pod = lookup.live(p["pod"])
    with state.locked(lookup.st.name):
        st = state.load(lookup.st.name)
        if st is None or pod.key not in st.pods:
            raise StateError(f"pod {pod.key} is gone")
        old = st.pods[pod.key].labels.get(p["key"])
        st.pods[pod.key].labels[p["key"]] = p["value"]
        state.save(st)
        resync(st)
    return f"changed label {p['key']} of {pod.key} from {old!r} to {p['value']!r}"


def _veth_detach(lookup: targets.Lookup, p: dict[str, Any]) -> str:
    pod = lookup.live(p["pod"])
    veth = targets.host_veth(lookup, pod)
    node = lookup.st.pods[pod.key].node
    _run(lookup, node, ["ip", "link", "set", "dev", veth, "nomaster"])
    return f"unplugged {pod.key}'s veth {veth} from cni0 on {node}"


def _cilium_backend_delete(lookup: targets.Lookup, p: dict[str, Any]) -> str:
    """Delete backend slot SLOT of every ClusterIP frontend of a Service from the node's pinned
    cilium_lb4_services_v2 (slot 0 keeps its count: the socket LB still picks that slot and finds nothing),
    in this process, one batch: what a stale or crashed agent leaves behind."""
    from cilium import agent, libbpf, maps
    from observe import cilium

    node = lookup.live(p["in"])
    if node.kind != "node" or lookup.lab.cni.profile != "cilium":
        raise StateError(f"{p['in']} is not a node of a cilium lab: it has no service map")
    key = p["service"] if "/" in p["service"] else f"default/{p['service']}"
    svc = next((s for s in lookup.lab.services if s.key == key and s.cluster_ip is not None), None)
    if svc is None:
        raise StateError(f"no Service {key} with a ClusterIP in lab {lookup.st.name}")
    held = cilium.slots(lookup.st.name, node.name)
    doomed = [(fe, slots[p["slot"]]) for fe, (_count, slots) in sorted(held.items())
              if fe.address == svc.cluster_ip and p["slot"] in slots]
    if not doomed:
        raise StateError(f"{node.name}'s {maps.SERVICES} has no slot {p['slot']} for {key} ({svc.cluster_ip})")
    fd = libbpf.obj_get(str(agent.pins(lookup.st.name, node.name) / maps.SERVICES))
    try:
        libbpf.delete_batch(fd, b"".join(maps.lb4_key(fe, p["slot"]) for fe, _ in doomed), len(doomed))
    finally:
        os.close(fd)
    gone = ", ".join(f"{fe} -> {be}" for fe, be in doomed)
    return f"deleted slot {p['slot']} of {key} from {node.name}'s {maps.SERVICES} ({gone})"


# ---------------------------------------------------------------------------- what --random picks from


def _app_pods(st: state.LabState) -> list[str]:
    from services.addons import DNS_NAMESPACE, INGRESS_NAMESPACE

    return sorted(k for k in st.pods if k.split("/", 1)[0] not in (DNS_NAMESPACE, INGRESS_NAMESPACE))


def _typo(value: str) -> str:
    """A plausible slip: two neighbouring characters swapped (web -> wbe), or a doubled last one."""
    if len(value) >= 3 and value[1] != value[2]:
        return value[0] + value[2] + value[1] + value[3:]
    return value + value[-1:] if value else "x"


def _cands_routes(lab: Lab, st: state.LabState) -> list[dict[str, Any]]:
    return [{"in": n.name, "to": str(o.pod_cidr)} for n in lab.nodes for o in lab.nodes if o is not n]


def _cands_mtu(lab: Lab, st: state.LabState) -> list[dict[str, Any]]:
    return [{"in": n.name, "dev": "eth0", "mtu": 1400} for n in lab.nodes] if len(lab.nodes) > 1 else []


def _cands_down(lab: Lab, st: state.LabState) -> list[dict[str, Any]]:
    return [{"in": key, "dev": "eth0"} for key in _app_pods(st)]


def _cands_fdb(lab: Lab, st: state.LabState) -> list[dict[str, Any]]:
    # With one node there is no remote VTEP, so no entry to flush.
    return [{"in": n.name, "dev": "flannel.1"} for n in lab.nodes] if lab.network.backend == "vxlan" and \
        len(lab.nodes) > 1 else []


def _cands_bgpd(lab: Lab, st: state.LabState) -> list[dict[str, Any]]:
    return [{"in": n.name} for n in lab.nodes] if lab.network.backend == "bgp" else []


def _cands_rules(lab: Lab, st: state.LabState) -> list[dict[str, Any]]:
    if lab.kube_proxy.mode != "iptables":
        return []
    from services.addons import SERVICES

    return [{"in": n.name, "table": "nat", "chain": "KUBE-SERVICES", "match": re.escape(f"{s.key}:{port.name}")
             if port.name else re.escape(f"{s.key} cluster IP"), "tool": "iptables"}
            for n in lab.nodes for s in lab.services if s.key not in SERVICES and s.cluster_ip is not None
            for port in s.ports[:1]]


def _cands_labels(lab: Lab, st: state.LabState) -> list[dict[str, Any]]:
    from services.addons import SERVICES

    out = []
    for svc in lab.services:
        if svc.key in SERVICES:
            continue
        for key in _app_pods(st):
            labels = st.pods[key].labels
            if svc.namespace == key.split("/", 1)[0] and svc.selects(labels):
                k, v = svc.selector[0]
                out.append({"pod": key, "key": k, "value": _typo(v)})
    return out


def _cands_cilium(lab: Lab, st: state.LabState) -> list[dict[str, Any]]:
    if lab.cni.profile != "cilium":
        return []
    from services.addons import SERVICES

    return [{"in": n.name, "service": s.key, "slot": 1} for n in lab.nodes for s in lab.services
            if s.key not in SERVICES and s.cluster_ip is not None
            and any(s.selects(st.pods[k].labels) for k in _app_pods(st) if k.split("/", 1)[0] == s.namespace)]


def _cands_veth(lab: Lab, st: state.LabState) -> list[dict[str, Any]]:
    return [{"pod": key} for key in _app_pods(st)]


_ON = Param("target", "a node, router or pod (namespace/name, or name)")
_POD = Param("pod", "a pod (namespace/name, or name)")
FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("route-delete", "delete the route to a prefix on a node or router",
          {"in": _ON, "to": Param("cidr", "the route's destination, e.g. 10.244.2.0/24")}, _route_delete, _cands_routes),
    Fault("link-mtu", "set an interface's MTU (the wrong one)",
          {"in": _ON, "dev": Param("str", "interface name", "eth0"), "mtu": Param("int", "the new MTU")},
          _link_mtu, _cands_mtu),
    Fault("link-down", "set an interface down", {"in": _ON, "dev": Param("str", "interface name", "eth0")},
          _link_down, _cands_down),
    Fault("fdb-flush", "flush the VXLAN forwarding entries of flannel.1 on a node",
          {"in": _ON, "dev": Param("str", "the VXLAN device", "flannel.1")}, _fdb_flush, _cands_fdb),
    Fault("bgpd-stop", "stop the BGP daemon (bgpd) of a node or router", {"in": _ON}, _bgpd_stop, _cands_bgpd),
    Fault("rule-delete", "delete the first rule of a chain matching a regular expression",
          {"in": _ON, "chain": Param("str", "the chain, e.g. KUBE-SERVICES"),
           "match": Param("regex", "a regular expression the rule's text matches"),
           "table": Param("str", "iptables table (nat, filter), or nft '[family] table'", "nat"),
           "tool": Param("str", "iptables or nft", "iptables")}, _rule_delete, _cands_rules),
    Fault("ndots", "set another ndots in a pod's resolv.conf",
          {"pod": _POD, "value": Param("int", "the new ndots, e.g. 5")}, _ndots),
    Fault("label", "change a pod's label (a typo drops it from its services)",
          {"pod": _POD, "key": Param("label-key", "label key, e.g. app"),
           "value": Param("label-value", "the new value")},
          _label, _cands_labels),
    Fault("veth-detach", "unplug a pod's node-side veth from cni0", {"pod": _POD}, _veth_detach, _cands_veth),
    Fault("cilium-backend-delete", "delete one backend slot of a Service from a cilium node's service map",
          {"in": _ON, "service": Param("str", "the Service, NAME or NAMESPACE/NAME"),
           "slot": Param("int", "the backend slot (1 to the backend count)", 1)},
          _cilium_backend_delete, _cands_cilium),
)}


# ---------------------------------------------------------------------------- validation


MAX_RANDOM = 5  # a capstone with more simultaneous faults is a different exercise: a broken lab


def problems(item: dict[str, Any]) -> list[tuple[tuple, str]]:
    """What is wrong with a fault given as {fault: NAME, param: value} (or {random: N, pool: [NAME...]}):
    (field path, message) pairs."""
    if "random" in item:
        return _random_problems(item)
    name = item.get("fault")
    if not isinstance(name, str):
        return [(("fault",), f"missing or not a string: name the fault ({', '.join(FAULTS)})")]
    fault = FAULTS.get(name)
    if fault is None:
        return [(("fault",), f"unknown fault {name!r} ({_did_you_mean(name, list(FAULTS))})")]
    found = []
    for key, value in item.items():
        if key == "fault":
            continue
        param = fault.params.get(key)
        if param is None:
            hint = _did_you_mean(key, list(fault.params), "allowed here")
            found.append(((key,), f"unknown parameter {key!r} of {name} ({hint})"))
            continue
        problem = _param_problem(param, value)
        if problem:
            found.append(((key,), problem))
    for key, param in fault.params.items():
        if param.required and key not in item:
            found.append(((key,), f"missing; {name} needs {key}: {param.help}"))
    return found


def _did_you_mean(value: str, allowed: list[str], listed: str = "known") -> str:
    close = close_match(value, allowed)
    return f"did you mean {close!r}?" if close else f"{listed}: {', '.join(allowed)}"


def _random_problems(item: dict[str, Any]) -> list[tuple[tuple, str]]:
    found = []
    count = item["random"]
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_RANDOM:
        found.append((("random",), f"must be how many faults to draw, 1 to {MAX_RANDOM}, got {count!r}"))
    pool = item.get("pool", [])
    if not isinstance(pool, list) or not all(isinstance(n, str) for n in pool):
        found.append((("pool",), "must be a list of fault names"))
    else:
        for index, name in enumerate(pool):
            if name not in FAULTS:
                found.append((("pool", index), f"unknown fault {name!r} ({_did_you_mean(name, list(FAULTS))})"))
    for key in item:
        if key not in ("random", "pool"):
            found.append(((key,), f"unknown key {key!r} of a random fault (allowed here: random, pool)"))
    return found


def expand(st: state.LabState, items: list[dict[str, Any]], seed: int) -> list[tuple[dict[str, Any], bool]]:
    """An exercise's fault list with each {random: N} replaced by N faults drawn from `seed`:
    (item, drawn at random) pairs, so the caller can keep the drawn ones secret."""
    out: list[tuple[dict[str, Any], bool]] = []
    for item in items:
        if "random" in item:
            out += [(drawn, True) for drawn in choose(st, seed, item["random"], tuple(item.get("pool", ())))]
        else:
            out.append((item, False))
    return out


def _param_problem(param: Param, value: Any) -> str | None:
    if param.kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be an integer, got {value!r}"
        return None if 0 <= value <= 65535 else "must be between 0 and 65535"
    if not isinstance(value, str):
        return f"must be a string, got {value!r}"
    if param.kind == "label-key":  # Kubernetes' label syntax, as a spec's labels are checked
        return label_key_problem(value)
    if param.kind == "label-value":
        return label_value_problem(value)
    if param.kind in ("target", "pod"):
        from grading.fields import target_problem

        return target_problem(value)
    if param.kind == "cidr":
        try:
            ipaddress.IPv4Network(value)
        except ValueError as exc:
            return f"not an IPv4 network: {exc}"
    if param.kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            return f"not a regular expression: {exc}"
    if param.kind == "str" and (not value or len(value) > 255 or "\0" in value):
        return "must be a non-empty string"
    return None


def normalized(item: dict[str, Any]) -> tuple[Fault, dict[str, Any]]:
    """A valid fault item with its defaults filled in (raises StateError on an invalid one)."""
    found = problems(item)
    if found:
        path, message = found[0]
        if path == ("fault",):  # the name itself is wrong: an unknown one is quoted in the message already
            raise StateError(message if isinstance(item.get("fault"), str) else f"fault: {message}")
        raise StateError(f"fault {item.get('fault')}: {'.'.join(map(str, path))}: {message}")
    fault = FAULTS[item["fault"]]
    params = {key: item.get(key, param.default) for key, param in fault.params.items()}
    if fault.name == "rule-delete" and params["tool"] not in ("iptables", "nft"):
        raise StateError("fault rule-delete: tool must be iptables or nft")
    return fault, params


def parse_args(name: str, args: list[str]) -> dict[str, Any]:
    """`lab break FAULT key=value ...` -> a fault item (numbers where the fault expects integers)."""
    fault = FAULTS.get(name)
    item: dict[str, Any] = {"fault": name}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise StateError(f"{arg!r} is not KEY=VALUE")
        param = fault.params.get(key) if fault else None
        if param is not None and param.kind == "int":
            try:
                item[key] = int(value)
                continue
            except ValueError:
                pass
        item[key] = value
    return item


# ---------------------------------------------------------------------------- applying and recording


def recorded(lab_name: str) -> list[Applied]:
    try:
        data = json.loads((state.lab_dir(lab_name) / FAULTS_FILE).read_text())
        return [Applied(**item) for item in data]
    except FileNotFoundError:
        return []
    except (ValueError, TypeError) as exc:
        raise StateError(f"faults of lab {lab_name} are unreadable ({exc})") from exc


def _record(lab_name: str, applied: Applied) -> None:
    path = state.lab_dir(lab_name) / FAULTS_FILE
    items = [a.__dict__ for a in recorded(lab_name)] + [applied.__dict__]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(items, indent=1))
    tmp.replace(path)


def lookup_of(st: state.LabState) -> targets.Lookup:
    from apiserver.desired import current_lab

    return targets.Lookup(st, current_lab(st))


def apply(st: state.LabState, items: list[dict[str, Any]], seed: int | None = None,
          exercise: bool = False) -> list[Applied]:
    """Apply faults to a running lab, in order; each is recorded as soon as it is done. `seed`: drawn at
    random from it; `exercise`: the exercise's own (both kept secret by `lab status` unless --reveal)."""
    checked = [normalized(item) for item in items]  # all valid before any is applied
    done = []
    for fault, params in checked:
        lookup = lookup_of(state.load(st.name) or st)  # fresh: an earlier fault may have changed the state
        applied = Applied(fault.name, params, fault.apply(lookup, params), seed=seed, exercise=exercise)
        _record(st.name, applied)
        done.append(applied)
    return done


def new_seed() -> int:
    """A seed for random faults when none is given (printed, so the puzzle can be rebuilt)."""
    return random.SystemRandom().randrange(1, 10_000)


def choose(st: state.LabState, seed: int, count: int = 1, only: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """`count` different faults for this lab (of the kinds in `only`, when given), the same ones for the
    same seed and lab. A fault already in effect (the exercise's own, an earlier `lab break`) is no new
    puzzle, and applying it again fails (a route deleted twice): it is left out."""
    lookup = lookup_of(st)
    in_effect = {(a.fault, json.dumps(a.params, sort_keys=True)) for a in recorded(st.name)}
    pool = []
    for fault in FAULTS.values():
        if only and fault.name not in only:
            continue
        for params in fault.candidates(lookup.lab, st):
            full = normalized({"fault": fault.name, **params})[1]
            if (fault.name, json.dumps(full, sort_keys=True)) not in in_effect:
                pool.append({"fault": fault.name, **params})
    if not pool:
        raise StateError(f"no fault applies to lab {st.name}")
    pool.sort(key=lambda item: json.dumps(item, sort_keys=True))
    rng = random.Random(seed)
    return rng.sample(pool, min(count, len(pool)))


def describe() -> str:
    """`lab break --list`: every fault with its parameters."""
    lines = []
    for fault in FAULTS.values():
        args = " ".join(f"{k}={'VALUE' if p.required else p.default}" for k, p in fault.params.items())
        lines.append(f"{fault.name} {args}\n    {fault.summary}")
        lines += [f"    {k}: {p.help}" for k, p in fault.params.items()]
    return "\n".join(lines)
