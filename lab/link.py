"""`lab link NODE1 NODE2 --delay 50ms [--jitter 5ms] [--loss 1%]` (or `--clear`): impair the path between
two nodes of a running lab, as a WAN link or a flaky cable between two racks would.

What "the path between two nodes" is here: the traffic each node sends to the other, and only that.
Each node's underlay NIC (eth0) gets a classifier at its root: packets for the other node's IP or its
PodCIDR (so pod traffic in host-gw and BGP mode, and the outer packets of VXLAN and IP-in-IP, alike)
go through a netem qdisc of their own; everything else takes the link's usual way. So both directions
get the impairment: `--delay 50ms` adds 50 ms each way, 100 ms to a round trip between the two nodes,
and `--loss 1%` drops 1 % of the packets each way; traffic to a third node is untouched. netem varies
the delay by up to `--jitter` (uniformly, which also reorders packets, as netem does).

The link's own shaping from the spec (`bandwidth`, and `delay`/`jitter`/`loss` on the whole link) stays:
the pair's netem adds its delay on top of the link's and combines the losses, and with a bandwidth the
classes share one HTB class of the link's rate. With no pair left on a node, its eth0 gets back exactly
the qdiscs Mininet's TCLink gave it at `lab up` (or none). The settings are kept in the lab's state
folder (links.json), so each change rebuilds both nodes' trees from all pairs that involve them.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass

from apiserver import state
from topo import kernel, netns
from topo.errors import ApplyError, FeatureMissing, StateError
from topo.model import NODE_IFNAME, Lab, LinkSpec, Node

PATHS_FILE = "links.json"
PRIO_BANDS_MAX = 16  # the prio qdisc's limit: one band for the link, one per impaired peer
MININET_HTB, MININET_NETEM = "5:", "10:"  # the handles TCLink uses (topo/underlay.py builds with it)


@dataclass(frozen=True)
class Impairment:
    delay_ms: float | None = None
    jitter_ms: float | None = None
    loss_percent: float | None = None

    def describe(self) -> str:
        parts = []
        if self.delay_ms:
            parts.append(f"delay {_num(self.delay_ms)} ms each way (+{_num(2 * self.delay_ms)} ms round trip)")
        if self.jitter_ms:
            parts.append(f"jitter {_num(self.jitter_ms)} ms")
        if self.loss_percent:
            parts.append(f"loss {_num(self.loss_percent)} % each way")
        return ", ".join(parts) or "none"


def _num(value: float) -> str:
    return f"{value:g}"


def pair_key(a: str, b: str) -> str:
    return " ".join(sorted((a, b)))


# ---- the plan: tc commands for one node's eth0 -----------------------------------------------------


def netem_args(delay_ms: float | None, jitter_ms: float | None, loss_percent: float | None) -> str:
    """netem's arguments, as Mininet's TCLink writes them (delay, jitter, loss); empty for none."""
    args = []
    if delay_ms:
        args.append(f"delay {delay_ms * 1000:.0f}us")
        if jitter_ms:
            args.append(f"{jitter_ms * 1000:.0f}us")
    if loss_percent:
        args.append(f"loss {loss_percent:.5f}%")
    return " ".join(args)


def combined(link: LinkSpec, path: Impairment) -> str:
    """A pair's netem on top of its link's: delays add up, the losses combine (a packet survives both),
    the pair's jitter replaces the link's when given."""
    delay = (link.delay_ms or 0) + (path.delay_ms or 0)
    keep = (1 - (link.loss_percent or 0) / 100) * (1 - (path.loss_percent or 0) / 100)
    loss = 100 * (1 - keep)
    return netem_args(delay or None, path.jitter_ms or link.jitter_ms, loss if loss > 1e-9 else None)


def link_only(dev: str, link: LinkSpec) -> list[str]:
    """What Mininet's TCLink puts on a link's end (topo.underlay.tc_params): HTB 5: with class 5:1 for a
    bandwidth, netem 10: under it (or at the root) for delay, jitter and loss."""
    cmds, parent = [], "root"
    if link.bandwidth_mbit:
        cmds += [f"qdisc add dev {dev} root handle {MININET_HTB}0 htb default 1",
                 f"class add dev {dev} parent {MININET_HTB}0 classid {MININET_HTB}1 htb rate "
                 f"{link.bandwidth_mbit:f}Mbit burst 15k"]
        parent = f"parent {MININET_HTB}1"
    own = netem_args(link.delay_ms, link.jitter_ms, link.loss_percent)
    if own:
        cmds.append(f"qdisc add dev {dev} {parent} handle {MININET_NETEM} netem {own}")
    return cmds


def tc_script(dev: str, link: LinkSpec, peers: list[tuple[Node, Impairment]]) -> list[str]:
    """The commands (for `tc -batch`, after the root qdisc is deleted) giving `dev` the link's own shaping
    and one netem per impaired peer, chosen by destination (the peer's IP and PodCIDR)."""
    if not peers:
        return link_only(dev, link)
    own = netem_args(link.delay_ms, link.jitter_ms, link.loss_percent)
    cmds = []
    if link.bandwidth_mbit:
        # One HTB class of the link's rate, shared by a default leaf and one leaf per peer.
        rate = link.bandwidth_mbit
        share = rate / (len(peers) + 1)
        cmds += [f"qdisc add dev {dev} root handle 1: htb default 10",
                 f"class add dev {dev} parent 1: classid 1:1 htb rate {rate:f}Mbit burst 15k",
                 f"class add dev {dev} parent 1:1 classid 1:10 htb rate {share:f}Mbit ceil {rate:f}Mbit burst 15k"]
        leaves = [f"1:{11 + i}" for i in range(len(peers))]
        cmds += [f"class add dev {dev} parent 1:1 classid {leaf} htb rate {share:f}Mbit ceil {rate:f}Mbit burst 15k"
                 for leaf in leaves]
        if own:
            cmds.append(f"qdisc add dev {dev} parent 1:10 handle 10: netem {own}")
    else:
        # Unshaped: a prio qdisc whose bands only sort traffic (every priority maps to band 1, the link's own).
        if len(peers) + 1 > PRIO_BANDS_MAX:
            raise ApplyError(f"{dev}: at most {PRIO_BANDS_MAX - 1} impaired peers per node")
        bands = max(2, len(peers) + 1)
        cmds.append(f"qdisc add dev {dev} root handle 1: prio bands {bands} priomap " + " ".join(["0"] * 16))
        leaves = [f"1:{2 + i}" for i in range(len(peers))]
        if own:
            cmds.append(f"qdisc add dev {dev} parent 1:1 handle 10: netem {own}")
    for i, (leaf, (peer, path)) in enumerate(zip(leaves, peers)):
        cmds.append(f"qdisc add dev {dev} parent {leaf} handle {20 + i}: netem {combined(link, path)}")
        for dst in (f"{peer.ip}/32", str(peer.pod_cidr)):
            cmds.append(f"filter add dev {dev} parent 1: protocol ip prio 1 u32 match ip dst {dst} flowid {leaf}")
    return cmds


# ---- state and apply -------------------------------------------------------------------------------


def load_paths(name: str) -> dict[str, Impairment]:
    path = state.lab_dir(name) / PATHS_FILE
    if not path.exists():
        return {}
    return {key: Impairment(**value) for key, value in json.loads(path.read_text()).items()}


def save_paths(name: str, paths: dict[str, Impairment]) -> None:
    (state.lab_dir(name) / PATHS_FILE).write_text(json.dumps({k: asdict(v) for k, v in sorted(paths.items())}))


def peers_of(lab: Lab, node: str, paths: dict[str, Impairment]) -> list[tuple[Node, Impairment]]:
    out = []
    for key, imp in sorted(paths.items()):
        a, b = key.split(" ")
        if node in (a, b):
            out.append((lab.node(b if a == node else a), imp))
    return out


def program(lab: Lab, node: Node, paths: dict[str, Impairment]) -> None:
    """Rebuild one node's eth0 tree: delete the root qdisc, then one `tc -batch` for the rest."""
    script = tc_script(NODE_IFNAME, node.link, peers_of(lab, node.name, paths))
    with netns.entered(lab.node_netns(node.name)):
        subprocess.run(["tc", "qdisc", "del", "dev", NODE_IFNAME, "root"], capture_output=True)  # none is fine
        if script:
            proc = subprocess.run(["tc", "-batch", "-"], input="\n".join(script) + "\n", capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["(no message)"])[0]
                raise ApplyError(f"tc in node {node.name} failed: {first}")


def change(lab: Lab, a: str, b: str, impairment: Impairment | None) -> list[str]:
    """Set (or, with None, clear) the impairment between nodes a and b of a running lab; returns what to
    print. The caller holds the state lock."""
    for n in (a, b):
        try:
            lab.node(n)
        except KeyError:
            raise StateError(f"lab {lab.name} has no node {n} (nodes: {', '.join(x.name for x in lab.nodes)})") \
                from None
    if a == b:
        raise StateError(f"lab link needs two different nodes, got {a} twice")
    paths = load_paths(lab.name)
    key = pair_key(a, b)
    if impairment is None:
        if paths.pop(key, None) is None:
            return [f"{a} <-> {b}: no impairment to clear"]
    else:
        lacking = kernel.missing(kernel.NETEM)
        if lacking:
            raise FeatureMissing(kernel.refusal("impairing the path between two nodes", lacking))
        paths[key] = impairment
    for n in (a, b):
        program(lab, lab.node(n), paths)
    save_paths(lab.name, paths)
    if impairment is None:
        return [f"{a} <-> {b}: impairment cleared"]
    return [f"{a} <-> {b}: {impairment.describe()} (netem on {a}'s and {b}'s {NODE_IFNAME}, "
            f"for traffic to each other only)"]


def show(lab: Lab, a: str | None = None, b: str | None = None) -> list[str]:
    paths = load_paths(lab.name)
    if a and b:
        imp = paths.get(pair_key(a, b))
        return [f"{a} <-> {b}: {imp.describe() if imp else 'none'}"]
    return [f"{k.replace(' ', ' <-> ')}: {v.describe()}" for k, v in sorted(paths.items())] or ["no impaired links"]
