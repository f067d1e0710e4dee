"""Tests of services/kube_proxy_nft_sync.py (issue 17): nftables mode's incremental sync. Pure: the delta of the
changed service ports alone equals the delta of the whole tables, and the saved journal replays to the new
table; loading them into the kernel is in tests/integration/test_services.py."""
from __future__ import annotations

from dataclasses import replace

import pytest

from bench.services import CLUSTER, NODE, service_ports
from services import kube_proxy_nft_sync as ks
from services import kube_proxy_nftables as kp
from services.endpoints import ServicePortEndpoints


def _cases() -> dict[str, tuple[list, list]]:
    base = service_ports(30)
    extra = service_ports(33)[30:]
    sticky = ServicePortEndpoints(replace(extra[0].service, session_affinity="ClientIP"), extra[0].port,
                                  extra[0].endpoints)
    fewer = ServicePortEndpoints(base[4].service, base[4].port, base[4].endpoints[:1])
    return {"added": (base, base + [sticky]), "removed": (base, base[:3] + base[4:]),
            "changed": (base, base[:4] + [fewer] + base[5:]),
            "all at once": (base, base[:2] + base[3:4] + [fewer] + base[5:] + extra[1:])}


def _same(a: kp.Ruleset, b: kp.Ruleset) -> bool:
    return (a.chain_rules == b.chain_rules and {m.name: dict(m.elements) for m in a.maps} ==
            {m.name: dict(m.elements) for m in b.maps} and set(a.sets) == set(b.sets) and a.egress == b.egress)


@pytest.mark.parametrize("case", list(_cases()))
def test_the_changed_ports_alone_give_the_whole_change(case: str) -> None:
    old_sps, new_sps = _cases()[case]
    old_parts, new_parts = kp.parts(NODE, old_sps, CLUSTER), kp.parts(NODE, new_sps, CLUSTER)
    gone = [p for p in old_parts if all(p is not q for q in new_parts)]
    fresh = [p for p in new_parts if all(p is not q for q in old_parts)]
    assert len(gone) + len(fresh) <= 5  # the unchanged ports' contributions are the very same objects
    before, after = kp.assemble(NODE, CLUSTER, gone), kp.assemble(NODE, CLUSTER, fresh)
    old, new = kp.build(NODE, old_sps, CLUSTER), kp.build(NODE, new_sps, CLUSTER)
    assert _same(ks.replace_parts(old, before, after), new)  # what the journal replays
    partial = kp.render_delta(before, after)
    assert set(partial.splitlines()) <= set(kp.render_delta(old, new).splitlines()) | {"}"}
    assert "table ip kube-proxy {" not in partial  # never the whole table
