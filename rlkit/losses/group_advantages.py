"""Critic-free advantages for RL from verifiable rewards: G completions per prompt, scored by programs.

Conventions: a rollout's completions are laid out group by group, ``rewards[g * G + i]`` being the
i-th of the G completions of prompt g, so ``rewards.view(-1, G)`` is [prompts, G]. A reward may be
NaN: the completion was unscorable (every reward function returned None for it); it takes no part
in any mean or std and gets advantage 0, so it neither moves the policy nor biases its siblings'
baseline. Token tensors follow `rlkit.losses.ppo`: [B, T] over response tokens, ``mask`` 1 up to
and including EOS, masked positions may hold garbage.

The group estimators work on the rewards of the *whole* rollout (every process's completions, in
rollout order): a prompt's G completions may live on different processes, and a group statistic
must see all of them. The recipe gathers, calls these, and keeps its own slice.

References: Shao et al. 2024 (DeepSeekMath, GRPO); Liu et al. 2025 ("Understanding R1-Zero-Like
Training", Dr. GRPO); Ahmadian et al. 2024 ("Back to Basics", RLOO); Hu 2025 (REINFORCE++);
Yu et al. 2025 (DAPO: overlong reward shaping, dynamic sampling); Liu et al. 2026 (GDPO, arXiv
2601.05242: each reward normalised within its group before the sum).

The estimators are `AdvantageEstimator` records in `GROUP_ESTIMATORS` (the ``--advantage`` values
of grpo; the record type is ppo's, `rlkit.losses.advantages`), each called with the rollout's
rewards as a `GroupRollout` and the scale, returning this process's advantages.

Several rewards become one by a `RewardAggregation` record in `REWARD_AGGREGATIONS` (the
``--multi-objective-aggregation`` values, TRL's ``multi_objective_aggregation``): ``--help``
choices and the docs table are read from the records, so a new aggregation is one function and
one record here. torch is bound lazily (`rlkit.losses._lazy`), so reading the records, as
``rlkit grpo --help`` does, does not execute it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

from rlkit.losses._lazy import lazy_import
from rlkit.losses.advantages import AdvantageEstimator

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")

Reduce = Callable[["Tensor"], "Tensor"]
Scale = Literal["group", "batch", "none"]

#: Added to a standard deviation before dividing by it (TRL's value): a group of nearly equal
#: rewards gets large but finite advantages rather than inf.
STD_EPS = 1e-4


def _grouped(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """(rewards [P, G] with NaN as 0, valid [P, G]) after checking the layout."""
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.reshape(-1, group_size)
    valid = ~torch.isnan(grouped)
    return torch.where(valid, grouped, 0), valid


def _stats(values: Tensor, valid: Tensor, dim: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, unbiased std) of the valid entries along ``dim`` (std 0 when count < 2)."""
    count = valid.sum(dim=dim, keepdim=dim is not None).to(values.dtype)
    mean = torch.where(valid, values, 0).sum(dim=dim, keepdim=dim is not None) / count.clamp(min=1)
    squares = torch.where(valid, (values - mean) ** 2, 0).sum(dim=dim, keepdim=dim is not None)
    std = torch.where(count > 1, (squares / (count - 1).clamp(min=1)).sqrt(), 0)
    return count, mean, std


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[N] bool: the completion's group has no spread in its (scorable) rewards.

    Why: a group whose G rewards are all equal (all right, or all wrong) has every advantage 0
    under any group baseline, so it carries no policy-gradient signal -- only noise from the KL
    term and a share of the normaliser. DAPO (Yu et al. 2025, Sec. 3.2, "dynamic sampling")
    filters such groups out; their fraction is the first thing to watch in a GRPO run (near 1:
    the task is too easy or too hard for the policy). A group with fewer than two scorable
    completions counts as zero-variance too.
    """
    values, valid = _grouped(rewards, group_size)
    count, mean, _ = _stats(values, valid, dim=1)
    spread = torch.where(valid, (values - mean).abs(), 0).amax(dim=1, keepdim=True)
    flat = (count < 2) | (spread <= 1e-6 * mean.abs().clamp(min=1.0))
    return flat.expand_as(values).reshape(-1)


def group_advantages(rewards: Tensor, group_size: int, scale: Scale = "group", eps: float = STD_EPS) -> Tensor:
    """GRPO's group-relative advantage of each completion, [N] (Shao et al. 2024, Eq. 3 / Sec. 4.1.2).

        Â_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + ε)          scale="group" (GRPO)
        Â_i = (r_i - mean(r_1..r_G)) / (std(all rewards of the batch) + ε)   scale="batch"
        Â_i =  r_i - mean(r_1..r_G)                                  scale="none" (Dr. GRPO)

    Why: the group mean replaces PPO's learned value function as the baseline, so no critic is
    trained. Liu et al. 2025 (Dr. GRPO, Sec. 3.1) show that dividing by the group std weights
    prompts by how little their rewards vary (very easy and very hard prompts count most), a
    difficulty bias; ``scale="none"`` removes it, ``"batch"`` keeps one global scale
    (Liu et al., "Tricks or Traps", 2025). Stds are unbiased (Bessel), as in TRL.
    Every token of completion i gets Â_i.
    """
    values, valid = _grouped(rewards, group_size)
    _, mean, std = _stats(values, valid, dim=1)
    advantages = values - mean
    if scale == "group":
        advantages = advantages / (std + eps)
    elif scale == "batch":
        advantages = advantages / (_stats(values, valid, dim=None)[2] + eps)
    elif scale != "none":
        raise ValueError(f"unknown reward scaling {scale!r}; expected group, batch or none")
    return torch.where(valid, advantages, 0).reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int, scale: Scale = "none", eps: float = STD_EPS) -> Tensor:
    """REINFORCE leave-one-out advantages, [N] (Ahmadian et al. 2024, Eq. 7; Kool et al. 2019).

        Â_i = r_i - 1/(G-1) · Σ_{j≠i} r_j      (= G/(G-1) · (r_i - mean(r_1..r_G)))

    Why: the baseline of a completion is the mean reward of its G-1 siblings, which does not
    depend on the completion itself, so the gradient estimate stays unbiased (GRPO's group mean
    includes r_i). Only scorable siblings count (G-1 becomes their number); a completion without
    a scorable sibling gets 0. ``scale="batch"`` standardises the advantages over the batch
    ((Â - mean Â) / (std Â + ε), TRL's ``normalize_advantages``); ``"group"`` divides by the
    group's reward std as GRPO does; ``"none"`` (the paper's) leaves them as they are.
    """
    values, valid = _grouped(rewards, group_size)
    count = valid.sum(dim=1, keepdim=True).to(values.dtype)
    others = count - 1
    baseline = (values.sum(dim=1, keepdim=True) - values) / others.clamp(min=1)
    ok = valid & (others > 0)
    advantages = torch.where(ok, values - baseline, 0)
    if scale == "group":
        advantages = advantages / (_stats(values, valid, dim=1)[2] + eps)
    elif scale == "batch":
        _, mean, std = _stats(advantages, ok, dim=None)
        advantages = (advantages - mean) / (std + eps)
    elif scale != "none":
        raise ValueError(f"unknown reward scaling {scale!r}; expected group, batch or none")
    return torch.where(ok, advantages, 0).reshape(-1)


def reinforce_pp_advantages(
    scores: Tensor,
    mask: Tensor,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    reduce: Reduce | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """REINFORCE++ per-token advantages, [B, T] (Hu 2025, Sec. 3, Eqs. 5-7).

        r_t = -β·KL_t  (+ the sequence score s at the last real token)
        G_t = Σ_{t'≥t} r_t'                    (returns, γ = 1)
        Â_t = (G_t - mean(G)) / (std(G) + ε)   (over every response token of the batch)

    Why: no critic and no group baseline -- the normalisation over the whole batch is the
    baseline, which keeps the estimate stable for any number of completions per prompt (Hu
    argues the per-prompt normalisation of GRPO overfits easy prompts). With ``kl`` (per-token,
    k1 in the paper) and ``kl_coef`` > 0 the KL is part of the reward, so a token is charged for
    the divergence of every token after it. ``reduce`` sums over processes, so the batch
    statistics are the whole rollout's. A row whose score is NaN (unscorable) gets 0.
    """
    from rlkit.losses.ppo import masked_whiten, per_token_rewards

    with torch.no_grad():
        valid = torch.isfinite(scores)
        m = mask.bool() & valid.unsqueeze(1)
        kl = torch.zeros_like(mask, dtype=torch.float32) if kl is None else kl
        rewards, _ = per_token_rewards(torch.where(valid, scores, 0), kl, m, kl_coef)
        returns = torch.where(m, rewards, 0).flip(1).cumsum(1).flip(1)
        return masked_whiten(returns, m, eps=eps, reduce=reduce)


@dataclass(frozen=True)
class GroupRollout:
    """What a critic-free estimator reads: the whole rollout's shaped rewards [N] (every process's,
    group by group), this process's rows of them (``mine``), the group size, this process's
    response mask [B, R], the per-token KL [B, R] where ``--kl-in-reward`` charges it per token
    (None otherwise) with its coefficient, and a sum over processes (None with one)."""

    rewards: Tensor
    mine: slice
    group_size: int
    mask: Tensor
    kl: Optional[Tensor]
    kl_coef: float
    reduce: Optional[Reduce]


def _group_estimate(rollout: GroupRollout, scale: Scale) -> Tensor:
    return group_advantages(rollout.rewards, rollout.group_size, scale)[rollout.mine]


def _rloo_estimate(rollout: GroupRollout, scale: Scale) -> Tensor:
    return rloo_advantages(rollout.rewards, rollout.group_size, scale)[rollout.mine]


def _reinforce_pp_estimate(rollout: GroupRollout, scale: Scale) -> Tensor:
    kl_coef = rollout.kl_coef if rollout.kl is not None else 0.0
    return reinforce_pp_advantages(rollout.rewards[rollout.mine], rollout.mask, rollout.kl, kl_coef, rollout.reduce)


#: GRPO's estimators (``rlkit grpo --advantage``), the default first.
GROUP_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "group": AdvantageEstimator(_group_estimate, help="GRPO: reward minus the group mean", auto_scale="group"),
    "rloo": AdvantageEstimator(_rloo_estimate, help="leave-one-out baseline", auto_scale="none"),
    "reinforce++": AdvantageEstimator(
        _reinforce_pp_estimate,
        help="batch-normalised returns",
        auto_scale="batch",
        scales=("batch",),
        scale_reason="normalises over the batch",
        per_token=True,
    ),
}


def combine_rewards(per_function: Tensor, weights: Tensor) -> Tensor:
    """Σ_k w_k · r_k for each completion, [N, K] -> [N]; NaN (None) terms are left out.

    Why: several checkers (correctness, format, length) make one scalar reward, as TRL's
    ``reward_weights`` do. A completion for which every function returned None is unscorable
    and stays NaN (the estimators then give it advantage 0) rather than silently scoring 0.
    """
    weighted = per_function * weights.to(per_function.dtype)
    present = ~torch.isnan(per_function)
    total = torch.where(present, weighted, 0).sum(dim=1)
    return torch.where(present.any(dim=1), total, torch.nan)


def sum_then_normalize(per_function: Tensor, weights: Tensor, group_size: int) -> Tensor:
    """r_i = Σ_k w_k · r_{k,i}: the weighted sum (`combine_rewards`), normalised afterwards by the
    advantage estimator as ``--scale-rewards`` says (TRL's ``sum_then_normalize``)."""
    return combine_rewards(per_function, weights)


def normalize_then_sum(per_function: Tensor, weights: Tensor, group_size: int, eps: float = STD_EPS) -> Tensor:
    """GDPO's decoupled normalisation (Liu et al. 2026, arXiv 2601.05242), [N, K] -> [N]:

        A_{k,i} = (r_{k,i} - mean(r_{k,1..G})) / (std(r_{k,1..G}) + ε)     each reward within its group
        r_i     = Σ_k w_k · A_{k,i}

    then (the record's ``scale="batch"``) the group estimator normalises the sum over the batch,
    Â_i = (r_i - mean_g) / (std_batch + ε), GDPO's batch-wise normalisation (its group means are already 0, so this
    is TRL's ``(r - mean_batch) / (std_batch + 1e-4)``).

    Why: summing first and normalising after collapses distinct reward combinations to one
    advantage -- with rewards 0/1 each, (1, 0) and (0, 1) sum alike, and a reward with a wide
    range drowns one with a narrow range -- so GDPO standardises each reward in its group first
    and every reward moves the policy on its own scale. NaN (None) terms are left out of their
    reward's statistics and of the sum; a reward with one scorable value in a group contributes 0
    there; a completion every reward said None to stays NaN (unscorable).
    """
    present = ~torch.isnan(per_function)
    columns = []
    for k in range(per_function.shape[1]):
        values, valid = _grouped(per_function[:, k], group_size)
        _, mean, std = _stats(values, valid, dim=1)
        columns.append(torch.where(valid, (values - mean) / (std + eps), torch.nan).reshape(-1))
    normalised = torch.stack(columns, dim=1) if columns else per_function
    weighted = torch.where(present, normalised * weights.to(per_function.dtype), 0).sum(dim=1)
    return torch.where(present.any(dim=1), weighted, torch.nan)


@dataclass(frozen=True)
class RewardAggregation:
    """One ``--multi-objective-aggregation``: how the K rewards of each completion become one.

    ``combine`` maps the whole rollout's rewards [N, K] (NaN: None), the weights [K] and the group
    size to [N]; ``scale`` is what ``--scale-rewards auto`` means with it for the group and rloo
    estimators (None: the estimator's own default).
    """

    name: str
    combine: Callable[[Tensor, Tensor, int], Tensor]
    help: str
    scale: Optional[Scale] = None


#: One record per ``--multi-objective-aggregation`` value, the default first.
REWARD_AGGREGATIONS: dict[str, RewardAggregation] = {
    record.name: record
    for record in (
        RewardAggregation(
            "sum_then_normalize",
            sum_then_normalize,
            "the weighted sum of the rewards, normalised by the advantage (--scale-rewards)",
        ),
        RewardAggregation(
            "normalize_then_sum",
            normalize_then_sum,
            "GDPO: each reward standardised within its group, then the weighted sum, normalised over the batch "
            "(--scale-rewards auto = batch)",
            scale="batch",
        ),
    )
}


def overlong_penalty(lengths: Tensor, max_new_tokens: int, cache: int) -> Tensor:
    """DAPO's soft overlong punishment, [N] in [-1, 0] (Yu et al. 2025, Eq. 13).

        R_length(y) = 0                              if |y| ≤ L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| ≤ L_max
                    = -1                             if |y| > L_max

    with L_max = ``max_new_tokens`` and L_cache = ``cache``. Why: cutting a completion at the
    limit and scoring it as a failure punishes sound reasoning that was merely long; a penalty
    that grows linearly over the last L_cache tokens tells the policy about the limit smoothly.
    It is added to the reward before the advantages.
    """
    if cache <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    start = max_new_tokens - cache
    over = (start - lengths.to(torch.float32)) / cache
    return torch.where(lengths <= start, 0.0, torch.clamp(over, min=-1.0))
