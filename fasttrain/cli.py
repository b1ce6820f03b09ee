"""Command-line flags generated from config dataclasses: one flag per field, its help from the
field's metadata, its type from the annotation. `--seq-len` sets `seq_len`; booleans are
`--flag` / `--no-flag`; lists take several values (`--data a.txt b.jsonl`). A field's metadata
may set "cli": False (a field the program sets itself) or give "aliases" (e.g. `--run-dir` for `--run`, which torchrun's own parser would otherwise
take for an abbreviation of its `--run-path`).

Every int and float field declares the values it accepts, "range": (low, high), both inclusive,
None for no bound; "low_exclusive": True makes the low bound strict (`> 0`). Each config's
`__post_init__` calls `check_ranges(self)`, so a bad value stops the command when the flags are
parsed, in one line, before any work; a float must also be finite (argparse takes "nan" and
"inf" as floats)."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import typing

from fasttrain.errors import ConfigError


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.lru_cache(maxsize=None)
def _numeric_fields(cls) -> tuple[tuple[dataclasses.Field, type], ...]:
    """(field, int or float) for each numeric field of the dataclass cls (bools are not numbers here)."""
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls) if hints[f.name] in (int, float))


def _bounds_text(low, high, low_exclusive: bool) -> str:
    if low is not None and high is not None and not low_exclusive:
        return f"in [{low}, {high}]"
    if low is not None and high is not None:
        return f"in ({low}, {high}]"
    if low is not None:
        return f"{'>' if low_exclusive else '>='} {low}"
    return f"<= {high}" if high is not None else ""


def check_ranges(obj) -> None:
    """Raise ConfigError for the first numeric field of the dataclass instance obj that is out
    of its declared range (or, for a float, not finite), e.g. `--lr must be a finite number >= 0,
    got nan`. A field without a declared range only has to be finite."""
    for f, kind in _numeric_fields(type(obj)):
        value = getattr(obj, f.name)
        low, high = f.metadata.get("range", (None, None))
        low_exclusive = f.metadata.get("low_exclusive", False)
        name = _flag(f.name) if f.metadata.get("cli", True) else f.name
        too_low = low is not None and (value <= low if low_exclusive else value < low)
        too_high = high is not None and value > high
        if too_low or too_high or (kind is float and not math.isfinite(value)):
            bounds = _bounds_text(low, high, low_exclusive)
            want = f"a finite number {bounds}".rstrip() if kind is float else bounds
            raise ConfigError(f"{name} must be {want}, got {value}")


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
        if hint in (bool, bool | None):  # None: the program decides (e.g. by device)
            group.add_argument(*flags, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(hint) is list:
            (item,) = typing.get_args(hint)
            group.add_argument(*flags, nargs="*", type=item, default=default, help=help_text, metavar="X")
        else:
            low, high = f.metadata.get("range", (None, None))
            bounds = _bounds_text(low, high, f.metadata.get("low_exclusive", False))
            group.add_argument(*flags, type=hint, default=default, metavar=hint.__name__.upper(),
                               help=f"{help_text} (default: {default}{'; ' + bounds if bounds else ''})")


def dataclass_from_args(cls, args: argparse.Namespace):
    """Build `cls` from parsed args. The configs raise ConfigError for bad values; a ValueError
    from a check not written that way is about these flags too, so it becomes a ConfigError."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    try:
        return cls(**values)
    except (ConfigError, ValueError) as e:
        raise ConfigError(_one_line(str(e))) from None


def _one_line(message: str) -> str:
    """The command line prints an error as one line; join a message that has several."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())
