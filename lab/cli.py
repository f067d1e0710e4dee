"""The `lab` command. Turns every project error into one line on stderr and an exit code.

Exit codes: 0 success; 1 a kernel operation failed; 2 bad input (spec, arguments, no such lab);
3 something this machine lacks (root, a kernel feature, a package).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence

from topo.errors import LabError, SpecError


def _cmd_validate(args: argparse.Namespace) -> int:
    from lab.lifecycle import resolve_spec
    from topo.spec import load_spec

    lab = load_spec(resolve_spec(args.spec))
    print(f"{lab.source}: valid: lab {lab.name}, {len(lab.nodes)} nodes, {len(lab.pods)} pods, "
          f"backend {lab.network.backend}")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from lab import lifecycle, status

    result = lifecycle.up(args.spec, keep_on_failure=args.keep_on_failure)
    if result.cleaned_leftovers:
        print(f"removed leftovers of an earlier run of lab {result.lab.name}", file=sys.stderr)
    print(status.render(status.describe(result.state)))
    target = result.lab.pods[0].name if result.lab.pods else result.lab.nodes[0].name
    bgp = f"; BGP converged in {result.bgp_seconds:.2f} s" if result.bgp_seconds is not None else ""
    print(f"\nlab {result.lab.name} is up ({result.seconds:.2f} s{bgp}). Try: lab exec {target} -- ip addr; "
          f"lab down {result.lab.name}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from lab import lifecycle

    name, seconds = lifecycle.down(args.name)
    print(f"lab {name} is down ({seconds:.2f} s)")
    return 0


def _cmd_clean(args: argparse.Namespace) -> int:
    from lab import lifecycle

    removed = lifecycle.clean(everything=args.all)
    print(f"removed: {', '.join(removed)}" if removed else "nothing to clean")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from lab import state, status

    if args.name is None and not args.json and len(state.live_labs()) == 0:
        print("no lab is running")
        return 0
    info = status.describe(state.resolve(args.name))
    print(json.dumps(info, indent=2) if args.json else status.render(info))
    return 0


def _cmd_exec(args: argparse.Namespace) -> int:
    from lab import execute
    from lab.lifecycle import require_root

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
    from lab.lifecycle import require_root

    require_root()
    for line in objects.apply_file(args.lab, args.filename):
        print(line)
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    from lab import objects
    from lab.lifecycle import require_root

    require_root()
    for line in objects.delete(args.lab, args.kind, args.name, args.namespace):
        print(line)
    return 0


def _cmd_dns_count(args: argparse.Namespace) -> int:
    from lab import dnscount
    from lab.lifecycle import require_root

    require_root()
    result = dnscount.count(args.lab, args.pod, args.name, args.family)
    print(json.dumps(result.to_json(), indent=2) if args.json else dnscount.render(result))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from lab import bench

    return bench.run(args.suites, args.quick, args.repeat, args.json, args.plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lab", description="Real, running emulations of Kubernetes networking.")
    sub = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="build a lab from a spec (default: labs/00-seed) and return; it keeps running")
    p.add_argument("spec", nargs="?", help="a lab YAML file, an exercise folder, or a folder name under labs/")
    p.add_argument("--keep-on-failure", action="store_true", help="leave a failed build in place for debugging")
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("down", help="remove every namespace, link and process of a lab")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_cmd_down)

    p = sub.add_parser("clean", help="remove what crashed or half-built labs left (found by prefix)")
    p.add_argument("--all", action="store_true", help="also remove labs that are running")
    p.set_defaults(func=_cmd_clean)

    p = sub.add_parser("status", help="nodes and pods of a running lab")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("exec", help="run a command (default: a shell) in a node or pod: lab exec POD -- CMD")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.add_argument("target", help="a node name, a pod name, or namespace/pod")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_exec)

    p = sub.add_parser("apply", help="add objects (Pod, Deployment, Namespace) to a running lab, like kubectl apply")
    p.add_argument("-f", "--filename", required=True, help="a YAML file of Kubernetes manifests")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.set_defaults(func=_cmd_apply)

    p = sub.add_parser("delete", help="remove a pod, a deployment's pods, a service or an ingress: lab delete pod NAME")
    p.add_argument("kind", choices=["pod", "pods", "po", "deployment", "deployments", "deploy", "service",
                                    "services", "svc", "ingress", "ingresses", "ing"])
    p.add_argument("name")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.set_defaults(func=_cmd_delete)

    p = sub.add_parser("dns-count", help="resolve NAME inside POD and count the DNS queries it cost")
    p.add_argument("pod", help="a pod name or namespace/pod")
    p.add_argument("name", help="the name to resolve, e.g. api.example.com (a trailing dot makes it absolute)")
    p.add_argument("--family", choices=["any", "inet", "inet6"], default="any",
                   help="any: A and AAAA as most programs ask (getent ahosts); inet: A only")
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_dns_count)

    p = sub.add_parser("bench", help="measure data planes, service rules, DNS queries and lab up/down (needs root)")
    p.add_argument("suites", nargs="*", metavar="SUITE", help="dataplanes, services, dns, updown (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes and 1 repetition: under a minute")
    p.add_argument("--repeat", type=int, help="repetitions of each case, interleaved (default 3; 1 with --quick)")
    p.add_argument("--json", metavar="FILE", help="write every sample, the medians and the machine description")
    p.add_argument("--plot", metavar="DIR", help="write one PNG per suite (needs matplotlib)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("validate", help="check a spec without building anything (no root needed)")
    p.add_argument("spec", nargs="?")
    p.set_defaults(func=_cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return exc.exit_code
    except LabError as exc:
        print(f"lab {args.command_name}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"lab {args.command_name}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"lab {args.command_name}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: still one line, and the traceback on request
        if os.environ.get("KUBENET_LAB_DEBUG"):
            raise
        print(f"lab {args.command_name}: internal error: {type(exc).__name__}: {exc} "
              "(set KUBENET_LAB_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
