"""Tests of cni/network_policy.py (the Calico-style nftables renderer) and of spec.cni.profile.

Golden rulesets live in golden/network_policy/NAME.nft; rewrite them after a deliberate change with
KUBENET_UPDATE_GOLDEN=1 and read every diff. The semantic tests check who a peer stands for (podSelector AND
namespaceSelector in one peer, OR across peers, the automatic kubernetes.io/metadata.name label), named port
lookup and the API server's policyTypes default. The test at the end needs root and nft: it check-loads every
golden in a throwaway network namespace.
"""
from __future__ import annotations

import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from apiserver.spec import network_policies_from_objects, parse_spec_text
from cni import network_policy as np
from tests.conftest import assert_golden, require_root, require_tool
from topo.errors import SpecError
from topo.model import Lab

GOLDEN = Path(__file__).resolve().parent / "golden" / "network_policy"

LAB = """\
apiVersion: kubenet-lab/v1alpha1
kind: Lab
metadata: {name: np}
spec:
  cni: {profile: calico}
  nodes:
    - {name: node1, ip: 192.168.1.10}
    - {name: node2, ip: 192.168.1.11}
  objects:
    - {apiVersion: v1, kind: Namespace, metadata: {name: x, labels: {ns: x}}}
    - {apiVersion: v1, kind: Namespace, metadata: {name: y, labels: {ns: y}}}
"""
PODS = [  # (namespace, name, node, app label, named ports)
    ("x", "a", "node1", "a"), ("x", "b", "node2", "b"), ("x", "c", "node1", "c"),
    ("y", "a", "node1", "a"), ("y", "b", "node2", "b"),
]


def _pod(namespace: str, name: str, node: str, app: str) -> str:
    return (f"    - {{apiVersion: v1, kind: Pod, metadata: {{name: {name}, namespace: {namespace}, labels: {{app: {app}}}}}, "
            f"spec: {{nodeName: {node}, containers: [{{name: c, image: pause, ports: [{{containerPort: 8080, name: "
            f"http}}, {{containerPort: {81 if name == 'b' else 82}, name: alt}}]}}]}}}}\n")


def _lab(policies: str = "") -> Lab:
    return parse_spec_text(LAB + "".join(_pod(*p) for p in PODS) + policies)


def _workloads(lab: Lab) -> list[np.Workload]:
    ips = {"x/a": "10.244.1.2", "x/b": "10.244.2.2", "x/c": "10.244.1.3", "y/a": "10.244.1.4", "y/b": "10.244.2.3"}
    return [np.Workload(p, IPv4Address(ips[p.key])) for p in lab.pods]


def _policy(name: str, spec: str, namespace: str = "x") -> str:
    return (f"    - apiVersion: networking.k8s.io/v1\n      kind: NetworkPolicy\n      metadata: {{name: {name}, "
            f"namespace: {namespace}}}\n      spec: {spec}\n")


CASES = {
    "no-policies": "",
    "default-deny-ingress": _policy("deny", "{podSelector: {}, policyTypes: [Ingress]}"),
    "and-vs-or": _policy("and", "{podSelector: {matchLabels: {app: a}}, ingress: [{from: [{namespaceSelector: "
                                "{matchLabels: {ns: y}}, podSelector: {matchLabels: {app: b}}}]}]}")
                 + _policy("or", "{podSelector: {matchLabels: {app: a}}, ingress: [{from: [{namespaceSelector: "
                                 "{matchLabels: {ns: y}}}, {podSelector: {matchLabels: {app: b}}}]}]}"),
    "ipblock-and-ports": _policy("block", "{podSelector: {matchLabels: {app: a}}, ingress: [{from: [{ipBlock: "
                                          "{cidr: 10.244.0.0/16, except: [10.244.2.0/24]}}], ports: [{port: 80}, "
                                          "{protocol: UDP, port: 5000, endPort: 5010}, {protocol: SCTP}]}]}"),
    "named-ports": _policy("named", "{podSelector: {}, ingress: [{ports: [{port: http}]}], egress: [{to: "
                                    "[{podSelector: {}}, {ipBlock: {cidr: 10.244.2.0/24}}], ports: [{port: alt}]}]}"),
    "egress-dns": _policy("dns", "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: "
                                 "{matchLabels: {kubernetes.io/metadata.name: y}}}], ports: [{protocol: UDP, "
                                 "port: 53}, {protocol: TCP, port: 53}]}]}"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_rules_match_the_golden(case: str) -> None:
    lab = _lab(CASES[case])
    assert_golden(GOLDEN / f"{case}.nft", np.render(lab, "node1", _workloads(lab)))


def test_the_table_replaces_itself_in_one_transaction() -> None:
    lines = np.render(_lab(), "node1", []).splitlines()
    assert lines[:3] == ["table ip calico", "delete table ip calico", "table ip calico {"]


def _peer_keys(lab: Lab, policy: str, rule: int = 0, peer: int = 0) -> list[str]:
    pol = next(p for p in lab.network_policies if p.name == policy)
    return [w.pod.key for w in np.peer_workloads(lab, pol, pol.ingress[rule].peers[peer], _workloads(lab))]


def test_pod_and_namespace_selector_in_one_peer_is_and_in_two_peers_is_or() -> None:
    lab = _lab(CASES["and-vs-or"])
    assert _peer_keys(lab, "and") == ["y/b"]
    assert _peer_keys(lab, "or", peer=0) == ["y/a", "y/b"]
    assert _peer_keys(lab, "or", peer=1) == ["x/b"]  # podSelector alone: the policy's own namespace


def test_namespaces_carry_their_name_label() -> None:
    lab = _lab(CASES["egress-dns"])
    pol = lab.network_policies[0]
    assert [w.pod.key for w in np.peer_workloads(lab, pol, pol.egress[0].peers[0], _workloads(lab))] == ["y/a", "y/b"]


def test_policy_types_default_as_the_api_server_does() -> None:
    lab = _lab(CASES["named-ports"] + _policy("only-ingress", "{podSelector: {}, ingress: [{}]}"))
    types = {p.name: p.policy_types for p in lab.network_policies}
    assert types == {"named": ("Ingress", "Egress"), "only-ingress": ("Ingress",)}


def test_named_ports_resolve_per_destination_pod() -> None:
    lab = _lab(CASES["named-ports"])
    text = np.render(lab, "node1", _workloads(lab))
    # ingress: the protected (local) pods' own "http"; egress: each destination's "alt" (81 on b, 82 elsewhere)
    assert "ip daddr . th dport { 10.244.1.2 . 8080, 10.244.1.3 . 8080, 10.244.1.4 . 8080 }" not in text
    assert "ip daddr . th dport { 10.244.1.2 . 8080, 10.244.1.3 . 8080 }" in text
    assert "10.244.2.2 . 81" in text and "10.244.1.4 . 82" not in text  # y/a is not in x (podSelector: x only)


def test_isolated_pods_drop_with_a_counter_and_a_comment_naming_the_policies() -> None:
    lab = _lab(CASES["default-deny-ingress"])
    text = np.render(lab, "node1", _workloads(lab))
    assert ('counter log prefix "x/a ingress: no policy allows it (x/deny)" group 1 drop '
            'comment "x/a ingress: no policy allows it (x/deny)"') in text  # logged for `lab observe`
    assert 'return comment "y/a ingress: not isolated (no policy selects it)"' in text
    assert "cali-tw-" + np.chain_suffix(lab, lab.pods[0]) in text


def _chain(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"    chain {name} {{") + 1
    return [line.strip() for line in lines[start:lines.index("    }", start)]]


def test_a_pod_cannot_block_access_to_itself() -> None:
    """Its own packets, back through a Service's ClusterIP (hairpin), pass before any policy is asked."""
    lab = _lab(_policy("deny", "{podSelector: {}, policyTypes: [Ingress, Egress]}"))
    text = np.render(lab, "node1", _workloads(lab))
    veth = np.chain_suffix(lab, lab.pods[0])  # x/a, 10.244.1.2
    to, out = _chain(text, f"cali-tw-{veth}"), _chain(text, f"cali-fw-{veth}")
    assert to[1] == 'ip saddr 10.244.1.2 return comment "x/a ingress: itself (a pod cannot block access to itself)"'
    assert out[1] == 'ip daddr 10.244.1.2 return comment "x/a egress: itself (a pod cannot block access to itself)"'
    assert to[2].startswith("meta mark set") and out[-1].startswith("counter log prefix")


def test_invalid_packets_are_dropped_at_every_workload_first() -> None:
    lab = _lab(CASES["default-deny-ingress"])
    text = np.render(lab, "node1", _workloads(lab))
    for pod in ("x/a", "y/a"):  # isolated or not, as Calico's workload chains
        veth = np.chain_suffix(lab, next(p for p in lab.pods if p.key == pod))
        for chain, direction in (("tw", "ingress"), ("fw", "egress")):
            text_ = f"{pod} {direction}: invalid packet (conntrack)"
            group = 1 if direction == "ingress" else 2  # NFLOG, for `lab observe`
            assert _chain(text, f"cali-{chain}-{veth}")[0] == \
                f'ct state invalid counter log prefix "{text_}" group {group} drop comment "{text_}"'


def test_a_reapplied_namespace_replaces_its_labels() -> None:
    """kubectl apply of a Namespace without a label removes it: a namespaceSelector on it stops matching."""
    from apiserver import state
    from apiserver.desired import current_lab

    policy = _policy("from-blue", "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: "
                                  "{team: blue}}}]}]}")
    text = LAB.replace("labels: {ns: y}", "labels: {ns: y, team: blue}") + "".join(_pod(*p) for p in PODS) + policy
    st = state.LabState(name="unit-np", phase="up", pid=1, spec_file=None, spec_text=text)
    workloads = _workloads(parse_spec_text(text))

    def blue() -> list[str]:
        lab = current_lab(st)
        pol = lab.network_policies[0]
        return [w.pod.key for w in np.peer_workloads(lab, pol, pol.ingress[0].peers[0], workloads)]

    assert blue() == ["y/a", "y/b"]
    st.objects = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "y", "labels": {"ns": "y"}}}]
    assert current_lab(st).namespaces["y"] == {"ns": "y"}
    assert blue() == []
    st.objects = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x", "labels": {"team": "blue"}}}]
    assert blue() == ["x/a", "x/b", "x/c", "y/a", "y/b"]


def test_long_comments_are_cut_to_what_nftables_keeps() -> None:
    long = "".join(_policy(f"deny-{'p' * 50}-{i}", "{podSelector: {}, policyTypes: [Ingress]}") for i in range(3))
    lab = _lab(long)
    text = np.render(lab, "node1", _workloads(lab))
    comments = [line.split('comment "', 1)[1][:-1] for line in text.splitlines() if 'comment "' in line]
    assert max(len(c) for c in comments) <= np.COMMENT_MAX
    assert any(c.endswith("...") for c in comments)


def test_applied_policies_are_checked_against_the_lab() -> None:
    lab = _lab(CASES["default-deny-ingress"])
    manifest = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}}}
    with pytest.raises(SpecError, match="clashes with networkpolicy x/deny"):
        network_policies_from_objects([manifest], lab, None)
    manifest["metadata"]["namespace"] = "nowhere"
    with pytest.raises(SpecError, match="namespace nowhere does not exist"):
        network_policies_from_objects([manifest], lab, None)


# ------------------------------------------------------------------ profiles


def _profile_lab(cni: str, network: str = "") -> Lab:
    return parse_spec_text("apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: p}\nspec:\n" + cni + network
                           + "  nodes: [{name: node1, ip: 192.168.1.10}]\n")


def test_a_profile_sets_the_backend_default_and_the_backend_may_override_it() -> None:
    assert _profile_lab("  cni: {profile: flannel}\n").network.backend == "vxlan"
    lab = _profile_lab("  cni: {profile: calico}\n")
    assert lab.network.backend == "bgp" and lab.cni.enforces_policy and lab.cni.given
    lab = _profile_lab("  cni: {profile: calico}\n", "  network: {backend: host-gw}\n")
    assert lab.network.backend == "host-gw" and lab.cni.enforces_policy


def test_without_a_profile_the_backend_says_which_cni_the_lab_plays() -> None:
    assert _profile_lab("").cni.profile == "flannel" and _profile_lab("").network.backend == "host-gw"
    lab = _profile_lab("", "  network: {backend: bgp}\n")
    assert lab.cni.profile == "calico" and not lab.cni.given


def test_flannel_warns_that_policies_are_not_enforced() -> None:
    lab = parse_spec_text(LAB.replace("calico", "flannel") + _policy("deny", "{podSelector: {}}"))
    # "1 policies are stored": one policy is told in the singular
    warning = np.not_enforced_warning(lab) or ""
    assert "does not enforce NetworkPolicy: 1 policy is stored but nothing is blocked" in warning
    two = parse_spec_text(LAB.replace("calico", "flannel") + _policy("deny", "{podSelector: {}}")
                          + _policy("deny2", "{podSelector: {}}"))
    warning = np.not_enforced_warning(two) or ""
    assert "does not enforce NetworkPolicy: 2 policies are stored but nothing is blocked" in warning
    assert np.not_enforced_warning(_lab(CASES["default-deny-ingress"])) is None


# ------------------------------------------------------------------ the kernel accepts them


def test_every_golden_loads_into_nftables(tmp_path: Path) -> None:
    require_root()
    require_tool("nft")
    require_tool("unshare")
    script = []
    for case in sorted(CASES):
        (tmp_path / f"{case}.nft").write_text((GOLDEN / f"{case}.nft").read_text())
        script.append(f"nft -f {case}.nft")  # a real load (not -c): each replaces the one before
    proc = subprocess.run(["unshare", "-n", "sh", "-ec", "; ".join(script) + "; nft list table ip calico"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "chain cali-FORWARD" in proc.stdout
