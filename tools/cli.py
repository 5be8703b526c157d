"""`tierstore` command: one entry point, one module per group of subcommands.

Each subcommand module exposes ``add_parser(subparsers)``, registering its parsers with
``set_defaults(func=run)``. Every error the user can cause (a typed ``TierStoreError``, an
``OSError`` such as a missing file, a malformed command line) is one line on stderr and exit
code 2; with ``--json`` a JSON object ``{"error": message, "type": class name}`` is also printed
on stdout, so a script reading stdout gets JSON on failure too. Anything else is a bug and
keeps its traceback.

The store's own commands live in this package. Other installed packages add theirs through
the ``tierstore.commands`` entry-point group (``name = "module:add_parser"``): the model
package adds ``trace``, which needs its tokenizer and hasher, so the store's CLI imports
nothing of the model and works where the model's dependencies are not installed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from importlib.metadata import EntryPoint, entry_points

from tierstore.errors import TierStoreError

ENTRY_POINT_GROUP = "tierstore.commands"
# Which module of this package owns each built-in command, in the order `tierstore --help`
# lists them: running one imports only its module (the store commands import torch, ~1 s;
# `tierstore profile` needs only the cache layer and the simulator).
_BUILTIN = {"build": ".store_cmds", "inspect": ".store_cmds", "verify": ".store_cmds", "gc": ".store_cmds",
            "profile": ".profile_cmd", "size": ".profile_cmd", "warmup": ".warmup_cmd"}


class CommandUnavailableError(TierStoreError):
    """An installed package registers the command, but its module cannot be imported."""


class UsageError(TierStoreError, ValueError):
    """The command line is malformed: an unknown option, a missing or ill-typed argument."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises :class:`UsageError` (one line, like every other
    error) instead of printing the usage block and exiting. Subparsers inherit the class."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _plugins() -> dict[str, EntryPoint]:
    """Commands other packages register, by name (the first of duplicate registrations)."""
    found: dict[str, EntryPoint] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name not in _BUILTIN:
            found.setdefault(ep.name, ep)
    return found


def _load(ep: EntryPoint):
    try:
        return ep.load()
    except ImportError as e:  # the package is installed without the extra the command needs
        raise CommandUnavailableError(f"the command comes from {ep.value}, which cannot be imported ({e}); "
                                 "install the package that provides it with its extras") from None


def make_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or only of ``command``'s module when it names one."""
    parser = _Parser(
        prog="tierstore",
        description="Tiered GPU/host/NVMe store for Engram n-gram embedding tables.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if command in _BUILTIN:
        importlib.import_module(_BUILTIN[command], __package__).add_parser(sub)
        return parser
    plugins = _plugins()
    if command in plugins:
        _load(plugins[command])(sub)
        return parser
    for module in dict.fromkeys(_BUILTIN.values()):
        importlib.import_module(module, __package__).add_parser(sub)
    unavailable = []
    for name, ep in plugins.items():
        try:
            _load(ep)(sub)
        except CommandUnavailableError as e:
            unavailable.append(f"{name}: {e}")
    if unavailable:
        parser.epilog = "unavailable commands:\n  " + "\n  ".join(unavailable)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _report(command: str | None, e: BaseException, as_json: bool) -> int:
    """One line on stderr (and the JSON object on stdout with --json); exit code 2."""
    message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message holds
    if as_json:
        print(json.dumps({"error": message, "type": type(e).__name__}), flush=True)
    print(f"tierstore{' ' + command if command else ''}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    as_json = "--json" in argv  # known before parsing, so a usage error is JSON too
    try:
        args = make_parser(command).parse_args(argv)
    except (TierStoreError, OSError) as e:
        return _report(command, e, as_json)
    try:
        return int(args.func(args) or 0)
    except (TierStoreError, OSError) as e:
        return _report(args.command, e, getattr(args, "json", False))
    except KeyboardInterrupt:
        print(f"tierstore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
