"""`tierstore` command: one entry point, one module per group of subcommands.

Each subcommand module exposes ``add_parser(subparsers)``, registering its parsers with
``set_defaults(func=run)``. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tierstore.errors import TierStoreError

# Modules that register subcommands, in the order `tierstore --help` lists them.
_COMMAND_MODULES = (
    "tools.store_cmds",  # build, inspect, verify, gc
    "tools.trace_cmd",  # trace
    "tools.profile_cmd",  # profile, size
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tierstore",
        description="Tiered GPU/host/NVMe store for Engram n-gram embedding tables.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # optional command group not installed in this build
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TierStoreError as e:
        print(f"tierstore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tierstore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
