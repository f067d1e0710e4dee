"""The cilium profile's tc programs run on crafted packets with BPF_PROG_TEST_RUN: no namespace, no lab.
The object is loaded with its maps pinned in a private bpffs folder (removed after each test), the maps are
filled as the agent fills them, and the packet the program leaves is read back: NodePort translation to a
backend with SNAT (externalTrafficPolicy Cluster) or without (Local), the reverse NAT of the reply, valid
IPv4 and TCP/UDP checksums, cilium_ct4_global's lifecycle, and a packet for no service left untouched.

Forwarding (the kernel's route lookup and the redirect) is not part of these runs: a test run's packet has
no ingress device, so a translated packet ends in TC_ACT_SHOT here and in a redirect in a lab
(tests/integration/test_cilium.py and test_services.py show that end to end)."""
from __future__ import annotations

import contextlib
import shutil
import struct
import time
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from cilium import agent, build, libbpf, maps
from tests.conftest import require, require_root, require_tool

TC_ACT_OK = 0
NODE_IP = IPv4Address("192.168.1.10")
CLIENT = IPv4Address("192.168.1.200")
FRONTEND = maps.Frontend(NODE_IP, 30080, 6)
UDP_FRONTEND = maps.Frontend(NODE_IP, 30080, 17)
BACKEND = maps.Backend(IPv4Address("10.244.2.5"), 8080, 6)
UDP_BACKEND = maps.Backend(IPv4Address("10.244.2.5"), 8081, 17)
SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def packet(src: IPv4Address, sport: int, dst: IPv4Address, dport: int, proto: int = 6, flags: int = SYN,
           payload: bytes = b"hello", udp_csum: bool = True) -> bytes:
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, flags, 65535, 0, 0) + payload
        at = 16
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        at = 6
    pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, proto, len(l4))
    csum = checksum(pseudo + l4) if proto == 6 or udp_csum else 0
    l4 = l4[:at] + struct.pack("!H", csum) + l4[at + 2:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0, src.packed, dst.packed)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    eth = bytes.fromhex("020000000001") + bytes.fromhex("020000000002") + b"\x08\x00"
    return eth + ip + l4


def parsed(frame: bytes) -> dict:
    ip = frame[14:34]
    proto, src, dst = ip[9], IPv4Address(ip[12:16]), IPv4Address(ip[16:20])
    l4 = frame[34:]
    sport, dport = struct.unpack("!HH", l4[:4])
    at = 16 if proto == 6 else 6
    stored = struct.unpack("!H", l4[at:at + 2])[0]
    pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, proto, len(l4))
    l4_ok = (proto == 17 and stored == 0) or checksum(pseudo + l4) == 0
    return {"src": str(src), "sport": sport, "dst": str(dst), "dport": dport, "ip_ok": checksum(ip) == 0,
            "l4_ok": l4_ok, "l4_csum": stored}


class Node:
    """bpf_host.o loaded once, its maps pinned in a private folder, filled as the agent fills a node's."""

    def __init__(self, obj: libbpf.BpfObject) -> None:
        self.obj = obj

    def fd(self, name: str) -> int:
        return self.obj.map_fd(name)

    def services(self, *entries: maps.ServiceEntry) -> None:
        for name, content in maps.desired(list(entries), maps.Ids()).items():
            for key, value in content.items():
                libbpf.update(self.fd(name), key, value)

    def ct(self) -> dict[tuple[str, str, int], tuple]:
        out = {}
        for key, value in libbpf.entries(self.fd(maps.CT), *maps.SIZES[maps.CT]):
            daddr, saddr, dport, sport, proto, flags = maps.CT_KEY.unpack(key)
            tup = f"{IPv4Address(saddr)}:{maps.port_of(sport)}->{IPv4Address(daddr)}:{maps.port_of(dport)}"
            out[("IN" if flags else "OUT", tup, proto)] = maps.CT_VALUE.unpack(value)
        return out

    def run(self, program: str, frame: bytes) -> tuple[int, bytes]:
        return libbpf.test_run(self.obj.prog_fd(program), frame)


@contextlib.contextmanager
def host_object() -> Iterator[tuple[libbpf.BpfObject, Path]]:
    """bpf_host's programs loaded with their maps pinned in a private bpffs folder (outside any lab's),
    removed after, also when the test fails. Skips without root, clang or libbpf-dev."""
    require_root()
    require_tool("clang")
    require(Path("/usr/include/bpf/bpf_helpers.h").exists(), "needs libbpf-dev (./install.sh installs it)")
    agent.ensure_bpffs()
    folder = agent.BPFFS / f"kubenet-lab-unit-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        with libbpf.BpfObject(str(build.object_path("bpf_host")), str(folder)) as obj:
            yield obj, folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert not folder.exists()


@pytest.fixture
def node() -> Iterator[Node]:
    with host_object() as (obj, _):
        cfg = maps.NODE_CONFIG.pack(IPv4Network("10.244.1.0/24").netmask.packed, NODE_IP.packed, 0)
        libbpf.update(obj.map_fd(maps.CONFIG), maps.CONFIG_KEY.pack(0), cfg)
        yield Node(obj)


def syn_through(node: Node, sport: int = 40000) -> tuple[dict, tuple[str, str, int]]:
    rc, out = node.run("cil_from_netdev", packet(CLIENT, sport, NODE_IP, 30080))
    assert rc != TC_ACT_OK  # translated: handed to forwarding, not to the node's own stack
    return parsed(out), rc


def test_a_nodeport_syn_is_translated_to_the_backend_and_snated_to_the_node(node: Node) -> None:
    node.services(maps.ServiceEntry(FRONTEND, (BACKEND,), maps.SVC_FLAG_NODEPORT))
    got, _ = syn_through(node)
    assert (got["dst"], got["dport"]) == ("10.244.2.5", 8080)
    assert got["src"] == str(NODE_IP) and 32768 <= got["sport"] <= 60999
    assert got["ip_ok"] and got["l4_ok"]  # IPv4 and TCP checksums still valid after four rewrites
    ct = node.ct()
    out = ct[("OUT", f"{CLIENT}:40000->{NODE_IP}:30080", 6)]
    assert (IPv4Address(out[1]), maps.port_of(out[2])) == (BACKEND.address, 8080)
    assert (IPv4Address(out[4]), maps.port_of(out[5])) == (NODE_IP, got["sport"])
    assert ("IN", f"10.244.2.5:8080->{NODE_IP}:{got['sport']}", 6) in ct
    assert out[0] - time.monotonic() <= 61  # a SYN's entry lives 60 s until the connection is established


def test_the_reply_is_reverse_nated_to_the_frontend_and_the_client(node: Node) -> None:
    node.services(maps.ServiceEntry(FRONTEND, (BACKEND,), maps.SVC_FLAG_NODEPORT))
    got, _ = syn_through(node)
    for program in ("cil_from_netdev", "cil_from_container"):  # backend on another node / on this one
        reply = packet(BACKEND.address, 8080, NODE_IP, got["sport"], flags=SYN | ACK, payload=b"")
        if program == "cil_from_container":
            reply = packet(BACKEND.address, 8080, NODE_IP, got["sport"], flags=ACK, payload=b"data")
        rc, out = node.run(program, reply)
        back = parsed(out)
        assert rc != TC_ACT_OK
        assert (back["src"], back["sport"], back["dst"], back["dport"]) == (str(NODE_IP), 30080, str(CLIENT), 40000)
        assert back["ip_ok"] and back["l4_ok"]
    ct = node.ct()
    established = ct[("OUT", f"{CLIENT}:40000->{NODE_IP}:30080", 6)]
    assert established[0] - time.monotonic() > 3600  # 6 h once past the SYN (both directions)
    assert established[7] == 1 and ct[("IN", f"10.244.2.5:8080->{NODE_IP}:{got['sport']}", 6)][7] == 2


def test_local_policy_keeps_the_client_address(node: Node) -> None:
    node.services(maps.ServiceEntry(FRONTEND, (BACKEND,), maps.SVC_FLAG_NODEPORT | maps.SVC_FLAG_LOCAL))
    got, _ = syn_through(node, 41000)
    assert (got["src"], got["sport"], got["dst"]) == (str(CLIENT), 41000, "10.244.2.5")
    rc, out = node.run("cil_from_container", packet(BACKEND.address, 8080, CLIENT, 41000, flags=SYN | ACK))
    assert parsed(out)["src"] == str(NODE_IP) and parsed(out)["sport"] == 30080 and parsed(out)["l4_ok"]


def test_a_local_policy_frontend_without_a_local_backend_drops(node: Node) -> None:
    node.services(maps.ServiceEntry(FRONTEND, (), maps.SVC_FLAG_NODEPORT | maps.SVC_FLAG_LOCAL))
    rc, out = node.run("cil_from_netdev", packet(CLIENT, 40000, NODE_IP, 30080))
    assert rc == 2 and parsed(out)["dst"] == str(NODE_IP) and node.ct() == {}  # TC_ACT_SHOT, nothing tracked


def test_udp_is_translated_with_its_checksum_and_a_zero_checksum_stays_zero(node: Node) -> None:
    node.services(maps.ServiceEntry(UDP_FRONTEND, (UDP_BACKEND,), maps.SVC_FLAG_NODEPORT))
    rc, out = node.run("cil_from_netdev", packet(CLIENT, 5353, NODE_IP, 30080, proto=17))
    got = parsed(out)
    assert (got["dst"], got["dport"], got["src"]) == ("10.244.2.5", 8081, str(NODE_IP))
    assert got["ip_ok"] and got["l4_ok"] and got["l4_csum"] != 0
    rc, out = node.run("cil_from_netdev", packet(CLIENT, 5354, NODE_IP, 30080, proto=17, udp_csum=False))
    assert parsed(out)["l4_csum"] == 0 and parsed(out)["dst"] == "10.244.2.5"  # "no checksum" is kept


def test_packets_for_no_service_pass_untouched(node: Node) -> None:
    node.services(maps.ServiceEntry(FRONTEND, (BACKEND,), maps.SVC_FLAG_NODEPORT))
    for frame in (packet(CLIENT, 40000, NODE_IP, 22),  # the node's own port
                  packet(CLIENT, 40000, IPv4Address("192.168.1.11"), 30080),  # another node's address
                  packet(CLIENT, 8472, NODE_IP, 8472, proto=17),  # the tunnel's own traffic
                  packet(CLIENT, 40000, NODE_IP, 30080, flags=ACK)):  # mid-connection, never tracked
        assert node.run("cil_from_netdev", frame) == (TC_ACT_OK, frame)
    plain = packet(BACKEND.address, 8080, CLIENT, 40000, flags=SYN | ACK)
    assert node.run("cil_from_container", plain) == (TC_ACT_OK, plain)  # a pod's own traffic
    assert node.ct() == {}


def test_an_rst_removes_both_entries(node: Node) -> None:
    node.services(maps.ServiceEntry(FRONTEND, (BACKEND,), maps.SVC_FLAG_NODEPORT))
    got, _ = syn_through(node)
    rc, out = node.run("cil_from_netdev", packet(CLIENT, 40000, NODE_IP, 30080, flags=RST | ACK, payload=b""))
    assert parsed(out)["dst"] == "10.244.2.5"  # the RST itself still reaches the backend
    assert node.ct() == {}


def test_a_fin_shortens_both_entries_to_the_close_timeout(node: Node) -> None:
    node.services(maps.ServiceEntry(FRONTEND, (BACKEND,), maps.SVC_FLAG_NODEPORT))
    got, _ = syn_through(node)
    node.run("cil_from_netdev", packet(CLIENT, 40000, NODE_IP, 30080, flags=FIN | ACK, payload=b""))
    ct = node.ct()
    assert len(ct) == 2 and all(v[6] == 1 and v[0] - time.monotonic() <= 11 for v in ct.values())


def test_a_new_flow_reusing_a_reply_tuple_is_not_hijacked(node: Node) -> None:
    """The pitfall of a reverse NAT with no lifecycle: the backend opening its own connection with the
    reply's tuple must not be rewritten; the stale pair is removed instead."""
    node.services(maps.ServiceEntry(FRONTEND, (BACKEND,), maps.SVC_FLAG_NODEPORT))
    got, _ = syn_through(node)
    own = packet(BACKEND.address, 8080, NODE_IP, got["sport"], flags=SYN)
    assert node.run("cil_from_container", own) == (TC_ACT_OK, own)
    assert node.ct() == {}


def test_an_expired_entry_is_replaced_by_a_new_connection(node: Node) -> None:
    node.services(maps.ServiceEntry(FRONTEND, (BACKEND,), maps.SVC_FLAG_NODEPORT))
    syn_through(node)
    fd = node.fd(maps.CT)
    for key, value in list(libbpf.entries(fd, *maps.SIZES[maps.CT])):  # age both entries past their lifetime
        libbpf.update(fd, key, struct.pack("=Q", 1) + value[8:])
    late = packet(BACKEND.address, 8080, NODE_IP, 40000, flags=ACK)
    assert node.run("cil_from_netdev", late) == (TC_ACT_OK, late)  # a dead entry translates nothing
    got, _ = syn_through(node)
    assert got["dst"] == "10.244.2.5"
    assert all(v[0] > 1 for v in node.ct().values())
