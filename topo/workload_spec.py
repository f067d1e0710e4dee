"""Pods and Deployments: containers, their ports and images, a pod's DNS settings.

A container runs on this machine, never through a shell: a built-in image (agnhost, pause) runs its
stand-in, `command` a program of the machine. An image's own argument rules (agnhost's subcommands) belong
to the image, which sits above this layer: the API server hands them in (`ArgsCheck`, by image name), so a
typo fails at validation, not inside a pod. A container runs as an unprivileged user unless its
securityContext asks for root (`topo.security_spec`). Where pods go is `topo.placement_spec`'s.
"""
from __future__ import annotations

import ipaddress
import json
import re
import sys
from typing import Any, Callable, Mapping

from pydantic import Field

from topo import names
from topo.model import Container, ContainerPort, DnsConfig
from topo.object_spec import ObjectMetaIn, Parsed, PodTemplate, check_labels, check_meta, normalized_manifest
from topo.address_spec import ADDRESS_TEXT
from topo.schema import Issues, Loc, StrictModel, field_path, short, show, validate
from topo.security_spec import PodSecurityContextIn, SecurityContextIn, check_security

BUILTIN_IMAGES = ("agnhost", "pause")
AGNHOST_MODULE = "images.agnhost"  # what `python -m` runs for image agnhost

DEPLOYMENT_NAME_MAX = names.DNS1123_LABEL_MAX - 6  # replicas are "<deployment>-<5 hex>" and must stay labels

_RESTART_POLICIES = ("Always", "OnFailure", "Never")
_DNS_POLICIES = ("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None")
_PROTOCOLS = ("TCP", "UDP", "SCTP")
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*", re.ASCII)  # Kubernetes' env var name rule
_PORT_NAME = re.compile(r"[-a-z0-9]+", re.ASCII)
_PORT_NAME_MAX = 15  # IANA service names
_MAX_NAMESERVERS = 3  # glibc's resolver uses three at most; Kubernetes enforces it
_MAX_SEARCHES = 32
_MAX_SEARCH_CHARS = 2048  # Kubernetes' limit on the search list's total length
_NDOTS_MAX = 15  # glibc's resolver caps ndots at 15
_NDOTS_CLUSTER_FIRST = 5  # what kubelet writes for ClusterFirst pods

_DNS_NAME_MAX = 253

# An image's own check of a container's args: where a problem is (under the container, e.g. ("args", 0)) and
# what it is, or None. Images sit above this layer, so the API server hands the checks in, by image name.
ArgsCheck = Callable[[tuple[str, ...]], tuple[Loc, str | None]]
ImageArgs = Mapping[str, ArgsCheck]


class _TemplateMetaIn(StrictModel):
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class _PortIn(StrictModel):
    container_port: int = Field(alias="containerPort", examples=["containerPort: 8080"])
    protocol: str | None = None
    name: str | None = None


class _EnvIn(StrictModel):
    name: str = Field(examples=["name: MODE"])
    value: str | None = None


class _ContainerIn(StrictModel):
    name: str = Field(examples=["name: app"])
    image: str = Field(examples=["image: agnhost"])
    command: list[str] | None = None
    args: list[str] | None = None
    ports: list[_PortIn] | None = None
    env: list[_EnvIn] | None = None
    security_context: SecurityContextIn | None = Field(None, alias="securityContext")


class _DnsOptionIn(StrictModel):
    name: str = Field(examples=["name: ndots"])
    value: str | None = None


class _DnsConfigIn(StrictModel):
    nameservers: list[str] | None = None
    searches: list[str] | None = None
    options: list[_DnsOptionIn] | None = None


class _PodSpecIn(StrictModel):
    """The Pod spec subset a lab runs. restartPolicy and terminationGracePeriodSeconds are accepted and do not
    change the emulation; dnsPolicy and dnsConfig become Pod.dns_policy and Pod.dns_config; hostname and
    subdomain become Pod.hostname and Pod.subdomain (the cluster DNS's names for pods behind a headless service)."""

    node_name: str | None = Field(None, alias="nodeName")
    containers: list[_ContainerIn] = Field(examples=["containers: [{name: app, image: agnhost, args: [netexec]}]"])
    restart_policy: str | None = Field(None, alias="restartPolicy")
    termination_grace_period_seconds: int | None = Field(None, alias="terminationGracePeriodSeconds")
    dns_policy: str | None = Field(None, alias="dnsPolicy")
    dns_config: _DnsConfigIn | None = Field(None, alias="dnsConfig")
    hostname: str | None = None
    subdomain: str | None = None
    security_context: PodSecurityContextIn | None = Field(None, alias="securityContext")


class _PodIn(StrictModel):
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: ObjectMetaIn = Field(examples=["metadata: {name: web}"])
    spec: _PodSpecIn = Field(examples=["spec: {containers: [{name: app, image: agnhost, args: [netexec]}]}"])


class _SelectorIn(StrictModel):
    match_labels: dict[str, str] = Field(alias="matchLabels", examples=["matchLabels: {app: web}"])


class _TemplateIn(StrictModel):
    metadata: _TemplateMetaIn = Field(examples=["metadata: {labels: {app: web}}"])
    spec: _PodSpecIn = Field(examples=["spec: {containers: [{name: app, image: agnhost, args: [netexec]}]}"])


class _DeploymentSpecIn(StrictModel):
    replicas: int | None = None
    selector: _SelectorIn = Field(examples=["selector: {matchLabels: {app: web}}"])
    template: _TemplateIn = Field(examples=["template: {metadata: {labels: {app: web}}, spec: {containers: [...]}}"])


class _DeploymentIn(StrictModel):
    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: ObjectMetaIn = Field(examples=["metadata: {name: web}"])
    spec: _DeploymentSpecIn = Field(examples=["spec: {replicas: 2, selector: ..., template: ...}"])


# ---------------------------------------------------------------------------- pods and containers


def _check_pod_spec(spec: _PodSpecIn, loc: Loc, labels: dict[str, str], issues: Issues,
                    image_args: ImageArgs) -> PodTemplate | None:
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
        container = _check_container(container_in, cloc, port_names, issues, image_args,
                                     (spec.security_context, loc + ("securityContext",)))
        if container is not None:
            containers.append(container)
    _check_pod_extras(spec, loc, issues)
    if len(issues) > before:
        return None
    return PodTemplate(labels=tuple(labels.items()), containers=tuple(containers), node_name=spec.node_name,
                       node_loc=loc + ("nodeName",), dns_policy=spec.dns_policy or _DNS_POLICIES[0],
                       dns_config=_dns_config(spec.dns_config), hostname=spec.hostname, subdomain=spec.subdomain)


def _check_pod_extras(spec: _PodSpecIn, loc: Loc, issues: Issues) -> None:
    """Fields that do not change the emulation are still checked, so a typo in them is not silently kept."""
    if spec.restart_policy is not None and spec.restart_policy not in _RESTART_POLICIES:
        issues.add(loc + ("restartPolicy",), f"restartPolicy must be one of {', '.join(_RESTART_POLICIES)}, "
                                             f"got {short(repr(spec.restart_policy), 40)}")
    if spec.dns_policy is not None and spec.dns_policy not in _DNS_POLICIES:
        issues.add(loc + ("dnsPolicy",), f"dnsPolicy must be one of {', '.join(_DNS_POLICIES)}, "
                                         f"got {short(repr(spec.dns_policy), 40)}")
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


def _check_dns_config(config: _DnsConfigIn, loc: Loc, issues: Issues) -> None:
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
            issues.add(loc + ("nameservers", index), f"{short(repr(server), 40)} is not an IP address: write one like 10.96.0.10")
            continue
        if address.version == 6:
            issues.add(loc + ("nameservers", index), f"{short(server, 40)} is IPv6; kubenet-lab labs are IPv4 only: "
                                                     "write an IPv4 address like 10.96.0.10")
    searches = config.searches or []
    if len(searches) > _MAX_SEARCHES:
        issues.add(loc + ("searches",), f"at most {_MAX_SEARCHES} search domains are allowed")
    for index, search in enumerate(searches):
        # A trailing dot (an absolute name) is fine in a search list, as Kubernetes allows it.
        problem = dns_name_problem(search[:-1] if search.endswith(".") and search != "." else search,
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
            issues.add(oloc + ("name",), f"{short(repr(option.name), 40)} holds a value: write the name and the value "
                                         f"apart, name: {short(name, 20)}, value: {json.dumps(short(value, 20))} "
                                         "(resolv.conf's name:value form is made from them)")
        elif option.name == "ndots":
            _check_ndots(option.value, oloc + ("value",), issues)


def _check_ndots(value: str | None, loc: Loc, issues: Issues) -> None:
    """ndots: names with fewer dots than this are tried with the search domains first. glibc reads a whole
    number and caps it at 15; Kubernetes' ClusterFirst gives 5."""
    example = f'value: "{_NDOTS_CLUSTER_FIRST}"'
    if value is None:
        issues.add(loc, f"missing; ndots needs a number of dots 0..{_NDOTS_MAX}, e.g. {example}")
    elif not re.fullmatch(r"[0-9]+", value):
        issues.add(loc, f"ndots {short(repr(value), 30)} is not a whole number: write 0..{_NDOTS_MAX} as a string, "
                        f"e.g. {example}")
    elif int(value[:4]) > _NDOTS_MAX:
        issues.add(loc, f"ndots {short(value, 30)} is more than {_NDOTS_MAX}, the most the resolver uses: write "
                        f"0..{_NDOTS_MAX}, e.g. {example}")


def _dns_config(config: _DnsConfigIn | None) -> DnsConfig | None:
    if config is None:
        return None
    return DnsConfig(nameservers=tuple(config.nameservers or ()), searches=tuple(config.searches or ()),
                     options=tuple((o.name, o.value) for o in config.options or ()))


def dns_name_problem(value: str, what: str, example: str, wildcard: bool = False) -> str | None:
    """Why `value` is not a DNS name (lower-case DNS-1123 labels joined by dots, 253 characters at most, as
    Kubernetes' DNS-1123 subdomain rule), or None. With `wildcard`, the first label may be `*` (`*.example.com`
    matches one label in its place, as an Ingress host)."""
    shown = short(repr(value), 60)
    if value == "":
        return f"the {what} is empty: write a DNS name, e.g. {example}"
    if value.endswith(".") and value != ".":
        return f"{shown} ends with a dot: write the {what} without it, {short(value[:-1], 60)}"
    if len(value) > _DNS_NAME_MAX:
        return f"the {what} {shown} is {len(value)} characters; a DNS name has at most {_DNS_NAME_MAX}"
    labels = value.split(".")
    if wildcard and labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    if "*" in ".".join(labels):
        if wildcard:
            return f"{shown} is not a valid {what}: '*' may only be the whole first label, e.g. *.example.com"
        return f"{shown} is not a valid {what}: a '*' (wildcard) is not allowed here"
    if ADDRESS_TEXT.fullmatch(value):
        return f"{shown} is an IP address, but a {what} must be a DNS name, e.g. {example}"
    if value != value.lower() and all(names.is_dns_label(label) for label in value.lower().split(".")[-len(labels):]):
        return f"{shown} has upper-case letters: write DNS names in lower case, {short(value.lower(), 60)}"
    for label in labels:
        if not names.is_dns_label(label):
            return (f"{shown} is not a valid {what}: each dot-separated part must be 1..63 lower-case letters, digits "
                    f"and '-', starting and ending with a letter or digit, e.g. {example}")
    return None


def _check_container(container: _ContainerIn, loc: Loc, port_names: dict[str, Loc], issues: Issues,
                     image_args: ImageArgs, pod_security: tuple[PodSecurityContextIn | None, Loc]) -> Container | None:
    before = len(issues)
    problem = names.dns_label_problem(container.name)
    if problem:
        issues.add(loc + ("name",), problem)
    if not container.image or any(ch.isspace() or not ch.isprintable() for ch in container.image):
        issues.add(loc + ("image",), f"{short(repr(container.image), 60)} is not an image name: write one like agnhost "
                                     "or registry.k8s.io/e2e-test-images/agnhost:2.47")
    for key in ("command", "args"):
        for index, arg in enumerate(getattr(container, key) or []):
            if "\0" in arg:
                issues.add(loc + (key, index), "contains a NUL character, which no program argument can hold: remove it")
    for index, env in enumerate(container.env or []):
        if not _ENV_NAME.fullmatch(env.name):
            issues.add(loc + ("env", index, "name"), f"{short(repr(env.name), 40)} is not a valid variable name: use "
                                                     "letters, digits, '_', '-' and '.', not starting with a digit")
    ports = _check_ports(container.ports or [], loc + ("ports",), port_names, issues)
    security = check_security(pod_security[0], container.security_context, pod_security[1],
                              loc + ("securityContext",), issues)
    argv = _argv(container, loc, issues, image_args) if len(issues) == before else None
    if argv is None or len(issues) > before:
        return None
    env = tuple((e.name, e.value or "") for e in container.env or [])
    return Container(name=container.name, image=container.image, argv=argv, ports=ports, env=env, security=security)


def _check_ports(ports_in: list[_PortIn], loc: Loc, port_names: dict[str, Loc],
                 issues: Issues) -> tuple[ContainerPort, ...]:
    ports = []
    for index, port in enumerate(ports_in):
        ploc = loc + (index,)
        protocol = port.protocol if port.protocol is not None else "TCP"
        if not 1 <= port.container_port <= 65535:
            issues.add(ploc + ("containerPort",), f"{show(port.container_port)} is not a port number: use 1..65535")
        problem = protocol_problem(protocol)
        if problem:
            issues.add(ploc + ("protocol",), problem)
        if port.name is not None:
            problem = port_name_problem(port.name)
            if problem:
                issues.add(ploc + ("name",), problem)
            elif port.name in port_names:
                issues.add(ploc + ("name",), f"port name {port.name} is already used at {field_path(port_names[port.name])}: "
                                             "port names must be unique within a pod")
            else:
                port_names[port.name] = ploc + ("name",)
        ports.append(ContainerPort(container_port=port.container_port, protocol=protocol, name=port.name))
    return tuple(ports)


def protocol_problem(protocol: str) -> str | None:
    if protocol in _PROTOCOLS:
        return None
    hint = f" (write {protocol.upper()})" if protocol.upper() in _PROTOCOLS else ""
    return f"protocol must be one of {', '.join(_PROTOCOLS)}, got {short(repr(protocol), 30)}{hint}"


def port_name_problem(name: str) -> str | None:
    """IANA service name rules, as Kubernetes applies them to port names."""
    if (len(name) <= _PORT_NAME_MAX and _PORT_NAME.fullmatch(name) and re.search("[a-z]", name)
            and "--" not in name and not name.startswith("-") and not name.endswith("-")):
        return None
    return (f"{short(repr(name), 40)} is not a valid port name: at most {_PORT_NAME_MAX} lower-case letters, digits "
            "and single '-', with at least one letter, e.g. http")


def image_base(image: str) -> str:
    """The image's own name: the last path component, without tag or digest.

    `registry.k8s.io/e2e-test-images/agnhost:2.47` and `agnhost@sha256:...` both name agnhost.
    """
    without_digest = image.split("@", 1)[0]
    return without_digest.rsplit("/", 1)[-1].split(":", 1)[0]


def _argv(container: _ContainerIn, loc: Loc, issues: Issues, image_args: ImageArgs) -> tuple[str, ...] | None:
    """What the container runs on this machine (never through a shell).

    A built-in image without `command` runs its stand-in: agnhost as a Python module, pause as nothing at
    all (the pod's own pause process holds the namespaces, so an empty argv means "nothing to start").
    `command` replaces the image's entrypoint, as in Kubernetes, and `args` follow it. `image_args` checks
    a built-in image's args by the image's own rules (an image without a check takes its args unchecked).
    """
    args = tuple(container.args or ())
    if container.command is not None:
        if not container.command or not container.command[0]:
            issues.add(loc + ("command",), "command is empty: give the program to run, e.g. command: [sleep, infinity]")
            return None
        return (*container.command, *args)
    base = image_base(container.image)
    if base == "agnhost":
        check = image_args.get(base)
        where, problem = check(args) if check is not None else (("args",), None)
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
    issues.add(loc + ("image",), f"image {short(container.image, 60)} is not built in (built-ins: "
                                 f"{', '.join(BUILTIN_IMAGES)}): give command: [...] to run a program from this machine")
    return None


# ---------------------------------------------------------------------------- the kinds


def read_pod(obj: Any, loc: Loc, issues: Issues, *, image_args: ImageArgs) -> Parsed | None:
    model = validate(_PodIn, obj, loc, issues)
    if model is None:
        return None
    labels = dict(model.metadata.labels or {})
    ok = check_meta(model.metadata, loc + ("metadata",), issues)
    template = _check_pod_spec(model.spec, loc + ("spec",), labels, issues, image_args)
    if not ok or template is None:
        return None
    manifest = normalized_manifest(model)
    manifest["metadata"].setdefault("namespace", "default")
    _fill_pod_spec_defaults(manifest["spec"])
    return Parsed(model.api_version, model.kind, loc, manifest, model.metadata.name,
                  model.metadata.namespace or "default", labels, template=template)


def read_deployment(obj: Any, loc: Loc, issues: Issues, *, image_args: ImageArgs) -> Parsed | None:
    model = validate(_DeploymentIn, obj, loc, issues)
    if model is None:
        return None
    spec, sloc = model.spec, loc + ("spec",)
    ok = check_meta(model.metadata, loc + ("metadata",), issues, DEPLOYMENT_NAME_MAX)
    replicas = spec.replicas if spec.replicas is not None else 1
    if replicas < 0:
        issues.add(sloc + ("replicas",), f"replicas {show(replicas)} must be 0 or more")
        ok = False
    template_labels = dict(spec.template.metadata.labels or {})
    ok = check_labels(template_labels, sloc + ("template", "metadata", "labels"), issues) and ok
    ok = _check_selector(spec.selector.match_labels, template_labels, sloc, issues) and ok
    template = _check_pod_spec(spec.template.spec, sloc + ("template", "spec"), template_labels, issues,
                               image_args)
    if not ok or template is None:
        return None
    manifest = normalized_manifest(model)
    manifest["metadata"].setdefault("namespace", "default")
    manifest["spec"]["replicas"] = replicas
    _fill_pod_spec_defaults(manifest["spec"]["template"]["spec"])
    return Parsed(model.api_version, model.kind, loc, manifest, model.metadata.name,
                  model.metadata.namespace or "default", dict(model.metadata.labels or {}),
                  template=template, replicas=replicas)


def _check_selector(match_labels: dict[str, str], template_labels: dict[str, str], loc: Loc,
                    issues: Issues) -> bool:
    """A Deployment owns the pods its selector matches, so the selector must match its own template."""
    sel = loc + ("selector", "matchLabels")
    if not match_labels:
        issues.add(sel, "matchLabels is empty: a Deployment selects its pods by labels, e.g. matchLabels: {app: web}")
        return False
    if not check_labels(match_labels, sel, issues):
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
