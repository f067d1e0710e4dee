"""`lab trace FROM TO[:PORT]`: send one real packet and report every hop the kernel took with it.

Nothing here predicts a path: the path is what the kernel did, read back from it. This module is the entry
point (`run`); the work is in: observe/places.py (names, cables, what to watch), observe/capture.py (capture
sockets, the probe), observe/packets.py (decoding, VXLAN and IP-in-IP), observe/hops.py (the journey in
order, and its text), observe/netfilter.py (rule counters, DNAT/SNAT, drops), observe/verdict.py.

- **Captures on every interface of the lab's path.** Before the probe leaves, a packet socket (what
  tcpdump uses, AF_PACKET) is opened inside each namespace the packet may cross: the source, every node
  (up to MAX_NODES; beyond that the nodes of the source and destinations) and their pods, every underlay
  switch and router, the destination pods (up to MAX_ENDPOINTS of a service's; MAX_PODS pods in all). A
  socket belongs to the namespace it was created in, so all of them are opened from this process (setns
  in, socket, setns back) and read afterwards. Each carries a classic BPF filter (ICMP, the probe's
  protocol, tunnels carrying them; TCP only with SYN or RST), so busy traffic does not fill its queue;
  reading is bounded in frames and time, and a socket that dropped frames is reported, never taken for
  a drop on the path. A packet seen leaving towards a place nobody watched is said so. The journey is put
  in order from the cables, not from timestamps: a namespace's sightings come in its socket's order, and
  a packet that left by one end of a veth is next seen at the other end. Outer VXLAN and IP-in-IP
  (tunl0, proto 4) headers are decoded, so the inner packet is followed through the tunnel and the
  encapsulation hop is named (outer addresses, VNI or proto 4).
- **Which packets are the probe's.** A token in the payload (ICMP, UDP), the TCP initial sequence
  number (NAT never touches it), and for answers the reverse of a forward form, the token echoed back,
  or an ICMP error quoting a forward form. NAT therefore does not lose the trail: the packet seen before
  and after a node is the same packet, and the difference is the translation.
- **Why the kernel did it.** Between a packet entering and leaving a namespace the kernel routed it:
  `ip route get fibmatch DST from SRC iif DEV` (rtnetlink, in that namespace) names the table entry it
  used. A destination that changed is a DNAT; it is named from the rules (iptables: the packet counters
  of `iptables-save -c` (the lab's backend) before and after the probe give KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP; nft:
  the live `service-ips` map element and the endpoint chain with that `dnat to`, since kube-proxy's nft
  rules carry no counters; IPVS: the virtual server and real server from the node's IPVS table).
  kube-proxy's iptables mode runs on the machine's own iptables backend (iptables-nft on current
  distributions) unless spec.kubeProxy.iptables says legacy, which `nft monitor trace` cannot see;
  counters work for both. A frame sent to the node (its bridge's MAC or address, or DNATed there) is
  routed, though br_netfilter may show it passing from one bridge port to another, never "layer 2"; one
  routed back out of the bridge port it came in by (a pod reaching itself through a Service) is a hairpin.
- **Drops.** The last place the packet was seen, then the reason, in order: an ICMP error on the wire
  (fragmentation needed: MTU; unreachable: no route or a REJECT), a DROP/REJECT rule whose counter moved
  in that namespace (its comment names, e.g., the NetworkPolicy; a NetworkPolicy chain only if it is one
  of the probe's own pods'), no route (`ip route get` fails there), a frame larger than the next link's
  MTU (a switch drops it silently) or, seen leaving by a cable and never at its other end, larger than the
  MTU there (a veth drops it silently: the size as captured, VXLAN's 50 bytes included, against the MTU
  the kernel holds at that end), a next hop that never answered ARP. A drop counter that moved
  elsewhere (other traffic) is only a "possibly", and the route analysis still runs.
- **The cilium profile** (observe/trace_cilium.py). The probe's socket is made in the source node's lab
  cgroup, so the socket-LB programs rewrite it as they rewrite a pod's own; the trace names the program,
  hook, frontend, slot and backend id from the reverse_sk entry of the socket's cookie, NodePort's tc
  programs with their cilium_ct4_global entries, and the cilium_tunnel_map entry at a VXLAN hop; a
  connect() the socket LB refused is explained from the frontend's slots; a drop (a NetworkPolicy's, which moves
  no rule counter here) from the policy verdict and drop events the lxc programs put in the node's
  cilium_events ring, read as `lab observe` reads them, naming the program and the deciding policy.
- **Names.** Pods and hosts are resolved as checks name them (observe/targets.py); `svc/[NS/]NAME` and
  `pod/[NS/]NAME` say which is meant, an address in the service CIDR is its Service, and a bare name that
  is both a Service and a pod or host is refused.

Bounded: the probe waits `timeout` (default 1 s, at most 4 s) and the whole trace takes well under 5 s.
"""
from __future__ import annotations

import time

from apiserver import state
from apiserver.desired import current_lab
from kubelet.pods import running_pods
from observe.capture import Captures, send_probe
from observe.hops import Kernel, Tracer, TraceResult, classify, origin, walk
from observe.netfilter import counters_in, moved_rules
from observe.places import Lookup, places_to_watch
from observe.trace_cilium import CiliumTrace
from observe.verdict import verdict
from services import endpoints, kube_proxy
from topo.errors import StateError

MAX_TIMEOUT = 4.0
GRACE = 0.03  # after the answer arrived: the captures of its last hops are already queued; a little slack


def run(lab_name: str | None, source_text: str, target_text: str, protocol: str | None = None, size: int = 0,
        timeout: float = 1.0) -> TraceResult:
    """Trace one probe from `source_text` to `target_text` in a running lab."""
    started = time.monotonic()
    if not 0 < timeout <= MAX_TIMEOUT:
        raise StateError(f"--timeout must be between 0 and {MAX_TIMEOUT:.0f} seconds")
    if not 0 <= size <= 65000:
        raise StateError("--size must be between 0 and 65000 bytes")
    st = state.resolve(lab_name)
    lab = current_lab(st)
    running = running_pods(st, lab)
    sps = endpoints.resolve(lab.services, running)
    lookup = Lookup(st, lab, running, sps)
    source = lookup.source(source_text)
    target = lookup.target(target_text, protocol)
    if target.kind == "service" and not target.places:
        raise StateError(f"service {target.name} has no endpoints: nothing to reach (kube-proxy rejects it)")
    watch = places_to_watch(lookup, source, target)
    counted = [p.netns for p in watch if p.kind in ("node", "router", "external")]  # where rules live
    before = counters_in(counted)
    ebpf = CiliumTrace(lookup, source, target) if lab.cni.profile == "cilium" else None
    socket_lb = ebpf.spawn if ebpf is not None and ebpf.socket_lb() else None
    captures = Captures(watch, target.protocol)
    try:
        if ebpf is not None:  # the programs' own reports (a policy drop moves no rule counter), from now on
            ebpf.listen([p.name for p in watch if p.kind == "node"])
        probe = send_probe(source, target, size, timeout, socket_lb, ebpf.read if ebpf is not None else None,
                           lab.dns.domain)
        if probe.answered_at is not None:
            time.sleep(GRACE)  # an unanswered probe already waited the whole timeout
        sightings = captures.read()
        if ebpf is not None:
            ebpf.collect()
    finally:
        captures.close()
        if ebpf is not None:
            ebpf.close()
    after = counters_in(counted)
    hits = {ns: moved for ns in counted if (moved := moved_rules(before[ns], after[ns]))}
    kernel = Kernel()
    forward, reply = classify(sightings, probe, source)
    forward = walk(forward, source.netns, lookup.peers)
    start = origin(reply, list(target.places) + [p for p in (lookup.places.get(s.place.netns) for s in forward) if p],
                   lookup.peers)
    reply = walk(reply, start, lookup.peers) if start else []
    tracer = Tracer(lookup, kernel, source, target, probe, hits)
    tracer.cilium = ebpf
    port = f":{target.port}" if target.port else ""
    dest = f"{target.name} ({target.ip}{port}/{target.protocol})" if target.name != str(target.ip) else \
        f"{target.ip}{port}/{target.protocol}"
    result = TraceResult(st.name, source.name, dest, target.protocol, target.port,
                         kube_proxy=kube_proxy.mode_label(lab))
    result.hops = tracer.hops(forward, reply=False)
    result.reply = tracer.hops(reply, reply=True)
    back = ebpf.reverse(probe) if ebpf is not None else None
    if back is not None:
        result.reply.append(back)
    result.watched = sorted(p.name for p in watch)
    result.capture_lost = [f"{name}: {what}" for name, what in captures.lost.items()]
    verdict(result, tracer, forward, reply, kernel, hits, {p.netns for p in watch})
    refused = ebpf.refused_hop(probe) if ebpf is not None and not forward else None
    if refused is not None:  # the socket LB said no at the call: no packet, no route taken
        result.hops.insert(0, refused)
    elif not forward:
        result.hops.insert(0, tracer._route_hop(source, str(target.ip), None, None))
    holes = ebpf.holes() if ebpf is not None and ebpf.socket_lb() else ""
    if holes and result.delivered:
        result.verdict += f"; but {holes}: a connect() that picks such a slot is refused"
    result.seconds = round(time.monotonic() - started, 3)
    return result
