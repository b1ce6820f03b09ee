"""Command-line flags generated from config dataclasses: one flag per field, its help from the
field's metadata, its type from the annotation. `--seq-len` sets `seq_len`; booleans are
`--flag` / `--no-flag`; lists take several values (`--data a.txt b.jsonl`). A field's metadata
may set "cli": False (a field the program sets itself) or give "aliases" (e.g. `--run-dir` for `--run`, which torchrun's own parser would otherwise
take for an abbreviation of its `--run-path`)."""
from __future__ import annotations

import argparse
import dataclasses
import typing


class CliError(Exception):
    """A bad argument or bad input: printed as one line, no traceback."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str):
    """Add one flag per field of `cls`, in a help section titled `title`."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or not f.metadata.get("cli", True):
            continue
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        flags = [_flag(f.name), *f.metadata.get("aliases", ())]
        if hint is bool:
            group.add_argument(*flags, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(hint) is list:
            (item,) = typing.get_args(hint)
            group.add_argument(*flags, nargs="*", type=item, default=default, help=help_text, metavar="X")
        else:
            group.add_argument(*flags, type=hint, default=default, metavar=hint.__name__.upper(),
                               help=f"{help_text} (default: {default})")


def dataclass_from_args(cls, args: argparse.Namespace):
    """Build `cls` from parsed args; a validation error becomes a CliError (one clean line)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    try:
        return cls(**values)
    except ValueError as e:
        raise CliError(str(e)) from None
