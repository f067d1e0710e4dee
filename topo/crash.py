"""Kill points: a command killed at a known step, so crash safety is tested deterministically.

`KUBENET_LAB_CRASH_AT=STEP:N` makes the running command SIGKILL itself the N-th time it reaches `STEP`
(N defaults to 1): no `finally`, no atexit, exactly what `kill -9` or a power cut leaves. `STEP:N:stop`
stops it there instead (SIGSTOP), so a test can look at the lab mid-command and then let it go on. The steps are
named where the change path calls `point()` (docs/architecture.md lists them). Without the variable a
point costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "KUBENET_LAB_CRASH_AT"
_seen: dict[str, int] = {}


def point(step: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, _, rest = wanted.partition(":")
    if name != step:
        return
    count, _, how = rest.partition(":")
    _seen[step] = _seen.get(step, 0) + 1
    if _seen[step] == int(count or 1):
        os.kill(os.getpid(), signal.SIGSTOP if how == "stop" else signal.SIGKILL)
