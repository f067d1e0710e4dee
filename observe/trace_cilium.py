"""`lab trace` in a cilium lab: which eBPF program translated the probe, and the map entries it used.

With the cilium profile there is no kube-proxy rule to name: a pod's connect()/sendmsg() to a ClusterIP is
rewritten by the socket-LB programs of the node's cgroup before any packet exists (so the pod's eth0 only
ever shows the backend), a NodePort request from outside by `cil_from_netdev` on the node's eth0, and the
tunnel endpoint of a remote PodCIDR comes from `cilium_tunnel_map`. Everything said here is read from the
node's pinned maps (observe/cilium.py), never predicted:

- **Socket LB**: the probe's socket cookie (SO_COOKIE) is the key under which the connect4/sendmsg4 program
  filed its reverse NAT (`cilium_lb4_reverse_sk`: cookie, backend -> frontend), so the entry names the
  frontend and the backend picked; the backend's id (`cilium_lb4_backends_v3`) and the slot naming it
  (`cilium_lb4_services_v2`) follow. The maps are read while the probe's socket is still open.
- **Refused**: a connect() the program refused (EPERM, no packet at all) is explained from the frontend's
  slots: slot 0's backend count against the slots and backends the map really holds.
- **NodePort**: the `cilium_ct4_global` entries the request created (read before the probe's RST removes
  them): the backend and the SNAT address of the OUT entry.
- **Tunnel**: the `cilium_tunnel_map` entry for the inner destination's PodCIDR (what `cil_to_overlay` set as
  the tunnel's remote).
- **Drops**: no netfilter rule drops anything here, so a NetworkPolicy drop moves no rule counter. The
  programs report it themselves in each node's `cilium_events` ring (a policy verdict and a drop, with the
  deciding policy): the rings are opened before the probe and read after it with `lab observe`'s own reader
  and decoder (observe/flows_cilium.py), and the events carrying one of the probe's tuples name the drop.
  A ring a running `lab observe` holds is read alongside it without consuming (that observer loses nothing).
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from apiserver import state
from cilium import agent, events, maps
from observe import cilium as debug
from observe import flows, flows_cilium
from observe.capture import Probe, Sighting
from observe.flow import DROPPED, TYPE_DROP, TYPE_POLICY, Flow
from observe.hops import Hop
from observe.packets import Packet
from observe.places import MAX_NODES, Lookup, Place, Target
from topo.errors import StateError

PROGRAM = {"connect4": "cil_sock4_connect", "sendmsg4": "cil_sock4_sendmsg"}
REVERSE = {"tcp": ("getpeername4", "cil_sock4_getpeername"), "udp": ("recvmsg4", "cil_sock4_recvmsg")}


def _socket_node(lookup: Lookup, source: Place) -> str | None:
    """The node whose cgroup holds the source's processes (a pod's node, or the node itself)."""
    return source.node if source.kind == "pod" else source.name if source.kind == "node" else None


@dataclass
class NodeMaps:
    """One node's service state as the kernel held it while the probe's socket was open."""

    slots: dict[maps.Frontend, dict[int, tuple[int, int, int, int]]]  # frontend -> slot -> (id, count, rev, flags)
    backends: dict[int, maps.Backend]
    reverse_sk: list[tuple[maps.Backend, maps.Frontend, int]]  # the probe socket's entries: backend, frontend, revNAT
    ct: list[dict[str, Any]] = field(default_factory=list)


class CiliumTrace:
    """What the cilium programs did with one probe, read from the maps (see the module's docstring)."""

    def __init__(self, lookup: Lookup, source: Place, target: Target) -> None:
        self.lookup, self.source, self.target = lookup, source, target
        self.lab = lookup.st.name
        self.node = _socket_node(lookup, source)
        self.nodes: dict[str, NodeMaps] = {}
        self.rings: list[flows_cilium.RingSource] = []  # open from before the probe until collect()
        self.events: list[Flow] = []  # policy verdicts and drops the programs reported during the trace
        self.lost: dict[str, int] = {}  # node -> events its ring could not queue during the trace

    def socket_lb(self) -> bool:
        """The source's sockets go through a node's socket LB (a pod or node of the lab)."""
        return self.node is not None and agent.cgroup(self.lab, self.node).is_dir()

    def spawn(self) -> Any:
        assert self.node is not None
        return agent.spawning_in(self.lab, self.node)

    # ---- reading (while the probe's socket is open) -------------------------------------------

    def read(self, probe: Probe) -> None:
        """The maps that can explain this probe, read before its socket closes: the source node's service
        maps and its socket's reverse_sk entries (socket LB), or the CT entries of the node a NodePort
        request went to (every node, up to MAX_NODES, for an address that is no node's)."""
        lb = self.socket_lb()
        if lb:
            wanted = {self.node}
        elif self.target.kind == "node":
            wanted = {self.target.name}
        else:
            wanted = {n.name for n in self.lookup.lab.nodes[:MAX_NODES]}
        for node in self.lookup.lab.nodes:
            if node.name not in wanted or not agent.pins(self.lab, node.name).is_dir():
                continue
            try:
                slots, backends = debug._services(self.lab, node.name) if lb else ({}, {})
                mine = []
                if lb and probe.cookie:
                    for key, value in debug._dump(self.lab, node.name, maps.REVERSE_SK).items():
                        cookie, addr, port = maps.REVERSE_SK_KEY.unpack(key)
                        if cookie == probe.cookie:
                            fa, fp, rev = maps.REVERSE_SK_VALUE.unpack(value)
                            proto = maps.PROTOCOLS.get(probe.protocol, 0)
                            mine.append((maps.Backend(IPv4Address(addr), maps.port_of(port), proto),
                                         maps.Frontend(IPv4Address(fa), maps.port_of(fp), proto), rev))
                ct = [] if lb else debug.ct_list(self.lab, node.name)
            except (OSError, StateError):  # a map gone mid-trace: nothing to say rather than a guess
                continue
            self.nodes[node.name] = NodeMaps(slots, backends, mine, ct)

    # ---- the socket LB -----------------------------------------------------------------------------

    def _frontend(self) -> maps.Frontend | None:
        if self.target.port is None or self.target.protocol not in maps.PROTOCOLS:
            return None
        return maps.Frontend(self.target.ip, self.target.port, maps.PROTOCOLS[self.target.protocol])

    def rewrite(self, probe: Probe) -> Hop | None:
        """The socket-LB hop at the source: which program at which hook turned the frontend into which
        backend (slot and id), from the reverse_sk entry filed under the probe's socket cookie."""
        if not self.socket_lb() or self.node not in self.nodes:
            return None
        held = self.nodes[self.node]
        fe = self._frontend()
        group = agent.cgroup(self.lab, self.node)
        program = PROGRAM.get(probe.hook, "cil_sock4_connect")
        where = f"{program} (cgroup/{probe.hook} on {group})"
        call = "connect" if probe.hook == "connect4" else "sendto"
        entry = next(((b, f, r) for b, f, r in held.reverse_sk if fe is None or f == fe), None)
        if entry is None:
            if fe is not None and fe in held.slots:
                return None  # refused: the verdict says why
            what = f"{fe} is no frontend in {self.node}'s {maps.SERVICES}" if fe else "no service port"
            return Hop(self.source.name, "socket-lb", f"{where}: {what}, so {call}() went out as given",
                       detail={"program": program, "hook": probe.hook, "rewritten": False})
        backend, frontend, rev = entry
        ids = [i for i, b in held.backends.items() if b == backend]
        slots = held.slots.get(frontend, {})
        count = slots.get(0, (0, 0, 0, 0))[1]
        picked = sorted(n for n, v in slots.items() if n > 0 and v[0] in ids)
        slot_text = f"slot {picked[0]} of {count}" if picked else f"no slot of {count} names it now"
        text = (f"socket LB: {where} rewrote {call}({frontend.address}:{frontend.port}) to "
                f"{backend.address}:{backend.port} before any packet existed: {maps.SERVICES}[{frontend}] "
                f"{slot_text} -> backend id {ids[0] if ids else '?'} ({maps.BACKENDS}); "
                f"{maps.REVERSE_SK}[cookie {probe.cookie}, {backend.address}:{backend.port}] = "
                f"{frontend.address}:{frontend.port} (revNAT {rev})")
        return Hop(self.source.name, "socket-lb", text, detail={
            "program": program, "hook": probe.hook, "cgroup": str(group), "rewritten": True,
            "frontend": f"{frontend.address}:{frontend.port}", "backend": f"{backend.address}:{backend.port}",
            "backend_id": ids[0] if ids else None, "slot": picked[0] if picked else None, "count": count,
            "revnat": rev, "cookie": probe.cookie, "node": self.node})

    def reverse(self, probe: Probe) -> Hop | None:
        """At the source, after the answer: what the application saw as its peer (getpeername4/recvmsg4
        translated the backend back to the frontend)."""
        if not self.socket_lb() or not probe.peer:
            return None
        hook, program = REVERSE.get(probe.protocol, ("", ""))
        return Hop(self.source.name, "socket-lb", f"the application sees {probe.peer} as its peer: {program} "
                                                  f"(cgroup/{hook}) restores it from {maps.REVERSE_SK}",
                   detail={"program": program, "hook": hook, "peer": probe.peer})

    def holes(self) -> str:
        """Slots of the frontend that name nothing (a slot deleted from the map, a backend gone): a connect
        that picks one is refused. Empty when the frontend is whole."""
        fe = self._frontend()
        held = self.nodes.get(self.node or "")
        if fe is None or held is None or fe not in held.slots:
            return ""
        slots = held.slots[fe]
        count = slots.get(0, (0, 0, 0, 0))[1]
        missing = [n for n in range(1, count + 1) if n not in slots]
        dangling = [(n, slots[n][0]) for n in range(1, count + 1) if n in slots and slots[n][0] not in held.backends]
        parts = []
        if missing:
            parts.append(f"slot{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {count} "
                         f"{'are' if len(missing) > 1 else 'is'} missing from {self.node}'s {maps.SERVICES}")
        if dangling:
            parts.append(", ".join(f"slot {n} names backend id {i}, which {maps.BACKENDS} does not hold"
                                   for n, i in dangling))
        if not parts:
            return ""
        return (f"frontend {fe} has {count} backend{'s' if count != 1 else ''} in slot 0, but "
                + "; ".join(parts) + f" (`lab cilium {self.node} service list`)")

    def refusal(self, probe: Probe) -> str:
        """Why the socket LB refused the probe's connect()/sendto() before any packet existed."""
        if not self.socket_lb() or probe.refused_errno != errno.EPERM:
            return ""
        fe = self._frontend()
        program = PROGRAM.get(probe.hook, "cil_sock4_connect")
        held = self.nodes.get(self.node or "")
        head = (f"the socket LB refused {'connect' if probe.hook == 'connect4' else 'sendto'}() "
                f"({os.strerror(errno.EPERM)}, no packet was sent): {program} (cgroup/{probe.hook}) on {self.node}")
        if fe is None or held is None or fe not in held.slots:
            return head
        count = held.slots[fe].get(0, (0, 0, 0, 0))[1]
        if count == 0:
            return f"{head}: frontend {fe} has no backends (slot 0 says 0)"
        why = self.holes() or f"frontend {fe}'s slots look whole now (a backend removed and put back since?)"
        return (f"{head} picked a slot at random in 1..{count} and found no backend there, so it refused "
                f"the call as Cilium does: {why}")

    def refused_hop(self, probe: Probe) -> Hop | None:
        if not self.refusal(probe):
            return None
        program = PROGRAM.get(probe.hook, "cil_sock4_connect")
        fe = self._frontend()
        call = "connect" if probe.hook == "connect4" else "sendto"
        return Hop(self.source.name, "socket-lb", f"socket LB: {program} (cgroup/{probe.hook} on "
                                                  f"{agent.cgroup(self.lab, self.node or '')}) refused {call}({fe}): "
                                                  f"{os.strerror(errno.EPERM)}",
                   detail={"program": program, "hook": probe.hook, "rewritten": False, "refused": True,
                           "frontend": f"{fe.address}:{fe.port}" if fe else None, "node": self.node})

    # ---- NodePort and the tunnel ---------------------------------------------------------------

    def nodeport(self, place: Place, before: Packet, reply: bool, dev: str) -> str:
        """The tc program that translated a packet entering a node by `dev`, with its cilium_ct4_global
        entry: cil_from_container on a pod's lxc veth, cil_from_netdev on eth0 ("" for a reply no IN
        entry explains)."""
        held = self.nodes.get(place.name)
        if reply:
            program = f"cil_from_container (tc ingress on {dev}, the backend's lxc veth)" \
                if dev.startswith("lxc") else f"cil_from_netdev (tc ingress on {dev or 'eth0'})"
            entry = None
            if held is not None:
                entry = next((r for r in held.ct if r["direction"] == "IN" and
                              r["tuple"] == f"{before.src}:{before.sport} -> {before.dst}:{before.dport}"), None)
            if entry is None:
                return ""  # not a NodePort reply (conntrack undoing the masquerade), or its entry is gone
            return (f"{program} reverses the NodePort translation: {maps.CT} IN {entry['tuple']} "
                    f"Frontend={entry['nat']} Client={entry['snat']}")
        entry = None
        if held is not None:
            entry = next((r for r in held.ct if r["direction"] == "OUT" and
                          r["tuple"] == f"{before.src}:{before.sport} -> {before.dst}:{before.dport}"), None)
        text = "cil_from_netdev (tc ingress on eth0)"
        if entry is not None:
            text += (f": {maps.CT} OUT {entry['tuple']} BackendAddr={entry['nat']}"
                     + (f" SNAT={entry['snat']}" if entry["snat"] else " (client address kept: Local)")
                     + f" RevNAT={entry['revnat']}")
        else:
            text += f" (no {maps.CT} entry was left to read: the connection closed first)"
        return text

    def tunnel(self, place: Place, inner_dst: str) -> str:
        """The cilium_tunnel_map entry for the inner destination's PodCIDR (what cil_to_overlay used)."""
        if place.kind != "node":
            return ""
        try:
            rows = debug.tunnel_list(self.lab, place.name)
        except (OSError, StateError):  # a map gone mid-trace: say nothing rather than guess
            return ""
        mask = self.lookup.lab.nodes[0].pod_cidr.prefixlen
        for row in rows:
            prefix = row["tunnel"].split(":")[0]
            if IPv4Address(inner_dst) in IPv4Network(f"{prefix}/{mask}"):
                return (f"cil_to_overlay (tc egress on {agent.VXLAN_DEVICE}) set the tunnel's remote from "
                        f"{maps.TUNNEL}[{prefix}] = {row['value'].split(':')[0]}")
        return f"cil_to_overlay found no {maps.TUNNEL} entry for {inner_dst}"

    # ---- drops, as the programs report them (cilium_events) ------------------------------------------

    def listen(self, nodes: list[str]) -> None:
        """Open the `cilium_events` ring of each of `nodes` before the probe leaves: only what comes after
        is read (the reader starts at the ring's head), and opening it frees a ring nobody read."""
        names = flows.names_of(self.lookup.st, self.lookup.lab)
        ids = flows_cilium.policy_names(state.lab_dir(self.lab))
        for node in nodes:
            folder = agent.pins(self.lab, node)
            if not (folder / events.EVENTS).exists():
                continue
            try:
                ring = flows_cilium.RingSource(node, folder, state.RUN_DIR / self.lab, names, {}, share=True)
            except Exception:  # noqa: BLE001 - a ring that cannot be read leaves the drop unexplained, as before
                continue
            ring.policy_names = ids
            self.rings.append(ring)

    def collect(self) -> None:
        """After the probe: the policy verdicts and drops the programs reported (one bounded drain per
        ring), then every ring closed."""
        try:
            for ring in self.rings:
                self.events += [f for f in ring.read() if f.type in (TYPE_POLICY, TYPE_DROP)]
                if ring.lost:
                    self.lost[ring.node] = ring.lost
        finally:
            self.close()

    def close(self) -> None:
        for ring in self.rings:
            ring.close()
        self.rings = []

    def _mine(self, forward: list[Sighting]) -> list[Flow]:
        """The events about the probe's own packets: those carrying a tuple it was seen with (after the
        socket LB's or a NodePort's translation too). ICMP events carry no ports, as the probe's echo."""
        forms = {(flows.PROTOCOLS[s.eff.proto], s.eff.src, s.eff.sport or 0, s.eff.dst, s.eff.dport or 0)
                 for s in forward if s.eff.proto in flows.PROTOCOLS}
        return [f for f in self.events
                if (f.protocol, f.source.ip, f.source_port, f.destination.ip, f.destination_port) in forms]

    def drop_reason(self, forward: list[Sighting]) -> str:
        """Why the probe went no further, as the program that dropped it reported it ("" when none did).

        Worded as `hubble observe` shows the two events (`policy-verdict:none INGRESS DENIED`, then the drop
        reason in Cilium's words, `Policy denied`, and the policy named `by`); the program is the lxc one
        judging that direction: `cil_to_container` (tc egress on the pod's lxc veth) for its ingress
        policy, `cil_from_container` (tc ingress) for its egress policy."""
        mine = [f for f in self._mine(forward) if f.verdict == DROPPED]
        drop = next((f for f in mine if f.type == TYPE_DROP), None)
        denied = next((f for f in mine if f.type == TYPE_POLICY), None)
        first = drop or denied
        if first is None:
            return ""
        reason = first.drop_reason_desc or "dropped"
        direction = (denied or first).traffic_direction
        by = ", ".join(first.policies or (denied.policies if denied else ()))
        where = first.node_name
        if direction not in ("INGRESS", "EGRESS"):  # not a policy verdict: the datapath's own drop
            return f"dropped by the eBPF datapath in {where}: {reason} ({where}'s {events.EVENTS})"
        ingress = direction == "INGRESS"
        endpoint = first.destination if ingress else first.source
        who = endpoint.label()
        pod = self.lookup.pods.get(f"{endpoint.namespace}/{endpoint.pod_name}")
        veth = self.lookup.veth_of.get(pod.netns, "") if pod is not None else ""
        program = "cil_to_container" if ingress else "cil_from_container"
        hook = f"tc {'egress' if ingress else 'ingress'} on {veth or 'the lxc veth'}, {who}'s lxc veth"
        verdict_text = f"policy-verdict:none {direction} DENIED" if denied is not None else f"{direction} DROPPED"
        text = f"dropped by {program} ({hook}) in {where}: {reason}, {verdict_text}"
        if by:
            text += (f" by {by} (the first of the NetworkPolicies isolating {who} for {direction.lower()}: "
                     "none of their rules admits it)")
        return text + f"; reported in {where}'s {events.EVENTS}, as `lab observe` shows it"

    def events_lost(self) -> str:
        """Rings that could not queue every event during the trace: a drop event may be among those."""
        if not self.lost:
            return ""
        return ", ".join(f"{events.EVENTS} on {node} lost {n} event{'s' if n != 1 else ''}"
                         for node, n in sorted(self.lost.items()))
