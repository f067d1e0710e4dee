"""Tests of services/ingress.py: the nginx.conf that plays ingress-nginx for the lab's Ingress objects.

Golden files live in golden/ingress/NAME.conf; to rewrite them after a deliberate change run with
KUBENET_UPDATE_GOLDEN=1 and read every diff before committing. The matching rules are Ingress v1's (the
path-matching table of the Kubernetes Ingress documentation) as ingress-nginx renders them. The tests at
the end need nginx (`nginx -t` on the goldens) and root: the last one runs the rendered nginx for real in a
throwaway network namespace (`unshare -n`) in front of small HTTP backends on loopback addresses, and
checks which backend every request reached.
"""
from __future__ import annotations

import json
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from services import ingress as ing
from tests.conftest import assert_golden, require_root, require_tool
from topo.model import Ingress, IngressBackend, IngressPath, IngressRule, Service, ServicePort

GOLDEN = Path(__file__).resolve().parent / "golden" / "ingress"
PREFIX = Path("/run/kubenet-lab/demo/ingress")  # where the goldens say nginx's files are
B = IngressBackend


def services(net: str = "10.96.0") -> dict[str, Service]:
    """The services behind the Ingresses; `net` is the first three octets of their ClusterIPs (the live
    test puts them on loopback addresses, same last octet and ports)."""
    def svc(name: str, octet: int, *ports: ServicePort, namespace: str = "default", headless: bool = False) -> Service:
        return Service(name, namespace, None if headless else IPv4Address(f"{net}.{octet}"), ports,
                       selector=(("app", name),))
    found = [
        svc("web", 20, ServicePort("http", 80, 8080)),
        svc("api", 21, ServicePort("", 8080, 8080)),
        svc("docs", 22, ServicePort("http", 80, 80), ServicePort("admin", 81, 81)),
        svc("shop", 23, ServicePort("", 80, 80), namespace="shop"),
        svc("fallback", 24, ServicePort("", 80, 8080)),
        svc("dns", 25, ServicePort("dns", 53, 53, "UDP")),
        svc("stateful", 0, ServicePort("", 80, 80), headless=True),
    ]
    return {s.key: s for s in found}


def P(path: str, path_type: str, service: str, port: int | str) -> IngressPath:
    return IngressPath(path, path_type, B(service, port))


MAIN = Ingress("main", "default", (
    IngressRule("foo.example.com", (P("/api/", "Prefix", "api", 8080), P("/", "Prefix", "web", "http"))),
    IngressRule("bar.example.com", (P("/exact", "Exact", "web", 80), P("/docs/", "Prefix", "docs", "http"),
                                    P("/docs/admin", "Prefix", "docs", "admin"),
                                    P("/legacy", "ImplementationSpecific", "api", 8080))),
    IngressRule(None, (P("/healthz", "Exact", "web", "http"),)),
))
MORE = Ingress("more", "default", (
    IngressRule("foo.example.com", (P("/static", "Prefix", "docs", 80),  # merged into foo.example.com
                                    P("/api", "Prefix", "web", 80))),  # same as main's /api/: main's wins
    IngressRule("bar.example.com", (P("/docs", "Exact", "web", 80),  # Exact beats main's Prefix /docs/ at /docs
                                    P("/sts", "Prefix", "stateful", 80),  # headless: left out
                                    P("/gone", "Prefix", "missing", 80),  # no such service: left out
                                    P("/udp", "Prefix", "dns", "dns"),  # UDP port: left out
                                    P("/noport", "Prefix", "web", 9999))),  # no such port: left out
))
SHOP = Ingress("shop", "shop", (IngressRule("*.shop.example.org", (P("/", "Prefix", "shop", 80),)),),
               default_backend=B("shop", 80))
WITH_DEFAULT = Ingress("catch-all", "default", (), default_backend=B("fallback", 80))

CASES: dict[str, list[Ingress]] = {
    "three-hosts-default-backend": [MAIN, MORE, SHOP, WITH_DEFAULT],
    "three-hosts-404": [MAIN, MORE, Ingress("shop", "shop", SHOP.rules)],
    "no-ingresses": [],
}
# In three-hosts-default-backend, the first Ingress with a defaultBackend is `shop/shop` (shop/shop:80).


def render(case: str, prefix: Path = PREFIX, listen_port: int = 80, net: str = "10.96.0") -> str:
    return ing.nginx_conf(CASES[case], services(net), prefix, listen_port)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    assert_golden(GOLDEN / f"{case}.conf", render(case))


def _server(conf: str, name: str) -> str:
    """The text of the server block whose server_name is `name`."""
    start = conf.index(f"server_name {name};")
    return conf[start:conf.index("\n    }\n", start)]


def _last_location(block: str) -> str:
    """The body of the last location of a server block, one line."""
    body = block[block.rindex("location "):]
    return " ".join(line.strip() for line in body.splitlines())


def _locations(block: str) -> list[str]:
    return [line.strip()[len("location "):-2] for line in block.splitlines() if line.strip().startswith("location ")]


def test_prefix_paths_match_whole_elements() -> None:
    """Prefix /api/ (trailing slash ignored) is `= /api` plus `/api/`: never a bare `location /api`,
    which would also match /apix."""
    locations = _locations(_server(render("three-hosts-404"), "foo.example.com"))
    assert "= /api" in locations and "/api/" in locations and "/api" not in locations
    assert "= /static" in locations and "/static/" in locations
    assert locations[-1] == "/"  # Prefix "/" is everything


def test_exact_paths_match_only_themselves() -> None:
    locations = _locations(_server(render("three-hosts-404"), "bar.example.com"))
    assert "= /exact" in locations and "/exact/" not in locations


def test_implementation_specific_is_a_prefix() -> None:
    locations = _locations(_server(render("three-hosts-404"), "bar.example.com"))
    assert "= /legacy" in locations and "/legacy/" in locations


def test_exact_wins_over_prefix_for_the_same_path() -> None:
    block = _server(render("three-hosts-404"), "bar.example.com")
    exact = block[block.index("location = /docs {"):]
    assert exact.splitlines()[1].strip() == "proxy_pass http://10.96.0.20:80;"  # MORE's Exact, web
    assert _locations(block).count("= /docs") == 1
    prefix = block[block.index("location /docs/ {"):]
    assert prefix.splitlines()[1].strip() == "proxy_pass http://10.96.0.22:80;"  # MAIN's Prefix, docs


def test_hosts_of_several_ingresses_merge_and_the_first_wins_a_path() -> None:
    block = _server(render("three-hosts-404"), "foo.example.com")
    assert "default/more: Prefix /static -> default/docs:80" in block
    api = block[block.index("location /api/ {"):]
    assert api.splitlines()[1].strip() == "proxy_pass http://10.96.0.21:8080;"  # main's, not more's web
    assert render("three-hosts-404").count("server_name foo.example.com;") == 1


def test_longest_path_first() -> None:
    locations = _locations(_server(render("three-hosts-404"), "bar.example.com"))
    assert locations == ["= /docs/admin", "/docs/admin/", "= /legacy", "/legacy/", "= /exact", "= /docs", "/docs/",
                         "/"]


def test_named_and_numbered_ports_resolve_through_the_service() -> None:
    block = _server(render("three-hosts-404"), "bar.example.com")
    admin = block[block.index("location /docs/admin/ {"):]
    assert admin.splitlines()[1].strip() == "proxy_pass http://10.96.0.22:81;"  # docs:admin


def test_unreachable_backends_are_left_out_with_the_reason() -> None:
    block = _server(render("three-hosts-404"), "bar.example.com")
    assert "# left out: default/more: Prefix /sts -> default/stateful:80: headless service (no ClusterIP" in block
    assert "# left out: default/more: Prefix /gone -> default/missing:80: no such service" in block
    assert "# left out: default/more: Prefix /udp -> default/dns:dns: port is UDP, HTTP needs TCP" in block
    assert "# left out: default/more: Prefix /noport -> default/web:9999: the service has no such port" in block
    assert not any(p in loc for loc in _locations(block) for p in ("/sts", "/gone", "/udp", "/noport"))


def test_wildcard_host_matches_one_label_like_ingress_nginx() -> None:
    assert ing.server_name("*.shop.example.org") == r"~^(?<subdomain>[\w-]+)\.shop\.example\.org$"
    assert ing.server_name("foo.example.com") == "foo.example.com"


def test_default_server_routes_the_default_backend() -> None:
    conf = render("three-hosts-default-backend")
    default = _server(conf, "_")
    assert "listen 80 default_server;" in conf and conf.count("default_server") == 1
    assert "# default backend, from shop/shop: shop/shop:80" in default
    assert _last_location(default) == "location / { proxy_pass http://10.96.0.23:80; }"
    assert _locations(default) == ["= /healthz", "/"]  # the host-less rule's path, then the default backend
    # hosts without a "/" path fall back to the default backend too
    assert _last_location(_server(conf, "bar.example.com")) == "location / { proxy_pass http://10.96.0.23:80; }"


def test_without_default_backend_unmatched_requests_get_ingress_nginxs_404() -> None:
    conf = render("three-hosts-404")
    for name in ("_", "bar.example.com"):
        assert _last_location(_server(conf, name)) == (
            'location / { default_type text/plain; return 404 "default backend - 404"; }')
    assert 'return 404' not in _server(conf, "foo.example.com")  # it has Prefix "/"


def test_no_ingresses_is_a_404_server() -> None:
    conf = render("no-ingresses")
    assert conf.count("server {") == 1 and 'return 404 "default backend - 404";' in conf


def test_everything_nginx_writes_is_under_the_prefix() -> None:
    conf = render("three-hosts-default-backend")
    for directive in ("pid", "lock_file", "error_log", "access_log", "client_body_temp_path", "proxy_temp_path",
                      "fastcgi_temp_path", "uwsgi_temp_path", "scgi_temp_path"):
        line = next(l for l in conf.splitlines() if l.strip().startswith(directive + " "))
        assert line.split()[1].startswith(str(PREFIX) + "/"), line
    assert "/var/" not in conf and "/etc/" not in conf
    assert not any(l.strip().startswith("daemon") for l in conf.splitlines())  # given on the command line
    assert "$host" in conf and "$upstream_addr" in conf  # in the access log


def test_proxy_headers() -> None:
    conf = render("three-hosts-404")
    for header in ("Host $host", "X-Real-IP $remote_addr", "X-Forwarded-For $proxy_add_x_forwarded_for"):
        assert f"proxy_set_header {header};" in conf


def test_output_is_deterministic_and_hosts_sorted() -> None:
    assert render("three-hosts-404") == render("three-hosts-404")
    conf = render("three-hosts-404")
    order = [line.strip() for line in conf.splitlines() if line.strip().startswith("server_name ")]
    assert order == ["server_name _;", r"server_name ~^(?<subdomain>[\w-]+)\.shop\.example\.org$;",
                     "server_name bar.example.com;", "server_name foo.example.com;"]


def test_listen_port() -> None:
    conf = render("three-hosts-404", listen_port=8080)
    listens = {line.strip() for line in conf.splitlines() if line.strip().startswith("listen ")}
    assert listens == {"listen 8080 default_server;", "listen 8080;"}


@pytest.mark.parametrize("path", ["api", "/a b", "/x;y", "/{x}", '/"', "/#x"])
def test_unsafe_paths_are_refused(path: str) -> None:
    bad = Ingress("bad", "default", (IngressRule("x.example.com", (P(path, "Prefix", "web", 80),)),))
    with pytest.raises(ValueError, match="path"):
        ing.nginx_conf([bad], services(), PREFIX)


def test_bad_host_and_path_type_are_refused() -> None:
    with pytest.raises(ValueError, match="host"):
        ing.nginx_conf([Ingress("b", "default", (IngressRule("x;y", (P("/", "Prefix", "web", 80),)),))],
                       services(), PREFIX)
    with pytest.raises(ValueError, match="pathType"):
        ing.nginx_conf([Ingress("b", "default", (IngressRule("x.example.com", (P("/", "Regex", "web", 80),)),))],
                       services(), PREFIX)


def test_argv() -> None:
    prefix, conf = Path("/run/x/ingress"), Path("/run/x/ingress/nginx.conf")
    assert ing.nginx_argv(prefix, conf) == ["nginx", "-p", "/run/x/ingress", "-e", "stderr", "-c",
                                            "/run/x/ingress/nginx.conf", "-g", "daemon off;"]
    assert ing.reload_argv(prefix, conf) == ["nginx", "-p", "/run/x/ingress", "-e", "stderr", "-c",
                                             "/run/x/ingress/nginx.conf", "-s", "reload"]
    assert ing.check_argv(prefix, conf)[-1] == "-t"


# ------------------------------------------------------------------------------------ real nginx

@pytest.mark.parametrize("case", sorted(CASES))
def test_nginx_accepts_the_golden(case: str, tmp_path: Path) -> None:
    require_tool("nginx")
    text = (GOLDEN / f"{case}.conf").read_text().replace(str(PREFIX), str(tmp_path))
    assert text == render(case, tmp_path)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    proc = subprocess.run(ing.check_argv(tmp_path, conf), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "test is successful" in proc.stderr


# Runs inside `unshare -n`: one HTTP backend per service on its loopback "ClusterIP" (each answers with its
# name), nginx in the foreground, the requests, then nginx stopped.
_SCENARIO = r"""
import http.client, http.server, json, os, socket, subprocess, sys, threading, time
argv, listen, backends, requests, reload = (json.loads(a) for a in sys.argv[1:6])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

def handler(name):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps([name, self.path, self.headers["Host"], self.headers["X-Forwarded-For"]]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    return H

for name, (ip, port) in backends.items():
    server = http.server.HTTPServer((ip, port), handler(name))
    threading.Thread(target=server.serve_forever, daemon=True).start()
nginx = subprocess.Popen(argv)
try:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", listen), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)

    def get(host, path):
        c = http.client.HTTPConnection("127.0.0.1", listen, timeout=5)
        c.request("GET", path, headers={"Host": host})
        r = c.getresponse()
        body = r.read().decode()
        return [host, path, r.status, json.loads(body)[0] if r.status == 200 else body]

    def workers():
        found = set()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == nginx.pid:
                        found.add(int(pid))
            except (OSError, IndexError, ValueError):
                pass
        return found

    out = [get(host, path) for host, path in requests]
    if reload:  # rewrite the configuration, reload, wait until every worker of the old configuration is gone
        reload_argv, conf, text = reload
        old = workers()
        with open(conf, "w") as f:
            f.write(text)
        subprocess.run(reload_argv, check=True)
        # A wait, not a timing: nginx's workers restart slowly on a busy machine. The first answer that changed
        # is not enough: an old worker may still accept a connection until the master has told it to quit.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (get(*requests[0]) == out[0] or old & workers()):
            time.sleep(0.05)
        out = [get(host, path) for host, path in requests]
finally:
    nginx.terminate()
    nginx.wait(10)
print(json.dumps(out))
"""


def _run_nginx(case: str, tmp_path: Path, requests: list[tuple[str, str]],
               reload_to: str | None = None) -> dict[tuple[str, str], tuple[int, str]]:
    """Run `case`'s nginx and make `requests`; with `reload_to`, make them after reloading to that case."""
    require_root()
    require_tool("nginx")
    require_tool("unshare")
    listen = 18080
    conf = tmp_path / "nginx.conf"
    conf.write_text(render(case, tmp_path, listen, net="127.0.0"))
    backends = {s.name: (str(s.cluster_ip), s.ports[0].port) for s in services("127.0.0").values()
                if s.cluster_ip is not None and s.ports[0].protocol == "TCP"}
    backends["docs-admin"] = ("127.0.0.22", 81)  # docs's second port, named admin
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", _SCENARIO, json.dumps(ing.nginx_argv(tmp_path, conf)),
         json.dumps(listen), json.dumps(backends), json.dumps(requests),
         json.dumps(reload_to and [ing.reload_argv(tmp_path, conf), str(conf),
                                   render(reload_to, tmp_path, listen, net="127.0.0")])],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr + (tmp_path / "error.log").read_text()
    return {(host, path): (status, who) for host, path, status, who in json.loads(proc.stdout)}


def test_real_nginx_routes_like_ingress_v1(tmp_path: Path) -> None:
    expected = {
        ("foo.example.com", "/"): (200, "web"),
        ("foo.example.com", "/api"): (200, "api"),
        ("foo.example.com", "/api/"): (200, "api"),
        ("foo.example.com", "/api/v1/x"): (200, "api"),
        ("foo.example.com", "/apix"): (200, "web"),  # not under /api: Prefix "/" takes it
        ("foo.example.com", "/static/app.js"): (200, "docs"),  # merged from the second Ingress
        ("bar.example.com", "/exact"): (200, "web"),
        ("bar.example.com", "/exact/"): (404, "default backend - 404"),  # Exact is exact
        ("bar.example.com", "/docs"): (200, "web"),  # Exact /docs beats Prefix /docs/
        ("bar.example.com", "/docs/"): (200, "docs"),
        ("bar.example.com", "/docs/admin"): (200, "docs-admin"),  # longest prefix
        ("bar.example.com", "/docs/adminx"): (200, "docs"),
        ("bar.example.com", "/legacy/a"): (200, "api"),
        ("bar.example.com", "/sts"): (404, "default backend - 404"),  # headless backend left out
        ("bar.example.com:18080", "/exact"): (200, "web"),  # the port in Host does not matter
        ("a.shop.example.org", "/anything"): (200, "shop"),
        ("a.b.shop.example.org", "/anything"): (404, "default backend - 404"),  # one label only
        ("unknown.example.com", "/healthz"): (200, "web"),  # the host-less rule
        ("unknown.example.com", "/"): (404, "default backend - 404"),
    }
    got = _run_nginx("three-hosts-404", tmp_path, list(expected))
    assert got == expected
    log = (tmp_path / "access.log").read_text()
    assert "host=foo.example.com" in log and "upstream=127.0.0.21:8080" in log


def test_real_nginx_sends_unmatched_requests_to_the_default_backend(tmp_path: Path) -> None:
    expected = {
        ("unknown.example.com", "/"): (200, "shop"),  # shop/shop's defaultBackend: the first one given
        ("bar.example.com", "/nothing-here"): (200, "shop"),
        ("foo.example.com", "/nothing-here"): (200, "web"),  # foo has Prefix "/"
    }
    assert _run_nginx("three-hosts-default-backend", tmp_path, list(expected)) == expected


def test_real_nginx_reloads_a_rewritten_configuration(tmp_path: Path) -> None:
    expected = {("unknown.example.com", "/"): (200, "shop"), ("foo.example.com", "/api"): (200, "api")}
    assert _run_nginx("three-hosts-404", tmp_path, list(expected), reload_to="three-hosts-default-backend") == expected
