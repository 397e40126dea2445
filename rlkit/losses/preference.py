"""DPO-family preference losses on per-sequence log-probabilities.

Every loss here shares one signature so a trainer can pick one by name::

    losses, chosen_rewards, rejected_rewards = PREFERENCE_LOSSES[name](
        policy_chosen_logps, policy_rejected_logps,
        reference_chosen_logps, reference_rejected_logps,
        beta=beta, label_smoothing=eps, gamma=gamma,
    )

Inputs are shape [B]: the log-probability of each completion under the policy
or the frozen reference, summed over completion tokens -- except for the
losses in ``rlkit.losses.LENGTH_NORMALISED`` ("ipo", "simpo"), for which the
caller passes the *average* per-token log-prob instead. The functions do not
care which they get; the choice is the caller's. Keyword arguments a loss does
not use (e.g. ``gamma`` for sigmoid) are accepted and ignored.

Outputs: per-pair ``losses`` [B] (unreduced) and the implicit rewards
``beta * (policy - reference)`` for chosen and rejected, detached, for logging
(reward accuracy / margins).

SFT term (``--sft-weight α``, RPO): Pang et al. 2024 ("Iterative Reasoning
Preference Optimization", the DPO+NLL objective) add α times the length-normalised NLL of the
chosen completion to the DPO loss, which stops DPO from lowering the chosen
completion's likelihood along with the rejected one. Use ``add_sft_term`` on
the per-pair losses; pass *summed* chosen log-probs and the token counts.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

LossOutput = tuple[Tensor, Tensor, Tensor]


def _logits(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
    """h = (π_c - ref_c) - (π_r - ref_r): the policy's log-ratio margin over the reference."""
    return (pc - rc) - (pr - rr)


def _rewards(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Implicit DPO rewards β·log(π/π_ref) (Rafailov et al. 2023, Eq. 5), detached."""
    return beta * (pc - rc).detach(), beta * (pr - rr).detach()


def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
) -> LossOutput:
    """DPO: -logσ(β h) (Rafailov et al. 2023, Eq. 7).

    Why: substituting the closed-form optimal KL-regularised policy into the
    Bradley–Terry likelihood turns reward modelling + RL into one classification
    loss on the policy. With ``label_smoothing`` ε > 0 this is conservative DPO
    (cDPO, Mitchell 2023): labels are assumed flipped with probability ε, so the
    target is a soft label, -(1-ε)logσ(βh) - ε logσ(-βh), and the loss stops
    pushing h to infinity. ``gamma`` is unused.
    """
    h = _logits(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return (
        losses,
        *_rewards(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta),
    )


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
) -> LossOutput:
    """IPO: (h - 1/(2β))^2 (Azar et al. 2023, Eq. 17).

    Why: DPO's sigmoid saturates only at h → ∞, so with deterministic
    preferences it overfits and ignores the KL anchor; IPO regresses h onto a
    finite target 1/(2β) instead. Here β is the paper's τ. rlkit passes
    length-normalised (mean per-token) log-probs for IPO, as TRL does.
    ``label_smoothing`` and ``gamma`` are unused.
    """
    h = _logits(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = (h - 1 / (2 * beta)) ** 2
    return (
        losses,
        *_rewards(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta),
    )


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
) -> LossOutput:
    """Hinge / SLiC: relu(1 - β h) (Zhao et al. 2023, SLiC-HF rank-calibration loss).

    Why: a margin loss gives exactly zero gradient once a pair is separated by
    1/β, so well-ranked pairs stop moving the policy. Computed on the
    reference-normalised margin h as in the DPO paper's SLiC baseline.
    ``label_smoothing`` and ``gamma`` are unused.
    """
    h = _logits(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = F.relu(1 - beta * h)
    return (
        losses,
        *_rewards(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta),
    )


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
) -> LossOutput:
    """Robust DPO: [(1-ε)ℓ(h) - ε ℓ(-h)] / (1-2ε), ℓ(x) = -logσ(βx) (Chowdhury et al. 2024, Sec. 3).

    Why: if each label is flipped with known rate ε, this combination is an
    *unbiased* estimate of the clean-label DPO loss (unlike cDPO, which is the
    loss on soft labels). It is undefined at ε = 1/2, hence the check.
    ε = ``label_smoothing``; ``gamma`` is unused.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    eps = label_smoothing
    h = _logits(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return (
        losses,
        *_rewards(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta),
    )


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None = None,
    reference_rejected_logps: Tensor | None = None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
) -> LossOutput:
    """SimPO: -logσ(β(π_c - π_r) - γ) (Meng et al. 2024, Eq. 6).

    Why: the reward the policy is scored by at generation time is its average
    per-token log-prob, so SimPO uses exactly that (length-normalised, pass
    mean log-probs) as the implicit reward -- no reference model -- and asks for
    a target margin γ between chosen and rejected. ``gamma`` is the paper's
    plain γ (as TRL's CPOConfig ``simpo_gamma``; the SimPO authors' scripts take
    ``gamma_beta_ratio`` = γ/β instead). Reference log-probs
    are accepted (may be None) and ignored; rewards are β·π, detached.
    ``label_smoothing`` is unused.
    """
    logits = beta * (policy_chosen_logps - policy_rejected_logps) - gamma
    losses = -F.logsigmoid(logits)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def add_sft_term(losses: Tensor, chosen_logps: Tensor, chosen_lengths: Tensor, alpha: float) -> Tensor:
    """Add the RPO NLL term α·(-log π(y_c|x) / |y_c|) (Pang et al. 2024, DPO+NLL) to per-pair losses.

    ``chosen_logps`` are *summed* log-probs of the chosen completion and
    ``chosen_lengths`` its token counts (clamped to >= 1), both [B]; the result
    is the per-token NLL, so α is comparable across sequence lengths.
    """
    if not alpha:
        return losses
    nll = -chosen_logps / chosen_lengths.clamp(min=1).to(chosen_logps.dtype)
    return losses + alpha * nll


def implicit_reward_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """1 where chosen is preferred, 0 where rejected is, 1/2 for a tie, per pair.

    Ties count half so the measure reads 50% for a policy with no preference at all, which
    is exactly the policy at step 0, where every implicit reward β·log(π/π_ref) is zero.
    """
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
