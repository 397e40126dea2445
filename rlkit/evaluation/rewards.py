"""Scoring (prompt, completion) for eval: PPO's rewards, as plain floats.

Eval scores with exactly what `ppo` trains against (`rlkit.scoring.load_reward`): a reward
model renders the prompt with its chat template and tokenises the completion after it by
train-rm's own code, and a function is called as training calls it (TRL's keywords: `prompts=`,
`completions=`, `completion_ids=` and the data's other columns; messages for conversational
prompts, strings otherwise; `rlkit.scoring.FunctionReward`), so a completion scores the same
during training and in eval. Without a policy (--completions) there are no `completion_ids`: a
function that requires them is refused with one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlkit.console import info
from rlkit.data.templates import ChatTemplate
from rlkit.models.inference import inference_device
from rlkit.scoring import RewardBatch, score_batch
from rlkit.scoring import load_reward as load_scorer

Scorer = Callable[[RewardBatch], list[float]]


def load_eval_scorer(
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

    def scores(batch: RewardBatch) -> list[float]:
        return [float(v) for v in score_batch(reward, batch)]  # allow_none off: never None

    return scores
