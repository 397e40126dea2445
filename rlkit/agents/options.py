"""The tool options of the commands that use a model with tools (`chat`, `eval`), declared once.

`--tools`, `--max-turns` and `--tool-timeout` mean what they mean for `grpo` (and have its
defaults), so a model trained with tools is used and measured under the rules it was trained
under. Functions rather than shared fields: a dataclass field belongs to one class. Importable
without torch (the configs are, so that `--help` starts at once).
"""

from __future__ import annotations

from typing import Any

from rlkit.config import opt
from rlkit.errors import InputError

#: `--tool-timeout`'s default, seconds (grpo's; rlkit.agents.execution.DEFAULT_TIMEOUT).
TOOL_TIMEOUT = 30.0


def tools_option(what: str) -> Any:
    """`--tools`: `what` says what the command does with the calls."""
    return opt(
        [],
        "Tool (repeatable): module:function, a typed function with a Google-style docstring (TRL's tools=); "
        f"{what} Needs a template with tool turns (--template chatml-tools).",
    )


def max_turns_option(unit: str = "reply") -> Any:
    """`--max-turns`: the cap on tool-calling rounds per `unit` (a reply, grpo's episode)."""
    return opt(
        None,
        f"Most tool-calling rounds per {unit} (TRL's max_tool_calling_iterations; "
        "default: no limit but --max-new-tokens); calls made after it are left unanswered.",
        min=1,
    )


def tool_timeout_option() -> Any:
    return opt(
        TOOL_TIMEOUT,
        "Seconds a tool call may run before it is answered with a timeout message (0: no limit).",
        min=0,
    )


def check_tool_options(tools: list[str], max_turns: int | None) -> None:
    """Refuse `--max-turns` without tools: it caps tool rounds, and would otherwise be ignored."""
    if max_turns is not None and not tools:
        raise InputError(f"--max-turns {max_turns} caps tool-calling rounds; give --tools as well")
