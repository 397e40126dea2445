"""Direct preference optimisation and its family: the pair-to-loss step, and the recipe.

The objective turns one micro-batch of pairs into summed per-pair losses: one policy forward
over chosen and rejected together (`pair_logps`), the reference's log-probs (precomputed
columns by default, see `rlkit.preference.reference`), then a pure loss from `rlkit.losses`. Everything
else (accumulation, schedule, checkpoints, eval, metrics) is the shared engine's; it divides
the sums by the number of pairs of the step.

The Tulu 2.5 recipe, as flags (global batch 32 = 8 x 4 on one device):

    rlkit dpo SFT_MODEL ultrafeedback.jsonl -o out --full --template tulu --lr 5e-7 \\
        --batch-size 8 --grad-accum 4 --scheduler linear --warmup-ratio 0.1 --epochs 3 --beta 0.1
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from rlkit.console import info, warn
from rlkit.data.prepare import PreparedData
from rlkit.errors import InputError
from rlkit.losses import LENGTH_NORMALISED, PREFERENCE_LOSSES, REFERENCE_FREE, add_sft_term
from rlkit.losses.preference import implicit_reward_accuracy
from rlkit.models.modes import disable_dropout, model_device, to_device
from rlkit.preference.logps import pair_logps
from rlkit.preference.pairs import load_pairs, pair_collate
from rlkit.preference.reference import Reference, setup_reference
from rlkit.recipes.dpo_config import DPOConfig
from rlkit.training.engine import Evaluation, StepOutput
from rlkit.training.run import TrainingRun


class DPOObjective:
    """Per-pair preference loss of the chosen loss; metric sums per pair for the engine to average."""

    def __init__(self, config: DPOConfig, reference: Reference | None):
        self.name, self.reference = config.loss, reference
        self.beta, self.label_smoothing, self.gamma, self.sft_weight = (
            config.beta,
            config.label_smoothing,
            config.simpo_gamma,
            config.sft_weight,
        )

    def weight(self, batch: dict[str, Any]) -> float:
        return float(batch["num_pairs"])

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        batch = to_device(batch, model_device(model))
        reference = (
            self.reference.logps(model, batch) if self.reference is not None else None
        )  # before the policy forward
        policy = pair_logps(model, batch)
        chosen, rejected = policy.chosen, policy.rejected
        ref_chosen, ref_rejected = reference if reference is not None else (None, None)
        if self.name in LENGTH_NORMALISED:
            chosen, rejected = policy.normalised()
            if reference is not None:
                ref_chosen, ref_rejected = (
                    ref_chosen / policy.chosen_tokens.clamp(min=1),
                    ref_rejected / policy.rejected_tokens.clamp(min=1),
                )
        losses, chosen_rewards, rejected_rewards = PREFERENCE_LOSSES[self.name](
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            gamma=self.gamma,
        )
        losses = add_sft_term(losses, policy.chosen, policy.chosen_tokens, self.sft_weight)
        metrics = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "rewards/accuracies": implicit_reward_accuracy(chosen_rewards, rejected_rewards).sum(),
            "logps/chosen": policy.chosen.detach().sum(),
            "logps/rejected": policy.rejected.detach().sum(),
        }
        return StepOutput(loss=losses.sum(), metrics=metrics)


def check_options(config: DPOConfig) -> None:
    """Refuse option values the losses cannot use, before any model is loaded."""
    if config.beta <= 0:
        raise InputError(f"--beta {config.beta}: must be > 0")
    if not 0 <= config.label_smoothing < 0.5:
        raise InputError(f"--label-smoothing {config.label_smoothing}: must be in [0, 0.5)")
    if config.label_smoothing and config.loss not in ("sigmoid", "robust"):
        warn(f"--label-smoothing is used by --loss sigmoid and robust only; --loss {config.loss} ignores it")
    if config.sft_weight < 0:
        raise InputError(f"--sft-weight {config.sft_weight}: must be >= 0")
    if config.loss in REFERENCE_FREE and config.ref:
        warn(f"--loss {config.loss} uses no reference model; --ref is ignored")


def setup_dpo_reference(
    config: DPOConfig, run: TrainingRun, policy: torch.nn.Module, data: PreparedData, tokenizer: Any, collate: Any
) -> tuple[Reference | None, PreparedData, str]:
    if config.loss in REFERENCE_FREE:
        return None, data, "none (reference-free loss)"
    return setup_reference(config, run, policy, data, tokenizer, collate)


def run_dpo(config: DPOConfig) -> Path:
    """Setup (tokenizer, pairs, policy, reference), train with the shared engine, then write OUT."""
    check_options(config)
    run = TrainingRun("dpo", config, config.model, config.data)
    set_seed(config.seed)
    tokenizer = run.load_tokenizer()
    data = load_pairs(run, config, tokenizer, config.model or "")
    policy = run.load_policy()
    if not config.dropout:
        disable_dropout(policy)
    collate = pair_collate(config, tokenizer)
    reference, data, described = setup_dpo_reference(config, run, policy, data, tokenizer, collate)
    info(f"reference: {described}")
    objective = DPOObjective(config, reference)
    default_lr = 5e-6 if config.lora else 5e-7
    metrics = run.train(
        policy, objective, run.dataset_steps(data.train, collate), default_lr, Evaluation.of(data.eval, collate)
    )
    card = (
        "## Preference optimisation\n\n"
        f"- loss: `{config.loss}`, beta {config.beta}"
        + (f", label smoothing {config.label_smoothing}" if config.label_smoothing else "")
        + (f", SimPO gamma {config.simpo_gamma}" if config.loss == "simpo" else "")
        + (f", SFT weight {config.sft_weight}" if config.sft_weight else "")
        + f"\n- reference: {described}\n"
        + (
            f"- held-out implicit-reward accuracy: {metrics['eval/rewards/accuracies']:.4f}\n"
            if "eval/rewards/accuracies" in metrics
            else ""
        )
        + "\n"
    )
    template = (data.metadata.get("template") or {}).get("source")
    return run.finish(tokenizer, chat_template=template, metrics=metrics, data_info=data.metadata, extra_card=card)
