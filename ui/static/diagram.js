// The live diagram: lab graph's comparison (GET /api/graph, the event stream) drawn as SVG, the way the
// explainer draws a cluster. Every element not as the spec says is red. Nodes with more than GROUP pods are
// drawn grouped (one small square per pod, red when not ok) unless expanded; the view zooms and pans.
const NS = "http://www.w3.org/2000/svg";
export const GROUP = 12;          // more pods than this on a node: grouped, unless the node is expanded
const POD_W = 176, POD_H = 46, GAP = 8, MINI = 14, MINI_COLS = 20;
const HOST_W = 210, HOST_H = 54, SVC_W = 300;

export function el(tag, attrs = {}, parent = null, text = null) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) e.setAttribute(k, v);
  if (text !== null) e.textContent = text;
  if (parent) parent.appendChild(e);
  return e;
}

const bad = (status) => status && status !== "ok";
export const podLabel = (pod) => (pod.namespace === "default" ? pod.name : `${pod.namespace}/${pod.name}`);

function tip(g, text) { el("title", {}, g, text); }

// Shorten text `t` with an ellipsis until it is at most `width` wide, so no label runs past its box. The
// full text stays in data-full, and every box's tooltip (its <title>) says it in full. Measured only when it
// might not fit: a big lab's thousand short labels cost nothing.
export function fitText(t, width) {
  const full = t.textContent;
  if (full.length * 11 <= width) return t;  // no character of these fonts is wider than 11 px: it fits
  const length = t.getComputedTextLength();
  if (!length || length <= width) return t;
  let n = Math.max(1, Math.floor(full.length * width / length));
  do {
    t.textContent = full.slice(0, n).trimEnd() + "…";
    n -= 1;
  } while (n > 0 && t.getComputedTextLength() > width);
  t.setAttribute("data-full", full);
  return t;
}

function nodeSize(node, expanded) {
  const n = node.pods.length;
  const grouped = n > GROUP && !expanded.has(node.name);
  let podsW, podsH;
  if (grouped) {
    const cols = Math.min(MINI_COLS, n);
    podsW = cols * (MINI + 2);
    podsH = Math.ceil(n / MINI_COLS) * (MINI + 2) + 18;
  } else {
    const cols = Math.max(1, Math.min(n > 8 ? 4 : 3, n));
    podsW = cols * (POD_W + GAP) - GAP;
    podsH = Math.max(1, Math.ceil(n / cols)) * (POD_H + GAP) + (n > GROUP ? 18 : 0);
  }
  return { w: Math.max(300, podsW + 24), h: 52 + podsH + 34 + 36, grouped, podsH };
}

function drawPod(g, pod, x, y, node) {
  const p = el("g", { class: `pod${pod.role === "dns" ? " dns" : ""}${bad(pod.status) ? " bad" : ""}`,
                      "data-place": podLabel(pod), "data-pod": `${pod.namespace}/${pod.name}`,
                      "data-veth": `${node}:${pod.veth}`, transform: `translate(${x},${y})` }, g);
  el("rect", { width: POD_W, height: POD_H }, p);
  fitText(el("text", { x: 8, y: 17 }, p, podLabel(pod)), POD_W - 14);
  const second = bad(pod.status) ? `${pod.ip} · ${pod.note}` : pod.role === "dns" ? `${pod.ip} · cluster DNS` : pod.ip;
  fitText(el("text", { x: 8, y: 34, class: bad(pod.status) ? "bad" : "" }, p, second), POD_W - 14);
  tip(p, `pod ${pod.namespace}/${pod.name}\nIP ${pod.ip}\nveth ${pod.veth} on ${node}${pod.note ? "\n" + pod.note : ""}`);
}

function drawDev(g, node, dev, x, y, w, cls = "") {
  const d = el("g", { class: `dev ${cls}${bad(dev.status) ? " bad" : ""}`, "data-dev": `${node}:${dev.name}`,
                      transform: `translate(${x},${y})` }, g);
  el("rect", { width: w, height: 24 }, d);
  const text = `${dev.name} ${dev.address}${dev.detail ? " · " + dev.detail : ""}${bad(dev.status) ? " · " + dev.note : ""}`;
  fitText(el("text", { x: 6, y: 16, class: bad(dev.status) ? "bad" : "" }, d, text), w - 10);
  tip(d, text);
  return d;
}

function drawNode(svg, node, x, y, size, expanded) {
  const g = el("g", { class: `node${bad(node.status) ? " bad" : ""}`, "data-place": node.name, "data-node": node.name,
                      transform: `translate(${x},${y})` }, svg);
  el("rect", { class: "box", width: size.w, height: size.h }, g);
  fitText(el("text", { x: 12, y: 20, class: "title" }, g, `${node.name} (${node.ip})`), size.w - 20);
  fitText(el("text", { x: 12, y: 38, class: "small" }, g,
     `PodCIDR ${node.pod_cidr}${node.rack ? " · rack " + node.rack : ""}${bad(node.status) ? " · " + node.note : ""}`), size.w - 20);
  const top = 50;
  if (size.grouped) {
    const nbad = node.pods.filter((p) => bad(p.status)).length;
    el("text", { x: 12, y: top + 10, class: nbad ? "bad" : "small" }, g,
       `${node.pods.length} pods${nbad ? ` · ${nbad} not ok` : ""}`);
    const ex = el("g", { class: "expand", "data-expand": node.name }, g);
    el("text", { x: size.w - 70, y: top + 10 }, ex, "show all");
    node.pods.forEach((pod, i) => {
      const r = el("rect", { class: `mini${bad(pod.status) ? " bad" : ""}`, width: MINI, height: MINI,
                             x: 12 + (i % MINI_COLS) * (MINI + 2), y: top + 18 + Math.floor(i / MINI_COLS) * (MINI + 2),
                             "data-place": podLabel(pod), "data-pod": `${pod.namespace}/${pod.name}` }, g);
      tip(r, `${podLabel(pod)} ${pod.ip}${pod.note ? " · " + pod.note : ""}`);
    });
  } else {
    const n = node.pods.length;
    const cols = Math.max(1, Math.min(n > 8 ? 4 : 3, n));
    let off = 0;
    if (n > GROUP) {
      const ex = el("g", { class: "expand", "data-expand": node.name }, g);
      el("text", { x: 12, y: top + 10 }, ex, "group pods");
      off = 18;
    }
    node.pods.forEach((pod, i) => drawPod(g, pod, 12 + (i % cols) * (POD_W + GAP),
                                          top + off + Math.floor(i / cols) * (POD_H + GAP), node.name));
  }
  const yb = top + size.podsH + 4;
  drawDev(g, node.name, node.cni0, 12, yb, size.w - 24, "bridge");
  const yd = yb + 34;
  const half = (size.w - 32) / 2;
  drawDev(g, node.name, node.eth0, node.tunnel ? 20 + half : 12, yd, node.tunnel ? half : size.w - 24, "nic");
  if (node.tunnel) drawDev(g, node.name, node.tunnel, 12, yd, half, "tunnel");
  tip(g, node.routes.map((r) => `${r.status === "ok" ? "" : "✗ "}${r.observed || r.expected}${r.note ? " (" + r.note + ")" : ""}`).join("\n"));
  return { x, y, w: size.w, h: size.h, anchor: [x + (node.tunnel ? 20 + half + half / 2 : size.w / 2), y + size.h] };
}

function drawHost(svg, host, x, y) {
  const g = el("g", { class: `host ${host.kind}${bad(host.status) ? " bad" : ""}`, "data-place": host.name,
                      "data-host": host.name, transform: `translate(${x},${y})` }, svg);
  el("rect", { width: HOST_W, height: HOST_H }, g);
  const fit = (t) => fitText(t, HOST_W - 16);
  fit(el("text", { x: 10, y: 18, class: "title" }, g, `${host.name}${host.kind === "external" ? " (external)" : ""}`));
  fit(el("text", { x: 10, y: 34 }, g, host.ips.join(", ")));
  fit(el("text", { x: 10, y: 48, class: bad(host.status) ? "bad" : "small" }, g, bad(host.status) ? host.note : host.detail));
  tip(g, `${host.name}: ${host.ips.join(", ")}\n${host.detail}${bad(host.status) ? "\n" + host.note : ""}`);
  return { x, y, w: HOST_W, h: HOST_H, anchor: [x + HOST_W / 2, y] };
}

function drawService(svg, svc, x, y) {
  const shown = svc.endpoints.slice(0, 8);
  const h = 44 + shown.length * 15 + (svc.endpoints.length > 8 ? 15 : 0);
  const g = el("g", { class: `service${bad(svc.status) ? " bad" : ""}`, "data-service": `${svc.namespace}/${svc.name}`,
                      "data-place": `svc/${svc.namespace}/${svc.name}`, transform: `translate(${x},${y})` }, svg);
  el("rect", { width: SVC_W, height: h }, g);
  const title = `svc ${svc.namespace === "default" ? "" : svc.namespace + "/"}${svc.name}`;
  fitText(el("text", { x: 10, y: 17, class: "title" }, g, title), SVC_W - 18);
  fitText(el("text", { x: 10, y: 34 }, g, `${svc.cluster_ip}:${svc.port}/${svc.protocol}` +
     `${svc.node_port ? " · NodePort " + svc.node_port : ""}${svc.role === "dns" ? " · cluster DNS" : ""}`), SVC_W - 18);
  shown.forEach((ep, i) => fitText(el("text", { x: 18, y: 50 + i * 15, class: bad(ep.status) ? "bad" : "small" }, g,
    `→ ${ep.address}  ${ep.pod ? ep.pod.replace(/^default\//, "") : ""}${ep.note ? " · " + ep.note : ""}`), SVC_W - 26));
  if (svc.endpoints.length > 8) el("text", { x: 18, y: 50 + 8 * 15, class: "small" }, g, `+ ${svc.endpoints.length - 8} more`);
  if (bad(svc.status)) fitText(el("text", { x: 10, y: h - 4, class: "bad" }, g, svc.note), SVC_W - 18);
  tip(g, `${title}\n${svc.endpoints.map((e) => `${e.address} ${e.pod || ""}${e.note ? " · " + e.note : ""}`).join("\n")}` +
         `${bad(svc.status) ? "\n" + svc.note : ""}`);
  return h + (bad(svc.status) ? 12 : 0);
}

// Draw `graph` into `svg`; returns the content's bounding box {w, h}. `expanded`: node names shown in full.
export function render(svg, graph, expanded) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const defs = el("defs", {}, svg);
  const marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 6, markerHeight: 6,
                                orient: "auto-start-reverse" }, defs);
  el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#ff6d00" }, marker);
  const cables = el("g", { class: "cables" }, svg);
  const boxes = {};
  const sizes = graph.nodes.map((n) => nodeSize(n, expanded));
  const cols = graph.nodes.length <= 4 ? Math.max(1, graph.nodes.length) : Math.ceil(Math.sqrt(graph.nodes.length * 1.6));
  let x = 20, y = 50, rowH = 0, right = 20;
  graph.nodes.forEach((node, i) => {
    if (i && i % cols === 0) { x = 20; y += rowH + 40; rowH = 0; }
    boxes[node.name] = drawNode(svg, node, x, y, sizes[i], expanded);
    x += sizes[i].w + 40; rowH = Math.max(rowH, sizes[i].h); right = Math.max(right, x);
  });
  y += rowH + 50;
  // Underlay segments (switches), full width under the nodes.
  const segY = {};
  const width = Math.max(right - 40, (graph.routers.length + graph.external.length) * (HOST_W + 30));
  for (const seg of graph.segments) {
    const g = el("g", { class: `segment${bad(seg.status) ? " bad" : ""}`, "data-place": `switch ${seg.name}`,
                        transform: `translate(20,${y})` }, svg);
    el("rect", { width, height: 16 }, g);
    el("text", { x: 8, y: 12, class: bad(seg.status) ? "bad" : "" }, g,
       `switch ${seg.name}${seg.subnet ? " · " + seg.subnet : ""}${bad(seg.status) ? " · " + seg.note : ""}`);
    segY[seg.name] = y;
    y += 34;
  }
  y += 30;
  let hx = 20;
  for (const host of [...graph.routers, ...graph.external]) {
    boxes[host.name] = drawHost(svg, host, hx, y);
    hx += HOST_W + 30;
  }
  const bottom = y + HOST_H + 20;
  // Cables: each host's interface to its switch, or to the other end of a point-to-point link.
  const seen = new Set();
  for (const att of graph.attachments) {
    const a = boxes[att.host];
    if (!a) continue;
    const cls = `cable${bad(att.status) ? " bad" : ""}`;
    if (att.segment && segY[att.segment] !== undefined) {
      const sy = segY[att.segment];
      const fromTop = a.y > sy;
      const ax = Math.min(Math.max(a.anchor[0], 24), 20 + width - 4);
      const line = el("line", { class: cls, x1: ax, y1: fromTop ? a.y : a.anchor[1], x2: ax, y2: fromTop ? sy + 16 : sy,
                                "data-cable": `${att.host}:${att.intf}` }, cables);
      tip(line, `${att.host} ${att.intf} ${att.address} — switch ${att.segment} port ${att.port}${att.note ? " · " + att.note : ""}`);
    } else if (att.peer && boxes[att.peer] && !seen.has([att.peer, att.host].join())) {
      seen.add([att.host, att.peer].join());
      const b = boxes[att.peer];
      el("line", { class: cls, x1: a.x + a.w / 2, y1: a.y + a.h / 2, x2: b.x + b.w / 2, y2: b.y + b.h / 2 }, cables);
    }
  }
  // BGP sessions: dashed arcs between the speakers (a summary instead of a hairball in big labs).
  if (graph.sessions.length && graph.sessions.length <= 150) {
    for (const s of graph.sessions) {
      const a = boxes[s.a], b = boxes[s.b];
      if (!a || !b) continue;
      const ax = a.x + a.w / 2, ay = a.y + 4, bx = b.x + b.w / 2, by = b.y + 4;
      const mx = (ax + bx) / 2, my = Math.min(ay, by) - 40 - Math.abs(ax - bx) / 8;
      const path = el("path", { class: `session${bad(s.status) ? " bad" : ""}`, d: `M ${ax} ${ay} Q ${mx} ${my} ${bx} ${by}`,
                                "data-session": `${s.a}-${s.b}` }, cables);
      tip(path, `${s.ibgp ? "iBGP" : "eBGP"} ${s.a} — ${s.b}: ${Object.entries(s.states).map(([k, v]) => k + " says " + v).join(", ")}`);
      el("text", { x: mx, y: (ay + by) / 2 - 24 - Math.abs(ax - bx) / 16, class: bad(s.status) ? "bad" : "small",
                   "text-anchor": "middle" }, svg, `${s.ibgp ? "iBGP" : "eBGP"}${bad(s.status) ? " down" : ""}`);
    }
  } else if (graph.sessions.length) {
    const down = graph.sessions.filter((s) => bad(s.status)).length;
    el("text", { x: 20, y: 12, class: down ? "bad" : "small" }, svg, `${graph.sessions.length} BGP sessions, ${down} not Established`);
  }
  // Services on the right.
  let sy = 50;
  const sx = Math.max(right, 20 + width + 40);
  const svcG = el("g", { class: "services" }, svg);
  const heading = el("text", { x: sx, y: sy + 4, class: "small" }, svcG,
                      `Services (kube-proxy ${graph.kube_proxy}, ${graph.service_cidr})`);
  fitText(heading, SVC_W);
  if (heading.hasAttribute("data-full")) tip(svcG, heading.getAttribute("data-full"));
  sy += 14;
  for (const svc of graph.services) sy += drawService(svcG, svc, sx, sy) + 10;
  return { w: sx + SVC_W + 20, h: Math.max(bottom, sy + 20) };
}
