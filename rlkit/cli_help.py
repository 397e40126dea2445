"""`rlkit CMD --help` laid out for a person at an 80-column terminal.

Typer's own layout gives every option four flag columns and a type column, so with forty
options and names like `--gradient-checkpointing/--no-gradient-checkpointing` the help text is
left a dozen characters a line and long flags are cut off. Here each option is one flag cell
(`--flag/--no-flag` for a switch, `--name TYPE` for a value, short choice lists spelled out)
beside its help and plain default, in the panels its config field declares (rlkit.config):
a long flag cell breaks after its `/` rather than the help being squeezed, and nothing is cut.
The layout is read from the command's config dataclass, the same source as the docs tables.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from rlkit.config import COMMAND_PANEL, CONFIG_HELP, PANELS, _unwrap_optional, default_text, field_panels, option_flags

TYPES = {int: "INT", float: "FLOAT", str: "TEXT"}
MAX_FLAG_WIDTH = 30
SHORT_CHOICES = 28  # longer choice lists are named in the help text instead of in the flag cell


def _flag(f: dataclasses.Field, base: Any) -> str:
    """The flag cell of one field: `MODEL`, `--flag/--no-flag`, `-o, --output TEXT`, `--kind a|b`."""
    if f.metadata.get("positional"):
        return f.metadata["metavar"]
    flags = option_flags(f, base)
    if base is bool:
        return ", ".join(flags)
    choices = f.metadata.get("choices") or ()
    if choices and len("|".join(choices)) <= SHORT_CHOICES:
        value = "|".join(choices)
    elif choices:
        value = "NAME"
    else:
        value = TYPES.get(base, "LIST" if typing.get_origin(base) is list else "VALUE")
    return f"{', '.join(flags)} {value}"


def _help(f: dataclasses.Field) -> Text:
    text = Text(f.metadata.get("help", ""), overflow="fold")  # a long example value wraps, never cut
    choices = f.metadata.get("choices") or ()
    if len("|".join(choices)) > SHORT_CHOICES and not all(c in text.plain for c in choices):
        text.append(f" Choices: {', '.join(choices)}.")
    shown = None if f.metadata.get("positional") else default_text(f)
    if shown is not None:
        text.append(f" [default: {shown}]", style="dim")
    return text


def _fit(flag: str, width: int) -> Text:
    """Break a switch too long for its cell after the `/`, never inside a name."""
    if len(flag) > width and "/" in flag:
        flag = flag.replace("/", "/\n", 1)
    return Text(flag, style="bold cyan")


def _rows(cls: type) -> dict[str, list[tuple[str, Text]]]:
    """(flag, help) rows by panel: arguments, the command's own options, then PANELS in order."""
    hints = typing.get_type_hints(cls)
    panels = field_panels(cls)
    order = ("Arguments", COMMAND_PANEL, *PANELS)
    rows: dict[str, list[tuple[str, Text]]] = {title: [] for title in order}
    for f in dataclasses.fields(cls):
        title = "Arguments" if f.metadata.get("positional") else panels[f.name]
        rows[title].append((_flag(f, _unwrap_optional(hints[f.name])), _help(f)))
    rows[PANELS[0]].append(("--config FILE", Text(CONFIG_HELP)))
    rows[COMMAND_PANEL].append(("--help", Text("Show this message and exit.")))
    return {title: panel for title, panel in rows.items() if panel}


class RlkitCommand(TyperCommand):
    """A typer command built by `command_from_config`, whose `--help` is the layout above."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        cls = getattr(self.callback, "config_class", None)
        if cls is None:  # not built from a config: typer's own help
            return super().format_help(ctx, formatter)
        console = Console(highlight=False)  # stdout, as typer's help; honours COLUMNS
        console.print(Text(self.get_usage(ctx), style="bold"))
        for paragraph in (self.help or "").split("\n\n"):
            console.print()
            console.print(Text(" ".join(paragraph.split())))
        console.print()
        rows = _rows(cls)
        flags = [flag for panel in rows.values() for flag, _ in panel]
        unbreakable = max(len(piece) for flag in flags for piece in flag.replace("/", "/ ").split())
        width = max(unbreakable, min(MAX_FLAG_WIDTH, max(map(len, flags)), console.width // 3))
        for title, panel in rows.items():
            table = Table.grid(padding=(0, 2))
            table.add_column(width=width)
            table.add_column(ratio=1)
            for flag, help in panel:
                table.add_row(_fit(flag, width), help)
            console.print(Panel(table, title=title, title_align="left", border_style="dim"))


class RlkitGroup(TyperGroup):
    """`rlkit --help` as typer lays it out, but `--help` shown as the switch it is (no `<bool>`)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option
