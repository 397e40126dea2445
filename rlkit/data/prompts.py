"""Prompts for on-policy training: loaded with what reward functions get, and tokenised for generation.

`load_prompt_rows` reads the prompts of `ppo` and `grpo` with the records' other columns and
whether the prompts were conversational (message lists rather than strings): both reach reward
functions, the way TRL passes them (`rlkit.scoring.FunctionReward`).

Training tokenizes the prompt segment on its own (see templates.render_segments), so
generation must too, with the same single-BOS rule, or the model sees a prompt boundary it
never saw in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlkit.console import info, warn
from rlkit.data.formats import Messages, as_messages
from rlkit.data.templates import ChatTemplate, prompt_text
from rlkit.data.tokenize import IGNORE, char_budget, finish_ids, wants_bos
from rlkit.errors import InputError


@dataclass(frozen=True)
class PromptRows:
    """Each prompt's conversation and its record's other columns, and whether the prompts were given
    as message lists (TRL's conversational format: then reward functions see messages, not strings).

    `replies`: a `messages` conversation's final assistant turns (dropped from the prompt), empty
    where there are none; with a `completion` column (TRL's prompt-completion format) they are
    among the `columns`. What off-policy distillation trains on."""

    conversations: list[Messages]
    columns: list[dict[str, Any]]
    conversational: bool
    replies: list[Messages] | None = None

    def select(self, kept: Sequence[int]) -> PromptRows:
        replies = [self.replies[i] for i in kept] if self.replies is not None else None
        return PromptRows(
            [self.conversations[i] for i in kept], [self.columns[i] for i in kept], self.conversational, replies
        )

    def keyword_columns(self, rows: Sequence[int]) -> dict[str, list[Any]]:
        """The other columns of `rows`, one list per column (a reward function's keyword arguments)."""
        names = dict.fromkeys(name for i in rows for name in self.columns[i])
        return {name: [self.columns[i].get(name) for i in rows] for name in names}


def is_conversational(prompt: Any) -> bool:
    """Whether a prompt as given is a message list (validated by `as_messages`), not a string."""
    return isinstance(prompt, list)


def load_prompt_rows(data: list[str], columns: str | None) -> PromptRows:
    """The `prompt` (string or messages) or `messages` column of every record (a `messages`
    conversation loses its final assistant turns), with the other columns beside it."""
    from rlkit.data.load import load_records

    records = load_records(data, columns)
    where = ", ".join(data)
    if len(records) == 0:
        raise InputError(f"{where}: no prompts")
    names = records.column_names
    key = "prompt" if "prompt" in names else "messages" if "messages" in names else None
    if key is None:
        raise InputError(
            f"{where}: no `prompt` or `messages` column (found {', '.join(names)}); use --columns prompt=NAME"
        )
    conversations, others, replies = [], [], []
    for i, record in enumerate(records):
        messages = as_messages(record[key], "user", f"{where} row {i + 1}")
        reply: Messages = []
        while key == "messages" and messages and messages[-1]["role"] == "assistant":
            reply.insert(0, messages[-1])
            messages = messages[:-1]
        if not messages:
            raise InputError(f"{where} row {i + 1}: empty prompt")
        conversations.append(messages)
        others.append({k: v for k, v in record.items() if k != key})
        replies.append(reply)
    return PromptRows(conversations, others, key == "messages" or is_conversational(records[0][key]), replies)


def encode_prompt(tokenizer: Any, template: ChatTemplate, messages: Messages) -> list[int]:
    return _encode_rendered(tokenizer, prompt_text(tokenizer, template, messages))


def _encode_rendered(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos_id = tokenizer.bos_token_id if wants_bos(tokenizer) else None
    ids, _ = finish_ids(ids, [IGNORE] * len(ids), bos_id)
    return ids


def prompts_that_fit(
    tokenizer: Any, template: ChatTemplate, conversations: Sequence[Messages], room: int
) -> tuple[list[int], list[list[int]]]:
    """The indices and token ids of the prompts of at most `room` tokens, warning once about the rest.

    A prompt whose text is longer than `char_budget(room)` holds more than `room` tokens, so it
    is dropped untokenised: one 50 MB prompt costs nothing, not gigabytes of ids."""
    budget = char_budget(tokenizer, room)
    kept: list[int] = []
    encoded: list[list[int]] = []
    for index, messages in enumerate(conversations):
        text = prompt_text(tokenizer, template, messages)
        if len(text) > budget:
            continue
        ids = _encode_rendered(tokenizer, text)  # rendered once, for the length check and the ids
        if len(ids) <= room:
            kept.append(index)
            encoded.append(ids)
    if len(kept) < len(conversations):
        warn(
            f"{len(conversations) - len(kept)} of {len(conversations)} prompts are longer than "
            f"--max-length - --max-new-tokens ({room} tokens) and were dropped"
        )
    return kept, encoded


def rollout_prompts(config: Any, tokenizer: Any) -> tuple[ChatTemplate, PromptRows, list[list[int]], Any]:
    """What every recipe that samples from its policy starts from: the policy's chat template
    (--template), the prompt records of --data (--columns) that leave --max-new-tokens of room in
    --max-length, their token ids, and the episodes' tools and environment (`rlkit.agents.setup.Agents`,
    None without --tools/--env; loaded and checked from the tokenizer alone, before any weights).
    With tools the prompts are encoded with the schemas shown in them (the system turn grows by
    every schema), and the room is measured on that."""
    from rlkit.data.templates import resolve_template

    template = resolve_template(config.template, tokenizer, config.model or "the policy")
    prompts = load_prompt_rows(config.data, config.columns)
    room = config.max_length - config.max_new_tokens
    kept, encoded = prompts_that_fit(tokenizer, template, prompts.conversations, room)
    prompts = prompts.select(kept)
    agents = None
    tools, env = getattr(config, "tools", []), getattr(config, "env", None)
    if tools or env:
        from rlkit.agents.setup import load_agents

        agents = load_agents(tools, env, tokenizer, template, config.max_turns, config.tool_timeout or None)
        kept, encoded = agents.encode_prompts(tokenizer, prompts, room)
        prompts = prompts.select(kept)
        info(f"episodes: {agents.describe()}")
    return template, prompts, encoded, agents
