"""services/nft_netlink.py against the real kernel (issue 17): the partial sync's netlink batch leaves exactly
the table `nft -f` of render_delta leaves (compared as `nft list table` prints them), for every rule shape
kube-proxy's nftables mode writes; a batch whose generation is stale is refused whole; and the sync falls
back to a full load when the batch cannot apply."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from bench.services import NODE, service_ports
from services import kube_proxy_nft_sync as ks
from services import kube_proxy_nftables as kp
from services import nft_netlink
from services.endpoints import Endpoint, ServicePortEndpoints
from services.kube_proxy_partial import nft_generation
from tests.conftest import require_root, require_tool
from tests.integration.conftest import unique
from topo import netns
from topo.errors import ApplyError
from topo.model import Cluster, Service, ServicePort

ODD = Cluster(pod_cidr=IPv4Network("10.240.0.0/12"))  # a pod CIDR that is not whole bytes: nft masks it


@pytest.fixture
def two_ns() -> Iterator[tuple[str, str]]:
    require_root()
    require_tool("nft")
    names = (unique("nftnl-a"), unique("nftnl-b"))
    for name in names:
        netns.create(name)
    try:
        yield names
    finally:
        for name in names:
            netns.delete(name)


def _nft(ns: str, *args: str, script: str | None = None) -> str:
    with netns.entered(ns):
        proc = subprocess.run(["nft", *args], input=script, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _listing(ns: str) -> str:
    return _nft(ns, "list", "ruleset")


def _blocks(listing: str) -> list[str]:
    """The listing's chains, sets and maps, sorted: a delta appends new chains where a full load puts them
    in order."""
    blocks: list[list[str]] = [[]]
    for line in listing.splitlines():
        if line.startswith(("\tchain ", "\tset ", "\tmap ", "table ")):
            blocks.append([])
        if line.strip():
            blocks[-1].append(line)
    return sorted("\n".join(b) for b in blocks)


def _kinds() -> list[ServicePortEndpoints]:
    """One service port of each shape a delta writes: UDP, SCTP, NodePort (Cluster), NodePort Local with and
    without a local endpoint, no endpoints, three endpoints."""
    ep = lambda ip, node="node1": Endpoint(IPv4Address(ip), 9000, node, "default/p")  # noqa: E731
    out = []
    for i, (proto, kind, policy, eps) in enumerate([
            ("UDP", "ClusterIP", "Cluster", [ep("10.244.1.5")]),
            ("SCTP", "ClusterIP", "Cluster", [ep("10.244.1.5"), ep("10.244.2.5", "node2")]),
            ("TCP", "NodePort", "Cluster", [ep("10.244.2.6", "node2")]),
            ("TCP", "NodePort", "Local", [ep("10.244.1.7"), ep("10.244.2.7", "node2")]),
            ("TCP", "NodePort", "Local", [ep("10.244.2.8", "node2")]),
            ("TCP", "NodePort", "Cluster", []),
            ("TCP", "ClusterIP", "Cluster", []),
            ("TCP", "ClusterIP", "Cluster", [ep("10.244.1.9"), ep("10.244.1.10"), ep("10.244.2.9", "node2")])]):
        port = ServicePort("http", 80 + i, 9000, proto, 30100 + i if kind == "NodePort" else None)
        svc = Service(f"kind-{i}", "shapes", IPv4Address(f"10.96.5.{i + 1}"), (port,), type=kind,
                      external_traffic_policy=policy)
        out.append(ServicePortEndpoints(svc, port, tuple(eps)))
    return out


def _cases() -> dict[str, tuple[Cluster, list, list]]:
    base, kinds = service_ports(20), _kinds()
    fewer = ServicePortEndpoints(base[4].service, base[4].port, base[4].endpoints[:1])
    none = ServicePortEndpoints(base[5].service, base[5].port, ())
    sticky = [ServicePortEndpoints(replace(sp.service, session_affinity="ClientIP", affinity_timeout=t),
                                   sp.port, sp.endpoints) for sp, t in ((base[6], 10800), (kinds[3], 60))]
    shorter = ServicePortEndpoints(replace(sticky[0].service, affinity_timeout=30), sticky[0].port,
                                   sticky[0].endpoints[:1])
    return {"every shape added": (Cluster(), base, base + kinds),
            "ClientIP affinity added": (Cluster(), base, base[:6] + base[7:] + sticky),
            "ClientIP affinity: timeout and endpoints changed, removed": (
                Cluster(), base[:6] + base[7:] + sticky, base[:6] + base[7:] + [shorter]),
            "every shape removed": (Cluster(), base + kinds, base),
            "endpoints changed, lost, service removed": (Cluster(), base, base[:3] + [fewer, none] + base[6:]),
            "pod cidr not whole bytes": (ODD, base, base + kinds),
            # a batch of megabytes, its elements split over several messages (an attribute holds 64 KiB)
            "a thousand at once": (Cluster(), base, service_ports(1000))}


@pytest.mark.parametrize("case", list(_cases()))
def test_the_netlink_batch_leaves_what_nft_f_leaves(two_ns: tuple[str, str], case: str) -> None:
    cluster, old_sps, new_sps = _cases()[case]
    by_nft, by_netlink = two_ns
    old, new = kp.build(NODE, old_sps, cluster), kp.build(NODE, new_sps, cluster)
    for ns in two_ns:
        _nft(ns, "-f", "-", script=kp.render_full(old))
    before = _listing(by_nft)
    _nft(by_nft, "-f", "-", script=kp.render_delta(old, new))
    nft_netlink.apply_delta(by_netlink, old, new, nft_generation(by_netlink))
    assert _listing(by_netlink) == _listing(by_nft) != before
    _nft(by_nft, "-f", "-", script=kp.render_full(new))  # and both hold what a full load of the new table holds
    assert _blocks(_listing(by_netlink)) == _blocks(_listing(by_nft))


def test_a_stale_generation_refuses_the_whole_batch(two_ns: tuple[str, str]) -> None:
    ns = two_ns[0]
    old_sps = service_ports(5)
    old, new = kp.build(NODE, old_sps, Cluster()), kp.build(NODE, service_ports(7), Cluster())
    _nft(ns, "-f", "-", script=kp.render_full(old))
    stale = nft_generation(ns)
    _nft(ns, "add", "table", "ip", "someone-else")  # any commit in the namespace moves the generation
    before = _listing(ns)
    with pytest.raises(ApplyError, match="changed meanwhile"):
        nft_netlink.apply_delta(ns, old, new, stale)
    assert _listing(ns) == before


def test_the_sync_applies_one_service_by_netlink_and_repairs_a_race_with_a_full_load(
        two_ns: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ns, reference = two_ns
    sps = service_ports(12)
    saved = tmp_path / "node.nft.json"
    loads: list[str] = []

    def load(script: str) -> None:
        loads.append(script)
        _nft(ns, "-f", "-", script=script)

    assert ks.sync(ns, NODE, sps[:10], Cluster(), saved, load) == "full"
    assert ks.sync(ns, NODE, sps[:11], Cluster(), saved, load) == "partial"
    assert len(loads) == 1  # the +1 went by netlink, no nft process
    _nft(reference, "-f", "-", script=kp.render_full(kp.build(NODE, sps[:11], Cluster())))
    assert _listing(ns) == _listing(reference)

    # someone deletes a rule right after the sync read the generation: the kernel refuses the batch
    # (its generation is stale) and the sync replaces the table whole, which also repairs the hand edit
    real = ks.nft_generation
    calls = []

    def racing(name: str) -> int | None:
        generation = real(name)
        if not calls:
            _nft(ns, "flush", "chain", "ip", "kube-proxy", kp.service_chain(sps[0]))
        calls.append(generation)
        return generation

    monkeypatch.setattr(ks, "nft_generation", racing)
    assert ks.sync(ns, NODE, sps, Cluster(), saved, load) == "full"
    _nft(reference, "-f", "-", script=kp.render_full(kp.build(NODE, sps, Cluster())))
    assert _listing(ns) == _listing(reference)
    assert not ks.pending_path(saved).exists()


def test_a_batch_that_does_not_fit_the_kernel_fails_whole(two_ns: tuple[str, str]) -> None:
    """The kernel holds 5 services, the batch believes 6 (their removal fails: no such element or chain):
    the error comes back and nothing of the batch is applied."""
    ns = two_ns[0]
    sps = service_ports(7)
    held = kp.build(NODE, sps[:5], Cluster())
    _nft(ns, "-f", "-", script=kp.render_full(held))
    before = _listing(ns)
    believed, wanted = kp.build(NODE, sps[:6], Cluster()), kp.build(NODE, sps[:4] + sps[6:], Cluster())
    with pytest.raises(ApplyError, match="No such file or directory"):
        nft_netlink.apply_delta(ns, believed, wanted, nft_generation(ns))
    assert _listing(ns) == before


def test_a_sync_cut_after_its_batch_converges_on_the_next_run(
        two_ns: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between the batch and journaling it: the marker stays, and the next sync (a new process: no
    memory) loads the table whole instead of trusting a saved state the kernel no longer matches."""
    ns, reference = two_ns
    sps = service_ports(12)
    saved = tmp_path / "node.nft.json"

    def load(script: str) -> None:
        _nft(ns, "-f", "-", script=script)

    assert ks.sync(ns, NODE, sps[:10], Cluster(), saved, load) == "full"
    real = ks.nft_generation
    calls: list[str] = []

    def killed_after_the_batch(name: str) -> int | None:
        calls.append(name)
        if len(calls) == 2:  # the read right after the batch: the process dies here
            raise KeyboardInterrupt
        return real(name)

    monkeypatch.setattr(ks, "nft_generation", killed_after_the_batch)
    with pytest.raises(KeyboardInterrupt):
        ks.sync(ns, NODE, sps[:11], Cluster(), saved, load)
    monkeypatch.setattr(ks, "nft_generation", real)
    assert ks.pending_path(saved).exists()
    ks._LOADED.clear()  # a new process
    kp._BY_ID.clear()
    assert ks.sync(ns, NODE, sps, Cluster(), saved, load) == "full"
    assert not ks.pending_path(saved).exists()
    _nft(reference, "-f", "-", script=kp.render_full(kp.build(NODE, sps, Cluster())))
    assert _listing(ns) == _listing(reference)
    assert ks.sync(ns, NODE, sps[:11], Cluster(), saved, load) == "partial"  # and partial again after
