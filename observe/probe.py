"""`lab probe`: which pods can reach which, as a pods x pods matrix, and the single connection behind it.

This is how NetworkPolicies are tested (here, and by the upstream NetworkPolicy e2e tooling whose "truth
tables" the matrix imitates: `.` allowed, `X` blocked): connect from every pod to every pod on one port and
compare what got through with what the policies should allow.

How it works, and why:

- **In-process, in parallel, bounded.** A socket belongs to the network namespace it was created in, so
  the probe enters each source pod's namespace (setns, as `topo.netns` does for netlink), creates one
  non-blocking socket per destination, and comes back; the connections of a batch then run at once in one
  event loop (`selectors`) with one deadline. No subprocess per pair (400 pairs would cost seconds of
  fork/exec alone), no thread per pair. NetworkPolicy drops (it does not reject), so a blocked connection
  costs the whole timeout, but once per batch for all the pairs in it: a matrix takes about one timeout per
  batch. A batch is as many pairs as free file descriptors allow, counting the worst case of a TCP pair
  (TRIES client attempts plus as many connections accepted by the probe's own listener, 6 descriptors): a
  hard limit of 20,000 holds about 3,300 TCP pairs, a 57-pod matrix, in one batch (systemd's default hard
  limit, 524,288, some 87,000). The soft limit is raised to the hard one while the probe runs and put
  back afterwards.
- **Destinations listen.** Pods run agnhost netexec on some port, or only pause, and a probe to a port
  nobody listens on would answer "refused" whatever the policy says. So for every destination pod the
  probe tries to open its own listener on the probe port inside the pod's namespace, for the duration of
  the probe (closed afterwards: nothing is left in the pod). If the port is taken, a server of the pod
  already listens there (agnhost, dnsmasq, nginx) and answers instead. A pod whose containers declare the
  port (a containerPort of that number and protocol) and run a process gets no listener either, even
  while the port is still free: its own server is meant to answer there, and one still starting would
  fail to bind if the probe held the port first (until its server listens, such a pod reads "refused"). A
  pod that runs only pause serves nothing, so declared ports do not count there. `lab probe --port 81`
  therefore works on any lab, and a policy that allows only a named container port can be probed on that
  port.
- **What "allowed" means.** TCP: the handshake completed (the SYN got through and the SYN-ACK came back:
  policy admits the connection and conntrack lets the reply pass). UDP: an answer came back. Refused
  (an RST or ICMP port unreachable) is "blocked" too, as in the upstream tooling, with detail "refused".
  UDP has no handshake, so silence is all a drop leaves, and a server that stays silent looks the same: a
  pod's own UDP server on the probe port that does not answer the datagram `clientip` (any answer counts,
  agnhost netexec's is the client's ip:port) shows as blocked ("timeout") whatever the policies say.
  dnsmasq on 53 is one (it ignores a datagram that is not a DNS query); probe UDP on a free port instead.
- **The source IP the destination saw.** After connecting, the client asks `GET /clientip` (UDP:
  `clientip`), which agnhost netexec answers with the peer address it sees, and so do the probe's own
  listeners. `ProbeResult.source_ip` holds that address, or None when the server is something else.

`connect()` is the stable single-pair entry point other commands (grading) use; `matrix()` the many-pair one.
"""
from __future__ import annotations

import errno
import os
import resource
import selectors
import socket
import time
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address

from apiserver import state
from images.agnhost import format_peer, udp_answer
from topo import names, netns
from topo.errors import StateError

PROTOCOLS = ("tcp", "udp")
DEFAULT_PORT = 80  # the upstream NetworkPolicy e2e tests serve on 80 and 81
DEFAULT_TIMEOUT = 1.0
BACKLOG = 1024  # as agnhost here: a small backlog would drop parallel connects and blame the network
ALLOWED, BLOCKED = ".", "X"  # the upstream truth tables' symbols
_REQUEST_TCP = b"GET /clientip HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
_REQUEST_UDP = b"clientip"
_FD_RESERVE = 64  # descriptors kept free for everything else while a batch runs


@dataclass
class ProbeResult:
    """One connection attempt. `allowed`: it got through (see the module docstring); `detail`: connected,
    answered, timeout, refused, or an error text; `source_ip`: the client address the destination saw,
    when the destination told (agnhost netexec and the probe's own listeners do), else None."""

    source: str
    dest_ip: str
    port: int
    protocol: str
    allowed: bool
    detail: str
    source_ip: str | None = None
    seconds: float = 0.0
    dest: str | None = None  # the destination pod ("ns/name"), when dest_ip is a pod of the lab

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Endpoint:
    """A place to connect from or to: a display name, its network namespace, and its IP if it has one.
    `serves`: the (port, protocol) pairs a pod's running containers declare (containerPort), where its
    own server answers and the probe opens no listener of its own."""

    name: str
    netns: str
    ip: str | None = None
    serves: frozenset[tuple[int, str]] = frozenset()


# ---------------------------------------------------------------------------- who is who


def endpoints(st: state.LabState) -> tuple[dict[str, Endpoint], dict[str, Endpoint]]:
    """(sources by every name they can be given, pods by IP). Pods are `ns/name`, or `name` when unique in
    default; nodes, routers and external hosts by their names."""
    from apiserver.desired import model_of

    lab = model_of(st)
    by_name: dict[str, Endpoint] = {}
    by_ip: dict[str, Endpoint] = {}
    for host in [n.name for n in lab.nodes] + lab.routers + [e.name for e in lab.external]:
        by_name[host] = Endpoint(host, lab.node_netns(host))
    for key, ps in sorted(st.pods.items()):
        # ps.containers holds the containers that run a process: a pause-only pod serves nothing
        serves = frozenset((int(number), str(proto).lower()) for _, number, proto in ps.ports) \
            if ps.containers else frozenset()
        point = Endpoint(key, ps.netns, ps.ip, serves)
        by_name[key] = point
        by_ip[ps.ip] = point
        namespace, name = key.split("/", 1)
        if namespace == "default":
            by_name.setdefault(name, point)
    return by_name, by_ip


def find_source(st: state.LabState, source: str) -> Endpoint:
    by_name, _ = endpoints(st)
    if source in by_name:
        return by_name[source]
    matches = [k for k in st.pods if k.split("/", 1)[1] == source]
    if len(matches) == 1:
        return by_name[matches[0]]
    if len(matches) > 1:
        raise StateError(f"pod name {names.shown(source)} is in several namespaces ({', '.join(sorted(matches))}): "
                         "give it as NAMESPACE/NAME")
    raise StateError(f"no pod, node or external host named {names.shown(source)} in lab {st.name}")


def connect(st: state.LabState, source: str, dest_ip: str, port: int, protocol: str = "tcp",
            timeout: float = 1.0) -> ProbeResult:
    """One connection from `source` (a pod `ns/name` or `name` in default, a node, a router or an external
    host) to dest_ip:port, within `timeout` seconds. When dest_ip is a pod of the lab with nothing listening
    on the port, a listener is opened there for the duration (see the module docstring)."""
    _check(port, protocol, timeout)
    src = find_source(st, source)
    try:
        IPv4Address(dest_ip)
    except ValueError:
        raise StateError(f"{dest_ip!r} is not an IPv4 address") from None
    _, by_ip = endpoints(st)
    dest = by_ip.get(dest_ip)
    return run([(src, dest_ip)], [dest] if dest is not None else [], port, protocol, timeout)[0]


# ---------------------------------------------------------------------------- the matrix


@dataclass
class Matrix:
    pods: list[str]  # `ns/name`, sorted: rows are sources, columns destinations, in this order
    port: int
    protocol: str
    results: list[ProbeResult] = field(default_factory=list)  # row-major
    seconds: float = 0.0

    def allowed(self, source: str, dest: str) -> bool:
        return self.results[self.pods.index(source) * len(self.pods) + self.pods.index(dest)].allowed

    def rows(self) -> list[str]:
        """One string of ALLOWED/BLOCKED per source, in `pods` order (what tests compare)."""
        n = len(self.pods)
        return ["".join(ALLOWED if r.allowed else BLOCKED for r in self.results[i * n:(i + 1) * n])
                for i in range(n)]

    def render(self) -> str:
        """The upstream truth table layout: a '-' corner, destinations across, sources down."""
        width = max([len(p) for p in self.pods] + [1])
        head = " " * width + "  " + " ".join(str(i % 10) for i in range(len(self.pods)))
        lines = [head]
        for index, (pod, row) in enumerate(zip(self.pods, self.rows())):
            lines.append(f"{pod.ljust(width)}  {' '.join(row)}   {index}")
        blocked = sum(1 for r in self.results if not r.allowed)
        legend = (f"\n{ALLOWED} allowed  {BLOCKED} blocked  (rows: from, columns: to, numbered in row order; "
                  f"{self.protocol}/{self.port}, {len(self.results)} pairs, {blocked} blocked, "
                  f"{self.seconds:.2f} s)")
        return "\n".join(lines) + legend

    def to_json(self) -> dict:
        return {"port": self.port, "protocol": self.protocol, "pods": self.pods, "rows": self.rows(),
                "seconds": round(self.seconds, 3), "results": [r.to_json() for r in self.results]}


def matrix(st: state.LabState, port: int = DEFAULT_PORT, protocol: str = "tcp", timeout: float = DEFAULT_TIMEOUT,
           pods: list[str] | None = None) -> Matrix:
    """Every pod (or those in `pods`) to every pod, all at once."""
    _check(port, protocol, timeout)
    from kubelet import runtime

    by_name, _ = endpoints(st)
    keys = sorted(k for k, ps in st.pods.items() if runtime.sandbox_alive(ps.netns, ps.pause_pid))
    if pods is not None:
        wanted = [find_source(st, p).name for p in pods]
        keys = [k for k in keys if k in wanted]
    points = [by_name[k] for k in keys]
    started = time.monotonic()
    pairs = [(src, dst.ip) for src in points for dst in points]
    results = run(pairs, points, port, protocol, timeout)  # type: ignore[arg-type]
    return Matrix(keys, port, protocol, results, time.monotonic() - started)


def _check(port: int, protocol: str, timeout: float) -> None:
    if not 1 <= port <= 65535:
        raise StateError(f"port {port} is out of range 1..65535")
    if protocol not in PROTOCOLS:
        raise StateError(f"protocol {protocol!r} is not supported (tcp, udp)")
    if not 0 < timeout <= 60:
        raise StateError(f"timeout {timeout} must be between 0 and 60 seconds")


# ---------------------------------------------------------------------------- the engine


TRIES = 3  # connection attempts within the timeout, spread evenly (the upstream probes retry too)


@dataclass(eq=False)
class _Conn:
    """One pair's connection in flight, or (result None) an accepted connection of the probe's own listener.

    A TCP pair may hold several attempts at once: when hundreds of connections start together, a first SYN
    can be lost (say, queued behind a neighbour being resolved), and TCP would resend it only after its
    1 s initial retransmission timeout, past a probe's whole budget. A new attempt every timeout/TRIES
    seconds keeps one lost packet from reading as "blocked"; whichever attempt connects first counts."""

    src: Endpoint | None
    dest_ip: str
    result: ProbeResult | None
    sock: socket.socket | None = None  # the attempt that connected (TCP), the socket (UDP), the accepted one
    attempts: list[socket.socket] = field(default_factory=list)  # TCP attempts still connecting
    phase: str = "connect"  # connect -> answer -> done (server side: serve)
    buffer: bytes = b""
    started: float = 0.0


def run(pairs: list[tuple[Endpoint, str]], dests: list[Endpoint], port: int, protocol: str,
        timeout: float) -> list[ProbeResult]:
    """Connect each (source, dest_ip) pair, all at once; `dests` are pods that get a listener if free.

    Pairs are run in batches when the process's descriptor limit would not hold them all at once. The soft
    limit is raised to the hard one for the duration, and put back: the CLI exits anyway, but grading and
    tests call this in a long-lived process whose limits are not the probe's to change.
    """
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = limits
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    listeners: list[socket.socket] = []
    try:
        listeners = _listen(dests, port, protocol)
        by_ip = {d.ip: d.name for d in dests}
        batch = batch_size(soft, _open_descriptors(), protocol)
        results: list[ProbeResult] = []
        for start in range(0, len(pairs), batch):
            results += _run_batch(pairs[start:start + batch], listeners, port, protocol, timeout, by_ip)
        return results
    finally:
        for sock in listeners:
            sock.close()
        if limits[0] < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def batch_size(limit: int, open_now: int, protocol: str) -> int:
    """How many pairs fit in the descriptors left under `limit` (`open_now` are taken, the listeners among
    them), keeping _FD_RESERVE for everything else (the selector, entering a namespace, nft, logs). A TCP pair
    holds at worst TRIES client attempts at once, and each of them, if it connects to one of the probe's own
    listeners before the pair's first success closes the others, one accepted socket more; a UDP pair holds
    one socket (the listeners answer from their own)."""
    per_pair = 2 * TRIES if protocol == "tcp" else 1
    return max(1, (limit - open_now - _FD_RESERVE) // per_pair)


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def _listen(dests: list[Endpoint], port: int, protocol: str) -> list[socket.socket]:
    """A listener on 0.0.0.0:port in each destination pod whose port is free (taken: its server answers) and
    not declared by one of its running containers (that server may still be starting: leave it the port)."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    made = []
    seen = set()
    for dest in dests:
        if dest.netns in seen or (port, protocol) in dest.serves:
            continue  # a pod's own server (one that may still be starting) answers on a port it declares
        seen.add(dest.netns)
        try:
            with netns.entered(dest.netns):
                sock = socket.socket(socket.AF_INET, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError:
            continue  # the pod is gone: its pairs time out, as they would against a dead pod
        try:
            if protocol == "tcp":
                # Lets a listener bind over the TIME_WAIT of an earlier probe; an active listener still
                # makes bind fail (Linux), which is how a pod's own server is detected.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            if protocol == "tcp":
                sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        made.append(sock)
    return made


def _run_batch(pairs: list[tuple[Endpoint, str]], listeners: list[socket.socket], port: int, protocol: str,
               timeout: float, by_ip: dict[str, str]) -> list[ProbeResult]:
    sel = selectors.DefaultSelector()
    for sock in listeners:
        sel.register(sock, selectors.EVENT_READ, None)
    start = time.monotonic()
    conns = [_Conn(src, dest_ip, ProbeResult(src.name, dest_ip, port, protocol, False, "timeout",
                                              dest=by_ip.get(dest_ip)), started=start) for src, dest_ip in pairs]
    servers: list[_Conn] = []
    deadline = start + timeout
    for attempt in range(TRIES):
        _attempt([c for c in conns if c.phase != "done" and (c.phase == "connect" or protocol == "udp")],
                 sel, port, protocol)
        until = deadline if attempt == TRIES - 1 else start + timeout * (attempt + 1) / TRIES
        _loop(conns, servers, sel, protocol, until)
        if all(c.phase == "done" for c in conns):
            break
    for conn in conns:
        if conn.phase == "answer" and protocol == "tcp":
            _finish(conn, True, "connected (no answer)")  # the handshake completed: through
        elif conn.phase != "done":
            _finish(conn, False, "timeout")
    for conn in conns + servers:
        for sock in conn.attempts + ([conn.sock] if conn.sock is not None else []):
            sock.close()
    sel.close()
    return [c.result for c in conns if c.result is not None]


def _attempt(conns: list[_Conn], sel: selectors.BaseSelector, port: int, protocol: str) -> None:
    """Start one more attempt for each of `conns`, entering each source's namespace once."""
    by_source: dict[str, list[_Conn]] = {}
    for conn in conns:
        assert conn.src is not None
        by_source.setdefault(conn.src.netns, []).append(conn)
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    for ns, group in by_source.items():
        made: dict[int, socket.socket] = {}
        failed: dict[int, OSError] = {}
        try:
            with netns.entered(ns):
                for conn in group:
                    if protocol == "tcp" or conn.sock is None:
                        try:
                            made[id(conn)] = socket.socket(socket.AF_INET, kind | socket.SOCK_NONBLOCK
                                                           | socket.SOCK_CLOEXEC)
                        except OSError as exc:  # out of descriptors, say: this attempt, not the namespace
                            failed[id(conn)] = exc
        except OSError as exc:  # entering the namespace failed (the pod is gone, or no descriptor for it)
            for sock in made.values():
                sock.close()
            for conn in group:
                if conn.sock is None and not conn.attempts:
                    _finish(conn, False, f"cannot enter {conn.src.name}'s network namespace: "  # type: ignore[union-attr]
                            f"{exc.strerror or exc}")
            continue
        for conn in group:
            if id(conn) in failed:
                if conn.sock is None and not conn.attempts:  # no earlier attempt still in flight
                    _finish(conn, False, f"no socket: {_reason(failed[id(conn)])}")
                continue
            try:
                if protocol == "tcp":
                    sock = made[id(conn)]
                    conn.attempts.append(sock)
                    err = sock.connect_ex((conn.dest_ip, port))
                    if err not in (0, errno.EINPROGRESS):
                        conn.attempts.remove(sock)
                        sock.close()
                        if not conn.attempts:
                            _finish(conn, False, os.strerror(err))
                        continue
                    sel.register(sock, selectors.EVENT_WRITE, conn)
                elif conn.sock is None:  # UDP: one socket, the request sent again on each attempt
                    conn.sock = made[id(conn)]
                    conn.sock.connect((conn.dest_ip, port))
                    conn.sock.send(_REQUEST_UDP)
                    conn.phase = "answer"
                    sel.register(conn.sock, selectors.EVENT_READ, conn)
                else:
                    conn.sock.send(_REQUEST_UDP)
            except OSError as exc:
                _finish(conn, False, _reason(exc))


def _loop(conns: list[_Conn], servers: list[_Conn], sel: selectors.BaseSelector, protocol: str,
          until: float) -> None:
    while any(c.phase != "done" for c in conns):
        left = until - time.monotonic()
        if left <= 0:
            return
        for key, _ in sel.select(min(left, 0.05)):
            sock = key.fileobj
            conn = key.data
            if sock.fileno() < 0:  # type: ignore[union-attr]
                continue  # closed by an earlier event of this same select(): another attempt of its pair won
            if conn is None:
                servers += _serve(sock, sel, protocol)  # type: ignore[arg-type]
            elif conn.result is None:
                _serve_conn(conn, sel)
            elif conn.phase != "done":
                _step(conn, sock, sel, protocol)  # type: ignore[arg-type]


def _finish(conn: _Conn, allowed: bool, detail: str, source_ip: str | None = None) -> None:
    assert conn.result is not None
    conn.result.allowed, conn.result.detail = allowed, detail
    conn.result.source_ip = source_ip
    conn.result.seconds = round(time.monotonic() - conn.started, 4)
    conn.phase = "done"


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.ECONNREFUSED,):
        return "refused"
    return exc.strerror or str(exc)


def _step(conn: _Conn, sock: socket.socket, sel: selectors.BaseSelector, protocol: str) -> None:
    """Advance one client connection on an event of one of its sockets."""
    if conn.phase == "connect":
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        sel.unregister(sock)
        conn.attempts.remove(sock)
        if err:
            sock.close()
            if err == errno.ECONNREFUSED:  # an RST came back: definitive
                for other in conn.attempts:
                    sel.unregister(other)
                _finish(conn, False, "refused")
            elif not conn.attempts:
                _finish(conn, False, os.strerror(err))
            return
        for other in conn.attempts:  # the first attempt through wins
            sel.unregister(other)
            other.close()
        conn.attempts = []
        conn.sock, conn.phase = sock, "answer"
        try:
            sock.send(_REQUEST_TCP)
        except OSError:
            pass
        sel.register(sock, selectors.EVENT_READ, conn)
        return
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return
    except OSError as exc:
        sel.unregister(sock)
        if protocol == "tcp":  # connected already: through, whatever the server did next
            _finish(conn, True, "connected")
        else:
            _finish(conn, False, _reason(exc))
        return
    if protocol == "udp":
        sel.unregister(sock)
        _finish(conn, True, "answered", _peer_ip(data.decode("utf-8", "replace").strip()))
        return
    conn.buffer += data
    if data and len(conn.buffer) < 65536:
        return  # until the server closes (Connection: close)
    sel.unregister(sock)
    head, _, body = conn.buffer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    ok = len(status) >= 2 and status[0].startswith(b"HTTP/1.") and status[1] == b"200"
    _finish(conn, True, "connected", _peer_ip(body.decode("utf-8", "replace").strip()) if ok else None)


def _peer_ip(text: str) -> str | None:
    """The address of agnhost's `ip:port` answer (what /clientip and `clientip` return)."""
    host = text.rsplit(":", 1)[0] if ":" in text else ""
    try:
        return str(IPv4Address(host))
    except ValueError:
        return None


def _serve(listener: socket.socket, sel: selectors.BaseSelector, protocol: str) -> list[_Conn]:
    """The probe's own listeners: answer like agnhost netexec (the client's address as it arrived)."""
    if protocol == "udp":
        try:
            payload, sender = listener.recvfrom(2048)
        except OSError:
            return []
        answer = udp_answer(payload, sender)
        if answer is not None:
            try:
                listener.sendto(answer.encode(), sender)
            except OSError:
                pass
        return []
    accepted = []
    while True:
        try:
            sock, peer = listener.accept()
        except OSError:  # BlockingIOError: all accepted
            return accepted
        sock.setblocking(False)
        conn = _Conn(None, peer[0], None, sock, phase="serve", buffer=format_peer(peer).encode())
        sel.register(sock, selectors.EVENT_READ, conn)
        accepted.append(conn)


def _serve_conn(conn: _Conn, sel: selectors.BaseSelector) -> None:
    """Read the request (whatever it is), answer 200 with the peer `ip:port`, close."""
    assert conn.sock is not None
    try:
        data = conn.sock.recv(4096)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if data and b"\r\n\r\n" not in data:
        return  # the rest of the request comes later (a request is one small segment in practice)
    peer = conn.buffer  # the peer address, kept at accept
    try:
        conn.sock.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                       + str(len(peer)).encode() + b"\r\nConnection: close\r\n\r\n" + peer)
    except OSError:
        pass
    sel.unregister(conn.sock)
    conn.sock.close()
    conn.sock = None
