"""The aws-vpc profile's part of a spec: the aws-node settings (`spec.cni.env`, the VPC CNI's own environment
variable names), custom networking (`spec.cni.eniConfig`), each node's `instanceType`, and the `aws-node`
DaemonSet a running lab takes through `lab apply -f` to change its warm pool settings (what `kubectl set env
daemonset aws-node -n kube-system WARM_IP_TARGET=2` does on EKS).
"""
from __future__ import annotations

import re
from dataclasses import replace
from ipaddress import IPv4Network
from typing import Any

from cni.vpc_instances import DEFAULT_INSTANCE_TYPE, INSTANCE_TYPES
from topo.address_spec import parse_network
from topo.model import Lab, Node, VpcCni
from topo.object_spec import Parsed
from topo.schema import Issues, Loc, close_match, short, show

INT_ENV = {"WARM_ENI_TARGET": "warm_eni_target", "WARM_IP_TARGET": "warm_ip_target",
           "MINIMUM_IP_TARGET": "minimum_ip_target", "WARM_PREFIX_TARGET": "warm_prefix_target"}
BOOL_ENV = {"ENABLE_PREFIX_DELEGATION": "prefix_delegation", "AWS_VPC_K8S_CNI_EXTERNALSNAT": "external_snat",
            "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "custom_network"}
# What a running lab may change through the aws-node DaemonSet: the warm pool. Prefix delegation and custom
# networking apply to nodes started with them (EKS: recycle the node group), so they are spec settings.
LIVE_ENV = ("WARM_ENI_TARGET", "WARM_IP_TARGET", "MINIMUM_IP_TARGET", "WARM_PREFIX_TARGET")
AWS_NODE = ("kube-system", "aws-node")


def read_env(env: dict[str, Any], loc: Loc, issues: Issues, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The VPC CNI's settings from env values as Kubernetes gives them (strings; YAML numbers and booleans too)."""
    known = tuple(INT_ENV) + tuple(BOOL_ENV)
    allowed = allowed or known
    out: dict[str, Any] = {}
    for key, value in env.items():
        here = loc + (key,)
        if key not in allowed:
            close = close_match(str(key), allowed)
            hint = f" (did you mean {close}?)" if close else ""
            why = "" if key not in known else " on a running lab (start the lab with it in spec.cni.env)"
            issues.add(here, f"{short(repr(key), 50)} is not a setting this lab takes{why}{hint}; "
                             f"supported: {', '.join(allowed)}")
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if key in INT_ENV:
            if not re.fullmatch(r"[0-9]{1,6}", text):
                issues.add(here, f"{key} must be a whole number of addresses (0 or more), got {show(value)}")
                continue
            out[INT_ENV[key]] = int(text)
        else:
            if text not in ("true", "false"):
                issues.add(here, f"{key} must be true or false, got {show(value)}")
                continue
            out[BOOL_ENV[key]] = text == "true"
    return out


def check_vpc(cni_in: Any, profile: str | None, backend: str | None, nodes_in: list[Any], issues: Issues
              ) -> VpcCni | None:
    """spec.cni.env and spec.cni.eniConfig; None when the lab is not aws-vpc or they are wrong."""
    loc = ("spec", "cni")
    env = getattr(cni_in, "env", None)
    eni_config = getattr(cni_in, "eni_config", None)
    if profile != "aws-vpc":
        if env is not None:
            issues.add(loc + ("env",), "env holds the Amazon VPC CNI's settings: set profile: aws-vpc, or remove env")
        if eni_config is not None:
            issues.add(loc + ("eniConfig",), "eniConfig is the Amazon VPC CNI's custom networking: set profile: "
                                             "aws-vpc, or remove eniConfig")
        for i, node in enumerate(nodes_in):
            if node.instance_type is not None:
                issues.add(("spec", "nodes", i, "instanceType"),
                           "instanceType sizes a node's ENIs for the Amazon VPC CNI: set spec.cni.profile: aws-vpc, "
                           "or remove instanceType")
        if backend == "vpc":
            issues.add(("spec", "network", "backend"), "backend vpc is the Amazon VPC CNI's (pods in the VPC subnet): "
                                                       "set spec.cni.profile: aws-vpc")
        return None
    if backend is not None and backend != "vpc":
        issues.add(("spec", "network", "backend"), f"profile aws-vpc puts pods in the VPC subnet itself and routes "
                                                   f"no overlay: remove backend {short(backend, 20)} (or set vpc)")
    before = len(issues)
    values = read_env(env or {}, loc + ("env",), issues)
    custom = values.pop("custom_network", False)
    subnet: IPv4Network | None = None
    if eni_config is not None:
        subnet = parse_network(eni_config.subnet, loc + ("eniConfig", "subnet"), "100.64.0.0/24", issues)
        if subnet is not None and not custom:
            issues.add(loc + ("eniConfig",), "eniConfig needs AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG: true in env "
                                             "(ipamd ignores ENIConfigs without it)")
    elif custom:
        issues.add(loc + ("env", "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG"),
                   "custom networking needs an ENIConfig: add eniConfig: {subnet: 100.64.0.0/24}")
    if values.get("prefix_delegation") and (values.get("warm_prefix_target") == 0 and not values.get("warm_ip_target")):
        issues.add(loc + ("env", "WARM_PREFIX_TARGET"), "WARM_PREFIX_TARGET 0 with prefix delegation is not supported "
                                                        "by the VPC CNI: keep 1, or set WARM_IP_TARGET")
    for i, node in enumerate(nodes_in):
        given = node.instance_type
        if given is not None and given not in INSTANCE_TYPES:
            close = close_match(given, tuple(INSTANCE_TYPES))
            hint = f" (did you mean {close}?)" if close else ""
            issues.add(("spec", "nodes", i, "instanceType"),
                       f"unknown instance type {short(repr(given), 30)}{hint}; built in: {', '.join(INSTANCE_TYPES)}")
    if len(issues) > before:
        return None
    return VpcCni(custom_network=subnet if custom else None, **values)


def vpc_nodes(nodes: list[Node], nodes_in: list[Any], vpc: VpcCni) -> list[Node]:
    """Each node with its instance type and EKS's max pods for it under these settings."""
    out = []
    for node, node_in in zip(nodes, nodes_in):
        kind = node_in.instance_type or DEFAULT_INSTANCE_TYPE
        limit = INSTANCE_TYPES[kind].max_pods(vpc.prefix_delegation, vpc.custom_network is not None)
        out.append(replace(node, instance_type=kind, max_pods=limit))
    return out


def vpc_against_lab(lab: Lab, issues: Issues) -> None:
    """What the aws-vpc profile needs of the rest of the lab: node addresses outside AWS's reserved ones,
    kube-proxy in iptables mode (EKS's), custom networking only on a flat underlay, apart from other ranges."""
    if lab.cni.profile != "aws-vpc":
        return
    for node in lab.nodes:
        subnet = lab.node_subnet(node)
        base = subnet.network_address
        if node.ip in (base + 1, base + 2, base + 3):
            issues.add(("spec", "nodes", node.index, "ip"),
                       f"{node.ip} is one of the addresses AWS reserves in subnet {subnet} (.1 router, .2 DNS, .3 "
                       f"future use): pick {base + 4} or later")
    if lab.kube_proxy.mode != "iptables":
        issues.add(("spec", "kubeProxy", "mode"), f"profile aws-vpc runs kube-proxy in iptables mode here (EKS's "
                                                  f"default); {lab.kube_proxy.mode} is not supported with it")
    custom = lab.vpc.custom_network
    if custom is not None:
        where = ("spec", "cni", "eniConfig", "subnet")
        if lab.underlay.routed:
            issues.add(where, "custom networking needs a flat underlay here (one VPC segment for node and pod "
                              "subnets): remove underlay.racks, or remove eniConfig")
        for other, name in ((lab.cluster.service_cidr, "cluster.serviceCIDR"),
                            (lab.underlay.subnet, "underlay.subnet")):
            if other is not None and custom.overlaps(other):
                issues.add(where, f"{custom} overlaps {name} {other}: pick a separate range, e.g. 100.64.0.0/24")


def read_aws_node(obj: Any, loc: Loc, issues: Issues) -> Parsed | None:
    """An apps/v1 DaemonSet: only kube-system/aws-node, and only its container's warm pool env."""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    if (meta.get("namespace", "default"), meta.get("name")) != AWS_NODE:
        issues.add(loc + ("metadata",), "the only DaemonSet a lab takes is kube-system/aws-node (the Amazon VPC "
                                        "CNI's settings)")
        return None
    containers = (((obj.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers")
    if not isinstance(containers, list) or not containers or not isinstance(containers[0], dict):
        issues.add(loc + ("spec", "template", "spec", "containers"), "needs the aws-node container with its env")
        return None
    env_list = containers[0].get("env") or []
    if not isinstance(env_list, list) or not all(isinstance(e, dict) and "name" in e for e in env_list):
        issues.add(loc + ("spec", "template", "spec", "containers", 0, "env"),
                   "env must be a list of {name: WARM_IP_TARGET, value: \"2\"}")
        return None
    for i, item in enumerate(env_list):  # Kubernetes' EnvVar.value is a string: the API server refuses `value: 2`
        value = item.get("value", "")
        if not isinstance(value, str):
            shown = str(value).lower() if isinstance(value, bool) else str(value)  # YAML's true, not Python's True
            issues.add(loc + ("spec", "template", "spec", "containers", 0, "env", i, "value"),
                       f"must be a string (Kubernetes refuses a number or boolean in an env value): write "
                       f"\"{short(shown, 20)}\"")
            return None
    env = {e["name"]: e.get("value", "") for e in env_list}
    read_env(env, loc + ("spec", "template", "spec", "containers", 0, "env"), issues, LIVE_ENV)
    manifest = {"apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": {"name": AWS_NODE[1], "namespace": AWS_NODE[0]},
                "spec": {"template": {"spec": {"containers": [{"name": "aws-node",
                                                               "env": [{"name": k, "value": str(v)}
                                                                       for k, v in env.items()]}]}}}}
    return Parsed("apps/v1", "DaemonSet", loc, manifest, AWS_NODE[1], AWS_NODE[0], {})


def with_aws_node(vpc: VpcCni, manifest: dict) -> VpcCni:
    """The settings after an applied aws-node DaemonSet (its env overrides the spec's, as a kubectl set env)."""
    containers = manifest["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in containers[0].get("env", [])}
    values = {INT_ENV[k]: int(v) for k, v in env.items() if k in INT_ENV and re.fullmatch(r"[0-9]{1,6}", str(v))}
    return replace(vpc, **values)


# ---------------------------------------------------------------------------- Node objects (lab apply)

INSTANCE_LABEL = "node.kubernetes.io/instance-type"  # the well-known label kubelet sets from the instance
IP_ANNOTATION = "kubenet-lab.io/primary-ip"  # the primary address the "instance" got from the subnet
WAITING_ANNOTATION = "kubenet-lab.io/waiting"  # why it has none yet (the subnet is full)


def read_node(obj: Any, loc: Loc, issues: Issues) -> Parsed | None:
    """A v1 Node: one more instance joining the cluster (the aws-vpc profile). Its instance type is the
    well-known label node.kubernetes.io/instance-type (default m5.large); its address is not given: like an
    EC2 instance it gets the subnet's next free address when it is launched (`lab apply`)."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        issues.add(loc + ("metadata", "name"), "a Node needs metadata.name, e.g. node4")
        return None
    name = meta["name"]
    from topo import names

    problem = names.dns_label_problem(name)
    if problem:
        issues.add(loc + ("metadata", "name"), problem)
        return None
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        issues.add(loc + ("metadata", "labels"), "labels must be a mapping")
        return None
    kind = str(labels.get(INSTANCE_LABEL, DEFAULT_INSTANCE_TYPE))
    if kind not in INSTANCE_TYPES:
        close = close_match(kind, tuple(INSTANCE_TYPES))
        hint = f" (did you mean {close}?)" if close else ""
        issues.add(loc + ("metadata", "labels", INSTANCE_LABEL),
                   f"unknown instance type {short(repr(kind), 30)}{hint}; built in: {', '.join(INSTANCE_TYPES)}")
        return None
    extra = set(obj) - {"apiVersion", "kind", "metadata", "spec"}
    if extra or (obj.get("spec") not in (None, {})):
        issues.add(loc + ("spec",), "a Node here takes only metadata (name, labels); its address comes from the "
                                    "subnet and its PodCIDR is not used by the aws-vpc profile")
        return None
    manifest = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {**labels, INSTANCE_LABEL: kind}}}
    return Parsed("v1", "Node", loc, manifest, name, None, {**labels, INSTANCE_LABEL: kind})


def vpc_objects_against_lab(parsed: list[Parsed], lab: Lab, issues: Issues) -> None:
    """DaemonSet aws-node and Node objects only for a lab playing aws-vpc; a new Node on a flat underlay,
    with a name no node, router or external host has."""
    taken = {n.name for n in lab.nodes} | set(lab.routers) | {e.name for e in lab.external}
    for obj in parsed:
        if obj.kind not in ("DaemonSet", "Node"):
            continue
        if lab.cni.profile != "aws-vpc":
            what = "kube-system/aws-node holds the Amazon VPC CNI's settings" if obj.kind == "DaemonSet" else \
                "adding a Node is modelled for the aws-vpc profile only (an instance launched into the VPC subnet)"
            issues.add(obj.loc + ("kind",), f"{what}: this lab plays {lab.cni.profile}, not aws-vpc")
        elif obj.kind == "Node" and lab.underlay.routed:
            issues.add(obj.loc + ("kind",), "adding a Node to a routed underlay (racks) is not supported: the lab "
                                            "adds nodes to a flat underlay only")
        elif obj.kind == "Node" and obj.name in taken:
            issues.add(obj.loc + ("metadata", "name"), f"{obj.name} is already a node, router or external host of "
                                                       "this lab: pick another name")


def applied_nodes(lab: Lab, manifests: list[dict]) -> list[Node]:
    """The nodes that joined a running lab (Node objects that got a primary address), as model nodes."""
    from ipaddress import IPv4Address

    used = {n.pod_cidr for n in lab.nodes}
    blocks = (b for b in list(lab.cluster.pod_cidr.subnets(new_prefix=lab.cluster.node_cidr_mask_size))[1:]
              if b not in used)
    out = []
    for manifest in manifests:
        meta = manifest["metadata"]
        ip = (meta.get("annotations") or {}).get(IP_ANNOTATION)
        if not ip or lab.underlay.subnet is None:
            continue
        kind = meta["labels"][INSTANCE_LABEL]
        limit = INSTANCE_TYPES[kind].max_pods(lab.vpc.prefix_delegation, lab.vpc.custom_network is not None)
        out.append(Node(name=meta["name"], ip=IPv4Address(ip), pod_cidr=next(blocks),
                        index=len(lab.nodes) + len(out), link=lab.underlay.link, instance_type=kind, max_pods=limit))
    return out


def not_in_a_spec(parsed: list[Parsed], issues: Issues) -> None:
    """A lab spec says its nodes in spec.nodes and aws-node's settings in spec.cni.env; the objects are for
    `lab apply` to a running lab."""
    for obj in parsed:
        if obj.kind == "Node":
            issues.add(obj.loc + ("kind",), "a lab spec lists its nodes in spec.nodes; a Node object adds one to a "
                                            "running lab (lab apply -f)")
        elif obj.kind == "DaemonSet":
            issues.add(obj.loc + ("kind",), "a lab spec sets aws-node's variables in spec.cni.env; the DaemonSet "
                                            "changes them on a running lab (lab apply -f)")
