"""The tool calls in a completion's text, written the Hermes/Qwen way:

    <tool_call>
    {"name": "multiply", "arguments": {"a": 3, "b": 4}}
    </tool_call>

one block per call, several per turn allowed. It is what Qwen2.5/3, Hermes 2 Pro and rlkit's
`chatml-tools` template render, and what TRL's response schema for them parses
(`<tool_call>\\s*(.+?)\\s*</tool_call>`, JSON inside). Each block parses on its own: a turn with one
good call and one garbled one runs the good one, and the garbled one becomes a `BadToolCall` whose
`reason` is shown to the model (TRL instead treats the whole turn as plain text and ends the episode;
an answer the model can correct is the more useful signal, and it is counted as a bad call).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
_SHAPE = 'a JSON object {"name": "<tool name>", "arguments": {...}}'


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for: a tool name and its keyword arguments."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def as_message(self) -> dict[str, Any]:
        """The entry of an assistant message's `tool_calls`, as chat templates (and TRL) read them."""
        return {"type": "function", "function": {"name": self.name, "arguments": dict(self.arguments)}}


@dataclass(frozen=True)
class BadToolCall:
    """A `<tool_call>` block that is not a call: `reason` is what the model is told, `name` the tool
    it meant where that much could be read ("" otherwise), `text` the block as written."""

    text: str
    reason: str
    name: str = ""


@dataclass(frozen=True)
class ParsedTurn:
    """An assistant turn: its text outside the tool-call blocks, and the calls in order."""

    content: str
    calls: tuple[ToolCall | BadToolCall, ...]

    @property
    def good_calls(self) -> tuple[ToolCall, ...]:
        return tuple(call for call in self.calls if isinstance(call, ToolCall))

    def as_message(self) -> dict[str, Any]:
        """The assistant message the conversation carries on (TRL's shape: `tool_calls` only when
        there are readable calls; a garbled block cannot be rendered back as a call)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.good_calls:
            message["tool_calls"] = [call.as_message() for call in self.good_calls]
        return message


def parse_turn(text: str) -> ParsedTurn:
    """The turn's calls and the text around them. `text` is the completion decoded with special tokens
    skipped (any left outside the blocks would end up in `content`)."""
    calls: list[ToolCall | BadToolCall] = []
    outside: list[str] = []
    cursor = 0
    for match in _BLOCK.finditer(text):
        outside.append(text[cursor : match.start()])
        calls.append(parse_call(match.group(1)))
        cursor = match.end()
    rest = text[cursor:]
    if OPEN in rest:  # a block opened and never closed: the model meant a call
        start = rest.index(OPEN)
        outside.append(rest[:start])
        calls.append(BadToolCall(rest[start:], f"the tool call is missing its closing {CLOSE}"))
    else:
        outside.append(rest)
    return ParsedTurn("".join(outside).strip(), tuple(calls))


def parse_call(body: str) -> ToolCall | BadToolCall:
    """The text between `<tool_call>` and `</tool_call>` -> a call, or why it is not one."""
    raw = body.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        return BadToolCall(raw, f"the tool call is not valid JSON ({err.msg} at character {err.pos}); write {_SHAPE}")
    if not isinstance(value, dict):
        return BadToolCall(raw, f"the tool call must be {_SHAPE}")
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return BadToolCall(raw, f'the tool call has no "name"; write {_SHAPE}')
    arguments = value.get("arguments", {})
    if arguments is None:  # TRL normalises a missing or null `arguments` to {} (no-argument tools)
        arguments = {}
    if isinstance(arguments, str):  # OpenAI style: the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return BadToolCall(raw, f'the "arguments" of {name} must be a JSON object of argument names to values', name)
    return ToolCall(name, arguments)
