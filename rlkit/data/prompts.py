"""Prompt token ids for generation, built exactly as training built them.

Training tokenizes the prompt segment on its own (see templates.render_segments), so
generation must too, with the same single-BOS rule, or the model sees a prompt boundary it
never saw in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlkit.console import warn
from rlkit.data.formats import Messages
from rlkit.data.templates import ChatTemplate, prompt_text
from rlkit.data.tokenize import IGNORE, char_budget, finish_ids, wants_bos


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
