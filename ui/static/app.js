// lab ui: the page. Plain ES modules, no build step. Live updates come from /api/events (server-sent
// events); inspection, traces and grading are JSON calls to the same server (the token travels in the
// HttpOnly cookie the first load set).
import { render } from "./diagram.js";
import { setupWalk, reapplyStep } from "./walk.js";
import { showPod, showNode, setupExercise } from "./panels.js";
import { api, state, selectTab } from "./common.js";

const svg = document.getElementById("diagram");
const expanded = new Set();
// `moved`: the user zoomed or panned; until then every redraw fits the whole lab (it may have grown).
const view = { x: 0, y: 0, w: 1000, h: 700, fitted: false, moved: false, content: { w: 1000, h: 700 } };

function applyView() { svg.setAttribute("viewBox", `${view.x} ${view.y} ${view.w} ${view.h}`); }

function fit() {
  const r = svg.getBoundingClientRect();
  const c = view.content;
  const scale = Math.max(c.w / Math.max(r.width, 1), c.h / Math.max(r.height, 1));
  view.w = r.width * scale; view.h = r.height * scale; view.x = 0; view.y = 0;
  applyView();
}

function zoom(factor, cx, cy) {
  view.moved = true;
  const nx = cx - (cx - view.x) * factor, ny = cy - (cy - view.y) * factor;
  view.x = nx; view.y = ny; view.w *= factor; view.h *= factor;
  applyView();
}

// The centre of what is shown of the lab: the part of the drawing inside the view (the view's own centre may
// be empty canvas, below or beside a lab that does not fill the window), so + and − stay on the lab.
function shownCentre() {
  const c = view.content;
  const l = Math.max(view.x, 0), r = Math.min(view.x + view.w, c.w);
  const t = Math.max(view.y, 0), b = Math.min(view.y + view.h, c.h);
  if (l >= r || t >= b) return [view.x + view.w / 2, view.y + view.h / 2];
  return [(l + r) / 2, (t + b) / 2];
}

// Zoom by `factor` with the centre of what is shown moved to the middle of the view.
function zoomCentred(factor) {
  const [cx, cy] = shownCentre();
  view.moved = true;
  view.w *= factor; view.h *= factor;
  view.x = cx - view.w / 2; view.y = cy - view.h / 2;
  applyView();
}

function toSvg(evt) {
  const r = svg.getBoundingClientRect();
  return [view.x + (evt.clientX - r.left) / r.width * view.w, view.y + (evt.clientY - r.top) / r.height * view.h];
}

function draw() {
  const g = state.graph;
  if (!g || g.gone) return;
  const t0 = performance.now();
  view.content = render(svg, g, expanded);
  if (!view.fitted || !view.moved) { fit(); view.fitted = true; } else applyView();
  markSelected();
  reapplyStep();
  const problems = document.getElementById("problems");
  problems.replaceChildren();
  for (const p of g.problems) { const li = document.createElement("li"); li.textContent = p; problems.appendChild(li); }
  if (!g.problems.length) {
    const li = document.createElement("li"); li.className = "none"; li.textContent = "none: the kernel holds what the spec says";
    problems.appendChild(li);
  }
  const pods = g.nodes.reduce((n, node) => n + node.pods.length, 0);
  document.getElementById("lab-name").textContent = g.lab;
  document.getElementById("summary").textContent =
    `${g.backend}${g.ipip_mode ? " " + g.ipip_mode : ""} · kube-proxy ${g.kube_proxy} · ${g.nodes.length} nodes · ${pods} pods · ` +
    `${g.services.length} service ports · PodCIDR ${g.pod_cidr} · underlay ${g.underlay}`;
  document.getElementById("exercise-tab").hidden = !g.exercise;
  state.renders += 1;
  state.lastRenderMs = performance.now() - t0;
  state.updatedAt = Date.now();
  svg.setAttribute("data-renders", String(state.renders));
}

function markSelected() {
  svg.querySelectorAll(".selected").forEach((e) => e.classList.remove("selected"));
  if (!state.selected) return;
  const e = svg.querySelector(`[${state.selected.attr}="${CSS.escape(state.selected.value)}"]`);
  if (e) e.classList.add("selected");
}

function onGraph(g) {
  state.graph = g;
  const live = document.getElementById("live");
  if (g.gone) {
    live.className = "live off"; live.textContent = "lab gone";
    document.getElementById("summary").textContent = g.error;
    return;
  }
  live.className = "live on"; live.textContent = "live";
  draw();
  document.dispatchEvent(new CustomEvent("graph", { detail: g }));
}

function connect() {
  const source = new EventSource("/api/events");
  source.addEventListener("graph", (evt) => onGraph(JSON.parse(evt.data)));
  source.onerror = () => {
    const live = document.getElementById("live");
    live.className = "live off"; live.textContent = "disconnected (retrying)";
  };
}

function setupCanvas() {
  let drag = null;
  svg.addEventListener("wheel", (evt) => {
    evt.preventDefault();
    const [cx, cy] = toSvg(evt);
    zoom(evt.deltaY > 0 ? 1.15 : 1 / 1.15, cx, cy);
  }, { passive: false });
  svg.addEventListener("mousedown", (evt) => { drag = { x: evt.clientX, y: evt.clientY, moved: false }; });
  window.addEventListener("mousemove", (evt) => {
    if (!drag) return;
    const r = svg.getBoundingClientRect();
    const dx = (evt.clientX - drag.x) / r.width * view.w, dy = (evt.clientY - drag.y) / r.height * view.h;
    if (Math.abs(evt.clientX - drag.x) + Math.abs(evt.clientY - drag.y) > 3) { drag.moved = true; svg.classList.add("panning"); }
    if (drag.moved) { view.moved = true; view.x -= dx; view.y -= dy; drag.x = evt.clientX; drag.y = evt.clientY; applyView(); }
  });
  window.addEventListener("mouseup", () => { setTimeout(() => { drag = null; }, 0); svg.classList.remove("panning"); });
  svg.addEventListener("click", (evt) => {
    if (drag && drag.moved) return;
    const ex = evt.target.closest("[data-expand]");
    if (ex) {
      const name = ex.getAttribute("data-expand");
      if (expanded.has(name)) expanded.delete(name); else expanded.add(name);
      draw();
      return;
    }
    const pod = evt.target.closest("[data-pod]");
    const node = evt.target.closest("[data-node]");
    if (pod) {
      state.selected = { attr: "data-pod", value: pod.getAttribute("data-pod") };
      showPod(state.selected.value);
    } else if (node) {
      state.selected = { attr: "data-node", value: node.getAttribute("data-node") };
      showNode(state.selected.value);
    } else return;
    markSelected();
    selectTab("inspect");
  });
  document.getElementById("zoom-in").onclick = () => zoomCentred(1 / 1.3);
  document.getElementById("zoom-out").onclick = () => zoomCentred(1.3);
  document.getElementById("zoom-fit").onclick = () => { view.moved = false; fit(); };
  window.addEventListener("resize", () => { if (view.fitted) fit(); });
}

document.querySelectorAll("nav button").forEach((b) => { b.onclick = () => selectTab(b.dataset.tab); });
setupCanvas();
setupWalk();
setupExercise();
// The first paint does not wait for the stream: one plain GET, then live updates.
api("/api/graph").then(onGraph).catch((e) => {
  document.getElementById("summary").textContent = e.message;
}).finally(connect);
