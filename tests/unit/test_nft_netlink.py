"""Tests of services/nft_netlink.py's encoding (issue 17). Pure: no kernel. That the batch leaves what
`nft -f` leaves is checked against the kernel in tests/integration/test_nft_netlink.py."""
from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from bench.services import CLUSTER, NODE, service_ports
from services import kube_proxy_nftables as kp
from services import nft_netlink as nl
from services.endpoints import ServicePortEndpoints


def _exprs(encoded: bytes) -> list[str]:
    """The expression names in an NFTA_RULE_EXPRESSIONS attribute, in order."""
    names, off = [], 4
    while off < len(encoded):
        size = struct.unpack_from("=H", encoded, off)[0]
        name_size = struct.unpack_from("=H", encoded, off + 4)[0]
        names.append(encoded[off + 8:off + 4 + name_size].rstrip(b"\0").decode())
        off += (size + 3) & ~3
    return names


@pytest.mark.parametrize("rule, exprs", [
    ("ip daddr 10.96.0.1 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
     ["payload", "cmp", "meta", "cmp", "payload", "cmp", "payload", "cmp", "immediate"]),
    ("ip saddr 10.240.0.0/12 goto service-X", ["payload", "bitwise", "cmp", "immediate"]),
    ("meta l4proto udp dnat to 10.244.1.2:53", ["meta", "cmp", "immediate", "immediate", "nat"]),
    ("numgen random mod 3 == 0 goto endpoint-X", ["numgen", "cmp", "immediate"]),
    ("fib saddr type local jump mark-for-masquerade", ["fib", "cmp", "immediate"]),
    ("goto endpoint-X", ["immediate"]),
    ("ip saddr @affinity-X goto endpoint-X", ["payload", "lookup", "immediate"]),
    ("update @affinity-X { ip saddr }", ["payload", "dynset"]),
])
def test_rules_compile_to_the_expressions_nft_writes(rule: str, exprs: list[str]) -> None:
    """The expression lists are those `nft --debug=netlink` prints for these rules (nft 1.0.6)."""
    assert _exprs(nl.compile_rule(rule)) == exprs


@pytest.mark.parametrize("rule", ["ip saddr != @affinity-X goto endpoint-X", "update @affinity-X { meta mark }",
                                  "masquerade fully-random", "ip saddr 0.0.0.0/0 return", "dnat to 1.2.3.4:80",
                                  "goto"])
def test_other_rules_are_left_to_nft(rule: str) -> None:
    with pytest.raises(nl.Unsupported):
        nl.compile_rule(rule)


def test_concatenated_keys_pad_each_field_to_four_bytes() -> None:
    key = nl._key("ipv4_addr . inet_proto . inet_service : verdict", "10.96.0.10 . udp . 53")
    assert key == bytes([10, 96, 0, 10, 17, 0, 0, 0, 0, 53, 0, 0])


def test_a_delta_is_render_deltas_operations_in_its_order() -> None:
    sps = service_ports(4)
    old, new = kp.build(NODE, sps[:3], CLUSTER), kp.build(NODE, sps[1:], CLUSTER)
    kinds = [kind for kind, _, _ in nl.delta_messages(old, new)]
    assert kinds == [nl.DELSETELEM] + [nl.NEWCHAIN] * 3 + [nl.DELRULE] * 3 + [nl.NEWRULE] * 7 \
        + [nl.DELCHAIN] * 3 + [nl.NEWSETELEM]
    assert nl.delta_messages(new, new) == []


def test_affinity_sets_are_created_before_the_rules_naming_them_and_egress_is_left_to_nft() -> None:
    sp = service_ports(1)[0]
    sticky = ServicePortEndpoints(replace(sp.service, session_affinity="ClientIP"), sp.port, sp.endpoints)
    kinds = [kind for kind, _, _ in nl.delta_messages(kp.build(NODE, [], CLUSTER), kp.build(NODE, [sticky], CLUSTER))]
    assert kinds == [nl.NEWCHAIN] * 3 + [nl.NEWSET] * 2 + [nl.NEWRULE] * 11 + [nl.NEWSETELEM]
    longer = ServicePortEndpoints(replace(sticky.service, affinity_timeout=60), sp.port, sp.endpoints)
    kinds = [kind for kind, _, _ in nl.delta_messages(kp.build(NODE, [sticky], CLUSTER),
                                                      kp.build(NODE, [longer], CLUSTER))]
    # a set whose timeout changed is re-created while no rule names it: every chain naming it is rewritten
    assert kinds == [nl.DELRULE] * 3 + [nl.DELSET] * 2 + [nl.NEWSET] * 2 + [nl.NEWRULE] * 11
    other = replace(NODE, pod_cidr=NODE.pod_cidr.supernet(new_prefix=23))
    with pytest.raises(nl.Unsupported):
        nl.delta_messages(kp.build(NODE, [sp], CLUSTER), kp.build(other, [sp], CLUSTER))
    with pytest.raises(nl.Unsupported):
        nl._set("type ipv4_addr; flags dynamic; size 1024;")
