"""`lab graph`'s pictures: a `Graph` (observe/graph.py) as text for a terminal, or as Graphviz DOT, SVG or PNG.

Rendering only: every status and note was decided when the graph was built, so these functions draw what
they are given and can be tested from hand-made graphs.
"""
from __future__ import annotations

import html
from pathlib import Path

from observe.graph import DOWN, EXTRA, MISSING, OK, WRONG, Graph, NodeBox, ServiceBox
from routing import vxlan


# ------------------------------------------------------------------------------------------- text

MARK = {OK: "✓", MISSING: "✗", DOWN: "✗", WRONG: "!", EXTRA: "?"}
ANSI = {OK: "\033[32m", MISSING: "\033[31m", DOWN: "\033[31m", WRONG: "\033[33m", EXTRA: "\033[33m"}


def to_text(graph: Graph, color: bool = False) -> str:
    """A terminal drawing: the underlay as the trunk, nodes with their bridge, pods and routes as branches."""

    def mark(status: str) -> str:
        sym = MARK.get(status, "?")
        return f"{ANSI[status]}{sym}\033[0m" if color and status in ANSI else sym

    def note(status: str, text: str) -> str:
        if status == OK or not text:
            return ""
        shown = f"  <- {text.upper() if status in (MISSING, DOWN) else text}"
        return f"{ANSI[status]}{shown}\033[0m" if color else shown

    mode = f" ({graph.ipip_mode})" if graph.ipip_mode else ""
    lines = [f"lab {graph.lab}: backend {graph.backend}{mode}, kube-proxy {graph.kube_proxy}, "
             f"pods {graph.pod_cidr}, services {graph.service_cidr}"]
    for seg in graph.segments:
        lines.append(f"{mark(seg.status)} underlay switch {seg.name}  {seg.subnet}{note(seg.status, seg.note)}")
        members = [a for a in graph.attachments if a.segment == seg.name]
        for i, att in enumerate(members):
            last = i == len(members) - 1
            branch, stem = ("└─", "   ") if last else ("├─", "│  ")
            node = next((n for n in graph.nodes if n.name == att.host), None)
            host = next((h for h in graph.routers + graph.external if h.name == att.host), None)
            link = f"{att.port} ── {att.intf}"
            if node is not None:
                lines.append(f"{branch} {link}  {mark(node.status)} node {node.name}  {node.eth0.address}  "
                             f"PodCIDR {node.pod_cidr}{note(node.status, node.note)}"
                             f"{note(att.status, att.note)}")
                lines.extend(stem + row for row in _node_rows(node, mark, note))
            elif host is not None:
                what = "router" if host.kind == "router" else "external host"
                lines.append(f"{branch} {link}  {mark(host.status)} {what} {host.name}  {', '.join(host.ips)}"
                             f"{'  (' + host.detail + ')' if host.detail else ''}{note(host.status, host.note)}"
                             f"{note(att.status, att.note)}")
    p2p = [a for a in graph.attachments if a.segment is None]
    if p2p:
        lines.append("point-to-point links")
        lines += [f"  {mark(a.status)} {a.host} {a.intf} {a.address} ── {a.peer} {a.peer_intf} {a.peer_address}"
                  f"{note(a.status, a.note)}" for a in p2p]
    if graph.sessions:
        lines.append("BGP sessions")
        for s in graph.sessions:
            kind = "iBGP" if s.ibgp else "eBGP"
            state = "Established" if s.status == OK else " / ".join(f"{k}: {v}" for k, v in s.states.items())
            lines.append(f"  {mark(s.status)} {s.a} ── {s.b}  {kind} {state}")
    if graph.services:
        lines.append("services (kube-proxy " + graph.kube_proxy + ", on every node)")
        for svc in graph.services:
            np = f" NodePort {svc.node_port}" if svc.node_port else ""
            role = "  [cluster DNS]" if svc.role == "dns" else ""
            lines.append(f"  {mark(svc.status)} {svc.namespace}/{svc.name}  {svc.cluster_ip}:{svc.port}/"
                         f"{svc.protocol}{np}{role}{note(svc.status, svc.note)}")
            for ep in svc.endpoints:
                pod = f" ({ep.pod.split('/', 1)[-1]} on {ep.node})" if ep.pod else ""
                lines.append(f"      -> {mark(ep.status)} {ep.address}{pod}{note(ep.status, ep.note)}")
    if graph.problems:
        lines.append(f"{len(graph.problems)} problem{'s' if len(graph.problems) != 1 else ''}:")
        lines += [f"  {mark(MISSING)} {p}" for p in graph.problems]
    else:
        lines.append("everything the spec expects is in the kernel")
    return "\n".join(lines)


def _node_rows(node: NodeBox, mark, note) -> list[str]:
    rows = [f"├─ {mark(node.cni0.status)} {node.cni0.name} {node.cni0.detail or 'bridge'}  {node.cni0.address}{note(node.cni0.status, node.cni0.note)}"]
    for i, pod in enumerate(node.pods):
        branch = "└─" if i == len(node.pods) - 1 else "├─"
        role = "  [cluster DNS]" if pod.role == "dns" else ""
        rows.append(f"│  {branch} {pod.veth} ── {mark(pod.status)} pod {pod.key}  {pod.ip}{role}"
                    f"{note(pod.status, pod.note)}")
    if node.tunnel is not None:
        t = node.tunnel
        rows.append(f"├─ {mark(t.status)} {t.name}  {t.address}  {t.detail}{note(t.status, t.note)}")
    rows.append("└─ routes")
    for i, r in enumerate(node.routes):
        branch = "└─" if i == len(node.routes) - 1 else "├─"
        text = r.observed if r.status in (OK, EXTRA) or (r.status == WRONG and r.observed) else r.expected
        rows.append(f"   {branch} {mark(r.status)} {text}{note(r.status, r.note)}")
    return rows


# ------------------------------------------------------------------------------------------- dot

PALETTE = {
    "node_fill": "#f2f6fb", "node_line": "#3d6ea8",
    "pod_fill": "#ffffff", "pod_line": "#3d6ea8",
    "dns_fill": "#e3f4e4", "dns_line": "#2e7d32",
    "bridge_fill": "#fff1d0", "bridge_line": "#c98a00",
    "nic_fill": "#e9eef5", "nic_line": "#6b7f99",
    "tunnel_fill": "#efe6fa", "tunnel_line": "#7b4fc0",
    "svc_fill": "#f3ecfc", "svc_line": "#7b4fc0",
    "switch_fill": "#eceff1", "switch_line": "#546e7a",
    "router_fill": "#e0f2f1", "router_line": "#00796b",
    "ext_fill": "#e8f5e9", "ext_line": "#388e3c",
    "ok": "#2e7d32", "bad": "#c62828", "warn": "#ef6c00", "text": "#263238", "muted": "#607d8b",
}
FONT = "Helvetica"


def _bad(status: str) -> bool:
    return status in (MISSING, DOWN, WRONG)


def _color(status: str, normal: str) -> str:
    if status in (MISSING, DOWN, WRONG):
        return PALETTE["bad"]
    if status == EXTRA:
        return PALETTE["warn"]
    return normal


def _id(*parts: str) -> str:
    return "n_" + "_".join(parts).replace("-", "_").replace(".", "_").replace("/", "_").replace(":", "_")


def _h(text: str) -> str:
    return html.escape(str(text), quote=True)


def _label(title: str, *rows: str, status: str = OK, note: str = "", bold: bool = True) -> str:
    """An HTML-like Graphviz label: a title, smaller rows, and (when broken) the note in red."""
    parts = [f"<b>{_h(title)}</b>" if bold else _h(title)]
    parts += [f'<font point-size="10">{_h(r)}</font>' for r in rows if r]
    if status != OK and note:
        color = PALETTE["warn"] if status == EXTRA else PALETTE["bad"]
        parts.append(f'<font point-size="10" color="{color}"><b>{_h(note.upper() if _bad(status) else note)}</b></font>')
    return "<" + "<br/>".join(parts) + ">"


def _style(status: str, fill: str, line: str, base: str = "rounded,filled") -> dict[str, str]:
    attrs = {"fillcolor": fill, "color": _color(status, line), "style": base}
    if _bad(status):
        attrs.update(style=base + ",dashed", penwidth="2.2", fillcolor="#fdecea")
    return attrs


def _route_table(node: NodeBox) -> str:
    rows = ['<tr><td align="left" colspan="2"><font point-size="10" color="{}"><b>ROUTES (kernel)</b></font></td></tr>'
            .format(PALETTE["muted"])]
    for r in node.routes:
        if r.status == OK:
            color, sym = PALETTE["ok"], "✓"
        elif r.status == EXTRA:
            color, sym = PALETTE["warn"], "?"
        else:
            color, sym = PALETTE["bad"], "✗"
        text = r.observed if r.status in (OK, EXTRA) or (r.status == WRONG and r.observed) else r.expected
        cell = _h(text)
        if r.status != OK:
            cell = f"<b>{cell}</b><br/>{_h(r.note.upper() if _bad(r.status) else r.note)}"
        rows.append(f'<tr><td valign="top"><font color="{color}">{sym}</font></td>'
                    f'<td align="left" balign="left"><font point-size="9" color="{color if r.status != OK else PALETTE["text"]}">'
                    f"{cell}</font></td></tr>")
    return ('<<table border="1" cellborder="0" cellspacing="1" cellpadding="2" style="rounded" color="{}" '
            'bgcolor="white">{}</table>>').format(PALETTE["nic_line"], "".join(rows))


def to_dot(graph: Graph) -> str:
    """The lab as a Graphviz digraph, top-down as the explainer draws it: services above, nodes with their
    pods, bridge and NICs side by side, the underlay (switches, routers, external hosts) below."""
    from graphviz import Digraph

    problems = len(graph.problems)
    status_line = (f'<font color="{PALETTE["ok"]}">✓ matches the spec</font>' if not problems else
                   f'<font color="{PALETTE["bad"]}"><b>✗ {problems} problem{"s" if problems != 1 else ""}</b></font>')
    backend = graph.backend + (f" ({graph.ipip_mode})" if graph.ipip_mode else "")
    title = (f'<<font point-size="20"><b>lab {_h(graph.lab)}</b></font><br/>'
             f'<font point-size="12" color="{PALETTE["muted"]}">backend {_h(backend)} · kube-proxy '
             f'{_h(graph.kube_proxy)} · pods {_h(graph.pod_cidr)} · services {_h(graph.service_cidr)}</font><br/>'
             f'<font point-size="12">{status_line}</font>>')
    g = Digraph("lab", graph_attr={"rankdir": "TB", "fontname": FONT, "labelloc": "t", "label": title,
                                   "bgcolor": "white", "pad": "0.4", "nodesep": "0.3", "ranksep": "0.45",
                                   "newrank": "true", "compound": "true", "splines": "true"},
                node_attr={"fontname": FONT, "fontsize": "12", "shape": "box", "style": "rounded,filled",
                           "penwidth": "1.3", "fontcolor": PALETTE["text"], "margin": "0.14,0.06"},
                edge_attr={"fontname": FONT, "fontsize": "9", "color": PALETTE["muted"], "arrowsize": "0.6",
                           "fontcolor": PALETTE["muted"]})
    pod_ids: dict[str, str] = {}
    bridges: list[str] = []
    nics: dict[str, str] = {}
    tunnels: dict[str, str] = {}
    for node in graph.nodes:
        with g.subgraph(name=f"cluster_{_id(node.name)}") as c:
            rack = f" · {node.rack}" if node.rack else ""
            c.attr(label=_label(f"{node.name} ({node.ip})", f"PodCIDR {node.pod_cidr}{rack}",
                                status=node.status, note=node.note),
                   style="rounded,filled", fillcolor=PALETTE["node_fill"] if not _bad(node.status) else "#fdecea",
                   color=_color(node.status, PALETTE["node_line"]), penwidth="1.6", fontsize="14", labeljust="c")
            bridge = _id(node.name, "cni0")
            bridges.append(bridge)
            with c.subgraph(name=f"pods_{_id(node.name)}") as row:
                row.attr(rank="same")
                for pod in node.pods:
                    pid = _id(node.name, pod.namespace, pod.name)
                    pod_ids[pod.key] = pid
                    title = "CoreDNS" if pod.role == "dns" else pod.name
                    rows = [pod.ip] if pod.role != "dns" else [f"{pod.key}", pod.ip]
                    if pod.role == "dns":
                        attrs = _style(pod.status, PALETTE["dns_fill"], PALETTE["dns_line"])
                        attrs["penwidth"] = "2"
                    else:
                        attrs = _style(pod.status, PALETTE["pod_fill"], PALETTE["pod_line"])
                    row.node(pid, _label(title, *rows, status=pod.status, note=pod.note), **attrs)
            column = f"stack_{_id(node.name)}"  # bridge, tunnel and NIC in one straight column
            c.node(bridge, _label(f"{node.cni0.name} {node.cni0.detail or 'bridge'}", node.cni0.address, status=node.cni0.status,
                                  note=node.cni0.note),
                   **_style(node.cni0.status, PALETTE["bridge_fill"], PALETTE["bridge_line"]), width="2.2",
                   group=column)
            for pod in node.pods:
                c.edge(pod_ids[pod.key], bridge, label=f" {pod.veth}", arrowhead="none",
                       color=_color(pod.status, PALETTE["pod_line"]),
                       style="dashed" if _bad(pod.status) else "solid")
            eth0 = _id(node.name, "eth0")
            nics[node.name] = eth0
            c.node(eth0, _label(node.eth0.name, node.eth0.address, status=node.eth0.status, note=node.eth0.note),
                   **_style(node.eth0.status, PALETTE["nic_fill"], PALETTE["nic_line"]), group=column)
            routes = _id(node.name, "routes")
            with c.subgraph(name=f"bridge_{_id(node.name)}") as row:
                row.attr(rank="same")
                row.node(routes, _route_table(node), shape="plain", style="")
                row.node(bridge)
            if node.tunnel is not None:
                tun = _id(node.name, "tunnel")
                tunnels[node.name] = tun
                c.node(tun, _label(node.tunnel.name, node.tunnel.address, node.tunnel.detail,
                                   status=node.tunnel.status, note=node.tunnel.note),
                       **_style(node.tunnel.status, PALETTE["tunnel_fill"], PALETTE["tunnel_line"]), group=column)
                c.edge(bridge, tun, arrowhead="none", color=PALETTE["tunnel_line"], style="dotted")
                c.edge(tun, eth0, arrowhead="none", color=PALETTE["tunnel_line"], style="dotted")
            else:
                c.edge(bridge, eth0, arrowhead="none", style="dotted", label=" routed")
            c.edge(routes, bridge, style="invis")
    # Bridges and NICs line up across nodes, nodes left to right in the spec's order (invisible edges
    # inside a rank fix the order there).
    for row in (bridges, list(nics.values())):
        with g.subgraph() as s:
            s.attr(rank="same")
            for a, b in zip(row, row[1:]):
                s.edge(a, b, style="invis")
            for n in row[:1]:
                s.node(n)

    # Services above the nodes, edges down to their endpoints.
    if graph.services:
        with g.subgraph(name="cluster_services") as c:
            c.attr(label=_label("Services", "ClusterIPs: kube-proxy rules in every node, no interface holds them",
                                bold=True),
                   style="rounded,dashed", color=PALETTE["svc_line"], fontcolor=PALETTE["svc_line"], fontsize="13")
            merged: dict[tuple[str, str], list[ServiceBox]] = {}
            for svc in graph.services:
                merged.setdefault((svc.namespace, svc.name), []).append(svc)
            for (ns, name), ports in merged.items():
                sid = _id("svc", ns, name)
                worst = next((p.status for p in ports if p.status != OK), OK)
                notes = "; ".join(p.note for p in ports if p.note)
                port_text = ", ".join(f"{p.port}/{p.protocol}" + (f" (NodePort {p.node_port})" if p.node_port else "")
                                      for p in ports)
                title = f"{name}" + ("  (cluster DNS)" if ports[0].role == "dns" else "")
                fill = PALETTE["dns_fill"] if ports[0].role == "dns" else PALETTE["svc_fill"]
                line = PALETTE["dns_line"] if ports[0].role == "dns" else PALETTE["svc_line"]
                c.node(sid, _label(title, f"{ports[0].cluster_ip} · {port_text}", ns, status=worst, note=notes),
                       **_style(worst, fill, line, base="rounded,filled"), shape="box")
                seen: set[str] = set()
                for p in ports:
                    for ep in p.endpoints:
                        if ep.pod in seen or ep.pod not in pod_ids:
                            continue
                        seen.add(ep.pod)
                        port = ep.address.rsplit(":", 1)[-1]
                        g.edge(sid, pod_ids[ep.pod], label=f" :{port}", color=_color(ep.status, line),
                               style="dashed" if ep.status != OK else "solid", penwidth="1.1",
                               fontcolor=_color(ep.status, line))

    # The underlay: switches, routers, external hosts, and every host's link.
    for seg in graph.segments:
        g.node(_id("seg", seg.name), _label(f"switch {seg.name}", f"underlay {seg.subnet}", status=seg.status,
                                            note=seg.note),
               **_style(seg.status, PALETTE["switch_fill"], PALETTE["switch_line"]), shape="box", width="3")
    for host in graph.routers:
        g.node(_id("host", host.name), _label(host.name, *host.ips, host.detail, status=host.status, note=host.note),
               **_style(host.status, PALETTE["router_fill"], PALETTE["router_line"], base="filled"), shape="octagon")
    for host in graph.external:
        g.node(_id("host", host.name), _label(host.name.replace("-", " ").title() if host.name == "external-web"
                                              else host.name, *host.ips, host.detail, status=host.status,
                                              note=host.note),
               **_style(host.status, PALETTE["ext_fill"], PALETTE["ext_line"]), shape="box")
    routers = {h.name for h in graph.routers}
    for att in graph.attachments:
        src = nics.get(att.host, _id("host", att.host))
        color = _color(att.status, PALETTE["switch_line"])
        style = {"arrowhead": "none", "color": color, "penwidth": "1.6", "labelfontsize": "8",
                 "labelfontcolor": PALETTE["muted"], "style": "dashed" if _bad(att.status) else "solid"}
        if att.segment is not None and att.host in routers:
            # A rack's router hangs below its switch: the picture reads top-down, pods to the fabric.
            g.edge(_id("seg", att.segment), src, taillabel=att.port or "", **style)
        elif att.segment is not None:
            g.edge(src, _id("seg", att.segment), headlabel=att.port or "", **style)
        elif att.peer is not None:
            g.edge(src, _id("host", att.peer), arrowhead="none", color=color, penwidth="1.6",
                   taillabel=att.intf, labelfontsize="8", labelfontcolor=PALETTE["muted"])

    # How pods reach other nodes: the VXLAN or IP-in-IP tunnels, or the BGP sessions.
    if len(tunnels) > 1:
        names_ = list(tunnels)
        label = f" VXLAN VNI {vxlan.VNI} · UDP {vxlan.PORT} " if graph.backend == "vxlan" else \
            " IP-in-IP (proto 4)" + (" between racks " if graph.ipip_mode == "CrossSubnet" else " ")
        for a, b in zip(names_, names_[1:]):
            g.edge(tunnels[a], tunnels[b], dir="both", color=PALETTE["tunnel_line"], penwidth="2",
                   style="bold", constraint="false", label=label,
                   fontcolor=PALETTE["tunnel_line"], fontsize="10")
    for s in graph.sessions:
        a = nics.get(s.a, _id("host", s.a))
        b = nics.get(s.b, _id("host", s.b))
        state = "Established" if s.status == OK else " / ".join(f"{v}" for v in set(s.states.values()))
        color = PALETTE["ok"] if s.status == OK else PALETTE["bad"]
        g.edge(a, b, dir="both", color=color, style="dashed", penwidth="1.6", constraint="false",
               label=f" {'iBGP' if s.ibgp else 'eBGP'} {state} ", fontcolor=color, fontsize="9", arrowsize="0.5")
    # A cross-node route that is missing or wrong, drawn where it should lead: to the other node's bridge.
    cidr_owner = {n.pod_cidr: n.name for n in graph.nodes}
    for node in graph.nodes:
        for r in node.routes:
            if r.own or r.status not in (MISSING, WRONG) or r.dst not in cidr_owner:
                continue
            peer = cidr_owner[r.dst]
            ends = (tunnels[node.name], tunnels[peer]) if node.name in tunnels and peer in tunnels else \
                (nics[node.name], nics[peer])
            g.edge(*ends, color=PALETTE["bad"], style="dashed",
                   penwidth="2", constraint="false", fontcolor=PALETTE["bad"], fontsize="10",
                   label=f" ✗ {r.note} to {r.dst} ")
    if graph.problems:
        rows = "".join(f'<tr><td align="left"><font color="{PALETTE["bad"]}" point-size="10">✗ {_h(p)}</font></td></tr>'
                       for p in graph.problems[:12])
        more = len(graph.problems) - 12
        if more > 0:
            rows += f'<tr><td align="left"><font point-size="10">... and {more} more</font></td></tr>'
        g.node("problems", f'<<table border="1" cellborder="0" color="{PALETTE["bad"]}" bgcolor="#fff5f5" '
                           f'style="rounded"><tr><td align="left"><b>Problems</b></td></tr>{rows}</table>>',
               shape="plain", style="")
    return g.source


def render(graph: Graph, path: Path) -> Path:
    """Write the graph as .dot, .svg or .png (by suffix)."""
    from topo.errors import FeatureMissing, StateError

    suffix = path.suffix.lower().lstrip(".")
    if suffix not in ("dot", "gv", "svg", "png"):
        raise StateError(f"cannot write {path}: use a .svg, .png or .dot file name")
    source = to_dot(graph)
    if suffix in ("dot", "gv"):
        path.write_text(source)
        return path
    import shutil
    import subprocess

    if shutil.which("dot") is None:
        raise FeatureMissing("Graphviz's dot is not installed: install Debian's 'graphviz' package (./install.sh does)")
    argv = ["dot", f"-T{suffix}", "-o", str(path)] + (["-Gdpi=130"] if suffix == "png" else [])
    proc = subprocess.run(argv, input=source, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise StateError(f"dot failed: {(proc.stderr.strip().splitlines() or ['?'])[0]}")
    return path
