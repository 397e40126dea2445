"""Reward-model loss: pairwise Bradley–Terry likelihood."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float | None = None,
    center_coef: float = 0.0,
) -> Tensor:
    """Per-pair negative log-likelihood of the Bradley–Terry preference model.

    Why: under Bradley–Terry, P(chosen > rejected) = σ(r_c - r_r), so the RM
    is fitted by maximising logσ(r_c - r_r) (Ouyang et al. 2022, Eq. 1).
    ``margin`` asks the RM to separate pairs by at least that much when the
    annotators were very sure (Touvron et al. 2023, Llama 2, Eq. 2).
    BT only identifies reward *differences*, so the absolute level can drift;
    ``center_coef`` adds ``coef * (r_c + r_r)^2`` to pin the rewards near zero
    (Eisenstein et al. 2023, "Helping or Herding"; the batch mean of this term
    equals TRL's ``center_rewards_coefficient * mean((r_c + r_r)^2)``).

    Inputs are shape [B] (squeeze a [B, 1] value head first). Returns the
    per-pair losses, shape [B], unreduced so the caller can mean (usual) or
    sum them, e.g. across gradient-accumulation steps.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen/rejected reward shapes differ: {tuple(chosen_rewards.shape)} vs {tuple(rejected_rewards.shape)}"
        )
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    losses = -F.logsigmoid(logits)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses
