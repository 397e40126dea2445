"""Scoring (prompt, completion) with a reward model dir or a `module:function`.

A reward model scores exactly what it was trained on: the prompt rendered with its chat
template and the completion after it, tokenised by the same code as its training pairs
(`rlkit.data.pairs.tokenize_pairs`), the score read at each sequence's last non-pad token by
train-rm's own `RewardScorer`. A function gets plain strings: the content of a one-message
prompt (what a verifiable checker like `rlkit.demo.task:reward` wants), else the prompt
rendered with the policy's template (contents joined by blank lines when there is no policy,
as with --completions). This is the rule PPO's rewards use (`rlkit.scoring.prompt_string`,
with the same `FunctionReward`), so a function scores a completion the same way during
training and in eval.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlkit.console import info
from rlkit.data.formats import Messages
from rlkit.data.pairs import tokenize_pairs
from rlkit.data.templates import ChatTemplate, resolve_template
from rlkit.errors import InputError
from rlkit.models.inference import inference_device, is_reward_model, load_sequence_classifier
from rlkit.models.load import load_tokenizer, resolve_source
from rlkit.scoring import FunctionReward, prompt_string


class RewardModelScorer:
    """A sequence-classification reward model (full dir or SEQ_CLS adapter)."""

    def __init__(self, name: str, template: str | None, max_length: int, batch_size: int, dtype: torch.dtype):
        from rlkit.recipes.reward_model import RewardScorer

        source = resolve_source(name)
        if not is_reward_model(source):
            raise InputError(
                f"{name}: not a reward model (no *ForSequenceClassification architecture); pass a `rlkit train-rm` output dir or module:function"
            )
        self.name = name
        self.tokenizer = load_tokenizer(source)
        self.template = resolve_template(
            None if getattr(self.tokenizer, "chat_template", None) else template, self.tokenizer, name
        )
        model = (
            load_sequence_classifier(source, self.tokenizer.pad_token_id, dtype)
            .to(inference_device())
            .eval()
            .requires_grad_(False)
        )
        self.scorer = RewardScorer(model, self.tokenizer.pad_token_id)
        self.max_length, self.batch_size = max_length, batch_size

    @torch.no_grad()
    def score_sequences(self, sequences: list[list[int]]) -> list[float]:
        """Score of each token sequence, one per row of a right-padded batch."""
        scores: list[float] = []
        device = inference_device()
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            seq_index = torch.full((len(chunk), width), -1, dtype=torch.long)
            positions = torch.arange(width).repeat(len(chunk), 1)
            for i, seq in enumerate(chunk):
                ids[i, : len(seq)] = torch.as_tensor(seq)
                seq_index[i, : len(seq)] = i
            out = self.scorer(ids.to(device), positions.to(device), seq_index.to(device), len(chunk))
            scores += out.float().cpu().tolist()
        return scores

    def __call__(self, prompts: list[Messages], completions: list[str]) -> list[float]:
        records = [{"prompt": p, "chosen": c, "rejected": c} for p, c in zip(prompts, completions)]
        rows, stats = tokenize_pairs(records, self.tokenizer, self.template, self.max_length, source="completions")
        if stats.dropped:
            raise InputError(
                f"{stats.dropped} prompt(s) alone fill --max-length {self.max_length} tokens of {self.name} (record {stats.dropped_records[0]}); raise --max-length"
            )
        return self.score_sequences([list(r["prompt_input_ids"]) + list(r["chosen_input_ids"]) for r in rows])


def load_reward(
    spec: str,
    template: str | None,
    max_length: int,
    batch_size: int,
    dtype: torch.dtype,
    policy: tuple[Any, ChatTemplate] | None = None,
) -> Callable[[list[Messages], list[str]], list[float]]:
    """`--reward` as a scorer; `policy` (tokenizer, template) renders multi-message prompts for a function."""
    if Path(spec).exists() or spec.endswith(".gguf"):
        scorer: Any = RewardModelScorer(spec, template, max_length, batch_size, dtype)
    elif policy is not None:
        scorer = FunctionReward(spec, lambda messages: prompt_string(messages, *policy))
    else:
        scorer = FunctionReward(spec)
    info(f"reward: {spec}")
    return scorer
