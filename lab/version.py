"""`lab --version`: the installed distribution's version, looked up only when asked."""
from __future__ import annotations

import argparse


def version() -> str:
    """The installed distribution's version (setup.cfg's), as `kubectl version --client` reports its own."""
    from importlib import metadata

    try:
        return metadata.version("kubenet-lab")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: run ./install.sh)"


class VersionAction(argparse.Action):
    """`--version`, with the version looked up only when asked (importlib.metadata: 40 ms of every command)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0,
                         help="show the version and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[no-untyped-def]
        print(f"lab {version()}")
        parser.exit()
