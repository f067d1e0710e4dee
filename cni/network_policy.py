"""NetworkPolicy enforcement, the Calico way, as one nftables table per node.

`render()` is pure: the lab's policies and namespaces plus the running pods (with their IPs) in, the node's
ruleset text out; `sync()` loads it into every node with one `nft -f` each (atomically: the old table is
replaced in the same transaction), and skips a node whose text did not change, as kube-proxy's sync does.
Only the `calico` profile enforces; under `flannel` nothing is loaded, as on a real Flannel cluster, where
NetworkPolicy objects are stored and nothing happens (`lab apply` says so).

Semantics (Kubernetes'): a pod is isolated for ingress (egress) once any policy with that policy type
selects it; then only what the union of those policies' rules allows passes (policies are additive, an
isolating policy without rules is a default deny). A peer with podSelector alone means pods of the policy's
namespace; namespaceSelector alone, every pod of those namespaces; both in one peer, those pods in those
namespaces; ipBlock, addresses (minus `except`). Named ports are looked up among the container ports of the
pod the traffic goes to. Replies of allowed connections pass (conntrack). A pod cannot block access to
itself: its own connections through a Service's ClusterIP that land on itself (hairpin) always pass.

Connections, not packets, are judged, as in Calico: `ct state established,related accept` comes before any
policy, so a connection that was open when a deny policy arrived keeps working until it ends (or its
conntrack entry expires); only new connections meet the new rules. Packets conntrack finds invalid (say, a
TCP segment out of the window of any connection) are dropped at every workload, as Calico's workload chains
do unless felix's DisableConntrackInvalidCheck is set.

Layout, following Calico's chain names (`iptables-save` of a Calico node shows the same names):

    table ip calico
      chain cali-FORWARD            base chain, hook forward, priority filter, policy accept:
                                    ct state established,related accept; then the two dispatch chains
      chain cali-from-wl-dispatch   ip saddr vmap { POD_IP : jump cali-fw-VETH }   (egress of local pods)
      chain cali-to-wl-dispatch     ip daddr vmap { POD_IP : jump cali-tw-VETH }   (ingress of local pods)
      chain cali-tw-VETH            to workload: drop conntrack-invalid packets; let the pod's own packets
                                    pass (hairpin); clear the accept mark, jump each ingress policy's chain,
                                    return as soon as the mark is set, else `counter drop`
      chain cali-fw-VETH            from workload: the same with the egress policies
      chain cali-pi-NS.NAME         a policy's ingress rules: each sets the accept mark and returns
      chain cali-po-NS.NAME         a policy's egress rules

VETH is the pod's node-side veth (Calico names these chains after its cali* workload interface). The accept
mark is Calico's 0x10000 bit, set and tested under its own mask, so it never disturbs kube-proxy's 0x4000.

Comments, for people and for `lab trace` (it names the rule that dropped a packet from them):
- allow rules in cali-pi-/cali-po- chains: "NS/POLICY ingress[I]" or "NS/POLICY egress[I]" (I: the rule's
  index in the policy's ingress/egress list);
- jumps to a policy chain: "NS/POLICY"; the return after it: "NS/POLICY allowed it";
- the drop at the end of a cali-tw-/cali-fw- chain (every drop rule has a counter):
  "NS/POD ingress: no policy allows it (NS/P1, NS/P2)" (egress likewise; the list is cut with "..." to keep
  the comment within nftables' 128 bytes);
- pods no policy isolates: a single "NS/POD ingress: not isolated (no policy selects it)" return;
- every workload chain's first rule: "NS/POD ingress: invalid packet (conntrack)" (a counted drop); an
  isolated pod's next: "NS/POD ingress: itself (a pod cannot block access to itself)".

Why dispatch on addresses, not interfaces: Calico routes each pod through its own cali* interface, but here
pods hang off Flannel's cni0 bridge, and for bridged packets (seen by the forward hook through bridge
netfilter, which node namespaces keep on for kube-proxy's sake) the kernel reports cni0 as both the input and
the output device. The pod IP is what tells workloads apart, for bridged same-node and routed cross-node
traffic alike. The forward hook runs after kube-proxy's DNAT (prerouting), so a connection to a ClusterIP is
judged by the pod it was sent to, as Kubernetes specifies. Traffic from a node to its own pods (kubelet's
probes) never crosses the forward hook and is always allowed, as Kubernetes requires; traffic from a pod to
its own node's addresses (the input hook) is not policed, as Calico's default host endpoint rules allow it.
"""
from __future__ import annotations

import hashlib
import subprocess
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from topo import names, netns
from topo.errors import ApplyError
from topo.model import IPBlock, Lab, NetworkPolicy, Pod, PolicyPeer, PolicyPort, PolicyRule

FAMILY = "ip"
TABLE = "calico"  # Calico's nftables dataplane names its table so too
FORWARD = "cali-FORWARD"
FROM_DISPATCH = "cali-from-wl-dispatch"
TO_DISPATCH = "cali-to-wl-dispatch"
ACCEPT_MARK = 0x10000  # Calico's default "accept" mark bit (felix's IptablesMarkAccept)
COMMENT_MAX = 127  # nftables keeps at most 128 bytes of a comment, the terminating NUL included
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace since Kubernetes 1.21
NFT = ["nft", "-f", "-"]

_MARK_SET = f"meta mark set meta mark or 0x{ACCEPT_MARK:08x} return"
_MARK_CLEAR = f"meta mark set meta mark and 0x{0xFFFFFFFF ^ ACCEPT_MARK:08x}"
_MARK_TEST = f"meta mark and 0x{ACCEPT_MARK:08x} == 0x{ACCEPT_MARK:08x}"


@dataclass(frozen=True)
class Workload:
    """A running pod as the policy engine sees it: its model (labels, ports, node) and its address."""

    pod: Pod
    ip: IPv4Address


def ingress_policies(lab: Lab, pod: Pod) -> list[NetworkPolicy]:
    """The policies isolating `pod` for ingress, in name order (Kubernetes policies have no order: the union
    of their rules counts, so the order only decides which chain is tried first)."""
    return sorted((p for p in lab.network_policies if "Ingress" in p.policy_types and p.selects(pod)),
                  key=lambda p: p.key)


def egress_policies(lab: Lab, pod: Pod) -> list[NetworkPolicy]:
    return sorted((p for p in lab.network_policies if "Egress" in p.policy_types and p.selects(pod)),
                  key=lambda p: p.key)


def chain_suffix(lab: Lab, pod: Pod) -> str:
    """The pod's node-side veth name, which names its cali-tw-/cali-fw- chains."""
    return names.host_veth(names.sandbox_id(lab.name, pod.namespace, pod.name))


def policy_chain(direction: str, policy: NetworkPolicy) -> str:
    """cali-pi-NS.NAME (ingress) or cali-po-NS.NAME (egress): names and namespaces are DNS labels, so the dot
    keeps every pair apart."""
    return f"cali-p{'i' if direction == 'ingress' else 'o'}-{policy.namespace}.{policy.name}"


def peer_workloads(lab: Lab, policy: NetworkPolicy, peer: PolicyPeer, workloads: list[Workload]) -> list[Workload]:
    """The pods a podSelector/namespaceSelector peer stands for (an ipBlock peer: none, it is addresses)."""
    if peer.ip_block is not None:
        return []
    if peer.namespace_selector is None:
        spaces = {policy.namespace}
    else:
        spaces = {ns for ns, labels in lab.namespaces.items()
                  if peer.namespace_selector.matches({**labels, NAMESPACE_NAME_LABEL: ns})}
    return [w for w in workloads if w.pod.namespace in spaces
            and (peer.pod_selector is None or peer.pod_selector.matches(w.pod.label_map))]


def named_port(pod: Pod, name: str, protocol: str) -> int | None:
    for container in pod.containers:
        for port in container.ports:
            if port.name == name and port.protocol == protocol:
                return port.container_port
    return None


def _q(text: str) -> str:
    """A comment for nft: at most COMMENT_MAX bytes, without the quote that would end it."""
    text = text.replace('"', "'")
    return f'comment "{text if len(text) <= COMMENT_MAX else text[:COMMENT_MAX - 3] + "..."}"'


# `lab observe` (observe/flows_ct.py) reads the drops: each counted drop also logs to NFLOG group 1 (to a
# workload) or 2 (from one), the groups Calico's felix uses, with the rule's comment as the prefix. Without a
# listener bound to the group the kernel logs nothing: the verdict and its cost stay what they were.
NFLOG_GROUPS = {"ingress": 1, "egress": 2}


def _log(text: str, direction: str) -> str:
    text = text.replace('"', "'")
    text = text if len(text) <= COMMENT_MAX else text[:COMMENT_MAX - 3] + "..."
    return f'log prefix "{text}" group {NFLOG_GROUPS[direction]}'


def _addresses(ips: list[IPv4Address]) -> str:
    return ", ".join(str(ip) for ip in sorted(set(ips)))


def _pairs(pairs: list[tuple[IPv4Address, int]]) -> str:
    return ", ".join(f"{ip} . {port}" for ip, port in sorted(set(pairs)))


def _peer_matches(lab: Lab, policy: NetworkPolicy, rule: PolicyRule, field: str, workloads: list[Workload]
                  ) -> list[tuple[str, list[Workload] | None, IPBlock | None]]:
    """Each alternative source (ingress) or destination (egress) of a rule as an nft match, with the pods it
    stands for or the ipBlock it is (both None: everyone). No peers: everyone. A selector that matches no pod
    gives no alternative (it allows nothing)."""
    if not rule.peers:
        return [("", None, None)]
    found: list[tuple[str, list[Workload] | None, IPBlock | None]] = []
    for peer in rule.peers:
        block = peer.ip_block
        if block is not None:
            text = f"ip {field} {block.cidr}"
            if block.excepts:
                text += f" ip {field} != {{ {', '.join(str(e) for e in sorted(block.excepts))} }}"
            found.append((text, None, block))
            continue
        pods = peer_workloads(lab, policy, peer, workloads)
        if pods:
            found.append((f"ip {field} {{ {_addresses([w.ip for w in pods])} }}", pods, None))
    return found


def _within(ip: IPv4Address, block: IPBlock | None) -> bool:
    return block is None or (ip in block.cidr and not any(ip in e for e in block.excepts))


def _port_match(port: PolicyPort) -> str:
    proto = port.protocol.lower()
    if port.port is None:
        return f"meta l4proto {proto}"
    if port.end_port is not None and port.end_port != port.port:
        return f"meta l4proto {proto} th dport {port.port}-{port.end_port}"
    return f"meta l4proto {proto} th dport {port.port}"


def _rule_lines(lab: Lab, policy: NetworkPolicy, direction: str, index: int, rule: PolicyRule,
                workloads: list[Workload], local: list[Workload]) -> list[str]:
    """The nft rules of one ingress/egress rule: one per (peer, port) alternative that can match anything."""
    field = "saddr" if direction == "ingress" else "daddr"
    comment = _q(f"{policy.key} {direction}[{index}]")
    lines = []
    for peer, pods, block in _peer_matches(lab, policy, rule, field, workloads):
        for port in rule.ports or (None,):
            if port is None:
                parts = [peer]
            elif isinstance(port.port, str):
                # A named port means the number the destination pod gives that name: the protected pod for
                # ingress, the peer for egress. (address . port) pairs say exactly that, pod by pod.
                if direction == "ingress":
                    targets = [w for w in local if policy.selects(w.pod)]
                else:
                    targets = pods if pods is not None else [w for w in workloads if _within(w.ip, block)]
                pairs = [(w.ip, n) for w in targets if (n := named_port(w.pod, port.port, port.protocol)) is not None]
                if not pairs:
                    continue  # no pod has that port: this alternative allows nothing
                match = f"meta l4proto {port.protocol.lower()} ip daddr . th dport {{ {_pairs(pairs)} }}"
                parts = [peer if direction == "ingress" or pods is None else "", match]
            else:
                parts = [peer, _port_match(port)]
            lines.append(" ".join(p for p in parts + [_MARK_SET, comment] if p))
    return lines


def _workload_chain(lab: Lab, workload: Workload, direction: str, policies: list[NetworkPolicy]) -> list[str]:
    pod = workload.pod
    # Calico's workload chains begin with conntrack's verdicts: established/related accepted (done once, in
    # cali-FORWARD, here) and invalid dropped (felix's DisableConntrackInvalidCheck, false by default).
    invalid = f"{pod.key} {direction}: invalid packet (conntrack)"
    lines = [f"ct state invalid counter {_log(invalid, direction)} drop {_q(invalid)}"]
    if not policies:
        return lines + [f"return {_q(f'{pod.key} {direction}: not isolated (no policy selects it)')}"]
    # A pod cannot block access to itself (Kubernetes' NetworkPolicy docs): its own packets coming back
    # through a Service's ClusterIP (hairpin, DNATed to itself) pass whatever its policies say.
    itself = f"ip {'saddr' if direction == 'ingress' else 'daddr'} {workload.ip}"
    lines.append(f"{itself} return {_q(f'{pod.key} {direction}: itself (a pod cannot block access to itself)')}")
    lines.append(f"{_MARK_CLEAR} {_q(f'{pod.key} {direction}: clear the accept mark')}")
    for policy in policies:
        lines.append(f"jump {policy_chain(direction, policy)} {_q(policy.key)}")
        lines.append(f"{_MARK_TEST} return {_q(f'{policy.key} allowed it')}")
    listed = ", ".join(p.key for p in policies)
    denied = f"{pod.key} {direction}: no policy allows it ({listed})"
    lines.append(f"counter {_log(denied, direction)} drop {_q(denied)}")
    return lines


def render(lab: Lab, node: str, workloads: list[Workload]) -> str:
    """The node's whole `table ip calico`, as one `nft -f` transaction that replaces the previous one."""
    workloads = sorted(workloads, key=lambda w: w.pod.key)
    local = [w for w in workloads if w.pod.node == node]
    chains: dict[str, list[str]] = {}
    policies: dict[str, tuple[str, NetworkPolicy]] = {}
    to_map, from_map = [], []
    for workload in local:
        suffix = chain_suffix(lab, workload.pod)
        for direction, prefix, found, entries in (
                ("ingress", "cali-tw-", ingress_policies(lab, workload.pod), to_map),
                ("egress", "cali-fw-", egress_policies(lab, workload.pod), from_map)):
            chains[prefix + suffix] = _workload_chain(lab, workload, direction, found)
            entries.append(f"{workload.ip} : jump {prefix}{suffix}")
            for policy in found:
                policies[policy_chain(direction, policy)] = (direction, policy)
    for name, (direction, policy) in sorted(policies.items()):
        rules = policy.ingress if direction == "ingress" else policy.egress
        chains[name] = [line for index, rule in enumerate(rules)
                        for line in _rule_lines(lab, policy, direction, index, rule, workloads, local)]
    chains[FROM_DISPATCH] = [f"ip saddr vmap {{ {', '.join(from_map)} }}"] if from_map else []
    chains[TO_DISPATCH] = [f"ip daddr vmap {{ {', '.join(to_map)} }}"] if to_map else []
    out = [f"table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}", f"table {FAMILY} {TABLE} {{"]
    for name in sorted(chains):
        out.append(f"    chain {name} {{")
        out += [f"        {line}" for line in chains[name]]
        out.append("    }")
    out += [f"    chain {FORWARD} {{",
            "        type filter hook forward priority filter; policy accept;",
            f"        ct state established,related accept {_q('replies of allowed connections (conntrack)')}",
            f"        jump {FROM_DISPATCH} {_q('egress policies of pods on this node')}",
            f"        jump {TO_DISPATCH} {_q('ingress policies of pods on this node')}",
            "    }", "}"]
    return "\n".join(out) + "\n"


def removal() -> str:
    """The script that takes the table away (a lab whose profile stopped enforcing: never, but cheap)."""
    return f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"


# ---------------------------------------------------------------------------- loading


@dataclass
class SyncReport:
    nodes: int  # nodes reloaded (unchanged ones are skipped)
    policies: int
    seconds: float
    enforced: bool


def load(ns: str, script: str) -> None:
    """One `nft -f -` inside a node's namespace."""
    with netns.entered(ns):
        proc = subprocess.run(NFT, input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["(no message)"])[0]
        raise ApplyError(f"nft in {ns} failed loading the NetworkPolicy rules: {first}")


def sync(lab: Lab, workloads: list[Workload], folder: Path) -> SyncReport:
    """Program every node for the lab's current policies and running pods (calico profile only). A node
    whose rendered rules are unchanged since the last load (a fingerprint is kept in `folder`) is skipped."""
    started = time.monotonic()
    if not lab.cni.enforces_policy or lab.cni.profile == "cilium":  # cilium: identities in BPF (cilium/policy.py)
        return SyncReport(0, len(lab.network_policies), 0.0, lab.cni.enforces_policy)
    loaded = 0
    for node in lab.nodes:
        text = render(lab, node.name, workloads)
        digest = folder / f"{node.name}.nft.sha256"
        fingerprint = hashlib.sha256(text.encode()).hexdigest()
        if digest.exists() and digest.read_text() == fingerprint:
            continue
        load(lab.node_netns(node.name), text)
        folder.mkdir(parents=True, exist_ok=True)
        digest.write_text(fingerprint)
        loaded += 1
    return SyncReport(loaded, len(lab.network_policies), time.monotonic() - started, True)


def _policies(n: int) -> str:
    return "1 policy is" if n == 1 else f"{n} policies are"


def not_enforced_warning(lab: Lab) -> str | None:
    """What `lab apply` / `lab up` say when a lab holds NetworkPolicies its CNI does not enforce."""
    if lab.cni.enforces_policy or not lab.network_policies:
        return None
    how = "spec.cni.profile" if lab.cni.given else f"backend {lab.network.backend}, no spec.cni.profile"
    return (f"Warning: this lab plays Flannel ({how}), which does not enforce NetworkPolicy: "
            f"{_policies(len(lab.network_policies))} stored but nothing is blocked; use spec.cni.profile: "
            "calico to enforce them")

