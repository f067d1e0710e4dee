"""`lab cilium NODE CMD`: the read-only commands of Cilium's debug CLI (`cilium-dbg` in the agent pod), run
against a node's pinned maps, with the same column headings so a learner can compare with a real cluster:
`service list`, `bpf lb list`, `bpf ct list global`, `endpoint list`, `bpf tunnel list`, `map list`,
`identity list`, `bpf policy get ENDPOINT`, `bpf ipcache list`, each with `--json`. Everything is read from
the kernel (the maps pinned under /sys/fs/bpf/kubenet-lab/LAB/NODE), never from the lab's own records,
except the endpoints' labels, which Cilium also takes from Kubernetes, and the identities' labels and the
policies' numbers, which the agent allocated (Cilium keeps identities in CRDs or its kvstore).
"""
from __future__ import annotations

import os
import time
import re
from collections import defaultdict
from ipaddress import IPv4Address
from typing import Any

from apiserver import state
from apiserver.desired import current_lab, model_of
from cilium import agent, identity, libbpf, maps
from cilium import policy as cilium_policy
from topo import names, netns
from topo.errors import StateError

COMMANDS = ("service list", "bpf lb list", "bpf ct list global", "endpoint list", "bpf tunnel list", "map list",
            "identity list", "bpf ipcache list", "bpf policy get ENDPOINT")
SIZES = {**maps.SIZES, **identity.SIZES}


def _dump(lab: str, node: str, name: str) -> dict[bytes, bytes]:
    path = agent.pins(lab, node) / name
    if not path.exists():
        raise StateError(f"{path} is not pinned: is lab {lab} a cilium lab, and {node} one of its nodes?")
    fd = libbpf.obj_get(str(path))
    try:
        key_size, value_size = SIZES[name] if name in SIZES else (identity.POLICY_KEY.size, identity.POLICY_ENTRY.size)
        return dict(libbpf.entries(fd, key_size, value_size))
    finally:
        os.close(fd)


def _services(lab: str, node: str) -> tuple[dict[maps.Frontend, dict[int, tuple[int, int, int, int]]],
                                             dict[int, maps.Backend]]:
    by_frontend: dict[maps.Frontend, dict[int, tuple[int, int, int, int]]] = defaultdict(dict)
    for key, value in _dump(lab, node, maps.SERVICES).items():
        fe, slot = maps.unpack_lb4_key(key)
        backend_id, count, rev, flags, _f2 = maps.LB4_SERVICE.unpack(value)
        by_frontend[fe][slot] = (backend_id, count, rev, flags)
    backends = {maps.BACKEND_KEY.unpack(k)[0]: maps.unpack_backend(v)
                for k, v in _dump(lab, node, maps.BACKENDS).items()}
    return by_frontend, backends


def slots(lab: str, node: str) -> dict[maps.Frontend, tuple[int, dict[int, maps.Backend | None]]]:
    """Each frontend of the node's service map: slot 0's backend count, and slot -> the backend it names
    (None: a slot naming a backend id the backends map does not hold). Read from the kernel only."""
    by_frontend, backends = _services(lab, node)
    return {fe: (s.get(0, (0, 0, 0, 0))[1], {n: backends.get(v[0]) for n, v in s.items() if n > 0})
            for fe, s in by_frontend.items()}


def _type(flags: int) -> str:
    kind = "NodePort" if flags & maps.SVC_FLAG_NODEPORT else "ClusterIP"
    extras = (["Local"] if flags & maps.SVC_FLAG_LOCAL else []) + (["sessionAffinity"] if flags & maps.SVC_FLAG_AFFINITY else [])
    return ", ".join([kind, *extras])


def service_list(lab: str, node: str) -> list[dict[str, Any]]:
    by_frontend, backends = _services(lab, node)
    out = []
    for fe, slots in sorted(by_frontend.items(), key=lambda kv: kv[1].get(0, (0, 0, 0, 0))[2]):
        master = slots.get(0, (0, 0, 0, 0))
        chosen = [backends.get(slots[s][0]) for s in sorted(slots) if s > 0]
        out.append({"id": master[2], "frontend": str(fe), "type": _type(master[3]),
                    "backends": [{"id": slots[s][0], "address": str(b) if b else "<missing>",
                                  "state": "active" if b else "missing"}
                                 for s, b in zip(sorted(s for s in slots if s > 0), chosen)],
                    "count": master[1]})
    return out


def lb_list(lab: str, node: str) -> list[dict[str, Any]]:
    by_frontend, backends = _services(lab, node)
    out = []
    for fe, slots in sorted(by_frontend.items()):
        for slot in sorted(slots):
            backend_id, count, rev, flags = slots[slot]
            if slot == 0:
                backend = f"0.0.0.0:0 ({rev}) (0) [{_type(flags)}]"
            else:
                be = backends.get(backend_id)
                backend = f"{be if be else '<missing backend ' + str(backend_id) + '>'} ({rev}) ({slot})"
            out.append({"service": str(fe), "backend": backend, "slot": slot, "revnat": rev, "count": count})
    return out


def tunnel_list(lab: str, node: str) -> list[dict[str, str]]:
    out = []
    for key, value in _dump(lab, node, maps.TUNNEL).items():
        prefix = IPv4Address(maps.TUNNEL_KEY.unpack(key)[0])
        endpoint = IPv4Address(maps.TUNNEL_VALUE.unpack(value)[0])
        out.append({"tunnel": f"{prefix}:0", "value": f"{endpoint}:0"})
    return sorted(out, key=lambda e: e["tunnel"])


def ct_list(lab: str, node: str) -> list[dict[str, Any]]:
    """cilium_ct4_global: the NodePort program's connections, one entry per direction (OUT: as the client
    sent it, with the backend it goes to and the SNAT address; IN: as the backend replies, with the
    frontend and client restored). `expires` is in the kernel's monotonic seconds, as Cilium prints it."""
    out = []
    now = int(time.monotonic())
    for key, value in _dump(lab, node, maps.CT).items():
        daddr, saddr, dport, sport, proto, flags = maps.CT_KEY.unpack(key)
        lifetime, na, np_, rev, sa, sp, closing, packets, nbytes = maps.CT_VALUE.unpack(value)
        nat = f"{IPv4Address(na)}:{maps.port_of(np_)}"
        snat = f"{IPv4Address(sa)}:{maps.port_of(sp)}" if sa != bytes(4) else ""
        out.append({"proto": maps.PROTOCOL_NAMES.get(proto, str(proto)),
                    "direction": "IN" if flags == maps.TUPLE_F_IN else "OUT",
                    "tuple": f"{IPv4Address(saddr)}:{maps.port_of(sport)} -> {IPv4Address(daddr)}:{maps.port_of(dport)}",
                    "nat": nat, "snat": snat, "expires": lifetime, "remaining": lifetime - now,
                    "packets": packets, "bytes": nbytes, "revnat": rev, "closing": bool(closing)})
    return sorted(out, key=lambda r: (r["direction"] == "IN", r["tuple"]))


def _enforcement(flags: int, bit: int) -> str:
    return "Enabled" if flags & bit else "Disabled"


def endpoint_list(lab_name: str, node: str) -> list[dict[str, Any]]:
    """Each pod of the node as an endpoint: its id (the lxc veth's ifindex), and from cilium_lxc (the
    kernel) its security identity and whether a policy enforces each direction."""
    st = state.resolve(lab_name)
    lab = current_lab(st)
    out = []
    with netns.rtnl_in(lab.node_netns(node)) as rt:
        links = {l.name: l.index for l in rt.links()}
    from kubelet.pods import cni_args

    endpoints = {}
    if (agent.pins(lab_name, node) / identity.LXC).exists():
        for key, value in _dump(lab_name, node, identity.LXC).items():
            ip = str(IPv4Address(identity.ENDPOINT_KEY.unpack(key)[0]))
            endpoints[ip] = identity.ENDPOINT_INFO.unpack(value)
    for pod in lab.pods:
        ps = st.pods.get(pod.key)
        if pod.node != node or ps is None:
            continue
        veth = cni_args(lab, pod.namespace, pod.name).host_ifname
        labels = [f"k8s:{k}={v}" for k, v in sorted(pod.label_map.items())] + \
                 [f"k8s:io.kubernetes.pod.namespace={pod.namespace}"]
        ep = endpoints.get(ps.ip or "")
        flags, ident = (ep[3], ep[4]) if ep else (0, 0)
        out.append({"endpoint": links.get(veth, 0), "policyIngress": _enforcement(flags, identity.EP_F_INGRESS_ENFORCED),
                    "policyEgress": _enforcement(flags, identity.EP_F_EGRESS_ENFORCED),
                    "identity": ident if ep else "-", "labels": labels, "ipv6": "", "ipv4": ps.ip, "interface": veth,
                    "pod": pod.key, "status": "ready" if ps.phase == "Running" else ps.phase.lower()})
    return sorted(out, key=lambda e: e["endpoint"])


def _allocation(lab_name: str) -> identity.Allocation:
    return cilium_policy.load_allocation(state.lab_dir(lab_name) / "cilium")


def _identity_names(lab_name: str) -> dict[int, list[str]]:
    alloc = _allocation(lab_name)
    names = {i: [label] for i, label in identity.RESERVED.items()}
    names.update({i: list(labels) for labels, i in alloc.labels.items()})
    names.update({i: [f"cidr:{net}"] for net, i in alloc.cidrs.items()})
    names[0] = ["reserved:unknown"]  # a policy key's identity 0: any peer (Cilium prints it so)
    return names


def identity_list(lab_name: str, node: str) -> list[dict[str, Any]]:
    """Every identity in use: reserved ones, one per label set of the lab's pods, one per ipBlock prefix."""
    return [{"id": i, "labels": labels} for i, labels in sorted(_identity_names(lab_name).items()) if i]


def ipcache_list(lab_name: str, node: str) -> list[dict[str, Any]]:
    names = _identity_names(lab_name)
    out = []
    for key, value in _dump(lab_name, node, identity.IPCACHE).items():
        net, ident, cidr_id, tunnel = identity.unpack_ipcache(key, value)
        out.append({"prefix": str(net), "identity": ident, "cidrIdentity": cidr_id,
                    "tunnelEndpoint": str(tunnel) if int(tunnel) else "0.0.0.0",
                    "labels": names.get(ident, [])})
    return sorted(out, key=lambda r: (IPv4Address(r["prefix"].split("/")[0]), r["prefix"]))


def policy_get(lab_name: str, node: str, endpoint: str) -> list[dict[str, Any]]:
    """An endpoint's policy map (by endpoint id, or by pod ns/name), as `cilium bpf policy get` prints it,
    with the NetworkPolicy that allowed each entry."""
    if re.fullmatch(r"[0-9]{1,5}", endpoint):
        epid = int(endpoint)
    else:
        found = [e for e in endpoint_list(lab_name, node) if endpoint in (e["pod"], e["pod"].split("/")[-1])]
        if len(found) != 1:
            what = "several endpoints match" if found else "no endpoint matches"
            raise StateError(f"{what} {endpoint!r} on {node}: give an id from `lab cilium {node} endpoint list` "
                             "or the pod as NAMESPACE/NAME")
        epid = int(found[0]["endpoint"])
    path = agent.pins(lab_name, node) / identity.policy_map_name(epid)
    if not path.exists():
        raise StateError(f"endpoint {epid} has no policy map on {node}: see `lab cilium {node} endpoint list`")
    names = _identity_names(lab_name)
    policies = {n: k for k, n in _allocation(lab_name).policies.items()}
    out = []
    for key, value in _dump(lab_name, node, path.name).items():
        k = identity.PolicyKey.unpack(key)
        _proxy, deny, _auth, pid, packets, nbytes = identity.POLICY_ENTRY.unpack(value)
        proto = "ANY" if k.prefixlen <= 40 else maps.PROTOCOL_NAMES.get(k.protocol, str(k.protocol))
        out.append({"policy": "Deny" if deny else "Allow", "direction": "Egress" if k.direction else "Ingress",
                    "identity": k.identity, "labels": names.get(k.identity, [str(k.identity)]),
                    "port": k.ports(), "proto": proto,
                    "prefix": k.prefixlen, "bytes": nbytes, "packets": packets, "policyId": pid,
                    "networkPolicy": policies.get(pid, "")})
    return sorted(out, key=lambda r: (r["direction"], r["identity"], r["proto"], r["port"]))


def map_list(lab: str, node: str) -> list[dict[str, Any]]:
    folder = agent.pins(lab, node)
    if not folder.is_dir():
        raise StateError(f"{folder} does not exist: is lab {lab} a cilium lab, and {node} one of its nodes?")
    return [{"name": p.name, "entries": len(_dump(lab, node, p.name)), "errors": 0, "cache": False}
            for p in sorted(folder.iterdir()) if p.name in SIZES or cilium_policy.POLICY_PIN.fullmatch(p.name)]


def run(lab_name: str | None, node: str, command: str) -> list[dict[str, Any]]:
    st = state.resolve(lab_name)
    lab = model_of(st)
    if lab.cni.profile != "cilium":
        raise StateError(f"lab {st.name} plays {lab.cni.profile}: its services are kernel rules, not Cilium's maps "
                         "(lab trace and lab graph show them); lab cilium reads a lab with cni.profile: cilium")
    if node not in {n.name for n in lab.nodes}:
        known = ", ".join(n.name for n in lab.nodes)
        raise StateError(f"no node {names.shown(node)} in lab {st.name} (nodes: {known})")
    words = command.split()
    if words[:3] == ["bpf", "policy", "get"] and len(words) == 4:
        return policy_get(st.name, node, words[3])
    if command not in COMMANDS:
        raise StateError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    fn = {"service list": service_list, "bpf lb list": lb_list, "bpf ct list global": ct_list,
          "endpoint list": endpoint_list, "bpf tunnel list": tunnel_list, "map list": map_list,
          "identity list": identity_list, "bpf ipcache list": ipcache_list}[command]
    return fn(st.name, node)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _short(labels: list[str]) -> list[str]:
    """An identity's labels without its namespace's (they are implied by io.kubernetes.pod.namespace)."""
    return [label for label in labels if not label.startswith("k8s:io.cilium.k8s.namespace.labels.")]


def render(command: str, rows: list[dict[str, Any]]) -> str:
    """Cilium's own headings for each command."""
    if command == "service list":
        lines = [["ID", "Frontend", "Service Type", "Backend"]]
        for r in rows:
            bes = [f"{i} => {b['address']} ({b['state']})" for i, b in enumerate(r["backends"], 1)] or [""]
            lines.append([str(r["id"]), r["frontend"], r["type"], bes[0]])
            lines += [["", "", "", b] for b in bes[1:]]
        return _table(lines)
    if command == "bpf lb list":
        return _table([["SERVICE ADDRESS", "BACKEND ADDRESS (REVNAT_ID) (SLOT)"]] +
                      [[r["service"] if r["slot"] == 0 else "", r["backend"]] for r in rows])
    if command == "bpf tunnel list":
        return _table([["TUNNEL", "VALUE"]] + [[r["tunnel"], r["value"]] for r in rows])
    if command == "bpf ct list global":
        return "\n".join(f"{r['proto']} {r['direction']} {r['tuple']} expires={r['expires']} "
                         f"({r['remaining']}s) Packets={r['packets']} Bytes={r['bytes']} RevNAT={r['revnat']} "
                         + (f"BackendAddr={r['nat']}" + (f" SNAT={r['snat']}" if r["snat"] else "")
                            if r["direction"] == "OUT" else f"Frontend={r['nat']} Client={r['snat']}")
                         + (" closing" if r["closing"] else "") for r in rows) or "(no entries)"
    if command == "identity list":
        return "\n".join(f"{str(r['id']).ljust(10)} {r['labels'][0] if r['labels'] else ''}" +
                         "".join(f"\n{'':10} {label}" for label in r["labels"][1:]) for r in [{"id": "ID", "labels": ["LABELS"]}, *rows])
    if command == "bpf ipcache list":
        return _table([["IP PREFIX/ADDRESS", "IDENTITY"]] +
                      [[r["prefix"], f"identity={r['identity']} encryptkey=0 tunnelendpoint={r['tunnelEndpoint']} "
                                     f"cidridentity={r['cidrIdentity']}"] for r in rows])
    if command.startswith("bpf policy get"):
        return _table([["POLICY", "DIRECTION", "LABELS (source:key[=value])", "PORT/PROTO", "PROXY PORT", "AUTH TYPE",
                        "BYTES", "PACKETS", "PREFIX", "NETWORKPOLICY"]] +
                      [[r["policy"], r["direction"], ", ".join(_short(r["labels"])),
                        "ANY" if r["proto"] == "ANY" else f"{r['port']}/{r['proto']}", "NONE", "disabled",
                        str(r["bytes"]), str(r["packets"]), str(r["prefix"]), r["networkPolicy"] or "-"] for r in rows])
    if command == "endpoint list":
        return _table([["ENDPOINT", "POLICY (ingress) ENFORCEMENT", "POLICY (egress) ENFORCEMENT", "IDENTITY",
                        "LABELS (source:key[=value])", "IPv6", "IPv4", "STATUS"]] +
                      [[str(r["endpoint"]), r["policyIngress"], r["policyEgress"], str(r["identity"]),
                        ", ".join(r["labels"]), r["ipv6"], r["ipv4"], r["status"]] for r in rows])
    return _table([["Name", "Num entries", "Num errors", "Cache enabled"]] +
                  [[r["name"], str(r["entries"]), str(r["errors"]), str(r["cache"]).lower()] for r in rows])
