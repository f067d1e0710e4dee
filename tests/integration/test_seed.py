"""The explainer's cluster, built for real: every pod reaches every pod, and nobody NATs."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool
from tests.integration.conftest import in_lab, lab, leftovers, seed_spec, unique, write_spec

pytestmark = pytest.mark.integration

PODS = {"node1-pod1": "10.244.1.2", "node1-pod2": "10.244.1.3", "node2-pod1": "10.244.2.2"}


ROOT_SYSCTLS = ["net/core/rmem_max", "net/core/wmem_max", "net/ipv4/tcp_rmem", "net/ipv4/tcp_wmem",
                "net/core/netdev_max_backlog", "net/ipv4/neigh/default/gc_thresh1", "net/ipv4/ip_forward",
                "net/ipv4/conf/all/rp_filter", "net/bridge/bridge-nf-call-iptables"]


def root_view() -> dict[str, str]:
    """What the machine's own network looks like: links, routes, addresses, a few sysctls."""
    view = {key: Path(f"/proc/sys/{key}").read_text() for key in ROOT_SYSCTLS if Path(f"/proc/sys/{key}").exists()}
    view["links"] = " ".join(sorted(os.listdir("/sys/class/net")))
    view["routes"] = Path("/proc/net/route").read_text()
    view["fib"] = Path("/proc/net/fib_trie").read_text()
    return view


@pytest.fixture(scope="module")
def seed_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    require_root()
    require_tool("mnexec")
    name = unique("seed")
    spec = write_spec(tmp_path_factory.mktemp("seed"), seed_spec(name))
    # lab up's documented prerequisite on a modular kernel (kubeadm's too): its sysctls appearing in the
    # root namespace is the module loading, not a change of the machine's network the lab made
    from lab.apply import load_br_netfilter
    load_br_netfilter()
    before = root_view()
    out = lab("up", str(spec)).stdout
    assert "node1" in out and "10.244.2.2" in out
    yield name, before
    lab("down", name)
    assert leftovers(name) == {"netns": [], "state": []}
    assert root_view() == before


@pytest.fixture
def seed(seed_lab: tuple[str, dict[str, str]]) -> str:
    return seed_lab[0]


@pytest.fixture
def seed_and_root(seed_lab: tuple[str, dict[str, str]]) -> tuple[str, dict[str, str]]:
    return seed_lab


def test_status_shows_the_explainer_addresses(seed: str) -> None:
    info = json.loads(lab("status", seed, "--json").stdout)
    nodes = {n["name"]: (n["ip"], n["podCIDR"]) for n in info["nodes"]}
    assert nodes == {"node1": ("192.168.1.10", "10.244.1.0/24"), "node2": ("192.168.1.11", "10.244.2.0/24")}
    assert {p["name"]: p["ip"] for p in info["pods"] if p["namespace"] == "default"} == PODS
    assert all(p["status"] == "Running" for p in info["pods"])
    dns = [p for p in info["pods"] if p["namespace"] == "kube-system"]
    assert [(p["name"], p["node"]) for p in dns] == [("coredns", "node2")]  # as in the explainer's picture


def test_every_pod_pings_every_pod(seed: str) -> None:
    for src in PODS:
        for dst, ip in PODS.items():
            if src != dst:
                in_lab(seed, src, "ping", "-c1", "-W2", ip)


def test_receiver_sees_the_senders_pod_ip_across_nodes(seed: str) -> None:
    for src, dst in (("node1-pod1", "node2-pod1"), ("node2-pod1", "node1-pod2"), ("node1-pod1", "node1-pod2")):
        seen = in_lab(seed, src, "curl", "-s", "--max-time", "5", f"http://{PODS[dst]}:8080/clientip")
        assert seen.split(":")[0] == PODS[src], f"{src} -> {dst}: receiver saw {seen}"


def test_pod_has_its_own_hostname_and_node_does_not(seed: str) -> None:
    assert in_lab(seed, "node1-pod1", "hostname").strip() == "node1-pod1"
    assert in_lab(seed, "default/node2-pod1", "hostname").strip() == "node2-pod1"
    assert in_lab(seed, "node2-pod1", "curl", "-s", f"http://{PODS['node1-pod2']}:8080/hostname") == "node1-pod2"


def test_node_plumbing_is_cni0_veths_and_host_gw_routes(seed: str) -> None:
    routes = in_lab(seed, "node1", "ip", "-4", "route")
    assert "10.244.2.0/24 via 192.168.1.11 dev eth0" in routes
    assert "10.244.1.0/24 dev cni0" in routes
    cni0 = in_lab(seed, "node1", "ip", "-4", "-o", "addr", "show", "cni0")
    assert "10.244.1.1/24" in cni0
    ports = in_lab(seed, "node1", "ip", "-o", "link", "show", "master", "cni0")
    assert ports.count("veth") == 2  # node1-pod1 and node1-pod2
    assert in_lab(seed, "node1", "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "1"
    pod_route = in_lab(seed, "node1-pod1", "ip", "-4", "route")
    assert "default via 10.244.1.1 dev eth0" in pod_route


def test_the_root_namespace_is_untouched(seed_and_root: tuple[str, dict[str, str]]) -> None:
    _, before = seed_and_root
    assert root_view() == before  # no link, route, address or sysctl of the machine changed


def test_exec_names_an_unknown_target(seed: str) -> None:
    proc = lab("exec", "--lab", seed, "nosuchpod", "--", "true", check=False)
    assert proc.returncode == 2
    assert "no node, router or pod named nosuchpod" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_name_with_a_trailing_newline_is_shown_quoted_on_one_line(seed: str) -> None:
    """A name pasted with its newline (`lab exec "$(cat f)"`) split the one-line error in two, the second
    half prefixed again ("lab exec:  in lab ..."), and an empty name vanished from `lab delete`'s message."""
    for argv, wanted in ((("exec", "--lab", seed, "node1\n", "--", "true"), "named 'node1\\n' in lab"),
                         (("trace", "--lab", seed, "node1-pod1\n", "node2-pod1"), "named 'node1-pod1\\n' in lab"),
                         (("trace", "--lab", seed, "node1-pod1", "pod/x\n"), "no pod 'x\\n' in lab"),
                         (("trace", "--lab", seed, "node1-pod1", "nosuch\n"), "service named 'nosuch\\n' in lab"),
                         (("trace", "--lab", seed, "svc/web\n", "node1-pod1"), "'svc/web\\n': a trace starts in"),
                         (("delete", "--lab", seed, "pod", "node1-pod1\n"), "no pod default/'node1-pod1\\n' in lab"),
                         (("delete", "--lab", seed, "pod", ""), "no pod default/'' in lab")):
        proc = lab(*argv, check=False)
        assert proc.returncode != 0, argv
        assert len(proc.stderr.strip().splitlines()) == 1 and wanted in proc.stderr, (argv, proc.stderr)
    assert in_lab(seed, "node1-pod1", "hostname").strip() == "node1-pod1"  # nothing was deleted


def test_exec_returns_the_commands_exit_code(seed: str) -> None:
    assert lab("exec", "--lab", seed, "node1", "--", "sh", "-c", "exit 7", check=False).returncode == 7


def test_exec_of_a_command_that_cannot_run_exits_as_a_shell_would(seed: str, tmp_path) -> None:
    """127 for a command that is not there and 126 for one that cannot be executed, as a POSIX shell answers,
    so a script tells them from the command's own exit codes (they were 2 and 1, "[Errno 8] Exec format error")."""
    proc = lab("exec", "--lab", seed, "node1-pod1", "--", "nosuchcmd", check=False)
    assert proc.returncode == 127 and proc.stderr.strip() == "lab exec: command 'nosuchcmd' not found", proc.stderr
    junk = tmp_path / "not-a-program"
    junk.write_text("neither a script nor a binary\n")
    junk.chmod(0o755)
    proc = lab("exec", "--lab", seed, "node1", "--", str(junk), check=False)
    assert proc.returncode == 126 and proc.stderr.strip() == f"lab exec: command '{junk}' cannot run: Exec format error"


def test_lab_cilium_on_a_flannel_lab_says_so(seed: str) -> None:
    """It said "/sys/fs/bpf/... is not pinned: is lab seed a cilium lab, and node1 one of its nodes?": the
    tool knows both answers."""
    proc = lab("cilium", "--lab", seed, "node1", "service", "list", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"lab cilium: lab {seed} plays flannel: its services are kernel rules, not Cilium's maps (lab trace and "
        "lab graph show them); lab cilium reads a lab with cni.profile: cilium"), proc.stderr


def test_an_empty_lab_name_is_refused_while_a_lab_runs(seed: str) -> None:
    """`lab status ''` showed the running lab as if no name were given, while `lab down ''` refused the name."""
    for command in ("status", "down", "graph"):
        proc = lab(command, "", check=False)
        assert proc.returncode == 2 and proc.stderr.startswith(f"lab {command}: '' is not a lab name"), proc.stderr
    assert lab("status", seed).returncode == 0  # still running
