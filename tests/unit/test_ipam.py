"""host-local semantics, without root: the arithmetic every pod IP comes from."""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from cni.ipam import LeaseFile, NodeIpam
from topo.errors import IpamExhausted


def test_first_pod_gets_dot_2_and_a_slash_24_holds_253() -> None:
    ipam = NodeIpam("node1", IPv4Network("10.244.1.0/24"))
    assert ipam.allocate("a") == IPv4Interface("10.244.1.2/24")
    assert ipam.capacity == 253
    got = [ipam.allocate(f"c{i}").ip for i in range(252)]
    assert got[-1] == IPv4Address("10.244.1.254")
    with pytest.raises(IpamExhausted) as exc:
        ipam.allocate("pod-254")
    assert "node node1" in str(exc.value) and "10.244.1.0/24" in str(exc.value) and "253" in str(exc.value)


def test_allocate_is_idempotent_per_container() -> None:
    ipam = NodeIpam("n", IPv4Network("10.244.1.0/24"))
    assert ipam.allocate("a") == ipam.allocate("a")
    assert len(ipam.leases) == 1


def test_allocation_resumes_after_the_last_reserved_and_wraps() -> None:
    ipam = NodeIpam("n", IPv4Network("10.244.1.0/29"))  # .2 .. .6
    for cid in "abc":
        ipam.allocate(cid)
    assert ipam.release("a") == IPv4Address("10.244.1.2")
    assert ipam.allocate("d").ip == IPv4Address("10.244.1.5")  # not the freed .2
    ipam.allocate("e")
    assert ipam.allocate("f").ip == IPv4Address("10.244.1.2")  # wrapped around to the freed one


def test_release_of_unknown_is_fine() -> None:
    assert NodeIpam("n", IPv4Network("10.244.1.0/24")).release("ghost") is None


def test_tiny_cidrs_hold_what_they_should() -> None:
    assert NodeIpam("n", IPv4Network("10.0.0.0/30")).capacity == 1
    assert NodeIpam("n", IPv4Network("10.0.0.0/31")).capacity == 0
    with pytest.raises(IpamExhausted):
        NodeIpam("n", IPv4Network("10.0.0.0/31")).allocate("a")


def test_lease_file_round_trip_under_lock(tmp_path: Path) -> None:
    leases = LeaseFile(tmp_path / "node1.json", "node1", IPv4Network("10.244.1.0/24"))
    with leases.locked() as ipam:
        ipam.allocate("a", pod="default/a")
        ipam.allocate("b", pod="default/b")
    with leases.locked() as ipam:
        ipam.release("a")
    again = leases.read()
    assert {str(ip): l.pod for ip, l in again.leases.items()} == {"10.244.1.3": "default/b"}
    assert again.last_reserved == IPv4Address("10.244.1.3")
    assert again.allocate("c").ip == IPv4Address("10.244.1.4")
