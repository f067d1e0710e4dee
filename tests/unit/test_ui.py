"""`lab ui`'s server without a lab: who gets in (token, Host, Origin, methods), what bad input gets, and the
DNS outcomes the page plays. The page itself is tested in a real browser (tests/integration/test_ui.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from observe import dnscount  # noqa: E402
from topo.errors import StateError  # noqa: E402
from ui import server  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PORT = 8765
BASE = f"http://127.0.0.1:{PORT}"
TOKEN = "t0ken-for-tests"


class FakeBackend:
    lab = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def graph(self, max_age: float = 0.0) -> dict[str, Any]:
        return {"lab": "fake", "nodes": []}

    def interval(self) -> float:
        return 0.05

    def pod(self, key: str) -> dict[str, Any]:
        if key == "nope":
            raise StateError("no pod nope in lab fake")
        return {"kind": "pod", "key": key}

    def node(self, name: str, service: str | None) -> dict[str, Any]:
        return {"kind": "node", "name": name, "service": service}

    def trace(self, source: str, destination: str, protocol: str | None) -> dict[str, Any]:
        self.calls.append(("trace", (source, destination, protocol)))
        return {"source": source, "destination": destination}

    def dns(self, pod: str, name: str) -> dict[str, Any]:
        self.calls.append(("dns", (pod, name)))
        return {"pod": pod, "name": name}

    def exercise(self) -> dict[str, Any] | None:
        return None

    def grade(self) -> dict[str, Any]:
        raise StateError("lab fake was not built from an exercise folder")


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(backend: FakeBackend) -> TestClient:
    return TestClient(server.make_app(backend, TOKEN, PORT), base_url=BASE)


AUTH = {"Authorization": f"token {TOKEN}"}
POST = {**AUTH, "Origin": BASE}


def test_without_the_token_everything_is_refused(client: TestClient) -> None:
    for path in ("/", "/api/graph", "/api/events", "/static/app.js", "/api/pod?key=x", "/nowhere"):
        r = client.get(path)
        assert r.status_code == 403, path
        assert "token" in r.text
    assert client.get("/api/graph?token=wrong").status_code == 403
    assert client.get("/api/graph", headers={"Authorization": "token wrong"}).status_code == 403


def test_the_token_opens_the_page_and_sets_a_strict_cookie(client: TestClient) -> None:
    r = client.get(f"/?token={TOKEN}")
    assert r.status_code == 200 and "<svg" in r.text
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"kubenet-lab-ui-{PORT}={TOKEN}") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["referrer-policy"] == "no-referrer" and r.headers["x-frame-options"] == "DENY"
    # the cookie now carries the token: the page's own module imports and API calls get in
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/api/graph").json() == {"lab": "fake", "nodes": []}


def test_other_host_names_are_refused_dns_rebinding(client: TestClient) -> None:
    r = client.get("/api/graph", headers={**AUTH, "Host": f"evil.example:{PORT}"})
    assert r.status_code == 403 and "Host" in r.text
    assert client.get("/api/graph", headers={**AUTH, "Host": "127.0.0.1:9999"}).status_code == 403
    assert client.get("/api/graph", headers={**AUTH, "Host": f"localhost:{PORT}"}).status_code == 200


def test_cross_origin_requests_are_refused(client: TestClient) -> None:
    assert client.get("/api/graph", headers={**AUTH, "Origin": "http://evil.example"}).status_code == 403
    assert client.get("/api/graph", headers={**AUTH, "Sec-Fetch-Site": "cross-site"}).status_code == 403
    body = {"from": "node1-pod1", "to": "svc/web"}
    assert client.post("/api/trace", json=body, headers={**AUTH, "Origin": "http://evil.example"}).status_code == 403
    assert client.post("/api/trace", json=body, headers=AUTH).status_code == 403  # a POST names its origin
    form = client.post("/api/trace", data=body, headers=POST)  # what a cross-site form could send
    assert form.status_code == 415


def test_only_reading_methods(client: TestClient) -> None:
    for method in ("PUT", "DELETE", "PATCH"):
        assert client.request(method, "/api/graph", headers=POST).status_code == 405


def test_probes_take_names_only(client: TestClient, backend: FakeBackend) -> None:
    ok = client.post("/api/trace", json={"from": "node1-pod1", "to": "svc/web:80", "protocol": "tcp"}, headers=POST)
    assert ok.status_code == 200 and backend.calls == [("trace", ("node1-pod1", "svc/web:80", "tcp"))]
    for bad in ({"from": "node1-pod1; rm -rf /", "to": "x"}, {"from": "-x", "to": "y"}, {"to": "y"},
                {"from": "a", "to": "b", "protocol": "sctp"}, {"from": "a" * 300, "to": "b"}):
        r = client.post("/api/trace", json=bad, headers=POST)
        assert r.status_code == 400 and "error" in r.json(), bad
    r = client.post("/api/dns", json={"pod": "node1-pod1", "name": "--help"}, headers=POST)
    assert r.status_code == 400  # never an option of getent
    assert client.post("/api/trace", content=b"[1]", headers={**POST, "Content-Type": "application/json"}).status_code == 400
    assert len(backend.calls) == 1


def test_lab_errors_are_one_line_answers(client: TestClient) -> None:
    r = client.get("/api/pod?key=nope", headers=AUTH)
    assert r.status_code == 400 and r.json() == {"error": "no pod nope in lab fake"}
    r = client.post("/api/grade", json={}, headers=POST)
    assert r.status_code == 400 and "exercise" in r.json()["error"]
    assert client.get("/api/node?name=node1&service=default/web:80/TCP", headers=AUTH).json()["service"] == \
        "default/web:80/TCP"


@pytest.mark.parametrize("port", ["abc", "70000", "-1"])
def test_a_bad_port_is_one_line_and_exit_2(port: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "ui", "--port", port], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--port" in proc.stderr


def test_dns_outcomes_follow_each_question() -> None:
    log = ("dnsmasq[1]: query[A] api.example.com.default.svc.cluster.local from 10.244.1.2\n"
           "dnsmasq[1]: config api.example.com.default.svc.cluster.local is NXDOMAIN\n"
           "dnsmasq[1]: query[A] api.example.com from 10.244.2.9\n"  # another pod: not ours
           "dnsmasq[1]: query[A] api.example.com from 10.244.1.2\n"
           "dnsmasq[1]: forwarded api.example.com to 192.168.1.200\n"
           "dnsmasq[1]: query[AAAA] api.example.com from 10.244.1.2\n"
           "dnsmasq[1]: forwarded api.example.com to 192.168.1.200\n"
           "dnsmasq[1]: 7 10.244.1.2/4711 reply api.example.com is 192.168.1.200\n"
           "dnsmasq[1]: reply api.example.com is NODATA-IPv6\n")
    assert dnscount.outcomes(log, "10.244.1.2") == {
        "A api.example.com.default.svc.cluster.local": ["NXDOMAIN"],
        "A api.example.com": ["forwarded to 192.168.1.200", "reply is 192.168.1.200"],
        "AAAA api.example.com": ["forwarded to 192.168.1.200", "reply is NODATA-IPv6"],
    }


def test_a_lab_from_a_folder_without_checks_is_no_exercise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lab up labs/00-seed` records the folder as the lab's exercise, but it has no checks.yaml: the page
    must offer no Exercise tab (the graph says so) and /api/exercise must answer null, not an error."""
    from apiserver import state
    from ui import backend as ui_backend

    st = state.LabState(name="fake", phase="up", pid=1, spec_file=None, spec_text="", exercise=str(tmp_path))

    class Drawn:
        def to_json(self) -> dict[str, Any]:
            return {"lab": "fake", "nodes": []}

    monkeypatch.setattr(ui_backend.state, "resolve", lambda name: st)
    monkeypatch.setattr(ui_backend.graph, "graph_of", lambda name: Drawn())
    lab = ui_backend.LabBackend("fake")
    assert lab.graph()["exercise"] is False
    assert lab.exercise() is None
    app = TestClient(server.make_app(lab, TOKEN, PORT), base_url=BASE)
    r = app.get("/api/exercise", headers=AUTH)
    assert (r.status_code, r.json()) == (200, {"exercise": None})


def test_an_inspected_pods_containers_are_the_processes_that_run(tmp_path: Path) -> None:
    """The state knows each container's pid; what runs is /proc/PID/cmdline, whatever the spec says (a pod
    applied later, a spec without the container, an addon)."""
    from apiserver import state
    from ui import inspect

    argv = [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"  # past its exec: argv is its own
        ps = state.PodState(node="node1", ip="10.244.1.9", netns="x", pause_pid=1, containers={"app": proc.pid})
        shown = inspect.containers(ps, None)
        assert shown == [{"name": "app", "image": None, "argv": argv, "ports": [], "pid": proc.pid,
                          "running": True}]
    finally:
        proc.kill()
        proc.communicate()
    assert inspect.containers(ps, None)[0]["running"] is False
