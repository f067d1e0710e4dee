"""The ingress controller (ingress-nginx's role): an nginx.conf rendered from the lab's Ingress objects.

nginx is Debian's (`nginx-light`), run as root in the controller pod's network namespace with everything
it writes under one directory (`prefix_dir`): `nginx_argv` starts it in the foreground, `reload_argv`
makes it re-read a rewritten configuration without dropping connections (SIGHUP through its pid file).

How Ingress v1 maps to nginx here, following ingress-nginx's generated configuration:

* one `server` per host, the hosts of every Ingress merged (two Ingresses may add paths to one host; for
  the same host, path and match the first Ingress in the given order wins, as the oldest does in
  ingress-nginx); `*.example.com` becomes ingress-nginx's regex `~^(?<subdomain>[\\w-]+)\\.example\\.com$`
  (one label, as the Ingress spec says, where nginx's own `*.example.com` would match any depth), and
  exact names take precedence over it, as nginx does for exact names over regexes;
* rules without a host, the `defaultBackend`, and requests for hosts no rule names go to the catch-all
  `listen PORT default_server` server;
* pathType Exact is `location = /p`. Prefix (and ImplementationSpecific, which ingress-nginx also treats as
  a prefix) matches by path ELEMENTS: `/foo` matches `/foo`, `/foo/` and `/foo/bar` but not `/foobar`, and
  a trailing slash in the path is ignored — rendered as ingress-nginx does, `location = /foo` plus
  `location /foo/` (Prefix `/` is `location /`). An Exact and a Prefix path for the same string: Exact wins
  the exact request. Locations are written longest path first (ingress-nginx's order; nginx itself picks
  the longest matching prefix whatever the order);
* a request no path matches goes to the default backend: the first Ingress (in the given order) that has
  a `defaultBackend`, else a 404 with ingress-nginx's default backend's text, "default backend - 404";
* `proxy_pass http://<ClusterIP>:<service port>`, a named backend port resolved through the Service's
  ports. ingress-nginx proxies to the endpoint pods directly; here the Service's ClusterIP is the upstream
  (ingress-nginx's `service-upstream: "true"` annotation), so kube-proxy picks the endpoint and nginx is
  reloaded only when Ingresses change, never when pods do. Consequence: a service with no endpoints gives
  502 here (kube-proxy rejects the connection) where ingress-nginx answers 503. Backends whose Service is
  missing, headless (no ClusterIP) or lacks the port are left out with a comment saying why.

Every Ingress given is served: choosing them by `ingressClassName` is the caller's. Pure: renders text;
starting and reloading nginx is the caller's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from topo.model import Ingress, IngressBackend, Service

NGINX = "nginx"  # /usr/sbin/nginx from nginx-light
DEFAULT_404 = "default backend - 404"  # what ingress-nginx's default backend answers
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,=:@%/-]*", re.ASCII)  # no space, quote, brace, ';' or '#': no nginx quoting
_HOST = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", re.ASCII)
LOG_FORMAT = ('\'$remote_addr - [$time_local] host=$host "$request" $status $body_bytes_sent \'\n'
              '                       \'upstream=$upstream_addr upstream_status=$upstream_status '
              'request_time=$request_time\'')


@dataclass(frozen=True)
class _Location:
    match: str  # "=" (exact) or "" (prefix)
    path: str
    upstream: str
    comment: str  # where it came from: "ns/ingress: Prefix /foo -> ns/svc:port"
    implied: bool = False  # the `= /foo` of a Prefix /foo: an Exact /foo, from any Ingress, replaces it

    @property
    def order(self) -> tuple[int, str, bool]:
        """Longest Ingress path first (`= /foo` and `/foo/` of one Prefix path together, exact first)."""
        base = self.path.rstrip("/") or "/"
        return (-len(base), base, self.match != "=")

    def render(self) -> list[str]:
        return [f"# {self.comment}",
                f"location {self.match + ' ' if self.match else ''}{self.path} {{",
                f"    proxy_pass http://{self.upstream};",
                "}"]


def _backend(ingress: Ingress, backend: IngressBackend, services: dict[str, Service]) -> tuple[str | None, str]:
    """(upstream "IP:port" or None, a description of the backend and, when None, why)."""
    key = f"{ingress.namespace}/{backend.service}"
    name = f"{key}:{backend.port}"
    service = services.get(key)
    if service is None:
        return None, f"{name}: no such service"
    if service.cluster_ip is None:
        return None, f"{name}: headless service (no ClusterIP to proxy to)"
    for port in service.ports:
        if (port.name == backend.port if isinstance(backend.port, str) else port.port == backend.port):
            if port.protocol != "TCP":
                return None, f"{name}: port is {port.protocol}, HTTP needs TCP"
            return f"{service.cluster_ip}:{port.port}", name
    return None, f"{name}: the service has no such port"


def _check_path(ingress: Ingress, path: str) -> None:
    if not _SAFE_PATH.fullmatch(path):
        raise ValueError(f"ingress {ingress.key}: path {path!r} must be absolute, without spaces, quotes, "
                         "braces, ';' or '#'")


def server_name(host: str) -> str:
    """The nginx server_name for an Ingress host (a wildcard one as ingress-nginx writes it)."""
    if host.startswith("*."):
        return r"~^(?<subdomain>[\w-]+)\." + host[2:].replace(".", r"\.") + "$"
    return host


class _Server:
    def __init__(self) -> None:
        self.locations: dict[tuple[str, str], _Location] = {}
        self.left_out: list[str] = []  # comments for paths whose backend cannot be reached

    def add(self, location: _Location) -> None:
        """The first Ingress wins a location, except that an Exact path beats a Prefix one's exact half."""
        key = (location.match, location.path)
        held = self.locations.get(key)
        if held is None or (held.implied and not location.implied):
            self.locations[key] = location

    def add_path(self, ingress: Ingress, path: str, path_type: str, upstream: str | None, what: str) -> None:
        _check_path(ingress, path)
        if path_type not in ("Exact", "Prefix", "ImplementationSpecific"):
            raise ValueError(f"ingress {ingress.key}: unknown pathType {path_type!r}")
        comment = f"{ingress.key}: {path_type} {path} -> {what}"
        if upstream is None:
            self.left_out.append(f"# left out: {comment}")
        elif path_type == "Exact":
            self.add(_Location("=", path, upstream, comment))
        elif not path.rstrip("/"):  # Prefix "/": everything
            self.add(_Location("", "/", upstream, comment))
        else:  # element-wise prefix: the path itself, and anything below it
            base = path.rstrip("/")
            self.add(_Location("=", base, upstream, comment, implied=True))
            self.add(_Location("", base + "/", upstream, comment))

    def render(self, names: str, listen: str, fallback: list[str]) -> list[str]:
        lines = ["server {", f"    listen {listen};", f"    server_name {names};"]
        if self.left_out:
            lines += ["", *(f"    {line}" for line in self.left_out)]
        for location in sorted(self.locations.values(), key=lambda l: l.order):
            lines += ["", *(f"    {line}" for line in location.render())]
        if ("", "/") not in self.locations:
            lines += ["", *(f"    {line}" for line in fallback)]
        return lines + ["}"]


def _fallback(ingresses: Iterable[Ingress], services: dict[str, Service]) -> list[str]:
    """The `location /` for requests no path matches: the default backend, or ingress-nginx's 404."""
    for ingress in ingresses:
        if ingress.default_backend is not None:
            upstream, what = _backend(ingress, ingress.default_backend, services)
            if upstream is not None:
                return [f"# default backend, from {ingress.key}: {what}",
                        "location / {", f"    proxy_pass http://{upstream};", "}"]
            return [f"# default backend of {ingress.key} left out, {what}", *_not_found()]
    return ["# no Ingress has a defaultBackend", *_not_found()]


def _not_found() -> list[str]:
    return ["location / {", "    default_type text/plain;", f'    return 404 "{DEFAULT_404}";', "}"]


def nginx_conf(ingresses: Iterable[Ingress], services: dict[str, Service], prefix_dir: Path,
               listen_port: int = 80) -> str:
    """A complete nginx.conf for `ingresses`, the services keyed "namespace/name" (Service.key), every
    file nginx writes under `prefix_dir` (which must exist). Runs with `nginx_argv`."""
    ingresses = list(ingresses)
    hosts: dict[str, _Server] = {}
    default = _Server()
    for ingress in ingresses:
        for rule in ingress.rules:
            if rule.host is not None:
                host = rule.host.lower()
                if not _HOST.fullmatch(host):
                    raise ValueError(f"ingress {ingress.key}: invalid host {rule.host!r}")
                server = hosts.setdefault(host, _Server())
            else:
                server = default
            for p in rule.paths:
                upstream, what = _backend(ingress, p.backend, services)
                server.add_path(ingress, p.path, p.path_type, upstream, what)
    fallback = _fallback(ingresses, services)
    p = prefix_dir
    lines = [
        "# kubenet-lab ingress controller (the ingress-nginx role): generated by services/ingress.py",
        f"# run: nginx -p {p} -c CONF -g 'daemon off;'",
        "# workers as root too: they write the temp files under the lab's (root-only) directory",
        "user root;",
        "worker_processes 1;",
        f"pid {p / 'nginx.pid'};",
        f"lock_file {p / 'nginx.lock'};",
        f"error_log {p / 'error.log'} notice;",
        "",
        "events {",
        "    worker_connections 1024;",
        "}",
        "",
        "http {",
        f"    log_format ingress {LOG_FORMAT};",
        f"    access_log {p / 'access.log'} ingress;",
        f"    client_body_temp_path {p / 'client_body_temp'};",
        f"    proxy_temp_path {p / 'proxy_temp'};",
        f"    fastcgi_temp_path {p / 'fastcgi_temp'};",
        f"    uwsgi_temp_path {p / 'uwsgi_temp'};",
        f"    scgi_temp_path {p / 'scgi_temp'};",
        "    server_names_hash_bucket_size 128;",
        "    default_type application/octet-stream;",
        "",
        "    # inherited by every location below (none sets its own)",
        "    proxy_http_version 1.1;",
        "    proxy_connect_timeout 5s;",
        "    proxy_set_header Host $host;",
        "    proxy_set_header X-Real-IP $remote_addr;",
        "    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "    proxy_set_header X-Forwarded-Host $host;",
        "    proxy_set_header X-Forwarded-Proto $scheme;",
        "",
        "    # catch-all: rules without a host, hosts no rule names, the default backend",
        *(f"    {line}" if line else "" for line in default.render("_", f"{listen_port} default_server", fallback)),
    ]
    for host in sorted(hosts):
        lines += ["", f"    # host {host}",
                  *(f"    {line}" if line else "" for line in
                    hosts[host].render(server_name(host), str(listen_port), fallback))]
    lines.append("}")
    return "".join(f"{line}\n" for line in lines)


def nginx_argv(prefix_dir: Path, conf: Path) -> list[str]:
    """Start nginx in the foreground (the lab owns the master process; `daemon off;` is given here, so
    the configuration must not set it). `-e stderr`: errors before the configuration is read go to the
    caller, not to a compiled-in log path under /var."""
    return [NGINX, "-p", str(prefix_dir), "-e", "stderr", "-c", str(conf), "-g", "daemon off;"]


def reload_argv(prefix_dir: Path, conf: Path) -> list[str]:
    """Make the running nginx re-read `conf` (SIGHUP to the pid in `prefix_dir`/nginx.pid): new workers
    take the new configuration, old ones finish their requests."""
    return [NGINX, "-p", str(prefix_dir), "-e", "stderr", "-c", str(conf), "-s", "reload"]


def check_argv(prefix_dir: Path, conf: Path) -> list[str]:
    """`nginx -t`: parse and check the configuration (opening its log files), start nothing."""
    return [NGINX, "-p", str(prefix_dir), "-e", "stderr", "-c", str(conf), "-t"]
