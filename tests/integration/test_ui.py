"""`lab ui` in a real browser (Debian's chromium, headless, driven by Selenium through chromium-driver): one
seed lab and one browser session for the whole module. What a user sees: every node and pod drawn with its
IP, a pod applied, broken and deleted showing up without a reload, a trace to the `web` Service stepping
through the DNAT, a DNS name's lookup played query by query, the inspection panels, and a request without
the token refused. Ctrl-C at the end leaves nothing running.

KUBENET_LAB_UI_SCREENSHOTS=docs/ui also writes the screenshots docs/ui.md shows.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, lab, leftovers, pause_pod, seed_spec, unique, write_spec

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = [pytest.mark.integration]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = os.environ.get("KUBENET_LAB_UI_SCREENSHOTS")
WAIT = 20  # seconds a browser wait may take (generous: CI machines are busy)


class Ui:
    def __init__(self, name: str, proc: subprocess.Popen[str], url: str) -> None:
        self.name, self.proc, self.url = name, proc, url
        self.base = url.split("?", 1)[0].rstrip("/")
        self.port = int(self.base.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (./install.sh --test)")
    name = unique("ui")
    # Built from a folder holding lab.yaml and no checks.yaml, as `lab up labs/00-seed` is: a lab with an
    # exercise folder that is no graded exercise (the page must not offer an Exercise tab for it).
    folder = tmp_path_factory.mktemp("ui")
    write_spec(folder, seed_spec(name)).rename(folder / "lab.yaml")
    lab("up", str(folder))
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "ui", "--lab", name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line + proc.stderr.read() if proc.poll() is not None else line
        url = line.split(" at ", 1)[1].strip()
        yield Ui(name, proc, url)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        lab("down", name, check=False)
        assert leftovers(name) == {"netns": [], "state": []}


@pytest.fixture(scope="module")
def browser(ui: Ui) -> Iterator:
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,900",
                "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    try:
        driver.get(ui.url)
        WebDriverWait(driver, WAIT).until(lambda d: d.execute_script("return window.__labui && window.__labui.renders"))
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, what: str, timeout: float = WAIT):
    """`condition` polled until true. The page redraws its diagram on every live update, so an element a
    condition found may be gone (stale) when it reads it: that try counts as not yet, like a missing one."""
    try:
        return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except TimeoutException as exc:
        raise AssertionError(f"waited {timeout} s for {what}") from exc


def attr(driver, css: str, name: str) -> str:
    """The attribute of the first element `css` matches, found and read in one call (so never stale)."""
    value = driver.execute_script("const e = document.querySelector(arguments[0]); "
                                  "return e ? e.getAttribute(arguments[1]) : null", css, name)
    assert value is not None, f"nothing drawn matches {css} (or it has no {name})"
    return value


def click(driver, css: str, what: str) -> None:
    """A real mouse click at the centre of what `css` matches. The element is found, scrolled to and located
    in one call, and the click goes to that point: a WebDriver click of a found element fails as stale when a
    redraw replaced it meanwhile, which on a busy machine (two cores, a lab, a browser) may be every time."""
    def at_it(d) -> bool:
        point = d.execute_script(
            "const e = document.querySelector(arguments[0]); if (!e) return null; e.scrollIntoView({block: 'nearest'});"
            "const r = e.getBoundingClientRect(), x = r.left + r.width / 2, y = r.top + r.height / 2;"
            "const hit = document.elementFromPoint(x, y);"  # what a click there reaches: it, or inside it
            "return hit && (hit === e || e.contains(hit)) ? [Math.round(x), Math.round(y)] : null", css)
        if point is None:
            return False
        actions = ActionBuilder(d)
        actions.pointer_action.move_to_location(*point).click()
        actions.perform()
        return True

    wait(driver, at_it, f"a click on {what}")


def shot(driver, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SHOTS) / f"{name}.png"))


def drawn_text(driver, css: str) -> str:
    """The text of everything `css` matches, read in one call (so never stale)."""
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])]"
                                 ".map((e) => e.textContent).join(' ')", css)


def test_every_node_and_pod_is_drawn_with_its_ip(ui: Ui, browser) -> None:
    status = json.loads(lab("status", ui.name, "--json").stdout)
    for node in status["nodes"]:
        box = drawn_text(browser, f'[data-node="{node["name"]}"]')
        assert node["name"] in box and node["ip"].split("/")[0] in box and node["podCIDR"] in box
    for pod in status["pods"]:
        key = f'{pod["namespace"]}/{pod["name"]}'
        box = drawn_text(browser, f'[data-pod="{key}"]')
        assert pod["name"] in box and pod["ip"] in box, key
        # inside its node's box
        assert browser.find_elements(By.CSS_SELECTOR, f'[data-node="{pod["node"]}"] [data-pod="{key}"]')
    assert "10.96.0.100:80/TCP" in drawn_text(browser, '[data-service="default/web"]')
    assert "192.168.1.200" in drawn_text(browser, '[data-host="external-web"]')
    assert "cluster DNS" in drawn_text(browser, ".pod.dns")
    assert "none" in browser.find_element(By.ID, "problems").text
    shot(browser, "seed")


def test_a_request_without_the_token_is_refused(ui: Ui) -> None:
    def status(url: str, **headers: str) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    token = ui.url.split("token=", 1)[1]
    assert status(f"{ui.base}/") == 403
    assert status(f"{ui.base}/api/graph") == 403
    assert status(f"{ui.base}/api/graph", Authorization=f"token {token}", Host=f"rebound.example:{ui.port}") == 403
    assert status(f"{ui.base}/api/graph", Authorization=f"token {token}") == 200
    with pytest.raises(OSError):  # loopback only
        socket.create_connection((_an_outside_address(), ui.port), timeout=1).close()


def _an_outside_address() -> str:
    """An address of this machine that is not loopback (the server must not listen there)."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    addresses = [a for a in out if "." in a and not a.startswith("127.")]
    if not addresses:
        pytest.skip("this machine has no non-loopback IPv4 address")
    return addresses[0]


def test_a_pod_applied_broken_and_deleted_shows_without_reload(ui: Ui, browser, tmp_path: Path) -> None:
    browser.execute_script("window.__sameDocument = 'yes'")
    manifest = tmp_path / "extra.yaml"
    manifest.write_text(json.dumps(pause_pod("ui-extra", node="node2", app="extra")))
    lab("apply", "--lab", ui.name, "-f", str(manifest))
    css = '[data-pod="default/ui-extra"]'
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, css), "the applied pod to be drawn")
    ip = json.loads(lab("status", ui.name, "--json").stdout)
    ip = next(p["ip"] for p in ip["pods"] if p["name"] == "ui-extra")
    assert ip in drawn_text(browser, css)
    assert browser.find_elements(By.CSS_SELECTOR, f'[data-node="node2"] {css}')
    # broken: its veth on the node is down -> red, with the reason, in the problems list
    veth = attr(browser, css, "data-veth").split(":", 1)[1]
    lab("exec", "--lab", ui.name, "node2", "--", "ip", "link", "set", veth, "down")
    wait(browser, lambda d: "bad" in attr(d, css, "class"), "the pod to turn red")
    assert "ui-extra" in browser.find_element(By.ID, "problems").text
    shot(browser, "broken-pod")
    lab("exec", "--lab", ui.name, "node2", "--", "ip", "link", "set", veth, "up")
    wait(browser, lambda d: "bad" not in attr(d, css, "class"), "the pod to heal")
    lab("delete", "--lab", ui.name, "pod", "ui-extra")
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, css), "the deleted pod to disappear")
    assert browser.execute_script("return window.__sameDocument") == "yes"  # never reloaded


def test_clicking_a_pod_and_a_node_inspects_them(browser) -> None:
    click(browser, '[data-pod="default/node1-pod1"] rect', "the pod")
    panel = browser.find_element(By.ID, "inspect")
    wait(browser, lambda d: "pod default/node1-pod1" in panel.text, "the pod's inspection")
    text = panel.text
    assert "10.244.1.2" in text and "eth0@if" in text and "master cni0" in text and "node1" in text
    assert "ndots:5" in text and "default/web" in text and "agnhost" in text
    click(browser, '[data-node="node1"] > rect.box', "the node")
    wait(browser, lambda d: "node node1" in panel.text and "KUBE-SVC-" in panel.text, "the node's rules")
    assert "10.244.2.0/24 via 192.168.1.11" in panel.text and "KUBE-SEP-" in panel.text


def _walk(browser, to: str) -> list[tuple[str, str]]:
    browser.find_element(By.CSS_SELECTOR, 'nav [data-tab="walk"]').click()
    browser.find_element(By.ID, "walk-from").send_keys("node1-pod1")
    field = browser.find_element(By.ID, "walk-to")
    field.clear()
    field.send_keys(to)
    browser.find_element(By.ID, "walk-run").click()
    wait(browser, lambda d: d.find_elements(By.ID, "walk-verdict") or d.find_elements(By.CSS_SELECTOR, "#walk-status .error"),
         f"the walk to {to}")
    assert not browser.find_elements(By.CSS_SELECTOR, "#walk-status .error"), browser.find_element(By.ID, "walk-status").text
    return [(li.get_attribute("data-kind"), li.text) for li in browser.find_elements(By.CSS_SELECTOR, "#steps li")]


def _step_to(browser, kind: str) -> str:
    """Press Next until the current step is of `kind`; its text."""
    for _ in range(60):
        step = browser.find_element(By.ID, "step")
        if step.find_element(By.CSS_SELECTOR, ".kind").text == kind:
            return step.text
        nxt = browser.find_element(By.ID, "next")
        assert nxt.is_enabled(), f"no {kind} step"
        nxt.click()
    raise AssertionError(f"no {kind} step")


def test_a_trace_to_the_web_service_steps_through_the_dnat(browser) -> None:
    steps = _walk(browser, "svc/web")
    assert browser.find_element(By.ID, "step-count").text == f"step 1 / {len(steps)}"
    text = _step_to(browser, "dnat")
    assert "DNAT 10.96.0.100:80 -> 10.244." in text and "KUBE-SVC-" in text and "KUBE-SEP-" in text
    assert "chosen by" in text
    assert attr(browser, "#diagram .here", "data-node") == "node1"  # the DNAT happens in node1's kernel
    shot(browser, "trace-dnat")
    browser.find_element(By.ID, "prev").click()
    assert browser.find_element(By.CSS_SELECTOR, "#step .kind").text != "dnat"
    assert "delivered" in browser.find_element(By.ID, "walk-verdict").text


def test_a_dns_name_plays_its_queries_then_the_trace(browser) -> None:
    steps = _walk(browser, "web.default.svc.cluster.local:80")
    kinds = [kind for kind, _ in steps]
    assert kinds[0] == "resolv.conf" and "nxdomain" in kinds and "dnat" in kinds
    assert kinds.index("nxdomain") < kinds.index("dnat")
    # ndots:5: the name has 4 dots, so the search list is tried first
    assert any("web.default.svc.cluster.local.default.svc.cluster.local" in text and "NXDOMAIN" in text
               for _, text in steps)
    assert any(kind == "answer" and "resolves to 10.96.0.100" in text for kind, text in steps)
    _step_to(browser, "nxdomain")
    assert browser.find_elements(By.CSS_SELECTOR, '#diagram .here[data-pod="kube-system/coredns"]')
    shot(browser, "dns-walk")


def test_reading_the_diagram_survives_its_redraws(browser) -> None:
    """The page redraws its whole diagram on every live update, so an element found in one WebDriver call may be
    gone by the next (CI once failed `the pod to heal` so). Here it is redrawn every 50 ms, ten times as often
    as live updates can come (ui/backend.py MIN_INTERVAL), while the helpers every test reads and clicks with
    run against it: none may notice."""
    css = '[data-pod="default/node1-pod1"]'
    browser.execute_script("const svg = document.getElementById('diagram'); window.__churn = setInterval(() => "
                           "{ for (const n of [...svg.children]) n.replaceWith(n.cloneNode(true)); }, 50)")
    try:
        for _ in range(100):
            assert "pod" in attr(browser, css, "class")
            assert "10.244.1.2" in drawn_text(browser, css)
            wait(browser, lambda d: "bad" not in attr(d, css, "class"), "the pod to read as healthy")
        click(browser, f"{css} rect", "the pod")
        wait(browser, lambda d: "pod default/node1-pod1" in d.find_element(By.ID, "inspect").text, "its inspection")
    finally:
        browser.execute_script("clearInterval(window.__churn)")


def _applied(ui: Ui, tmp_path: Path, *objects: dict) -> Path:
    manifest = tmp_path / "objects.yaml"
    manifest.write_text("---\n".join(json.dumps(o) + "\n" for o in objects))
    lab("apply", "--lab", ui.name, "-f", str(manifest))
    return manifest


def _agnhost_pod(name: str, node: str, app: str) -> dict:
    pod = pause_pod(name, node=node, app=app)
    pod["spec"]["containers"] = [{"name": "app", "image": "agnhost", "args": ["netexec", "--http-port=8080"]}]
    return pod


OVERFLOWS = """
const out = [];
for (const box of document.querySelectorAll(arguments[0])) {
  const rect = box.querySelector(':scope > rect');
  if (!rect) continue;
  const r = rect.getBoundingClientRect();
  for (const t of box.querySelectorAll(':scope > text')) {
    const b = t.getBoundingClientRect();
    if (b.width && (b.right > r.right + 1 || b.left < r.left - 1)) out.push(t.textContent);
  }
}
return out;"""


def test_an_applied_pod_shows_the_containers_that_run(ui: Ui, browser, tmp_path: Path) -> None:
    manifest = _applied(ui, tmp_path, _agnhost_pod("ui-agn", "node2", "agn"))
    css = '[data-pod="default/ui-agn"]'
    try:
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, css), "the applied pod to be drawn")
        browser.find_element(By.CSS_SELECTOR, 'nav [data-tab="inspect"]').click()
        click(browser, f"{css} rect", "the applied pod")
        panel = browser.find_element(By.ID, "inspect")
        wait(browser, lambda d: "pod default/ui-agn" in panel.text, "the pod's inspection")
        assert "netexec --http-port=8080" in panel.text, panel.text
    finally:
        lab("delete", "--lab", ui.name, "-f", str(manifest))


def test_long_names_fit_their_boxes(ui: Ui, browser, tmp_path: Path) -> None:
    long = "extra-pod-with-a-rather-long-name"
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "extra"},
           "spec": {"selector": {"app": "extra"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
    manifest = _applied(ui, tmp_path, pause_pod(long, node="node2", app="extra"), svc)
    try:
        wait(browser, lambda d: long in drawn_text(d, '[data-service="default/extra"]') or
             "…" in drawn_text(d, '[data-service="default/extra"]'), "the Service's endpoint to be drawn")
        boxes = "#diagram .pod, #diagram .service, #diagram .dev, #diagram .host"
        assert browser.execute_script(OVERFLOWS, boxes) == []
        assert long in drawn_text(browser, f'[data-pod="default/{long}"] > title')  # the full name on hover
    finally:
        lab("delete", "--lab", ui.name, "-f", str(manifest))


def test_a_pod_whose_eth0_is_down_is_named_so_and_its_red_note_fits(ui: Ui, browser, tmp_path: Path) -> None:
    manifest = _applied(ui, tmp_path, pause_pod("ui-down", node="node2", app="down"))
    css = '[data-pod="default/ui-down"]'
    try:
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, css), "the applied pod to be drawn")
        lab("exec", "--lab", ui.name, "ui-down", "--", "ip", "link", "set", "eth0", "down")
        wait(browser, lambda d: "bad" in attr(d, css, "class"), "the pod to turn red")
        problems = browser.find_element(By.ID, "problems").text
        assert "pod default/ui-down: eth0 is down" in problems, problems
        assert browser.execute_script(OVERFLOWS, f"#diagram {css}") == []
    finally:
        lab("delete", "--lab", ui.name, "-f", str(manifest))


def test_a_lab_that_is_no_graded_exercise_has_no_exercise_tab(ui: Ui, browser) -> None:
    assert json.loads(lab("status", ui.name, "--json").stdout)["exercise"]  # built from a folder: it names it
    assert browser.find_element(By.ID, "exercise-tab").get_attribute("hidden") is not None
    asked = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)"
                                   ".filter((n) => n.includes('/api/exercise'))")
    assert asked == []


def test_the_dnat_arrow_ends_on_the_node_that_translates(browser) -> None:
    _walk(browser, "svc/web")
    _step_to(browser, "dnat")
    assert attr(browser, "#diagram .here", "data-node") == "node1"
    where = browser.execute_script("""
const svg = document.getElementById('diagram');
const a = svg.querySelector('.walk-arrow');
const n = a.getAttribute('d').trim().split(/[\\s,]+/).map(Number);
const p = new DOMPoint(n[n.length - 2], n[n.length - 1]).matrixTransform(svg.getScreenCTM());
const margin = 10 * svg.getScreenCTM().a;  // the arrow's head is longer than the gap between two pods
const near = (e) => { const r = e.getBoundingClientRect();
  return p.x > r.left - margin && p.x < r.right + margin && p.y > r.top - margin && p.y < r.bottom + margin; };
const inside = (e) => { const r = e.getBoundingClientRect();
  return p.x >= r.left && p.x <= r.right && p.y >= r.top && p.y <= r.bottom; };
return { node: [...svg.querySelectorAll('[data-node]')].filter(inside).map((e) => e.getAttribute('data-node')),
         pods: [...svg.querySelectorAll('[data-pod]')].filter(near).map((e) => e.getAttribute('data-pod')) };""")
    assert where["node"] == ["node1"] and where["pods"] == [], where


def test_a_dns_walk_tells_nodata_from_nxdomain_and_steps_the_answer(browser) -> None:
    steps = _walk(browser, "web.default.svc.cluster.local:80")
    assert not [text for kind, text in steps if "NODATA" in text and kind == "nxdomain"], steps
    assert any(kind == "answer" and "A web.default.svc.cluster.local" in text and "10.96.0.100" in text
               and "resolves to" not in text for kind, text in steps), steps


def test_a_small_window_keeps_the_controls_clear_and_zooms_on_the_lab(browser) -> None:
    size = browser.get_window_size()
    browser.set_window_size(900, 700)
    try:
        wait(browser, lambda d: d.execute_script("return document.getElementById('diagram')"
                                                 ".getBoundingClientRect().width") < 700, "the smaller window")
        browser.find_element(By.ID, "zoom-fit").click()
        clash = browser.execute_script("""
const z = document.getElementById('zoom').getBoundingClientRect();
return [...document.querySelectorAll('#diagram text')].filter((t) => { const b = t.getBoundingClientRect();
  return b.width && b.left < z.right && b.right > z.left && b.top < z.bottom && b.bottom > z.top; })
  .map((t) => t.textContent);""")
        assert clash == []
        for _ in range(3):
            browser.find_element(By.ID, "zoom-in").click()
        off = browser.execute_script("""
const svg = document.getElementById('diagram'), s = svg.getBoundingClientRect();
const boxes = [...svg.querySelectorAll('[data-place]')].map((e) => e.getBoundingClientRect());
const l = Math.min(...boxes.map((b) => b.left)), r = Math.max(...boxes.map((b) => b.right));
const t = Math.min(...boxes.map((b) => b.top)), b = Math.max(...boxes.map((b) => b.bottom));
return [Math.abs((l + r) / 2 - (s.left + s.right) / 2) / (r - l),
        Math.abs((t + b) / 2 - (s.top + s.bottom) / 2) / (b - t)];""")
        assert off[0] < 0.1 and off[1] < 0.1, off  # the view's centre is the lab's centre, not empty canvas
    finally:
        browser.set_window_size(size["width"], size["height"])
        browser.find_element(By.ID, "zoom-fit").click()


def test_ctrl_c_stops_the_server_and_leaves_nothing(ui: Ui) -> None:
    ui.proc.send_signal(signal.SIGINT)
    out, err = ui.proc.communicate(timeout=15)
    assert ui.proc.returncode == 0, err
    assert "stopped" in out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ui.port), timeout=1).close()
    children = subprocess.run(["pgrep", "-P", str(ui.proc.pid)], capture_output=True, text=True).stdout.split()
    assert children == []
