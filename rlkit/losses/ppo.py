"""PPO for RLHF: KL-shaped rewards, clipped losses and KL controllers (GAE and whitening: `rlkit.losses.advantages`).

Conventions: tensors are [B, T] over *response* tokens, and ``mask`` [B, T] is
1 for real response tokens up to and including EOS and 0 after it (right
padding, i.e. each row's mask is a prefix of ones). Masked positions may hold
garbage (even inf/nan): every function selects with ``torch.where`` rather than
multiplying by the mask, so they never leak into results or gradients.

References: Schulman et al. 2017 (PPO); Schulman et al. 2016 (GAE);
Ziegler et al. 2019 (KL-penalised rewards, adaptive KL);
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from rlkit.losses.advantages import gae, masked_mean, masked_var, masked_whiten

# `gae` and `masked_var` are imported here too so that `from rlkit.losses.ppo import gae` keeps working
__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "clipped_policy_loss",
    "clipped_value_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_penalty",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "standardise_scores",
]


def standardise_scores(scores: Tensor, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Sequence scores [B] to zero mean and unit (unbiased) variance over the rollout.

    Why: reward models have arbitrary offsets and scales, and the KL penalty is added to the
    score, so an unnormalised score decides how much the KL counts (Huang et al. 2024, reward
    normalisation). ``reduce`` as in ``masked_whiten``: the rollout of every process.
    """
    return masked_whiten(scores, torch.ones_like(scores), reduce=reduce)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: Literal["k1", "k3"] = "k1") -> Tensor:
    """Per-token estimate of KL(π‖π_ref) from tokens sampled from π, [B, T].

    Why: the RLHF reward is penalised by this KL to keep the policy near the
    reference (Ziegler et al. 2019, Eq. 2). With log r = ref - logp (J. Schulman,
    "Approximating KL Divergence", 2020): k1 = -log r is unbiased but can be
    negative per token; k3 = (r - 1) - log r is unbiased and always >= 0.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_r = ref_logprobs - logprobs
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> tuple[Tensor, Tensor]:
    """Dense RLHF rewards: -β·KL on every response token, plus the RM score on the last one.

    Why: the RM scores the whole sequence, so its score is credited at the
    final real token (EOS), while the KL penalty is per token
    (Ziegler et al. 2019, Eq. 2; Huang et al. 2024). The last real token is
    the highest index with mask 1 (= mask.sum(1) - 1 for right padding); a
    row with no response tokens gets no score (and no crash).
    Returns (rewards [B, T], non_score_reward [B] = summed KL penalty, for logging).
    """
    m = mask.bool()
    non_score = torch.where(m, -kl_coef * kl, 0)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(m)
    last = torch.where(m, positions, -1).max(dim=1).values
    at_last = (positions == last.unsqueeze(1)) & m
    rewards = non_score + torch.where(at_last, scores.to(non_score.dtype).unsqueeze(1), 0)
    return rewards, non_score.sum(dim=1)


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate, masked token mean of max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)) (Schulman et al. 2017, Eq. 7).

    Why: clipping the ratio ρ = π/π_old removes the incentive to move the
    policy far from the one that collected the rollout in a single update.
    ``old_logprobs`` and ``advantages`` are treated as constants (detached).
    Returns (loss, clipfrac = share of tokens where the clipped term is
    active, approx_kl = masked mean of ½(log ρ)², the "k2" estimator of
    KL(π_old‖π) used by TRL/Huang et al. 2024), all scalars; the last two detached.
    """
    m = mask.bool()
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), 0)
    ratio, adv = torch.exp(log_ratio), advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask).detach()
    approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask)
    return loss, clipfrac, approx_kl


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, Tensor]:
    """½·masked mean of max((V - R)², (clip(V, V_old ± c) - R)²) (Huang et al. 2024; PPO2 baselines).

    Why: the value head gets the same trust-region treatment as the policy so
    one noisy batch of returns cannot move it far from the rollout-time values.
    ``old_values`` and ``returns`` are constants. Returns (loss, clipfrac).
    """
    m = mask.bool()
    v = torch.where(m, values, 0)
    old, ret = torch.where(m, old_values.detach(), 0), torch.where(m, returns.detach(), 0)
    v_clipped = old + torch.clamp(v - old, -cliprange_value, cliprange_value)
    unclipped, clipped = (v - ret) ** 2, (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask).detach()
    return loss, clipfrac


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position, [..., V] -> [...].

    Why: a logged health signal -- collapsing entropy is an early sign of
    reward hacking or a too-large learning rate. Tokens with -inf logits
    contribute 0 (not nan).
    """
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, 0)).sum(dim=-1)


def explained_variance(
    values: Tensor, returns: Tensor, mask: Tensor, reduce: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """1 - Var(R - V) / Var(R) over masked tokens; nan if the returns are constant.

    Why: a diagnostic for the value head -- 1 is perfect, 0 is no better than
    predicting the mean return, negative is worse than that. ``reduce`` as in
    ``masked_var``: the variances of every process's tokens.
    """
    var_returns = masked_var(returns.detach(), mask, unbiased=False, reduce=reduce)
    var_resid = masked_var((returns - values).detach(), mask, unbiased=False, reduce=reduce)
    if var_returns == 0:
        return torch.full_like(var_returns, float("nan"))
    return 1 - var_resid / var_returns


class FixedKLController:
    """Constant KL coefficient β (Ziegler et al. 2019, Sec. 2.2, fixed variant).

    Both controllers have a `state_dict`: a run registers its controller with the accelerator, so
    every checkpoint holds β and `--resume` continues from it."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """No-op; same interface as ``AdaptiveKLController.update``."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adapt β so the observed KL tracks a target (Ziegler et al. 2019, Sec. 2.2).

    Why: a fixed β is hard to tune -- the same value lets one run drift and
    freezes another. A proportional controller, clipped to ±20% error, raises
    β when KL is above target and lowers it when below:
    β ← β·(1 + clip(KL/target - 1, -0.2, 0.2)·n_steps/horizon).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be > 0")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """``current_kl``: mean per-sequence KL of the last batch; ``n_steps``: samples it covered."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
