"""Progress on long work (`lab up`, `lab down`, a big `lab apply`/`lab delete`): a bar on a terminal, nothing
anywhere else. A lab of a thousand pods takes seconds to build; a silent terminal for that long looks hung.

The bar goes to stderr and disappears when the work is done (what stays is the command's own report). It is
not drawn when stderr is not a terminal (scripts, CI, pipes), with `--quiet`, or for work too small to wait
for. Drawn by rich (a well-kept library, also what the tables could use), redrawn at most 8 times a second
from the steps themselves (no refresh thread: see bar), so a thousand steps cost a thousand counter
increments, not a thousand redraws.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

REFRESH_PER_SECOND = 8
MIN_STEPS = 20  # fewer steps than this finish before a bar is worth drawing
quiet = False  # set by the CLI's --quiet


@contextlib.contextmanager
def bar(what: str, total: int, force: bool = False) -> Iterator[Callable[[int], None]]:
    """A function that advances the bar by n steps (a no-op where no bar is drawn)."""
    if not force and (quiet or total < MIN_STEPS or not sys.stderr.isatty()):
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stderr, force_terminal=True if force else None)
    # No refresh thread (rich's auto_refresh): the kernel refuses to enter a pod's mount namespace from a
    # process with a second thread (setns(2): EINVAL), and pods are made while the bar is drawn.
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, auto_refresh=False) as progress:
        task = progress.add_task(what, total=total)
        drawn = [0.0]

        def advance(n: int = 1) -> None:
            progress.advance(task, n)
            now = time.monotonic()
            if now - drawn[0] >= 1 / REFRESH_PER_SECOND:
                drawn[0] = now
                progress.refresh()

        yield advance
