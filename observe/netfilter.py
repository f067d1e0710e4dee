"""`lab trace`'s rule verdicts: which netfilter rules and IPVS virtual servers acted on the probe.

A rule's packet counter read before and after the probe says it matched (iptables-save -c of the lab's backend, nft
counters); the DNAT that changed a destination is named from the rules of the node's kube-proxy mode
(iptables chains, the nft `service-ips` map, the IPVS table); drops are attributed to the probe only where
it was last seen, and a NetworkPolicy drop only in a chain of one of the probe's own pods.
"""
from __future__ import annotations

from cni import network_policy
from observe import ipvs
from observe import kernel as observed
from observe.kernel import Rule
from observe.places import Lookup, Place
from topo import netns

POLICY_WHERE = f"nft {network_policy.FAMILY} {network_policy.TABLE} "  # Rule.where of a NetworkPolicy rule
POLICY_CHAINS = ("cali-tw-", "cali-fw-")  # + a pod's host veth: its ingress and egress chains


def counters_in(spaces: list[str]) -> dict[str, dict[str, Rule]]:
    """Every counted rule of each namespace, read in parallel (setns is per thread; the savers are
    separate processes, so threads overlap their waits)."""
    from concurrent.futures import ThreadPoolExecutor

    netns.home_fd()  # opened once, here, in the namespace every worker thread returns to
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(spaces)))) as pool:
        return dict(zip(spaces, pool.map(observed.rule_counters, spaces)))


def moved_rules(before: dict[str, Rule], after: dict[str, Rule]) -> list[Rule]:
    """Rules whose packet counter moved during the probe, in ruleset order."""
    return [r for w, r in after.items() if r.packets is not None and r.packets > (before.get(w).packets or 0
                                                                                  if before.get(w) else 0)]


def dnat_chain(ns: str, mode: str, hit: list[Rule], before_dst: tuple, after_dst: str) -> str:
    """Name the rules that translated `before_dst` (ip, proto, port) to `after_dst` (ip:port)."""
    if mode == "iptables":
        by_chain: dict[str, list[Rule]] = {}
        for r in hit:
            if r.where.startswith("iptables nat "):
                by_chain.setdefault(r.chain, []).append(r)
        path: list[Rule] = []

        def walk(chain: str) -> bool:
            for r in by_chain.get(chain, []):
                if r.verdict == "DNAT" and r.dnat == after_dst:
                    path.append(r)
                    return True
                if (r.verdict or "").startswith(("jump:", "goto:")):
                    path.append(r)
                    if walk(r.verdict.split(":", 1)[1]):
                        return True
                    path.pop()
            return False

        for start in ("PREROUTING", "OUTPUT"):
            if walk(start):
                chains = [r.chain for r in path if r.chain not in ("PREROUTING", "OUTPUT")]
                comment = next((r.comment for r in reversed(path) if r.comment), "")
                return f"{' -> '.join(chains)} ({comment})" if comment else " -> ".join(chains)
        rules = observed.iptables_rules(ns, "nat")  # counters did not move (a reused conntrack entry)
        for key, targets in observed.iptables_services(rules).items():
            if key == before_dst and after_dst in targets:
                return "KUBE-SERVICES -> KUBE-SVC-... -> KUBE-SEP-... (rule structure; counters did not move)"
        return "a DNAT rule (not found in the kube-proxy chains)"
    if mode == "nftables":
        rules, maps = observed.nft_rules(ns, "kube-proxy")
        ip, proto, port = before_dst
        verdict = maps.get("ip kube-proxy service-ips", {}).get(f"{ip} . {proto} . {port}") or \
            maps.get("ip kube-proxy service-nodeports", {}).get(f"{proto} . {port}")
        mapname = "service-ips" if maps.get("ip kube-proxy service-ips", {}).get(f"{ip} . {proto} . {port}") \
            else "service-nodeports"
        if verdict is None:
            return "a dnat rule (no kube-proxy map element for it)"
        chain = verdict.split(" ", 1)[1]
        by_chain: dict[str, list[Rule]] = {}
        for r in rules:
            by_chain.setdefault(r.chain, []).append(r)
        seen = {chain}
        todo = [chain]
        while todo:
            current = todo.pop()
            for r in by_chain.get(current, []):
                target = (r.verdict or "").split(":", 1)[1] if ":" in (r.verdict or "") else None
                if target and target.startswith("endpoint-"):
                    if any(x.dnat == after_dst for x in by_chain.get(target, [])):
                        return f"map {mapname} element {{{ip} . {proto} . {port} : {verdict}}} -> {target}"
                elif target and target not in seen and target.startswith(("service-", "external-", "local-")):
                    seen.add(target)
                    todo.append(target)
        return f"map {mapname} -> {chain}"
    if mode == "ipvs":
        # IPVS translates in its own hook (LOCAL_IN: kube-ipvs0 makes the ClusterIP local), not by a rule.
        ip, proto, port = before_dst
        for vs in ipvs.ipvs_servers(ns):
            if vs.key == (ip, proto, port):
                fwd = next((f for real, f in vs.reals if real == after_dst), None)
                what = f"real server {after_dst} ({fwd})" if fwd else f"{after_dst}, not one of its real servers"
                return f"IPVS virtual server {proto.upper()} {ip}:{port} ({vs.scheduler}) -> {what}"
        return "IPVS (no virtual server for it: an older connection entry?)"
    return "DNAT"


def snat_rule(hit: list[Rule], ns: str) -> str:
    rules = [r for r in hit if r.verdict in ("MASQUERADE", "SNAT", "masquerade", "snat")]
    if rules:
        r = rules[0]
        return f"{r.chain}" + (f" ({r.comment})" if r.comment else "") + f" [{r.where}]"
    nft, _ = observed.nft_rules(ns)
    masq = sorted({r.where.rsplit(" handle", 1)[0] for r in nft if r.verdict == "masquerade"})
    return f"masquerade ({', '.join(masq)})" if masq else "masquerade"


def _workload_chain(rule: Rule) -> bool:
    """A NetworkPolicy chain of one pod (cni/network_policy.py: cali-tw-VETH for what goes to the pod,
    cali-fw-VETH for what it sends, in table ip calico): its counter moves for any traffic of that pod."""
    return rule.where.startswith(POLICY_WHERE) and rule.chain.startswith(POLICY_CHAINS)


def own_chains(lookup: Lookup, pods: list[Place | None]) -> set[str]:
    """The NetworkPolicy chains of the probe's own pods (its source, its destinations)."""
    veths = {lookup.veth_of[p.netns] for p in pods if p is not None and p.netns in lookup.veth_of}
    return {prefix + veth for veth in veths for prefix in POLICY_CHAINS}


def attribute_drops(hits: dict[str, list[Rule]], spaces: set[str],
                    own: set[str]) -> tuple[list[tuple[str, Rule]], list[tuple[str, Rule]]]:
    """(drops that are the probe's, drops that only may be). A counter moves for every packet a rule
    catches, the probe's or not, so a drop counts only where the packet was last seen (`spaces`), and a
    NetworkPolicy drop only in the chain of one of the probe's own pods. Any other drop counter that moved
    during the trace (other traffic, another pod's policy) is a maybe."""
    sure: list[tuple[str, Rule]] = []
    maybe: list[tuple[str, Rule]] = []
    for ns, rules in hits.items():
        for r in rules:
            if r.drops:
                ours = ns in spaces and (r.chain in own if _workload_chain(r) else True)
                (sure if ours else maybe).append((ns, r))
    return sure, maybe


def drop_text(lookup: Lookup, drops: list[tuple[str, Rule]]) -> str:
    out = []
    for ns, r in drops:
        place = lookup.places.get(ns)
        out.append(f"{r.where} in {place.name if place else ns}: {r.comment or r.text}")
    return "; ".join(out)
