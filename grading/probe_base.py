"""What every probe shares (its Result, its Context) and the one HTTP GET of the http probes, apart from
grading/probes.py so the probes that build on them (grading/probes_lb.py) import them without a cycle."""
from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apiserver import state
from grading import schema
from observe import targets
from topo import netns


@dataclass
class Result:
    passed: bool
    detail: str


@dataclass
class Context:
    lookup: targets.Lookup
    answers_file: Path | None  # the learner's answers (answers.yaml), for `answer` checks

    @property
    def st(self) -> state.LabState:
        return self.lookup.st



def sent_queries(got: Any) -> list:
    """The queries the pod sent for a lookup, each type and name once: what its node's cache received with
    NodeLocal DNSCache (cache hits never reach the cluster DNS, whose log then shows none), else what the cluster
    DNS received. Empty: the pod's DNS server logged nothing (it is down or unreachable)."""
    return got.node_cache if got.node_cache is not None else got.cluster


def get(ctx: Context, p: schema.HttpIn, src: targets.Target, dest: str) -> tuple[Result, str]:
    """One GET as the http probe says: (the result, the body)."""
    host = p.host or dest
    request = (f"GET {p.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lab-grade\r\nConnection: close\r\n\r\n").encode()
    where = f"GET http://{dest}:{p.port}{p.path}" + (f" (Host: {p.host})" if p.host else "") + f" from {src.key}"
    try:
        with netns.entered(src.netns), targets.socket_lb_of(ctx.lookup, src):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with sock:
            sock.settimeout(p.timeout)
            sock.connect((dest, p.port))
            sock.sendall(request)
            data = b""
            deadline = time.monotonic() + p.timeout
            while len(data) < 1 << 20 and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        return Result(False, f"{where}: {exc.strerror or exc}"), ""
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if match is None:
        return Result(False, f"{where}: no HTTP answer"), ""
    status = int(match.group(1))
    text = body.decode("utf-8", "replace")
    shown = " ".join(text.split())[:80]
    if status != p.status:
        return Result(False, f"{where}: status {status}, expected {p.status} (body: {shown!r})"), text
    if p.body is not None and re.search(p.body, text) is None:
        return Result(False, f"{where}: body {shown!r} does not match {p.body!r}"), text
    return Result(True, f"{where}: {status} {shown!r}"), text
