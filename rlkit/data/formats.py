"""Recognise the standard layouts of SPEC.md and normalise each record to message lists.

Every downstream step (templates, masks, pairs) works on one shape: a list of
`{"role", "content"}` messages, so string and conversational data share one code path.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from rlkit.errors import InputError

Messages = list[dict[str, str]]


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
        if message.get("content") is None:
            raise InputError(f"{where}: message {number} ({message['role']}) has no content")
        messages.append(
            {"role": message["role"], "content": text_of(message["content"], f"message {number}'s content", where)}
        )
    return messages


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
