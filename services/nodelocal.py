"""NodeLocal DNSCache (`spec.dns.nodeLocal: true`): a caching DNS server in every node, as data and text.

What the Kubernetes addon does, and what the lab does in its place (the conventions are the addon's; the
server is dnsmasq, as for the cluster DNS, see services/dns.py):

* the cache listens on the link-local address 169.254.20.10 in the node's own network namespace (the
  addon puts it on a dummy interface, `nodelocaldns`; this kernel has no dummy devices, so the address is
  a /32 on the node's `lo`, which the node answers for on any interface all the same);
* pods' resolv.conf name it as their only nameserver (kubelet's --cluster-dns=169.254.20.10, the setup
  the addon documents for kube-proxy in IPVS mode; in iptables mode the addon can also take over the
  kube-dns ClusterIP, which the lab does not do), so a pod's queries never leave its node on a cache hit;
* misses are forwarded to the cluster DNS at the kube-dns ClusterIP (the addon uses a second Service,
  kube-dns-upstream, with the same endpoints; the lab's one Service is enough);
* the addon's cache keeps answers for at most 30 s and denials for 5 s; the cluster DNS here answers with
  TTL 0 (nothing is cached anywhere else), so the cache here keeps every answer for 30 s (`min-cache-ttl`)
  and every denial (NXDOMAIN, NODATA) for 5 s (`neg-ttl`): a repeated lookup within those times is a
  cache hit, answered from the node;
* NOTRACK: the addon installs raw-table rules so that traffic to and from the cache's address on port 53
  skips conntrack: no conntrack entry per query (the table cannot fill up, and the A/AAAA insert race of
  Kubernetes issue 56903 cannot happen between the pod and the cache). `notrack_rules` writes them in a
  chain of the lab's own, jumped to from raw PREROUTING and OUTPUT. The addon's filter-table ACCEPT rules
  are left out: a lab node's INPUT and OUTPUT policies accept.

Pure: nothing here touches the kernel (reconcile/nodelocal.py does).
"""
from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

LOCAL_IP = IPv4Address("169.254.20.10")  # the addon's documented default link-local address
CHAIN = "KUBENET-NODELOCALDNS"
CACHE_SIZE = 10_000  # entries, like the addon's `cache 30` of 9984 success + denial entries
SUCCESS_TTL = 30  # seconds an answer is kept
DENIAL_TTL = 5  # seconds a denial (NXDOMAIN or NODATA) is kept
COMMENT = "NodeLocal DNSCache: its traffic skips conntrack"


def conf(cluster_dns: IPv4Address, log_file: Path, port: int = 53) -> str:
    """The node cache's dnsmasq.conf: bound to 169.254.20.10 only, caching, forwarding to the cluster DNS."""
    lines = [
        "# kubenet-lab NodeLocal DNSCache (node-local-dns role): dnsmasq, see services/nodelocal.py",
        f"port={port}",
        f"listen-address={LOCAL_IP}",
        "bind-interfaces",
        "no-resolv",
        "no-hosts",
        f"server={cluster_dns}",
        f"cache-size={CACHE_SIZE}",
        f"min-cache-ttl={SUCCESS_TTL}",
        f"neg-ttl={DENIAL_TTL}",
        "# one line per query (query[TYPE] NAME from SOURCE), and `cached NAME is ...` for each hit",
        "log-queries",
        f"log-facility={log_file}",
    ]
    return "".join(f"{line}\n" for line in lines)


def notrack_rules() -> str:
    """iptables-restore --noflush input: the lab's NOTRACK chain in the raw table, rewritten whole (a chain
    declared in --noflush input is flushed first). The jumps to it from PREROUTING and OUTPUT are added
    separately, once (`jumps`): --noflush would append them again on every load."""
    rules = []
    for proto in ("udp", "tcp"):
        rules.append(f"-A {CHAIN} -d {LOCAL_IP}/32 -p {proto} -m {proto} --dport 53 "
                     f"-m comment --comment \"{COMMENT}\" -j NOTRACK")
        rules.append(f"-A {CHAIN} -s {LOCAL_IP}/32 -p {proto} -m {proto} --sport 53 "
                     f"-m comment --comment \"{COMMENT}\" -j NOTRACK")
    return "\n".join(["*raw", f":{CHAIN} - [0:0]", *rules, "COMMIT", ""])


def jumps() -> list[list[str]]:
    """The rules (iptables arguments after -t raw -C/-A) that send PREROUTING and OUTPUT through CHAIN."""
    return [[chain, "-j", CHAIN] for chain in ("PREROUTING", "OUTPUT")]


def argv(conf_path: Path) -> list[str]:
    """dnsmasq in the foreground, as root, with no pid file (see services/dns.py `dnsmasq_argv`)."""
    return ["dnsmasq", "--keep-in-foreground", f"--conf-file={conf_path}", "--user=root", "--pid-file"]
