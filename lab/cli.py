"""The `lab` command. Turns every project error into one line on stderr and an exit code.

Exit codes: 0 success; 1 a kernel operation failed; 2 bad input (spec, arguments, no such lab);
3 something this machine lacks (root, a kernel feature, a package).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
from collections.abc import Sequence

from lab.run import OneLineParser, run
from lab.version import VersionAction
from topo.errors import StateError


def _cmd_validate(args: argparse.Namespace) -> int:
    from apiserver.desired import resolve_spec
    from apiserver.spec import load_spec

    lab = load_spec(resolve_spec(args.spec))
    print(f"{lab.source}: valid: lab {lab.name}, {len(lab.nodes)} nodes, {len(lab.pods)} pods, "
          f"backend {lab.network.backend}")
    _warn_root(lab)
    exercise = _exercise_checks(args.spec)
    if exercise is not None:
        faults = sum(item.get("random", 1) for item in exercise.faults)  # {random: 3} is three faults
        print(f"{exercise.file}: valid: {len(exercise.checks)} checks, {exercise.max_points} points, "
              f"{faults} fault{'' if faults == 1 else 's'}")
    return 0


def _warn_root(lab) -> None:
    """One line on stderr naming the containers that run as root on this machine (issue 16)."""
    from topo.security_spec import root_warning

    warning = root_warning(lab)
    if warning:
        print(warning, file=sys.stderr)


def _exercise_checks(spec: str | None):
    """The checks of an exercise folder (None for a plain spec file or a folder without checks.yaml)."""
    from apiserver.desired import resolve_spec
    from grading import checks

    folder = resolve_spec(spec)
    if not checks.is_exercise(folder):
        return None
    return checks.load(folder, spec if spec is not None else None)


def _cmd_up(args: argparse.Namespace) -> int:
    from lab import lifecycle, status

    exercise = _exercise_checks(args.spec)  # a bad checks.yaml stops the build before anything exists
    result = lifecycle.up(args.spec, keep_on_failure=args.keep_on_failure)
    if result.cleaned_leftovers:
        print(f"removed leftovers of an earlier run of lab {result.lab.name}", file=sys.stderr)
    from cni.network_policy import not_enforced_warning

    warning = not_enforced_warning(result.lab)
    if warning:
        print(warning, file=sys.stderr)
    _warn_root(result.lab)
    if exercise is not None and exercise.faults:
        _apply_exercise_faults(result.state, exercise.faults, args.seed)
    print(status.render(status.describe(result.state)))
    target = result.lab.pods[0].name if result.lab.pods else result.lab.nodes[0].name
    bgp = f"; BGP converged in {result.bgp_seconds:.2f} s" if result.bgp_seconds is not None else ""
    print(f"\nlab {result.lab.name} is up ({result.seconds:.2f} s{bgp}). Try: lab exec {target} -- ip addr; "
          f"lab down {result.lab.name}")
    return 0


def _apply_exercise_faults(st, items: list[dict], seed: int | None) -> None:
    """The exercise's faults after `lab up`. Random ones (the capstone) are drawn from the seed, which is
    printed so the same puzzle can be rebuilt (`lab up --seed N`). What any of them broke is not printed:
    finding it is the exercise (its README says where to look)."""
    from grading import faults

    if seed is None and os.environ.get("KUBENET_LAB_SEED", "").isdigit():
        seed = int(os.environ["KUBENET_LAB_SEED"])
    if seed is None:
        seed = faults.new_seed()
    expanded = faults.expand(st, items, seed)
    for (item, drawn) in expanded:
        faults.apply(st, [item], seed=seed if drawn else None, exercise=not drawn)
    own = len(expanded) - sum(drawn for _, drawn in expanded)
    if own:
        it = "it" if own == 1 else "them"
        print(f"faults: the exercise broke {'something' if own == 1 else f'{own} things'} after the lab came up: "
              f"find {it} (`lab status --reveal` gives {it} away)", file=sys.stderr)
    hidden = len(expanded) - own
    if hidden:
        print(f"faults: {hidden} random fault{'s' if hidden > 1 else ''} applied (seed {seed}): find "
              f"{'them' if hidden > 1 else 'it'}; `lab up --seed {seed}` rebuilds the same puzzle", file=sys.stderr)


def _cmd_down(args: argparse.Namespace) -> int:
    from lab import lifecycle

    name, seconds, note = lifecycle.down(args.name)
    if note:
        print(f"Warning: {note}", file=sys.stderr)
    print(f"lab {name} is down ({seconds:.2f} s)")
    return 0


def _cmd_clean(args: argparse.Namespace) -> int:
    from lab import lifecycle

    removed = lifecycle.clean(everything=args.all)
    print(f"removed: {', '.join(removed)}" if removed else "nothing to clean")
    return 0


def _cmd_ipam(args: argparse.Namespace) -> int:
    from apiserver import state
    from lab import ipam

    info = ipam.describe(state.resolve(args.lab))
    print(json.dumps(info, indent=2) if args.json else ipam.render(info))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from apiserver import state
    from lab import status
    from topo.kernel import require_root

    require_root()  # without it every pod looks dead: another user's namespaces and processes cannot be read

    if args.name is None and not args.json and len(state.live_labs()) == 0:
        print("no lab is running")
        return 0
    try:
        st = state.resolve(args.name)
    except StateError as exc:
        # The kernel is the truth of last resort: a lab whose state is lost or damaged is still shown.
        from lab import apply

        if args.name is None or not apply.lab_namespaces(state.check_name(args.name)):
            raise
        info = status.kernel_view(args.name, str(exc))
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(f"Warning: {exc}", file=sys.stderr)
            print(f"lab {args.name}: what the kernel holds (no usable state)")
            for kind, spaces in sorted(info["namespaces"].items()):
                print(f"  {kind}: {len(spaces)} ({', '.join(spaces[:6])}{', ...' if len(spaces) > 6 else ''})")
        return 0
    info = status.describe(st, reveal=args.reveal)
    print(json.dumps(info, indent=2) if args.json else status.render(info))
    return 0


def _cmd_exec(args: argparse.Namespace) -> int:
    from kubelet import execute
    from topo.kernel import require_root

    require_root()
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        command = [shutil.which("bash") or "/bin/sh"]
    execute.exec_in(args.lab, args.target, command)  # replaces this process
    return 127


def _cmd_apply(args: argparse.Namespace) -> int:
    from lab import objects
    from topo.kernel import require_root

    require_root()
    for line in objects.apply_file(args.lab, args.filename):
        print(line, file=sys.stderr if line.startswith("Warning:") else sys.stdout)  # kubectl's warnings too
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    from lab import objects
    from topo.kernel import require_root

    require_root()
    if args.filename is not None:
        if args.kind is not None:
            raise StateError("give -f FILE or KIND NAME, not both")
        lines = objects.delete_file(args.lab, args.filename)
    elif args.kind is None or args.name is None:
        raise StateError("name what to delete: lab delete KIND NAME, or lab delete -f FILE")
    else:
        lines = objects.delete(args.lab, args.kind, args.name, args.namespace)
    for line in lines:
        print(line)
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from apiserver import state
    from topo.kernel import require_root
    from observe import probe

    require_root()
    result = probe.matrix(state.resolve(args.lab), args.port, args.protocol, args.timeout)
    print(json.dumps(result.to_json(), indent=2) if args.json else result.render())
    return 0


def _cmd_dns_count(args: argparse.Namespace) -> int:
    from topo.kernel import require_root
    from observe import dnscount

    require_root()
    result = dnscount.count(args.lab, args.pod, args.name, args.family, args.resolver)
    print(json.dumps(result.to_json(), indent=2) if args.json else dnscount.render(result))
    return 0


def _cmd_graph(args: argparse.Namespace) -> int:
    from pathlib import Path

    from topo.kernel import require_root
    from observe import graph, graph_render

    require_root()
    drawn = graph.graph_of(args.name)
    if args.output:
        graph_render.render(drawn, Path(args.output))
    if args.json:
        print(json.dumps(drawn.to_json(), indent=2))
    elif args.text or not args.output:
        print(graph_render.to_text(drawn, color=sys.stdout.isatty()))
    else:
        found = f"{len(drawn.problems)} problem(s)" if drawn.problems else "no problems"
        print(f"wrote {args.output} ({found})")
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from topo.kernel import require_root
    from observe import hops, trace

    require_root()
    result = trace.run(args.lab, args.source, args.destination, args.protocol, args.size, args.timeout)
    print(json.dumps(result.to_json(), indent=2) if args.json else hops.render(result))
    return 0 if result.delivered else 1


def _cmd_observe(args: argparse.Namespace) -> int:
    from topo.kernel import require_root
    from observe import flows_cli

    require_root()
    return flows_cli.command(args)


def _cmd_ui(args: argparse.Namespace) -> int:
    from topo.kernel import require_root
    from ui import server

    if not args.port.isdigit() or not 0 <= int(args.port) <= 65535:
        raise StateError(f"--port {args.port}: a port is a number from 0 (any free one) to 65535")
    require_root()
    server.serve(args.lab, int(args.port), args.open, announce=lambda line: print(line, flush=True))
    print("lab ui: stopped", flush=True)
    return 0


def _cmd_grade(args: argparse.Namespace) -> int:
    from grading import grade
    from topo.kernel import require_root

    if args.junit:  # before grading: a report that cannot be written is a usage error, found early
        folder = os.path.dirname(os.path.abspath(args.junit))
        if os.path.isdir(args.junit) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise StateError(f"--junit {args.junit}: cannot write there (no such folder, or not writable)")
    require_root()
    report = grade.grade(args.lab, args.exercise, args.answers, args.only)
    if report.warning:
        print(f"Warning: {report.warning}", file=sys.stderr)
    if args.junit:
        try:
            with open(args.junit, "w") as fh:
                fh.write(grade.junit(report))
        except OSError as exc:
            raise StateError(f"--junit {args.junit}: cannot write: {exc.strerror or exc}") from exc
    print(json.dumps(report.to_json(), indent=2) if args.json else grade.render(report))
    if report.counted == 0:
        print("lab grade: nothing was graded (every check chosen was skipped)", file=sys.stderr)
    return report.exit_code


def _cmd_break(args: argparse.Namespace) -> int:
    from apiserver import state
    from grading import faults
    from topo.kernel import require_root

    if args.list:
        print(faults.describe())
        return 0
    if not 1 <= args.count <= faults.MAX_RANDOM:
        raise StateError(f"--count must be 1 to {faults.MAX_RANDOM} (more faults at once make a broken lab, "
                         "not a puzzle)")
    if args.count != 1 and not args.random:
        raise StateError("--count goes with --random")
    require_root()
    st = state.resolve(args.lab)
    seed = args.seed if args.seed is not None else faults.new_seed()
    if args.random:
        items = faults.choose(st, seed, args.count)
    elif args.fault:
        if args.seed is not None:
            raise StateError("--seed goes with --random")
        items = [faults.parse_args(args.fault, args.params)]
    else:
        raise StateError("name a fault (lab break --list shows them) or give --random [--seed N]")
    for applied in faults.apply(st, items, seed=seed if args.random else None):
        # A random fault is a puzzle: say that something broke, not what (`lab status --reveal` tells).
        print(f"applied a random fault (seed {seed}); find it" if args.random else applied.detail)
    return 0


def _cmd_link(args: argparse.Namespace) -> int:
    from apiserver import state
    from apiserver.desired import model_of
    from lab import link
    from topo.kernel import require_root
    from topo.link_spec import link_option

    require_root()
    values = {name: link_option(name, text) for name, text in
              (("delay", args.delay), ("jitter", args.jitter), ("loss", args.loss)) if text is not None}
    if args.clear and values:
        raise StateError("give --clear alone, or --delay/--jitter/--loss")
    if "jitter" in values and "delay" not in values:
        raise StateError("--jitter varies a delay: give --delay too (e.g. --delay 50ms --jitter 5ms)")
    if (values or args.clear) and not args.node2:
        raise StateError("name two nodes, e.g. lab link node1 node2 --delay 50ms")
    st = state.resolve(args.lab)
    with state.locked(st.name):
        lab = model_of(st)
        if args.clear:
            lines = link.change(lab, args.node1, args.node2, None)
        elif values:
            imp = link.Impairment(values.get("delay"), values.get("jitter"), values.get("loss"))
            lines = link.change(lab, args.node1, args.node2, imp)
        else:
            lines = link.show(lab, args.node1, args.node2)
    for line in lines:
        print(line)
    return 0


def _cmd_cilium(args: argparse.Namespace) -> int:
    import json

    from observe import cilium

    command = " ".join(args.words)
    rows = cilium.run(args.lab, args.node, command)
    print(json.dumps(rows, indent=2) if args.json else cilium.render(command, rows))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from lab import bench

    try:
        sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else bench.SCALE_SIZES
    except ValueError:
        raise StateError(f"--sizes {args.sizes}: give pod counts separated by commas, e.g. 1000,10000") from None
    if any(not 100 <= s <= 20_000 for s in sizes):
        raise StateError("--sizes: each size is 100 to 20,000 pods")
    try:
        clients = tuple(int(c) for c in args.clients.split(",")) if args.clients else bench.DNS_CLIENTS
    except ValueError:
        raise StateError(f"--clients {args.clients}: give client pod counts separated by commas, e.g. 20,50") from None
    if any(not 1 <= c <= 240 for c in clients):
        raise StateError("--clients: each count is 1 to 240 client pods (two nodes' PodCIDRs)")
    return bench.run(args.suites, args.quick, args.repeat, args.json, args.plot, sizes, clients)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lab", description="Real, running emulations of Kubernetes networking.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="build a lab from a spec (default: labs/00-seed) and return; it keeps running")
    p.add_argument("spec", nargs="?", help="a lab YAML file, an exercise folder, or a folder name under labs/")
    p.add_argument("--keep-on-failure", action="store_true", help="leave a failed build in place for debugging")
    p.add_argument("--seed", type=int, help="an exercise's random faults: draw them from this seed "
                   "(default: $KUBENET_LAB_SEED, else a new seed, printed)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar on a terminal")
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("down", help="remove every namespace, link and process of a lab")
    p.add_argument("name", nargs="?")
    _lab_flag(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar on a terminal")
    p.set_defaults(func=_cmd_down)

    p = sub.add_parser("clean", help="remove what crashed or half-built labs left (found by prefix)")
    p.add_argument("--all", action="store_true", help="also remove labs that are running")
    p.set_defaults(func=_cmd_clean)

    p = sub.add_parser("status", help="nodes and pods of a running lab")
    p.add_argument("name", nargs="?")
    _lab_flag(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--reveal", action="store_true", help="show what random faults (lab break --random, a "
                   "capstone) broke: the answer to the puzzle")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("ipam", help="aws-vpc profile: the VPC subnet's books, each node's ENIs and warm pool")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_ipam)

    p = sub.add_parser("exec", help="run a command (default: a shell) in a node or pod: lab exec POD -- CMD")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.add_argument("target", help="a node name, a pod name, or namespace/pod")
    # optional (a shell by default); argparse marks a REMAINDER positional required, and its "the following
    # arguments are required: target, command" then named both when only the target was missing
    p.add_argument("command", nargs=argparse.REMAINDER).required = False
    p.set_defaults(func=_cmd_exec)

    p = sub.add_parser("apply", help="add or change objects (Pod, Deployment, Namespace, Service, Ingress, "
                                     "NetworkPolicy) of a running lab, like kubectl apply")
    p.add_argument("-f", "--filename", required=True, help="a YAML file of Kubernetes manifests")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar on a terminal")
    p.set_defaults(func=_cmd_apply)

    p = sub.add_parser("delete", help="remove a pod, a deployment and its pods, a service, an ingress, a network "
                                      "policy or an empty namespace (lab delete pod NAME), or what a file declares "
                                      "(lab delete -f FILE)")
    p.add_argument("kind", nargs="?", choices=["pod", "pods", "po", "deployment", "deployments", "deploy", "service",
                                               "services", "svc", "ingress", "ingresses", "ing", "networkpolicy",
                                               "networkpolicies", "netpol", "namespace", "namespaces", "ns"])
    p.add_argument("name", nargs="?")
    p.add_argument("-f", "--filename", help="delete every object this YAML file declares, like kubectl delete -f")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar on a terminal")
    p.set_defaults(func=_cmd_delete)

    p = sub.add_parser("probe", help="connect from every pod to every pod and print who reaches whom (. allowed, "
                                     "X blocked)")
    p.add_argument("--port", type=int, default=80, help="the port to connect to (default 80); the probe listens "
                                                        "there itself in pods where nothing does")
    p.add_argument("--protocol", choices=["tcp", "udp"], default="tcp")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds a connection may take (default 1)")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("dns-count", help="resolve NAME inside POD and count the DNS queries it cost")
    p.add_argument("pod", help="a pod name or namespace/pod")
    p.add_argument("name", help="the name to resolve, e.g. api.example.com (a trailing dot makes it absolute)")
    p.add_argument("--resolver", choices=["glibc", "musl", "node-lookup", "node-resolve"], default="glibc",
                   help="who resolves: glibc getaddrinfo (getent, the default), musl getaddrinfo (Alpine), Node.js "
                        "dns.lookup (the C library's resolver) or dns.resolve4+resolve6 (c-ares)")
    p.add_argument("--family", choices=["any", "inet", "inet6"], default="any",
                   help="any: A and AAAA as most programs ask (getent ahosts); inet: A only")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_dns_count)

    p = sub.add_parser("link", help="delay, jitter or lose the traffic between two nodes of a running lab (netem)")
    p.add_argument("node1", nargs="?")
    p.add_argument("node2", nargs="?")
    p.add_argument("--delay", help="added each way, e.g. 50ms (a round trip between the two gets twice that)")
    p.add_argument("--jitter", help="netem varies the delay by up to this, e.g. 5ms (needs --delay)")
    p.add_argument("--loss", help="packets lost each way, e.g. 1%%")
    p.add_argument("--clear", action="store_true", help="remove the impairment between the two nodes")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.set_defaults(func=_cmd_link)

    p = sub.add_parser("bench", help="measure data planes, service rules, DNS queries, lab up/down and VPC subnet fit "
                                     "(needs root)")
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help="dataplanes, services, dns, updown, ipam, scale, observe, policy "
                        "(default: all but scale, observe and policy)")
    p.add_argument("--sizes", help="scale: lab sizes in pods, e.g. 1000,10000 (default 1000)")
    p.add_argument("--clients", help="dns: storm client pod counts, e.g. 20,50,100,200 (the default)")
    p.add_argument("--quick", action="store_true", help="small sizes and 1 repetition: under a minute")
    p.add_argument("--repeat", type=int, help="repetitions of each case, interleaved (default 3; 1 with --quick)")
    p.add_argument("--json", metavar="FILE", help="write every sample, the medians and the machine description")
    p.add_argument("--plot", metavar="DIR", help="write one PNG per suite (needs matplotlib)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("graph", help="draw the running lab from what the kernel holds (SVG/PNG/DOT or text)")
    p.add_argument("name", nargs="?")
    _lab_flag(p)
    p.add_argument("-o", "--output", metavar="FILE", help="write FILE.svg, FILE.png or FILE.dot (Graphviz)")
    p.add_argument("--text", action="store_true", help="print a terminal drawing (the default without -o)")
    p.add_argument("--json", action="store_true", help="print the compared model as JSON")
    p.set_defaults(func=_cmd_graph)

    p = sub.add_parser("trace", help="send one probe and list every hop the kernel took: lab trace FROM TO[:PORT]")
    p.add_argument("source", metavar="FROM", help="a pod, node or external host")
    p.add_argument("destination", metavar="TO[:PORT]",
                   help="a pod, node, external host, service (name or namespace/name) or IP, optionally :PORT; "
                        "svc/[NS/]NAME or pod/[NS/]NAME when a pod and a service share a name")
    p.add_argument("--protocol", "-p", choices=["tcp", "udp", "icmp"],
                   help="default: the service port's protocol, tcp with a port, icmp without")
    p.add_argument("--size", type=int, default=0, metavar="BYTES",
                   help="ICMP/UDP payload bytes, sent with Don't Fragment (finds MTU problems)")
    p.add_argument("--timeout", type=float, default=1.0, metavar="SECONDS",
                   help="how long to wait for the packet and its answer (at most 4)")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_trace)

    p = sub.add_parser("observe", help="the flows the lab carries, live, as hubble observe prints them (verdicts, "
                                       "Services and backends, drops with the policy, DNS)")
    from observe.flows_cli import add_arguments
    add_arguments(p)
    p.set_defaults(func=_cmd_observe)

    p = sub.add_parser("ui", help="serve a live web page of the running lab on 127.0.0.1 (diagram, inspect, "
                                  "step-through traces, grading) and print its URL")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.add_argument("--port", default="0", help="the port on 127.0.0.1 (default: a free one)")
    p.add_argument("--open", action="store_true", help="also open the page in the default browser")
    p.set_defaults(func=_cmd_ui)

    p = sub.add_parser("grade", help="run the checks of the running lab's exercise: a score, and hints")
    p.add_argument("exercise", nargs="?", help="an exercise folder (default: the one the lab was built from)")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.add_argument("--answers", metavar="FILE", help="the answers file (default: answers.yaml in the exercise)")
    p.add_argument("--only", nargs="+", metavar="CHECK|TASK", help="run only these checks or tasks")
    p.add_argument("--json", action="store_true")
    p.add_argument("--junit", metavar="FILE", help="also write the result as JUnit XML")
    p.set_defaults(func=_cmd_grade)

    p = sub.add_parser("break", help="apply a fault to a running lab: lab break FAULT KEY=VALUE..., or --random")
    p.add_argument("fault", nargs="?", help="a fault name (see --list)")
    p.add_argument("params", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.add_argument("--random", action="store_true", help="apply faults chosen for this lab from --seed")
    p.add_argument("--seed", type=int, help="the seed of --random: the same seed breaks the same thing "
                   "(default: a new seed, printed)")
    p.add_argument("--count", type=int, default=1, help="how many random faults (default 1, at most 5)")
    p.add_argument("--list", action="store_true", help="list the faults and their parameters")
    p.set_defaults(func=_cmd_break)

    p = sub.add_parser("cilium", help="Cilium's debug CLI on a node of a cilium lab: lab cilium NODE service list | "
                                      "bpf lb list | bpf ct list global | endpoint list | bpf tunnel list | map list | "
                                      "identity list | bpf ipcache list | bpf policy get ENDPOINT")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.add_argument("--json", action="store_true")
    p.add_argument("node")
    p.add_argument("words", nargs="+", metavar="COMMAND")
    p.set_defaults(func=_cmd_cilium)

    p = sub.add_parser("validate", help="check a spec without building anything (no root needed)")
    p.add_argument("spec", nargs="?")
    p.set_defaults(func=_cmd_validate)
    return parser


def _lab_flag(p: argparse.ArgumentParser) -> None:
    """`--lab NAME` beside a command's NAME argument: when several labs run, every command's hint is
    "name one (--lab NAME)", so the commands that take the lab as an argument take the flag as well."""
    p.add_argument("--lab", dest="lab_flag", metavar="NAME", help="the lab (the same as NAME)")


# Commands that may run for minutes or hours and allocate all the while: the cyclic garbage collector stays on
# for them, with fewer passes.
LONG_RUNNING = {"up", "ui", "observe", "bench"}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A command reads a 10,000-pod lab's state and model (a few hundred thousand objects, kept until it exits),
    # and the collector kept walking them: 290 passes, 2 of them over everything, 0.19 s of a one-pod
    # `lab apply` (gc.callbacks). A short command's garbage is freed when it exits.
    if args.command_name in LONG_RUNNING:
        gc.set_threshold(100_000, 50, 100)
    else:
        gc.disable()
    from lab import progress

    progress.quiet = getattr(args, "quiet", False) or getattr(args, "json", False)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
