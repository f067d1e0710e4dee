"""The lab's kube-proxy: turns services and their endpoints into each node's own kernel rules.

As on a real cluster, every node gets the full set of rules in its own namespace, so a connection to a
ClusterIP is translated on the client's node and no central box sits in the path. Each sync programs a
node with ONE process: `iptables-restore` (iptables mode) or `nft -f -` (nftables mode), never one per rule.

The iptables backend (`spec.kubeProxy.iptables`) is by default the machine's own `iptables` (`auto`), as
kube-proxy's image picks the backend the host uses (its iptables-wrapper looks at which backend holds the
host's rules), so `iptables-save` typed in a node shows KUBE-SERVICES. On Debian 12 that is iptables-nft;
`legacy` loads a full table about twice as fast (kernel-notes: 10,000 services 1.6 s against 3.5 s) and
its per-connection scan is shallower; docs/benchmarks.md has both measured.

Syncs after the first are partial, as kube-proxy's since Kubernetes 1.28 (its "partial sync": only the
changed services' chains are written, with `--noflush`; chains that are gone are flushed and deleted,
`-X`); the top-level chains are written whole as kube-proxy writes them, or edited by position when the
kernel shows nobody else touched them. A change to a built-in chain, an interrupted sync, or a failed
partial load (the tables were changed behind our back) falls back to a full restore. How the work stays
proportional to the change (records compared by identity, a journal of loads): kube_proxy_partial.py.
nftables syncs are incremental too, with the table replaced whole when the kernel's nf_tables generation
shows it was changed by someone else: kube_proxy_nft_sync.py. IPVS mode keeps
each node's last plan too: kube-ipvs0's addresses, the virtual and real servers change one by one (as
kube-proxy's own syncs do; a restore from scratch would also drop every connection entry), and the
ipsets and the nat helper rules are reloaded only when they changed.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from services import endpoints as ep
from services import kube_proxy_iptables as ipt
from services import kube_proxy_ipvs as ipvs
from topo import kernel, netns
from topo.errors import ApplyError, FeatureMissing
from topo.model import Cluster, KubeProxy, Lab, Node

IPTABLES_RESTORE = ["iptables-legacy-restore", "-w", "5"]  # kept for callers naming the legacy loader
NFT = ["nft", "-f", "-"]
# IPVS mode. `ipvsadm -R`, not the ipvsadm-restore script: the script always clears the table first.
IPVSADM_RESTORE = ["ipvsadm", "-R"]
IPSET_RESTORE = ["ipset", "restore"]
IP_BATCH = ["ip", "-batch", "-"]


@functools.lru_cache(maxsize=1)
def host_iptables_backend() -> str:
    """The backend of the machine's own `iptables` ("nft" or "legacy"), from `iptables --version`
    ("iptables v1.8.9 (nf_tables)" or "(legacy)"); legacy when it does not say (iptables before 1.8)."""
    try:
        out = subprocess.run(["iptables", "--version"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "legacy"
    return "nft" if "nf_tables" in out else "legacy"


@functools.lru_cache(maxsize=1)
def own_lockfile_ok() -> bool:
    """Whether the legacy loaders honour XTABLES_LOCKFILE (iptables 1.8.5 and later): then each node's loads
    lock a file of their own and nodes load in parallel; before, they share /run/xtables.lock and load in turn."""
    try:
        out = subprocess.run(["iptables-legacy", "--version"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    found = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    return found is not None and tuple(map(int, found.groups())) >= (1, 8, 5)


def iptables_backend(proxy: KubeProxy) -> str:
    """The iptables backend a lab's rules live in: "nft" or "legacy" (`auto`: the machine's own)."""
    return host_iptables_backend() if proxy.iptables == "auto" else proxy.iptables


def mode_label(lab: Lab) -> str:
    """kube-proxy's mode as `lab status`, `lab graph` and `lab trace` name it, with the iptables backend the
    rules live in (what a learner must type to see them: `iptables-save` is the nft one on Debian 12)."""
    if lab.cni.profile == "cilium":
        return "replaced by cilium (eBPF service maps)"
    if lab.kube_proxy.mode == "iptables":
        return f"iptables ({iptables_backend(lab.kube_proxy)} backend)"
    return lab.kube_proxy.mode


def iptables_restore(backend: str, noflush: bool = False) -> list[str]:
    return [f"iptables-{backend}-restore", "-w", "5"] + (["--noflush"] if noflush else [])


def iptables_save(backend: str) -> list[str]:
    return [f"iptables-{backend}-save"]


def iptables_cmd(backend: str) -> list[str]:
    return [f"iptables-{backend}"]


def missing_features(lab: Lab) -> list[kernel.Feature]:
    """What the lab's proxy mode needs of the kernel and this kernel lacks: IPVS mode needs IPVS itself and
    dummy devices (kube-ipvs0)."""
    if lab.kube_proxy.mode != "ipvs":
        return []
    return kernel.missing(kernel.IPVS, kernel.DUMMY)


def require(lab: Lab) -> None:
    """Refuse a proxy mode this kernel cannot run (one line, naming the kernel options)."""
    lacking = missing_features(lab)
    if lacking:
        raise FeatureMissing(kernel.refusal("kubeProxy.mode ipvs", lacking, "kubeProxy.mode nftables"))
    require_tools(lab)


def require_tools(lab: Lab) -> None:
    """The programs the lab's proxy mode loads rules with."""
    restore = iptables_restore(iptables_backend(lab.kube_proxy))[0]
    tools = {"iptables": [restore], "nftables": [NFT[0]],
             "ipvs": [IPVSADM_RESTORE[0], IPSET_RESTORE[0], restore, "ip"]}[lab.kube_proxy.mode]
    for tool in tools:
        if shutil.which(tool) is None:
            raise FeatureMissing(f"kubeProxy.mode {lab.kube_proxy.mode} needs {tool}: install it (./install.sh does)")


def load(ns: str, argv: list[str], script: str | Path, env: dict[str, str] | None = None) -> None:
    """Feed a ruleset to a loader running inside a node's namespace: a text, or a file the loader reads as its
    standard input (a full restore of a big Service: no megabytes pumped through a pipe by a Python thread
    while other nodes' loads run). `env`: added to the loader's environment."""
    environ = {**os.environ, **env} if env else None
    with netns.entered(ns):
        if isinstance(script, Path):
            with script.open("rb") as fh:
                proc = subprocess.run(argv, stdin=fh, capture_output=True, env=environ)
        else:
            proc = subprocess.run(argv, input=script.encode(), capture_output=True, env=environ)
    if proc.returncode != 0:
        first = (proc.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"])[0]
        raise ApplyError(f"{argv[0]} in {ns} failed: {first}")


@dataclass
class SyncReport:
    nodes: int
    service_ports: int
    endpoints: int
    seconds: float


def _state_file(folder: Path, node: str) -> Path:
    return folder / f"{node}.nft.json"


def sync_node(lab: Lab, node: Node, sps: list[ep.ServicePortEndpoints], folder: Path) -> None:
    ns = lab.node_netns(node.name)
    if lab.kube_proxy.mode == "iptables":
        egress = None
        if lab.cni.profile == "aws-vpc" and not lab.vpc.external_snat:
            vpc = [r.subnet for r in lab.underlay.racks] or [lab.underlay.subnet]
            vpc += [lab.vpc.custom_network] if lab.vpc.custom_network is not None else []
            egress = ipt.aws_snat(node.ip, [c for c in vpc if c is not None], [e.ip for e in lab.external])
        elif lab.cni.profile == "aws-vpc":
            egress = []  # AWS_VPC_K8S_CNI_EXTERNALSNAT=true: an external NAT gateway translates, the node does not
        sync_iptables(ns, ipt.plan(node, sps, cluster_of(lab), egress), iptables_backend(lab.kube_proxy),
                      saved_rules(folder, node.name))
    elif lab.kube_proxy.mode == "nftables":
        sync_nftables(ns, node, sps, lab.cluster, _state_file(folder, node.name))
    else:
        require(lab)
        sync_ipvs(ns, ipvs.build(node, sps, lab.cluster), folder / f"{node.name}.ipvs.json",
                  iptables_backend(lab.kube_proxy))


def cluster_of(lab: Lab) -> Cluster:
    """The cluster as kube-proxy's --cluster-cidr sees it. aws-vpc: pods are not in a PodCIDR range but in the
    VPC's subnets, so that range (the custom networking subnet, the flat subnet, or the smallest range holding
    every rack's subnet) is what tells pod sources from off-cluster ones."""
    if lab.cni.profile != "aws-vpc":
        return lab.cluster
    if lab.vpc.custom_network is not None:
        return replace(lab.cluster, pod_cidr=lab.vpc.custom_network)
    subnets = [r.subnet for r in lab.underlay.racks] or [lab.underlay.subnet]
    wide = subnets[0]
    while not all(s.subnet_of(wide) for s in subnets):
        wide = wide.supernet()
    return replace(lab.cluster, pod_cidr=wide)


def loader_env(backend: str, saved: Path) -> dict[str, str] | None:
    """What a node's iptables loader adds to its environment. The legacy loaders take an flock on a lock
    file around their read-modify-replace of a table. By default it is one file for the whole machine
    (/run/xtables.lock), so 100 nodes' loads queued on it although each replaces tables of its own namespace
    only. Ours is one file per node (XTABLES_LOCKFILE, iptables >= 1.8.5), next to its saved rules: the nodes
    load in parallel. The kernel still refuses a replace whose table changed under it (a rule added by hand
    meanwhile: EAGAIN, then a full restore)."""
    return {"XTABLES_LOCKFILE": str(saved.with_name(saved.name + ".xtables.lock"))} if backend == "legacy" else None


def saved_rules(folder: Path, node: str) -> Path:
    """A node's iptables restore input as last loaded in full (partial loads since are in its journal)."""
    return folder / f"{node}.iptables.rules"


def sync_iptables(ns: str, plan: ipt.Plan, backend: str, saved: Path) -> str:
    """Bring one node's iptables rules to `plan` (services/kube_proxy_iptables.plan): the first time, and
    whenever a partial load is impossible or fails, by a full restore; else kube-proxy's partial sync, only
    the changed chains (services/kube_proxy_partial.py). `saved` keeps what was loaded. Returns "full",
    "partial" or "none"."""
    from services import kube_proxy_partial

    env = loader_env(backend, saved)

    def run(noflush: bool, script: str | Path) -> None:
        load(ns, iptables_restore(backend, noflush=noflush), script, env)

    return kube_proxy_partial.sync(ns, plan, backend, saved, run)


def sync_nftables(ns: str, node: Node, sps: list[ep.ServicePortEndpoints], cluster: Cluster, saved: Path) -> str:
    """Bring one node's `table ip kube-proxy` to these service ports: the difference only, or the table
    replaced whole when the kernel may not hold what was loaded last (services/kube_proxy_nft_sync.py).
    Returns "full", "partial" or "none"."""
    from services import kube_proxy_nft_sync

    return kube_proxy_nft_sync.sync(ns, node, sps, cluster, saved, lambda script: load(ns, NFT, script))


def sync_ipvs(ns: str, plan: ipvs.IpvsPlan, saved: Path, backend: str | None = None) -> None:
    """Bring one node's IPVS mode state to `plan`, in an order that never leaves a virtual server without
    its address or its masquerade rules: kube-ipvs0's addresses, the ipsets, the nat table, then the
    virtual servers. `saved` keeps the plan last loaded (the base of the next delta)."""
    old = ipvs.from_json(json.loads(saved.read_text())) if saved.exists() else None
    if old is None:
        with netns.entered(ns):  # IPVS is per namespace, and so are its sysctls (after ip_vs is loaded)
            for key, value in ipvs.SYSCTLS:
                Path("/proc/sys", key).write_text(value)
    with netns.rtnl_in(ns) as rt:
        dummy = rt.link(plan.dummy)
        present = None if dummy is None else {a.ip for _i, a in rt.addrs(dummy.index)}
    script = ipvs.render_address_batch(plan, present)
    if script:
        load(ns, IP_BATCH, script)
    if old is None or old.ipsets != plan.ipsets:
        load(ns, IPSET_RESTORE, ipvs.render_ipset(plan))
    if old is None or old.iptables != plan.iptables:
        load(ns, iptables_restore(backend or host_iptables_backend()), ipvs.render_iptables(plan))
    if old is None:
        load(ns, IPVSADM_RESTORE, ipvs.loadable(ipvs.render_ipvsadm(plan)))
    else:
        delta = ipvs.render_ipvsadm_delta(old, plan)
        try:
            if delta:
                load(ns, IPVSADM_RESTORE, delta)
        except ApplyError:  # the table was changed behind our back: replace it whole
            load(ns, IPVSADM_RESTORE, ipvs.loadable(ipvs.render_ipvsadm(plan)))
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(ipvs.to_json(plan)))


def forget_endpoint(lab: Lab, pod: ep.RunningPod) -> None:
    """Drop UDP conntrack entries translated to an endpoint that is gone, in every node, as kube-proxy
    does: otherwise an ongoing UDP flow (a client reusing its source port) keeps going to the dead pod.
    Like kube-proxy, only for endpoints of UDP service ports (a TCP flow to a dead pod fails by itself), so
    deleting a pod no UDP service selects costs no conntrack call at all."""
    if not any(sp.protocol == "UDP" and sp.endpoints for sp in ep.resolve(lab.services, [pod])):
        return
    for node in lab.nodes:
        with netns.entered(lab.node_netns(node.name)):
            subprocess.run(["conntrack", "-D", "-p", "udp", "--reply-src", str(pod.ip)], capture_output=True)


PARALLEL_LOADS = 4  # rule loads under way at once (more only queue for the CPUs of a small machine)


def _parallel_ok(lab: Lab) -> bool:
    """Whether nodes' rules may be loaded at once: in nftables and iptables mode (the legacy backend when its
    loaders lock a file of their node's own: sync_iptables, own_lockfile_ok). Not in IPVS mode (its kernel
    feature probes and its several loaders per node are not made to run side by side)."""
    if lab.kube_proxy.mode == "iptables" and iptables_backend(lab.kube_proxy) == "legacy":
        return own_lockfile_ok()
    return lab.kube_proxy.mode != "ipvs"


def sync(lab: Lab, pods: list[ep.RunningPod], folder: Path) -> SyncReport:
    """Program every node for the lab's current services and ready pods."""
    started = time.monotonic()
    sps = ep.resolve(lab.services, pods)
    # What a node's rules are made of, digested once: a node whose inputs are those it was last synced from
    # is skipped without rendering anything (at a thousand pods, rendering 50 unchanged nodes cost 0.3 s
    # of a one-pod change that no service selects). The digest is written after the node's load, so a
    # crash in between only costs a re-render next time.
    shared = hashlib.sha256(repr((lab.kube_proxy, lab.cluster, sps)).encode())
    todo = []
    for node in lab.nodes:
        digest = shared.copy()
        digest.update(repr(node).encode())
        inputs, marker = digest.hexdigest(), folder / f"{node.name}.inputs"
        try:
            if marker.read_text() == inputs:
                continue
        except OSError:
            pass
        todo.append((node, inputs, marker))

    def one(node: Node, inputs: str, marker: Path) -> None:
        sync_node(lab, node, sps, folder)
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(inputs)

    # Nodes load in parallel: each load is a loader process working alone in its node's namespace (setns
    # is per thread, and a child is born in its parent thread's namespace), and the rendering between
    # loads overlaps them. `lab up` of 1,000 pods behind one Service spent 3.2 s loading 50 nodes one
    # after another. With a Service of 10,000 endpoints the loader is 90 % of a node's sync and sleeps about
    # a quarter of its time in the kernel, so a few more loads than cores keep both cores busy
    # (docs/benchmarks.md). The legacy backend too: each node's loaders lock a file of their own.
    workers = min(PARALLEL_LOADS, len(todo)) if _parallel_ok(lab) else 1
    if workers <= 1:
        for item in todo:
            one(*item)
    else:
        netns.home_fd()  # opened here, once: every worker comes back to this namespace
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(one, *item) for item in todo]:
                future.result()  # the first failure is raised, once every node's load has ended
    return SyncReport(len(lab.nodes), len(sps), sum(len(s.endpoints) for s in sps), time.monotonic() - started)
