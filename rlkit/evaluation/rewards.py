"""Scoring (prompt, completion) for eval: PPO's rewards, as plain floats.

Eval scores with exactly what `ppo` trains against (`rlkit.scoring.load_reward`): a reward
model renders the prompt with its chat template and tokenises the completion after it by
train-rm's own code, and a function gets the same prompt strings (`prompt_string`), so a
completion scores the same during training and in eval. Without a policy (--completions),
a multi-message prompt reaches a function as its contents joined by blank lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlkit.console import info
from rlkit.data.formats import Messages
from rlkit.data.templates import ChatTemplate
from rlkit.models.inference import inference_device
from rlkit.scoring import load_reward as load_scorer

Scorer = Callable[[list[Messages], list[str]], list[float]]


def load_reward(
    spec: str,
    template: str | None,
    max_length: int,
    batch_size: int,
    dtype: torch.dtype,
    policy: tuple[Any, ChatTemplate] | None = None,
) -> Scorer:
    """`--reward` as a scorer; `policy` (tokenizer, template) renders multi-message prompts for a function."""
    tokenizer, policy_template = policy if policy is not None else (None, None)
    reward = load_scorer(
        spec,
        tokenizer,
        policy_template,
        dtype,
        inference_device(),
        batch_size,
        max_length=max_length,
        template=template,
    )
    info(f"reward: {spec}")

    def scores(conversations: list[Messages], completions: list[str]) -> list[float]:
        return [float(v) for v in reward(conversations, completions)]

    return scores
