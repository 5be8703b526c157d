"""Command-line flags derived from a config dataclass, so each setting is written once.

A config field declared with :func:`setting` carries its help text (and, where the flag is
not simply ``--field-name``, its flag) in the field's metadata. :func:`add_flags` turns
every such field into an argparse option with the field's type and default;
:func:`from_flags` builds the dataclass back from the parsed namespace; :func:`to_argv`
spells a config as the flags that reproduce it (``from_flags(parse(to_argv(cfg))) == cfg``).

    @dataclass
    class Config:
        n_layer: int = setting(4, "transformer blocks")
        vocab_size: int = setting(8192, "set from the tokenizer", cli=False)

    groups = add_flags(parser, Config)          # --n-layer (int, default 4)
    cfg = from_flags(Config, parser.parse_args(argv), vocab_size=tok.get_vocab_size())

Booleans are switches that flip the default: a field that defaults to True gets
``--no-<name>`` (or the ``flag`` given), one that defaults to False gets ``--<name>``;
the namespace keeps the switch (``args.no_signed_sqrt``), so saved argument dicts keep
the names they always had. Lists become ``nargs="+"``. Fields with ``cli=False`` are
set by the program (from the tokenizer, from another flag) and must come as overrides.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import typing
from typing import Any, TypeVar

__all__ = ["setting", "add_flags", "from_flags", "to_argv", "flag_fields"]

C = TypeVar("C")

_META = "flag"  # the metadata key holding a field's flag description


@dataclasses.dataclass(frozen=True)
class _Flag:
    help: str
    flag: str | None  # None: --field-name (or --no-field-name for a bool that defaults to True)
    cli: bool
    group: str


def setting(default: Any, help: str, *, flag: str | None = None, cli: bool = True, group: str = "model") -> Any:
    """A dataclass field with its command-line description.

    default: the field's default (a list is copied per instance).
    help: one line for ``--help``; the default is appended by the parser's formatter.
    flag: the option string when it is not ``--field-name`` (kept for flags older than
        the derivation, e.g. ``--no-signed-sqrt`` for ``engram_signed_sqrt``).
    cli: False for fields the program sets itself; they get no flag.
    group: the ``--help`` section the flag is listed under.
    """
    meta = {_META: _Flag(help, flag, cli, group)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _option(f: dataclasses.Field, kind: type) -> tuple[str, str]:
    """(option string, namespace dest) of a field."""
    desc: _Flag = f.metadata[_META]
    if desc.flag is not None:
        opt = desc.flag
    elif kind is bool and _default(f):
        opt = "--no-" + f.name.replace("_", "-")
    else:
        opt = "--" + f.name.replace("_", "-")
    return opt, opt.lstrip("-").replace("-", "_")


def flag_fields(cls: type) -> list[tuple[dataclasses.Field, type, str, str]]:
    """(field, resolved type, option string, dest) of every field of ``cls`` that has a flag."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        desc = f.metadata.get(_META)
        if desc is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with engram_model.flags.setting()")
        if not desc.cli:
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            kind = list[item]  # type: ignore[valid-type]
        out.append((f, kind, *_option(f, kind)))
    return out


def add_flags(parser: argparse.ArgumentParser, cls: type) -> dict[str, argparse._ArgumentGroup]:
    """Add one option per flagged field of ``cls`` to ``parser``, in argument groups named
    by the fields' ``group``; returns the groups so the caller can add related flags."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f, kind, opt, dest in flag_fields(cls):
        desc: _Flag = f.metadata[_META]
        if desc.group not in groups:
            groups[desc.group] = parser.add_argument_group(desc.group)
        group = groups[desc.group]
        default = _default(f)
        if kind is bool:
            group.add_argument(opt, dest=dest, action="store_true", help=f"{desc.help}; this switch sets {f.name}={not default}")
        elif typing.get_origin(kind) is list:
            group.add_argument(opt, dest=dest, type=typing.get_args(kind)[0], nargs="+", default=default, help=desc.help)
        else:
            group.add_argument(opt, dest=dest, type=kind, default=default, help=desc.help)
    return groups


def from_flags(cls: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """``cls`` built from the parsed flags; ``overrides`` set the fields without a flag (and
    win over flags). Validation is the dataclass's own ``__post_init__``."""
    kw: dict[str, Any] = {}
    for f, kind, _, dest in flag_fields(cls):
        value = getattr(args, dest)
        if kind is bool:  # the switch flips the default
            value = not _default(f) if value else _default(f)
        kw[f.name] = copy.copy(value)
    kw.update(overrides)
    return cls(**kw)


def to_argv(cfg: Any) -> list[str]:
    """The flags that make :func:`from_flags` rebuild ``cfg`` (fields without a flag are not
    spelled: pass them as overrides). A list field must be non-empty (``nargs="+"``)."""
    argv: list[str] = []
    for f, kind, opt, _ in flag_fields(type(cfg)):
        value = getattr(cfg, f.name)
        if kind is bool:
            if bool(value) != bool(_default(f)):
                argv.append(opt)
        elif typing.get_origin(kind) is list:
            if not value:
                raise ValueError(f"{f.name}=[] cannot be spelled as {opt} (it takes one or more values)")
            argv += [opt, *map(str, value)]
        else:
            argv += [opt, str(value)]
    return argv
