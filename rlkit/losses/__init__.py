"""Pure tensor loss functions for rlkit's trainers (no models, configs or I/O)."""

from __future__ import annotations

from collections.abc import Callable

from rlkit.losses.kto import desirable_weight_hint, kl_reference_point, kto_loss
from rlkit.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    standardise_scores,
)
from rlkit.losses.preference import (
    add_sft_term,
    hinge_loss,
    ipo_loss,
    robust_loss,
    sigmoid_loss,
    simpo_loss,
)
from rlkit.losses.reward import bradley_terry_loss

#: Name -> loss. All share the call
#: ``fn(pc, pr, rc, rr, beta=..., label_smoothing=..., gamma=...) -> (losses, chosen_rewards, rejected_rewards)``.
PREFERENCE_LOSSES: dict[str, Callable] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
    "simpo": simpo_loss,
}

#: Losses whose log-prob arguments should be length-normalised (mean per token)
#: rather than summed over the completion. The others expect summed log-probs.
LENGTH_NORMALISED: frozenset[str] = frozenset({"ipo", "simpo"})

#: Losses that never read the reference log-probs (no reference model needed).
REFERENCE_FREE: frozenset[str] = frozenset({"simpo"})

__all__ = [
    "LENGTH_NORMALISED",
    "PREFERENCE_LOSSES",
    "REFERENCE_FREE",
    "AdaptiveKLController",
    "FixedKLController",
    "add_sft_term",
    "bradley_terry_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "desirable_weight_hint",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "hinge_loss",
    "ipo_loss",
    "kl_penalty",
    "kl_reference_point",
    "kto_loss",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "robust_loss",
    "sigmoid_loss",
    "simpo_loss",
    "standardise_scores",
]
