"""What `lab observe` costs the traffic it watches: per profile, the two-node lab of bench/dataplanes.py
(pods a, c on node1 and b on node2, iperf3 and agnhost in each, Service b), measured without an observer
and with `lab observe --follow` running (its output to a file, as a terminal would take it), side by side:

- one TCP stream pod a -> pod b across nodes (iperf3): one connection, a handful of events;
- short connections pod a -> Service b's ClusterIP (a Python loop of connect/close in the pod): every one
  an event per node, the observer's worst case (it competes for the CPU with client and server);
- how many flows the observer printed and whether it reported EVENTS LOST.

Run alone: `python bench/observe.py` (see lab.bench_base.script_main), or `lab bench observe`.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lab.bench_base import bench_script  # noqa: E402  (bench/dataplanes.py, imported once)

PROFILES = {"flannel": "host-gw", "calico": "bgp", "cilium": "vxlan"}
CONNECTS = 1000


def lab_cli(*args: str, check: bool = True) -> str:
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=REPO, check=check, capture_output=True,
                          text=True).stdout


def up_lab(profile: str, folder: Path) -> str:
    name = f"bench-obs{profile[:3]}-{uuid.uuid4().hex[:4]}"
    data = bench_script("dataplanes").two_node_lab(name, PROFILES[profile])
    data["spec"]["cni"] = {"profile": profile}
    spec = folder / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(data))
    try:
        lab_cli("up", str(spec))
    except BaseException:
        from lab.bench_base import remove_lab
        remove_lab(name)
        raise
    return name


class Following:
    """`lab observe --follow` in the background, output to a file; `stop()` -> (flows printed, events lost)."""

    def __init__(self, name: str) -> None:
        self.out = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "observe", "--lab", name, "--follow"],
                                     stdout=self.out, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.proc.stderr.readline()  # "lab observe: ..." once it reads every source

    def stop(self) -> tuple[int, int]:
        time.sleep(0.5)  # let it print what is still in the rings
        self.proc.send_signal(signal.SIGINT)
        self.proc.communicate(timeout=30)
        self.out.seek(0)
        lines = self.out.read().splitlines()
        self.out.close()
        lost = sum(int(l.rsplit(":", 1)[1]) for l in lines if l.startswith("EVENTS LOST:"))
        return sum(1 for l in lines if not l.startswith("EVENTS LOST:")), lost


CONNECT_LOOP = """
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
for _ in range(n):
    socket.create_connection((host, port), timeout=2).close()
print(n / (time.perf_counter() - t))
"""


def measure(name: str, seconds: int, observed: bool) -> dict[str, float]:
    status = json.loads(lab_cli("status", name, "--json"))
    vip = next(s["clusterIP"] for s in status["services"] if s["name"] == "b")
    run = lambda *c: lab_cli("exec", "--lab", name, "a", "--", *c)  # noqa: E731
    follower = Following(name) if observed else None
    try:
        gbps = bench_script("dataplanes").iperf_gbps(run("iperf3", "-c", "10.244.2.2", "-t", str(seconds), "-J",
                                            "--connect-timeout", "3000"))
        rate = float(run("python3", "-c", CONNECT_LOOP, vip, "8080", str(CONNECTS)).strip())
    finally:
        flows, lost = follower.stop() if follower else (0, 0)
    return {"gbps": gbps, "connects_s": rate, "flows": flows, "lost": lost}


if __name__ == "__main__":
    from lab.bench_base import script_main

    sys.exit(script_main("observe", __doc__))
