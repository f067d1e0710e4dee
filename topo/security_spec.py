"""A container's securityContext: the user it runs as and its capabilities, as Kubernetes defines them.

A lab's containers are processes of this machine, in its own file system (only /etc/resolv.conf, /etc/hosts
and /sys are the pod's): a container running as root could change any file of the host. So a container of a
spec runs as an unprivileged user (`UNPRIVILEGED_UID`, nobody) with no capabilities unless it asks, like the
Pod Security Standards' "restricted" profile; root must be asked for explicitly (`runAsUser: 0`), and
`root_warning` says which containers do.

Kubernetes' rules, followed here:
- `runAsUser`/`runAsGroup`/`runAsNonRoot` may be set for the pod (`spec.securityContext`) and for each
  container; the container's own value wins.
- `runAsNonRoot: true` with user 0 is refused (kubelet refuses to start such a container: "container's
  runAsUser breaks non-root policy"); here validation says so, before anything starts.
- `capabilities.drop` is applied to the runtime's default set, then `capabilities.add` (so `drop: [ALL],
  add: [NET_BIND_SERVICE]` leaves just that one); names are written without the CAP_ prefix, ALL stands for
  every capability. The default set is containerd's (`RUNTIME_DEFAULT_CAPABILITIES`).
- One difference: a non-root process on a real cluster gets an added capability only through file
  capabilities of its binary, which a lab has no image for; here the capabilities a non-root container
  adds are raised as ambient capabilities, so `add: [NET_BIND_SERVICE]` lets agnhost bind port 80.
"""
from __future__ import annotations

import re

from pydantic import Field

from topo.model import UNPRIVILEGED_GID, UNPRIVILEGED_UID, Lab, SecurityContext
from topo.schema import Issues, Loc, StrictModel, field_path, short

ID_MAX = 2**31 - 1  # Kubernetes' user and group ids are non-negative int32

# Every Linux capability, as Kubernetes names them (without CAP_).
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
)
# What containerd gives a container that asks for nothing (its default OCI spec).
RUNTIME_DEFAULT_CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP", "SETPCAP",
    "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
)
_CAP_NAME = re.compile(r"(CAP_)?[A-Z_]{1,32}", re.ASCII)  # matched in full


class CapabilitiesIn(StrictModel):
    add: list[str] | None = None
    drop: list[str] | None = None


class PodSecurityContextIn(StrictModel):
    """The pod-level part a lab runs: the user and group of every container (each may override them)."""

    run_as_user: int | None = Field(None, alias="runAsUser")
    run_as_group: int | None = Field(None, alias="runAsGroup")
    run_as_non_root: bool | None = Field(None, alias="runAsNonRoot")


class SecurityContextIn(PodSecurityContextIn):
    capabilities: CapabilitiesIn | None = None
    allow_privilege_escalation: bool | None = Field(None, alias="allowPrivilegeEscalation")


def check_security(pod: PodSecurityContextIn | None, container: SecurityContextIn | None, pod_loc: Loc, loc: Loc,
                   issues: Issues) -> SecurityContext | None:
    """The container's SecurityContext from the pod's and its own (`pod_loc`, `loc`: where each is written)."""
    before = len(issues)
    own = container or SecurityContextIn()
    values: dict[str, tuple[object, Loc]] = {}
    for key, alias in (("run_as_user", "runAsUser"), ("run_as_group", "runAsGroup"),
                       ("run_as_non_root", "runAsNonRoot")):
        if getattr(own, key) is not None:
            values[key] = (getattr(own, key), loc + (alias,))
        elif pod is not None and getattr(pod, key) is not None:
            values[key] = (getattr(pod, key), pod_loc + (alias,))
    for key in ("run_as_user", "run_as_group"):
        if key in values and not 0 <= values[key][0] <= ID_MAX:  # type: ignore[operator]
            issues.add(values[key][1], f"{short(str(values[key][0]), 30)} is not a user or group id: use 0..{ID_MAX}")
    user = values.get("run_as_user", (UNPRIVILEGED_UID, loc))[0]
    non_root = values.get("run_as_non_root", (False, loc))
    if non_root[0] and user == 0:
        issues.add(values["run_as_user"][1], f"runAsUser 0 is root, but runAsNonRoot is true (at "
                                             f"{field_path(non_root[1])}): Kubernetes refuses to start it (container's "
                                             "runAsUser breaks non-root policy); remove one of them")
    add, drop = _capabilities(own.capabilities, loc + ("capabilities",), issues)
    if len(issues) > before:
        return None
    bounding = () if "ALL" in drop else tuple(c for c in RUNTIME_DEFAULT_CAPABILITIES if c not in drop)
    bounding = CAPABILITIES if "ALL" in add else tuple(c for c in CAPABILITIES if c in bounding or c in add)
    ambient = () if user == 0 else tuple(c for c in CAPABILITIES if c in add or "ALL" in add)
    group = values.get("run_as_group", (UNPRIVILEGED_GID if user != 0 else 0, loc))[0]
    return SecurityContext(run_as_user=int(user), run_as_group=int(group),  # type: ignore[call-overload]
                           capabilities=bounding, ambient=ambient,
                           no_new_privs=own.allow_privilege_escalation is False)


def _capabilities(caps: CapabilitiesIn | None, loc: Loc, issues: Issues) -> tuple[set[str], set[str]]:
    found: dict[str, set[str]] = {"add": set(), "drop": set()}
    for key in ("add", "drop"):
        for index, name in enumerate((getattr(caps, key) or []) if caps is not None else []):
            problem = capability_problem(name)
            if problem:
                issues.add(loc + (key, index), problem)
            else:
                found[key].add(name.removeprefix("CAP_"))
    return found["add"], found["drop"]


def capability_problem(name: str) -> str | None:
    if name == "ALL":
        return None
    if _CAP_NAME.fullmatch(name) and name.removeprefix("CAP_") in CAPABILITIES:
        return None
    upper = name.upper().removeprefix("CAP_") if name.isascii() else ""
    hint = f": write {upper}" if upper in CAPABILITIES else ": write one like NET_BIND_SERVICE or NET_RAW, or ALL"
    return f"{short(repr(name), 40)} is not a Linux capability as Kubernetes names them{hint}"


def root_warning(lab: Lab) -> str | None:
    """One line naming the containers of `lab` that run as root on this machine (None: no container does).
    Printed by `lab validate` and `lab up`: root in a lab's container is root of the host."""
    root = [f"{pod.key}/{c.name}" for pod in lab.pods for c in pod.containers if c.security is not None and c.security.root]
    if not root:
        return None
    shown = ", ".join(root[:10]) + (f" and {len(root) - 10} more" if len(root) > 10 else "")
    many = len(root) > 1
    return (f"warning: {len(root)} container{'s' if many else ''} of this spec run{'' if many else 's'} as root on this "
            f"machine, in its own file system (securityContext runAsUser: 0): {shown}")
