"""One tool call -> what the model reads back, whatever the tool does.

A tool is user code meeting the model's inputs, so every way it can go wrong is an answer to the
model, never the end of the run: a tool that raises (SystemExit included) answers with its error,
one that runs past `timeout` seconds is abandoned in its thread (it cannot be killed; it runs on as a
daemon, its later prints still kept off stdout) and answered with a timeout, and a call that cannot
be made (garbled JSON, an unknown tool, arguments the function does not take) answers with what is
wrong. The texts keep TRL's shape, `str({"error": ...})` ("{'error': 'Tool foo not found.'}"), so a
reward function that looks for failed calls in the tool messages ports unchanged. A result is
returned as `str(result)`, as TRL does for text (its multimodal list results are not supported).

While a tool runs its prints go to stderr and its stdin is empty (`quarantine`). `ToolCounts` adds up
outcomes per tool for the metrics log (TRL logs `tools/call_frequency` and `tools/failure_frequency`).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rlkit.agents.calls import BadToolCall, ToolCall
from rlkit.agents.quarantine import quarantined
from rlkit.agents.toolset import Toolset

#: Seconds a tool may run before its call is answered with a timeout (TRL has no limit).
DEFAULT_TIMEOUT = 30.0

OutcomeKind = Literal["ok", "error", "timeout", "bad_call", "unknown_tool"]
KINDS: tuple[OutcomeKind, ...] = ("ok", "error", "timeout", "bad_call", "unknown_tool")


@dataclass(frozen=True)
class ToolOutcome:
    """How one call went: `kind`, the tool's `name` (as the model wrote it; "" when unreadable),
    the `text` the model reads back, and how long the tool ran."""

    kind: OutcomeKind
    name: str
    text: str
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.kind != "ok"

    def as_message(self) -> dict[str, Any]:
        """The tool message of the conversation (TRL's shape)."""
        return {"role": "tool", "name": self.name, "content": self.text}


def error_text(message: str) -> str:
    """What a failed call answers, in TRL's shape."""
    return str({"error": message})


def execute(call: ToolCall | BadToolCall, tools: Toolset, timeout: float | None = DEFAULT_TIMEOUT) -> ToolOutcome:
    """Run one call against `tools` (None `timeout`: no limit, as in TRL)."""
    if isinstance(call, BadToolCall):  # named only after a tool that exists (invented names are not metrics)
        return ToolOutcome("bad_call", call.name if tools.get(call.name) else "", error_text(call.reason))
    tool = tools.get(call.name)
    if tool is None:
        return ToolOutcome("unknown_tool", call.name, error_text(f"Tool {call.name} not found."))
    try:
        inspect.signature(tool.function).bind(**call.arguments)
    except TypeError as err:  # the model's arguments do not fit the function: its mistake, not the tool's
        return ToolOutcome("bad_call", call.name, error_text(f"{call.name}: {err}"))
    except ValueError:  # no signature to check (a builtin): the call itself will say
        pass
    return _run(call, tool.function, timeout)


def execute_all(
    calls: Sequence[ToolCall | BadToolCall], tools: Toolset, timeout: float | None = DEFAULT_TIMEOUT
) -> tuple[ToolOutcome, ...]:
    """The calls of one turn, in order, one after the other (TRL runs a turn's sync tools in order)."""
    return tuple(execute(call, tools, timeout) for call in calls)


class _Result:
    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None


def _run(call: ToolCall, function: Any, timeout: float | None) -> ToolOutcome:
    result = _Result()

    def target() -> None:
        with quarantined():
            try:
                value = function(**call.arguments)
                if inspect.isawaitable(value):  # an async tool (TRL takes those too)
                    value = asyncio.run(_awaited(value))
                result.value = str(value)
            except BaseException as err:  # the tool's own failure, SystemExit and KeyboardInterrupt too
                result.error = err

    start = time.monotonic()
    thread = threading.Thread(target=target, name=f"rlkit-tool-{call.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    seconds = time.monotonic() - start
    if thread.is_alive():
        return ToolOutcome(
            "timeout", call.name, error_text(f"Tool {call.name} timed out after {timeout:g} seconds."), seconds
        )
    if result.error is not None:
        return ToolOutcome("error", call.name, error_text(_message(result.error)), seconds)
    return ToolOutcome("ok", call.name, result.value, seconds)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _message(err: BaseException) -> str:
    """TRL's `str(e)`; the exception's type where that is empty (`raise ValueError()`, `sys.exit()`)."""
    try:
        text = str(err)
    except Exception:
        text = ""
    return text if text.strip() else type(err).__name__


@dataclass(frozen=True)
class ToolCounts:
    """Outcomes added up: `counts[(tool, kind)]`. Calls to unknown tools and unreadable calls are
    counted under their kind only (tool ""), so names the model invents never become metric names."""

    counts: Mapping[tuple[str, str], int] = field(default_factory=dict)

    def add(self, outcomes: Iterable[ToolOutcome]) -> ToolCounts:
        counts = dict(self.counts)
        for outcome in outcomes:
            tool = "" if outcome.kind == "unknown_tool" else outcome.name
            counts[(tool, outcome.kind)] = counts.get((tool, outcome.kind), 0) + 1
        return ToolCounts(counts)

    def __add__(self, other: ToolCounts) -> ToolCounts:
        counts = dict(self.counts)
        for key, n in other.counts.items():
            counts[key] = counts.get(key, 0) + n
        return ToolCounts(counts)

    @staticmethod
    def slots(tools: Iterable[str]) -> tuple[tuple[str, str], ...]:
        """Every (tool, kind) that calls to `tools` can be counted under, in a fixed order: the shape
        in which processes add their counts up (a count of 0 is still a metric, logged every step)."""
        named = [(tool, kind) for tool in tools for kind in KINDS if kind != "unknown_tool"]
        return (*named, ("", "bad_call"), ("", "unknown_tool"))

    def total(self, kind: str | None = None, tool: str | None = None) -> int:
        return sum(
            n for (t, k), n in self.counts.items() if (kind is None or k == kind) and (tool is None or t == tool)
        )

    @property
    def calls(self) -> int:
        return self.total()

    @property
    def failures(self) -> int:
        return self.calls - self.total("ok")

    def metrics(self, episodes: int | None = None) -> dict[str, float]:
        """Flat metrics: totals per kind, per-tool calls/errors/timeouts, and TRL's two frequencies
        (`call_frequency` = calls per episode, given the number of episodes; per tool too)."""
        out: dict[str, float] = {"tools/calls": float(self.calls)}
        for kind in KINDS[1:]:
            out[f"tools/{kind}s"] = float(self.total(kind))
        out["tools/failure_frequency"] = self.failures / self.calls if self.calls else 0.0
        if episodes:
            out["tools/call_frequency"] = self.calls / episodes
        for tool in sorted({t for t, _ in self.counts if t}):
            out[f"tools/{tool}/calls"] = float(self.total(tool=tool))
            if episodes:
                out[f"tools/{tool}/call_frequency"] = self.total(tool=tool) / episodes
            out[f"tools/{tool}/errors"] = float(self.total("error", tool))
            out[f"tools/{tool}/timeouts"] = float(self.total("timeout", tool))
        return out
