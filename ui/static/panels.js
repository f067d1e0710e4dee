// The side panels: what a click on a pod or a node shows (GET /api/pod, /api/node), and the exercise with
// its checks, graded on demand (GET /api/exercise, POST /api/grade).
import { api, h } from "./common.js";

const inspect = () => document.getElementById("inspect");

function table(rows) {
  return h("table", {}, ...rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v))));
}

function pre(text) { return h("pre", {}, text || "(none)"); }

function linkText(l) {
  if (!l) return "missing";
  return `${l.name} (ifindex ${l.index}) ${l.mac} mtu ${l.mtu} ${l.up ? "UP" : "DOWN"}${l.master ? " master " + l.master : ""}` +
    `${l.addresses.length ? " · " + l.addresses.join(", ") : ""}`;
}

export async function showPod(key) {
  const box = inspect();
  box.replaceChildren(h("p", { class: "hint" }, `reading ${key}…`));
  try {
    const p = await api(`/api/pod?key=${encodeURIComponent(key)}`);
    box.replaceChildren(
      h("h3", { id: "inspect-title" }, `pod ${p.key}`),
      table([["IP", p.ip], ["node", p.node], ["running", p.alive ? "yes (pause process alive)" : "no"],
             ["network namespace", p.netns], ["labels", Object.entries(p.labels).map(([k, v]) => `${k}=${v}`).join(", ")]]),
      h("h4", {}, "veth pair"),
      h("p", { class: "veth-pair" }, p.veth.pair),
      table([["in the pod", linkText(p.veth.pod)], [`on ${p.node}`, linkText(p.veth.node)]]),
      h("h4", {}, "routes in the pod"), pre(p.routes.join("\n")),
      h("h4", {}, "containers (what runs: /proc/PID/cmdline)"),
      p.containers.length ? table(p.containers.map((c) => [c.name,
        `${c.image ? c.image + ": " : ""}${c.argv.join(" ")}${c.ports.length ? " · ports " + c.ports.join(", ") : ""}` +
        ` · pid ${c.pid}${c.running ? "" : " (not running)"}`])) : h("p", { class: "hint" }, "none"),
      h("h4", {}, "/etc/resolv.conf"), pre(p.resolvConf),
      h("h4", {}, "Services that select it"),
      p.services.length ? table(p.services.map((s) => [s.name, `${s.clusterIP}:${s.port}/${s.protocol} → ${s.endpoint}`]))
        : h("p", { class: "hint" }, "none"));
  } catch (e) {
    box.replaceChildren(h("p", { class: "error" }, e.message));
  }
}

export async function showNode(name, service) {
  const box = inspect();
  box.replaceChildren(h("p", { class: "hint" }, `reading ${name}…`));
  try {
    const q = `/api/node?name=${encodeURIComponent(name)}${service ? "&service=" + encodeURIComponent(service) : ""}`;
    const n = await api(q);
    const rules = n.serviceRules;
    const select = h("select", { id: "node-service" }, ...n.services.map((s) => {
      const o = h("option", { value: s }, s);
      if (s === n.service) o.selected = true;
      return o;
    }));
    select.addEventListener("change", () => showNode(name, select.value));
    const ruleParts = [];
    if (rules.element) ruleParts.push(h("p", {}, "service-ips map element: ", h("code", {}, rules.element)));
    if (rules.rules.length) ruleParts.push(pre(rules.rules.map((r) => `${r.where}${r.packets !== null ? ` [${r.packets} pkts]` : ""}\n    ${r.text}`).join("\n")));
    if (rules.virtual) ruleParts.push(pre(rules.virtual.map((v) => `${v.server}\n  ${v.reals.join("\n  ")}`).join("\n") || "(no virtual server)"));
    if (rules.map && rules.map.length) ruleParts.push(h("h4", {}, "every element of the service-ips map"), pre(rules.map.join("\n")));
    if (!ruleParts.length) ruleParts.push(h("p", { class: "hint" }, "no rules for it on this node"));
    box.replaceChildren(
      h("h3", { id: "inspect-title" }, `node ${n.name}`),
      table([["underlay IP", n.ip], ["PodCIDR", n.podCIDR], ["network namespace", n.netns]]),
      h("h4", {}, "interfaces"), pre(n.links.map(linkText).join("\n")),
      h("h4", {}, "routes"), pre(n.routes.join("\n")),
      h("h4", {}, "tunnels"),
      n.tunnels.length ? pre(n.tunnels.map((t) => linkText(t) + (t.fdb ? `\n  FDB: ${t.fdb.join("\n       ") || "none"}\n  ARP: ${t.neighbours.join("\n       ") || "none"}` : "")).join("\n"))
        : h("p", { class: "hint" }, "none (this backend routes without encapsulation)"),
      h("h4", {}, `service rules (kube-proxy ${rules.mode})`),
      n.services.length ? select : h("p", { class: "hint" }, "no services"),
      ...ruleParts);
  } catch (e) {
    box.replaceChildren(h("p", { class: "error" }, e.message));
  }
}

function showExercise(ex, report) {
  const box = document.getElementById("exercise");
  if (!ex) { box.replaceChildren(h("p", { class: "hint" }, "This lab was not built from an exercise.")); return; }
  const outcome = {};
  for (const c of report ? report.checks : []) outcome[c.name] = c;
  const parts = [h("h3", {}, `${ex.slug}: ${ex.title}`)];
  if (ex.claim) parts.push(h("p", { class: "hint" }, ex.claim));
  for (const t of ex.tasks) {
    parts.push(h("h4", {}, `${t.id}: ${t.title}`));
    const list = h("ul", {});
    for (const c of ex.checks.filter((c) => c.task === t.id)) {
      const o = outcome[c.name];
      const mark = !o ? h("span", { class: "hint" }, "not graded") : o.skipped ? h("span", { class: "hint" }, "SKIP")
        : h("span", { class: o.passed ? "pass" : "fail" }, o.passed ? "PASS" : "FAIL");
      const li = h("li", { "data-check": c.name }, mark, ` ${c.name} (${o ? o.score + "/" : ""}${c.points}): ${c.description}`);
      if (o && !o.passed) {
        li.append(h("div", { class: "hint" }, `why: ${o.detail}`));
        if (o.hint) li.append(h("div", { class: "hint" }, `hint: ${o.hint}`));
      }
      list.append(li);
    }
    parts.push(list);
  }
  box.replaceChildren(...parts);
}

export function setupExercise() {
  let ex = null;
  const load = async () => {
    try { ex = (await api("/api/exercise")).exercise; showExercise(ex, null); } catch (e) { /* no exercise */ }
  };
  document.addEventListener("graph", (evt) => { if (evt.detail.exercise && ex === null) load(); }, { once: false });
  document.getElementById("grade").onclick = async () => {
    const out = document.getElementById("grade-result");
    out.replaceChildren(h("p", { class: "hint" }, "grading (lab grade)…"));
    try {
      if (ex === null) await load();
      const r = await api("/api/grade", {});
      showExercise(ex, r);
      out.replaceChildren(h("p", { id: "score", class: r.score === r.maxScore ? "pass" : "fail" },
                            `score ${r.score}/${r.maxScore}: ${r.passed} of ${r.total - r.skipped} checks pass (${r.seconds.toFixed(1)} s)`));
    } catch (e) {
      out.replaceChildren(h("p", { class: "error" }, e.message));
    }
  };
}
