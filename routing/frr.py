"""Real FRR daemons (zebra + bgpd) inside node and router namespaces, one instance each.

Each instance keeps its config, pid files, zserv socket and vty sockets in its own folder under the
lab's state directory, so nothing is written to /etc/frr or /run/frr and `lab down` removes it all.
Daemons are started from this process after entering the namespace (so they run there), in a new
session (so they outlive `lab up`), and found again by namespace, like every process of a lab.
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from routing.bgp import Speaker, render, render_zebra
from topo import process
from topo.errors import ApplyError, FeatureMissing
from topo.rtnl import Rtnl

FRR_DIR = Path("/usr/lib/frr")
RTPROT_BGP = 186  # the protocol number zebra gives the routes bgpd installs (`proto bgp`)


def require_frr() -> None:
    missing = [d for d in ("zebra", "bgpd") if not (FRR_DIR / d).exists()]
    if missing or shutil.which("vtysh") is None:
        raise FeatureMissing("FRR (zebra, bgpd, vtysh) not found: install Debian's 'frr' package (./install.sh does)")


def instance_dir(base: Path, name: str) -> Path:
    return base / name


def frr_folder(lab_dir: Path, name: str) -> Path:
    """The folder of one node's or router's FRR instance inside the lab's state folder `lab_dir`."""
    return lab_dir / "frr" / name


def _frr_ids() -> tuple[int, int]:
    try:
        return pwd.getpwnam("frr").pw_uid, grp.getgrnam("frr").gr_gid
    except KeyError as exc:
        raise FeatureMissing("user 'frr' missing: reinstall Debian's 'frr' package") from exc


def write_config(folder: Path, speaker: Speaker) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zebra.conf").write_text(render_zebra(speaker))
    (folder / "bgpd.conf").write_text(render(speaker))
    uid, gid = _frr_ids()
    for path in (folder, folder / "zebra.conf", folder / "bgpd.conf"):
        os.chown(path, uid, gid)


def _daemon_argv(daemon: str, folder: Path) -> list[str]:
    return [str(FRR_DIR / daemon), "-f", str(folder / f"{daemon}.conf"), "-i", str(folder / f"{daemon}.pid"),
            "-z", str(folder / "zserv.api"), "--vty_socket", str(folder), "-P", "0", "-u", "frr", "-g", "frr"]


def start(speaker: Speaker, folder: Path) -> list[int]:
    """Start zebra, wait for its socket, then bgpd. Returns their pids."""
    write_config(folder, speaker)
    zebra = start_daemon(speaker.netns, folder, "zebra")
    deadline = time.monotonic() + 10
    while not (folder / "zserv.api").exists():
        if time.monotonic() > deadline:
            raise ApplyError(f"zebra in {speaker.name} did not start (see {folder / 'frr.log'})")
        time.sleep(0.01)
    return [zebra, start_daemon(speaker.netns, folder, "bgpd")]


def start_daemon(ns: str, folder: Path, daemon: str) -> int:
    """One FRR daemon of an instance whose config is already written (also how a stopped one restarts)."""
    return process.spawn_in(ns, _daemon_argv(daemon, folder), str(folder / "frr.log"))


def vtysh(folder: Path, command: str, timeout: float = 10) -> str:
    """Ask one instance something through its own vty socket folder."""
    proc = subprocess.run(["vtysh", "--vty_socket", str(folder), "-c", command], capture_output=True, text=True,
                          timeout=timeout)
    return proc.stdout


@dataclass
class Convergence:
    seconds: float
    missing: dict[str, list[str]]  # speaker -> routes not (yet) in its kernel


def missing_routes(speakers: Iterable[Speaker], handles: dict[str, Rtnl]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in speakers:
        have = {r.dst for r in handles[s.netns].routes() if r.protocol == RTPROT_BGP}
        lacking = [str(n) for n in s.expected if n not in have]
        if lacking:
            out[s.name] = lacking
    return out


def wait_converged(speakers: list[Speaker], handles: dict[str, Rtnl], folders: dict[str, Path],
                   timeout: float) -> float:
    """Block until every speaker's kernel holds every route it should learn; explain a timeout."""
    started = time.monotonic()
    while True:
        missing = missing_routes(speakers, handles)
        if not missing:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise ApplyError(f"BGP did not converge in {timeout:.0f} s: {explain(speakers, folders, missing)}")
        time.sleep(0.05)


def peer_states(folder: Path) -> dict[str, str]:
    """neighbor description (or IP) -> BGP state, from `show bgp summary json`."""
    try:
        data = json.loads(vtysh(folder, "show bgp ipv4 unicast summary json") or "{}")
    except (ValueError, subprocess.TimeoutExpired):
        return {}
    peers = data.get("peers", {})
    return {v.get("desc", ip) or ip: v.get("state", "?") for ip, v in peers.items()}


def explain(speakers: list[Speaker], folders: dict[str, Path], missing: dict[str, list[str]]) -> str:
    parts = []
    for s in speakers:
        if s.name not in missing:
            continue
        down = [f"{peer} {state}" for peer, state in peer_states(folders[s.name]).items() if state != "Established"]
        why = f"sessions not up: {', '.join(down)}" if down else "sessions up but routes missing"
        parts.append(f"{s.name} lacks {', '.join(missing[s.name])} ({why})")
    return "; ".join(parts)
