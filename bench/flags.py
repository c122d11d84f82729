"""Command-line flags from a scenario's spec dataclass: the dataclass holds the defaults and the
help, so the two cannot drift."""

from __future__ import annotations

import argparse
import dataclasses
from enum import Enum


def help_text(text: str) -> dict:
    """Field metadata: ``field(default=..., metadata=help_text("..."))``."""
    return {"help": text}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One --flag per field of ``cls``."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        kind = type(f.default)
        is_enum = issubclass(kind, Enum)
        default = f.default.value if is_enum else f.default
        if kind is bool:  # --name / --no-name: type=bool would read "False" as true
            extra = {"action": argparse.BooleanOptionalAction}
        else:
            extra = {"type": str if is_enum else kind}
            if is_enum:
                extra["choices"] = [m.value for m in kind]
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default,
                           help=f"{f.metadata.get('help', '')} (default: {default})", **extra)


def from_flags(cls: type, args: argparse.Namespace):
    values = {}
    for f in dataclasses.fields(cls):
        kind = type(f.default)
        value = getattr(args, f.name)
        values[f.name] = kind(value) if issubclass(kind, Enum) else value
    return cls(**values)
