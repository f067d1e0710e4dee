"""`lab observe`: the flows a running lab carries, live, Hubble-style (`hubble observe`).

Which sources a profile has (each described in its module):
- flannel, calico: conntrack NEW events per node (FORWARDED, TRANSLATED by kube-proxy's DNAT or SNAT) and,
  in calico, NFLOG from the policy's drop rules (DROPPED with the policies) -- observe/flows_ct.py;
- cilium: the `cilium_events` ringbuf per node, written by the BPF programs themselves -- flows_cilium.py;
- every profile: DNS queries and answers at the cluster DNS pod -- observe/flows_dns.py.

**History: none, on purpose.** `lab observe` shows flows from the moment it starts: nothing runs between
two observers, so nothing is left to clean after `lab down` or a kill -9, and the dataplane never pays for a
collector nobody reads. `--follow` runs until Ctrl-C; `--last N` stops after N matching flows; `--duration`
bounds the wait; `--since` (hubble's look back) is refused with that reason. Everything this opens is a
socket, an mmap or a lock of this process: when it ends, by Ctrl-C or kill -9, the kernel takes all of it
back (NFLOG groups unbind with their socket; no program is attached, no rule added by observing).

Bounded: the kernel buffer of each source is its ring (per node); overflow drops events, never packets,
and is reported as EVENTS LOST lines (Hubble's wording) as soon as it is seen and at the end.
"""
from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from apiserver import state
from apiserver.desired import current_lab
from observe import flows, flows_ct
from observe.flow import TYPE_DNS, TYPE_DROP, Flow
from observe.flows import Filters
from services import addons
from topo.errors import StateError

REFRESH = 3.0  # seconds between re-reads of the lab's state (new pods and services get their names)
# Seconds a wake-up waits for more events before reading: under a burst, one read per batch instead of one
# per event leaves the CPU to the traffic being watched (2 cores here); a ring holds far more than a batch.
BATCH = 0.05


@dataclass
class Lost:
    """Events a source's ring dropped since the last report (Hubble's lost_events)."""
    source: str
    count: int


@dataclass
class Observer:
    lab_name: str | None
    filters: Filters = field(default_factory=Filters)
    sources: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profile: str = ""
    name: str = ""

    def open(self) -> None:
        st = state.resolve(self.lab_name)
        lab = current_lab(st)
        self.name, self.profile = st.name, lab.cni.profile
        self._st, self.names = st, flows.names_of(st, lab)
        self._refreshed = time.monotonic()
        want = self.filters.type
        nodes = {n.name: lab.node_netns(n.name) for n in lab.nodes}
        try:
            if want != TYPE_DNS:
                if self.profile == "cilium":
                    self._open_rings(st, lab, nodes)
                else:
                    drops = self.profile == "calico"
                    if want == TYPE_DROP and not drops:
                        self.notes.append(f"profile {self.profile} enforces no NetworkPolicy: no drops to show")
                    opened, notes = flows_ct.open_sources(nodes, self.names, drops)
                    self.sources += opened
                    self.notes += notes
            if want in (None, TYPE_DNS):
                self._open_dns(st, lab)
        except BaseException:
            self.close()
            raise
        if not self.sources:
            raise StateError(f"nothing to observe in lab {self.name}: " + ("; ".join(self.notes) or "no sources"))

    def _open_rings(self, st, lab, nodes: dict[str, str]) -> None:
        from cilium import agent
        from observe import flows_cilium
        cookies = flows_cilium.netns_cookies({ps.netns: ps.ip for ps in st.pods.values() if ps.ip})
        self._policy_names = flows_cilium.policy_names(state.lab_dir(self.name))
        for node in nodes:
            folder = agent.pins(self.name, node)
            try:
                ring = flows_cilium.RingSource(node, folder, state.RUN_DIR / self.name, self.names, cookies)
                ring.policy_names = self._policy_names  # shared: a refresh updates every ring
                self.sources.append(ring)
            except OSError as exc:
                self.notes.append(f"{node}: no cilium_events ({exc.strerror or exc})")
            except Exception as exc:  # an older lab without the ring pinned
                self.notes.append(f"{node}: no cilium_events ({exc})")

    def _open_dns(self, st, lab) -> None:
        from observe import flows_dns
        key = f"{addons.DNS_NAMESPACE}/{addons.DNS_POD}"
        ps = st.pods.get(key)
        if ps is None:
            self.notes.append("no cluster DNS pod: no DNS flows")
            return
        try:
            self.sources.append(flows_dns.DnsSource(ps.netns, ps.node, self.names))
        except OSError as exc:
            self.notes.append(f"no DNS flows ({exc.strerror or exc})")

    def describe(self) -> str:
        return ", ".join(s.describe() for s in self.sources)

    def _refresh(self) -> None:
        """New pods and services since the start get their names (the sources share `names`)."""
        if time.monotonic() - self._refreshed < REFRESH:
            return
        self._refreshed = time.monotonic()
        with contextlib.suppress(Exception):
            st = state.resolve(self.name)
            fresh = flows.names_of(st, current_lab(st))
            self.names.update(fresh)
            if self.profile == "cilium":  # policies applied since: their numbers get names
                from observe import flows_cilium
                self._policy_names.clear()
                self._policy_names.update(flows_cilium.policy_names(state.lab_dir(self.name)))

    def events(self, stop: Callable[[], bool] = lambda: False, poll: float = 0.2) -> Iterator[Flow | Lost]:
        """Matching flows as they come, and Lost reports; ends when `stop()` says so."""
        reported = {id(s): 0 for s in self.sources}
        while not stop():
            ready = select.select(self.sources, [], [], poll)[0]
            if ready:  # let a burst gather: one wake-up per batch, not per event (the rings hold it)
                time.sleep(BATCH)
                ready = select.select(self.sources, [], [], 0)[0]
            for source in ready:
                for flow in source.read():
                    if self.filters.match(flow):
                        yield flow
            for source in self.sources:
                if source.lost > reported[id(source)]:
                    yield Lost(source.describe(), source.lost - reported[id(source)])
                    reported[id(source)] = source.lost
            self._refresh()

    def close(self) -> None:
        for source in self.sources:
            source.close()
        self.sources = []


def run(observer: Observer, emit: Callable[[Flow | Lost], None], follow: bool, last: int | None,
        duration: float | None, ready: Callable[[str], None] = lambda _s: None) -> int:
    """Open, report readiness, emit until Ctrl-C (`follow`), `last` flows or `duration`; always close.
    Returns how many flows were emitted."""
    observer.open()
    count = 0
    deadline = time.monotonic() + duration if duration else None
    try:
        ready(observer.describe())
        for note in observer.notes:
            ready(note)
        stop = (lambda: deadline is not None and time.monotonic() >= deadline)
        for item in observer.events(stop):
            emit(item)
            if isinstance(item, Flow):
                count += 1
                if not follow and last is not None and count >= last:
                    break
    finally:
        observer.close()
    return count

