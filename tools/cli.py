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
# Which module owns each command: running one imports only its module (the store commands
# import torch, ~1 s; `tierstore profile` needs only the cache layer and the simulator).
_OWNER = {"build": "tools.store_cmds", "inspect": "tools.store_cmds", "verify": "tools.store_cmds",
          "gc": "tools.store_cmds", "trace": "tools.trace_cmd", "profile": "tools.profile_cmd",
          "size": "tools.profile_cmd"}


def make_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tierstore",
        description="Tiered GPU/host/NVMe store for Engram n-gram embedding tables.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in (_OWNER[command],) if command in _OWNER else _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # optional command group not installed in this build
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(argv[0] if argv else None)
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
