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
Zheng et al. 2025 (GSPO: sequence-level ratios); J. Schulman 2020 (the k3 KL estimator);
MiniMax 2025 (MiniMax-M1, arXiv 2506.13585: CISPO) and Khatri et al. 2025 (ScaleRL, arXiv
2510.13786: its ε_max); Gao et al. 2025 (SAPO, arXiv 2511.20347); LUSPO (arXiv 2602.05261: GSPO's
sequence term weighted by the completion's length).

Each ``--loss-type`` is one `PolicyLoss` record in `POLICY_LOSSES`, as TRL's ``loss_type`` names a
per-token objective and its aggregation together: the record holds the *surrogate* (a function
of the importance ratio and the advantages giving ℓ_{i,t}), the `Aggregation` (what the loss is a
mean over), the config fields its hyperparameters come from, and a one-line help. ``--help``
choices, the option checks and the docs table are read from the records, so a new loss is one
function and one record here. torch is bound lazily (`rlkit.losses._lazy`): reading the records,
as ``rlkit grpo --help`` does, does not execute it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from rlkit.losses._lazy import lazy_import

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")

LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "luspo"]
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


def _rows(mask: Tensor, max_new_tokens: int) -> Tensor:
    return torch.tensor(float(mask.shape[0]), dtype=torch.float32, device=mask.device)


def _tokens(mask: Tensor, max_new_tokens: int) -> Tensor:
    return mask.bool().sum().to(torch.float32)


def _rows_times_max(mask: Tensor, max_new_tokens: int) -> Tensor:
    return _rows(mask, max_new_tokens) * max_new_tokens


def _sequence_means(tokens: Tensor, mask: Tensor) -> Tensor:
    """Σ_i 1/|y_i| Σ_t ℓ_{i,t} (an empty row contributes 0)."""
    return (tokens.sum(1) / mask.sum(1).clamp(min=1).to(tokens.dtype)).sum()


def _token_sum(tokens: Tensor, mask: Tensor) -> Tensor:
    """Σ_i Σ_t ℓ_{i,t}."""
    return tokens.sum()


@dataclass(frozen=True)
class Aggregation:
    """What a policy loss is a mean over: ``total`` of the masked per-token loss over ``units``.

    ``units`` is known from the mask alone, so the engine can count a micro-batch's units before
    its forward; both are summed over micro-batches and processes and divided once.
    """

    name: str
    units: Callable[[Tensor, int], Tensor]
    total: Callable[[Tensor, Tensor], Tensor]


#: 1/|B| · Σ_i 1/|y_i| · Σ_t ℓ_{i,t}: each sequence counts once (GRPO, SAPO).
SEQUENCE_MEAN = Aggregation("mean per sequence, then over sequences", _rows, _sequence_means)
#: 1/Σ_i|y_i| · Σ_i Σ_t ℓ_{i,t}: each token counts once (BNPO, DAPO, CISPO).
TOKEN_MEAN = Aggregation("mean over every token of the batch", _tokens, _token_sum)
#: 1/(|B|·L_max) · Σ_i Σ_t ℓ_{i,t}: a constant normaliser (Dr. GRPO).
CONSTANT = Aggregation("sum / (sequences x --max-new-tokens)", _rows_times_max, _token_sum)
#: 1/|B| · Σ_i Σ_t ℓ_{i,t}: each sequence's term weighted by its length (LUSPO).
SEQUENCE_SUM = Aggregation("sum per sequence, mean over sequences", _rows, _token_sum)


def loss_units(mask: Tensor, loss_type: str, max_new_tokens: int) -> Tensor:
    """What ``loss_type``'s aggregation is a mean over (see `aggregate`): sequences, tokens, or sequences x L_max."""
    return policy_loss_record(loss_type).aggregation.units(mask, max_new_tokens)


def aggregate(per_token: Tensor, mask: Tensor, loss_type: str, max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """(sum, units) of a per-token loss under each aggregation; the loss is sum / units.

        grpo, sapo:         1/|B| · Σ_i 1/|y_i| · Σ_t ℓ_{i,t}   (Shao et al. 2024: each sequence counts once)
        bnpo, dapo, cispo:  1/Σ_i|y_i| · Σ_i Σ_t ℓ_{i,t}       (Yu et al. 2025, Eq. 12: each token counts once)
        dr_grpo:            1/(|B|·L_max) · Σ_i Σ_t ℓ_{i,t}     (Liu et al. 2025: a constant, L_max = max_new_tokens)
        luspo:              1/|B| · Σ_i Σ_t ℓ_{i,t}             (LUSPO, arXiv 2602.05261: see below)

    Why: GRPO's per-sequence mean gives a token of a short completion more weight than one of a
    long completion, so long wrong answers are penalised less per token (the length bias Dr. GRPO
    names, and DAPO's motivation for a token-level mean). Dr. GRPO's constant normaliser is
    unbiased for every length. With units summed over micro-batches and processes, bnpo and dapo
    are the same here: the mean over every token of the global batch. A row with no unmasked
    token still counts as a sequence for grpo and dr_grpo (it contributes 0), so masking a
    completion out never re-weights the others.

    LUSPO: with GSPO's sequence ratio every token of completion i has the same ℓ_i, so its sum is
    1/|B| Σ_i |y_i| · ℓ_i, GSPO's objective with each sequence weighted by its length (TRL's
    ``(per_token_loss * mask.sum(1)).mean()``). GSPO's per-sequence mean gives a long completion's
    tokens less weight each, a bias against long answers; the length weight undoes it.
    """
    m = mask.bool()
    how = policy_loss_record(loss_type).aggregation
    units = how.units(mask, max_new_tokens).to(per_token.dtype)
    return how.total(torch.where(m, per_token, 0), m), units


# ---- surrogates: the per-token term of each policy loss ------------------------------------


@dataclass(frozen=True)
class Surrogate:
    """A policy loss's per-token term ℓ_{i,t} ([B, T], or [B, 1] with sequence-level ratios) and
    where its clip held the ratio (bool, same shape; for the clip metrics)."""

    per_token: Tensor
    clipped_low: Tensor
    clipped_high: Tensor


def clipped_surrogate(
    ratio: Tensor, advantages: Tensor, logprobs: Tensor, *, epsilon: float, epsilon_high: float | None
) -> Surrogate:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7; GRPO, Shao et al. 2024, Eq. 3):

        ℓ_{i,t} = -min(ρ_{i,t} Â_{i,t}, clip(ρ_{i,t}, 1 - ε_low, 1 + ε_high) Â_{i,t})

    ε_low = ``epsilon``, ε_high = ``epsilon_high`` (default ε; DAPO's clip-higher raises it).
    The clip holds a term where ρ < 1-ε_low with Â < 0, or ρ > 1+ε_high with Â > 0.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_high)
    return Surrogate(
        -torch.minimum(ratio * advantages, clipped * advantages),
        (ratio < 1.0 - epsilon) & (advantages < 0),
        (ratio > 1.0 + eps_high) & (advantages > 0),
    )


def cispo_surrogate(ratio: Tensor, advantages: Tensor, logprobs: Tensor, *, epsilon_max: float | None) -> Surrogate:
    """CISPO (MiniMax 2025, arXiv 2506.13585; in ScaleRL's form, Khatri et al. 2025, arXiv 2510.13786):

        ℓ_{i,t} = -sg(min(ρ_{i,t}, ε_max)) · Â_{i,t} · log π_θ(y_{i,t} | x, y_{i,<t})

    sg: stop-gradient. Why: PPO's clip drops the gradient of a clipped token altogether, and the
    rare tokens that matter for reflective reasoning ("However", "Recheck") are the ones with
    large ratios; CISPO clips the importance *weight* instead and keeps every token's
    REINFORCE gradient, ∇ℓ = -min(ρ, ε_max) · Â · ∇log π. ε_max bounds ρ itself (not 1 + ε),
    as TRL reads it from ``epsilon_high`` (ScaleRL and TRL recommend 5.0).
    """
    if epsilon_max is None:
        raise ValueError("cispo needs epsilon_max (the bound on the importance weight, e.g. 5.0)")
    weight = torch.clamp(ratio, max=epsilon_max).detach()
    return Surrogate(
        -weight * advantages * logprobs,
        torch.zeros_like(ratio * advantages, dtype=torch.bool),
        (ratio > epsilon_max) & (advantages > 0),
    )


def sapo_surrogate(
    ratio: Tensor, advantages: Tensor, logprobs: Tensor, *, temperature_pos: float, temperature_neg: float
) -> Surrogate:
    """SAPO's soft gate (Gao et al. 2025, "Soft Adaptive Policy Optimization", arXiv 2511.20347):

        ℓ_{i,t} = -f(ρ_{i,t}) · Â_{i,t},   f(ρ) = (4/τ) · σ(τ (ρ - 1)),
        τ = τ_pos if Â_{i,t} > 0 else τ_neg

    Why: a hard clip is a cliff -- the gradient of a token is whole inside the trust region and
    0 one step outside; SAPO's sigmoid gate has gradient ∂f/∂ρ = 4σ(x)(1-σ(x)) (x = τ(ρ-1)),
    exactly 1 at ρ = 1 (the on-policy gradient, as the clipped objective's) and fading smoothly
    as ρ leaves 1. τ_neg > τ_pos fades negative-advantage tokens faster, which the paper finds
    more stable (a negative update spreads mass over the whole vocabulary). No hard clip, so
    nothing counts as clipped.
    """
    temperature = torch.where(advantages > 0, temperature_pos, temperature_neg)
    gate = torch.sigmoid(temperature * (ratio - 1.0)) * 4.0 / temperature
    flat = torch.zeros_like(ratio * advantages, dtype=torch.bool)
    return Surrogate(-gate * advantages, flat, flat)


# ---- the records -------------------------------------------------------------------------------

#: The surrogate's positional inputs, which `grpo_loss` provides.
SURROGATE_INPUTS = ("ratio", "advantages", "logprobs")


def _clip_bounds() -> dict[str, str]:
    return {"epsilon": "epsilon", "epsilon_high": "epsilon_high"}


@dataclass(frozen=True)
class PolicyLoss:
    """What `rlkit grpo` knows about one ``--loss-type``: its surrogate, its aggregation, its options.

    ``hyperparameters`` maps each keyword-only parameter of ``surrogate`` to the config field (the
    option) it is read from; ``check`` refuses values of those (by keyword) the loss cannot use.
    """

    name: str
    surrogate: Callable[..., Surrogate]
    aggregation: Aggregation
    help: str
    hyperparameters: Mapping[str, str] = field(default_factory=_clip_bounds)
    check: Callable[[Mapping[str, Any]], str | None] | None = None

    def __post_init__(self) -> None:
        """A record cannot drift from its function: inputs from SURROGATE_INPUTS, keywords = the hyperparameters."""
        params = inspect.signature(self.surrogate).parameters.values()
        inputs = tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)
        keywords = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
        if inputs != SURROGATE_INPUTS or keywords != set(self.hyperparameters):
            raise TypeError(
                f"loss type {self.name!r}: {self.surrogate.__name__} takes {inputs} (expected {SURROGATE_INPUTS}) "
                f"and keywords {sorted(keywords)} (its hyperparameters: {sorted(self.hyperparameters)})"
            )

    @property
    def options(self) -> tuple[str, ...]:
        """The config fields its hyperparameters come from, e.g. ('sapo_temperature_pos', ...)."""
        return tuple(self.hyperparameters.values())

    def keywords(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The surrogate's keyword arguments from option values (config field -> value)."""
        missing = [name for name in self.options if name not in values]
        if missing:
            raise TypeError(f"loss type {self.name!r} needs {', '.join(missing)}")
        return {keyword: values[name] for keyword, name in self.hyperparameters.items()}

    def problem(self, values: Mapping[str, Any]) -> str | None:
        """Why these option values cannot be used with this loss, or None."""
        return self.check(self.keywords(values)) if self.check else None


def _cispo_needs_epsilon_max(values: Mapping[str, Any]) -> str | None:
    if values["epsilon_max"] is not None:
        return None
    return (
        "--loss-type cispo bounds the importance weight at --epsilon-high (ε_max, not 1 + ε): give it, "
        "e.g. --epsilon-high 5.0 (ScaleRL's and TRL's recommendation)"
    )


#: One record per ``--loss-type`` value, in the order ``--help`` and the docs list them.
POLICY_LOSSES: dict[str, PolicyLoss] = {
    record.name: record
    for record in (
        PolicyLoss("grpo", clipped_surrogate, SEQUENCE_MEAN, "clipped ratio; mean per sequence, then over sequences"),
        PolicyLoss("bnpo", clipped_surrogate, TOKEN_MEAN, "clipped ratio; mean over every token of the batch"),
        PolicyLoss("dapo", clipped_surrogate, TOKEN_MEAN, "clipped ratio; mean over every token of the batch"),
        PolicyLoss("dr_grpo", clipped_surrogate, CONSTANT, "clipped ratio; sum / (sequences x --max-new-tokens)"),
        PolicyLoss(
            "cispo",
            cispo_surrogate,
            TOKEN_MEAN,
            "CISPO: -sg(min(ratio, --epsilon-high)) x advantage x log-prob, every token keeps its gradient; token mean",
            {"epsilon_max": "epsilon_high"},
            check=_cispo_needs_epsilon_max,
        ),
        PolicyLoss(
            "sapo",
            sapo_surrogate,
            SEQUENCE_MEAN,
            "SAPO: a soft sigmoid gate (--sapo-temperature-pos/-neg) instead of the clip; mean per sequence",
            {"temperature_pos": "sapo_temperature_pos", "temperature_neg": "sapo_temperature_neg"},
        ),
        PolicyLoss(
            "luspo",
            clipped_surrogate,
            SEQUENCE_SUM,
            "LUSPO: clipped ratio, each sequence weighted by its length (use --importance-sampling sequence)",
        ),
    )
}

#: The ``--loss-type`` values.
LOSS_TYPES: tuple[str, ...] = tuple(POLICY_LOSSES)


def policy_loss_record(loss_type: str) -> PolicyLoss:
    """The record of ``loss_type``, or ValueError naming the choices."""
    record = POLICY_LOSSES.get(loss_type)
    if record is None:
        raise ValueError(f"unknown loss type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    return record


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
    **options: Any,
) -> GRPOLoss:
    """``loss_type``'s surrogate with an optional KL penalty (Shao et al. 2024, Eq. 3), aggregated:

        ℓ_{i,t} = surrogate(ρ_{i,t}, Â_{i,t}) + β · D_{i,t}
        D_{i,t} = π_ref/π_θ - log(π_ref/π_θ) - 1     (k3: unbiased, never negative)

    the surrogate being the record's (`POLICY_LOSSES`): for grpo, bnpo, dapo, dr_grpo and luspo
    the clipped one, -min(ρ Â, clip(ρ, 1 - ε_low, 1 + ε_high) Â) (`clipped_surrogate`); then
    aggregated by ``loss_type`` (see `aggregate`). ρ is per token, or GSPO's per-sequence s_i
    broadcast over the sequence's tokens (``importance_sampling="sequence"``; with
    ``loss_type="grpo"`` this is GSPO's objective exactly, Eq. 5). ε_high defaults to ε; DAPO's
    clip-higher (Yu et al. 2025, Eq. 10) raises it (0.28) so that unlikely tokens with a positive
    advantage can grow, against entropy collapse. ``options`` are the other records' option
    values by config field (e.g. ``sapo_temperature_pos=1.0``).

    Why clip at all: with ``--num-iterations`` > 1 each rollout is reused, and the clip stops one
    rollout from moving the policy far from the one that sampled it. On the first update π_θ =
    π_old, ρ = 1 exactly and nothing is clipped.

    Metrics, as (sum, count) pairs over the tokens that count (per sequence with sequence-level
    ratios): ``clip_low`` (ρ < 1-ε_low where Â < 0: the clip is what holds the term), ``clip_high``
    (ρ > 1+ε_high where Â > 0; cispo: ρ > ε_max), ``clip_region`` (either), ``ratio`` (mean ρ) and,
    with β > 0 or ``ref_logprobs`` given, ``kl`` (mean k3).
    """
    from rlkit.losses.ppo import kl_penalty

    record = policy_loss_record(loss_type)
    m = mask.bool()
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    ratio = torch.exp(importance_log_ratio(logprobs, old_logprobs, mask, importance_sampling))
    values = {"epsilon": epsilon, "epsilon_high": epsilon_high, **options}
    term = record.surrogate(ratio, adv, logprobs, **record.keywords(values))
    per_token = term.per_token.expand_as(logprobs)
    kl = None
    if ref_logprobs is not None:
        kl = torch.where(m, kl_penalty(logprobs, ref_logprobs.detach(), "k3"), 0)
        if beta:
            per_token = per_token + beta * kl
    loss, units = aggregate(per_token, mask, loss_type, max_new_tokens)

    with torch.no_grad():
        low, high = term.clipped_low, term.clipped_high
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
