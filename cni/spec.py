"""The CNI a lab plays (spec.cni.profile) and NetworkPolicy objects.

`spec.cni.profile` picks the CNI (Flannel: policies stored, not enforced; Calico: enforced) and with it the
backend's default. NetworkPolicies are checked with Kubernetes' own validation rules; `cni.network_policy`
turns them into rules.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from topo.model import (CILIUM_ROUTING_MODES, CNI_PROFILES, PLANNED_CNI_PROFILES, Cni, IPBlock, Lab, LabelSelector, NetworkPolicy, PolicyPeer,
                        PolicyPort, PolicyRule, SelectorRequirement)
from topo.object_spec import (ObjectMetaIn, Parsed, check_labels, check_meta, label_key_problem, label_value_problem,
                              normalized_manifest)
from topo.address_spec import parse_network
from topo.schema import (Issues, Loc, StrictModel, close_match, looks_numeric, short, show, validate, written_at, wrong_type)
from topo.workload_spec import port_name_problem, protocol_problem

POLICY_TYPES = ("Ingress", "Egress")
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

_PEER_EXAMPLE = "{podSelector: {matchLabels: {app: web}}}, {namespaceSelector: {...}} or {ipBlock: {cidr: ...}}"


class EniConfigIn(StrictModel):
    """The aws-vpc profile's custom networking: the ENIConfig's subnet pods take their addresses from."""

    subnet: str = Field(examples=["subnet: 100.64.0.0/24"])


class CniIn(StrictModel):
    """The CNI the lab plays (see topo.model.CNI_PROFILES); env and eniConfig: the aws-vpc profile's settings
    (cni.vpc_spec)."""

    profile: str | None = None
    routing_mode: str | None = Field(None, alias="routingMode")  # cilium: tunnel (default) or native
    env: dict[str, Any] | None = None
    eni_config: EniConfigIn | None = Field(None, alias="eniConfig")


class _SelectorRequirementIn(StrictModel):
    key: str = Field(examples=["key: app"])
    operator: str = Field(examples=["operator: In"])
    values: list[str] | None = None


class _LabelSelectorIn(StrictModel):
    """A metav1.LabelSelector: `{}` selects everything."""

    match_labels: dict[str, str] | None = Field(None, alias="matchLabels")
    match_expressions: list[_SelectorRequirementIn] | None = Field(None, alias="matchExpressions")


class _IPBlockIn(StrictModel):
    cidr: str = Field(examples=["cidr: 172.17.0.0/16"])
    except_: list[str] | None = Field(None, alias="except")


class _PolicyPeerIn(StrictModel):
    pod_selector: _LabelSelectorIn | None = Field(None, alias="podSelector")
    namespace_selector: _LabelSelectorIn | None = Field(None, alias="namespaceSelector")
    ip_block: _IPBlockIn | None = Field(None, alias="ipBlock")


class _PolicyPortIn(StrictModel):
    """port is a number or a container port's name (IntOrString), so it is read as Any and checked by
    `_policy_port`."""

    protocol: str | None = None
    port: Any = None
    end_port: int | None = Field(None, alias="endPort")


class _PolicyIngressRuleIn(StrictModel):
    from_: list[_PolicyPeerIn] | None = Field(None, alias="from")
    ports: list[_PolicyPortIn] | None = None


class _PolicyEgressRuleIn(StrictModel):
    to: list[_PolicyPeerIn] | None = None
    ports: list[_PolicyPortIn] | None = None


class _NetworkPolicySpecIn(StrictModel):
    pod_selector: _LabelSelectorIn = Field(alias="podSelector", examples=[
        "podSelector: {} (every pod of the namespace), or podSelector: {matchLabels: {app: web}}"])
    policy_types: list[str] | None = Field(None, alias="policyTypes")
    ingress: list[_PolicyIngressRuleIn] | None = None
    egress: list[_PolicyEgressRuleIn] | None = None


class _NetworkPolicyIn(StrictModel):
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: ObjectMetaIn = Field(examples=["metadata: {name: default-deny}"])
    spec: _NetworkPolicySpecIn = Field(examples=["spec: {podSelector: {}, policyTypes: [Ingress]}"])


# ---------------------------------------------------------------------------- the CNI profile


def check_cni(cni_in: CniIn | None, issues: Issues) -> Cni | None:
    """spec.cni.profile, or None when not given (the profile then follows the backend, `profile_of`)."""
    if cni_in is None or cni_in.profile is None:
        return None
    profile = cni_in.profile
    if profile in CNI_PROFILES:
        mode = cni_in.routing_mode
        if mode is not None and profile != "cilium":
            issues.add(("spec", "cni", "routingMode"), f"routingMode is Cilium's setting: profile {profile} picks "
                                                       "its routing with spec.network.backend")
            return None
        if mode is not None and mode not in CILIUM_ROUTING_MODES:
            close = close_match(mode, tuple(CILIUM_ROUTING_MODES))
            hint = f" (did you mean {close}?)" if close else ""
            issues.add(("spec", "cni", "routingMode"), f"unknown routingMode {short(repr(mode), 40)}{hint}; "
                                                       "available: tunnel (VXLAN, the default), native")
            return None
        return Cni(profile=profile, given=True, routing_mode=mode)
    loc = ("spec", "cni", "profile")
    available = ", ".join(CNI_PROFILES)
    if profile.lower() in PLANNED_CNI_PROFILES:
        issues.add(loc, f"profile {profile.lower()} ({PLANNED_CNI_PROFILES[profile.lower()]}) is not available yet; "
                        f"available: {available}")
        return None
    close = close_match(profile, tuple(CNI_PROFILES) + tuple(PLANNED_CNI_PROFILES))
    hint = f" (did you mean {close}?)" if close else ""
    issues.add(loc, f"unknown CNI profile {short(repr(profile), 40)}{hint}; available: {available} (flannel: "
                    "VXLAN, no NetworkPolicy; calico: BGP, NetworkPolicy enforced; cilium: eBPF, no kube-proxy, "
                    "NetworkPolicy by identities; "
                    "aws-vpc: pod IPs from the VPC subnet)")
    return None


# A lab without spec.cni plays the CNI its backend comes from: Calico's BGP, Flannel's host-gw and vxlan.
_PROFILE_OF_BACKEND = {"bgp": "calico"}


def profile_of(backend: str) -> Cni:
    return Cni(profile=_PROFILE_OF_BACKEND.get(backend, "flannel"), given=False)


# ---------------------------------------------------------------------------- NetworkPolicy objects


def read_network_policy(obj: Any, loc: Loc, issues: Issues) -> Parsed | None:
    """A networking.k8s.io/v1 NetworkPolicy's own rules (Kubernetes' validation); whether its namespace
    exists and its name is free is `network_policies_against_lab`'s check. policyTypes is defaulted as the API server
    does: Ingress, plus Egress when egress rules are given."""
    model = validate(_NetworkPolicyIn, obj, loc, issues)
    if model is None:
        return None
    before = len(issues)
    meta, spec, sloc = model.metadata, model.spec, loc + ("spec",)
    check_meta(meta, loc + ("metadata",), issues)
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
    manifest = normalized_manifest(model)
    manifest["metadata"].setdefault("namespace", "default")
    manifest["spec"]["policyTypes"] = list(policy_types)
    policy = NetworkPolicy(name=meta.name, namespace=namespace, pod_selector=selector, policy_types=policy_types,
                           ingress=tuple(r for r in ingress if r is not None),
                           egress=tuple(r for r in egress if r is not None))
    return Parsed(model.api_version, model.kind, loc, manifest, meta.name, namespace, dict(meta.labels or {}),
                  policy=policy)


def _policy_types(given: list[str], loc: Loc, issues: Issues) -> tuple[str, ...]:
    found: list[str] = []
    if not given:
        issues.add(loc, "policyTypes is empty: give Ingress, Egress or both, or leave policyTypes out (then it is "
                        "Ingress, plus Egress when egress rules are given)")
    for index, value in enumerate(given):
        if value not in POLICY_TYPES:
            close = close_match(value, POLICY_TYPES)
            hint = f" (did you mean {close}?)" if close else ""
            issues.add(loc + (index,), f"policy type must be Ingress or Egress, got {short(repr(value), 40)}{hint}")
        elif value in found:
            issues.add(loc + (index,), f"{value} is given twice: keep one")
        else:
            found.append(value)
    return tuple(t for t in POLICY_TYPES if t in found)  # Kubernetes' order, whatever the manifest's


def _label_selector(selector: _LabelSelectorIn, loc: Loc, issues: Issues) -> LabelSelector | None:
    before = len(issues)
    labels = dict(selector.match_labels or {})
    check_labels(labels, loc + ("matchLabels",), issues)
    expressions = []
    for index, expr in enumerate(selector.match_expressions or []):
        eloc = loc + ("matchExpressions", index)
        problem = label_key_problem(expr.key)
        if problem:
            issues.add(eloc + ("key",), problem)
        values = list(expr.values or [])
        if expr.operator not in SELECTOR_OPERATORS:
            close = close_match(expr.operator, SELECTOR_OPERATORS)
            hint = f" (did you mean {close}?)" if close else ""
            issues.add(eloc + ("operator",), f"operator must be one of {', '.join(SELECTOR_OPERATORS)}, got "
                                             f"{short(repr(expr.operator), 40)}{hint}")
        elif expr.operator in ("In", "NotIn") and not values:
            issues.add(eloc + ("values",), f"operator {expr.operator} needs values: a non-empty list, e.g. "
                                           "values: [web, api]")
        elif expr.operator in ("Exists", "DoesNotExist") and values:
            issues.add(eloc + ("values",), f"operator {expr.operator} takes no values: remove them")
        for vindex, value in enumerate(values):
            problem = label_value_problem(value)
            if problem:
                issues.add(eloc + ("values", vindex), problem)
        expressions.append(SelectorRequirement(expr.key, expr.operator, tuple(values)))
    if len(issues) > before:
        return None
    return LabelSelector(tuple(sorted(labels.items())), tuple(expressions))


def _policy_rule(peers_in: list[_PolicyPeerIn] | None, ports_in: list[_PolicyPortIn] | None, loc: Loc,
                 direction: str, issues: Issues) -> PolicyRule | None:
    before = len(issues)
    peers = [_policy_peer(peer, loc + (direction, i), issues) for i, peer in enumerate(peers_in or [])]
    ports = [_policy_port(port, loc + ("ports", i), issues) for i, port in enumerate(ports_in or [])]
    if len(issues) > before:
        return None
    return PolicyRule(tuple(p for p in peers if p is not None), tuple(p for p in ports if p is not None))


def _policy_peer(peer: _PolicyPeerIn, loc: Loc, issues: Issues) -> PolicyPeer | None:
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


def _ip_block(block_in: _IPBlockIn, loc: Loc, issues: Issues) -> IPBlock | None:
    cidr = parse_network(block_in.cidr, loc + ("cidr",), "172.17.0.0/16", issues, reserved=False)
    excepts = []
    ok = cidr is not None
    for index, text in enumerate(block_in.except_ or []):
        net = parse_network(text, loc + ("except", index), "172.17.1.0/24", issues, reserved=False)
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


def _policy_port(port_in: _PolicyPortIn, loc: Loc, issues: Issues) -> PolicyPort | None:
    protocol = port_in.protocol if port_in.protocol is not None else "TCP"
    ok = True
    problem = protocol_problem(protocol)
    if problem:
        issues.add(loc + ("protocol",), problem)
        ok = False
    port = port_in.port
    if isinstance(port, bool) or (port is not None and not isinstance(port, (int, str))):
        issues.add(loc + ("port",), wrong_type("a port number or a container port's name", port,
                                               issues.source.raw.get(loc + ("port",))))
        return None
    if isinstance(port, int) and not 1 <= port <= 65535:
        issues.add(loc + ("port",), f"port {show(port)} is out of range 1..65535")
        ok = False
    if isinstance(port, str):
        if looks_numeric(port):
            issues.add(loc + ("port",), f"port {port!r} is a number written as a string: remove the quotes")
            ok = False
        else:
            problem = port_name_problem(port)
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
            issues.add(loc + ("endPort",), f"endPort {show(end)} must be between port {port} and 65535")
            ok = False
    return PolicyPort(protocol, port, end) if ok else None


def network_policies_against_lab(parsed: list[Parsed], lab: Lab, namespaces: set[str],
                                 issues: Issues) -> list[NetworkPolicy]:
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
        defined.setdefault(key, f"the networkpolicy at {written_at(obj.loc, issues)}")
        found.append(obj.policy)
    return found
