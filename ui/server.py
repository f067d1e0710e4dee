"""`lab ui`'s web server: Starlette on uvicorn, bound to 127.0.0.1 only, every request guarded.

The server runs as root, so it is treated as an attack surface:

- **Loopback only.** The listening socket is bound to 127.0.0.1 by `serve` (no option to change it).
- **A token.** `lab ui` prints `http://127.0.0.1:PORT/?token=T` (T: 32 random bytes, as Jupyter does). A
  request carries T in the query, in an `Authorization: token T` header, or in the cookie the first page
  load sets (HttpOnly, SameSite=Strict, named for the port); anything else is refused with 403. Compared in
  constant time.
- **Same origin only.** The Host header must be 127.0.0.1:PORT or localhost:PORT (a DNS-rebinding page
  has its own name there); an Origin header, when present, must be this server; `Sec-Fetch-Site:
  cross-site` is refused. POST (the probes) also needs the Origin header and a JSON body, which a
  cross-origin form cannot send without a preflight nobody answers.
- **Read-only actions.** Inspect, trace, count a DNS lookup, grade: each names things of the lab, checked
  against a strict pattern and then against the lab itself; no request names a command, a path or a file.
- **Headers.** A Content-Security-Policy allowing only this server's own scripts and styles (no inline
  script), no framing, no referrer (the token stays here), no caching.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from topo.errors import LabError

STATIC = Path(__file__).resolve().parent / "static"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,252}\Z")  # pods, nodes, services, IPs, ports, DNS names
PROTOCOLS = (None, "tcp", "udp", "icmp")
SHARED = 0.25  # seconds a reading of the lab serves every open page (several tabs: one reading)
KEEPALIVE = 15.0  # seconds between comments on a quiet event stream (proxies and browsers keep it open)
HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


class Backend(Protocol):
    lab: str

    def graph(self, max_age: float = 0.0) -> dict[str, Any]: ...
    def interval(self) -> float: ...
    def pod(self, key: str) -> dict[str, Any]: ...
    def node(self, name: str, service: str | None) -> dict[str, Any]: ...
    def trace(self, source: str, destination: str, protocol: str | None) -> dict[str, Any]: ...
    def dns(self, pod: str, name: str) -> dict[str, Any]: ...
    def exercise(self) -> dict[str, Any] | None: ...
    def grade(self) -> dict[str, Any]: ...


def new_token() -> str:
    return secrets.token_urlsafe(32)


def cookie_name(port: int) -> str:
    return f"kubenet-lab-ui-{port}"  # cookies are per host, not per port: one name per server


class Guard:
    """ASGI middleware: refuse every request that is not this page's own (see the module docstring)."""

    def __init__(self, app: ASGIApp, token: str, port: int) -> None:
        self.app, self.token, self.port = app, token, port
        self.hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
        self.origins = {f"http://{h}" for h in self.hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websockets here
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        refusal = self.refusal(method, headers, scope.get("query_string", b"").decode("latin-1"))
        if refusal is not None:
            status, text = refusal
            await _send_plain(send, status, text)
            return
        set_cookie = "token=" in scope.get("query_string", b"").decode("latin-1") and scope["path"] == "/"

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + HEADERS
                if set_cookie:
                    value = f"{cookie_name(self.port)}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                    message["headers"].append((b"set-cookie", value.encode()))
            await send(message)

        await self.app(scope, receive, with_headers)

    def refusal(self, method: str, headers: dict[str, str], query: str) -> tuple[int, str] | None:
        if headers.get("host") not in self.hosts:
            return 403, f"refused: Host must be 127.0.0.1:{self.port} (this server serves no other name)"
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins:
            return 403, "refused: cross-origin request"
        if headers.get("sec-fetch-site") == "cross-site":
            return 403, "refused: cross-site request"
        if method not in ("GET", "HEAD", "POST"):
            return 405, "refused: read-only server (GET, and POST for probes)"
        if method == "POST":
            if origin is None:
                return 403, "refused: a POST needs an Origin header"
            if headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return 415, "refused: a POST carries JSON"
        if not self.authorized(headers, query):
            return 403, "refused: missing or wrong token (open the URL `lab ui` printed)"
        return None

    def authorized(self, headers: dict[str, str], query: str) -> bool:
        given = parse_qs(query).get("token", [])
        auth = headers.get("authorization", "")
        if auth.lower().startswith("token "):
            given.append(auth[6:].strip())
        if "cookie" in headers:
            cookie: SimpleCookie = SimpleCookie()
            try:
                cookie.load(headers["cookie"])
            except Exception:  # a malformed cookie header is no token
                cookie = SimpleCookie()
            if cookie_name(self.port) in cookie:
                given.append(cookie[cookie_name(self.port)].value)
        return any(hmac.compare_digest(g.encode(), self.token.encode()) for g in given)


async def _send_plain(send: Send, status: int, text: str) -> None:
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())] + HEADERS})
    await send({"type": "http.response.body", "body": body})


def _name(value: Any, what: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not NAME.match(value):
        raise ValueError(f"{what}: expected a name such as node1-pod1, svc/web, 10.96.0.100:80")
    return value


def make_app(backend: Backend, token: str, port: int, stopping: asyncio.Event | None = None) -> ASGIApp:
    """The page and its API around `backend`; `stopping` ends the event streams (on Ctrl-C)."""
    stop = stopping or asyncio.Event()

    async def run(fn: Any, *args: Any) -> Response:
        try:
            return JSONResponse(await asyncio.to_thread(fn, *args))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except LabError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except OSError as exc:
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def graph(request: Request) -> Response:
        return await run(backend.graph, 0.25)

    async def events(request: Request) -> Response:
        async def stream() -> Any:
            last = ""
            quiet = 0.0
            yield "retry: 1000\n\n"
            while not stop.is_set():
                try:
                    data = await asyncio.to_thread(backend.graph, SHARED)
                except LabError as exc:
                    data = {"gone": True, "error": str(exc)}
                except OSError as exc:
                    data = {"gone": True, "error": f"{type(exc).__name__}: {exc}"}
                text = json.dumps(data, sort_keys=True)
                if text != last:
                    last, quiet = text, 0.0
                    yield f"event: graph\ndata: {text}\n\n"
                elif quiet >= KEEPALIVE:
                    quiet = 0.0
                    yield ": keepalive\n\n"
                wait = backend.interval()
                quiet += wait
                try:
                    await asyncio.wait_for(stop.wait(), wait)
                except asyncio.TimeoutError:
                    pass
        return StreamingResponse(stream(), media_type="text/event-stream")

    async def pod(request: Request) -> Response:
        try:
            key = _name(request.query_params.get("key"), "key")
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return await run(backend.pod, key)

    async def node(request: Request) -> Response:
        try:
            name = _name(request.query_params.get("name"), "name")
            service = _name(request.query_params.get("service"), "service", optional=True)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return await run(backend.node, name, service)

    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > 4096:
            raise ValueError("request too large")
        data = json.loads(raw or b"{}")
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return data

    async def trace(request: Request) -> Response:
        try:
            data = await body(request)
            source = _name(data.get("from"), "from")
            destination = _name(data.get("to"), "to")
            protocol = data.get("protocol") or None
            if protocol not in PROTOCOLS:
                raise ValueError("protocol: tcp, udp or icmp")
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return await run(backend.trace, source, destination, protocol)

    async def dns(request: Request) -> Response:
        try:
            data = await body(request)
            pod_name = _name(data.get("pod"), "pod")
            name = _name(data.get("name"), "name")  # never starts with "-": not an option of getent
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return await run(backend.dns, pod_name, name)

    async def exercise(request: Request) -> Response:
        return await run(lambda: {"exercise": backend.exercise()})

    async def grade(request: Request) -> Response:
        try:
            await body(request)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return await run(backend.grade)

    async def not_found(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("not found\n", status_code=404)

    routes = [
        Route("/", index),
        Route("/api/graph", graph),
        Route("/api/events", events),
        Route("/api/pod", pod),
        Route("/api/node", node),
        Route("/api/exercise", exercise),
        Route("/api/trace", trace, methods=["POST"]),
        Route("/api/dns", dns, methods=["POST"]),
        Route("/api/grade", grade, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found})
    return Guard(app, token, port)


def serve(lab_name: str | None, port: int, open_browser: bool = False, announce: Any = print) -> None:
    """Serve the page of a running lab on 127.0.0.1:`port` (0: a free port) until Ctrl-C or SIGTERM.

    The URL with its token is announced once the socket listens. Everything started here ends with it: the
    event streams are told to stop, uvicorn closes the connections, and nothing runs in the background."""
    import socket
    import threading

    import uvicorn

    from topo.errors import StateError
    from ui.backend import LabBackend

    if not 0 <= port <= 65535:
        raise StateError(f"--port {port}: a port is 0 (any free one) to 65535")
    backend = LabBackend(lab_name)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise StateError(f"--port {port}: cannot listen on 127.0.0.1:{port} ({exc.strerror or exc})") from exc
    sock.listen(128)
    port = sock.getsockname()[1]
    token = new_token()
    stopping = asyncio.Event()
    app = make_app(backend, token, port, stopping)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            stopping.set()  # the event streams end now, not after the graceful-shutdown timeout
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=2, server_header=False)
    server = Server(config)
    url = f"http://127.0.0.1:{port}/?token={token}"
    announce(f"lab ui: lab {backend.lab} at {url}")
    announce("(loopback only; the token is the password: do not share the URL. Ctrl-C stops it.)")
    if open_browser:
        import webbrowser

        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
