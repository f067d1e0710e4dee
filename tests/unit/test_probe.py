"""Tests of observe/probe.py that need no lab: the matrix's layout and how an agnhost answer is read."""
from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
from collections.abc import Iterator

import pytest

from apiserver import state
from observe import probe


def _matrix() -> probe.Matrix:
    pods = ["x/a", "x/b", "y/a"]
    blocked = {("x/b", "x/a"), ("y/a", "x/a")}
    results = [probe.ProbeResult(s, "10.0.0.1", 80, "tcp", (s, d) not in blocked, "t", dest=d)
               for s in pods for d in pods]
    return probe.Matrix(pods, 80, "tcp", results, 0.5)


def test_rows_read_like_the_upstream_truth_tables() -> None:
    m = _matrix()
    assert m.rows() == ["...", "X..", "X.."]
    assert not m.allowed("y/a", "x/a") and m.allowed("x/a", "y/a")
    text = m.render()
    assert "x/b  X . .   1" in text
    assert text.splitlines()[-1].startswith(". allowed  X blocked") and "9 pairs, 2 blocked" in text


def test_json_has_rows_and_every_result() -> None:
    data = _matrix().to_json()
    assert data["rows"] == ["...", "X..", "X.."] and len(data["results"]) == 9
    assert data["results"][3] == {"source": "x/b", "dest_ip": "10.0.0.1", "port": 80, "protocol": "tcp",
                                  "allowed": False, "detail": "t", "source_ip": None, "seconds": 0.0, "dest": "x/a"}


def test_the_source_address_comes_from_agnhost_answers() -> None:
    assert probe._peer_ip("10.244.1.2:40123") == "10.244.1.2"
    assert probe._peer_ip("node1-pod1") is None and probe._peer_ip("") is None


# ------------------------------------------------------------------ the engine, without a lab


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_setns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Namespaces are 'entered' without leaving this one (the engine's logic, not the kernel's, is tested)."""
    entered: list[str] = []

    @contextlib.contextmanager
    def fake(ns: str) -> Iterator[None]:
        entered.append(ns)
        yield

    monkeypatch.setattr(probe.netns, "entered", fake)
    return entered


def test_pods_whose_running_containers_declare_the_port_get_no_listener(no_setns: list[str]) -> None:
    """A server that is still starting must find its declared port free, not taken by the probe."""
    port = _free_port()
    serving = probe.Endpoint("x/web", "ns-web", "10.0.0.2", frozenset({(port, "tcp")}))
    other_protocol = probe.Endpoint("x/dns", "ns-dns", "10.0.0.3", frozenset({(port, "udp")}))
    socks = probe._listen([serving, other_protocol], port, "tcp")
    try:
        assert no_setns == ["ns-dns"] and len(socks) == 1
    finally:
        for sock in socks:
            sock.close()


def test_declared_ports_count_only_for_pods_that_run_a_process() -> None:
    spec = "apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: u}\nspec:\n  nodes: [{name: node1, ip: 192.168.1.10}]\n"
    st = state.LabState(name="unit-probe", phase="up", pid=1, spec_file=None, spec_text=spec)
    ports = [["http", 80, "TCP"], ["dns", 53, "UDP"]]
    st.pods["default/web"] = state.PodState("node1", "10.244.1.2", "ns-web", 1, {"app": 2}, ports=ports)
    st.pods["default/idle"] = state.PodState("node1", "10.244.1.3", "ns-idle", 3, {}, ports=ports)  # pause only
    by_name, _ = probe.endpoints(st)
    assert by_name["web"].serves == {(80, "tcp"), (53, "udp")}
    assert by_name["idle"].serves == frozenset()


def test_a_batch_counts_every_descriptor_a_pair_can_hold() -> None:
    # TCP: TRIES attempts, each possibly accepted by the probe's own listener; UDP: one socket
    assert probe.batch_size(1000, 100, "tcp") == (1000 - 100 - probe._FD_RESERVE) // (2 * probe.TRIES)
    assert probe.batch_size(1000, 100, "udp") == 1000 - 100 - probe._FD_RESERVE
    assert probe.batch_size(50, 40, "tcp") == 1  # always progress, one pair at a time


def test_running_out_of_descriptors_is_said_so_and_leaks_nothing(no_setns: list[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[socket.socket] = []
    real = socket.socket

    def scarce(*args, **kwargs):  # one descriptor left for the probe
        if made:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        made.append(real(*args, **kwargs))
        return made[-1]

    source = probe.Endpoint("x/a", "ns-a", "10.0.0.1")
    monkeypatch.setattr(probe.socket, "socket", scarce)
    results = probe.run([(source, "127.0.0.1")] * 3, [], _free_port(), "tcp", 0.3)
    monkeypatch.undo()
    assert [r.allowed for r in results] == [False, False, False]
    assert not any("cannot enter" in r.detail for r in results), [r.detail for r in results]
    assert [r.detail for r in results[1:]] == ["no socket: Too many open files"] * 2
    assert made and all(s.fileno() == -1 for s in made)  # closed


def test_the_descriptor_limit_is_put_back() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, hard - 1)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        assert probe.run([], [], 80, "tcp", 0.1) == []
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (lowered, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_attempt_closed_by_its_twin_in_the_same_select_is_skipped() -> None:
    """Two TCP attempts of one pair ready in one select(): the first through wins and closes the other,
    whose event in the same batch must be skipped (EBADF, then ValueError, under load)."""
    import selectors
    import socket
    import time

    from observe import probe
    from observe.probe import ProbeResult, _Conn

    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    sel = selectors.DefaultSelector()
    result = ProbeResult("x/a", "10.244.1.2", 80, "tcp", False, "")
    conn = _Conn(None, "10.244.1.2", result, attempts=[first, second],
                 started=time.monotonic())
    for sock in (first, second):
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_WRITE, conn)  # both writable at once: one select() returns both
    first_peer.close(), second_peer.close()
    probe._loop([conn], [], sel, "tcp", time.monotonic() + 1.0)
    assert conn.phase == "done" and conn.result.allowed
