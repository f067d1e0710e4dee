"""`lab observe`'s flags and output (lab/cli.py hands over to this): hubble observe's flag names, one line
per flow (compact, or JSON with -j), EVENTS LOST lines as Hubble prints them, and a clean end on Ctrl-C or
SIGTERM (everything the observer opened is closed in observe/flows_run.run's finally)."""
from __future__ import annotations

import argparse
import json
import signal
import sys

from topo.errors import StateError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lab", help="the lab, when more than one is running")
    p.add_argument("--pod", help="flows from or to [NAMESPACE/]POD (a name prefix, as hubble's)")
    p.add_argument("--from-pod", help="flows from [NAMESPACE/]POD")
    p.add_argument("--to-pod", help="flows to [NAMESPACE/]POD")
    p.add_argument("--namespace", help="flows from or to pods of this namespace")
    p.add_argument("--to-service", help="flows to [NAMESPACE/]SERVICE (translated to one of its backends)")
    p.add_argument("--port", type=int, help="flows with this source or destination port (or Service port)")
    p.add_argument("--protocol", choices=["tcp", "udp", "icmp"])
    p.add_argument("--verdict", choices=["FORWARDED", "DROPPED", "TRANSLATED", "TRACED"])
    p.add_argument("--type", choices=["l3-l4", "drop", "trace", "dns", "policy-verdict", "l7"])
    when = p.add_mutually_exclusive_group()
    when.add_argument("--follow", "-f", action="store_true", help="until Ctrl-C")
    when.add_argument("--last", type=int, metavar="N",
                      help="stop after N flows (default 20; no history is kept: the next N)")
    when.add_argument("--since", metavar="DURATION", help="refused: lab observe keeps no history")
    p.add_argument("--duration", metavar="DURATION",
                   help="stop after this long (10s, 2m; default 10s without --follow or --last)")
    p.add_argument("--print-node-name", action="store_true", help="the node each flow was seen on")
    p.add_argument("--json", "-j", action="store_true", help="one JSON object per line, hubble's -o json fields")


def command(args: argparse.Namespace) -> int:
    from observe import flows, flows_run  # here, not at the top: every command builds this parser (80 ms)

    if args.since is not None:
        flows.parse_since(args.since)  # a malformed one is still told as such
        raise StateError("--since: lab observe keeps no history (it shows flows from now on, see "
                         "docs/observing.md); use --follow, --last N or --duration")
    if args.last is not None and args.last < 1:
        raise StateError("--last must be at least 1")
    duration = flows.parse_since(args.duration, "--duration") if args.duration else None
    filters = flows.Filters.parse(args.pod, args.from_pod, args.to_pod, args.namespace, args.to_service, args.port,
                                  args.protocol, args.verdict, args.type)
    last = None if args.follow else (args.last or 20)
    if not args.follow and duration is None and args.last is None:
        duration = 10.0  # hubble's bare `observe` returns: here, the next 20 flows within 10 s

    def emit(item) -> None:
        if isinstance(item, flows_run.Lost):
            line = json.dumps({"lost_events": {"source": item.source, "num_events_lost": item.count}}) \
                if args.json else f"EVENTS LOST: {item.source}: {item.count}"
        else:
            line = json.dumps(flows.to_json(item)) if args.json else flows.compact(item, args.print_node_name)
        print(line, flush=True)

    def ready(text: str) -> None:
        print(f"lab observe: {text}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # ends like Ctrl-C: everything closed
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background of a shell
    observer = flows_run.Observer(args.lab, filters)
    try:
        flows_run.run(observer, emit, args.follow, last, duration, ready)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `lab observe ... | head`
        sys.stderr.close()
    return 0
