"""What `lab graph` says of each element it compares with the kernel: the status words, and a device's state
as a namespace's view shows it. One place for both, so the drawing of bridges and tunnels (graph.py) and of
the cilium profile's devices (graph_cilium.py) judge a device alike.
"""
from __future__ import annotations

from observe.kernel import NsView

OK, MISSING, DOWN, WRONG, EXTRA = "ok", "missing", "down", "wrong", "extra"


def device_state(view: NsView | None, dev: str, need_carrier: bool = True) -> tuple[str, str]:
    """(status, note) of device `dev`: missing with its namespace or by itself, down, without carrier, ok."""
    if view is None:
        return MISSING, "namespace gone"
    link = view.links.get(dev)
    if link is None:
        return MISSING, f"no {dev}"
    if not link.up:
        return DOWN, f"{dev} is down"
    if need_carrier and not link.carrier:
        return DOWN, f"{dev} has no carrier"
    return OK, ""
