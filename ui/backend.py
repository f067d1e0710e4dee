"""The read-only actions `lab ui` offers, on one running lab: the compared graph (`lab graph`'s), an
inspection, a trace (`lab trace`'s probe), a DNS lookup counted (`lab dns-count`'s), the exercise and its
grade (`lab grade`'s). Nothing here changes the lab; nothing runs a command a request names.

Kernel work is serialised by one lock: a trace reads rule counters before and after its probe, which
another trace at the same moment would disturb, and the graph is built by one poller for every open page.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from apiserver import state
from grading import checks, grade
from observe import dnscount, graph, hops, trace
from topo.errors import StateError
from ui import inspect

MIN_INTERVAL = 0.5  # seconds between two readings of the kernel for the live diagram


class LabBackend:
    def __init__(self, lab_name: str | None) -> None:
        self.lab = state.resolve(lab_name).name  # exit 2 now for a lab that is not running
        self._lock = threading.Lock()
        self._graph: dict[str, Any] | None = None
        self._graph_at = 0.0
        self.build_seconds = 0.0

    # ------------------------------------------------------------------------------- the diagram

    def graph(self, max_age: float = 0.0) -> dict[str, Any]:
        """The graph as JSON, read again unless the last reading is younger than `max_age` seconds."""
        with self._lock:
            if self._graph is not None and time.monotonic() - self._graph_at < max_age:
                return self._graph
            started = time.monotonic()
            drawn = graph.graph_of(self.lab).to_json()
            st = state.resolve(self.lab)
            drawn["exercise"] = graded(st)
            self.build_seconds = time.monotonic() - started
            self._graph, self._graph_at = drawn, time.monotonic()
            return drawn

    def interval(self) -> float:
        """How long the poller waits after a reading before the next: readings start every MIN_INTERVAL,
        or, when a reading takes longer (1,000 pods: about 0.6 s), a quarter of its time after it."""
        return max(MIN_INTERVAL - self.build_seconds, self.build_seconds / 4, 0.05)

    # ------------------------------------------------------------------------------- inspection

    def pod(self, key: str) -> dict[str, Any]:
        with self._lock:
            return inspect.pod(self.lab, key)

    def node(self, name: str, service: str | None) -> dict[str, Any]:
        with self._lock:
            return inspect.node(self.lab, name, service)

    # ------------------------------------------------------------------------------- probes

    def trace(self, source: str, destination: str, protocol: str | None) -> dict[str, Any]:
        with self._lock:
            result = trace.run(self.lab, source, destination, protocol)
        data = result.to_json()
        data["text"] = hops.render(result)
        return data

    def dns(self, pod: str, name: str) -> dict[str, Any]:
        with self._lock:
            return dnscount.count(self.lab, pod, name).to_json()

    # ------------------------------------------------------------------------------- exercises

    def exercise(self) -> dict[str, Any] | None:
        st = state.resolve(self.lab)
        if not graded(st) or st.exercise is None:
            return None
        ex = checks.load(Path(st.exercise), st.exercise)
        return {"slug": ex.slug, "title": ex.title, "claim": ex.claim,
                "tasks": [{"id": t.id, "title": t.title} for t in ex.tasks],
                "checks": [{"name": c.name, "task": c.task, "description": c.description, "points": c.points}
                           for c in ex.checks]}

    def grade(self) -> dict[str, Any]:
        with self._lock:
            report = grade.grade(self.lab)
        data = report.to_json()
        data["tasks"] = [{"id": t.id, "title": t.title} for t in report.exercise.tasks]
        return data


def graded(st: state.LabState) -> bool:
    """Whether the lab is a graded exercise. `exercise` is recorded for any folder a lab was built from
    (`lab up labs/00-seed` too); only a folder with checks.yaml has tasks to list and checks to grade."""
    return st.exercise is not None and checks.is_exercise(st.exercise)


def gone(exc: StateError) -> dict[str, Any]:
    return {"gone": True, "error": str(exc)}
