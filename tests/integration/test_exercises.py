"""Honest grading, proved per exercise: on the fresh (broken) lab every task check fails, after the
reference solution (tests/solutions/, doing only what a learner can do) every check passes; and grading
never passes on a lab that is down or on namespaces that hold nothing.

Each exercise is copied to a temporary folder and its lab renamed (unique name), so tests never collide
with a learner's or another test's lab, and the answers file the solution writes stays out of labs/.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from apiserver.spec import parse_spec_text
from apiserver import state
from grading import checks, faults, grade, probes, schema
from observe import targets
from tests.conftest import require_tool
from tests.integration.conftest import REPO, lab, leftovers, unique
from topo import names, netns

SOLUTIONS = REPO / "tests" / "solutions"
# exercise folder -> reference solution (exercises 07-13 add their rows here or in their own test file)
EXERCISES = {
    "01-namespaces": "01_namespaces.sh",
    "02-veth-cni0": "02_veth_cni0.sh",
    "03-ipam": "03_ipam.sh",
    "04-host-gw": "04_host_gw.sh",
    "05-vxlan-mtu": "05_vxlan_mtu.sh",
    "06-bgp-tor": "06_bgp_tor.sh",
}


def copy_exercise(slug: str, tmp: Path, name: str) -> Path:
    folder = tmp / slug
    shutil.copytree(REPO / "labs" / slug, folder)
    spec = folder / "lab.yaml"
    data = yaml.safe_load(spec.read_text())
    data["metadata"]["name"] = name
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    (folder / schema.ANSWERS_FILE).unlink(missing_ok=True)
    return folder


def graded(name: str, *extra: str) -> tuple[int, dict]:
    proc = lab("grade", "--lab", name, "--json", *extra, check=False, timeout=180)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize("slug", list(EXERCISES))
def test_task_checks_fail_before_and_all_pass_after_the_solution(slug: str, tmp_path: Path) -> None:
    if slug == "06-bgp-tor":
        require_tool("vtysh")
    if slug == "05-vxlan-mtu":
        require_tool("iperf3")
    name = unique("ex")
    folder = copy_exercise(slug, tmp_path, name)
    try:
        up = lab("up", str(folder))
        ex = checks.load(folder)
        # What the exercise broke is the puzzle: `lab up` and `lab status` say that it broke something, never
        # what (02's README: "`lab status` looks fine"); --reveal does.
        if ex.faults:
            assert "faults: the exercise broke something after the lab came up: find it" in up.stderr, up.stderr
        for fault in json.loads(lab("status", name, "--json", "--reveal").stdout)["faults"]:
            assert fault["exercise"] and fault["detail"] and fault["detail"] not in up.stdout + up.stderr
            assert fault["detail"] not in lab("status", name).stdout
            assert "a fault of the exercise: find it" in lab("status", name).stdout
        code, before = graded(name)
        assert code == 1
        got = {c["name"]: c for c in before["checks"]}
        for check in ex.checks:
            if check.initially == "any":
                continue  # depends on which random faults were drawn
            expected = check.initially == "pass"
            assert got[check.name]["passed"] is expected, (check.name, got[check.name]["detail"])
        assert before["score"] < before["maxScore"]
        solution = subprocess.run(["bash", str(SOLUTIONS / EXERCISES[slug]), name], capture_output=True, text=True,
                                  timeout=120, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "KUBENET_PYTHON": sys.executable})
        assert solution.returncode == 0, solution.stdout + solution.stderr
        junit = tmp_path / "grade.xml"
        code, after = graded(name, "--junit", str(junit))
        failed = {c["name"]: c["detail"] for c in after["checks"] if not c["passed"]}
        assert (code, failed) == (0, {}), after
        assert after["score"] == after["maxScore"] == ex.max_points
        suite = ET.parse(junit).getroot().find("testsuite")
        assert suite is not None and (suite.get("tests"), suite.get("failures")) == (str(len(ex.checks)), "0")
        table = lab("grade", "--lab", name).stdout  # the default exercise: the one the lab was built from
        assert f"score {ex.max_points}/{ex.max_points}" in table
        assert table.rstrip().endswith("(what you should have seen, precisely)") and "AFTER.md" in table
        assert before["after"] is None and after["after"] == str(folder / schema.AFTER_FILE)
    finally:
        lab("down", name, check=False)
        assert leftovers(name) == {"netns": [], "state": []}


def test_grading_a_lab_that_is_down_or_was_no_exercise_exits_2(tmp_path: Path, lab_up) -> None:
    proc = lab("grade", "--lab", unique("nolab"), str(REPO / "labs" / "04-host-gw"), check=False)
    assert proc.returncode == 2 and "is not running" in proc.stderr
    name = unique("ex")
    lab_up({"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"dns": {"enabled": False}, "nodes": [{"name": "node1", "ip": "192.168.1.10"}]}})
    proc = lab("grade", "--lab", name, check=False)
    assert proc.returncode == 2 and "was not built from an exercise folder" in proc.stderr
    missing = tmp_path / "answrs.yaml"  # named on the command line, not there: a usage error, nothing graded
    proc = lab("grade", "--lab", name, str(REPO / "labs" / "04-host-gw"), "--answers", str(missing), check=False)
    assert (proc.returncode, proc.stdout) == (2, "") and proc.stderr.startswith(f"lab grade: --answers {missing}: ")
    assert len(proc.stderr.splitlines()) == 1 and "no such file" in proc.stderr
    bad = tmp_path / "bad"
    shutil.copytree(REPO / "labs" / "04-host-gw", bad)
    text = (bad / "checks.yaml").read_text().replace("via: node2", "via: node2, viaa: x")
    (bad / "checks.yaml").write_text(text)
    proc = lab("grade", "--lab", name, str(bad), check=False)
    assert proc.returncode == 2 and "checks.yaml:" in proc.stderr and "unknown field 'viaa'" in proc.stderr


def test_a_bad_checks_file_stops_lab_up_before_anything_is_built(tmp_path: Path) -> None:
    name = unique("ex")
    folder = copy_exercise("04-host-gw", tmp_path, name)
    text = (folder / "checks.yaml").read_text().replace("fault: route-delete", "fault: route-delet")
    (folder / "checks.yaml").write_text(text)
    proc = lab("up", str(folder), check=False)
    assert proc.returncode == 2
    assert "unknown fault 'route-delet' (did you mean 'route-delete'?)" in proc.stderr
    assert leftovers(name) == {"netns": [], "state": []}


def test_lab_break_faults_are_recorded_and_the_random_choice_is_seeded(tmp_path: Path) -> None:
    name = unique("ex")
    folder = copy_exercise("04-host-gw", tmp_path, name)
    try:
        lab("up", str(folder))
        assert "deleted the route to 10.244.2.0/24 on node1 (the exercise's)" in lab("status", name, "--reveal").stdout
        # graded against another exercise: said (every check fails for that reason); another copy of its own: not
        other = lab("grade", "--lab", name, str(REPO / "labs" / "01-namespaces"), "--only", "pause-pid", check=False)
        assert other.stderr.startswith(f"Warning: lab {name} was built from {folder} (host-gw, and why"), other.stderr
        own = lab("grade", "--lab", name, str(REPO / "labs" / "04-host-gw"), "--only", "route-back", check=False)
        assert "Warning" not in own.stderr, own.stderr
        lab("break", "--lab", name, "link-mtu", "in=web-2", "mtu=1300")
        assert "mtu 1300" in lab("exec", "--lab", name, "web-2", "--", "ip", "link", "show", "eth0").stdout
        proc = lab("break", "--lab", name, "link-mtu", "in=web-2", "mtu=x", check=False)
        assert proc.returncode == 2 and "must be an integer" in proc.stderr
        first = lab("break", "--lab", name, "--random", "--seed", "11").stdout
        assert "random fault (seed 11)" in first and "route" not in first  # the puzzle stays a puzzle
        info = json.loads(lab("status", name, "--json").stdout)
        assert [f["fault"] for f in info["faults"][:2]] == [None, "link-mtu"]  # the exercise's own is its puzzle
        assert info["faults"][0]["exercise"] and not info["faults"][1]["exercise"]
        assert (info["faults"][2]["seed"], info["faults"][2]["fault"], info["faults"][2]["detail"]) == (11, None, None)
        revealed = json.loads(lab("status", name, "--json", "--reveal").stdout)["faults"][2]
        assert revealed["seed"] == 11 and revealed["fault"] in faults.FAULTS and revealed["detail"]
        drawn = lab("break", "--lab", name, "--random").stdout  # no seed: one is drawn, and printed
        assert re.fullmatch(r"applied a random fault \(seed [0-9]+\); find it\n", drawn), drawn
        proc = lab("break", "--lab", name, "--random", "--count", "0", check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("lab break: --count must be 1 to 5")
        proc = lab("break", "--lab", name, "fdb-flush", "in=node1", check=False)  # host-gw: nothing to flush
        assert proc.returncode != 0 and "flushed" not in proc.stdout
    finally:
        lab("down", name, check=False)


def test_a_lowered_nic_mtu_drops_bulk_tcp_as_on_real_hardware(tmp_path: Path) -> None:
    """Exercise 05's fault (node2's eth0 at 1400 behind a 1500-byte switch port) must black-hole a TCP request
    larger than the MTU, as a NIC does: the request's segments cross the underlay in VXLAN frames of up to
    1514 bytes. A veth passes a segmentation-offloaded packet whole to a peer of any MTU, so before the fault
    made the other end of the cable cut such packets into wire-sized frames, curl printed 200 here. A pod's
    veth is left alone (a pod's eth0 is a veth in a real cluster too)."""
    require_tool("curl")
    name = unique("ex")
    folder = copy_exercise("05-vxlan-mtu", tmp_path, name)
    big = "10.244.2.2:8080/echo?msg=" + "x" * 3000
    curl = ["curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}", big]
    try:
        lab("up", str(folder))
        assert lab("exec", "--lab", name, "a", "--", *curl, check=False).stdout == "000"
        lab("exec", "--lab", name, "node2", "--", "ip", "link", "set", "dev", "eth0", "mtu", "1500")
        assert lab("exec", "--lab", name, "a", "--", *curl).stdout == "200"  # the fix, at full size
        lab("break", "--lab", name, "link-mtu", "in=b", "mtu=1300")
        node = names.node_netns(name, "node2")
        host_side = [line for line in subprocess.run(["ip", "netns", "exec", node, "ip", "-o", "link"], text=True,
                                                     capture_output=True, check=True).stdout.splitlines()
                     if ": veth" in line]
        veth = host_side[0].split(": ")[1].split("@")[0]
        features = subprocess.run(["ip", "netns", "exec", node, "ethtool", "-k", veth], text=True,
                                  capture_output=True, check=True).stdout
        assert "generic-segmentation-offload: on" in features, features
    finally:
        lab("down", name, check=False)
        assert leftovers(name) == {"netns": [], "state": []}


# ------------------------------------------------------------------ no check passes vacuously on a live lab


VACUOUS = """
apiVersion: kubenet-lab/v1alpha1
kind: Exercise
title: checks that used to pass on a lab whose source is broken
tasks: [{id: t, title: t}]
checks:
  # ex04's fault: node1 has no route to node2's pods, so web-1's connection fails at once with "Network
  # is unreachable" (an ICMP error from node1): that is not a drop.
  - {name: vacuous-unreachable-is-no-drop, task: t, description: d,
     reach: {from: web-1, to: web-2, port: 8080, expect: blocked}}
  # Nothing listens on port 9 of node1: an RST, a refusal, which is not a drop either, unless asked for.
  - {name: vacuous-refused-is-no-drop, task: t, description: d,
     reach: {from: web-1, to: node1, port: 9, expect: blocked}}
  - {name: honest-refused, task: t, description: d, reach: {from: web-1, to: node1, port: 9, expect: refused}}
  - {name: vacuous-failing-command, task: t, description: d, command: {in: node1, argv: ["false"], notMatch: x}}
  - {name: guard, task: t, description: d, initially: pass, points: 0, reach: {from: web-1, to: web-2, port: 8080}}
  - {name: vacuous-guard-fails, task: t, description: d, needs: [guard],
     command: {in: node1, argv: ["true"]}}
  - {name: vacuous-no-cluster-dns, task: t, description: d, dns: {from: web-1, name: x.example., resolves: false}}
"""


def test_checks_never_pass_because_their_source_is_broken(tmp_path: Path) -> None:
    """ex04's fresh lab (node1 lost its route to node2's pods): blocked means dropped, refused only when
    asked, a failing command matches nothing, a check needing a failed guard fails, DNS needs a DNS."""
    name = unique("ex")
    folder = copy_exercise("04-host-gw", tmp_path, name)
    probe_folder = tmp_path / "vacuous"
    probe_folder.mkdir()
    (probe_folder / schema.CHECKS_FILE).write_text(VACUOUS)
    try:
        lab("up", str(folder))
        proc = lab("grade", "--lab", name, str(probe_folder), "--json", check=False)
        assert proc.returncode == 1, proc.stderr
        got = {c["name"]: (c["passed"], c["detail"]) for c in json.loads(proc.stdout)["checks"]}
        assert {k for k, (ok, _) in got.items() if ok} == {"honest-refused"}, got
        assert "Network is unreachable" in got["vacuous-unreachable-is-no-drop"][1]
        assert "refused" in got["vacuous-refused-is-no-drop"][1]
        assert "not run" in got["vacuous-guard-fails"][1]
        proc = lab("grade", "--lab", name, str(probe_folder), "--only", "honest-refusd", check=False)
        assert proc.returncode == 2 and "did you mean 'honest-refused'" in proc.stderr
    finally:
        lab("down", name, check=False)


UNREACHABLE_DNS = """
apiVersion: kubenet-lab/v1alpha1
kind: Exercise
title: a lookup from a pod cut off from the cluster DNS
tasks: [{id: t, title: t}]
checks:
  - {name: lookup, task: t, description: d, dns: {from: a, name: api.example.com, resolves: false}}
"""


def test_a_lookup_that_gets_no_answer_fails_in_seconds_not_resolver_timeouts(tmp_path: Path, lab_up) -> None:
    """A pod unplugged from cni0 (the capstone's veth-detach) reaches no DNS server: glibc's resolver waits its
    timeout for every name of the search list (the capstone's first grade spent 20.6 s in one such check). The
    check gives the lookup a few seconds, then fails saying why; a dead DNS still passes nothing."""
    name = unique("dnsto")
    lab_up({"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"nodes": [{"name": "node1", "ip": "192.168.1.10"}, {"name": "node2", "ip": "192.168.1.11"}],
                     "objects": [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"},
                                  "spec": {"nodeName": "node1", "containers": [{"name": "p", "image": "pause"}]}}]}})
    lab("break", "--lab", name, "veth-detach", "pod=a")
    folder = tmp_path / "dns"
    folder.mkdir()
    (folder / schema.CHECKS_FILE).write_text(UNREACHABLE_DNS)
    proc = lab("grade", "--lab", name, str(folder), "--json", check=False)
    check = json.loads(proc.stdout)["checks"][0]
    assert proc.returncode == 1 and not check["passed"], check
    assert "gave no answer within 5 s" in check["detail"], check


# ------------------------------------------------------------------ no check passes on an empty lab


EVERY_KIND = """
apiVersion: kubenet-lab/v1alpha1
kind: Exercise
title: every probe kind, aimed at namespaces that hold nothing
tasks: [{id: t, title: t}]
checks:
  - {name: reach, task: t, description: d, reach: {from: node1, to: 10.244.1.2, port: 80}}
  - {name: reach-blocked, task: t, description: d, reach: {from: node1, to: 10.244.1.2, port: 80, expect: blocked}}
  - {name: reach-pod, task: t, description: d, reach: {from: web, to: node1, port: 80, expect: blocked}}
  - {name: reach-refused, task: t, description: d, reach: {from: node1, to: 10.244.1.2, port: 80, expect: refused}}
  - {name: http, task: t, description: d, http: {from: node1, to: 10.244.1.2, port: 80, status: 404}}
  - {name: http-host, task: t, description: d, http: {from: node1, to: 10.244.1.2, host: a.example.com, status: 404}}
  - {name: dns, task: t, description: d, dns: {from: web, name: api.example.com, resolves: false}}
  - {name: dns-queries-only, task: t, description: d, dns: {from: web, name: api.example.com, queries: {max: 8}}}
  - {name: route, task: t, description: d, route: {in: node1, to: 10.244.2.0/24}}
  - {name: route-absent, task: t, description: d, route: {in: node1, to: 10.244.2.0/24, present: false}}
  - {name: bgp, task: t, description: d, bgp: {in: node1, state: Idle}}
  - {name: rule, task: t, description: d, rule: {in: node1, table: nat, chain: KUBE-SERVICES}}
  - {name: rule-absent, task: t, description: d, rule: {in: node1, table: nat, chain: POSTROUTING, match: MASQ, present: false}}
  - {name: nft-absent, task: t, description: d, rule: {in: node1, tool: nft, table: kube-proxy, match: x, present: false}}
  - {name: link, task: t, description: d, link: {in: node1, dev: lo}}
  - {name: link-absent, task: t, description: d, link: {in: node1, dev: cni0, present: false}}
  - {name: hairpin, task: t, description: d, link: {hostVethOf: web, hairpin: false}}
  - {name: veth, task: t, description: d, link: {hostVethOf: web, present: false}}
  - {name: command, task: t, description: d, command: {in: node1, argv: ["true"]}}
  - {name: command-fails, task: t, description: d, command: {in: node1, argv: ["false"], exitCode: 1}}
  - {name: command-not-match, task: t, description: d, command: {in: node1, argv: ["false"], notMatch: x}}
  - {name: guarded, task: t, description: d, needs: [link-absent], command: {in: node1, argv: ["true"]}}
  - {name: iperf, task: t, description: d, iperf: {from: node1, to: web, minMbit: 0.001}}
  - {name: pods, task: t, description: d, pods: {name: web}}
  - {name: lbmap, task: t, description: d, lbmap: {in: node1, service: web}}
  - {name: answer, task: t, description: d, answer: {key: k, value: {podCapacity: node1}}}
"""


def test_every_check_kind_fails_on_an_empty_namespace(tmp_path: Path) -> None:
    """A lab whose node is a namespace with nothing in it (only a down lo) and whose pod's pause process
    is gone: every kind of check fails, including those that expect an absence."""
    name = unique("gx")
    spec = ("apiVersion: kubenet-lab/v1alpha1\nkind: Lab\nmetadata: {name: %s}\nspec:\n  dns: {enabled: false}\n"
            "  nodes: [{name: node1, ip: 192.168.1.10}]\n" % name)
    ns = names.node_netns(name, "node1")
    pod_ns = names.pod_netns(name, "default", "web")
    st = state.LabState(name=name, phase="up", pid=1, spec_file=None, spec_text=spec)
    st.pods["default/web"] = state.PodState(node="node1", ip="10.244.1.2", netns=pod_ns, pause_pid=2 ** 22 + 7)
    ex = checks.parse(EVERY_KIND, "every.yaml", tmp_path)
    assert {c.kind for c in ex.checks} == set(schema.PROBES)
    (tmp_path / schema.ANSWERS_FILE).write_text("k: 253\n")
    netns.ensure_dir()
    netns.create(ns)
    netns.create(pod_ns)
    try:
        ctx = probes.Context(targets.Lookup(st, parse_spec_text(spec)), tmp_path / schema.ANSWERS_FILE)
        done: dict[str, grade.Outcome] = {}
        for check in ex.checks:
            done[check.name] = grade._unmet(check, done) or grade.run_check(ctx, check)
        outcomes = list(done.values())
        passed = [(o.check.name, o.detail) for o in outcomes if o.passed]
        assert passed == []
        details = {o.check.name: o.detail for o in outcomes}
        assert "no interface up" in details["route-absent"] and "not running" in details["reach-pod"]
    finally:
        netns.delete(ns)
        netns.delete(pod_ns)
