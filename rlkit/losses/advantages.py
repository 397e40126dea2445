"""Advantage estimators: a rollout's per-token rewards (and values, where a critic is trained) to the
per-token advantages the policy loss weighs and the value targets the critic regresses on.

Conventions as in `rlkit.losses.ppo`: tensors are [B, T] over response tokens, ``mask`` is 1 up
to and including EOS and 0 after it, and masked positions may hold garbage (selected away with
``torch.where``). ``reduce`` (optional) sums a tensor over processes, so statistics are those of
the whole rollout, as one process would have them.

An estimator is chosen by name (`--advantage`) from a registry of `AdvantageEstimator` records,
the one record type of ppo's and grpo's estimators: PPO's are `ADVANTAGE_ESTIMATORS` here, each
taking ``(rewards, mask, values, reduce, **params)`` and returning ``(advantages, returns)``;
GRPO's critic-free ones are `rlkit.losses.group_advantages.GROUP_ESTIMATORS`. A record says what
the recipe needs to know: whether the estimator needs a value function (without one the recipe
runs no value forward and no value loss, and ``values``/``returns`` are None), which
hyperparameters it takes (read from the config fields of those names), its help (the
``--advantage`` help and the docs are read from the records), and for group estimators what
``--scale-rewards auto`` means with it. A new estimator is one function and one record. torch is
bound lazily (`rlkit.losses._lazy`), so the option modules read the records without running it.

References: Schulman et al. 2016 (GAE); Huang et al. 2024, "The N+ Implementation Details of
RLHF with PPO" (whitening).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from rlkit.losses._lazy import lazy_import

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_import("torch")

Reduce = Callable[["Tensor"], "Tensor"]


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over entries where ``mask`` is nonzero (0 when there are none).

    Why: padding and post-EOS tokens must not dilute per-token statistics.
    """
    m = mask.bool()
    total = torch.where(m, x, 0).sum(dim=dim)
    count = m.sum(dim=dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, reduce: Reduce | None = None) -> Tensor:
    """Variance of the masked entries of ``x``; ``unbiased`` applies Bessel's n/(n-1) when n > 1.

    ``reduce`` (optional) sums a tensor over processes (e.g. ``lambda t: accelerator.reduce(t, "sum")``):
    then the mean and variance are those of the masked entries of *every* process's ``x``, so a
    rollout split over N processes gets the statistics of the whole rollout, as one process would.
    """
    if reduce is None:
        mean = masked_mean(x, mask)
        var = masked_mean((x - mean) ** 2, mask)
        n = mask.bool().sum()
    else:
        m = mask.bool()
        sums = reduce(torch.stack([torch.where(m, x, 0).sum(), m.sum().to(x.dtype)]))
        total, n = sums[0], sums[1]
        mean = total / n.clamp(min=1)
        var = reduce(torch.where(m, (x - mean) ** 2, 0).sum()) / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce: Reduce | None = None,
) -> Tensor:
    """Normalise masked entries to unit (unbiased) variance, and zero mean if ``shift_mean``.

    Why: whitening advantages over the batch keeps the policy-gradient scale
    stable as reward magnitudes drift (Huang et al. 2024). ``shift_mean=False``
    is used for rewards, whose sign carries meaning. Masked entries are set to 0.
    ``reduce`` sums over processes (see ``masked_var``): the statistics are the
    whole rollout's, so N processes whiten exactly as one process with the same
    global rollout would, rather than each subtracting its own baseline.
    """
    if reduce is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        m = mask.bool()
        sums = reduce(torch.stack([torch.where(m, x, 0).sum(), m.sum().to(x.dtype)]))
        mean = sums[0] / sums[1].clamp(min=1)
        var = masked_var(x, mask, reduce=reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16), per row, backwards in time.

    Why: A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γV_{t+1} - V_t trades bias for
    variance via λ. Each row is its own episode ending at its last real token,
    so V beyond that token is 0 (no bootstrapping from padding) even when the
    row ends early. Returns (advantages, returns = A + V), both [B, T], 0 where
    mask is 0, and without gradient (they are PPO targets).
    """
    with torch.no_grad():
        m = mask.bool()
        r, v = torch.where(m, rewards, 0), torch.where(m, values, 0)
        last_adv = torch.zeros_like(v[:, 0])
        advantages = []
        for t in reversed(range(v.shape[1])):
            next_v = v[:, t + 1] if t + 1 < v.shape[1] else torch.zeros_like(last_adv)
            delta = r[:, t] + gamma * next_v - v[:, t]
            last_adv = torch.where(m[:, t], delta + gamma * lam * last_adv, 0)
            advantages.append(last_adv)
        adv = torch.stack(advantages[::-1], dim=1)
        return adv, torch.where(m, adv + v, 0)


def gae_advantages(
    rewards: Tensor, mask: Tensor, values: Tensor | None, reduce: Reduce | None = None, *, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """The `gae` estimator: GAE (Schulman et al. 2016, Eq. 16), then advantages whitened over the rollout.

    Why whiten: A ← (A - mean(A)) / std(A) over every response token of the rollout keeps the
    policy-gradient scale fixed as reward magnitudes drift (Huang et al. 2024). The returns
    (A + V, before whitening) are the value targets.
    """
    if values is None:
        raise ValueError("GAE needs the value function's values")
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    return masked_whiten(advantages, mask, reduce=reduce), returns


@dataclass(frozen=True)
class AdvantageEstimator:
    """One ``--advantage`` value, of ppo or grpo.

    ``fn``: the estimator, called the same way for every record of its registry (PPO:
    ``fn(rewards, mask, values, reduce, **params) -> (advantages, returns)``; GRPO:
    ``fn(rollout: GroupRollout, scale) -> advantages``). ``needs_values``: a critic is trained
    (False: ``values`` is None and ``returns`` may be None); ``params``: the hyperparameters ``fn``
    takes by keyword, read from the config fields of these names; ``help``: what ``--help`` and the
    docs say of it. Group estimators only: ``auto_scale``, what ``--scale-rewards auto`` means with
    it; ``scales``, the ``--scale-rewards`` values it accepts besides auto (``scale_reason`` says
    why, when that is not all of them); ``per_token``, it returns [B, R] advantages and charges
    ``--kl-in-reward``'s KL per token itself (so the sequence reward leaves it out).
    """

    fn: Callable[..., Any]
    needs_values: bool = False
    params: tuple[str, ...] = ()
    help: str = ""
    auto_scale: Optional[str] = None
    scales: tuple[str, ...] = ("group", "batch", "none")
    scale_reason: str = ""
    per_token: bool = False


#: PPO's estimators (``rlkit ppo --advantage``), the default first.
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": AdvantageEstimator(
        gae_advantages,
        needs_values=True,
        params=("gamma", "lam"),
        help="generalised advantage estimation over the value function's values, then whitened over the rollout",
    ),
}


def estimator_help(registry: dict[str, AdvantageEstimator]) -> str:
    """The ``--advantage`` help of a registry: every estimator's name and help."""
    return "Advantage estimator: " + "; ".join(f"{name} ({record.help})" for name, record in registry.items()) + "."
