"""Recognise the standard layouts of SPEC.md and normalise each record to message lists.

Every downstream step (templates, masks, pairs) works on one shape: a list of
`{"role", "content"}` messages, so string and conversational data share one code path. An
assistant message may also carry `tool_calls` and a record a `tools` column (the JSON schemas the
template shows the model), in the layout TRL and transformers use, so tool-calling conversations
are trained on exactly as `rlkit grpo --tools` later samples them.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from rlkit.errors import InputError

Messages = list[dict[str, Any]]


class Format(str, Enum):
    TEXT = "text"
    MESSAGES = "messages"
    PROMPT_COMPLETION = "prompt/completion"
    PREFERENCE = "prompt/chosen/rejected"
    UNPAIRED = "prompt/completion/label"


ACCEPTED = (
    "text | messages | prompt+completion | prompt+chosen+rejected (or chosen+rejected with an "
    "implicit prompt) | prompt+completion+label"
)


def detect_format(columns: list[str], source: str) -> Format:
    names = set(columns)
    if {"chosen", "rejected"} <= names:
        return Format.PREFERENCE
    if {"prompt", "completion", "label"} <= names:
        return Format.UNPAIRED
    if {"prompt", "completion"} <= names:
        return Format.PROMPT_COMPLETION
    if "messages" in names:
        return Format.MESSAGES
    if "text" in names:
        return Format.TEXT
    raise InputError(
        f"{source}: no known data format in columns ({', '.join(columns)}); accepted: {ACCEPTED}; "
        "map other names with --columns, e.g. --columns prompt=question,chosen=response_j,rejected=response_k"
    )


ROLES = ("system", "user", "assistant", "tool")  # "tool" only where the template renders it (templates.render)


def shown(value: Any) -> str:
    """A record value as an error line quotes it: JSON, cut short."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def text_of(value: Any, what: str, where: str) -> str:
    """A string, or a list of text parts joined; nothing else is text (never stringified into training)."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str) for p in value
        )
    ):
        return "".join(p["text"] for p in value)
    raise InputError(f"{where}: {what} must be a string (or a list of text parts), got {shown(value)}")


def as_messages(value: Any, role: str, where: str) -> Messages:
    """A string becomes one message of `role`; a message list is checked and kept.

    Each message needs a role of `ROLES` and text content. A missing key and a null are the
    same thing here (Arrow fills a key absent from some records with None).
    """
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise InputError(
            f"{where}: expected a string or a non-empty list of {{role, content}} messages, got {shown(value)}"
        )
    messages = []
    for number, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise InputError(f"{where}: message {number} is {shown(message)}, not a {{role, content}} object")
        if message.get("role") not in ROLES:
            raise InputError(
                f"{where}: message {number} has role {shown(message.get('role'))}; use one of {', '.join(ROLES)}"
            )
        calls = message.get("tool_calls")
        if calls is not None and message["role"] != "assistant":
            raise InputError(
                f"{where}: message {number} ({message['role']}) has tool_calls; only assistant turns call tools"
            )
        if message.get("content") is None and calls is None:
            raise InputError(f"{where}: message {number} ({message['role']}) has no content")
        content = message.get("content")
        kept: dict[str, Any] = {
            "role": message["role"],
            "content": "" if content is None else text_of(content, f"message {number}'s content", where),
        }
        if calls is not None:
            kept["tool_calls"] = tool_calls(calls, f"{where}: message {number}")
        messages.append(kept)
    return messages


CALL_LAYOUT = '{"type": "function", "function": {"name": ..., "arguments": {...}}}'


def _json_value(value: Any, what: str, where: str) -> Any:
    """A value given as JSON text (how rlkit's reader hands nested tool fields over) parsed; others as they are."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: {what} is not valid JSON ({err.msg} at column {err.colno})")


def tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant turn's calls as `[{"type": "function", "function": {"name", "arguments"}}]`, the
    layout chat templates read (the bare `{"name", "arguments"}` is accepted too). Arguments must be a
    JSON object, given as one or as its text: a template writes them back with `tojson`, so the model
    is trained on the very call syntax `rlkit.agents.calls` parses from its samples."""
    value = _json_value(value, "tool_calls", where)
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: tool_calls must be a non-empty list of {CALL_LAYOUT}, got {shown(value)}")
    calls = []
    for k, call in enumerate(value, 1):
        function = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else call
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise InputError(f"{where}: tool call {k} is {shown(call)}; write {CALL_LAYOUT}")
        arguments = _json_value(function.get("arguments", {}), f"tool call {k}'s arguments", where)
        if not isinstance(arguments, dict):
            raise InputError(f"{where}: tool call {k}'s arguments are {shown(arguments)}; write a JSON object")
        calls.append({"type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


def record_tools(record: dict[str, Any], where: str) -> list[dict[str, Any]] | None:
    """A record's `tools` column: the JSON schemas its conversation's template shows the model (TRL's
    dataset column; `transformers.utils.get_json_schema` writes them), or None without one."""
    value = _json_value(record.get("tools"), "'tools'", where)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise InputError(f"{where}: 'tools' must be a list of JSON schema objects, got {shown(value)}")
    for k, tool in enumerate(value, 1):
        function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        if not isinstance(function.get("name"), str):
            raise InputError(
                f"{where}: tool {k} in 'tools' has no name; write schemas as transformers' get_json_schema does, "
                '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}'
            )
    return value or None


def _common_prefix_messages(chosen: Messages, rejected: Messages) -> int:
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return n


def _common_prefix_text(chosen: str, rejected: str) -> int:
    """Length of the shared prompt of two strings, backed off to a whitespace boundary."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # Back off even when one string is a prefix of the other ("... yes" / "... yes sir"): the
    # replies are whole words, and neither may end up empty.
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    return n


def _holds_prompt(value: Any) -> bool:
    """A message list that starts with a non-assistant turn carries its own prompt."""
    return (
        isinstance(value, list) and bool(value) and isinstance(value[0], dict) and value[0].get("role") != "assistant"
    )


def split_pair(record: dict[str, Any], where: str) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen, rejected) as message lists, extracting an implicit prompt if needed."""
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record.get("prompt")
    if prompt is not None and _holds_prompt(chosen) and _holds_prompt(rejected):
        prompt = None  # whole conversations (UltraFeedback-binarized's layout): the prompt column repeats their start
    if prompt is None:
        if isinstance(chosen, str) and isinstance(rejected, str):
            cut = _common_prefix_text(chosen, rejected)
            if cut == 0:
                raise InputError(f"{where}: no 'prompt' column and chosen/rejected share no prompt prefix")
            return (
                as_messages(chosen[:cut], "user", where),
                as_messages(chosen[cut:], "assistant", where),
                as_messages(rejected[cut:], "assistant", where),
            )
        chosen_m, rejected_m = as_messages(chosen, "assistant", where), as_messages(rejected, "assistant", where)
        cut = _common_prefix_messages(chosen_m, rejected_m)
        if cut == 0:
            raise InputError(f"{where}: no 'prompt' column and chosen/rejected share no leading messages")
        return chosen_m[:cut], chosen_m[cut:], rejected_m[cut:]
    return (
        as_messages(prompt, "user", where),
        as_messages(chosen, "assistant", where),
        as_messages(rejected, "assistant", where),
    )


def to_conversation(record: dict[str, Any], fmt: Format, where: str) -> Messages:
    """One SFT example as messages (TEXT records are not conversations; see `tokenize`)."""
    if fmt is Format.MESSAGES:
        return as_messages(record["messages"], "user", where)
    if fmt in (Format.PROMPT_COMPLETION, Format.UNPAIRED):
        return as_messages(record["prompt"], "user", where) + as_messages(record["completion"], "assistant", where)
    if fmt is Format.PREFERENCE:
        prompt, chosen, _ = split_pair(record, where)
        return prompt + chosen
    raise InputError(f"{where}: format {fmt.value} has no conversation")
