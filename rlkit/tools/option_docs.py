"""Markdown tables of a command's options, generated from its config dataclass.

The docs pages embed these tables, and a test checks that every flag is documented, so the
pages cannot drift from `--help`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rlkit.config import CONFIG_HELP


def _flag(field: dataclasses.Field) -> str:
    meta = field.metadata
    if meta.get("positional"):
        return meta["metavar"]
    flags = list(meta.get("flags") or ())
    return " ".join(f"`{f}`" for f in flags) if flags else f"`--{field.name.replace('_', '-')}`"


def _default(field: dataclasses.Field) -> str:
    value: Any = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
    if field.metadata.get("positional"):
        return "required" if value in (None, []) else "optional"  # eval's MODEL: not given with --completions
    return "-" if value is None else f"`{value}`"


def options_table(cls: type) -> str:
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(cls):
        rows.append(f"| {_flag(field)} | {_default(field)} | {field.metadata.get('help', '')} |")
    rows.append(f"| `--config` | - | {CONFIG_HELP} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import importlib
    import sys

    from rlkit.cli import COMMANDS

    wanted = sys.argv[1]
    for name, module in COMMANDS:
        if name == wanted:
            mod = importlib.import_module(f"rlkit.commands.{module}")
            print(options_table(mod.command.config_class))
