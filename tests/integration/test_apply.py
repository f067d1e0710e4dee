"""`lab apply` and `lab delete` of every kind on a running lab, as kubectl would change a cluster."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from apiserver import state
from kubelet import runtime
from tests.integration.conftest import in_lab, lab, pause_pod, seed_spec, unique
from topo import netns

pytestmark = pytest.mark.integration

AGNHOST = [{"name": "app", "image": "agnhost", "args": ["netexec", "--http-port=8080"]}]


def manifests(tmp: Path, name: str, *objs: dict) -> str:
    path = tmp / f"{name}.yaml"
    path.write_text("\n---\n".join(json.dumps(o) for o in objs))
    return str(path)


def pod(name: str, namespace: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace,
                                                           "labels": {"app": name}},
            "spec": {"nodeName": "node1", "containers": AGNHOST}}


def service(name: str, namespace: str = "default") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}}


def cluster_ips(name: str) -> dict[str, str]:
    info = json.loads(lab("status", name, "--json").stdout)
    return {f"{s['namespace']}/{s['name']}": s["clusterIP"] for s in info["services"]}


def test_services_ingresses_and_namespaces_applied_later(lab_up, tmp_path: Path) -> None:
    name = unique("apply")
    lab_up({"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"nodes": [{"name": "node1", "ip": "192.168.1.10"}, {"name": "node2", "ip": "192.168.1.11"}],
                     "external": [{"name": "outside", "ip": "192.168.1.200", "serves": ["http"]}],
                     "objects": [pod("web"), service("web")]}})
    ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "api", "namespace": "team"},
               "spec": {"rules": [{"host": "api.example.test", "http": {"paths": [
                   {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "api", "port": {"number": 80}}}}]}}]}}
    team = manifests(tmp_path, "team", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}},
                     pod("api", "team"), service("api", "team"), ingress)
    out = lab("apply", "--lab", name, "-f", team).stdout
    for line in ("namespace team created", "service team/api created", "ingress team/api created",
                 "pod team/api created", "pod ingress-nginx/ingress-nginx created"):
        assert line in out, out
    got = in_lab(name, "outside", "curl", "-s", "--max-time", "5", "-H", "Host: api.example.test",
                 "http://192.168.1.10:30080/hostname")
    assert got == "api"

    ips = cluster_ips(name)
    again = lab("apply", "--lab", name, "-f", team).stdout
    assert "service team/api unchanged" in again and "ingress team/api unchanged" in again, again
    spec_web = manifests(tmp_path, "web", service("web"))
    lab("apply", "--lab", name, "-f", spec_web)  # re-applying a spec-defined service is fine
    assert cluster_ips(name) == ips  # and nobody's addresses moved

    db = manifests(tmp_path, "db", service("db", "team"))
    lab("apply", "--lab", name, "-f", db)
    db_ip = cluster_ips(name)["team/db"]
    busy = lab("delete", "--lab", name, "service", "api", "-n", "team", check=False)
    assert busy.returncode == 2 and "backend of ingress team/api" in busy.stderr
    lab("delete", "--lab", name, "ingress", "api", "-n", "team")
    lab("delete", "--lab", name, "service", "api", "-n", "team")
    lab("apply", "--lab", name, "-f", db)
    assert cluster_ips(name)["team/db"] == db_ip
    assert "team/api" not in cluster_ips(name)

    lab("delete", "--lab", name, "service", "web")
    assert "default/web" not in cluster_ips(name)
    lab("apply", "--lab", name, "-f", spec_web)
    assert "default/web" in cluster_ips(name)


def test_cni0_keeps_its_mac_when_pods_come_and_go(lab_up, tmp_path: Path) -> None:
    """A bridge without a fixed MAC takes its ports' lowest; deleting that pod would move the gateway's
    MAC under the other pods (kubernetes#30783). cni0's is fixed (0a:58 + gateway IP), so they never notice."""
    name = unique("mac")
    data = seed_spec(name)
    data["spec"]["objects"] = [pause_pod(f"p{i}", "node1") for i in range(4)]
    lab_up(data)
    mac = in_lab(name, "node1", "cat", "/sys/class/net/cni0/address").strip()
    assert mac == "0a:58:0a:f4:01:01"
    assert in_lab(name, "node1", "cat", "/sys/class/net/cni0/addr_assign_type").strip() == "3"  # NET_ADDR_SET
    for i in range(3):
        lab("delete", "--lab", name, "pod", f"p{i}")
        assert in_lab(name, "node1", "cat", "/sys/class/net/cni0/address").strip() == mac
    in_lab(name, "p3", "ping", "-c1", "-W1", "10.244.1.1")
    assert mac in in_lab(name, "p3", "ip", "neigh", "show", "10.244.1.1")


def _mount_points(name: str, target: str) -> set[str]:
    return {line.split()[4] for line in in_lab(name, target, "cat", "/proc/self/mountinfo").splitlines()}


def test_an_applied_pod_has_the_mounts_of_one_made_at_up(lab_up, tmp_path: Path) -> None:
    """`lab apply` copies a new pod's mount namespace from a running pod's (minus that pod's own mounts)
    instead of the machine's: the new pod must see just what a pod made by `lab up` sees, its own files."""
    name = unique("mnt")
    data = seed_spec(name)
    data["spec"]["objects"] = [pod("early")]
    lab_up(data)
    early = _mount_points(name, "early")
    # A mount made in a pod is that pod's: a later pod copied from it must not get it.
    in_lab(name, "early", "mount", "-t", "tmpfs", "kubenet-lab-test", "/tmp")
    assert "/tmp" in _mount_points(name, "early")
    assert "pod default/late created" in lab("apply", "--lab", name, "-f", manifests(tmp_path, "late", pod("late"))).stdout
    late = _mount_points(name, "late")
    assert late == early
    assert "kubenet-lab-test" not in in_lab(name, "late", "cat", "/proc/self/mountinfo")
    assert not any(p.startswith("/run/netns") for p in late), late  # no pin of any lab's namespaces
    assert {"/sys", "/etc/resolv.conf", "/etc/hosts"} <= late
    assert in_lab(name, "late", "hostname").strip() == "late"
    assert "late" in in_lab(name, "late", "cat", "/etc/hosts")
    assert in_lab(name, "late", "cat", "/etc/resolv.conf") == in_lab(name, "early", "cat", "/etc/resolv.conf")


def test_a_pods_mount_namespace_is_copied_while_another_thread_runs(lab_up, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy is made in processes that have other threads (a library's, as OpenBLAS's once matplotlib is
    imported, in this very test process): entering a mount namespace failed there with EINVAL until the thread
    stopped sharing its filesystem attributes first."""
    name = unique("thr")
    data = seed_spec(name)
    data["spec"]["objects"] = [pod("early")]
    lab_up(data)
    record = state.load(name).pods["default/early"]
    monkeypatch.setattr(netns, "_template", None)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        runtime.template_from_sandboxes([(record.netns, record.pause_pid)])
        assert netns._template is not None
    finally:
        stop.set()
        other.join()
