"""`lab apply` / `lab delete` as a reconciler (issue 15): every layer follows a change and its daemon serves
it, a command killed at any step converges when run again, and the lab's state is not a single point of
failure. Kill points are driven deterministically: KUBENET_LAB_CRASH_AT=STEP:N makes the command kill
itself (SIGKILL, nothing runs after it) the N-th time it passes STEP (topo/crash.py).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, in_lab, lab, leftovers, pause_pod, seed_spec, unique

pytestmark = pytest.mark.integration

RUN = Path("/run/kubenet-lab")


def manifests(tmp: Path, name: str, *objs: dict) -> str:
    path = tmp / f"{name}.yaml"
    path.write_text("\n---\n".join(json.dumps(o) for o in objs))
    return str(path)


def service(name: str, app: str, port: int = 80) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": app}, "ports": [{"port": port, "targetPort": 8080}]}}


def ingress(name: str, host: str, svc: str) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": name},
            "spec": {"rules": [{"host": host, "http": {"paths": [
                {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": svc, "port": {"number": 80}}}}]}}]}}


def agnhost_pod(name: str, node: str, app: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [
                {"name": "app", "image": "agnhost", "args": ["netexec", "--http-port=8080"]}]}}


def crashing(args: list[str], step: str, count: int = 1) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KUBENET_LAB_CRASH_AT=f"{step}:{count}")
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=env)


def status(name: str) -> dict:
    return json.loads(lab("status", name, "--json").stdout)


def pod_namespaces(name: str) -> list[str]:
    prefix = f"klab_{name}_p_"
    return sorted(n for n in os.listdir("/run/netns") if n.startswith(prefix))


def leases(name: str) -> list[str]:
    """Every IP the lab's IPAM has handed out (host-local's one file per IP, or the lab's lease files)."""
    found = []
    for path in (RUN / name / "ipam").rglob("*"):
        if path.is_file():
            text = path.read_text()
            try:
                data = json.loads(text)
            except ValueError:
                continue
            if isinstance(data, dict):
                found += [ip for ip in data.get("leases", data) if isinstance(ip, str) and ip[0].isdigit()]
    return sorted(found)


def assert_converged(name: str, pods: list[str]) -> None:
    info = status(name)
    running = {f"{p['namespace']}/{p['name']}": p for p in info["pods"]}
    for key in pods:
        assert key in running, f"{key} missing after re-running the command: {sorted(running)}"
    ips = [p["ip"] for p in running.values()]
    assert len(ips) == len(set(ips)), f"duplicate pod IPs: {sorted(ips)}"
    assert len(pod_namespaces(name)) == len(running), (pod_namespaces(name), sorted(running))


# ---------------------------------------------------------------------------- every layer follows

def test_applied_service_resolves_in_cluster_dns_and_second_ingress_routes(lab_up, tmp_path: Path) -> None:
    name = unique("recon")
    data = seed_spec(name)
    data["spec"]["external"][0]["serves"] = ["http", "dns"]
    lab_up(data)
    lab("apply", "--lab", name, "-f", manifests(tmp_path, "svc", service("late", "web")))
    ip = next(s["clusterIP"] for s in status(name)["services"] if s["name"] == "late")
    got = in_lab(name, "node1-pod1", "getent", "hosts", "late.default.svc.cluster.local", check=False)
    assert got.split()[:1] == [ip], f"the applied service does not resolve: {got!r}"

    lab("apply", "--lab", name, "-f", manifests(tmp_path, "i1", ingress("one", "one.example.test", "web")))
    lab("apply", "--lab", name, "-f", manifests(tmp_path, "i2", service("two", "web"),
                                                 ingress("two", "two.example.test", "two")))
    for host in ("one.example.test", "two.example.test"):
        got = in_lab(name, "external-web", "curl", "-s", "--max-time", "5", "-H", f"Host: {host}",
                     "http://192.168.1.10:30080/hostname", check=False)
        assert got in ("node1-pod1", "node1-pod2", "node2-pod1"), f"{host} is not routed: {got!r}"


# ---------------------------------------------------------------------------- crash-safe

APPLY_STEPS = ["objects-recorded", "pod-netns", "pod-cni-added", "pod-started", "pod-recorded", "resync"]


@pytest.mark.parametrize("step", APPLY_STEPS)
def test_killed_apply_converges_when_run_again(lab_up, tmp_path: Path, step: str) -> None:
    name = unique("crash")
    lab_up(seed_spec(name))
    pods = [pause_pod(f"p{i}", "node1" if i % 2 else "node2", app="crash") for i in range(6)]
    file = manifests(tmp_path, "pods", *pods, service("crash", "crash"))
    killed = crashing(["apply", "--lab", name, "-f", file], step, count=3 if step.startswith("pod") else 1)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stdout, killed.stderr)
    again = lab("apply", "--lab", name, "-f", file, check=False)
    assert again.returncode == 0, again.stderr
    assert_converged(name, [f"default/p{i}" for i in range(6)])
    svc = next(s for s in status(name)["services"] if s["name"] == "crash")
    assert len(svc["endpoints"]) == 6, svc


@pytest.mark.parametrize("step", ["objects-recorded", "pod-deleted", "resync"])
def test_killed_delete_converges_when_run_again(lab_up, tmp_path: Path, step: str) -> None:
    name = unique("crash")
    lab_up(seed_spec(name))
    file = manifests(tmp_path, "pods", *[pause_pod(f"p{i}", "node1", app="crash") for i in range(3)])
    lab("apply", "--lab", name, "-f", file)
    killed = crashing(["delete", "--lab", name, "-f", file], step, count=2 if step == "pod-deleted" else 1)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    lab("delete", "--lab", name, "-f", file)
    assert_converged(name, ["default/node1-pod1", "default/node1-pod2", "default/node2-pod1"])
    assert not any(p["name"].startswith("p") and p["name"][1:].isdigit() for p in status(name)["pods"])


# ---------------------------------------------------------------------------- state is not the only truth

def test_lost_or_junk_lease_file_never_gives_a_duplicate_ip(lab_up, tmp_path: Path) -> None:
    name = unique("lease")
    lab_up(seed_spec(name))
    taken = {p["ip"] for p in status(name)["pods"]}
    for index, damage in enumerate(("delete", "junk")):
        for path in (RUN / name / "ipam").rglob("*"):
            if path.is_file():
                path.unlink() if damage == "delete" else path.write_text("{not json")
        out = lab("apply", "--lab", name, "-f", manifests(tmp_path, f"p{index}", pause_pod(f"new{index}", "node1")))
        new = next(p["ip"] for p in status(name)["pods"] if p["name"] == f"new{index}")
        assert new not in taken, f"{damage} lease file: new pod got {new}, already in use ({out.stdout})"
        taken.add(new)


def test_down_and_status_work_without_a_readable_state(lab_up) -> None:
    broken, fine = unique("broken"), unique("fine")
    lab_up(seed_spec(broken))
    lab_up(seed_spec(fine))
    (RUN / broken / "state.json").write_text("{junk")
    listing = lab("status", check=False)
    assert "Traceback" not in listing.stderr
    assert lab("status", fine).returncode == 0  # one broken lab never breaks commands on another
    down = lab("down", broken)
    assert "state" in down.stdout + down.stderr  # it says it worked from the kernel
    assert leftovers(broken) == {"netns": [], "state": []}

    (RUN / fine / "state.json").unlink()
    lab("down", fine)
    assert leftovers(fine) == {"netns": [], "state": []}


def test_two_labs_change_at_once(lab_up, tmp_path: Path) -> None:
    """Locks are per lab: while a command on one lab is held mid-way (stopped with its lab's lock held), a
    command on another lab goes through; then the first one finishes too."""
    first, second = unique("conc"), unique("conc")
    lab_up(seed_spec(first))
    lab_up(seed_spec(second))
    files = {n: manifests(tmp_path, n, *[pause_pod(f"c{i}", "node1") for i in range(4)]) for n in (first, second)}
    env = dict(os.environ, KUBENET_LAB_CRASH_AT="objects-recorded:1:stop")
    held = subprocess.Popen([sys.executable, "-m", "lab.cli", "apply", "--lab", first, "-f", files[first]], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while Path(f"/proc/{held.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            assert held.poll() is None and time.monotonic() < deadline, "the first apply never reached its stop"
            time.sleep(0.05)
        lab("apply", "--lab", second, "-f", files[second], timeout=60)  # not blocked by the first lab's lock
        assert_converged(second, [f"default/c{i}" for i in range(4)])
    finally:
        os.kill(held.pid, signal.SIGCONT)
        _, err = held.communicate(timeout=120)
    assert held.returncode == 0, err
    assert_converged(first, [f"default/c{i}" for i in range(4)])


def _dnat(name: str, ip: str) -> bool:
    """Whether node1's kernel sends service traffic to ip:8080 (a KUBE-SEP chain's DNAT)."""
    return f"--to-destination {ip}:8080" in in_lab(name, "node1", "iptables-save", "-t", "nat")


def test_a_one_pod_change_finishes_a_killed_resync_and_drops_a_dead_pod(lab_up, tmp_path: Path) -> None:
    """A one-pod change syncs service rules only when a service selects the changed pod (reconcile/resync.py,
    Delta), which is right only while everything else is in line. Twice it is not: the command before was
    killed before its resync, and a pod's sandbox died by itself. The next one-pod change that no service
    cares about must then bring every service's rules in line all the same."""
    name = unique("delta")
    lab_up(seed_spec(name))
    lab("apply", "--lab", name, "-f", manifests(tmp_path, "svc", service("late", "late")))
    killed = crashing(["apply", "--lab", name, "-f", manifests(tmp_path, "a", pause_pod("a", "node1", app="late"))],
                      "resync")
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    ip = next(p["ip"] for p in status(name)["pods"] if p["name"] == "a")
    assert not _dnat(name, ip)  # killed before the rules followed
    lab("apply", "--lab", name, "-f", manifests(tmp_path, "b", pause_pod("b", "node2", app="other")))
    assert _dnat(name, ip), "a later one-pod change left the killed command's service rules unsynced"

    pid = json.loads((RUN / name / "state.json").read_text())["pods"]["default/a"]["pause_pid"]
    os.kill(pid, signal.SIGKILL)  # the sandbox dies on its own: no endpoint any more, as the controller would see
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    lab("apply", "--lab", name, "-f", manifests(tmp_path, "c", pause_pod("c", "node2", app="other")))
    assert not _dnat(name, ip), "a one-pod change kept a dead pod as a service endpoint"


# ---------------------------------------------------------------------------- bounded state, kubectl habits

def test_create_delete_cycles_leave_state_and_logs_as_they_were(lab_up, tmp_path: Path) -> None:
    name = unique("cycle")
    lab_up(seed_spec(name))
    file = manifests(tmp_path, "churn", agnhost_pod("churn", "node1", "churn"), service("churn", "churn"))
    lab("apply", "--lab", name, "-f", file)
    lab("delete", "--lab", name, "-f", file)
    def recorded() -> dict:
        data = json.loads((RUN / name / "state.json").read_text())
        return {k: data[k] for k in ("objects", "deleted", "pods")}

    start, size, logs = recorded(), (RUN / name / "state.json").stat().st_size, sorted(os.listdir(RUN / name / "logs"))
    for _ in range(20):
        lab("apply", "--lab", name, "-f", file)
        lab("delete", "--lab", name, "-f", file)
    assert recorded() == start  # no dead manifests, no deleted-object list growing
    assert (RUN / name / "state.json").stat().st_size <= size + 4  # the generation counter's digits only
    assert sorted(os.listdir(RUN / name / "logs")) == logs


def _once_not_running(name: str, pod_name: str, timeout: float = 10.0) -> dict:
    """The pod's `lab status --json` entry once it is no longer Running (its container exits soon), or at the
    timeout as it is then."""
    deadline = time.monotonic() + timeout
    while True:
        pod = next(p for p in status(name)["pods"] if p["name"] == pod_name)
        if pod["status"] != "Running" or time.monotonic() > deadline:
            return pod
        time.sleep(0.2)


def test_pod_status_follows_its_containers_and_a_moved_pod_moves(lab_up, tmp_path: Path) -> None:
    name = unique("phase")
    lab_up(seed_spec(name))
    done = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "done", "labels": {"app": "done"}},
            "spec": {"nodeName": "node1", "restartPolicy": "Never",
                     "containers": [{"name": "once", "image": "busybox", "command": ["true"]}]}}
    lab("apply", "--lab", name, "-f", manifests(tmp_path, "done", done))
    pod = _once_not_running(name, "done")
    assert pod["status"] == "Terminated", pod
    # Two containers on one port: one of them cannot bind and exits, the other runs. kubectl shows such a pod
    # not ready (READY 1/2); `lab status` said Running, as if nothing had happened (exercise 01's "Try also").
    clash = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "clash"},
             "spec": {"nodeName": "node1", "containers": [
                 {"name": c, "image": "agnhost", "args": ["netexec", "--http-port=9000"]} for c in ("a", "b")]}}
    lab("apply", "--lab", name, "-f", manifests(tmp_path, "clash", clash))
    pod = _once_not_running(name, "clash")
    assert pod["status"] == "NotReady" and pod["ready"] == "1/2", pod
    assert re.search(r"clash\s+default\s+node1\s+\S+\s+1/2\s+NotReady", lab("status", name).stdout)

    moved = pause_pod("mover", "node1")
    lab("apply", "--lab", name, "-f", manifests(tmp_path, "m1", moved))
    moved["spec"]["nodeName"] = "node2"
    out = lab("apply", "--lab", name, "-f", manifests(tmp_path, "m2", moved)).stdout
    assert "unchanged" not in out
    pod = next(p for p in status(name)["pods"] if p["name"] == "mover")
    assert pod["node"] == "node2" and pod["ip"].startswith("10.244.2."), pod


def test_version_and_delete_by_file(lab_up, tmp_path: Path) -> None:
    out = lab("--version").stdout
    assert out.startswith("lab ") and out.split()[1][0].isdigit()
    name = unique("delf")
    lab_up(seed_spec(name))
    file = manifests(tmp_path, "x", pause_pod("gone", "node1"), service("gone", "x"))
    lab("apply", "--lab", name, "-f", file)
    out = lab("delete", "--lab", name, "-f", file).stdout
    assert "pod default/gone deleted" in out and "service default/gone deleted" in out
    info = status(name)
    assert all(p["name"] != "gone" for p in info["pods"]) and all(s["name"] != "gone" for s in info["services"])


def test_delete_by_file_removes_a_namespace_and_a_deployment_scaled_to_zero(lab_up, tmp_path: Path) -> None:
    """`lab delete -f` of a file declaring a Namespace and what lives in it removes all of it (it was refused,
    naming the pods of `default`), `lab delete namespace` works as kubectl's does, and a Deployment scaled to
    zero is still an object to delete (it was "not found" by name and by file). Found on a new user's walk."""
    name = unique("delns")
    lab_up(seed_spec(name))
    team = manifests(tmp_path, "team", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}},
                     pause_pod("member", "node1", "team"))
    lab("apply", "--lab", name, "-f", team)
    out = lab("delete", "--lab", name, "-f", team).stdout
    assert "pod team/member deleted" in out and "namespace team deleted" in out, out
    assert all(p["namespace"] != "team" for p in status(name)["pods"])
    lab("apply", "--lab", name, "-f", team)
    busy = lab("delete", "--lab", name, "namespace", "team", check=False)
    assert busy.returncode == 2 and "team/member" in busy.stderr and "default/" not in busy.stderr, busy.stderr
    lab("delete", "--lab", name, "pod", "member", "-n", "team")
    assert "namespace team deleted" in lab("delete", "--lab", name, "namespace", "team").stdout

    idle = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "idle"},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "idle"}},
                     "template": {"metadata": {"labels": {"app": "idle"}},
                                  "spec": {"containers": [{"name": "pause", "image": "pause"}]}}}}
    file = manifests(tmp_path, "idle", idle)
    lab("apply", "--lab", name, "-f", file)
    assert "deployment.apps default/idle deleted" in lab("delete", "--lab", name, "deployment", "idle").stdout
    lab("apply", "--lab", name, "-f", file)
    assert "deployment.apps default/idle deleted" in lab("delete", "--lab", name, "-f", file).stdout
    assert "deployment default/idle not found" in lab("delete", "--lab", name, "-f", file).stdout


def test_reapplying_a_running_pod_with_another_spec_is_refused(lab_up, tmp_path: Path) -> None:
    """A running pod's spec cannot change in place (Kubernetes refuses the update); re-applying one with a new
    dnsConfig said "pod default/app unchanged" and left it as it ran (found walking exercise 09-ndots)."""
    name = unique("respec")
    lab_up(seed_spec(name))
    app = pause_pod("app", "node1")
    lab("apply", "--lab", name, "-f", manifests(tmp_path, "a1", app))
    app["spec"]["dnsConfig"] = {"options": [{"name": "ndots", "value": "1"}]}
    proc = lab("apply", "--lab", name, "-f", manifests(tmp_path, "a2", app), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().endswith(
        "objects[0].spec: pod default/app runs with another spec, and a pod's spec cannot change in place "
        "(Kubernetes refuses the update): delete it first (lab delete pod app -n default), then apply"), proc.stderr
    assert "ndots:5" in in_lab(name, "app", "cat", "/etc/resolv.conf")  # as it was
    app["metadata"]["labels"] = {"app": "y"}
    del app["spec"]["dnsConfig"]
    assert "pod default/app configured (labels)" in lab("apply", "--lab", name, "-f", manifests(tmp_path, "a3", app)).stdout


def test_reapplying_an_unchanged_file_says_unchanged(lab_up, tmp_path: Path) -> None:
    """As `kubectl apply` answers: an object applied again as it is is "unchanged", one that differs is
    "configured" (every re-applied service, ingress and policy said "configured", a namespace nothing)."""
    name = unique("same")
    lab_up(seed_spec(name))
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "quiet"},
              "spec": {"podSelector": {"matchLabels": {"app": "web2"}}, "policyTypes": ["Ingress"]}}
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web2"},
              "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web2"}}, "template": {
                  "metadata": {"labels": {"app": "web2"}}, "spec": {"containers": [{"name": "p", "image": "pause"}]}}}}
    objs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team", "labels": {"tier": "a"}}},
            service("web2", "web2"), ingress("web2", "web2.example.test", "web2"), policy, deploy]
    file = manifests(tmp_path, "objs", *objs)
    out = lab("apply", "--lab", name, "-f", file).stdout
    # the Deployment is reported itself, as kubectl does, not only through its pods (it said nothing of it)
    for line in ("namespace team created", "service default/web2 created", "ingress default/web2 created",
                 "networkpolicy default/quiet created", "deployment.apps default/web2 created"):
        assert line in out, out
    out = lab("apply", "--lab", name, "-f", file).stdout
    for line in ("namespace team unchanged", "service default/web2 unchanged", "ingress default/web2 unchanged",
                 "networkpolicy default/quiet unchanged", "deployment.apps default/web2 unchanged"):
        assert line in out, out
    assert "configured" not in out, out
    objs[0]["metadata"]["labels"] = {"tier": "b"}
    objs[1] = service("web2", "web3")  # another selector
    objs[4]["spec"]["replicas"] = 2
    out = lab("apply", "--lab", name, "-f", manifests(tmp_path, "changed", *objs)).stdout
    for line in ("namespace team configured", "service default/web2 configured", "ingress default/web2 unchanged",
                 "deployment.apps default/web2 configured"):
        assert line in out, out


# ---------------------------------------------------------------------------- lab up / lab down killed, progress

def scale_spec(name: str, pods: int) -> dict:
    data = seed_spec(name)
    data["spec"]["objects"].append({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "many"},
        "spec": {"replicas": pods, "selector": {"matchLabels": {"app": "many"}},
                 "template": {"metadata": {"labels": {"app": "many"}},
                              "spec": {"containers": [{"name": "pause", "image": "pause"}]}}}})
    return data


@pytest.mark.parametrize("step", ["up-pod", "down-processes", "down-namespace"])
def test_killed_up_or_down_converges_when_run_again(tmp_path: Path, step: str) -> None:
    name = unique("crash")
    spec = tmp_path / "lab.yaml"
    spec.write_text(json.dumps(seed_spec(name)))
    try:
        if step == "up-pod":
            killed = crashing(["up", str(spec)], step, count=2)
            assert killed.returncode == -signal.SIGKILL, killed.stderr
            lab("up", str(spec))  # the same command again builds the lab, over what the killed one left
            assert_converged(name, ["default/node1-pod1", "default/node1-pod2", "default/node2-pod1"])
        else:
            lab("up", str(spec))
            killed = crashing(["down", name], step, count=1 if step == "down-processes" else 3)
            assert killed.returncode == -signal.SIGKILL, killed.stderr
        lab("down", name)
        assert leftovers(name) == {"netns": [], "state": []}
    finally:
        lab("down", name, check=False)


def test_progress_bar_on_a_terminal_only(tmp_path: Path) -> None:
    name = unique("prog")
    spec = tmp_path / "lab.yaml"
    spec.write_text(json.dumps(scale_spec(name, 30)))
    command = " ".join([sys.executable, "-m", "lab.cli", "up", str(spec)])  # test constants only, no spec text
    try:
        on_tty = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, text=True,
                                timeout=120, cwd=REPO)
        assert on_tty.returncode == 0, on_tty.stdout
        assert f"lab up {name}: pods" in on_tty.stdout and "/34" in on_tty.stdout, on_tty.stdout[-500:]
        piped = lab("down", name)
        assert "removing namespaces" not in piped.stdout + piped.stderr
    finally:
        lab("down", name, check=False)


def test_apply_reads_files_as_a_spec_is_read_and_names_root_containers(lab_up, tmp_path: Path) -> None:
    """`lab apply -f` refuses what `lab up` refuses (a file over the size limit, in one line, before reading
    it), and says which containers it starts as root on the machine, as `lab up` does."""
    name = unique("applyin")
    lab_up(seed_spec(name))
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)  # 2 MB of comments
    refused = lab("apply", "--lab", name, "-f", str(big), check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    root = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "rooty"},
            "spec": {"nodeName": "node1", "securityContext": {"runAsUser": 0},
                     "containers": [{"name": "c", "image": "pause"}]}}
    out = lab("apply", "--lab", name, "-f", manifests(tmp_path, "root", root))
    assert "run" in out.stderr and "as root" in out.stderr and "default/rooty/c" in out.stderr, out.stderr


def test_killed_in_the_node_cache_layer_converges(lab_up, tmp_path: Path) -> None:
    """NodeLocal DNSCache reconciles like the other layers: a command killed just after a node's cache
    started but before it was recorded leaves one cache, not two, once the same command is run again."""
    name = unique("crash")
    data = seed_spec(name)
    data["spec"]["dns"]["nodeLocal"] = True
    lab_up(data)
    file = manifests(tmp_path, "pod", pause_pod("cached", "node1"))
    killed = crashing(["apply", "--lab", name, "-f", file], "nodelocal", count=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    lab("apply", "--lab", name, "-f", file)
    assert_converged(name, ["default/cached"])
    for node in ("node1", "node2"):
        # one process table for the machine: count the caches by their node's config file
        caches = in_lab(name, node, "pgrep", "-fc", f"conf-file=/run/kubenet-lab/{name}/nodelocal/{node}/", check=False)
        assert caches.strip() == "1", f"{node}: {caches!r} node caches"
    got = in_lab(name, "default/cached", "getent", "hosts", "web.default.svc.cluster.local", check=False)
    assert got.split()[:1] == ["10.96.0.100"], got
