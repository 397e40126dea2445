"""KTO: Kahneman–Tversky Optimisation on unpaired desirable/undesirable examples."""

from __future__ import annotations

import torch
from torch import Tensor

# Sec. 4.2 of the KTO paper: keep λ_D·n_D / (λ_U·n_U) within [1, 4/3].
_RATIO_LOW, _RATIO_HIGH = 1.0, 4.0 / 3.0


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-example KTO loss (Ethayarajh et al. 2024, Eq. 8).

    Why: KTO maximises a prospect-theory value of the implicit reward
    r = log π/π_ref relative to a reference point z0 ≈ KL(π‖π_ref), so it needs
    only a thumbs-up/down per completion, not pairs:
    desirable λ_D(1 - σ(β(r - z0))), undesirable λ_U(1 - σ(β(z0 - r))).
    z0 is a baseline, not something to optimise, so ``kl`` (a scalar from
    ``kl_reference_point``) is detached and clamped at 0 again here.

    ``policy_logps``/``reference_logps`` are summed completion log-probs [B];
    ``desirable`` is a bool [B]. Returns (losses [B], rewards β·r [B] detached).
    """
    z0 = kl.detach().clamp(min=0)
    r = policy_logps - reference_logps
    losses = torch.where(
        desirable.bool(),
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    return losses, beta * r.detach()


def apo_zero_unpaired_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-example APO-zero on unpaired data (D'Oosterlinck et al. 2024, Eq. 7, one side per example).

    Why: when the desirable completions are better than what the model writes now, anchor
    each example's implicit reward r = log π/π_ref at zero: desirable λ_D(1 - σ(βr)) raises its
    likelihood, undesirable λ_U σ(βr) = λ_U(1 - σ(-βr)) lowers it. That is KTO's loss with the
    reference point z0 = 0, so no KL is estimated (TRL's KTO ``loss_type="apo_zero_unpaired"``).

    Same inputs as ``kto_loss`` less ``kl``. Returns (losses [B], rewards β·r [B] detached).
    """
    zero = torch.zeros((), dtype=policy_logps.dtype, device=policy_logps.device)
    return kto_loss(policy_logps, reference_logps, desirable, zero, beta, desirable_weight, undesirable_weight)


def kl_reference_point(policy_kl_logps: Tensor, reference_kl_logps: Tensor, clamp: bool = True) -> Tensor:
    """Estimate the KTO reference point z0 = KL(π‖π_ref) from mismatched pairs (Ethayarajh et al. 2024).

    Why mismatched: log-probs of completions y_j under unrelated prompts x_i
    (see ``rlkit.data.unpaired.mismatched_partners``) give a batch-level, gradient-free estimate of the
    policy's drift that is not tied to any one example's reward. The mean is
    detached (no gradient flows through z0) and clamped at 0 (a KL cannot be
    negative; the sampled estimate can).

    Averaging across data-parallel processes is the caller's job: compute this
    with ``clamp=False`` on each process, all-reduce the mean, then clamp (or
    just pass the averaged value to ``kto_loss``, which clamps again).
    """
    z0 = (policy_kl_logps - reference_kl_logps).mean().detach()
    return z0.clamp(min=0) if clamp else z0


def desirable_weight_hint(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> tuple[float, float] | None:
    """Suggest (λ_D, λ_U) so that λ_D·n_D / (λ_U·n_U) lies in [1, 4/3] (Ethayarajh et al. 2024, Sec. 4.2).

    Why: the paper found KTO works best when the desirable side carries
    slightly more total weight than the undesirable side. Returns None when the
    ratio is already in range (or when one class is absent, so there is
    nothing to balance); otherwise keeps λ_U and moves λ_D to the nearest bound.
    """
    if min(n_desirable, n_undesirable) < 0 or desirable_weight <= 0 or undesirable_weight <= 0:
        raise ValueError("counts must be >= 0 and weights > 0")
    if n_desirable == 0 or n_undesirable == 0:
        return None
    undesirable_mass = undesirable_weight * n_undesirable
    ratio = desirable_weight * n_desirable / undesirable_mass
    if _RATIO_LOW <= ratio <= _RATIO_HIGH:
        return None
    target = _RATIO_LOW if ratio < _RATIO_LOW else _RATIO_HIGH
    return target * undesirable_mass / n_desirable, undesirable_weight
