"""What NetworkPolicy costs, calico profile (nftables) against cilium profile (identities in BPF maps), side
by side in one run (issue 19's numbers):

- update: one new pod among N pods (two nodes) and 100 policies, time to bring one node in line:
  calico renders the node's whole `table ip calico` and reloads it with one `nft -f` (cni/network_policy.py
  render + load, into a throwaway namespace with a lab-shaped name so `lab clean` removes it after a crash);
  cilium recomputes the node's identities, ipcache and every local endpoint's policy map
  (cilium/identity.py) and writes only the changed entries with batched map updates (as
  cilium/policy.py _write_policy does), into unpinned BPF maps that vanish with their descriptors.
- enforcement: one TCP stream pod a (node1) -> pod b (node2) with iperf3, on the two-node lab of
  bench/dataplanes.py per profile, without a policy and with a default-deny + allow-from-a policy applied
  with `lab apply` (removed with `lab delete -f`), in ABBA order inside one sample.

Run alone: `python bench/policy.py` (see lab.bench_base.script_main), or `lab bench policy`.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid
from ipaddress import IPv4Address
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lab.bench_base import bench_script  # noqa: E402  (bench/observe.py and dataplanes.py, imported once)
from topo import names, netns  # noqa: E402

POLICIES = 100
NAMESPACES = 10


def spec_text(pods: int, name: str = "bench-pol") -> str:
    """A two-node lab of `pods` pods in 10 namespaces, 50 app labels, and 100 policies that select one app
    each and allow another app from a labelled namespace set, an ipBlock, a port and a port range."""
    lines = ["apiVersion: kubenet-lab/v1alpha1", "kind: Lab", f"metadata: {{name: {name}}}", "spec:",
             "  cni: {profile: calico}", "  cluster: {nodeCIDRMaskSize: 22}", "  nodes:",
             "    - {name: node1, ip: 192.168.1.10}", "    - {name: node2, ip: 192.168.1.11}", "  objects:"]
    for n in range(NAMESPACES):
        lines.append(f"    - {{apiVersion: v1, kind: Namespace, metadata: {{name: ns{n}, labels: {{team: t{n % 3}}}}}}}")
    for i in range(pods):
        lines.append(f"    - {{apiVersion: v1, kind: Pod, metadata: {{name: p{i}, namespace: ns{i % NAMESPACES}, "
                     f"labels: {{app: a{i % 50}}}}}, spec: {{nodeName: node{1 + i % 2}, containers: "
                     "[{name: c, image: pause, ports: [{containerPort: 8080, name: http}]}]}}")
    for j in range(POLICIES):
        lines.append("    - apiVersion: networking.k8s.io/v1\n      kind: NetworkPolicy\n"
                     f"      metadata: {{name: np{j}, namespace: ns{j % NAMESPACES}}}\n"
                     f"      spec: {{podSelector: {{matchLabels: {{app: a{j % 50}}}}}, ingress: [{{from: "
                     f"[{{namespaceSelector: {{matchLabels: {{team: t{j % 3}}}}}, podSelector: {{matchLabels: "
                     f"{{app: a{(j + 1) % 50}}}}}}}, {{ipBlock: {{cidr: 10.{j}.0.0/16}}}}], "
                     "ports: [{port: 8080}, {port: 9000, endPort: 9100}]}]}")
    return "\n".join(lines) + "\n"


def _workloads(lab):  # type: ignore[no-untyped-def]
    from cni.network_policy import Workload

    base = int(IPv4Address("10.244.0.0"))
    return [Workload(p, IPv4Address(base + (int(p.node[-1]) << 10) + 2 + i // 2)) for i, p in enumerate(lab.pods)]


def _calico_update(lab, before, after) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(render s, render + nft load s) of node1 going from `before` to `after`."""
    from cni import network_policy

    tag = f"polbench{uuid.uuid4().hex[:6]}"  # lab-shaped: `lab clean` removes it after a crash
    ns = names.node_netns(tag, "node1")
    netns.ensure_dir()
    netns.create(ns)
    try:
        network_policy.load(ns, network_policy.render(lab, "node1", before))
        started = time.perf_counter()
        text = network_policy.render(lab, "node1", after)
        rendered = time.perf_counter() - started
        network_policy.load(ns, text)
        return rendered, time.perf_counter() - started
    finally:
        netns.delete(ns)


def _cilium_update(lab, before, after) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """(compute s, compute + map writes s, entries written) of node1 going from `before` to `after`."""
    from cilium import identity, libbpf

    def compute(workloads):  # type: ignore[no-untyped-def]
        model = identity.build(lab, workloads, alloc)
        identity.ipcache_entries(lab, "node1", workloads, model)
        return {w.pod.key: identity.endpoint_policy(lab, w, workloads, model) for w in workloads
                if w.pod.node == "node1"}

    def write(fd: int, want) -> int:  # type: ignore[no-untyped-def]
        have = dict(libbpf.entries(fd, identity.POLICY_KEY.size, identity.POLICY_ENTRY.size))
        packed = {k.pack(): identity.policy_entry(pid) for k, pid in want.items()}
        changed = [(k, v) for k, v in packed.items() if have.get(k) != v]
        if changed:
            libbpf.update_batch(fd, b"".join(k for k, _ in changed), b"".join(v for _, v in changed), len(changed))
        stale = [k for k in have if k not in packed]
        libbpf.delete_batch(fd, b"".join(stale), len(stale))
        return len(changed) + len(stale)

    def new_map() -> int:
        return libbpf.map_create(libbpf.BPF_MAP_TYPE_LPM_TRIE, "kubenet_polb", identity.POLICY_KEY.size,
                                 identity.POLICY_ENTRY.size, identity.POLICY_MAX_ENTRIES, libbpf.BPF_F_NO_PREALLOC)

    alloc = identity.Allocation()
    fds: dict[str, int] = {}
    try:
        for key, want in compute(before).items():
            fds[key] = new_map()
            write(fds[key], want)
        started = time.perf_counter()
        wanted = compute(after)
        computed = time.perf_counter() - started
        written = 0
        for key, want in wanted.items():
            if key not in fds:
                fds[key] = new_map()
            written += write(fds[key], want)
        return computed, time.perf_counter() - started, written
    finally:
        for fd in fds.values():
            os.close(fd)


def update_case(pods: int) -> dict[str, float]:
    """One sample of the update case: `pods` pods (the last one is the new pod) on two nodes."""
    from apiserver.spec import parse_spec_text

    lab = parse_spec_text(spec_text(pods))
    after = _workloads(lab)
    new = next(w for w in reversed(after) if w.pod.node == "node1")
    before = [w for w in after if w is not new]
    render_s, calico_s = _calico_update(lab, before, after)
    compute_s, cilium_s, written = _cilium_update(lab, before, after)
    return {"calico_render_s": render_s, "calico_s": calico_s, "cilium_compute_s": compute_s, "cilium_s": cilium_s,
            "cilium_entries_written": written}


# ---------------------------------------------------------------------------- enforcement on real labs

POLICY = [
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "bench-deny"},
     "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}},
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "bench-allow-a"},
     "spec": {"podSelector": {"matchLabels": {"app": "b"}},
              "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}], "ports": [{"port": 5201}]}]}},
]


def _lab(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lab {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def up_lab(profile: str, folder: Path) -> tuple[str, Path]:
    """The lab and the policy file that `lab apply` / `lab delete -f` switch on and off."""
    name = bench_script("observe").up_lab(profile, folder)
    path = folder / f"{name}-policy.yaml"
    path.write_text(yaml.safe_dump_all(POLICY, sort_keys=False))
    return name, path


def _gbps(name: str, seconds: int) -> float:
    out = _lab("exec", "--lab", name, "a", "--", "iperf3", "-c", "10.244.2.2", "-t", str(seconds), "-J",
               "--connect-timeout", "3000")
    return bench_script("dataplanes").iperf_gbps(out)


def _reaches(name: str, pod: str) -> bool:
    """Whether `pod` connects to pod b's iperf3 port (a second's timeout)."""
    probe = "import socket; socket.create_connection(('10.244.2.2', 5201), timeout=1).close()"
    return subprocess.run([sys.executable, "-m", "lab.cli", "exec", "--lab", name, pod, "--", "python3", "-c", probe],
                          cwd=REPO, capture_output=True).returncode == 0


def enforcement_case(name: str, policy_file: Path, seconds: int) -> dict[str, float]:
    """none, policy, policy, none (ABBA): the means of each side and their ratio."""
    none, policy = [], []
    for side in ("none", "policy", "policy", "none"):
        if side == "policy" and not policy:
            _lab("apply", "--lab", name, "-f", str(policy_file))
            if _reaches(name, "c"):  # measured with rules that do nothing would be no measurement
                raise RuntimeError(f"lab bench policy: pod c still reaches pod b in {name} with the policy applied")
        if side == "none" and policy:
            _lab("delete", "--lab", name, "-f", str(policy_file))
        (policy if side == "policy" else none).append(_gbps(name, seconds))
    a, b = statistics.fmean(none), statistics.fmean(policy)
    return {"gbps_none": a, "gbps_policy": b, "ratio": b / a if a else float("nan")}


if __name__ == "__main__":
    from lab.bench_base import script_main

    sys.exit(script_main("policy", __doc__))
