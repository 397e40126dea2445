"""Reading eval inputs into the shapes the questions need: pairs, prompts, completions."""

from __future__ import annotations

import json
from typing import Any

from rlkit.data.formats import Messages, as_messages
from rlkit.data.load import load_records
from rlkit.data.prompts import PromptRows, is_conversational
from rlkit.errors import InputError


def read_records(path: str, columns: str | None, limit: int) -> list[dict[str, Any]]:
    records = load_records([path], columns)
    rows = [dict(r) for r in (records.select(range(min(limit, len(records)))) if limit else records)]
    return rows


def prompt_messages(record: dict[str, Any], where: str) -> Messages:
    """The conversation to answer: `prompt` (string or messages), or `messages` without trailing replies."""
    if record.get("prompt") is not None:
        return as_messages(record["prompt"], "user", where)
    if record.get("messages") is not None:
        messages = as_messages(record["messages"], "user", where)
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if messages:
            return messages
    raise InputError(f"{where}: needs a 'prompt' (string or messages) or a 'messages' column ending in a user turn")


def prompt_rows(records: list[dict[str, Any]], path: str) -> tuple[list[Any], PromptRows]:
    """(prompts as given, their `PromptRows`): the conversations, the records' other columns and
    whether the prompts are message lists, which a reward function gets as grpo's does."""
    given = [r.get("prompt") if r.get("prompt") is not None else r.get("messages") for r in records]
    conversations = [prompt_messages(r, f"{path} record {i + 1}") for i, r in enumerate(records)]
    used = ["prompt" if r.get("prompt") is not None else "messages" for r in records]
    others = [{k: v for k, v in r.items() if k not in (key, "completion")} for r, key in zip(records, used)]
    return given, PromptRows(conversations, others, bool(given) and is_conversational(given[0]))


def read_prompts(path: str, columns: str | None, limit: int) -> tuple[list[Any], PromptRows]:
    """(prompts as given, their `PromptRows`)."""
    return prompt_rows(read_records(path, columns, limit), path)


def read_completions(path: str, columns: str | None, limit: int) -> tuple[list[Any], PromptRows, list[str]]:
    """(prompts as given, their `PromptRows`, completions) of a prompt/completion file."""
    records = read_records(path, columns, limit)
    if records and "completion" not in records[0]:
        raise InputError(
            f"{path}: no 'completion' column (found: {', '.join(records[0])}); expected `rlkit chat` output or prompt/completion JSONL"
        )
    completions = []
    for i, record in enumerate(records):
        where = f"{path} record {i + 1}"
        completion = record.get("completion")
        if isinstance(completion, list):  # a message list: the reply text
            completion = "".join(m["content"] for m in as_messages(completion, "assistant", where))
        if not isinstance(completion, str):
            raise InputError(f"{where}: 'completion' must be a string, got {json.dumps(completion)[:40]}")
        completions.append(completion)
    given, prompts = prompt_rows(records, path)
    return given, prompts, completions
