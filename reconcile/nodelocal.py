"""NodeLocal DNSCache in the kernel: bring every node's cache (address, NOTRACK rules, dnsmasq) in line with
the lab's desired state, the way the other layers converge (docs/architecture.md, "Changes converge").

Desired state: `spec.dns.nodeLocal` in the recorded spec, and the cache's configuration written from it
(`services/nodelocal.py`) into /run/kubenet-lab/LAB/nodelocal/NODE/. Per node, `sync` compares with what
was last *loaded*, not with what was written: `loaded.json` holds the pid of the running cache and the
digest of the configuration it read; the NOTRACK chain is rewritten whole (idempotent) and its jumps
added only when `iptables -C` does not find them. A command killed anywhere in between (crash point
`nodelocal`) leaves at worst a cache that is not recorded or a configuration not loaded, which the next
`sync` (every `lab apply`/`lab delete`, through reconcile/resync.py) finds and finishes. The caches are
processes of the node namespaces: `lab down` and `lab clean` kill them with the nodes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from pathlib import Path

from apiserver import state
from services import dns, kube_proxy, nodelocal
from topo import crash, netns, process
from topo.errors import ApplyError
from topo.model import Lab


def folder(lab: str, node: str) -> Path:
    return state.lab_dir(lab) / "nodelocal" / node


def log_file(lab: str, node: str) -> Path:
    return folder(lab, node) / "queries.log"


def sync(lab: Lab) -> dict[str, str]:
    """Every node's cache as the spec wants it; returns what was done per node ("none", "started",
    "restarted")."""
    done: dict[str, str] = {}
    if not lab.dns.enabled or not lab.dns.node_local:
        return done
    backend = kube_proxy.iptables_backend(lab.kube_proxy)
    for node in lab.nodes:
        ns = lab.node_netns(node.name)
        where = folder(lab.name, node.name)
        where.mkdir(parents=True, exist_ok=True)
        conf = nodelocal.conf(dns.cluster_dns_ip(lab.cluster.service_cidr), log_file(lab.name, node.name))
        _write(where / "dnsmasq.conf", conf)
        subprocess.run(["ip", "-n", ns, "addr", "replace", f"{nodelocal.LOCAL_IP}/32", "dev", "lo"],
                       check=True, capture_output=True)
        kube_proxy.load(ns, kube_proxy.iptables_restore(backend, noflush=True), nodelocal.notrack_rules())
        _ensure_jumps(ns, backend)
        crash.point("nodelocal")
        done[node.name] = _ensure_daemon(ns, where, hashlib.sha256(conf.encode()).hexdigest())
    return done


def _write(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def _ensure_jumps(ns: str, backend: str) -> None:
    with netns.entered(ns):
        for rule in nodelocal.jumps():
            check = subprocess.run([f"iptables-{backend}", "-w", "5", "-t", "raw", "-C", *rule], capture_output=True)
            if check.returncode != 0:
                add = subprocess.run([f"iptables-{backend}", "-w", "5", "-t", "raw", "-I", *rule[:1], "1", *rule[1:]],
                                     capture_output=True, text=True)
                if add.returncode != 0:
                    raise ApplyError(f"NodeLocal DNSCache rules in {ns}: {add.stderr.strip()}")


def _ensure_daemon(ns: str, where: Path, digest: str) -> str:
    """The node's cache running with the configuration as written. The running caches are found in the
    kernel (processes of the node's namespace started with this folder's config), not trusted from the
    record alone: a command killed between starting one and recording it leaves a cache nobody recorded,
    which must not be started a second time next to it (it would fail to bind and serve nothing new)."""
    record = where / "loaded.json"
    try:
        loaded = json.loads(record.read_text())
    except (OSError, ValueError):
        loaded = {}
    running = _caches(ns, where / "dnsmasq.conf")
    if running == [loaded.get("pid")] and loaded.get("digest") == digest:
        return "none"
    if running:
        process.kill_all(running)
    new = process.spawn_in(ns, nodelocal.argv(where / "dnsmasq.conf"), str(where / "dnsmasq.out"))
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": new, "digest": digest}))
    os.replace(tmp, record)
    return "restarted" if running else "started"


def _caches(ns: str, conf: Path) -> list[int]:
    """The live processes of namespace `ns` running with config file `conf` (the node's caches)."""
    inode = netns.inode(ns)
    out = []
    for pid in process.pids_in_netns([inode] if inode is not None else []):
        with contextlib.suppress(OSError):
            if f"--conf-file={conf}" in Path(f"/proc/{pid}/cmdline").read_text().split("\0") and process.alive(pid):
                out.append(pid)
    return sorted(out)


def _in_netns(pid: int, inode: int | None) -> bool:
    with contextlib.suppress(OSError):
        return inode is not None and os.stat(f"/proc/{pid}/ns/net").st_ino == inode
    return False


def status(lab: Lab) -> dict[str, dict]:
    """Per node: the cache's pid (None when it is not running) and whether the NOTRACK rules are loaded."""
    out: dict[str, dict] = {}
    backend = kube_proxy.iptables_backend(lab.kube_proxy)
    for node in lab.nodes:
        ns = lab.node_netns(node.name)
        try:
            pid = json.loads((folder(lab.name, node.name) / "loaded.json").read_text()).get("pid")
        except (OSError, ValueError):
            pid = None
        with netns.entered(ns):
            rules = subprocess.run([f"iptables-{backend}-save", "-t", "raw"], capture_output=True, text=True).stdout
        running = isinstance(pid, int) and process.alive(pid) and _in_netns(pid, netns.inode(ns))
        out[node.name] = {"pid": pid if running else None,
                          "notrack": [line for line in rules.splitlines() if "NOTRACK" in line]}
    return out
