"""NetworkPolicy on real labs: the calico profile (nftables) and the cilium profile (security identities,
per-endpoint BPF policy maps) enforce it and pass the same truth tables; the flannel profile stores it and
warns.

One lab per enforcing profile serves every case (policies are applied, probed and deleted in turn): namespaces x, y, z,
each with pods a and c on node1 and b on node2, like the upstream NetworkPolicy e2e tests' x/y/z a/b/c
layout, so every matrix holds same-node (bridged) and cross-node (routed) pairs. Each case is a policy from
the Kubernetes documentation's semantics and the matrix it must give, compared row by row with what
`lab probe` measures. A pod always reaches itself (the connection never leaves its namespace).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest
import yaml

from apiserver import desired, state
from cilium import agent, libbpf
from kubelet import runtime
from lab import objects
from observe import probe
from tests.integration.conftest import in_lab, lab, leftovers, unique, write_spec
from topo import netns

NAMESPACES = ("x", "y", "z")
PODS = [f"{ns}/{name}" for ns in NAMESPACES for name in ("a", "b", "c")]
NODE = {"a": "node1", "b": "node2", "c": "node1"}
TIMEOUT = 0.5  # a blocked connection costs this once per matrix; allowed ones take well under a millisecond
Expect = Callable[[str, str], bool]


def node_of(pod: str) -> str:
    return NODE[pod.split("/")[1]]


def _pod(key: str, app: str | None = None) -> dict:
    ns, name = key.split("/")
    ports = [{"containerPort": 80, "name": "serve-80-tcp"}, {"containerPort": 81, "name": "serve-81-tcp"},
             {"containerPort": 80, "protocol": "UDP", "name": "serve-80-udp"}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": app or name}},
            "spec": {"nodeName": NODE[name], "containers": [{"name": "c", "image": "pause", "ports": ports}]}}


def spec(name: str, profile: str) -> dict:
    objects = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"ns": ns}}}
               for ns in NAMESPACES]
    return {"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"cni": {"profile": profile}, "dns": {"node": "node2"},
                     "nodes": [{"name": "node1", "ip": "192.168.1.10"}, {"name": "node2", "ip": "192.168.1.11"}],
                     "objects": objects + [_pod(p) for p in PODS]}}


def policy(name: str, body: dict, namespace: str = "x") -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def sel(**labels: str) -> dict:
    return {"matchLabels": labels}


def ns_of(pod: str) -> str:
    return pod.split("/")[0]


# Each case: the policies, and per probe (port, protocol) the rule saying which (source, destination) pairs
# get through. The rule is only asked about pairs of different pods.
CASES: dict[str, tuple[list[dict], list[tuple[int, str, Expect]]]] = {
    "default-deny-ingress": (
        [policy("deny", {"podSelector": {}, "policyTypes": ["Ingress"]})],
        [(80, "tcp", lambda s, d: ns_of(d) != "x")]),
    "allow-from-same-namespace": (
        [policy("deny", {"podSelector": {}, "policyTypes": ["Ingress"]}),
         policy("same-ns", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]})],
        [(80, "tcp", lambda s, d: ns_of(d) != "x" or ns_of(s) == "x")]),
    "namespace-selector": (
        [policy("from-y", {"podSelector": sel(app="a"), "ingress": [{"from": [{"namespaceSelector": sel(ns="y")}]}]})],
        [(80, "tcp", lambda s, d: d != "x/a" or ns_of(s) == "y")]),
    "pod-and-namespace-selector": (
        [policy("and", {"podSelector": sel(app="a"), "ingress": [
            {"from": [{"namespaceSelector": sel(ns="y"), "podSelector": sel(app="b")}]}]})],
        [(80, "tcp", lambda s, d: d != "x/a" or s == "y/b")]),
    "pod-or-namespace-selector": (
        [policy("or", {"podSelector": sel(app="a"), "ingress": [
            {"from": [{"namespaceSelector": sel(ns="y")}, {"podSelector": sel(app="b")}]}]})],
        [(80, "tcp", lambda s, d: d != "x/a" or ns_of(s) == "y" or s == "x/b")]),
    "ipblock-except": (  # node2's PodCIDR cut out of the pod network: only node1's pods get in
        [policy("block", {"podSelector": sel(app="a"), "ingress": [
            {"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}]}]})],
        [(80, "tcp", lambda s, d: d != "x/a" or node_of(s) == "node1")]),
    "egress-deny-with-dns-allowed": (
        [policy("dns-only", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"namespaceSelector": sel(**{"kubernetes.io/metadata.name": "kube-system"})}],
             "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]})],
        [(80, "tcp", lambda s, d: ns_of(s) != "x")]),
    "named-port": (
        [policy("named", {"podSelector": sel(app="a"), "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]})],
        [(80, "tcp", lambda s, d: d != "x/a"), (81, "tcp", lambda s, d: True)]),
    "multiple-policies-union": (
        [policy("from-y", {"podSelector": sel(app="a"), "ingress": [{"from": [{"namespaceSelector": sel(ns="y")}]}]}),
         policy("from-z-b", {"podSelector": sel(app="a"), "ingress": [
             {"from": [{"namespaceSelector": sel(ns="z"), "podSelector": sel(app="b")}]}]})],
        [(80, "tcp", lambda s, d: d != "x/a" or ns_of(s) == "y" or s == "z/b")]),
    "egress-ipblock": (
        [policy("to-node1", {"podSelector": sel(app="b"), "policyTypes": ["Egress"],
                             "egress": [{"to": [{"ipBlock": {"cidr": "10.244.1.0/24"}}]}]})],
        [(80, "tcp", lambda s, d: s != "x/b" or node_of(d) == "node1")]),
    "default-deny-all": (
        [policy("deny-all", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}, namespace="y")],
        [(80, "tcp", lambda s, d: ns_of(s) != "y" and ns_of(d) != "y")]),
    "udp-port": (
        [policy("udp", {"podSelector": sel(app="a"), "ingress": [
            {"from": [{"podSelector": sel(app="b")}], "ports": [{"protocol": "UDP", "port": 80}]}]})],
        [(80, "udp", lambda s, d: d != "x/a" or s == "x/b"), (80, "tcp", lambda s, d: d != "x/a")]),
    "match-expressions": (
        [policy("not-b", {"podSelector": {}, "ingress": [{"from": [
            {"namespaceSelector": {}, "podSelector": {"matchExpressions": [
                {"key": "app", "operator": "NotIn", "values": ["b"]}]}}]}]})],
        [(80, "tcp", lambda s, d: ns_of(d) != "x" or not s.endswith("/b"))]),
    "replies-pass-egress-deny": (  # x/a may not open connections, but answers those made to it
        [policy("no-egress", {"podSelector": sel(app="a"), "policyTypes": ["Egress"]})],
        [(80, "tcp", lambda s, d: s != "x/a")]),
    "port-range": (
        [policy("range", {"podSelector": sel(app="a"), "ingress": [{"ports": [{"port": 81, "endPort": 85}]}]})],
        [(80, "tcp", lambda s, d: d != "x/a"), (81, "tcp", lambda s, d: True)]),
}


def expected_rows(rule: Expect) -> list[str]:
    return ["".join(probe.ALLOWED if s == d or rule(s, d) else probe.BLOCKED for d in PODS) for s in PODS]


def _show(rows: list[str]) -> str:
    return "\n".join(f"{p:4} {' '.join(r)}" for p, r in zip(PODS, rows))


class Lab:
    def __init__(self, name: str, folder: Path, profile: str = "calico") -> None:
        self.name, self.folder, self.profile = name, folder, profile

    def apply(self, *objects: dict) -> subprocess.CompletedProcess[str]:
        path = self.folder / f"apply-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        return lab("apply", "--lab", self.name, "-f", str(path))

    def delete(self, kind: str, key: str) -> None:
        """In-process (the CLI's own call), to spare a Python start per policy; `apply` runs the CLI."""
        ns, name = key.split("/")
        objects.delete(self.name, kind, name, ns)

    def socket_lb(self) -> contextlib.AbstractContextManager[None]:
        """Sockets made in this block reach ClusterIPs as the pods' own do. The cilium profile translates a
        ClusterIP at connect() in the cgroup of the pods' node (no kube-proxy, no route to the service CIDR),
        so the in-process probe joins node1's cgroup for the block (every node's service maps are alike)."""
        return agent.spawning_in(self.name, "node1") if self.profile == "cilium" else contextlib.nullcontext()

    def rows(self, port: int = 80, protocol: str = "tcp") -> list[str]:
        return probe.matrix(state.resolve(self.name), port, protocol, TIMEOUT, pods=PODS).rows()

    def check(self, rule: Expect, port: int = 80, protocol: str = "tcp") -> None:
        want = expected_rows(rule)
        got = self.rows(port, protocol)
        assert got == want, f"{protocol}/{port}\nexpected:\n{_show(want)}\nmeasured:\n{_show(got)}"


@contextlib.contextmanager
def _lab(tmp_path_factory: pytest.TempPathFactory, profile: str) -> Iterator[Lab]:
    name = unique(f"np{profile[:3]}")
    folder = tmp_path_factory.mktemp(name)
    try:
        lab("up", str(write_spec(folder, spec(name, profile))))
        yield Lab(name, folder, profile)
    finally:
        lab("down", name, check=False)
        assert leftovers(name) == {"netns": [], "state": []}


PROFILES = ("calico", "cilium")  # the profiles that enforce NetworkPolicy, each with the same truth tables
CALICO_ONLY = pytest.mark.parametrize("calico", ["calico"], indirect=True)  # reads Calico's nftables


@pytest.fixture(scope="module", params=PROFILES)
def calico(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The module's enforcing lab, one per profile (the name is kept from when calico was the only one)."""
    with _lab(tmp_path_factory, request.param) as made:
        yield made


@pytest.mark.parametrize("case", list(CASES))
def test_policy_matrix(calico: Lab, case: str) -> None:
    policies, probes = CASES[case]
    calico.apply(*policies)
    try:
        for port, protocol, rule in probes:
            calico.check(rule, port, protocol)
        if case == "egress-deny-with-dns-allowed":
            # DNS still works: the kube-dns ClusterIP is DNATed to the coredns pod in kube-system, and the
            # policy is judged after that translation, on TCP and UDP alike.
            st = state.resolve(calico.name)
            with calico.socket_lb():
                assert probe.connect(st, "x/a", "10.96.0.10", 53, "tcp").allowed
            assert "kube-dns.kube-system.svc.cluster.local" in in_lab(
                calico.name, "x/a", "getent", "ahostsv4", "kube-dns.kube-system.svc.cluster.local")
            # and anything else is dropped, not refused: node2's port 80 is closed, yet no RST comes back
            assert probe.connect(st, "x/a", "192.168.1.11", 80, "tcp", timeout=TIMEOUT).detail == "timeout"
            assert probe.connect(st, "y/a", "192.168.1.11", 80, "tcp", timeout=TIMEOUT).detail == "refused"
    finally:
        for item in policies:
            calico.delete("networkpolicy", f"{item['metadata']['namespace']}/{item['metadata']['name']}")
    calico.check(lambda s, d: True)  # deleting the policies opens everything again


def test_the_rules_follow_a_label_change(calico: Lab) -> None:
    special = policy("special", {"podSelector": sel(app="a"), "ingress": [
        {"from": [{"namespaceSelector": {}, "podSelector": sel(app="special")}]}]})
    calico.apply(special)
    try:
        calico.check(lambda s, d: d != "x/a")
        out = calico.apply(_pod("y/b", app="special"))
        assert "pod y/b configured (labels)" in out.stdout
        calico.check(lambda s, d: d != "x/a" or s == "y/b")
        assert calico.apply(_pod("y/b")).stdout.strip() == "pod y/b configured (labels)"
        calico.check(lambda s, d: d != "x/a")
        out = calico.apply(_pod("x/a", app="other"))  # the protected pod leaves the policy's selector
        calico.check(lambda s, d: True)
        calico.apply(_pod("x/a"))
        calico.check(lambda s, d: d != "x/a")
    finally:  # the CLI, as a learner types it
        out = lab("delete", "--lab", calico.name, "netpol", "special", "-n", "x")
        assert out.stdout.strip() == "networkpolicy x/special deleted"


def test_enforcement_survives_pod_churn(calico: Lab) -> None:
    calico.apply(policy("deny", {"podSelector": {}, "policyTypes": ["Ingress"]}),
                 policy("from-y-b", {"podSelector": {}, "ingress": [
                     {"from": [{"namespaceSelector": sel(ns="y"), "podSelector": sel(app="b")}]}]}))
    rule = lambda s, d: ns_of(d) != "x" or s == "y/b"  # noqa: E731
    try:
        calico.check(rule)
        for key in ("y/b", "x/a"):  # a peer of the policy, then a pod it protects: both come back changed
            before = state.resolve(calico.name).pods[key].ip
            calico.delete("pod", key)
            calico.apply(_pod(key))
            assert state.resolve(calico.name).pods[key].ip != before  # host-local moves on to the next IP
            calico.check(rule)
    finally:
        calico.delete("networkpolicy", "x/deny")
        calico.delete("networkpolicy", "x/from-y-b")


@CALICO_ONLY
def test_drops_are_counted_on_the_rule_that_names_the_policy(calico: Lab) -> None:
    calico.apply(policy("deny", {"podSelector": sel(app="a"), "policyTypes": ["Ingress"]}))
    try:
        st = state.resolve(calico.name)
        assert not probe.connect(st, "x/c", st.pods["x/a"].ip, 80, timeout=TIMEOUT).allowed  # same node
        listing = in_lab(calico.name, "node1", "nft", "list", "table", "ip", "calico")
        line = next(x for x in listing.splitlines() if "x/a ingress: no policy allows it (x/deny)" in x)
        assert "counter packets" in line and "counter packets 0 " not in line
    finally:
        calico.delete("networkpolicy", "x/deny")


def _through(calico: Lab, sources: list[str], to_ip: str, server: str, port: int = 80) -> dict[str, bool]:
    """Connect from each source to `to_ip` (a ClusterIP, say) with the probe's listener in pod `server`."""
    st = state.resolve(calico.name)
    by_name, _ = probe.endpoints(st)
    with calico.socket_lb():
        results = probe.run([(by_name[s], to_ip) for s in sources], [by_name[server]], port, "tcp", TIMEOUT)
    return {s: r.allowed for s, r in zip(sources, results)}


def test_a_service_is_judged_by_its_endpoints_policy_and_a_pod_always_reaches_itself(calico: Lab) -> None:
    """Policies see ClusterIP traffic after kube-proxy's DNAT: what counts is the policy of the pod the
    connection was sent to. And a pod cannot block access to itself: x/a, isolated by a default deny, still
    reaches itself through its own Service (hairpin: DNATed back to its own address)."""
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "x"},
               "spec": {"selector": {"app": "a"}, "ports": [{"port": 80}]}}
    calico.apply(service, policy("deny", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    try:
        cluster_ip = str(next(s.cluster_ip for s in desired.current_lab(state.resolve(calico.name)).services
                              if s.key == "x/a"))
        sources = ["x/a", "x/c", "y/a", "y/b", "z/a"]  # x/a itself; node1 and node2 clients
        assert _through(calico, sources, cluster_ip, "x/a") == {
            "x/a": True, "x/c": False, "y/a": False, "y/b": False, "z/a": False}
        calico.apply(policy("from-y", {"podSelector": sel(app="a"), "ingress": [
            {"from": [{"namespaceSelector": sel(ns="y")}]}]}))
        assert _through(calico, sources, cluster_ip, "x/a") == {
            "x/a": True, "x/c": False, "y/a": True, "y/b": True, "z/a": False}
    finally:
        for key in ("x/deny", "x/from-y"):
            with contextlib.suppress(Exception):
                calico.delete("networkpolicy", key)
        calico.delete("service", "x/a")


def test_a_namespace_label_removed_on_reapply_stops_matching(calico: Lab) -> None:
    """kubectl apply replaces a Namespace's labels: the spec's ns=y left out, a selector on it stops matching."""
    def namespace(**labels: str) -> dict:
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "y", "labels": labels}}

    calico.apply(policy("from-y", {"podSelector": sel(app="a"), "ingress": [
        {"from": [{"namespaceSelector": sel(ns="y")}]}]}))
    try:
        st = state.resolve(calico.name)
        target = st.pods["x/a"].ip
        assert probe.connect(st, "y/b", target, 80, timeout=TIMEOUT).allowed
        assert not probe.connect(st, "z/b", target, 80, timeout=TIMEOUT).allowed
        calico.apply(namespace(team="blue"))  # without ns=y: that label is gone
        assert not probe.connect(st, "y/b", target, 80, timeout=TIMEOUT).allowed
    finally:
        calico.apply(namespace(ns="y"))
        calico.delete("networkpolicy", "x/from-y")
    assert probe.connect(st, "y/b", target, 80, timeout=TIMEOUT).allowed


@CALICO_ONLY
def test_a_new_pod_is_isolated_before_its_containers_start(calico: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lab apply` (in-process, to watch it) loads the new pod's policy rules once it has its IP and before
    its containers start: the node's ruleset, read the moment they start, already isolates it."""
    st = state.resolve(calico.name)
    node1 = probe.endpoints(st)[0]["node1"].netns
    seen: dict[str, str] = {}
    real = runtime.start_pod_containers

    def spy(pod, *args, **kwargs):  # type: ignore[no-untyped-def]
        with netns.entered(node1):
            seen[pod.key] = subprocess.run(["nft", "list", "table", "ip", "calico"], capture_output=True,
                                           text=True, check=True).stdout
        return real(pod, *args, **kwargs)

    monkeypatch.setattr(runtime, "start_pod_containers", spy)
    early = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "early", "namespace": "x", "labels": {"app": "early"}},
             "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "pause"}]}}
    path = calico.folder / "early.yaml"
    path.write_text(yaml.safe_dump_all([policy("no-egress", {"podSelector": sel(app="early"),
                                                             "policyTypes": ["Egress"]}), early]))
    try:
        objects.apply_file(calico.name, str(path))
        monkeypatch.undo()
        st = state.resolve(calico.name)
        ip = st.pods["x/early"].ip
        assert f"{ip} : jump cali-fw-" in seen["x/early"]
        assert "x/early egress: no policy allows it (x/no-egress)" in seen["x/early"]
        assert probe.connect(st, "x/early", "192.168.1.11", 80, timeout=TIMEOUT).detail == "timeout"  # dropped
    finally:
        monkeypatch.undo()
        with contextlib.suppress(Exception):
            calico.delete("pod", "x/early")
        calico.delete("networkpolicy", "x/no-egress")


def test_probe_of_twenty_pods(calico: Lab) -> None:
    """20 pods (400 pairs), a quarter of them isolated: the CLI's time is printed (measured, not asserted)."""
    many = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "many", "namespace": "z"},
            "spec": {"replicas": 10, "selector": sel(app="many"), "template": {
                "metadata": {"labels": {"app": "many"}},
                "spec": {"containers": [{"name": "c", "image": "pause"}]}}}}
    calico.apply(many, policy("deny-many", {"podSelector": sel(app="many"), "policyTypes": ["Ingress"]}, "z"))
    try:
        started = time.monotonic()
        out = lab("probe", "--lab", calico.name, "--json").stdout
        seconds = time.monotonic() - started
        result = json.loads(out)
        pods = result["pods"]
        assert len(pods) == 20 and len(result["results"]) == 400  # 9 + 10 replicas + coredns
        wrong = [(r["source"], r["dest"], r["detail"]) for r in result["results"]
                 if r["allowed"] == (r["dest"].startswith("z/many-") and r["dest"] != r["source"])]
        assert not wrong, wrong
        print(f"\nlab probe, 20 pods, 400 pairs ({sum(r.count('X') for r in result['rows'])} blocked): "
              f"{seconds:.2f} s for the command, {result['seconds']:.2f} s probing")
        text = lab("probe", "--lab", calico.name, "--port", "81", "--protocol", "udp").stdout
        assert "udp/81, 400 pairs, 190 blocked" in text
    finally:
        calico.delete("networkpolicy", "z/deny-many")
        calico.delete("deployment", "z/many")


def test_flannel_stores_policies_without_enforcing_them(tmp_path_factory: pytest.TempPathFactory) -> None:
    with _lab(tmp_path_factory, "flannel") as flannel:
        every = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for policies, _ in CASES.values()
                 for p in policies}  # the same manifests as the calico cases (a name used twice: one of them)
        out = flannel.apply(*every.values())
        assert "networkpolicy x/deny created" in out.stdout
        assert out.stderr.startswith("Warning: this lab plays Flannel (spec.cni.profile)")
        assert "does not enforce NetworkPolicy" in out.stderr and "Warning" not in out.stdout
        for port, protocol in ((80, "tcp"), (81, "tcp"), (80, "udp")):
            flannel.check(lambda s, d: True, port, protocol)
        tables = in_lab(flannel.name, "node1", "nft", "list", "tables")
        assert "calico" not in tables
        status = state.resolve(flannel.name)
        assert status.objects and all(o["kind"] == "NetworkPolicy" for o in status.objects)


CILIUM_ONLY = pytest.mark.parametrize("calico", ["cilium"], indirect=True)


@CILIUM_ONLY
def test_a_relabel_changes_one_identity_and_the_ipcache_entry_on_every_node(calico: Lab) -> None:
    """Cilium's model: relabelling y/b gives it a new security identity; every node's ipcache changes in
    that one /32 entry, no other pod's identity moves, node2's policy maps (nothing there selects on app)
    stay as they were, and x/a's policy map on node1 gains the new identity: the verdicts follow."""
    from observe import cilium as debug

    def ipcache(node: str) -> dict[str, int]:
        return {r["prefix"]: r["identity"] for r in debug.ipcache_list(calico.name, node)}

    def identities() -> dict[str, int]:
        return {e["pod"]: e["identity"] for n in ("node1", "node2") for e in debug.endpoint_list(calico.name, n)}

    def policy_maps(node: str) -> dict[str, list]:
        return {e["pod"]: debug.policy_get(calico.name, node, str(e["endpoint"]))
                for e in debug.endpoint_list(calico.name, node)}

    special = policy("special", {"podSelector": sel(app="a"), "ingress": [
        {"from": [{"namespaceSelector": {}, "podSelector": sel(app="special")}]}]})
    calico.apply(special)
    try:
        calico.check(lambda s, d: d != "x/a")
        before = {n: ipcache(n) for n in ("node1", "node2")}
        ids, node2_maps = identities(), policy_maps("node2")
        x_a = next(e for e in debug.endpoint_list(calico.name, "node1") if e["pod"] == "x/a")
        assert x_a["policyIngress"] == "Enabled" and x_a["policyEgress"] == "Disabled"
        calico.apply(_pod("y/b", app="special"))
        after_ids = identities()
        assert after_ids["y/b"] != ids["y/b"] and after_ids["y/b"] not in ids.values()
        assert {k: v for k, v in after_ids.items() if k != "y/b"} == {k: v for k, v in ids.items() if k != "y/b"}
        y_b = f"{state.resolve(calico.name).pods['y/b'].ip}/32"
        for node in ("node1", "node2"):
            now = ipcache(node)
            assert {k for k in now if now[k] != before[node].get(k)} == {y_b}
            assert now[y_b] == after_ids["y/b"]
        assert policy_maps("node2") == node2_maps
        allowed = [r for r in debug.policy_get(calico.name, "node1", "x/a") if r["direction"] == "Ingress"]
        assert {r["identity"] for r in allowed} == {1, after_ids["y/b"]}  # the host, and the relabelled pod
        assert all(r["networkPolicy"] == "x/special" for r in allowed if r["identity"] != 1)
        calico.check(lambda s, d: d != "x/a" or s == "y/b")
        listing = lab("cilium", "--lab", calico.name, "node1", "identity", "list").stdout
        assert f"{after_ids['y/b']}" in listing and "k8s:app=special" in listing
    finally:
        calico.apply(_pod("y/b"))
        calico.delete("networkpolicy", "x/special")
    calico.check(lambda s, d: True)


@CILIUM_ONLY
def test_a_denied_connection_leaves_one_drop_event_naming_the_policy(calico: Lab) -> None:
    """The node's cilium_events ring gets, for a denied connection, a policy verdict and a DROP_POLICY drop
    naming x/deny (the agent's numbering, recorded for `lab observe`), with both pods' identities; an allowed
    connection's verdict names no policy when nothing isolates its pods."""
    import json

    from cilium import events
    from observe import cilium as debug
    from tests.unit.test_cilium_policy import Ring

    calico.apply(policy("deny", {"podSelector": sel(app="a"), "policyTypes": ["Ingress"]}))
    fd = libbpf.obj_get(str(agent.pins(calico.name, "node1") / events.EVENTS))
    ring = Ring(fd)
    try:
        ring.drain()  # what earlier tests left
        st = state.resolve(calico.name)
        assert not probe.connect(st, "x/c", st.pods["x/a"].ip, 80, timeout=TIMEOUT).allowed  # same node
        got = [e for e in ring.drain() if e.type == events.EVENT_DROP]
        record = json.loads((state.lab_dir(calico.name) / events.POLICY_RECORD).read_text())
        ids = {e["pod"]: e["identity"] for e in debug.endpoint_list(calico.name, "node1")}
        assert got and {events.policy_names(record)[e.policy_id] for e in got} == {"x/deny"}
        drop = got[0]
        assert drop.subtype == events.DROP_POLICY and drop.flags & events.FLOW_F_INGRESS
        assert (str(drop.saddr), str(drop.daddr), drop.dport) == (st.pods["x/c"].ip, st.pods["x/a"].ip, 80)
        assert (drop.src_identity, drop.dst_identity) == (ids["x/c"], ids["x/a"])
        assert "k8s:app=c" in events.identity_labels(record)[drop.src_identity]
        assert len(got) <= 3  # one per attempt (SYN retransmissions are new attempts), not per packet
        assert probe.connect(st, "x/a", st.pods["x/c"].ip, 80, timeout=TIMEOUT).allowed
        allowed = [e for e in ring.drain() if e.type == events.EVENT_POLICY_VERDICT]
        assert allowed and all(e.flags & events.FLOW_F_ALLOWED and e.policy_id == 0 for e in allowed)
    finally:
        ring.close()
        os.close(fd)
        calico.delete("networkpolicy", "x/deny")


@CILIUM_ONLY
def test_the_policy_maps_converge_after_a_sync_cut_short(calico: Lab) -> None:
    """Entries lost as a crash mid-sync would lose them (x/a's policy map unpinned and unhooked, y/b's
    ipcache entry gone on node1) come back with the next sync, and enforcement with them."""
    from cilium import identity
    from observe import cilium as debug
    from reconcile import resync

    calico.apply(policy("from-y", {"podSelector": sel(app="a"), "ingress": [
        {"from": [{"namespaceSelector": sel(ns="y")}]}]}))
    rule = lambda s, d: d != "x/a" or ns_of(s) == "y"  # noqa: E731
    try:
        calico.check(rule)
        folder = agent.pins(calico.name, "node1")
        x_a = next(e for e in debug.endpoint_list(calico.name, "node1") if e["pod"] == "x/a")
        want = debug.policy_get(calico.name, "node1", "x/a")
        (folder / identity.policy_map_name(x_a["endpoint"])).unlink()
        fd = libbpf.obj_get(str(folder / identity.POLICY_MAPS))
        libbpf.delete(fd, int(x_a["endpoint"]).to_bytes(4, "little"))
        os.close(fd)
        st = state.resolve(calico.name)
        fd = libbpf.obj_get(str(folder / identity.IPCACHE))
        libbpf.delete(fd, identity.ipcache_key(IPv4Network(f"{st.pods['y/b'].ip}/32")))
        os.close(fd)
        calico.check(lambda s, d: True)  # x/a's map is gone: nothing enforced for it (not yet regenerated)
        resync.resync(st)
        assert [{k: v for k, v in r.items() if k not in ("packets", "bytes")}
                for r in debug.policy_get(calico.name, "node1", "x/a")] == \
               [{k: v for k, v in r.items() if k not in ("packets", "bytes")} for r in want]
        assert (folder / identity.policy_map_name(x_a["endpoint"])).exists()
        calico.check(rule)
    finally:
        calico.delete("networkpolicy", "x/from-y")
