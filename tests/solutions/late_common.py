"""What the reference solutions of exercises 07-13 share: the `lab` CLI as a learner runs it, and the
answers file they write. Each solution does only what a learner can do (lab exec / apply / delete /
dns-count, reading `lab status`), so passing after it proves the exercise is solvable as told.

A solution runs as `python -m tests.solutions.sNN_slug LAB`; the answers file goes to the exercise folder
the running lab was built from (`lab status --json` names it), which is where `lab grade` reads it.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
ANSWERS = "answers.yaml"


def lab(*args: str, check: bool = True, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise RuntimeError(f"lab {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def run_in(name: str, target: str, *argv: str, check: bool = True) -> str:
    return lab("exec", "--lab", name, target, "--", *argv, check=check)


def status(name: str) -> dict[str, Any]:
    return json.loads(lab("status", name, "--json"))


def pod_ip(name: str, pod: str, namespace: str = "default") -> str:
    return next(p["ip"] for p in status(name)["pods"] if p["name"] == pod and p["namespace"] == namespace)


def apply(name: str, *manifests: dict) -> str:
    """`lab apply -f` of these manifests, written to a temporary file as a learner would."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(manifests, f, sort_keys=False)
    try:
        return lab("apply", "--lab", name, "-f", f.name)
    finally:
        Path(f.name).unlink()


def address_of(client_ip_answer: str) -> str:
    """agnhost's /clientip answers ADDRESS:PORT; the address."""
    return client_ip_answer.strip().rsplit(":", 1)[0]


def dns_count(name: str, pod: str, host: str) -> dict[str, Any]:
    return json.loads(lab("dns-count", "--lab", name, "--json", pod, host))


def answer(name: str, **values: Any) -> Path:
    """Add key: value lines to the answers file of the running lab's exercise (keeping earlier ones)."""
    folder = status(name)["exercise"]
    if not folder:
        raise RuntimeError(f"lab {name} was not built from an exercise folder")
    path = Path(folder) / ANSWERS
    data = yaml.safe_load(path.read_text()) if path.exists() else {}
    data = {**(data or {}), **values}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def grep(pattern: str, text: str) -> str:
    found = re.search(pattern, text, re.M)
    if found is None:
        raise RuntimeError(f"{pattern!r} not found in:\n{text}")
    return found.group(1)


def rebuild_with(name: str, pattern: str, replacement: str) -> None:
    """Change one line of the running exercise's lab.yaml (a regular expression that must match once) and
    rebuild the lab from it: what a learner does for a setting chosen when a lab is built (proxy mode, CNI)."""
    spec = Path(status(name)["exercise"]) / "lab.yaml"
    text, count = re.subn(pattern, replacement, spec.read_text(), flags=re.M)
    if count != 1:
        raise RuntimeError(f"{spec}: {pattern!r} matches {count} lines, not one")
    spec.write_text(text)
    lab("down", name)
    lab("up", str(spec.parent))


def agnhost_pod(name: str, node: str, labels: dict[str, str], port: int = 8080, **spec: Any) -> dict:
    container: dict[str, Any] = {"name": "app", "image": "agnhost", "args": ["netexec", f"--http-port={port}"]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": node, **spec, "containers": [container]}}


def main(solve) -> None:  # type: ignore[no-untyped-def]
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m {sys.modules['__main__'].__spec__.name} LAB")
    solve(sys.argv[1])
