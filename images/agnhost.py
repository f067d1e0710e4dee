"""A process that stands in for Kubernetes' agnhost test image.

Kubernetes' network e2e tests run registry.k8s.io/e2e-test-images/agnhost in
their pods and probe the cluster through it: ``netexec`` answers who it is
(/hostname), who it thinks called (/clientip, to prove whether the source IP
was NATed) and can dial other pods on request (/dial).  The lab has no
container runtime, so a "pod" is a network namespace with a plain process in
it; this module is that process.  It reproduces the observable behaviour of
the subcommands the lab needs, with the Python standard library only:

    python3 -m images.agnhost netexec --http-port=8080 [--udp-port=8081]
    python3 -m images.agnhost pause

``/shell`` is deliberately absent: the lab runs as root, and a remote shell
endpoint would hand root to anything that can reach a pod IP.

The spec validator imports :func:`validate_args` so bad agnhost arguments are
rejected before a lab is built rather than when a pod fails to start.
"""

import argparse
import datetime
import http.client
import json
import signal
import socket
import socketserver
import sys
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SUBCOMMANDS = ("netexec", "pause")

LISTEN_ADDRESS = "0.0.0.0"
DEFAULT_HTTP_PORT = 8080  # agnhost's own default
DEFAULT_DIAL_TIMEOUT = 1.0
MAX_DIAL_TIMEOUT = 30.0
# /dial runs tries sequentially inside one request; cap it so one request
# cannot tie a handler thread up for hours.
MAX_DIAL_TRIES = 100
UDP_BUFFER = 65535
# Short enough that SIGTERM-to-exit stays well under half a second.
SHUTDOWN_POLL_INTERVAL = 0.05
EXIT_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


class UsageError(Exception):
    """Bad command-line arguments; the message is meant for the user as is."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting.

    validate_args must not write to stderr or exit the caller's process, and
    main wants a one-line message rather than argparse's usage block.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


# --------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------

def _port_type(allow_zero: bool) -> Callable[[str], int]:
    lowest = 0 if allow_zero else 1

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
        if not lowest <= value <= 65535:
            raise argparse.ArgumentTypeError(
                f"port {value} out of range {lowest}-65535")
        return value

    return parse


def _netexec_parser(add_help: bool) -> _Parser:
    parser = _Parser(prog="agnhost netexec", add_help=add_help,
                     description="Serve agnhost's netexec endpoints.")
    parser.add_argument("--http-port", type=_port_type(allow_zero=False),
                        default=DEFAULT_HTTP_PORT, metavar="PORT")
    parser.add_argument("--udp-port", type=_port_type(allow_zero=True),
                        default=0, metavar="PORT",
                        help="0 (the default) serves no UDP")
    parser.add_argument("--verbose", action="store_true",
                        help="log every request on stderr")
    return parser


def _pause_parser(add_help: bool) -> _Parser:
    return _Parser(prog="agnhost pause", add_help=add_help,
                   description="Sleep until SIGTERM or SIGINT.")


_PARSERS: dict[str, Callable[[bool], _Parser]] = {
    "netexec": _netexec_parser,
    "pause": _pause_parser,
}


def parse_args(args: list[str], add_help: bool = True) -> tuple[str, argparse.Namespace]:
    """Split ``[subcommand, *flags]`` into the subcommand and its options.

    Raises UsageError with a one-line message on any problem.
    """
    built_in = ", ".join(SUBCOMMANDS)
    if not args:
        raise UsageError(f"agnhost: missing subcommand (built in: {built_in})")
    subcommand, rest = args[0], list(args[1:])
    if subcommand not in _PARSERS:
        raise UsageError(
            f"agnhost: subcommand {subcommand} is not built in (built in: {built_in})")
    return subcommand, _PARSERS[subcommand](add_help).parse_args(rest)


def validate_args(args: list[str]) -> str | None:
    """Return why ``args`` would make agnhost refuse to start, or None if fine.

    Starts nothing and prints nothing; ``--help`` counts as an error because a
    pod would print usage and exit instead of serving.
    """
    try:
        parse_args(list(args), add_help=False)
    except UsageError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------
# /dial: the server connects onward on the caller's behalf
# --------------------------------------------------------------------------

class DialRequest:
    """The validated query of one /dial call."""

    def __init__(self, request: str, protocol: str, host: str, port: int,
                 tries: int, timeout: float) -> None:
        self.request = request
        self.protocol = protocol
        self.host = host
        self.port = port
        self.tries = tries
        self.timeout = timeout


def _first(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def _int_param(query: dict[str, list[str]], name: str, default: int | None,
               lowest: int, highest: int) -> int:
    text = _first(query, name)
    if text is None or text == "":
        if default is None:
            raise ValueError(f"missing {name}")
        return default
    try:
        value = int(text, 10)
    except ValueError:
        raise ValueError(f"invalid {name} {text!r}") from None
    if not lowest <= value <= highest:
        raise ValueError(f"{name} {value} out of range {lowest}-{highest}")
    return value


def _timeout_param(query: dict[str, list[str]]) -> float:
    text = _first(query, "timeout")
    if text is None or text == "":
        return DEFAULT_DIAL_TIMEOUT
    # Accept Go-style "2s" as well as "2", since e2e-style callers write both.
    number = text[:-1] if text.endswith("s") else text
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"invalid timeout {text!r}") from None
    if not 0 < value <= MAX_DIAL_TIMEOUT:
        raise ValueError(f"timeout {text} out of range (0, {MAX_DIAL_TIMEOUT:g}]")
    return value


def parse_dial_query(query: dict[str, list[str]]) -> DialRequest:
    """Validate a /dial query string; raises ValueError with a short reason."""
    request = _first(query, "request")
    if not request:
        raise ValueError("missing request")
    protocol = (_first(query, "protocol") or "http").lower()
    if protocol not in ("http", "udp"):
        raise ValueError(f"unsupported protocol {protocol!r} (http, udp)")
    host = _first(query, "host")
    if not host:
        raise ValueError("missing host")
    port = _int_param(query, "port", None, 1, 65535)
    tries = _int_param(query, "tries", 1, 1, MAX_DIAL_TRIES)
    return DialRequest(request, protocol, host, port, tries, _timeout_param(query))


def dial_http(host: str, port: int, request: str, timeout: float) -> str:
    """GET /<request> from host:port and return the body; raises on failure."""
    # http.client refuses spaces and control characters in the target, so
    # quote them while leaving an embedded query string ("echo?msg=a") intact.
    target = "/" + urllib.parse.quote(request.lstrip("/"), safe="/?&=%:@+,;!$'()*~")
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", target, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
    finally:
        conn.close()
    if not 200 <= response.status < 300:
        raise OSError(f"HTTP {response.status}: {body.strip()[:200]}")
    return body


def dial_udp(host: str, port: int, request: str, timeout: float) -> str:
    """Send request as one datagram to host:port and return the reply."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(timeout)
        # A connected socket turns an ICMP port-unreachable into an immediate
        # ConnectionRefusedError instead of a silent wait for the timeout.
        sock.connect(address)
        sock.send(request.encode())
        return sock.recv(UDP_BUFFER).decode("utf-8", "replace")


_DIALERS: dict[str, Callable[[str, int, str, float], str]] = {
    "http": dial_http,
    "udp": dial_udp,
}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def run_dial(dial: DialRequest) -> dict[str, list[str]]:
    """Make every try and collect bodies and error messages separately."""
    dialer = _DIALERS[dial.protocol]
    responses: list[str] = []
    errors: list[str] = []
    for _ in range(dial.tries):
        try:
            responses.append(dialer(dial.host, dial.port, dial.request, dial.timeout))
        except (OSError, http.client.HTTPException, UnicodeError) as exc:
            errors.append(f"dial {dial.protocol} {dial.host}:{dial.port}: {_describe(exc)}")
    return {"responses": responses, "errors": errors}


# --------------------------------------------------------------------------
# Answers shared by the HTTP and UDP servers
# --------------------------------------------------------------------------

def hostname() -> str:
    # The pod has its own UTS namespace, so this is the pod name.
    return socket.gethostname()


def format_peer(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------
# HTTP server
# --------------------------------------------------------------------------

Reply = tuple[int, str, str]  # status, content type, body
TEXT = "text/plain; charset=utf-8"


class NetexecHandler(BaseHTTPRequestHandler):
    """Serves the netexec endpoints over HTTP/1.1 with keep-alive."""

    protocol_version = "HTTP/1.1"
    server_version = "agnhost-lab"
    # Idle keep-alive connections would otherwise hold a thread forever.
    timeout = 60
    server: "NetexecHTTPServer"

    def do_GET(self) -> None:
        self._respond(include_body=True)

    def do_HEAD(self) -> None:
        self._respond(include_body=False)

    def _respond(self, include_body: bool) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        route = self._routes().get(url.path)
        if route is None:
            status, ctype, body = 404, TEXT, f"404 page not found: {url.path}\n"
        else:
            status, ctype, body = route(query)
        self._send(status, ctype, body, include_body)

    def _routes(self) -> dict[str, Callable[[dict[str, list[str]]], Reply]]:
        return {
            "/": self._root,
            "/healthz": lambda _q: (200, TEXT, "ok"),
            "/hostname": lambda _q: (200, TEXT, hostname()),
            "/clientip": lambda _q: (200, TEXT, format_peer(self.client_address)),
            "/echo": lambda q: (200, TEXT, _first(q, "msg") or ""),
            "/dial": self._dial,
        }

    @staticmethod
    def _root(_query: dict[str, list[str]]) -> Reply:
        now = datetime.datetime.now(datetime.timezone.utc).astimezone()
        return 200, TEXT, f"NOW: {now.isoformat()}"

    @staticmethod
    def _dial(query: dict[str, list[str]]) -> Reply:
        try:
            dial = parse_dial_query(query)
        except ValueError as exc:
            return 400, TEXT, f"{exc}\n"
        return 200, "application/json", json.dumps(run_dial(dial))

    def _send(self, status: int, ctype: str, body: str, include_body: bool) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if include_body:
            self.wfile.write(data)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)


class NetexecHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer tuned so load tests measure the network, not us."""

    # Python's default backlog of 5 dropped ~13 % of rapid connects.
    request_queue_size = 1024
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, verbose: bool) -> None:
        self.verbose = verbose
        super().__init__((LISTEN_ADDRESS, port), NetexecHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), which can block for seconds
        # on DNS inside a pod namespace with no resolver reachable.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port

    def handle_error(self, request: object, client_address: tuple) -> None:
        # Clients hanging up mid-response are normal under load tests.
        if self.verbose:
            super().handle_error(request, client_address)


# --------------------------------------------------------------------------
# UDP server
# --------------------------------------------------------------------------

def udp_answer(payload: bytes, sender: tuple) -> str | None:
    """The reply to one UDP datagram, or None to stay silent like agnhost."""
    text = payload.decode("utf-8", "replace").strip()
    command, _, argument = text.partition(" ")
    if command == "hostname":
        return hostname()
    if command == "echo":
        return argument
    if command == "clientip":
        return format_peer(sender)
    return None


class NetexecUDPHandler(socketserver.BaseRequestHandler):
    server: "NetexecUDPServer"

    def handle(self) -> None:
        payload, sock = self.request
        answer = udp_answer(payload, self.client_address)
        if self.server.verbose:
            print(f"udp {format_peer(self.client_address)} {payload!r} -> {answer!r}",
                  file=sys.stderr, flush=True)
        if answer is not None:
            sock.sendto(answer.encode("utf-8"), self.client_address)


class NetexecUDPServer(socketserver.UDPServer):
    # No SO_REUSEADDR: for UDP it would let two servers share the port
    # silently instead of reporting the conflict.
    allow_reuse_address = False

    def __init__(self, port: int, verbose: bool) -> None:
        self.verbose = verbose
        super().__init__((LISTEN_ADDRESS, port), NetexecUDPHandler)

    def handle_error(self, request: object, client_address: tuple) -> None:
        if self.verbose:
            super().handle_error(request, client_address)


# --------------------------------------------------------------------------
# Process lifecycle
# --------------------------------------------------------------------------

def _catch_exit_signals() -> None:
    """Route SIGTERM/SIGINT to sigwait in the main thread.

    Blocking before any thread starts makes every thread inherit the mask, so
    only sigwait ever sees these signals.  Blocking comes first so a signal
    arriving in between stays pending rather than killing us; the handler is
    still needed because a signal the parent left ignored would be discarded
    even while blocked.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, EXIT_SIGNALS)
    for signum in EXIT_SIGNALS:
        signal.signal(signum, lambda *_: None)


def _wait_for_exit_signal() -> int:
    return signal.sigwait(EXIT_SIGNALS)


def run_pause() -> int:
    _catch_exit_signals()
    _wait_for_exit_signal()
    return 0


def _start(server: socketserver.BaseServer, name: str) -> threading.Thread:
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": SHUTDOWN_POLL_INTERVAL},
        name=name, daemon=True)
    thread.start()
    return thread


def run_netexec(http_port: int, udp_port: int, verbose: bool) -> int:
    _catch_exit_signals()
    servers: list[socketserver.BaseServer] = []
    try:
        servers.append(NetexecHTTPServer(http_port, verbose))
        if udp_port:
            servers.append(NetexecUDPServer(udp_port, verbose))
    except OSError as exc:
        for server in servers:
            server.server_close()
        print(f"agnhost netexec: cannot listen: {exc}", file=sys.stderr)
        return 1
    for server in servers:
        _start(server, type(server).__name__)
    if verbose:
        print(f"agnhost netexec: http on {http_port}, udp on {udp_port or 'none'}",
              file=sys.stderr, flush=True)
    _wait_for_exit_signal()
    for server in servers:
        server.shutdown()
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        subcommand, options = parse_args(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    if subcommand == "pause":
        return run_pause()
    return run_netexec(options.http_port, options.udp_port, options.verbose)


if __name__ == "__main__":
    sys.exit(main())
