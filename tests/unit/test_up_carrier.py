"""`lab up`'s wait for carriers (lab/apply.py `wait_carrier`): it waits for the links that will get a carrier,
and not for those that cannot: a node without pods has a cni0 with no port, which the kernel keeps at
NO-CARRIER (operstate down) until a pod's veth joins it. Waiting for that one cost every such `lab up` the
whole 5 s timeout (exercises 06 and 11), and made "BGP converged in 0.00 s" of it. Real namespaces."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from lab import apply
from topo import netns
from topo.rtnl import IF_OPER_UP

IF_OPER_DOWN = 2  # RFC 2863's operStatus down, as the kernel reports it (IF_OPER_DOWN in linux/if.h)


def _ip(ns: str, *argv: str) -> None:
    subprocess.run(["ip", "-n", ns, *argv], check=True, capture_output=True)


def test_an_empty_bridge_is_not_waited_for() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    ns = f"kltest-{uuid.uuid4().hex[:6]}-c"
    netns.create(ns)
    try:
        _ip(ns, "link", "add", "cni0", "type", "bridge")
        _ip(ns, "link", "set", "cni0", "address", "0a:58:0a:f4:02:01")  # as the CNI plugin sets it: then NO-CARRIER
        _ip(ns, "link", "set", "cni0", "up")
        _ip(ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        _ip(ns, "link", "set", "va", "up")
        _ip(ns, "link", "set", "vb", "up")
        with netns.rtnl_in(ns) as handle:
            looks = []
            real = handle.links

            def counted():
                looks.append(1)
                return real()

            handle.links = counted  # type: ignore[method-assign]
            apply.wait_carrier([handle], timeout=5.0)
            links = {link.name: link for link in real()}
            assert links["va"].operstate == links["vb"].operstate == IF_OPER_UP  # what it did wait for
            assert links["cni0"].operstate == IF_OPER_DOWN  # the empty bridge: no carrier, and none coming
            # The old wait polled every 10 ms until its 5 s timeout: some 400-500 looks. Now it is done once the
            # veths are up, which the kernel reports within a second at most (link watch).
            assert len(looks) < 150, len(looks)
    finally:
        netns.delete(ns)
