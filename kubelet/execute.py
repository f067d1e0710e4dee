"""`lab exec`: become a process inside a node or a pod, like `kubectl exec` or `docker exec`.

The calling process enters the target's namespaces and then replaces itself with the command, so a
shell gets the terminal directly and the exit code is the command's own.
"""
from __future__ import annotations

import os
import shutil

from apiserver import state
from apiserver.desired import model_of
from cilium import agent
from kubelet import runtime
from topo import names, netns
from topo.errors import CommandNotRun, StateError


def find_target(st: state.LabState, target: str) -> tuple[str, int | None]:
    """(network namespace, pause pid or None for a node) of a node name, `ns/pod` or a unique pod name."""
    lab = model_of(st)
    if "/" in target:
        pod = st.pods.get(target)
        if pod is None:
            raise StateError(f"no pod {names.shown(target)} in lab {st.name}")
        return pod.netns, pod.pause_pid
    if any(n.name == target for n in lab.nodes) or target in lab.routers or \
            any(e.name == target for e in lab.external):
        return lab.node_netns(target), None
    matches = [key for key in st.pods if key.split("/", 1)[1] == target]
    if len(matches) > 1:
        raise StateError(f"pod name {names.shown(target)} is in several namespaces ({', '.join(sorted(matches))}): "
                         "give it as NAMESPACE/NAME")
    if not matches:
        known = ", ".join([n.name for n in lab.nodes] + lab.routers + [e.name for e in lab.external] +
                          sorted(k.split("/", 1)[1] for k in st.pods))
        raise StateError(f"no node, router or pod named {names.shown(target)} in lab {st.name} (known: {known})")
    pod = st.pods[matches[0]]
    return pod.netns, pod.pause_pid


def _show_frr_as_default(lab: str, host: str) -> None:
    """Make plain `vtysh` talk to this node's (or router's) own FRR instance.

    Each instance keeps its sockets in the lab's state folder; in a private mount namespace for this
    command only, that folder is bind-mounted over /run/frr, where vtysh looks, as `ip netns exec` does
    for /etc/netns/NAME files.
    """
    folder = state.lab_dir(lab) / "frr" / host
    if folder.is_dir() and os.path.isdir(FRR_RUN):
        netns.bind_mount(str(folder), FRR_RUN)


FRR_RUN = "/run/frr"


def exec_in(lab: str | None, target: str, command: list[str]) -> None:
    st = state.resolve(lab, any_phase=lab is not None)  # a kept failed build can be inspected by name
    ns, pause_pid = find_target(st, target)
    exe = shutil.which(command[0])
    if exe is None:
        raise CommandNotRun(f"command {command[0]!r} not found", 127)
    if pause_pid is not None and not runtime.sandbox_alive(ns, pause_pid):
        raise StateError(f"pod {target} is not running (its pause process {pause_pid} is gone)")
    enter(st.name, target, ns, pause_pid)
    try:
        os.execv(exe, command)
    except OSError as exc:  # not a program (no #! line, another architecture), or a directory
        raise CommandNotRun(f"command {command[0]!r} cannot run: {exc.strerror}", 126) from exc


def enter(lab: str, target: str, ns: str, pause_pid: int | None) -> None:
    """Move this process into a node's or pod's namespaces as `lab exec` does (also run by grading checks
    in a child between fork and exec, so their commands see exactly what a learner's would)."""
    fd = netns.open_fd(ns)
    netns.setns(fd, netns.CLONE_NEWNET)
    os.close(fd)
    # The cilium profile: join the cgroup of the pod's containers (or the node's own), where its socket
    # load balancer is attached, so a command typed in the pod sees services as the pod's processes do.
    if pause_pid is not None:
        agent.join_cgroup_of(pause_pid)
    else:
        agent.join_node(lab, target)  # a node of a cilium lab; nothing for routers and external hosts
    if pause_pid is not None:
        # Join the pod as its containers are joined: its UTS (host name) and mount namespace (its own
        # /etc/resolv.conf, /etc/hosts and /sys).
        for kind, flag in (("uts", netns.CLONE_NEWUTS), ("mnt", netns.CLONE_NEWNS)):
            fd = os.open(f"/proc/{pause_pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
            netns.setns(fd, flag)
            os.close(fd)
        runtime.ensure_sysfs()  # a pod of only the pause image gets its /sys when first entered
    else:
        netns.unshare(netns.CLONE_NEWNS)  # a private mount namespace for this command only
        netns.make_slave("/")
        netns.remount_sys()
        _show_frr_as_default(lab, target)
