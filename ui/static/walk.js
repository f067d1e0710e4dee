// Step-through packet walks: the probe `lab trace` sends (POST /api/trace), played on the diagram one hop
// at a time; a DNS name is first resolved in the source pod (POST /api/dns, lab dns-count's count) and its
// queries played (each search-domain try, NXDOMAIN, the answer) before the answer is traced.
import { api, h, state } from "./common.js";
import { el, podLabel } from "./diagram.js";

const walk = { steps: [], at: -1 };
const IPV4 = /^\d+\.\d+\.\d+\.\d+$/;

function knownNames(g) {
  const names = new Set();
  for (const n of g.nodes) { names.add(n.name); for (const p of n.pods) names.add(podLabel(p)); }
  for (const hst of [...g.routers, ...g.external]) names.add(hst.name);
  for (const s of g.services) { names.add(s.name); names.add(`${s.namespace}/${s.name}`); }
  return names;
}

function fillForm(g) {
  const from = document.getElementById("walk-from");
  const current = from.value;
  const sources = [];
  for (const n of g.nodes) for (const p of n.pods) sources.push(podLabel(p));
  sources.push(...g.nodes.map((n) => n.name), ...g.external.map((x) => x.name));
  if (from.options.length !== sources.length || [...from.options].some((o, i) => o.value !== sources[i])) {
    from.replaceChildren(...sources.map((s) => h("option", { value: s }, s)));
    if (sources.includes(current)) from.value = current;
  }
  const targets = new Set();
  for (const s of g.services) targets.add(`svc/${s.namespace === "default" ? "" : s.namespace + "/"}${s.name}`);
  for (const n of g.nodes) for (const p of n.pods) targets.add(podLabel(p));
  for (const x of g.external) targets.add(x.name);
  for (const s of g.services) if (s.role !== "dns") targets.add(`${s.name}.${s.namespace}.svc.cluster.local`);
  for (const x of g.external) for (const part of (x.detail.split(" · ")[1] || "").split(", ")) if (part) targets.add(part);
  const list = document.getElementById("walk-targets");
  if (list.options.length !== targets.size) list.replaceChildren(...[...targets].map((t) => h("option", { value: t })));
}

function dnsPod(g) {
  for (const n of g.nodes) for (const p of n.pods) if (p.role === "dns") return podLabel(p);
  return null;
}

function hostByIp(g, ip) {
  for (const x of [...g.external, ...g.routers]) if (x.ips.some((a) => a.split("/")[0] === ip)) return x.name;
  return null;
}

function dnsSteps(g, r) {
  const dns = dnsPod(g);
  const pod = r.pod.replace(/^default\//, "");
  const conf = r.resolvConf.split("\n").filter((l) => /^(nameserver|search|options)/.test(l)).join("; ");
  const steps = [{ place: pod, kind: "resolv.conf", text: `${pod} reads /etc/resolv.conf: ${conf}`, phase: "dns" }];
  for (const q of r.clusterQueries) {
    steps.push({ place: dns || pod, from: pod, kind: "query", phase: "dns",
                 text: `${pod} asks the cluster DNS: ${q.qtype} ${q.name}` });
    for (const o of r.outcomes[`${q.qtype} ${q.name}`] || []) {
      const fwd = /^forwarded to (\S+)/.exec(o);
      if (fwd) {
        steps.push({ place: hostByIp(g, fwd[1]) || dns, from: dns, kind: "forward", phase: "dns",
                     text: `the cluster DNS forwards ${q.name} upstream to ${fwd[1]}` });
      } else {
        // NODATA (the name exists, without records of this type) is no NXDOMAIN (RFC 2308)
        const kind = o.startsWith("NXDOMAIN") ? "nxdomain" : /^(reply is |is )?NODATA/.test(o) ? "nodata" : "answer";
        steps.push({ place: dns || pod, kind, phase: "dns", text: `${q.qtype} ${q.name}: ${o}` });
      }
    }
    // dnsmasq logs a name it answers from its hosts file (a Service's) by no line the count reads: the
    // answer the pod got is the last question of that type, with the addresses of that family.
    const last = r.clusterQueries.filter((x) => x.qtype === q.qtype).pop() === q;
    const family = r.answer.filter((a) => (q.qtype === "AAAA" ? a.includes(":") : IPV4.test(a)));
    const said = (r.outcomes[`${q.qtype} ${q.name}`] || []).some((o) => !/^forwarded/.test(o));
    if (last && family.length && !said && ["A", "AAAA"].includes(q.qtype)) {
      steps.push({ place: dns || pod, kind: "answer", phase: "dns", text: `${q.qtype} ${q.name}: is ${family.join(", ")}` });
    }
  }
  steps.push({ place: pod, from: dns, kind: "answer", phase: "dns",
               text: `${r.name} resolves to ${r.answer.join(", ") || "nothing"} after ${r.clusterQueries.length} queries ` +
                     `at the cluster DNS${r.upstreamQueries.length ? `, ${r.upstreamQueries.length} forwarded upstream` : ""}` });
  return steps;
}

function traceSteps(r) {
  const steps = [];
  const add = (hop, phase) => steps.push({ place: hop.place, dev: hop.dev, kind: hop.kind, text: hop.text,
                                             packet: hop.packet, detail: hop.detail, phase });
  r.hops.forEach((hop) => add(hop, "request"));
  r.reply.forEach((hop) => add(hop, "reply"));
  steps.push({ place: r.reached || (r.hops.length ? r.hops[r.hops.length - 1].place : r.source),
               kind: r.delivered ? "delivered" : "drop", phase: "verdict",
               text: `${r.delivered ? "✓" : "✗"} ${r.verdict}` });
  return steps;
}

function find(step) {
  const svg = document.getElementById("diagram");
  const esc = (s) => CSS.escape(s);
  if (step.dev) {
    const dev = svg.querySelector(`[data-dev="${esc(step.place + ":" + step.dev)}"]`) ||
                svg.querySelector(`[data-veth="${esc(step.place + ":" + step.dev)}"]`);
    if (dev) return dev;
  }
  return svg.querySelector(`[data-place="${esc(step.place)}"]`);
}

// Where an arrow starts or ends on `e`: its centre, but a node's at its title: the centre of a node's box is
// one of its pods (or the gap between two), and a step in the node's kernel (the DNAT) would seem to be there.
function center(svg, e) {
  const title = e.matches("[data-node]") ? e.querySelector(":scope > text.title") : null;
  const r = (title || e).getBoundingClientRect();
  const m = svg.getScreenCTM().inverse();
  const p = new DOMPoint(r.left + r.width / 2, r.top + r.height / 2).matrixTransform(m);
  return [p.x, p.y];
}

// Mark the current step on the diagram (after every redraw too: the diagram is redrawn on each change).
export function reapplyStep() {
  const svg = document.getElementById("diagram");
  svg.querySelectorAll(".here").forEach((e) => e.classList.remove("here"));
  svg.querySelectorAll(".walk-arrow").forEach((e) => e.remove());
  if (walk.at < 0 || !walk.steps.length) return;
  const step = walk.steps[walk.at];
  const here = find(step);
  if (here) here.classList.add("here");
  let prev = null;
  if (step.from) prev = svg.querySelector(`[data-place="${CSS.escape(step.from)}"]`);
  else for (let i = walk.at - 1; i >= 0 && !prev; i--) {
    const e = find(walk.steps[i]);
    if (e && e !== here) prev = e;
  }
  if (here && prev && prev !== here) {
    const [x1, y1] = center(svg, prev), [x2, y2] = center(svg, here);
    el("path", { class: "walk-arrow", d: `M ${x1} ${y1} Q ${(x1 + x2) / 2} ${Math.min(y1, y2) - 30} ${x2} ${y2}` }, svg);
  }
}

function show() {
  const step = walk.steps[walk.at];
  document.getElementById("step-count").textContent = `step ${walk.at + 1} / ${walk.steps.length}`;
  const box = document.getElementById("step");
  const parts = [h("div", {}, h("span", { class: `kind ${step.kind}` }, step.kind), h("b", {}, step.place),
                   step.phase === "reply" ? " (reply)" : "")];
  parts.push(h("div", { class: "step-text" }, step.text));
  if (step.packet) parts.push(h("div", { class: "hint" }, step.packet));
  if (step.detail && step.detail.rule) parts.push(h("div", {}, "chosen by: ", h("code", { class: "rule" }, step.detail.rule)));
  if (step.detail && step.detail.outer_src) {
    parts.push(h("div", { class: "hint" }, `outer ${step.detail.outer_src} → ${step.detail.outer_dst}` +
      (step.detail.vni !== undefined ? ` · VNI ${step.detail.vni}` : "") + (step.detail.port ? ` · UDP ${step.detail.port}` : "")));
  }
  box.replaceChildren(...parts);
  document.querySelectorAll("#steps li").forEach((li, i) => li.classList.toggle("current", i === walk.at));
  document.getElementById("prev").disabled = walk.at <= 0;
  document.getElementById("next").disabled = walk.at >= walk.steps.length - 1;
  reapplyStep();
}

function play(steps) {
  walk.steps = steps;
  walk.at = 0;
  const list = document.getElementById("steps");
  list.replaceChildren(...steps.map((s, i) => h("li", { "data-kind": s.kind, onclick: () => { walk.at = i; show(); } },
    h("span", { class: `kind ${s.kind}` }, s.kind), `${s.place}: ${s.text}`)));
  document.getElementById("player").hidden = false;
  show();
}

async function run(evt) {
  evt.preventDefault();
  const g = state.graph;
  const from = document.getElementById("walk-from").value;
  const to = document.getElementById("walk-to").value.trim();
  const protocol = document.getElementById("walk-proto").value;
  const status = document.getElementById("walk-status");
  if (!to) { status.replaceChildren(h("p", { class: "error" }, "name a destination")); return; }
  const [host, port] = to.split(/:(?=\d+$)/);
  const isName = g && host.includes(".") && !IPV4.test(host) && !knownNames(g).has(host);
  document.getElementById("walk-run").disabled = true;
  try {
    let steps = [];
    let target = to;
    if (isName) {
      status.replaceChildren(h("p", { class: "hint" }, `resolving ${host} in ${from} (lab dns-count)…`));
      const r = await api("/api/dns", { pod: from, name: host });
      steps = dnsSteps(g, r);
      const ip = r.answer.find((a) => IPV4.test(a));
      if (!ip) { play(steps); status.replaceChildren(h("p", { class: "error" }, `${host} does not resolve: nothing to trace`)); return; }
      target = port ? `${ip}:${port}` : ip;
    }
    status.replaceChildren(h("p", { class: "hint" }, `tracing ${from} → ${target} (lab trace)…`));
    const r = await api("/api/trace", { from, to: target, protocol: protocol || null });
    steps = steps.concat(traceSteps(r));
    play(steps);
    status.replaceChildren(h("p", { class: r.delivered ? "pass" : "fail", id: "walk-verdict" },
                             `${r.source} → ${r.destination}: ${r.verdict} (${r.seconds.toFixed(2)} s)`));
  } catch (e) {
    status.replaceChildren(h("p", { class: "error" }, e.message));
  } finally {
    document.getElementById("walk-run").disabled = false;
  }
}

export function setupWalk() {
  document.getElementById("walk-form").addEventListener("submit", run);
  document.getElementById("prev").onclick = () => { if (walk.at > 0) { walk.at -= 1; show(); } };
  document.getElementById("next").onclick = () => { if (walk.at < walk.steps.length - 1) { walk.at += 1; show(); } };
  document.addEventListener("keydown", (e) => {
    if (document.getElementById("player").hidden || e.target.closest("input, select")) return;
    if (e.key === "ArrowRight") document.getElementById("next").click();
    if (e.key === "ArrowLeft") document.getElementById("prev").click();
  });
  document.addEventListener("graph", (evt) => fillForm(evt.detail));
}
