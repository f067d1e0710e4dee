"""The cilium profile's identity-based NetworkPolicy.

Pure part (cilium/identity.py, no root): identities per label set, stable across syncs and changed for one
relabelled pod only; CIDR identities for ipBlock prefixes and excepts; the ipcache; each endpoint's policy
map keys (wildcard, ports, endPort ranges as LPM port prefixes, named ports, host allowed in).

Datapath part (BPF_PROG_TEST_RUN of cil_to_container / cil_from_container on crafted packets, maps in a
private bpffs folder, filled by the agent's own functions): allowed and denied first packets, the reply of
an allowed connection passing an egress default deny by its CT entry (no TCP flag guess: a new SYN the
other way is still dropped), a port range, ipBlock with except matching pod addresses, and the flow events
each verdict leaves in the cilium_events ring (only for a connection's first packet).
"""
from __future__ import annotations

import dataclasses

import ctypes
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from cilium import events, identity, libbpf
from cilium import policy as cilium_policy
from cni.network_policy import Workload
from tests.unit.test_cilium_datapath import ACK, SYN, host_object, packet
from tests.unit.test_network_policy import _lab, _policy, _workloads

TC_ACT_OK, TC_ACT_SHOT = 0, 2
DENY_X = _policy("deny", "{podSelector: {}, policyTypes: [Ingress]}")
FROM_Y = _policy("from-y", "{podSelector: {matchLabels: {app: a}}, ingress: [{from: [{namespaceSelector: "
                           "{matchLabels: {ns: y}}}], ports: [{port: 8000, endPort: 8010}]}]}")
BLOCK = _policy("block", "{podSelector: {matchLabels: {app: a}}, ingress: [{from: [{ipBlock: "
                         "{cidr: 10.244.0.0/16, except: [10.244.2.0/24]}}]}]}")
NO_EGRESS = _policy("no-egress", "{podSelector: {matchLabels: {app: a}}, policyTypes: [Egress]}")


def _model(policies: str = "", alloc: identity.Allocation | None = None):  # type: ignore[no-untyped-def]
    lab = _lab(policies)
    workloads = _workloads(lab)
    return lab, workloads, identity.build(lab, workloads, alloc or identity.Allocation())


def _me(workloads: list[Workload], key: str) -> Workload:
    return next(w for w in workloads if w.pod.key == key)


# ---- pure ----------------------------------------------------------------------------------------

def test_identities_per_label_set_stable_and_recorded() -> None:
    lab, workloads, model = _model()
    ids = model.of_pod
    assert min(ids.values()) == identity.CLUSTER_MIN and len(set(ids.values())) == len(ids)  # all labels differ
    again = identity.Allocation.from_json(model.alloc.to_json())  # what the agent writes and reads back
    _, _, model2 = _model(alloc=again)
    assert model2.of_pod == ids


def test_a_relabel_changes_that_pods_identity_only() -> None:
    lab, workloads, model = _model()
    before = dict(model.of_pod)
    pod = _me(workloads, "y/b").pod
    moved = [Workload(dataclasses.replace(pod, labels=(("app", "special"),)), w.ip) if w.pod.key == "y/b"
             else w for w in workloads]
    after = identity.build(lab, moved, model.alloc).of_pod
    assert after["y/b"] not in before.values()
    assert {k: v for k, v in after.items() if k != "y/b"} == {k: v for k, v in before.items() if k != "y/b"}
    # the old label set is forgotten (no pod holds it), its number never handed out again
    assert before["y/b"] not in model.alloc.labels.values()


def test_port_ranges_become_lpm_port_prefixes() -> None:
    assert identity.port_prefixes(80, 80) == [(80, 16)]
    assert identity.port_prefixes(81, 85) == [(81, 16), (82, 15), (84, 15)]
    assert identity.port_prefixes(0, 65535) == [(0, 0)]
    covered = {p for start, bits in identity.port_prefixes(1000, 2050) for p in range(start, start + (1 << (16 - bits)))}
    assert covered == set(range(1000, 2051))


def test_endpoint_policy_keys() -> None:
    lab, workloads, model = _model(DENY_X + FROM_Y)
    x_a = identity.endpoint_policy(lab, _me(workloads, "x/a"), workloads, model)
    y_a = model.of_pod["y/a"]
    assert identity.PolicyKey(identity.ID_HOST, identity.INGRESS, 0, 0, 40) in x_a  # the node reaches its pods
    assert identity.PolicyKey(0, identity.EGRESS, 0, 0, 40) in x_a  # egress not isolated: everything
    ranged = sorted(k for k in x_a if k.identity == y_a)
    assert [(k.port, k.prefixlen) for k in ranged] == [(8000, 61), (8008, 63), (8010, 64)]
    assert {x_a[k] for k in ranged} == {model.alloc.policies["x/from-y"]}
    y_b = identity.endpoint_policy(lab, _me(workloads, "y/b"), workloads, model)
    assert set(y_b) == {identity.PolicyKey(0, identity.INGRESS, 0, 0, 40), identity.PolicyKey(0, identity.EGRESS, 0, 0, 40)}


def test_ipblock_except_gives_cidr_identities_and_the_ipcache_resolves_pods_to_them() -> None:
    lab, workloads, model = _model(BLOCK)
    wide, cut = model.alloc.cidrs[IPv4Network("10.244.0.0/16")], model.alloc.cidrs[IPv4Network("10.244.2.0/24")]
    assert wide > identity.LOCAL_SCOPE and cut > identity.LOCAL_SCOPE
    x_a = identity.endpoint_policy(lab, _me(workloads, "x/a"), workloads, model)
    assert {k.identity for k in x_a if k.direction == identity.INGRESS} == {identity.ID_HOST, wide}
    cache = {identity.unpack_ipcache(k, v)[0]: identity.unpack_ipcache(k, v)[1:3]
             for k, v in identity.ipcache_entries(lab, "node1", workloads, model).items()}
    assert cache[IPv4Network("10.244.1.2/32")] == (model.of_pod["x/a"], wide)
    assert cache[IPv4Network("10.244.2.2/32")] == (model.of_pod["x/b"], cut)
    assert cache[IPv4Network("192.168.1.10/32")][0] == identity.ID_HOST
    assert cache[IPv4Network("192.168.1.11/32")][0] == identity.ID_REMOTE_NODE
    assert cache[IPv4Network("0.0.0.0/0")] == (identity.ID_WORLD, identity.ID_WORLD)


def test_named_ports_resolve_on_the_destination() -> None:
    named = _policy("named", "{podSelector: {}, ingress: [{ports: [{port: http}]}], egress: [{to: "
                             "[{podSelector: {matchLabels: {app: b}}}], ports: [{port: alt}]}]}")
    lab, workloads, model = _model(named)
    x_a = identity.endpoint_policy(lab, _me(workloads, "x/a"), workloads, model)
    assert identity.PolicyKey(0, identity.INGRESS, 6, 8080, 64) in x_a  # its own port named http
    assert identity.PolicyKey(model.of_pod["x/b"], identity.EGRESS, 6, 81, 64) in x_a  # x/b's port named alt


# ---- the datapath ----------------------------------------------------------------------------------

class Ring:
    """The cilium_events ring read with libbpf's ring_buffer__new/consume (what `lab observe` does live)."""

    CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

    def __init__(self, fd: int) -> None:
        so = libbpf.lib()
        so.ring_buffer__new.restype = ctypes.c_void_p
        so.ring_buffer__new.argtypes = [ctypes.c_int, self.CALLBACK, ctypes.c_void_p, ctypes.c_void_p]
        so.ring_buffer__consume.argtypes = [ctypes.c_void_p]
        so.ring_buffer__free.argtypes = [ctypes.c_void_p]
        self.got: list[events.RawEvent] = []
        self._cb = self.CALLBACK(lambda _ctx, data, size: self.got.append(events.unpack(ctypes.string_at(data, size))) or 0)
        self._rb = so.ring_buffer__new(fd, self._cb, None, None)
        assert self._rb

    def drain(self) -> list[events.RawEvent]:
        libbpf.lib().ring_buffer__consume(self._rb)
        out, self.got = self.got, []
        return out

    def close(self) -> None:
        libbpf.lib().ring_buffer__free(self._rb)


class Node:
    def __init__(self, obj: libbpf.BpfObject, folder: Path) -> None:
        self.obj, self.folder = obj, folder
        self.ring = Ring(obj.map_fd(events.EVENTS))

    def load(self, policies: str) -> tuple[list[Workload], identity.Model]:
        """Fill the maps as the agent does for node1, each endpoint id being a made-up ifindex."""
        lab, workloads, model = _model(policies)
        for key, value in identity.ipcache_entries(lab, "node1", workloads, model).items():
            libbpf.update(self.obj.map_fd(identity.IPCACHE), key, value)
        for index, w in enumerate(w for w in workloads if w.pod.node == "node1"):
            fd = cilium_policy._policy_map(self.folder, 10 + index)
            cilium_policy._write_policy(fd, identity.endpoint_policy(lab, w, workloads, model))
            libbpf.update(self.obj.map_fd(identity.POLICY_MAPS), (10 + index).to_bytes(4, "little"), fd.to_bytes(4, "little"))
            libbpf.update(self.obj.map_fd(identity.LXC), identity.endpoint_key(w.ip),
                          identity.endpoint_info(10 + index, identity.enforcement(lab, w.pod), model.of_pod[w.pod.key],
                                                 identity.isolated_by(lab, w.pod, model.alloc)))
        return workloads, model

    def run(self, program: str, frame: bytes) -> int:
        return libbpf.test_run(self.obj.prog_fd(program), frame)[0]


@pytest.fixture
def node() -> Iterator[Node]:
    with host_object() as (obj, folder):
        made = Node(obj, folder)
        try:
            yield made
        finally:
            made.ring.close()


X_A, X_C, Y_A, X_B, Y_B = (IPv4Address(a) for a in ("10.244.1.2", "10.244.1.3", "10.244.1.4", "10.244.2.2", "10.244.2.3"))


def test_allowed_and_denied_first_packets_leave_a_verdict_event(node: Node) -> None:
    _, model = node.load(FROM_Y)
    assert node.run("cil_to_container", packet(Y_A, 40000, X_A, 8005)) == TC_ACT_OK  # ns y, in the range
    assert node.run("cil_to_container", packet(Y_A, 40001, X_A, 8011)) == TC_ACT_SHOT  # just past endPort
    assert node.run("cil_to_container", packet(X_C, 40002, X_A, 8005)) == TC_ACT_SHOT  # ns x: not allowed
    assert node.run("cil_to_container", packet(X_A, 40003, X_C, 8005)) == TC_ACT_OK  # x/c: not isolated
    got = node.ring.drain()
    verdicts = [(e.type, e.dport, bool(e.flags & events.FLOW_F_ALLOWED), e.policy_id) for e in got]
    pid = model.alloc.policies["x/from-y"]
    assert verdicts == [(events.EVENT_POLICY_VERDICT, 8005, True, pid),  # the policy that allowed it
                        (events.EVENT_POLICY_VERDICT, 8011, False, pid), (events.EVENT_DROP, 8011, False, pid),
                        (events.EVENT_POLICY_VERDICT, 8005, False, pid), (events.EVENT_DROP, 8005, False, pid),
                        (events.EVENT_POLICY_VERDICT, 8005, True, 0)]  # x/c: no policy isolates it
    drop = got[2]
    assert drop.subtype == events.DROP_POLICY and drop.flags & events.FLOW_F_INGRESS
    assert (drop.src_identity, drop.dst_identity) == (model.of_pod["y/a"], model.of_pod["x/a"])
    # the connection's next packets pass by their CT entry, with no event
    assert node.run("cil_to_container", packet(Y_A, 40000, X_A, 8005, flags=ACK)) == TC_ACT_OK
    assert node.ring.drain() == []


def test_the_reply_passes_an_egress_default_deny_by_its_ct_entry(node: Node) -> None:
    node.load(NO_EGRESS)  # x/a (and y/a) may not open anything
    assert node.run("cil_from_container", packet(X_A, 8080, X_B, 40000, flags=SYN | ACK)) == TC_ACT_SHOT  # no connection
    assert node.run("cil_to_container", packet(X_B, 40000, X_A, 8080)) == TC_ACT_OK  # x/b connects in
    assert node.run("cil_from_container", packet(X_A, 8080, X_B, 40000, flags=SYN | ACK)) == TC_ACT_OK  # the reply
    assert node.run("cil_from_container", packet(X_A, 8080, X_B, 40000, flags=ACK)) == TC_ACT_OK
    assert node.run("cil_from_container", packet(X_A, 8080, X_B, 40000, flags=SYN)) == TC_ACT_SHOT  # a new one
    assert node.run("cil_from_container", packet(X_A, 5353, Y_B, 53, proto=17)) == TC_ACT_SHOT  # UDP too


def test_ipblock_except_matches_pod_addresses(node: Node) -> None:
    node.load(BLOCK)
    assert node.run("cil_to_container", packet(X_C, 40000, X_A, 80)) == TC_ACT_OK  # node1's pod CIDR: inside
    assert node.run("cil_to_container", packet(X_B, 40000, X_A, 80)) == TC_ACT_SHOT  # node2's: the except
    assert node.run("cil_to_container", packet(IPv4Address("10.244.9.9"), 40000, X_A, 80)) == TC_ACT_OK  # a CIDR address
    assert node.run("cil_to_container", packet(IPv4Address("8.8.8.8"), 40000, X_A, 80)) == TC_ACT_SHOT  # world
    assert node.run("cil_to_container", packet(IPv4Address("192.168.1.10"), 40000, X_A, 80)) == TC_ACT_OK  # host


def test_a_packet_of_no_endpoint_is_left_alone(node: Node) -> None:
    node.load(DENY_X)
    assert node.run("cil_to_container", packet(X_C, 40000, IPv4Address("10.244.1.99"), 80)) == TC_ACT_OK
    assert node.ring.drain() == []


def test_the_debug_cli_renders_cilium_headings() -> None:
    from observe import cilium as debug

    ids = debug.render("identity list", [{"id": 1, "labels": ["reserved:host"]},
                                         {"id": 256, "labels": ["k8s:app=a", "k8s:io.kubernetes.pod.namespace=x"]}])
    assert ids.splitlines()[0].split() == ["ID", "LABELS"]
    assert ids.splitlines()[2].startswith("256") and ids.splitlines()[3].strip() == "k8s:io.kubernetes.pod.namespace=x"
    got = debug.render("bpf policy get 6", [
        {"policy": "Allow", "direction": "Ingress", "identity": 256, "proto": "TCP", "port": "80-87", "prefix": 61,
         "labels": ["k8s:app=a", "k8s:io.cilium.k8s.namespace.labels.ns=y", "k8s:io.kubernetes.pod.namespace=y"],
         "bytes": 74, "packets": 1, "policyId": 1, "networkPolicy": "x/from-y"}])
    head, row = got.splitlines()
    assert head.split()[:4] == ["POLICY", "DIRECTION", "LABELS", "(source:key[=value])"] and "NETWORKPOLICY" in head
    assert "80-87/TCP" in row and "x/from-y" in row and "namespace.labels" not in row
