"""Tests of services/kube_proxy_partial.py (issue 17): kube-proxy's partial sync in iptables mode computed from
the changed service ports only. Pure: the restore inputs are replayed on parsed tables (apply_delta) and must
give exactly the full text of the new rules; the kernel side is in tests/integration/test_services.py."""
from __future__ import annotations

from dataclasses import replace

import pytest

from bench.services import CLUSTER, NODE, service_ports
from services import kube_proxy_iptables as ipt
from services import kube_proxy_partial as kpp
from services.endpoints import ServicePortEndpoints


def _changes(count: int) -> dict[str, tuple[list, list]]:
    base = service_ports(count)
    extra = service_ports(count + 3)[count:]
    one = base[4]
    fewer = ServicePortEndpoints(one.service, one.port, one.endpoints[:1])
    nodeport = ServicePortEndpoints(replace(extra[2].service, type="NodePort"),
                                    replace(extra[2].port, node_port=30999), extra[2].endpoints)
    empty = ServicePortEndpoints(extra[1].service, extra[1].port, ())
    return {
        "one added at the end": (base, base + extra[:1]),
        "two added, a NodePort and one without endpoints": (base, base + [nodeport, empty]),
        "one added in the middle": (base, base[:3] + extra[:1] + base[3:]),
        "one removed": (base, base[:2] + base[3:]),
        "endpoints of one changed": (base, base[:4] + [fewer] + base[5:]),
        "removed, changed and added at once": (base, base[:1] + base[2:4] + [fewer] + base[5:] + extra[:2]),
        "order changed": (base, base[::-1]),
        "nothing changed": (base, list(base)),
    }


@pytest.mark.parametrize("count", [20, 600])  # 600 x 2 endpoints: kube-proxy's large cluster mode
@pytest.mark.parametrize("edit", [True, False])
@pytest.mark.parametrize("case", list(_changes(20)))
def test_the_partial_input_turns_the_loaded_rules_into_the_new_ones(case: str, edit: bool, count: int) -> None:
    old_sps, new_sps = _changes(count)[case]
    old, new = ipt.plan(NODE, old_sps, CLUSTER), ipt.plan(NODE, new_sps, CLUSTER)
    delta, top = kpp.plan_delta(old, kpp.top_rules(old), new, edit)
    assert delta is not None and top == kpp.top_rules(new)
    state = ipt.tables(old.text())
    kpp.apply_delta(state, delta)
    assert state == ipt.tables(new.text())
    assert not ipt.check_jumps(new.text())
    if case == "nothing changed":
        assert delta == ""
    elif not edit:  # kube-proxy's way: the top-level chains written whole on every sync
        assert ":KUBE-SERVICES - [0:0]" in delta
    elif case != "order changed":
        assert ":KUBE-SERVICES - [0:0]" not in delta and len(delta.splitlines()) < 40  # a few lines, not 600


def test_untouched_service_ports_are_not_looked_at() -> None:
    """The same service port objects give the very same records: only the new one is rendered."""
    sps = service_ports(50)
    first = ipt.plan(NODE, sps, CLUSTER)
    second = ipt.plan(NODE, sps + service_ports(51)[50:], CLUSTER)
    assert all(a is b for a, b in zip(first.parts, second.parts)) and len(second.parts) == 51


def test_large_cluster_mode_drops_the_endpoint_comments_as_kube_proxy_does() -> None:
    """kube-proxy's largeClusterEndpointsThreshold (1,000 endpoints): no comment on KUBE-SEP rules nor on the
    KUBE-SVC jumps to them; the "cluster IP" comments stay."""
    small = ipt.tables(ipt.render(NODE, service_ports(500), CLUSTER))["nat"]  # 1,000 endpoints: not above
    large = ipt.tables(ipt.render(NODE, service_ports(501), CLUSTER))["nat"]
    for chains, commented in ((small, True), (large, False)):
        seps = [r for c, rules in chains.items() if c.startswith("KUBE-SEP-") for r in rules]
        jumps = [r for c, rules in chains.items() if c.startswith("KUBE-SVC-") for r in rules if "KUBE-SEP-" in r]
        assert all(("--comment" in r) == commented for r in seps + jumps)
        assert all("cluster IP" in r for r in chains["KUBE-SERVICES"][:-1])


def test_apply_delta_replays_what_iptables_restore_does() -> None:
    state = {"nat": {"KUBE-SERVICES": ["a", "b", "c"], "KUBE-SVC-X": ["x"]}}
    kpp.apply_delta(state, "*nat\n:KUBE-SVC-Y - [0:0]\n:KUBE-SVC-X - [0:0]\n-D KUBE-SERVICES 2\n"
                           "-I KUBE-SERVICES 3 d\n-A KUBE-SVC-Y y\n-X KUBE-SVC-X\nCOMMIT\n")
    assert state == {"nat": {"KUBE-SERVICES": ["a", "c", "d"], "KUBE-SVC-Y": ["y"]}}
