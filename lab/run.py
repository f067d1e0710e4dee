"""How a parsed command runs: every failure a user can cause becomes one line on stderr and an exit code
(the project's errors carry both), a bug is one line too (its traceback with KUBENET_LAB_DEBUG=1), and output
cut short by its reader (`lab status | head`) ends quietly.
"""
from __future__ import annotations

import argparse
import os
import select
import sys
from typing import NoReturn

from topo.errors import LabError, SpecError, StateError


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake is one line, as every other error, with argparse's exit code 2: argparse printed its
    whole usage block first (3 to 9 lines for a one-word slip); the usage stays one `--help` away.
    Subcommands' parsers are made of this class too (add_subparsers takes the parent's class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def run(args: argparse.Namespace) -> int:
    try:
        _one_lab_name(args)
        return args.func(args)
    except SpecError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return exc.exit_code
    except LabError as exc:
        for line in str(exc).splitlines() or [""]:  # several refusals (lab up): one line each
            print(f"lab {args.command_name}: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"lab {args.command_name}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_gone():
            # Quiet, as `head` expects: nothing more goes to the closed pipe (not even when Python flushes
            # stdout at exit), and the exit code is that of a process killed by SIGPIPE, 128 + 13.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        print(f"lab {args.command_name}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: still one line, and the traceback on request
        if os.environ.get("KUBENET_LAB_DEBUG"):
            raise
        print(f"lab {args.command_name}: internal error: {type(exc).__name__}: {exc} "
              "(set KUBENET_LAB_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 1


def _one_lab_name(args: argparse.Namespace) -> None:
    """A lab named both ways (`lab status NAME` and `--lab NAME`, cli.py `_lab_flag`) must be named once."""
    flag = getattr(args, "lab_flag", None)
    if flag is None:
        return
    if args.name is not None and args.name != flag:
        from topo import names

        raise StateError(f"name the lab once: {names.shown(args.name)} or --lab {names.shown(flag)}, not both")
    args.name = flag


def _stdout_gone() -> bool:
    """Whether whoever read standard output has gone: a pipe with no reader polls as an error on its writing
    end. A broken pipe elsewhere (a helper process's) is still reported."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _fd, events in poller.poll(0))
    except (OSError, ValueError):
        return False
