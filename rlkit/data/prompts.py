"""Prompt token ids for generation, built exactly as training built them.

Training tokenizes the prompt segment on its own (see templates.render_segments), so
generation must too, with the same single-BOS rule, or the model sees a prompt boundary it
never saw in training.
"""

from __future__ import annotations

from typing import Any

from rlkit.data.formats import Messages
from rlkit.data.templates import ChatTemplate, prompt_text
from rlkit.data.tokenize import IGNORE, finish_ids, wants_bos


def encode_prompt(tokenizer: Any, template: ChatTemplate, messages: Messages) -> list[int]:
    ids = tokenizer(prompt_text(tokenizer, template, messages), add_special_tokens=False).input_ids
    bos_id = tokenizer.bos_token_id if wants_bos(tokenizer) else None
    ids, _ = finish_ids(ids, [IGNORE] * len(ids), bos_id)
    return ids
