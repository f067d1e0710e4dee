"""The cilium profile's map contents, pure: slots, ids kept across syncs, reverse NAT, tunnel entries; and
the layouts agree with the C structs' sizes (cilium/bpf/maps.h)."""
from __future__ import annotations

from ipaddress import IPv4Address

from cilium import maps

WEB = maps.Frontend(IPv4Address("10.96.0.100"), 80, 6)
B1 = maps.Backend(IPv4Address("10.244.1.2"), 8080, 6)
B2 = maps.Backend(IPv4Address("10.244.2.2"), 8080, 6)


def test_struct_sizes_match_the_c_layouts() -> None:
    assert (maps.LB4_KEY.size, maps.LB4_SERVICE.size, maps.LB4_BACKEND.size) == (12, 12, 12)
    assert (maps.TUNNEL_KEY.size, maps.TUNNEL_VALUE.size, maps.REV_NAT.size) == (20, 20, 8)


def test_a_service_is_slot_zero_plus_one_slot_per_backend() -> None:
    want = maps.desired([maps.ServiceEntry(WEB, (B1, B2))], maps.Ids())
    slots = {maps.unpack_lb4_key(k)[1]: maps.LB4_SERVICE.unpack(v) for k, v in want[maps.SERVICES].items()}
    assert slots[0][1] == 2 and {slots[1][0], slots[2][0]} == {1, 2}
    assert maps.unpack_lb4_key(maps.lb4_key(WEB, 0)) == (WEB, 0)
    assert {maps.unpack_backend(v) for v in want[maps.BACKENDS].values()} == {B1, B2}


def test_ids_read_back_from_the_maps_are_kept_so_a_change_rewrites_little() -> None:
    first = maps.desired([maps.ServiceEntry(WEB, (B1, B2))], maps.Ids())
    again = maps.desired([maps.ServiceEntry(WEB, (B2,))], maps.ids_from(first))
    assert maps.ids_from(again).backends[B2] == maps.ids_from(first).backends[B2]
    assert again[maps.REVNAT] == first[maps.REVNAT]


def test_new_ids_go_above_the_highest_found_and_reuse_gaps_only_at_the_limit() -> None:
    ids = maps.Ids(frontends={WEB: 7})
    fresh = [maps.Frontend(IPv4Address(f"10.96.1.{i}"), 80, 6) for i in range(1, 4)]
    assert [ids.frontend(fe) for fe in fresh] == [8, 9, 10]
    full = maps.Ids(frontends={WEB: 0xFFFF, fresh[0]: 1})
    assert full.frontend(fresh[1]) == 2  # the highest is at the 16-bit limit: the lowest free one
