"""DPO-family preference losses on per-sequence log-probabilities, and one record per loss.

A loss is a pure tensor function plus a `PreferenceLoss` record in `PREFERENCE_LOSSES`. The
record says what `rlkit dpo` needs to know without reading the function: its name (the `--loss`
value), a one-line description (for `--help` and the docs table), the config fields it takes,
whether it wants length-normalised log-probs, and whether it needs a reference. `--loss` choices
and help, the option checks and the DPO objective's call are all built from the records, so a new
loss is one function and one record.

Each function takes only what it uses. Its positional parameters are named from `INPUTS`, which
the DPO objective provides:

- ``policy_chosen_logps``, ``policy_rejected_logps`` [B]: log π(y|x) of each completion, summed over
  its tokens -- or the mean per token when the record is ``length_normalised``;
- ``reference_chosen_logps``, ``reference_rejected_logps`` [B]: the same under the frozen
  reference (a loss without them is reference-free: no reference model is loaded);
- ``chosen_tokens`` [B]: completion token counts of the chosen side;
- ``reward_shift`` (scalar): BCO's running mean δ of the implicit rewards, kept by the objective.

Its keyword-only parameters are its hyperparameters; the record maps each to the config field it
comes from (e.g. SimPO's ``gamma`` is ``--simpo-gamma``). A pair loss returns per-pair ``losses``
[B] (unreduced) and the implicit rewards of chosen and rejected, detached, for logging (accuracy,
margins): β·log(π/π_ref), or β·π for the reference-free losses. A *term* (``standalone=False``,
``sft``) returns per-pair values only and is added to a pair loss, as TRL's list-valued
``loss_type`` does: ``--loss sigmoid,sft --loss-weights 1,0.5``.

SFT term (``--sft-weight α``, RPO): Pang et al. 2024 ("Iterative Reasoning Preference
Optimization", the DPO+NLL objective) add α times the length-normalised NLL of the chosen
completion to the DPO loss, which stops DPO from lowering the chosen completion's likelihood along
with the rejected one. Use ``add_sft_term`` on the per-pair losses; pass *summed* chosen log-probs
and the token counts.

torch is bound lazily (see `rlkit.losses._lazy`): reading the records, as `rlkit dpo --help` does,
does not execute it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlkit.losses._lazy import lazy_import

if TYPE_CHECKING:
    from torch import Tensor

    LossOutput = tuple[Tensor, Tensor, Tensor]

torch = lazy_import("torch")

#: The tensors a loss may ask for by positional parameter name (see the module docstring).
INPUTS = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
    "chosen_tokens",
    "reward_shift",
)


def _logsigmoid(x: Tensor) -> Tensor:
    return torch.nn.functional.logsigmoid(x)


def _logratios(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    """a = π_c - ref_c, b = π_r - ref_r: how far the policy has moved from the reference on each side.

    h = a - b is the policy's log-ratio margin over the reference.
    """
    return pc - rc, pr - rr


def _with_rewards(losses: Tensor, a: Tensor, b: Tensor, beta: float) -> LossOutput:
    """Per-pair losses with the implicit DPO rewards β·a, β·b (Rafailov et al. 2023, Eq. 5), detached."""
    return losses, beta * a.detach(), beta * b.detach()


def implicit_rewards(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Implicit DPO rewards β·log(π/π_ref) (Rafailov et al. 2023, Eq. 5), detached."""
    a, b = _logratios(pc, pr, rc, rr)
    return beta * a.detach(), beta * b.detach()


def _soft_label_sigmoid(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1-ε)logσ(x) - ε logσ(-x): the logistic loss on a label flipped with probability ε."""
    return -(1 - label_smoothing) * _logsigmoid(logits) - label_smoothing * _logsigmoid(-logits)


def chosen_nll(policy_chosen_logps: Tensor, chosen_tokens: Tensor) -> Tensor:
    """The `sft` term: -log π(y_c|x)/|y_c|, the chosen completion's per-token NLL (RPO, Pang et al. 2024, Eq. 1).

    Why a term: on its own it is SFT on the chosen side (`rlkit sft`); added to a preference loss
    it keeps the chosen likelihood from falling (``--loss sigmoid,sft --loss-weights 1,α`` is
    ``--loss sigmoid --sft-weight α``), and CPO and ORPO build it in. Per token, so that it does
    not grow with the completion's length. ``policy_chosen_logps`` are summed; lengths are
    clamped to >= 1.
    """
    return -policy_chosen_logps / chosen_tokens.clamp(min=1).to(policy_chosen_logps.dtype)


def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO: -logσ(β h) (Rafailov et al. 2023, Eq. 7).

    Why: substituting the closed-form optimal KL-regularised policy into the
    Bradley–Terry likelihood turns reward modelling + RL into one classification
    loss on the policy. With ``label_smoothing`` ε > 0 this is conservative DPO
    (cDPO, Mitchell 2023): labels are assumed flipped with probability ε, so the
    target is a soft label, -(1-ε)logσ(βh) - ε logσ(-βh), and the loss stops
    pushing h to infinity. On length-normalised log-probs it is `sigmoid_norm`.
    """
    a, b = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    h = a - b
    return _with_rewards(_soft_label_sigmoid(beta * h, label_smoothing), a, b, beta)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """IPO: (h - 1/(2β))^2 (Azar et al. 2023, Eq. 17).

    Why: DPO's sigmoid saturates only at h → ∞, so with deterministic
    preferences it overfits and ignores the KL anchor; IPO regresses h onto a
    finite target 1/(2β) instead. Here β is the paper's τ. rlkit passes
    length-normalised (mean per-token) log-probs for IPO, as TRL does.
    """
    a, b = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    h = a - b
    return _with_rewards((h - 1 / (2 * beta)) ** 2, a, b, beta)


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Hinge / SLiC: relu(1 - β h) (Zhao et al. 2023, SLiC-HF rank-calibration loss).

    Why: a margin loss gives exactly zero gradient once a pair is separated by
    1/β, so well-ranked pairs stop moving the policy. Computed on the
    reference-normalised margin h as in the DPO paper's SLiC baseline.
    """
    a, b = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    h = a - b
    return _with_rewards(torch.relu(1 - beta * h), a, b, beta)


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Robust DPO: [(1-ε)ℓ(h) - ε ℓ(-h)] / (1-2ε), ℓ(x) = -logσ(βx) (Chowdhury et al. 2024, Sec. 3).

    Why: if each label is flipped with known rate ε, this combination is an
    *unbiased* estimate of the clean-label DPO loss (unlike cDPO, which is the
    loss on soft labels). It is undefined at ε = 1/2, hence the check.
    ε = ``label_smoothing``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    eps = label_smoothing
    a, b = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    h = a - b
    losses = ((1 - eps) * -_logsigmoid(beta * h) - eps * -_logsigmoid(-beta * h)) / (1 - 2 * eps)
    return _with_rewards(losses, a, b, beta)


def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, *, beta: float, gamma: float) -> LossOutput:
    """SimPO: -logσ(β(π_c - π_r) - γ) (Meng et al. 2024, Eq. 6).

    Why: the reward the policy is scored by at generation time is its average
    per-token log-prob, so SimPO uses exactly that (length-normalised, pass
    mean log-probs) as the implicit reward -- no reference model -- and asks for
    a target margin γ between chosen and rejected. ``gamma`` is the paper's
    plain γ (as TRL's CPOConfig ``simpo_gamma``; the SimPO authors' scripts take
    ``gamma_beta_ratio`` = γ/β instead). Rewards are β·π, detached.
    """
    logits = beta * (policy_chosen_logps - policy_rejected_logps) - gamma
    return -_logsigmoid(logits), beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, *, beta: float) -> LossOutput:
    """ORPO: -π̄_c - λ logσ(log odds(y_c) - log odds(y_r)), odds(y) = P/(1-P), log P = π̄ (Hong et al. 2024, Eq. 6-8).

    Why: an SFT loss alone raises the likelihood of rejected completions too; ORPO adds a
    penalty on the odds ratio of chosen over rejected, which needs no reference model, so
    one stage replaces SFT + preference tuning. P(y|x) is the geometric mean per-token
    probability (pass mean per-token log-probs π̄), so the first term is the chosen
    completion's per-token NLL. λ = ``beta`` (as TRL's ORPOConfig, 0.1 there too).
    log(1 - P) = log(-expm1(π̄)); π̄ is clamped just below 0 so an empty completion
    (π̄ = 0) gives a large finite odds, not an infinite one. Rewards are β·π̄, detached.
    """
    chosen, rejected = policy_chosen_logps.clamp(max=-1e-6), policy_rejected_logps.clamp(max=-1e-6)
    log_odds = (chosen - torch.log(-torch.expm1(chosen))) - (rejected - torch.log(-torch.expm1(rejected)))
    losses = -policy_chosen_logps - beta * _logsigmoid(log_odds)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_tokens: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """CPO: -logσ(β(π_c - π_r)) - log π(y_c|x)/|y_c| (Xu et al. 2024, Eq. 3 and the NLL term of Eq. 6).

    Why: DPO's reference model costs memory and a forward; CPO drops it (the preference
    term is DPO with a uniform reference) and keeps the policy on the chosen data with a
    behaviour-cloning NLL instead. Summed log-probs in the preference term, as TRL; the
    NLL is per token (as TRL's cross-entropy, with its cpo_alpha = 1). With
    ``label_smoothing`` ε the preference term has soft labels, as in cDPO and TRL.
    Rewards are β·π, detached.
    """
    losses = _soft_label_sigmoid(beta * (policy_chosen_logps - policy_rejected_logps), label_smoothing)
    losses = losses + chosen_nll(policy_chosen_logps, chosen_tokens)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def cpo_simpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, *, beta: float, gamma: float
) -> LossOutput:
    """CPO-SimPO: -logσ(β(π̄_c - π̄_r) - γ) - π̄_c (SimPO, Meng et al. 2024, Eq. 6, plus CPO's NLL, Xu et al. 2024).

    Why: SimPO's length-normalised, reference-free margin with CPO's behaviour-cloning term,
    which keeps the chosen likelihood from falling (TRL's CPOTrainer with loss_type="simpo"
    and its default cpo_alpha = 1). On mean per-token log-probs π̄ the NLL term is -π̄_c.
    """
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        policy_chosen_logps, policy_rejected_logps, beta=beta, gamma=gamma
    )
    return losses - policy_chosen_logps, chosen_rewards, rejected_rewards


def apo_zero_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """APO-zero: (1 - σ(β a)) + σ(β b), a = π_c - ref_c, b = π_r - ref_r (D'Oosterlinck et al. 2024, Eq. 7).

    Why: DPO only moves the margin, so both likelihoods may fall. When the chosen
    completions are better than what the model writes now, APO-zero anchors each side to
    zero: it raises the chosen likelihood and lowers the rejected one, separately.
    """
    a, b = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return _with_rewards((1 - torch.sigmoid(beta * a)) + torch.sigmoid(beta * b), a, b, beta)


def apo_down_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """APO-down: σ(β a) + (1 - σ(β(a - b))), a = π_c - ref_c, b = π_r - ref_r (D'Oosterlinck et al. 2024, Eq. 8).

    Why: when even the chosen completions are worse than the model's own, APO-down lowers the
    chosen likelihood and the rejected one more, keeping the margin a - b growing.
    """
    a, b = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return _with_rewards(torch.sigmoid(beta * a) + (1 - torch.sigmoid(beta * (a - b))), a, b, beta)


def nca_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """NCA (pairwise): -logσ(r_c) - ½logσ(-r_c) - ½logσ(-r_r), r = β(π - ref) (Chen et al. 2024, Eq. 12, K = 2).

    Why: DPO's relative margin lets the chosen likelihood fall as long as the rejected one
    falls faster; noise-contrastive alignment scores each completion's own reward against
    a zero anchor, so the optimum raises the chosen likelihood in absolute terms.
    """
    a, b = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    chosen_rewards, rejected_rewards = beta * a, beta * b
    losses = -_logsigmoid(chosen_rewards) - 0.5 * _logsigmoid(-chosen_rewards) - 0.5 * _logsigmoid(-rejected_rewards)
    return _with_rewards(losses, a, b, beta)


def bco_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    reward_shift: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """BCO (pairwise): -logσ(r_c - δ) - logσ(-(r_r - δ)), r = β(π - ref) (Jung et al. 2024, Eq. 5 and Sec. 3.2).

    Why: binary classifier optimisation trains a classifier whose logit is the implicit
    reward, chosen as class 1 and rejected as class 0; the reward shift δ, the running mean
    of the rewards seen so far (``reward_shift``, kept by the caller, detached), centres the
    logits so that the classifier's boundary follows the rewards as they drift.
    """
    a, b = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    chosen_rewards, rejected_rewards = beta * a, beta * b
    shift = reward_shift.detach()
    losses = -_logsigmoid(chosen_rewards - shift) - _logsigmoid(-(rejected_rewards - shift))
    return _with_rewards(losses, a, b, beta)


def exo_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float,
) -> LossOutput:
    """EXO (pairwise): σ(βh)(logσ(βh) - log(1-ε)) + σ(-βh)(logσ(-βh) - log ε) (Ji et al. 2024, Eq. 16, K = 2).

    Why: DPO minimises the forward KL between the preference distribution and the policy's,
    which averages over modes; EXO minimises the reverse KL(p_θ ‖ p_ε) between the policy's
    two-way softmax over {chosen, rejected} and the target [1-ε, ε], which seeks the
    preferred mode. ε = ``label_smoothing`` must be > 0 (log ε); β is both the paper's β_π
    and β_r, as in TRL.
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"EXO needs 0 < label_smoothing < 1 (it takes log ε), got {label_smoothing}")
    a, b = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    logits = beta * (a - b)
    losses = torch.sigmoid(logits) * (_logsigmoid(logits) - math.log1p(-label_smoothing)) + torch.sigmoid(-logits) * (
        _logsigmoid(-logits) - math.log(label_smoothing)
    )
    return _with_rewards(losses, a, b, beta)


def sppo_hard_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """SPPO (hard labels): (a - 1/(2β))² + (b + 1/(2β))², a = π_c - ref_c, b = π_r - ref_r (Wu et al. 2024, Eq. 4.7).

    Why: self-play preference optimisation regresses each completion's log-ratio onto
    η(P(y wins) - ½); with hard win probabilities (1 for chosen, 0 for rejected) and η = 1/β
    the targets are +1/(2β) and -1/(2β), one per side, so neither likelihood can drift freely.
    """
    a, b = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return _with_rewards((a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2, a, b, beta)


def discopop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    tau: float,
) -> LossOutput:
    """DiscoPOP / LRML: (1 - w)(-logσ(βh)) + w·exp(-βh), w = σ(βh/τ) (Chen et al. 2024, Eq. 5; τ = 0.05).

    Why: found by an LLM-driven search over objectives, this log-ratio modulated loss blends
    DPO's logistic loss (where the margin βh is negative) with an exponential one (where it
    is positive), a non-convex mix that scored best on MT-Bench in the paper. τ = ``tau``.
    """
    a, b = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    logits = beta * (a - b)
    weight = torch.sigmoid(logits / tau)
    losses = (1 - weight) * -_logsigmoid(logits) + weight * torch.exp(-logits)
    return _with_rewards(losses, a, b, beta)


def add_sft_term(losses: Tensor, chosen_logps: Tensor, chosen_lengths: Tensor, alpha: float) -> Tensor:
    """Add the RPO NLL term α·(-log π(y_c|x) / |y_c|) (Pang et al. 2024, DPO+NLL) to per-pair losses.

    ``chosen_logps`` are *summed* log-probs of the chosen completion and
    ``chosen_lengths`` its token counts (clamped to >= 1), both [B]; the result
    is the per-token NLL, so α is comparable across sequence lengths.
    """
    if not alpha:
        return losses
    return losses + alpha * chosen_nll(chosen_logps, chosen_lengths)


def implicit_reward_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """1 where chosen is preferred, 0 where rejected is, 1/2 for a tie, per pair.

    Ties count half so the measure reads 50% for a policy with no preference at all, which
    is exactly the policy at step 0, where every implicit reward β·log(π/π_ref) is zero.
    """
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


def _beta() -> dict[str, str]:
    return {"beta": "beta"}


@dataclass(frozen=True)
class PreferenceLoss:
    """What `rlkit dpo` knows about one `--loss`: the function and how to call it.

    ``hyperparameters`` maps each keyword-only parameter of ``fn`` to the config field it is
    read from; ``check`` refuses values of those (named by keyword) the loss cannot use.
    """

    name: str
    fn: Callable[..., Any]
    description: str
    hyperparameters: dict[str, str] = field(default_factory=_beta)
    length_normalised: bool = False
    standalone: bool = True  # False: a term added to a pair loss (--loss sigmoid,sft), not a loss alone
    check: Callable[[dict[str, float]], str | None] | None = None

    def __post_init__(self) -> None:
        """A record cannot drift from its function: inputs from INPUTS, keywords = the hyperparameters."""
        params = inspect.signature(self.fn).parameters.values()
        unknown = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in INPUTS]
        keywords = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
        if unknown or keywords != set(self.hyperparameters):
            raise TypeError(
                f"loss {self.name!r}: {self.fn.__name__} takes inputs {unknown} not in INPUTS, or keywords "
                f"{sorted(keywords)} that are not its hyperparameters {sorted(self.hyperparameters)}"
            )

    @property
    def inputs(self) -> tuple[str, ...]:
        """The tensors the function takes, in order, named from INPUTS."""
        params = inspect.signature(self.fn).parameters.values()
        return tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)

    @property
    def reference_free(self) -> bool:
        return "reference_chosen_logps" not in self.inputs

    @property
    def flags(self) -> tuple[str, ...]:
        """The options its hyperparameters come from, e.g. ('--beta', '--simpo-gamma')."""
        return tuple("--" + name.replace("_", "-") for name in self.hyperparameters.values())

    def hyperparameters_of(self, config: Any) -> dict[str, float]:
        """The keyword arguments of ``fn``, read from ``config``."""
        return {keyword: getattr(config, name) for keyword, name in self.hyperparameters.items()}

    def __call__(self, inputs: dict[str, Any], hyperparameters: dict[str, float]) -> Any:
        return self.fn(*(inputs[name] for name in self.inputs), **hyperparameters)


def _exo_needs_epsilon(values: dict[str, float]) -> str | None:
    if values["label_smoothing"] > 0:
        return None
    return "--loss exo_pair needs --label-smoothing ε > 0: EXO's target is [1-ε, ε] and it takes log ε (the EXO paper recommends 1e-3)"


_SMOOTHED = {"beta": "beta", "label_smoothing": "label_smoothing"}

#: One record per `--loss` value, in the order `--help` and the docs list them.
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    record.name: record
    for record in (
        PreferenceLoss("sigmoid", sigmoid_loss, "DPO; cDPO with --label-smoothing", _SMOOTHED),
        PreferenceLoss("ipo", ipo_loss, "IPO", length_normalised=True),
        PreferenceLoss("hinge", hinge_loss, "SLiC hinge"),
        PreferenceLoss("robust", robust_loss, "rDPO, ε = --label-smoothing", _SMOOTHED),
        PreferenceLoss(
            "simpo",
            simpo_loss,
            "SimPO, reference-free",
            {"beta": "beta", "gamma": "simpo_gamma"},
            length_normalised=True,
        ),
        PreferenceLoss("orpo", orpo_loss, "ORPO: odds ratio + chosen NLL, reference-free", length_normalised=True),
        PreferenceLoss("cpo", cpo_loss, "CPO: reference-free DPO + chosen NLL", _SMOOTHED),
        PreferenceLoss(
            "cpo_simpo",
            cpo_simpo_loss,
            "SimPO + chosen NLL, reference-free",
            {"beta": "beta", "gamma": "simpo_gamma"},
            length_normalised=True,
        ),
        PreferenceLoss("apo_zero", apo_zero_loss, "APO-zero: raise chosen, lower rejected"),
        PreferenceLoss("apo_down", apo_down_loss, "APO-down: lower both, rejected more"),
        PreferenceLoss("nca_pair", nca_pair_loss, "NCA, pairwise"),
        PreferenceLoss("bco_pair", bco_pair_loss, "BCO, pairwise, with its running reward shift"),
        PreferenceLoss(
            "exo_pair", exo_pair_loss, "EXO, pairwise, ε = --label-smoothing > 0", _SMOOTHED, check=_exo_needs_epsilon
        ),
        PreferenceLoss("sppo_hard", sppo_hard_loss, "SPPO, hard win probabilities"),
        PreferenceLoss(
            "discopop", discopop_loss, "DiscoPOP, τ = --discopop-tau", {"beta": "beta", "tau": "discopop_tau"}
        ),
        PreferenceLoss(
            "sigmoid_norm", sigmoid_loss, "DPO on per-token mean log-probs", _SMOOTHED, length_normalised=True
        ),
        PreferenceLoss("sft", chosen_nll, "the chosen's per-token NLL, only added to a loss", {}, standalone=False),
    )
}


def loss_terms(loss: str, weights: Sequence[str] | str | None = None) -> list[tuple[PreferenceLoss, float]]:
    """`--loss a,b --loss-weights wa,wb` as (record, weight) pairs, or ValueError saying what to change.

    One name without weights is that loss with weight 1. A combination is the weighted sum of
    its components' per-pair losses, as TRL's list-valued ``loss_type`` with ``loss_weights``.
    ``weights`` is the config's list (or one comma-separated string); empty means 1 each.
    """
    names = [name.strip() for name in loss.split(",") if name.strip()]
    unknown = [name for name in names if name not in PREFERENCE_LOSSES]
    if not names or unknown:
        raise ValueError(
            f"--loss {loss}: {'unknown ' + ', '.join(unknown) if unknown else 'no loss named'}; "
            f"choose from {', '.join(PREFERENCE_LOSSES)} (or several, comma-separated)"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"--loss {loss}: a loss is named twice; give each once, with its weight in --loss-weights")
    if not any(PREFERENCE_LOSSES[name].standalone for name in names):
        raise ValueError(
            f"--loss {loss}: sft is a term added to a preference loss (e.g. --loss sigmoid,sft); "
            "for SFT alone use `rlkit sft`"
        )
    given = [w.strip() for w in (weights.split(",") if isinstance(weights, str) else weights or []) if w.strip()]
    shown = ",".join(given)
    if not given:
        values = [1.0] * len(names)
    else:
        try:
            values = [float(w) for w in given]
        except ValueError:
            raise ValueError(f"--loss-weights {shown}: give comma-separated numbers, one per --loss name")
        if len(values) != len(names):
            raise ValueError(f"--loss-weights {shown}: {len(values)} weights for {len(names)} losses ({loss})")
        if any(not math.isfinite(w) or w < 0 for w in values) or not any(values):
            raise ValueError(f"--loss-weights {shown}: weights must be finite, >= 0 and not all 0")
    return [(PREFERENCE_LOSSES[name], weight) for name, weight in zip(names, values)]
