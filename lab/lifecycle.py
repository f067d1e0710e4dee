"""`lab up`, `lab down` and `lab clean`: a lab's whole life, with nothing left behind at any exit.

`lab up` marks the lab as building (with its own pid) before touching the kernel, so a crash at any point
leaves something `lab clean` recognises as dead and removes, by the lab's namespace prefix.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from apiserver import state
from apiserver.desired import remember_spec, resolve_spec
from apiserver.spec import load_spec
from cilium import agent
from lab import apply, plan
from reconcile.resync import mark_in_step
from services import addons, kube_proxy
from topo import crash, kernel, names, netns
from topo.errors import FeatureMissing, StateError
from topo.model import Lab


@dataclass
class UpResult:
    lab: Lab
    state: state.LabState
    seconds: float
    cleaned_leftovers: bool
    bgp_seconds: float | None = None  # from the last BGP speaker started to every route installed


def up(spec: str | None, keep_on_failure: bool = False) -> UpResult:
    started = time.monotonic()
    lab = load_spec(resolve_spec(spec))
    lab = addons.with_addons(lab, state.lab_dir(lab.name))
    kernel.require_root()
    require_kernel_features(lab)
    state.prepare_run_dir()
    crash.point("up-run-dir")
    with state.locked(lab.name):
        existing = state.load(lab.name)
        if state.is_live(existing):
            raise StateError(f"lab {lab.name} is already up: 'lab down {lab.name}' first")
        leftovers = bool(apply.lab_namespaces(lab.name)) or existing is not None
        if leftovers:  # a crashed or kept run of this same lab: ours by name, and not running
            apply.teardown(lab.name)
            state.remove(lab.name)
        st = state.LabState(name=lab.name, phase="building", pid=os.getpid(), spec_file=lab.source,
                            spec_text=lab.text, exercise=lab.exercise)
        state.save(st)
        try:
            bgp_seconds = apply.apply(plan.build(lab, state.ipam_dir(lab.name)), st)
            st.phase = "up"
            state.save(st)
            mark_in_step(st)  # every layer was built from this desired state: the next change may be a delta
            remember_spec(st)  # later commands read the validated model instead of validating the spec again
        except BaseException:
            if keep_on_failure:
                st.phase = "failed"
                state.save(st)
            else:
                apply.teardown(lab.name)
                state.remove(lab.name)
            raise
    return UpResult(lab, st, time.monotonic() - started, leftovers, bgp_seconds)


def require_kernel_features(lab: Lab) -> None:
    """What a spec asks of the kernel, checked (by probing, see topo/kernel.py) before anything is built.
    Every missing feature is named, one line each."""
    lines = []
    ipvs = kube_proxy.missing_features(lab)
    if ipvs:
        lines.append(kernel.refusal("kubeProxy.mode ipvs", ipvs, "kubeProxy.mode nftables"))
    if lab.network.backend == "ipip" and kernel.missing(kernel.IPIP):
        lines.append(kernel.refusal("network.backend ipip (Calico IP-in-IP, tunl0)", [kernel.IPIP],
                                    "backend bgp (no encapsulation) or vxlan"))
    impaired = ([("spec.underlay.link", lab.underlay.link)] +
                [(f"spec.nodes[{n.index}].link", n.link) for n in lab.nodes])
    where = [loc for loc, link in impaired if link.impaired]
    if where and kernel.missing(kernel.NETEM):
        lines.append(kernel.refusal(f"link delay, jitter and loss ({where[0]})", [kernel.NETEM],
                                    "bandwidth without them"))
    if lines:
        raise FeatureMissing("\n".join(lines))
    kube_proxy.require_tools(lab)
    if lab.cni.profile == "cilium":
        agent.require()


def down(name: str | None) -> tuple[str, float, str | None]:
    """Take a lab apart: a running one, one kept after a failed build, or one whose state is lost or damaged
    (then by what the kernel holds under its prefix, which is how everything of a lab is found anyway).
    Returns the lab's name, the seconds it took and, when the state could not be used, a note saying so."""
    started = time.monotonic()
    kernel.require_root()
    if name is None:
        name = state.resolve(None, any_phase=True).name
    state.check_name(name)
    with state.locked(name):
        note = None
        try:
            st = state.load(name)
        except StateError as exc:
            why = f" ({type(exc.__cause__).__name__})" if exc.__cause__ is not None else ""
            st, note = None, f"state of lab {name} is unreadable{why}: removed what the kernel holds of it instead"
        if st is None and note is None:
            if not apply.lab_namespaces(name) and not state.lab_dir(name).exists():
                running = ", ".join(state.live_labs()) or "none"
                state.remove(name)  # nothing of it but the lock this command took (and the run folder it made)
                raise StateError(f"lab {name} is not running (running: {running})")
            note = f"lab {name} had no state: removed what the kernel holds of it"
        apply.teardown(name)
        state.remove(name)
    return name, time.monotonic() - started, note


def clean(everything: bool = False) -> list[str]:
    """Remove what crashed or half-built labs left; with `everything`, running labs too.

    Found by prefix (namespace names, state folders), never by guessing at process names. A lab whose lock
    is held is in use (being built or changed right now) and is never mistaken for a crash.
    """
    kernel.require_root()
    removed = []
    labs = {names.lab_of_netns(ns) for ns in netns.list_names(names.NETNS_PREFIX)}
    labs |= set(state.known_labs())
    labs |= agent.leftover_labs()  # the cilium profile's pins and cgroups
    labs.discard(None)
    for lab in sorted(labs):  # type: ignore[type-var]
        with state.try_locked(lab) as mine:
            if not mine:
                continue
            try:
                live = state.is_live(state.load(lab))
            except StateError:
                live = False  # unreadable state: a leftover like any other
            if live and not everything:
                continue
            apply.teardown(lab)
            state.remove(lab)
            removed.append(lab)
    state.release_run_dir()  # also after a crash that left only a lock (or the run folder's tmpfs) behind
    return removed
