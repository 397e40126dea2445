"""The GRPO family's policy loss: a clipped importance ratio per token or per sequence, four ways to
average it, and an optional k3 KL penalty to the reference.

Conventions as in `rlkit.losses.ppo`: [B, T] over response tokens, ``mask`` 1 on the tokens that
count (the recipe removes truncated completions and zero-variance groups from it), masked
positions may hold garbage. Advantages are [B] (one per completion, as GRPO/RLOO give them) or
[B, T] (REINFORCE++).

The loss comes back as a *sum* and the number of *units* it is a mean over, not as a mean: the
engine adds both over every micro-batch and process of an optimizer step and divides once, so
each aggregation means the same thing whatever the micro-batch size, the accumulation or the
number of processes (two processes log what one process logs with the same global batch).

References: Schulman et al. 2017 (PPO clipping); Shao et al. 2024 (GRPO, Eq. 3); Yu et al. 2025
(DAPO: clip-higher, token-level loss); Liu et al. 2025 (Dr. GRPO: a constant normaliser);
Zheng et al. 2025 (GSPO: sequence-level ratios); J. Schulman 2020 (the k3 KL estimator).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from rlkit.losses.ppo import kl_penalty

LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dapo", "dr_grpo")
IMPORTANCE_LEVELS: tuple[str, ...] = ("token", "sequence")


@dataclass
class GRPOLoss:
    """``loss`` summed over ``units`` (see the module doc); each metric a (sum, count) pair."""

    loss: Tensor
    units: Tensor
    metrics: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


def importance_log_ratio(
    logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, level: Literal["token", "sequence"] = "token"
) -> Tensor:
    """log of the importance ratio, [B, T] (token) or [B, 1] (sequence).

        token:    log ρ_{i,t} = log π_θ(y_{i,t} | x, y_{i,<t}) - log π_old(y_{i,t} | x, y_{i,<t})
        sequence: log s_i     = 1/|y_i| · Σ_t log ρ_{i,t}     (GSPO, Zheng et al. 2025, Eq. 7)

    Why: GSPO argues that a per-token ratio is a one-sample importance weight whose noise
    accumulates over a long completion, and that the reward, given per sequence, should be
    corrected per sequence; the length normalisation keeps s_i on the same scale for short and
    long completions. ``old_logprobs`` are constants.
    """
    m = mask.bool()
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), 0)
    if level == "token":
        return log_ratio
    if level == "sequence":
        return (log_ratio.sum(1) / m.sum(1).clamp(min=1).to(log_ratio.dtype)).unsqueeze(1)
    raise ValueError(f"unknown importance sampling level {level!r}; expected token or sequence")


def loss_units(mask: Tensor, loss_type: LossType, max_new_tokens: int) -> Tensor:
    """What each aggregation is a mean over (see `aggregate`): sequences, tokens, or sequences x L_max.

    Known from the mask alone, so the engine can count a micro-batch's units before its forward.
    """
    rows = torch.tensor(float(mask.shape[0]), dtype=torch.float32, device=mask.device)
    if loss_type == "grpo":
        return rows
    if loss_type in ("bnpo", "dapo"):
        return mask.bool().sum().to(torch.float32)
    if loss_type == "dr_grpo":
        return rows * max_new_tokens
    raise ValueError(f"unknown loss type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def aggregate(per_token: Tensor, mask: Tensor, loss_type: LossType, max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """(sum, units) of a per-token loss under each aggregation; the loss is sum / units.

        grpo:        1/|B| · Σ_i 1/|y_i| · Σ_t ℓ_{i,t}   (Shao et al. 2024: each sequence counts once)
        bnpo, dapo:  1/Σ_i|y_i| · Σ_i Σ_t ℓ_{i,t}       (Yu et al. 2025, Eq. 12: each token counts once)
        dr_grpo:     1/(|B|·L_max) · Σ_i Σ_t ℓ_{i,t}     (Liu et al. 2025: a constant, L_max = max_new_tokens)

    Why: GRPO's per-sequence mean gives a token of a short completion more weight than one of a
    long completion, so long wrong answers are penalised less per token (the length bias Dr. GRPO
    names, and DAPO's motivation for a token-level mean). Dr. GRPO's constant normaliser is
    unbiased for every length. With units summed over micro-batches and processes, bnpo and dapo
    are the same here: the mean over every token of the global batch. A row with no unmasked
    token still counts as a sequence for grpo and dr_grpo (it contributes 0), so masking a
    completion out never re-weights the others.
    """
    m = mask.bool()
    units = loss_units(mask, loss_type, max_new_tokens).to(per_token.dtype)
    tokens = torch.where(m, per_token, 0)
    if loss_type == "grpo":
        return (tokens.sum(1) / m.sum(1).clamp(min=1).to(tokens.dtype)).sum(), units
    return tokens.sum(), units


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling: Literal["token", "sequence"] = "token",
    loss_type: LossType = "dapo",
    max_new_tokens: int = 1,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
) -> GRPOLoss:
    """The clipped surrogate with an optional KL penalty (Shao et al. 2024, Eq. 3):

        ℓ_{i,t} = -min(ρ_{i,t} Â_{i,t}, clip(ρ_{i,t}, 1 - ε_low, 1 + ε_high) Â_{i,t}) + β · D_{i,t}
        D_{i,t} = π_ref/π_θ - log(π_ref/π_θ) - 1     (k3: unbiased, never negative)

    then aggregated by ``loss_type`` (see `aggregate`). ρ is per token, or GSPO's per-sequence
    s_i broadcast over the sequence's tokens (``importance_sampling="sequence"``; with
    ``loss_type="grpo"`` this is GSPO's objective exactly, Eq. 5). ε_high defaults to ε; DAPO's
    clip-higher (Yu et al. 2025, Eq. 10) raises it (0.28) so that unlikely tokens with a positive
    advantage can grow, against entropy collapse.

    Why clip at all: with ``--num-iterations`` > 1 each rollout is reused, and the clip stops one
    rollout from moving the policy far from the one that sampled it. On the first update π_θ =
    π_old, ρ = 1 exactly and nothing is clipped.

    Metrics, as (sum, count) pairs over the tokens that count (per sequence with sequence-level
    ratios): ``clip_low`` (ρ < 1-ε_low where Â < 0: the clip is what holds the term), ``clip_high``
    (ρ > 1+ε_high where Â > 0), ``clip_region`` (either), ``ratio`` (mean ρ) and, with β > 0
    or ``ref_logprobs`` given, ``kl`` (mean k3).
    """
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    m = mask.bool()
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    log_w = importance_log_ratio(logprobs, old_logprobs, mask, importance_sampling)
    ratio = torch.exp(log_w)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv).expand_as(logprobs)
    kl = None
    if ref_logprobs is not None:
        kl = torch.where(m, kl_penalty(logprobs, ref_logprobs.detach(), "k3"), 0)
        if beta:
            per_token = per_token + beta * kl
    loss, units = aggregate(per_token, mask, loss_type, max_new_tokens)

    with torch.no_grad():
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        if low.shape[1] == 1:  # one ratio and advantage per sequence: count sequences with a token that counts
            counted = m.any(1, keepdim=True)
        else:
            counted = m
            low, high = low.expand_as(m), high.expand_as(m)
        r = ratio.detach().expand_as(counted)
        n = counted.sum().to(ratio.dtype)

        def share(flag: Tensor) -> tuple[Tensor, Tensor]:
            return (flag & counted).sum().to(ratio.dtype), n

        metrics = {
            "clip_low": share(low),
            "clip_high": share(high),
            "clip_region": share(low | high),
            "ratio": (torch.where(counted, r, 0).sum(), n),
        }
        if kl is not None:
            metrics["kl"] = (kl.detach().sum(), m.sum().to(kl.dtype))
    return GRPOLoss(loss=loss, units=units, metrics=metrics)


def loss_mask(
    mask: Tensor,
    truncated: Tensor,
    zero_variance: Tensor,
    mask_truncated: bool = False,
    skip_zero_variance: bool = False,
) -> Tensor:
    """The tokens the loss sees, [B, T]: ``mask`` less truncated completions and zero-variance groups when asked.

    Why: a completion cut at ``--max-new-tokens`` has no verdict of its own -- its reward judges
    an unfinished answer -- so DAPO (Yu et al. 2025, Sec. 3.4, "overlong filtering") leaves it out
    of the loss; and a group whose rewards are all equal has zero advantages, so counting its
    tokens only dilutes the others' gradient (DAPO's dynamic sampling, here as a filter: the
    group is counted and logged, not re-sampled). Under ``grpo`` and ``dr_grpo`` aggregation the
    masked rows still count in the denominator; under ``dapo`` only the tokens left count.
    """
    keep = torch.ones_like(truncated, dtype=torch.bool)
    if mask_truncated:
        keep = keep & ~truncated.bool()
    if skip_zero_variance:
        keep = keep & ~zero_variance.bool()
    return (mask.bool() & keep.unsqueeze(1)).to(mask.dtype)
