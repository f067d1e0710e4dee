"""Tests for images.agnhost, the process standing in for the agnhost image.

The server runs as a real subprocess (it must survive as `python -m`) and is
reached only through 127.0.0.1.  No root needed.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from images import agnhost  # noqa: E402

LOOPBACK = "127.0.0.1"
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def spawn(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "images.agnhost", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=5)


def wait_until_sigterm_caught(proc: subprocess.Popen, deadline: float = 5.0) -> None:
    """Wait until the process has taken over SIGTERM, so the test cannot kill it early.

    SigCgt, not SigBlk: sigwait unblocks the awaited signals while it waits.
    """
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except FileNotFoundError:
            break
        caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) & SIGTERM_BIT:
            return
        time.sleep(0.01)
    pytest.fail("agnhost never took over SIGTERM")


def wait_until_serving(proc: subprocess.Popen, port: int, deadline: float = 5.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        try:
            if get(port, "/healthz")[0] == 200:
                return
        except OSError:
            time.sleep(0.02)
    pytest.fail("agnhost netexec never became ready")


def get(port: int, target: str, timeout: float = 5.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def udp(port: int, payload: bytes) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(payload, (LOOPBACK, port))
        return sock.recv(65535).decode()


class Server:
    def __init__(self, proc: subprocess.Popen, http_port: int, udp_port: int) -> None:
        self.proc = proc
        self.http_port = http_port
        self.udp_port = udp_port

    def get(self, target: str) -> tuple[int, str]:
        return get(self.http_port, target)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    http_port, udp_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    proc = spawn("netexec", f"--http-port={http_port}", "--udp-port", str(udp_port))
    try:
        wait_until_serving(proc, http_port)
        yield Server(proc, http_port, udp_port)
    finally:
        stop(proc)


# -- HTTP endpoints --------------------------------------------------------

def test_hostname(server: Server) -> None:
    assert server.get("/hostname") == (200, socket.gethostname())


def test_clientip_is_peer_address(server: Server) -> None:
    status, body = server.get("/clientip")
    assert status == 200
    host, _, port = body.rpartition(":")
    assert host == LOOPBACK and body.startswith("127.0.0.1:")
    assert 0 < int(port) < 65536


def test_echo(server: Server) -> None:
    assert server.get("/echo?msg=hello%20world") == (200, "hello world")


def test_healthz_and_root(server: Server) -> None:
    assert server.get("/healthz") == (200, "ok")
    status, body = server.get("/")
    assert status == 200 and body.startswith("NOW: ")


def test_unknown_paths_and_shell_are_404(server: Server) -> None:
    assert server.get("/nope")[0] == 404
    assert server.get("/shell?cmd=id")[0] == 404


def test_keep_alive_serves_several_requests_on_one_connection(server: Server) -> None:
    conn = http.client.HTTPConnection(LOOPBACK, server.http_port, timeout=5)
    try:
        for msg in ("a", "b", "c"):
            conn.request("GET", f"/echo?msg={msg}")
            response = conn.getresponse()
            assert response.version == 11
            assert response.getheader("Content-Length") == "1"
            assert response.read().decode() == msg
    finally:
        conn.close()


def test_quiet_by_default(server: Server) -> None:
    server.get("/hostname")
    server.get("/nope")
    fd = server.proc.stderr.fileno()
    os.set_blocking(fd, False)
    try:
        assert os.read(fd, 4096) == b""  # only at EOF, i.e. never while serving
    except BlockingIOError:
        pass  # nothing written


# -- /dial -----------------------------------------------------------------

def dial(server: Server, **params: object) -> tuple[int, str]:
    query = "&".join(f"{key}={value}" for key, value in params.items())
    return server.get(f"/dial?{query}")


def test_dial_http_to_itself(server: Server) -> None:
    status, body = dial(server, request="hostname", protocol="http", host=LOOPBACK,
                        port=server.http_port, tries=2)
    assert status == 200
    assert json.loads(body) == {"responses": [socket.gethostname()] * 2, "errors": []}


def test_dial_http_passes_query_through(server: Server) -> None:
    status, body = dial(server, request="echo%3Fmsg%3Dhi", host=LOOPBACK,
                        port=server.http_port)
    assert status == 200 and json.loads(body)["responses"] == ["hi"]


def test_dial_udp_to_itself(server: Server) -> None:
    status, body = dial(server, request="hostname", protocol="udp", host=LOOPBACK,
                        port=server.udp_port, tries=1)
    assert status == 200
    assert json.loads(body) == {"responses": [socket.gethostname()], "errors": []}


@pytest.mark.parametrize("protocol", ["http", "udp"])
def test_dial_closed_port_reports_errors_quickly(server: Server, protocol: str) -> None:
    closed = free_port(socket.SOCK_STREAM if protocol == "http" else socket.SOCK_DGRAM)
    started = time.monotonic()
    status, body = dial(server, request="hostname", protocol=protocol, host=LOOPBACK,
                        port=closed, tries=2, timeout=0.5)
    assert time.monotonic() - started < 2.5
    result = json.loads(body)
    assert status == 200
    assert result["responses"] == [] and len(result["errors"]) == 2


def test_dial_udp_silent_peer_times_out(server: Server) -> None:
    # A bound socket that never answers: the try must end at the timeout.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOOPBACK, 0))
        started = time.monotonic()
        status, body = dial(server, request="hostname", protocol="udp", host=LOOPBACK,
                            port=silent.getsockname()[1], timeout=0.3)
        elapsed = time.monotonic() - started
    assert status == 200 and json.loads(body)["errors"]
    assert 0.25 < elapsed < 1.5


@pytest.mark.parametrize("query", [
    "",
    "request=hostname&port=8080",                      # no host
    "request=hostname&host=127.0.0.1",                 # no port
    "request=hostname&host=127.0.0.1&port=abc",
    "request=hostname&host=127.0.0.1&port=70000",
    "request=hostname&host=127.0.0.1&port=80&protocol=sctp",
    "request=hostname&host=127.0.0.1&port=80&tries=0",
    "request=hostname&host=127.0.0.1&port=80&timeout=-1",
    "host=127.0.0.1&port=80",                          # no request
])
def test_dial_bad_params_are_400(server: Server, query: str) -> None:
    status, body = server.get(f"/dial?{query}")
    assert status == 400 and body.strip()


# -- UDP server ------------------------------------------------------------

def test_udp_commands(server: Server) -> None:
    assert udp(server.udp_port, b"hostname") == socket.gethostname()
    assert udp(server.udp_port, b"echo hi there\n") == "hi there"
    assert udp(server.udp_port, b"clientip").startswith("127.0.0.1:")


# -- load ------------------------------------------------------------------

def test_burst_of_rapid_connects_all_succeed(server: Server) -> None:
    # Connect all at once before any request is sent, so the listen backlog
    # (not the handler speed) decides whether connections get through.  A
    # small backlog shows up as SYN retransmits (the first after 1 s), which
    # the 0.9 s connect timeout turns into a failure; with backlog 5 this
    # burst took ~48 s.
    sockets = []
    try:
        for _ in range(300):
            sock = socket.create_connection((LOOPBACK, server.http_port), timeout=0.9)
            sockets.append(sock)
        request = b"GET /hostname HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        for sock in sockets:
            sock.sendall(request)
        ok = 0
        for sock in sockets:
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
            ok += reply.startswith(b"HTTP/1.1 200 ")
        assert ok == 300
    finally:
        for sock in sockets:
            sock.close()


# -- lifecycle -------------------------------------------------------------

def test_netexec_exits_zero_fast_on_sigterm() -> None:
    port = free_port(socket.SOCK_STREAM)
    proc = spawn("netexec", "--http-port", str(port))
    try:
        wait_until_serving(proc, port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        stop(proc)


def test_pause_exits_zero_on_sigterm() -> None:
    proc = spawn("pause")
    try:
        wait_until_sigterm_caught(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        stop(proc)


def test_port_in_use_fails_with_message() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        proc = spawn("netexec", f"--http-port={taken.getsockname()[1]}")
        try:
            _, err = proc.communicate(timeout=5)
            assert proc.returncode == 1 and "cannot listen" in err
        finally:
            stop(proc)


@pytest.mark.parametrize("args, expected", [
    (["shell"], "agnhost: subcommand shell is not built in (built in: netexec, pause)"),
    (["netexec", "--http-port=abc"], "invalid port"),
    (["netexec", "--bogus"], "unrecognized arguments"),
])
def test_cli_usage_errors_exit_2_with_one_line(args: list[str], expected: str) -> None:
    proc = spawn(*args)
    try:
        out, err = proc.communicate(timeout=5)
        assert proc.returncode == 2
        assert out == "" and err.count("\n") == 1 and expected in err
    finally:
        stop(proc)


# -- importable API --------------------------------------------------------

def test_subcommands() -> None:
    assert agnhost.SUBCOMMANDS == ("netexec", "pause")


@pytest.mark.parametrize("args", [
    ["netexec", "--http-port=8080"],
    ["netexec", "--http-port", "8080", "--udp-port=8081"],
    ["netexec", "--http-port=8080", "--udp-port=0"],
    ["netexec"],
    ["netexec", "--verbose"],
    ["pause"],
])
def test_validate_args_accepts(args: list[str]) -> None:
    assert agnhost.validate_args(args) is None


@pytest.mark.parametrize("args, expected", [
    ([], "missing subcommand"),
    (["shell"], "subcommand shell is not built in (built in: netexec, pause)"),
    (["netexec", "--http-port=0"], "out of range"),
    (["netexec", "--http-port=65536"], "out of range"),
    (["netexec", "--http-port=abc"], "invalid port"),
    (["netexec", "--udp-port=-1"], "out of range"),
    (["netexec", "--http-port"], "expected one argument"),
    (["netexec", "--bogus"], "unrecognized arguments"),
    (["netexec", "--help"], "unrecognized arguments"),
    (["pause", "extra"], "unrecognized arguments"),
])
def test_validate_args_rejects(args: list[str], expected: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    message = agnhost.validate_args(args)
    assert message is not None and expected in message and "\n" not in message
    assert capsys.readouterr() == ("", "")
