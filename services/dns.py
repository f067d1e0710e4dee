"""The cluster DNS (kube-dns / CoreDNS's role) and kubelet's per-pod resolv.conf, as data and text.

What a pod's /etc/resolv.conf holds is kubelet's decision (pkg/kubelet/network/dns/dns.go, GetPodDNS), the
text is the container runtime's (containerd writes `search`, then one `nameserver` line per server, then
`options`, each line only when it has something; when all three are empty it copies the node's own
/etc/resolv.conf instead). `resolv_conf` reproduces both for the lab's pods.

The cluster DNS itself is dnsmasq (Debian's `dnsmasq-base`), not CoreDNS, because:

* it is a real DNS server from a distribution package, already installed by ./install.sh, tiny, and runs
  in the foreground from one configuration file with no daemon setup, so it is one more process in the
  DNS pod's network namespace;
* `log-queries` logs every query with the address it came from ("query[A] NAME from 10.244.1.2"), so a
  lab can show and count exactly which names a pod's resolver tried (the ndots:5 search-path walk);
* `cache-size=0` turns its cache off: every lookup is answered from the records or forwarded, so the
  upstream's log counts exactly too.

What differs from CoreDNS's `kubernetes` plugin, on purpose and documented for the labs:

* no `autopath`: the client walks its search path itself, as with CoreDNS's default Corefile;
* names in the cluster domain that do not exist are NXDOMAIN from here and never forwarded (`local=`),
  like CoreDNS; AAAA for an existing name is an empty answer (NOERROR, no records) — there is no IPv6;
* records, following the Kubernetes DNS-Based Service Discovery specification, schema version 1.1.0
  (kubernetes/dns docs/specification.md; the section of each rule is named in `records`):
  `dns-version.<domain>` TXT "1.1.0" (2.2); `<svc>.<ns>.svc.<domain>` A -> ClusterIP (2.3.1); a headless
  service (`clusterIP: None`) gets one A per ready endpoint pod (2.4.1), and each endpoint its own name:
  `<hostname>.<svc>.<ns>.svc.<domain>` when the pod sets `hostname` and its `subdomain` is the service's name
  (the EndpointSlice controller's rule, 2.4.1), else CoreDNS's `<a-b-c-d>.<svc>.<ns>.svc.<domain>` (the pod
  IP dashed); SRV `_<port>._<proto>.<svc>.<ns>.svc.<domain>` for every NAMED port (ClusterIP: one record,
  target the service name, the service port, weight 100 (2.3.2); headless: one per ready endpoint, target
  its endpoint name, the endpoint's port, weight 100/N as CoreDNS spreads it (2.4.2)); PTR of a ClusterIP ->
  the service (2.3.3) and of an endpoint -> its endpoint name (2.4.3); ExternalName services a CNAME to
  their externalName (2.5); pod records `<a-b-c-d>.<ns>.pod.<domain>` A for every running pod (2.6,
  deprecated but still required; the pod must exist with that IP, as CoreDNS's `pods verified`). No wildcard
  queries (2.7, deprecated and optional). dnsmasq derives PTR answers from the hosts file, the first line
  of an address naming it, so `hosts_lines` writes each address's PTR name first; a pod that is no
  endpoint of a headless service answers PTR with its pod record;
* TTL 0 (dnsmasq's `local-ttl` default) instead of CoreDNS's 30 s: nothing is cached anywhere.

dnsmasq re-reads its `addn-hosts` file on SIGHUP but NOT its configuration, where `srv-host` lines live:
`reload_action` says whether a change of records needs a SIGHUP or a restart.

The external "upstream" DNS server (an ExternalHost serving `dns`) is dnsmasq too, authoritative for the
external names (`upstream_conf`).

Running it (`dnsmasq_argv`): as root in the pod's namespace, `dnsmasq --keep-in-foreground
--conf-file=CONF --user=root --pid-file` — foreground so the lab owns the process; `--user=root` because
by default dnsmasq drops to `nobody` after startup and then could not re-read the hosts file (SIGHUP) or
reopen the log file (SIGUSR2) under a root-only lab directory; an empty `--pid-file` because its default
pid file, /run/dnsmasq.pid, is shared by every namespace of the machine (network namespaces do not
separate the file system). It binds the wildcard address (neither `bind-interfaces` nor `bind-dynamic`):
the namespace is the DNS pod's alone, and dnsmasq answers from the address each query was sent to
(IP_PKTINFO), so a query the kube-dns Service DNATed to the pod IP is answered from the pod IP and conntrack
translates the reply back to the ClusterIP. No `interface=`/`listen-address=` means no `local-service`
restriction either (that applies only when a distribution's init script passes it): queries from pods of
other nodes, whose addresses are not on the DNS pod's subnet, are answered.

Pure: nothing here touches the kernel or starts a process.
"""
from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from operator import itemgetter
from pathlib import Path
from typing import Iterable, NamedTuple

from services.endpoints import RunningPod, ServicePortEndpoints, target_port
from topo.model import ExternalHost, Pod, Service

# The schema version of the Kubernetes DNS specification these records implement (spec 2.2: answered as
# the TXT record dns-version.<zone>; `lab dns-count` and docs/dns-and-ingress.md name it too).
DNS_SCHEMA_VERSION = "1.1.0"

# kubelet's limits (pkg/apis/core/validation: MaxDNSNameservers; the ExpandedDNSConfig limits, GA since
# Kubernetes 1.28: 32 search domains, 2048 characters in the search line; a single search domain longer
# than 253 characters, DNS1123SubdomainMaxLength, is dropped because glibc 2.28 aborts on it).
MAX_NAMESERVERS = 3
MAX_SEARCH_PATHS = 32
MAX_SEARCH_CHARS = 2048
MAX_SEARCH_DOMAIN = 253
DEFAULT_OPTIONS = ("ndots:5",)  # kubelet's defaultDNSOptions for ClusterFirst
CLUSTER_FIRST = ("ClusterFirst", "ClusterFirstWithHostNet")  # pods here are never hostNetwork
DNS_POLICIES = (*CLUSTER_FIRST, "Default", "None")
DNSMASQ = "dnsmasq"  # /usr/sbin/dnsmasq from dnsmasq-base


def cluster_dns_ip(service_cidr: IPv4Network) -> IPv4Address:
    """The kube-dns Service's ClusterIP: the service CIDR's network address + 10 (10.96.0.10), the
    address kubeadm and every distribution give it and kubelet's --cluster-dns points at."""
    return service_cidr.network_address + 10


# --- kubelet: a pod's resolv.conf ------------------------------------------------------------------

def _dedup(items: Iterable[str]) -> list[str]:
    """kubelet's omitDuplicates: first occurrence wins, order kept."""
    seen: set[str] = set()
    out = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _merge_options(existing: Iterable[str], given: Iterable[tuple[str, str | None]]) -> list[str]:
    """kubelet's mergeDNSOptions: options keyed by name (`ndots:5` is ndots -> 5), the pod's dnsConfig
    overriding. kubelet collects them in a Go map, so the order it writes them in is unspecified (it
    varies between pods); here it is the first appearance of each name, so the output is deterministic."""
    merged: dict[str, str] = {}
    for option in existing:
        name, _, value = option.partition(":")
        merged[name] = value
    for name, value in given:
        merged[name] = value or ""
    return [f"{name}:{value}" if value else name for name, value in merged.items()]


def _fit_searches(searches: list[str]) -> list[str]:
    """kubelet's formDNSSearchFitsLimits: at most 32 domains, none over 253 characters, and the joined
    line at most 2048 characters (domains dropped from the end until it fits)."""
    searches = [s for s in searches[:MAX_SEARCH_PATHS] if len(s) <= MAX_SEARCH_DOMAIN]
    while searches and len(" ".join(searches)) > MAX_SEARCH_CHARS:
        searches.pop()
    return searches


def resolv_conf(pod: Pod, cluster_dns: IPv4Address, domain: str, upstream: IPv4Address | None,
                host_search: Iterable[str] = ()) -> str:
    """The /etc/resolv.conf kubelet (and containerd) gives `pod`.

    ClusterFirst (and ClusterFirstWithHostNet): the cluster DNS only (`cluster_dns`: the kube-dns
    ClusterIP, or NodeLocal DNSCache's 169.254.20.10 when kubelet's --cluster-dns names it), search
    `<ns>.svc.<domain> svc.<domain> <domain>` followed by the node's own search domains (`host_search`,
    what the node's /etc/resolv.conf says: spec.nodes[].dnsSearch or spec.dns.nodeSearch; a cloud node has
    one, e.g. us-west-2.compute.internal), options `ndots:5` (the node's options are NOT kept). Default:
    the node's resolver as is — in the lab a node's resolv.conf is its search line and `nameserver
    <upstream>` when the lab has an external DNS host.
    None: nothing but dnsConfig. Then dnsConfig is appended: nameservers and searches after the base ones
    without duplicates, options merged by name with dnsConfig winning; then the limits are applied (3
    nameservers, kubelet's search limits)."""
    if pod.dns_policy not in DNS_POLICIES:
        raise ValueError(f"pod {pod.key}: unknown dnsPolicy {pod.dns_policy!r} (one of {', '.join(DNS_POLICIES)})")
    if pod.dns_policy in CLUSTER_FIRST:
        servers = [str(cluster_dns)]
        # kubelet's generateSearchesForDNSClusterFirst: the cluster's three, then the host's, no duplicates
        searches = _dedup([f"{pod.namespace}.svc.{domain}", f"svc.{domain}", domain, *host_search])
        options = list(DEFAULT_OPTIONS)
    elif pod.dns_policy == "Default":
        servers = [str(upstream)] if upstream is not None else []
        searches, options = _dedup(host_search), []
    else:  # None
        servers, searches, options = [], [], []
    config = pod.dns_config
    if config is not None:
        servers = _dedup([*servers, *config.nameservers])
        searches = _dedup([*searches, *config.searches])
        options = _merge_options(options, config.options)
    servers = servers[:MAX_NAMESERVERS]
    searches = _fit_searches(searches)
    text = ""
    if searches:
        text += f"search {' '.join(searches)}\n"
    for server in servers:
        text += f"nameserver {server}\n"
    if options:
        text += f"options {' '.join(options)}\n"
    if not text:
        # containerd copies the node's resolv.conf when kubelet gives it nothing. A lab node without an
        # external DNS host has no resolver, so its resolv.conf is empty: glibc then asks 127.0.0.1 in the
        # pod's own namespace, where nothing listens, and every lookup fails at once — as on a node with
        # no DNS. (Only dnsPolicy Default can get here: the API server refuses None without nameservers.)
        text = "# no nameserver: the node has no resolver (the lab has no external DNS host)\n"
    return text


# --- the cluster DNS's records ---------------------------------------------------------------------

class Srv(NamedTuple):
    """One SRV record: `name` -> `target`:`port` (dnsmasq's `srv-host=name,target,port,priority,weight`)."""

    name: str
    target: str
    port: int
    priority: int = 0
    weight: int = 100


@dataclass(frozen=True)
class Records:
    """Everything the cluster DNS answers, sorted, so two Records compare equal exactly when the DNS
    would answer the same (the apply step compares them to decide whether to reload)."""

    a: tuple[tuple[str, IPv4Address], ...] = ()  # (name, address); a headless name appears once per pod
    srv: tuple[Srv, ...] = ()
    ptr: tuple[tuple[IPv4Address, str], ...] = ()  # (address, the name its PTR answers), where it matters
    cname: tuple[tuple[str, str], ...] = ()  # (alias, target): ExternalName services

    def target(self, name: str) -> str | None:
        """The CNAME target of `name`, if it is an alias."""
        name = name.rstrip(".").lower()
        return next((t for n, t in self.cname if n == name), None)

    def lookup(self, name: str) -> list[IPv4Address]:
        """The A answers for `name` (without the trailing dot), in hosts-file order."""
        name = name.rstrip(".").lower()
        return [ip for n, ip in self.a if n == name]

    @property
    def hosts_lines(self) -> tuple[str, ...]:
        """`IP NAME` lines, each address's PTR name first (dnsmasq answers PTR with an address's first name)."""
        first = {(name, ip) for ip, name in self.ptr}
        named = {name for _, name in self.ptr}  # by name first: hashing (name, ip) runs IPv4Address.__hash__
        text = str  # not f"{ip}": IPv4Address.__format__ costs twice str() (10,000 pod records each change)
        return (tuple(f"{text(ip)} {name}" for ip, name in self.ptr)
                + tuple(f"{text(ip)} {name}" for name, ip in self.a if name not in named or (name, ip) not in first))


def service_fqdn(service: Service, domain: str) -> str:
    return f"{service.name}.{service.namespace}.svc.{domain}"


def dashed(ip: IPv4Address) -> str:
    """CoreDNS's default hostname of an endpoint without one: its IP with dashes (10-244-1-2)."""
    return str(ip).replace(".", "-")


def endpoint_hostname(service: Service, pod: Pod, ip: IPv4Address) -> str:
    """An endpoint's hostname: the pod's `hostname` when its `subdomain` names this service in its own
    namespace (what the EndpointSlice controller copies into the endpoint; DNS spec 2.4.1 names the record
    after it), else CoreDNS's dashed IP."""
    if pod.hostname and pod.subdomain == service.name and pod.namespace == service.namespace:
        return pod.hostname
    return dashed(ip)


def _headless_members(service: Service, running: list[RunningPod]) -> list[RunningPod]:
    """The ready pods the service selects, as its EndpointSlices would list them (by IP)."""
    return sorted((rp for rp in running if rp.ready and rp.pod.namespace == service.namespace
                   and service.selects(rp.pod.label_map)), key=lambda rp: int(rp.ip))


def records(services: Iterable[Service], sps: list[ServicePortEndpoints], running: list[RunningPod],
            domain: str) -> Records:
    """The cluster DNS's records for `services`.

    A ClusterIP service's records do not depend on its endpoints (CoreDNS answers its name even with no
    endpoint), so `sps` (what kube-proxy programs, from `endpoints.resolve`) is not needed for them;
    headless services have no entry there at all (no virtual IP), so their endpoints are taken from
    `running` the way the EndpointSlice controller would: ready pods in the namespace matching the
    selector. `sps` is accepted so callers pass what they hold; it is only used to check that every
    ClusterIP service port it mentions is among `services`."""
    services = sorted(services, key=lambda s: (s.namespace, s.name))
    known = {(s.key, p.name, p.port) for s in services for p in s.ports}
    for sp in sps:
        if (sp.service.key, sp.port.name, sp.port.port) not in known:
            raise ValueError(f"records: {sp.name} is not among the services given")
    a: set[tuple[str, IPv4Address]] = set()
    srv: set[Srv] = set()
    ptr: dict[IPv4Address, str] = {}
    cname: set[tuple[str, str]] = set()
    for service in services:
        fqdn = service_fqdn(service, domain)
        if service.external_name is not None:  # 2.5: a CNAME, and nothing else (no A, no SRV)
            cname.add((fqdn, service.external_name.rstrip(".").lower()))
            continue
        if service.cluster_ip is not None:  # 2.3.1 A, 2.3.2 SRV, 2.3.3 PTR
            a.add((fqdn, service.cluster_ip))
            for port in service.ports:
                if port.name:
                    srv.add(Srv(f"_{port.name}._{port.protocol.lower()}.{fqdn}", fqdn, port.port))
            continue
        members = _headless_members(service, running)  # 2.4.1 A per ready endpoint, named by its hostname
        for rp in members:
            name = f"{endpoint_hostname(service, rp.pod, rp.ip)}.{fqdn}"
            a.add((fqdn, rp.ip))
            a.add((name, rp.ip))
            # 2.4.3 PTR -> the endpoint's name; a pod behind several headless services: a named one first
            if rp.ip not in ptr or (name.split(".")[0] != dashed(rp.ip) and ptr[rp.ip].split(".")[0] == dashed(rp.ip)):
                ptr[rp.ip] = name
        for port in service.ports:  # 2.4.2 SRV per ready endpoint
            if not port.name:
                continue
            targets = [(rp, target_port(rp.pod, port)) for rp in members]
            targets = [(rp, number) for rp, number in targets if number is not None]
            for rp, number in targets:
                srv.add(Srv(f"_{port.name}._{port.protocol.lower()}.{fqdn}",
                            f"{endpoint_hostname(service, rp.pod, rp.ip)}.{fqdn}",
                            number, 0, max(1, 100 // len(targets))))  # CoreDNS: floor(100/N), at least 1
    suffix = f".pod.{domain}"
    pods = {f"{str(rp.ip).replace('.', '-')}.{rp.pod.namespace}{suffix}": rp.ip  # dashed(), inline
            for rp in running}  # 2.6 pod records: every pod that exists with that address in that namespace
    # A pod record's name is its own (its address and namespace), and no other record's ends in .pod., so
    # they sort by name alone and merge into the rest: with 10,000 pods, 10-15 ms less of each change than
    # one sort of them all by (name, address).
    merged = heapq.merge(sorted(a, key=lambda r: (r[0], int(r[1]))), sorted(pods.items()), key=itemgetter(0))
    return Records(tuple(merged),
                   tuple(sorted(srv, key=lambda s: (s.name, s.target, s.port))),
                   tuple(sorted(ptr.items(), key=lambda r: int(r[0]))), tuple(sorted(cname)))


def reload_action(old: Records | None, new: Records) -> str:
    """What a running cluster DNS needs after its records changed from `old` to `new`: "none", "hup"
    (rewrite the hosts file, then SIGHUP: dnsmasq re-reads `addn-hosts`) or "restart" (the SRV records
    live in the configuration file, which dnsmasq reads only at startup)."""
    if old == new:
        return "none"
    if old is None or old.srv != new.srv or old.cname != new.cname:
        return "restart"
    return "hup"


# --- dnsmasq configuration -------------------------------------------------------------------------

def hosts_file(recs: Records) -> str:
    """The `addn-hosts` file: one `IP NAME` line per A record (a headless name on several lines: dnsmasq
    answers with every address)."""
    return "".join(f"{line}\n" for line in recs.hosts_lines)


def _common(log_file: Path, port: int) -> list[str]:
    return [
        f"port={port}",
        "# upstreams only from server= lines, never the machine's /etc/resolv.conf; not its /etc/hosts",
        "no-resolv",
        "no-hosts",
        "# no cache: every lookup is answered afresh, and every forwarded one reaches (and is logged by) the upstream",
        "cache-size=0",
        "# one line per query: query[TYPE] NAME from SOURCE-IP",
        "log-queries",
        f"log-facility={log_file}",
    ]


def dnsmasq_conf(recs: Records, upstream: IPv4Address | None, domain: str, log_file: Path, hosts_file: Path,
                 *, port: int = 53) -> str:
    """The cluster DNS pod's dnsmasq.conf (run with `dnsmasq_argv`).

    Names under `domain` are answered from the hosts file and the srv-host lines only (`local=`: a name
    that does not exist is NXDOMAIN, never forwarded); everything else goes to `upstream`, or, when the
    lab has no external DNS host, is NXDOMAIN too (`address=/#/`: the cluster DNS knows no other names;
    without it dnsmasq would answer REFUSED, which glibc treats as a server failure and retries)."""
    lines = [f"# kubenet-lab cluster DNS (the CoreDNS role) for {domain}: dnsmasq, see services/dns.py",
             *_common(log_file, port),
             f"addn-hosts={hosts_file}",
             f"local=/{domain}/"]
    if upstream is not None:
        lines.append(f"server={upstream}")
    else:
        lines += ["# no upstream in this lab: every other name is NXDOMAIN", "address=/#/"]
    lines += ["# Kubernetes DNS specification 2.2: the schema version these records follow",
              f'txt-record=dns-version.{domain},"{DNS_SCHEMA_VERSION}"']
    for s in recs.srv:
        lines.append(f"srv-host={s.name},{s.target},{s.port},{s.priority},{s.weight}")
    for alias, target in recs.cname:  # 2.5 ExternalName (dnsmasq 2.90 answers a CNAME to any target name)
        lines.append(f"cname={alias},{target}")
    return "".join(f"{line}\n" for line in lines)


def upstream_conf(hosts: Iterable[ExternalHost], log_file: Path, *, port: int = 53) -> str:
    """The external DNS host's dnsmasq.conf: authoritative for the external hosts' `names` (one
    `host-record` each: A and PTR, exact name only) and NXDOMAIN for anything else (`address=/#/`; with no
    server dnsmasq would answer REFUSED, which glibc treats as a broken server, not as "no such name")."""
    lines = ["# kubenet-lab external DNS: authoritative for the lab's external names, see services/dns.py",
             *_common(log_file, port),
             "# every name not below is NXDOMAIN: nothing is forwarded",
             "address=/#/"]
    for host in sorted(hosts, key=lambda h: h.name):
        for name in host.names:
            lines.append(f"host-record={name.rstrip('.').lower()},{host.ip}")
    return "".join(f"{line}\n" for line in lines)


def dnsmasq_argv(conf_path: Path) -> list[str]:
    """The command that runs dnsmasq with `conf_path`, as root inside a namespace (see the module
    docstring for each flag)."""
    return [DNSMASQ, "--keep-in-foreground", f"--conf-file={conf_path}", "--user=root", "--pid-file"]


def check_argv(conf_path: Path) -> list[str]:
    """`dnsmasq --test`: parse the configuration and exit (0 when it is valid)."""
    return [DNSMASQ, "--test", f"--conf-file={conf_path}"]


# --- dnsmasq's query log ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Query:
    qtype: str  # A, AAAA, SRV, PTR, ... (dnsmasq prints type numbers it has no name for as type=N)
    name: str
    source: str  # the asking address, as logged (an IPv4 address in the lab)


_QUERY = re.compile(r"\bquery\[(?P<qtype>[^\]]+)\] (?P<name>\S+) from (?P<source>\S+)$")


def parse_log(text: str) -> list[Query]:
    """The queries in a dnsmasq log, in order: one per `query[TYPE] NAME from SOURCE` line (with or
    without syslog's timestamp, with or without `log-queries=extra`'s serial and source port); the
    forwarded/reply/config/cached lines that follow each query are not queries and are skipped."""
    out = []
    for line in text.splitlines():
        match = _QUERY.search(line.rstrip())
        if match:
            out.append(Query(match["qtype"], match["name"], match["source"]))
    return out
