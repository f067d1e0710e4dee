"""`lab observe` on real labs of every profile: the seed lab (two nodes, three agnhost pods behind the
Service `web`, the cluster DNS, external-web serving api.example.com) with flannel, calico and cilium.

Each test runs `lab observe --follow --json` as a user would (a separate process), waits until it says it is
observing, makes real traffic with `lab exec`, ends the observer with Ctrl-C (SIGINT) and reads the flows it
printed: an allowed connection is FORWARDED, a ClusterIP connection is TRANSLATED to the backend that
answered (agnhost's /hostname says which), a lookup of api.example.com with ndots:5 shows its 8 queries, 6
of them answered NXDOMAIN, and a connection a NetworkPolicy denies is DROPPED naming the policy. The cilium
profile's FORWARDED and policy DROPPED flows come from the lxc programs' policy verdicts (issue 19's other
half): until those are emitted, those cases are expected failures there.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from apiserver import state
from tests.integration.conftest import REPO, in_lab, lab, leftovers, seed_spec, unique, write_spec

PROFILES = {"flannel": "host-gw", "calico": "bgp", "cilium": "vxlan"}
READY_TIMEOUT = 30.0


@pytest.fixture(scope="module", params=list(PROFILES))
def seed(request, tmp_path_factory) -> Iterator[tuple[str, str]]:
    profile = request.param
    name = unique(f"obs-{profile[:3]}")
    data = seed_spec(name)
    data["spec"]["cni"] = {"profile": profile}
    data["spec"]["network"] = {"backend": PROFILES[profile]}
    lab("up", str(write_spec(tmp_path_factory.mktemp(name), data)))
    try:
        yield name, profile
    finally:
        lab("down", name, check=False)
        assert leftovers(name) == {"netns": [], "state": []}


class Observer:
    """`lab observe --follow --json ...` in the background; `stop()` sends Ctrl-C and returns the flows."""

    def __init__(self, name: str, *flags: str) -> None:
        # stdout to a file, as a terminal would take it: a pipe nobody reads until the end would fill and
        # stall the observer (its rings would then drop events, as they are meant to)
        self.out = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "observe", "--lab", name, "--follow", "--json",
                                      *flags], stdout=self.out, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.ready = ""
        deadline = time.monotonic() + READY_TIMEOUT
        while "lab observe:" not in self.ready:
            readable, _, _ = select.select([self.proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
            line = self.proc.stderr.readline() if readable else ""
            if not line:
                self.proc.kill()
                raise AssertionError(f"lab observe did not start: {self.proc.stderr.read()}")
            self.ready += line

    def stop(self, settle: float = 0.5) -> list[dict]:
        time.sleep(settle)  # the last events are on their way through the rings
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=20)
        assert self.proc.returncode == 0, err
        assert "Traceback" not in err, err
        self.out.seek(0)
        lines = self.out.read().splitlines()
        self.out.close()
        return [json.loads(line) for line in lines if line.strip()]


def pod_ip(name: str, pod: str) -> str:
    return state.resolve(name).pods[f"default/{pod}"].ip


def flows_of(items: list[dict]) -> list[dict]:
    return [i["flow"] for i in items if "flow" in i]


def test_an_allowed_connection_is_forwarded(seed) -> None:
    name, profile = seed
    obs = Observer(name, "--from-pod", "default/node1-pod1", "--to-pod", "default/node2-pod1")
    assert in_lab(name, "node1-pod1", "curl", "-s", "-m", "3", f"{pod_ip(name, 'node2-pod1')}:8080/hostname") == \
        "node2-pod1"
    seen = flows_of(obs.stop())
    forwarded = [f for f in seen if f["verdict"] == "FORWARDED" and f["l4"]["TCP"]["destination_port"] == 8080]
    assert forwarded, seen
    f = forwarded[0]
    assert (f["source"]["namespace"], f["source"]["pod_name"]) == ("default", "node1-pod1")
    assert f["destination"]["pod_name"] == "node2-pod1" and f["l4"]["TCP"]["flags"].get("SYN")


def test_a_clusterip_connection_names_the_service_and_the_backend(seed) -> None:
    name, _profile = seed
    obs = Observer(name, "--to-service", "default/web", "--from-pod", "node1-pod1")
    backend = in_lab(name, "node1-pod1", "curl", "-s", "-m", "3", "10.96.0.100/hostname")
    seen = flows_of(obs.stop())
    translated = [f for f in seen if f["verdict"] == "TRANSLATED"]
    assert translated, seen
    f = translated[0]
    assert f["destination_service"] == {"name": "web", "namespace": "default"}
    assert f["original_destination"] == "10.96.0.100:80"
    assert f["destination"]["pod_name"] == backend and f["l4"]["TCP"]["destination_port"] == 8080


def test_a_dns_lookup_shows_its_queries_and_nxdomain_answers(seed) -> None:
    name, _profile = seed
    obs = Observer(name, "--type", "dns", "--pod", "default/node1-pod1")
    assert "api.example.com" in in_lab(name, "node1-pod1", "getent", "hosts", "api.example.com")
    seen = flows_of(obs.stop())
    queries = [f["l7"]["dns"] for f in seen if f["l7"]["type"] == "REQUEST"]
    answers = [f["l7"]["dns"] for f in seen if f["l7"]["type"] == "RESPONSE"]
    names = {q["query"] for q in queries}
    # ndots:5 and the pod's search list: every candidate asked, for A and AAAA (glibc asks both)
    assert names == {"api.example.com.default.svc.cluster.local.", "api.example.com.svc.cluster.local.",
                     "api.example.com.cluster.local.", "api.example.com."}, queries
    assert len(queries) == 8
    assert sum(a["rcode"] == 3 for a in answers) == 6
    assert any("192.168.1.200" in a["ips"] for a in answers if a["query"] == "api.example.com.")


def test_follow_ends_on_ctrl_c_with_nothing_left_running(seed) -> None:
    name, _profile = seed
    first = Observer(name)
    assert "another observer" not in first.ready and "no " not in first.ready.split("\n", 1)[0], first.ready
    first.stop(settle=0)
    argv = f"{sys.executable}\0-m\0lab.cli\0observe\0--lab\0{name}"
    mine = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).startswith(argv)]
    assert mine == []
    second = Observer(name)  # the NFLOG groups, the ring's lock: all given back by the first
    assert "another" not in second.ready, second.ready
    second.stop(settle=0)


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


NODE_PORT = """apiVersion: v1
kind: Service
metadata: {name: web-np, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
"""


def test_a_nodeport_connection_from_outside_names_the_service_and_the_backend(seed, tmp_path) -> None:
    name, _profile = seed
    path = tmp_path / "np.yaml"
    path.write_text(NODE_PORT)
    lab("apply", "--lab", name, "-f", str(path))
    try:
        obs = Observer(name, "--to-service", "web-np")
        backend = in_lab(name, "external-web", "curl", "-s", "-m", "3", "192.168.1.10:30080/hostname")
        seen = flows_of(obs.stop())
    finally:
        lab("delete", "--lab", name, "service", "web-np", check=False)
    translated = [f for f in seen if f["verdict"] == "TRANSLATED"]
    assert translated, seen
    f = translated[0]
    assert f["source"]["labels"] == ["reserved:host"] and f["IP"]["source"] == "192.168.1.200"
    assert f["original_destination"] == "192.168.1.10:30080" and f["destination"]["pod_name"] == backend


DENY = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-to-node2-pod1, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
"""


def test_a_denied_connection_is_dropped_naming_the_policy(seed, tmp_path) -> None:
    """Last: it leaves the lab with a default-deny policy (removed after)."""
    name, profile = seed
    if profile == "flannel":
        pytest.skip("flannel enforces no NetworkPolicy: nothing is dropped")
    path = tmp_path / "deny.yaml"
    path.write_text(DENY)
    applied = lab("apply", "--lab", name, "-f", str(path), check=False)
    assert applied.returncode == 0, applied.stderr
    try:
        obs = Observer(name, "--verdict", "DROPPED", "--to-pod", "node2-pod1")
        in_lab(name, "node1-pod1", "curl", "-s", "-m", "1", f"{pod_ip(name, 'node2-pod1')}:8080/hostname", check=False)
        seen = flows_of(obs.stop())
    finally:
        lab("delete", "--lab", name, "networkpolicy", "deny-to-node2-pod1", check=False)
    assert seen
    f = seen[0]
    assert f["source"]["pod_name"] == "node1-pod1" and f["destination"]["pod_name"] == "node2-pod1"
    assert f["drop_reason_desc"] == "POLICY_DENIED"
    assert {"name": "deny-to-node2-pod1", "namespace": "default", "kind": "NetworkPolicy"} in \
        f["ingress_denied_by"], f
