#!/usr/bin/env python3
"""How fast `lab ui` is, as a user sees it in Debian's headless chromium: the first paint of a lab (page
navigation to the diagram drawn), how long drawing takes in the page, how long the server takes to read the
lab back (lab graph's comparison), and how long a `lab apply` of one pod takes to show on an open page
(from `lab apply` returning to the pod in the page's SVG), for the seed lab and for 50 nodes x 20 pods.

    .venv/bin/python bench/ui.py [--repeat 5] [--big-nodes 50] [--big-pods 20] [--screenshot PNG]   (as root)

Every lab and server it starts is stopped at the end, also on failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.lab_updown import scale_spec, seed_spec  # noqa: E402


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,900"):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def wait_for(driver, script: str, timeout: float = 30.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if driver.execute_script(script):
            return time.perf_counter() - start
        time.sleep(0.01)
    raise TimeoutError(script)


def measure(label: str, spec: dict, repeat: int, folder: Path, shot: Path | None = None) -> dict:
    import yaml

    name = spec["metadata"]["name"]
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    server = driver = None
    out: dict = {"lab": label}
    try:
        cli("up", "-q", str(path))
        server = subprocess.Popen([sys.executable, "-m", "lab.cli", "ui", "--lab", name], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        url = server.stdout.readline().split(" at ", 1)[1].strip()
        token = url.split("token=", 1)[1]
        base = url.split("?", 1)[0]
        graph_s = []
        for _ in range(repeat):
            start = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(f"{base}api/graph?fresh",
                                                               headers={"Authorization": f"token {token}"})) as r:
                size = len(r.read())
            graph_s.append(time.perf_counter() - start)
            time.sleep(0.3)  # past the server's cache
        driver = browser()
        paints, renders = [], []
        for _ in range(repeat):
            driver.get(url)
            wait_for(driver, "return window.__labui && window.__labui.renders > 0")
            paints.append(driver.execute_script("return window.__labui.updatedAt - performance.timeOrigin") / 1000)
            renders.append(driver.execute_script("return window.__labui.lastRenderMs") / 1000)
        elements = driver.execute_script("return document.querySelectorAll('#diagram *').length")
        if shot is not None:
            shot.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(shot))
        updates = []
        for i in range(repeat):
            pod = f"bench-ui-{i}"
            manifest = folder / f"{pod}.yaml"
            manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod},
                                            "spec": {"nodeName": "node2",
                                                     "containers": [{"name": "pause", "image": "pause"}]}}))
            cli("apply", "--lab", name, "-f", str(manifest))
            updates.append(wait_for(driver, f"return document.querySelector('[data-pod=\"default/{pod}\"]')"))
        out.update(graph_json_kb=round(size / 1024), svg_elements=elements,
                   server_graph_s=statistics.median(graph_s), first_paint_s=statistics.median(paints),
                   render_s=statistics.median(renders), update_after_apply_s=statistics.median(updates),
                   update_max_s=max(updates))
        return out
    finally:
        if driver is not None:
            driver.quit()
        if server is not None:
            server.send_signal(signal.SIGINT)
            server.wait(15)
        subprocess.run([sys.executable, "-m", "lab.cli", "down", name], cwd=REPO, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--big-nodes", type=int, default=50)
    parser.add_argument("--big-pods", type=int, default=20)
    parser.add_argument("--screenshot", metavar="PNG", help="save the big lab's page here (docs/ui/1000-pods.png)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(measure("seed", seed_spec(f"bui-{uuid.uuid4().hex[:6]}"), args.repeat, Path(tmp)))
        big = f"{args.big_nodes} nodes x {args.big_pods} pods"
        rows.append(measure(big, scale_spec(f"bui-{uuid.uuid4().hex[:6]}", args.big_nodes, args.big_pods),
                            args.repeat, Path(tmp), Path(args.screenshot) if args.screenshot else None))
    keys = ["lab", "first_paint_s", "render_s", "server_graph_s", "update_after_apply_s", "update_max_s",
            "svg_elements", "graph_json_kb"]
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
