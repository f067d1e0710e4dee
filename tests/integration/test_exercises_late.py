"""Honest grading of exercises 07-16, proved per exercise as test_exercises.py proves 01-06: on the fresh
lab every task check fails (and every guard check, `initially: pass`, passes), after the reference
solution (tests/solutions/sNN_*.py, doing only what a learner can do) every check passes, exit codes 1
then 0. The capstone (13) is graded with seeded random faults instead: something fails before, all
passes after the repairs.

The helpers (copying an exercise under a unique lab name, grading as JSON) are test_exercises.py's.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grading import checks
from tests.conftest import require_tool
from tests.integration import test_exercises as base
from tests.integration.conftest import REPO, lab, leftovers, unique

pytestmark = pytest.mark.integration

# exercise folder -> reference solution module (tests/solutions/)
EXERCISES = {
    "07-clusterip": "s07_clusterip",
    "08-proxy-scale": "s08_proxy_scale",
    "09-ndots": "s09_ndots",
    "10-nodeport-ingress": "s10_nodeport_ingress",
    "11-egress-nat": "s11_egress_nat",
    "12-network-policy": "s12_network_policy",
    "14-cilium-socket-lb": "s14_cilium_socket_lb",
    "15-vpc-ip-exhaustion": "s15_vpc_ip_exhaustion",
    "16-dns-storm": "s16_dns_storm",
}
TOOLS = {"09-ndots": ["dnsmasq"], "16-dns-storm": ["dnsmasq"], "10-nodeport-ingress": ["nginx"], "12-network-policy": ["vtysh"],
         "14-cilium-socket-lb": ["clang", "tcpdump"]}
# A seed whose 3 random faults (the exercise's `{random: 3}`, drawn by grading.faults.choose for this lab) leave
# pods in place: node2's flannel.1 FDB flushed, client-1's eth0 down, node1's KUBE-SERVICES rule for web
# deleted. The test adds one of every other kind the capstone can draw by hand (EXTRA), and the same
# rule deleted on node2 too, so the solution must repair every kind in one lab, at once.
CAPSTONE_SEED = 23
CAPSTONE_DRAWN = ["fdb-flush", "link-down", "rule-delete"]
CAPSTONE_EXTRA = [
    ["route-delete", "in=node2", "to=10.244.1.0/24"],
    ["link-mtu", "in=node1", "mtu=1400"],
    ["rule-delete", "in=node2", "chain=KUBE-SERVICES", r"match=default/web:http"],  # gone on both nodes now
    ["label", "pod=web-2", "key=app", "value=wbe"],
    ["veth-detach", "pod=web-1"],
]


def solve(module: str, name: str) -> None:
    proc = subprocess.run([sys.executable, "-m", f"tests.solutions.{module}", name], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def all_pass_after(name: str, ex: checks.Exercise) -> None:
    code, after = base.graded(name)
    failed = {c["name"]: c["detail"] for c in after["checks"] if not c["passed"] and not c.get("skipped")}
    assert (code, failed) == (0, {})
    assert after["score"] == after["maxScore"] == ex.max_points
    assert after["after"] == str(ex.after_file)  # the notes with the numbers, now that everything passes


@pytest.mark.parametrize("slug", list(EXERCISES))
def test_task_checks_fail_before_and_all_pass_after_the_solution(slug: str, tmp_path: Path) -> None:
    for tool in TOOLS.get(slug, []):
        require_tool(tool)
    name = unique("exl")
    folder = base.copy_exercise(slug, tmp_path, name)
    try:
        lab("up", str(folder))
        ex = checks.load(folder)
        code, before = base.graded(name)
        assert code == 1
        got = {c["name"]: c for c in before["checks"]}
        for check in ex.checks:
            if got[check.name].get("skipped"):
                continue  # a check for a kernel feature this kernel lacks (IPVS): neither passes nor fails
            assert got[check.name]["passed"] is (check.initially == "pass"), (check.name, got[check.name]["detail"])
        if slug == "09-ndots":  # the fix's check ran on the fresh lab and printed the count tasks' answers
            assert not any("queries at the cluster DNS" in c["detail"] for c in before["checks"]), before
        solve(EXERCISES[slug], name)
        all_pass_after(name, ex)
    finally:
        lab("down", name, check=False)
        assert leftovers(name) == {"netns": [], "state": []}


def capstone_kinds(name: str) -> set[str]:
    """Every fault kind `lab break --random` (and the capstone's `{random: N}`) can draw for this lab."""
    from apiserver import state
    from grading import faults

    st = state.load(name)
    assert st is not None
    lookup = faults.lookup_of(st)
    return {f.name for f in faults.FAULTS.values() if f.candidates(lookup.lab, st)}


def test_capstone_random_faults_are_reproducible_and_repairable(tmp_path: Path) -> None:
    name = unique("exl")
    folder = base.copy_exercise("13-capstone", tmp_path, name)
    try:
        up = lab("up", str(folder), "--seed", str(CAPSTONE_SEED))
        assert f"3 random faults applied (seed {CAPSTONE_SEED})" in up.stderr
        assert not any(kind in up.stdout + up.stderr for kind in CAPSTONE_DRAWN + ["flannel.1", "KUBE-SERVICES"])
        # The puzzle stays one: `lab status` (table and JSON) gives the seed, not the faults; --reveal does.
        hidden = lab("status", name, "--json").stdout + lab("status", name).stdout
        assert not any(kind in hidden for kind in CAPSTONE_DRAWN) and f"seed {CAPSTONE_SEED}" in hidden
        info = json.loads(lab("status", name, "--json", "--reveal").stdout)
        assert sorted(f["fault"] for f in info["faults"]) == CAPSTONE_DRAWN  # the same seed, the same faults
        for extra in CAPSTONE_EXTRA:
            lab("break", "--lab", name, *extra)
        # node2's FDB is flushed already (a drawn fault): a second flush is refused with what it found, and
        # neither blames the VXLAN backend nor names the hidden fault
        again = lab("break", "--lab", name, "fdb-flush", "in=node2", check=False)
        assert again.returncode == 2 and "deleted already" in again.stderr, again.stderr
        assert "backend" not in again.stderr and len(again.stderr.splitlines()) == 1
        applied = {f["fault"] for f in json.loads(lab("status", name, "--json", "--reveal").stdout)["faults"]}
        assert applied == capstone_kinds(name), "every kind the capstone can draw is repaired here"
        ex = checks.load(folder)
        code, before = base.graded(name)
        assert code == 1
        assert {c["task"] for c in before["checks"] if not c["passed"]} == {t.id for t in ex.tasks}
        solve("s13_capstone", name)
        all_pass_after(name, ex)
        # A veth unplugged from cni0 is no bridge port at all: `bridge link` leaves it out, and the check that
        # read only the ports listed passed with client-2 cut off
        lab("break", "--lab", name, "veth-detach", "pod=client-2")
        code, after = base.graded(name, "--only", "node2-ports-as-plugged")
        assert code == 1 and not after["checks"][0]["passed"], after["checks"]
    finally:
        lab("down", name, check=False)
        assert leftovers(name) == {"netns": [], "state": []}
