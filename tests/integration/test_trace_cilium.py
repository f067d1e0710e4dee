"""`lab trace` in a cilium lab (tunnel mode), on the real kernel: the probe leaves from inside the node's
lab cgroup, so the socket-LB programs translate it exactly as they translate a pod's own process.

Each test reads what the trace reports and checks it against what the lab must hold: the socket-LB hop
names the program and hook (connect4 for TCP, sendmsg4 for a DNS query), the frontend and the backend id
and slot, as the node's maps hold them; the client pod's eth0 (a real capture) only ever carries the
backend's address; the VXLAN hop names the cilium_tunnel_map entry (remote PodCIDR -> node IP); NodePort
from the external host names cil_from_netdev and its cilium_ct4_global entry; and a backend slot deleted
by `lab break cilium-backend-delete` (exercise 14's fault) shows up as the socket LB refusing connect(); a
NetworkPolicy drop (no rule counter moves in this profile) is named from the lxc program's own events, with
the deciding policy, also while a `lab observe` reads the same ring (which then still gets every event).
"""
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.conftest import require_root, require_tool
from tests.integration.conftest import lab, leftovers, unique, write_spec

pytestmark = pytest.mark.integration

NODE_IPS = {"node1": "192.168.1.10", "node2": "192.168.1.11"}
AGNHOST = [{"name": "app", "image": "agnhost", "args": ["netexec", "--http-port=8080"]}]


def _pod(name: str, node: str, app: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": AGNHOST}}


def _service(name: str, **spec: object) -> dict:
    port: dict = {"name": "http", "port": 80, "targetPort": 8080}
    if "nodePort" in spec:
        port["nodePort"] = spec.pop("nodePort")
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": "web"}, "ports": [port], **spec}}


# `guarded` (node1) admits only app=web on its port: the client (node2) is denied, as shop/api is in
# labs/examples/policy-cilium.yaml; its Service makes the trace go through the socket LB first.
GUARDED = [_pod("guarded", "node1", "guarded"),
           {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "guarded"},
            "spec": {"selector": {"app": "guarded"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
           {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "guarded-from-web"},
            "spec": {"podSelector": {"matchLabels": {"app": "guarded"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                  "ports": [{"port": 8080}]}]}}]


def _spec(name: str) -> dict:
    """The backend web-1 on node1, the client on node2 (CoreDNS too: the last node), an external host;
    `lone` is a second Service of the same backend for the fault, so `web` stays whole; `guarded` and its
    policy for the drops."""
    return {"apiVersion": "kubenet-lab/v1alpha1", "kind": "Lab", "metadata": {"name": name},
            "spec": {"cni": {"profile": "cilium"},
                     "nodes": [{"name": n, "ip": ip} for n, ip in NODE_IPS.items()],
                     "external": [{"name": "ext", "ip": "192.168.1.200"}],
                     "objects": [_pod("web-1", "node1", "web"), _pod("client", "node2", "client"),
                                 _service("web", type="NodePort", nodePort=30080), _service("lone"), *GUARDED]}}


@pytest.fixture(scope="module")
def cil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    require_root()
    require_tool("mnexec")
    require_tool("clang")
    name = unique("trc")
    lab("up", str(write_spec(tmp_path_factory.mktemp(name), _spec(name))))
    try:
        info = json.loads(lab("status", name, "--json").stdout)
        yield {"name": name, "ips": {p["name"]: p["ip"] for p in info["pods"]},
               "vip": {s["name"]: s["clusterIP"] for s in info["services"]}}
    finally:
        lab("down", name, check=False)
    assert leftovers(name) == {"netns": [], "state": []}


def trace(name: str, *args: str) -> tuple[int, dict]:
    proc = lab("trace", "--lab", name, "--json", *args, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def service_map(name: str, node: str) -> list[dict]:
    return json.loads(lab("cilium", "--lab", name, node, "service", "list", "--json").stdout)


def _socket_lb(t: dict) -> dict:
    hops = [h for h in t["hops"] if h["kind"] == "socket-lb"]
    assert len(hops) == 1 and hops[0]["place"] == t["source"], t["hops"]
    return hops[0]["detail"]


def test_clusterip_from_a_pod_on_another_node_names_the_socket_lb_and_the_tunnel(cil: dict) -> None:
    name, web, vip = cil["name"], cil["ips"]["web-1"], cil["vip"]["web"]
    code, t = trace(name, "client", "svc/web")
    assert code == 0 and t["delivered"] and t["answered"] and t["reached"] == "web-1", t["verdict"]
    lb = _socket_lb(t)
    assert (lb["program"], lb["hook"], lb["rewritten"]) == ("cil_sock4_connect", "connect4", True)
    assert lb["cgroup"].endswith(f"/klab_{name}/node2") and lb["node"] == "node2"
    assert (lb["frontend"], lb["backend"]) == (f"{vip}:80", f"{web}:8080")
    held = next(s for s in service_map(name, "node2") if s["frontend"] == f"{vip}:80/TCP")
    assert lb["count"] == held["count"] == 1 and lb["slot"] == 1
    assert lb["backend_id"] == held["backends"][0]["id"] and lb["revnat"] == held["id"] and lb["cookie"] > 0
    # The client pod's eth0, as captured: the backend's address from the first packet, never the ClusterIP.
    at_client = [h for h in t["hops"] + t["reply"] if h["place"] == "client" and h["packet"]]
    assert at_client and all(vip not in h["packet"] for h in at_client)
    first = next(h for h in t["hops"] if h["kind"] == "out")
    assert (first["place"], first["dev"]) == ("client", "eth0") and f"> {web}:8080 [SYN]" in first["packet"]
    # Across nodes in tunnel mode: the tunnel map entry (node1's PodCIDR -> node1) and the VXLAN hop.
    encap = [h for h in t["hops"] if h["kind"] == "encap"]
    assert len(encap) == 1 and encap[0]["place"] == "node2"
    detail = encap[0]["detail"]
    assert (detail["outer_src"], detail["outer_dst"], detail["port"]) == (NODE_IPS["node2"], NODE_IPS["node1"], 8472)
    assert "cilium_tunnel_map[10.244.1.0] = 192.168.1.10" in detail["tunnel_map"]
    assert [h["kind"] for h in t["hops"]].count("decap") == 1
    assert not any(h["kind"] in ("dnat", "snat") for h in t["hops"])  # no rule translated anything
    back = [h for h in t["reply"] if h["kind"] == "socket-lb"]
    assert back and back[-1]["detail"] == {"program": "cil_sock4_getpeername", "hook": "getpeername4",
                                           "peer": f"{vip}:80"}


def test_a_dns_query_to_the_cluster_dns_goes_through_sendmsg4(cil: dict) -> None:
    name, dns = cil["name"], cil["ips"]["kube-system/coredns" if "kube-system/coredns" in cil["ips"] else "coredns"]
    code, t = trace(name, "web-1", "10.96.0.10:53", "--protocol", "udp")
    assert code == 0 and t["delivered"] and t["answered"], t["verdict"]
    lb = _socket_lb(t)
    assert (lb["program"], lb["hook"]) == ("cil_sock4_sendmsg", "sendmsg4")
    assert (lb["frontend"], lb["backend"]) == ("10.96.0.10:53", f"{dns}:53")
    at_source = [h for h in t["hops"] + t["reply"] if h["place"] == "web-1" and h["packet"]]
    assert at_source and all("10.96.0.10" not in h["packet"] for h in at_source)
    back = [h for h in t["reply"] if h["kind"] == "socket-lb"]
    assert back and back[-1]["detail"]["program"] == "cil_sock4_recvmsg"
    assert back[-1]["detail"]["peer"] == "10.96.0.10:53"  # what the resolver's recvfrom() returned


@pytest.mark.parametrize("node", ["node1", "node2"])
def test_nodeport_from_the_external_host_names_cil_from_netdev_and_its_ct_entry(cil: dict, node: str) -> None:
    name, web, ip = cil["name"], cil["ips"]["web-1"], NODE_IPS[node]
    code, t = trace(name, "ext", f"{node}:30080")
    assert code == 0 and t["delivered"] and t["answered"] and t["reached"] == "web-1", t["verdict"]
    assert not any(h["kind"] == "socket-lb" for h in t["hops"])  # no socket of the lab's: tc did it
    dnat = [h for h in t["hops"] if h["kind"] == "dnat"]
    assert len(dnat) == 1 and dnat[0]["place"] == node
    assert dnat[0]["detail"]["program"] == "cil_from_netdev"
    assert (dnat[0]["detail"]["from"], dnat[0]["detail"]["to"]) == (f"{ip}:30080", f"{web}:8080")
    assert "cilium_ct4_global OUT 192.168.1.200:" in dnat[0]["text"] and f"BackendAddr={web}:8080" in dnat[0]["text"]
    snat = [h for h in t["hops"] if h["kind"] == "snat"]
    assert len(snat) == 1 and snat[0]["detail"]["to"].startswith(f"{ip}:")  # externalTrafficPolicy: Cluster
    encap = [h for h in t["hops"] if h["kind"] == "encap"]
    if node == "node1":  # the backend is local: no tunnel
        assert encap == []
    else:
        assert len(encap) == 1 and "cilium_tunnel_map[10.244.1.0] = 192.168.1.10" in encap[0]["detail"]["tunnel_map"]
    un = [h for h in t["reply"] if h["kind"] == "un-nat"]
    assert len(un) == 1 and un[0]["place"] == node
    assert un[0]["detail"]["program"] == ("cil_from_container" if node == "node1" else "cil_from_netdev")
    assert un[0]["detail"]["to"].startswith(f"{ip}:30080 > 192.168.1.200:")
    last = [h for h in t["reply"] if h["kind"] == "in"][-1]
    assert last["place"] == "ext"


def test_a_backend_slot_deleted_by_lab_break_shows_why_connect_failed(cil: dict) -> None:
    name, vip = cil["name"], cil["vip"]["lone"]
    code, t = trace(name, "client", "svc/lone")
    assert code == 0 and t["delivered"], t["verdict"]
    lab("break", "--lab", name, "cilium-backend-delete", "in=node2", "service=lone", "slot=1")
    code, t = trace(name, "client", "svc/lone", "--timeout", "0.5")
    assert code == 1 and not t["delivered"] and t["dropped_at"] == "client: it never left", t["verdict"]
    lb = _socket_lb(t)
    assert lb["refused"] and lb["frontend"] == f"{vip}:80" and lb["program"] == "cil_sock4_connect"
    assert "the socket LB refused connect() (Operation not permitted, no packet was sent)" in t["dropped_by"]
    assert f"slot 1 of 1 is missing from node2's cilium_lb4_services_v2" in t["dropped_by"]
    assert not [h for h in t["hops"] if h["kind"] == "out"]  # nothing on any wire
    # node1's map is whole: the same service from node1's own processes still works.
    code, t = trace(name, "node1", "svc/lone")
    assert code == 0 and t["delivered"] and _socket_lb(t)["backend"] == f"{cil['ips']['web-1']}:8080", t["verdict"]


POLICY_DROP = ("Policy denied, policy-verdict:none INGRESS DENIED by default/guarded-from-web (the first of the "
               "NetworkPolicies isolating default/guarded for ingress: none of their rules admits it)")


def _policy_drop(t: dict, lxc: str) -> None:
    """The trace's verdict for the client's SYN to `guarded`, after the socket LB sent it to the pod's IP."""
    assert not t["delivered"] and t["dropped_at"] == "node1 after cilium_vxlan in", t["verdict"]
    assert t["dropped_by"].startswith(f"dropped by cil_to_container (tc egress on {lxc}, default/guarded's lxc "
                                      f"veth) in node1: {POLICY_DROP}"), t["dropped_by"]
    assert "dropped without a trace" not in t["verdict"]


def _lxc(name: str, pod: str) -> str:
    rows = json.loads(lab("cilium", "--lab", name, "node1", "endpoint", "list", "--json").stdout)
    return next(r["interface"] for r in rows if r["pod"] == f"default/{pod}")


def test_a_network_policy_drop_names_the_program_and_the_deciding_policy(cil: dict) -> None:
    """The issue's repro: no rule counter moves in a cilium lab, so the verdict used to be "dropped without
    a trace" while `lab observe` named the policy; the lxc program's own events name it now."""
    name = cil["name"]
    code, t = trace(name, "client", "svc/guarded", "--timeout", "0.5")
    assert code == 1 and _socket_lb(t)["backend"] == f"{cil['ips']['guarded']}:8080", t["verdict"]
    _policy_drop(t, _lxc(name, "guarded"))
    code, t = trace(name, "web-1", "svc/guarded")  # the policy admits app=web: delivered, nothing to blame
    assert code == 0 and t["delivered"] and t["reached"] == "guarded", t["verdict"]


def test_a_policy_drop_is_named_while_lab_observe_reads_the_same_ring(cil: dict) -> None:
    """One reader consumes a ring at a time: the trace reads alongside a running observer without taking
    its events, so both name the same drop."""
    from tests.integration.test_observe import Observer
    name = cil["name"]
    obs = Observer(name, "--verdict", "DROPPED", "--to-pod", "guarded")
    try:
        code, t = trace(name, "client", f"{cil['ips']['guarded']}:8080", "--timeout", "0.5")
    finally:
        seen = [f["flow"] for f in obs.stop() if "flow" in f]
    assert code == 1
    _policy_drop(t, _lxc(name, "guarded"))
    assert any(f["source"]["pod_name"] == "client" and f["drop_reason_desc"] == "POLICY_DENIED" for f in seen), seen
