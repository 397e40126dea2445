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

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from rlkit.config import check_config
from rlkit.console import info, warn
from rlkit.data.prepare import PreparedData
from rlkit.errors import InputError
from rlkit.losses.preference import (
    PREFERENCE_LOSSES,
    PreferenceLoss,
    add_sft_term,
    implicit_reward_accuracy,
    implicit_rewards,
    loss_terms,
)
from rlkit.models.modes import disable_dropout, model_device, to_device
from rlkit.preference.logps import PairLogps, pair_logps
from rlkit.preference.pair_training import load_pairs, pair_collate
from rlkit.preference.reference import Reference, setup_reference
from rlkit.recipes.dpo_config import DPOConfig
from rlkit.training.engine import Evaluation, StepOutput
from rlkit.training.run import TrainingRun, stop_for_dry_run
from rlkit.training.run_plan import MicroBatch, ReferencePlan, RunPlan, reference_of, trained_policy


class RewardShift:
    """BCO's reward shift δ: the mean of every implicit reward of training so far (Jung et al. 2024, Sec. 3.2).

    Updated by training micro-batches only (evaluation reads it), summed over processes so every
    process shifts by the same δ. It has a `state_dict`, and `run_dpo` registers it with the
    accelerator, so a checkpoint holds it and `--resume` continues from it.
    """

    def __init__(self, across_processes: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.total, self.count, self.across_processes = 0.0, 0.0, across_processes

    def __call__(self, rewards: torch.Tensor, update: bool) -> torch.Tensor:
        rewards = rewards.detach().float()
        if update:
            moments = torch.stack([rewards.sum(), torch.tensor(float(rewards.numel()), device=rewards.device)])
            if self.across_processes is not None:
                moments = self.across_processes(moments)
            self.total, self.count = self.total + float(moments[0]), self.count + float(moments[1])
        if not self.count:  # an evaluation before the first step: this batch's own mean
            return rewards.mean()
        return torch.tensor(self.total / self.count, device=rewards.device)

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total, self.count = float(state["total"]), float(state["count"])


class DPOObjective:
    """Per-pair preference loss of the chosen loss (or weighted losses); metric sums per pair for the engine."""

    def __init__(
        self,
        config: DPOConfig,
        reference: Reference | None,
        across_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.reference, self.beta, self.sft_weight = reference, config.beta, config.sft_weight
        self.terms = [
            (record, weight, record.hyperparameters_of(config))
            for record, weight in loss_terms(config.loss, config.loss_weights)
        ]
        needs_shift = any("reward_shift" in record.inputs for record, _, _ in self.terms)
        self.reward_shift = RewardShift(across_processes) if needs_shift else None

    def weight(self, batch: dict[str, Any]) -> float:
        return float(batch["num_pairs"])

    def _inputs(
        self,
        record: PreferenceLoss,
        policy: PairLogps,
        reference: tuple[torch.Tensor, torch.Tensor] | None,
        training: bool,
    ) -> dict[str, torch.Tensor]:
        """The tensors of `rlkit.losses.preference.INPUTS`, length-normalised if the loss asks for it."""
        chosen, rejected = policy.normalised() if record.length_normalised else (policy.chosen, policy.rejected)
        inputs = {
            "policy_chosen_logps": chosen,
            "policy_rejected_logps": rejected,
            "chosen_tokens": policy.chosen_tokens,
        }
        if reference is not None:
            ref_chosen, ref_rejected = reference
            if record.length_normalised:
                ref_chosen = ref_chosen / policy.chosen_tokens.clamp(min=1)
                ref_rejected = ref_rejected / policy.rejected_tokens.clamp(min=1)
            inputs.update(reference_chosen_logps=ref_chosen, reference_rejected_logps=ref_rejected)
            if self.reward_shift is not None and "reward_shift" in record.inputs:
                rewards = implicit_rewards(chosen, rejected, ref_chosen, ref_rejected, self.beta)
                inputs["reward_shift"] = self.reward_shift(torch.cat(rewards), update=training)
        return inputs

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        batch = to_device(batch, model_device(model))
        reference = (
            self.reference.logps(model, batch) if self.reference is not None else None
        )  # before the policy forward
        policy = pair_logps(model, batch)
        training = model.training and torch.is_grad_enabled()
        losses, rewards, parts = torch.zeros_like(policy.chosen), None, {}
        for record, weight, hyperparameters in self.terms:
            out = record(self._inputs(record, policy, reference, training), hyperparameters)
            values = out[0] if record.standalone else out
            if rewards is None and record.standalone:
                rewards = out[1:]
            losses = losses + weight * values
            parts[f"loss/{record.name}"] = values.detach().sum()
        losses = add_sft_term(losses, policy.chosen, policy.chosen_tokens, self.sft_weight)
        chosen_rewards, rejected_rewards = rewards
        metrics = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "rewards/accuracies": implicit_reward_accuracy(chosen_rewards, rejected_rewards).sum(),
            "logps/chosen": policy.chosen.detach().sum(),
            "logps/rejected": policy.rejected.detach().sum(),
            **(parts if len(parts) > 1 else {}),
        }
        if self.reward_shift is not None and self.reward_shift.count:  # a sum per pair, as the engine averages
            metrics["reward_shift"] = torch.tensor(
                self.reward_shift.total / self.reward_shift.count * len(policy.chosen)
            )
        return StepOutput(loss=losses.sum(), metrics=metrics)


def check_options(config: DPOConfig) -> None:
    """Refuse option values the losses cannot use, before any model is loaded (what each takes: its
    record); the bounds of single options are their declarations', not repeated here."""
    try:
        terms = loss_terms(config.loss, config.loss_weights)
    except ValueError as err:
        raise InputError(str(err))
    check_config(config)  # the bounds the options declare (a config built in code never met them)
    for record, _ in terms:
        message = record.check(record.hyperparameters_of(config)) if record.check else None
        if message:
            raise InputError(message)
    taken = {name for record, _ in terms for name in record.hyperparameters.values()}
    if config.label_smoothing and "label_smoothing" not in taken:
        users = ", ".join(
            name for name, r in PREFERENCE_LOSSES.items() if "label_smoothing" in r.hyperparameters.values()
        )
        warn(f"--label-smoothing is used by --loss {users} only; --loss {config.loss} ignores it")


def dpo_plan(config: DPOConfig) -> RunPlan:
    """The policy, trained on both sides of each pair in one forward (dropout only with --dropout);
    the reference: none when every loss term is reference-free, else precomputed (the default) or
    held on the fly (--no-precompute-ref)."""
    if all(record.reference_free for record, _ in loss_terms(config.loss, config.loss_weights)):
        reference = ReferencePlan("none", why="reference-free loss")
    else:
        reference = reference_of(config, config.ref, precomputed=config.precompute_ref)
    return RunPlan(
        "dpo",
        (trained_policy(config, dropout=config.dropout),),
        MicroBatch(config.batch_size, config.max_length, sides=2),
        reference=reference,
    )


def setup_dpo_reference(
    plan: RunPlan,
    config: DPOConfig,
    run: TrainingRun,
    policy: torch.nn.Module,
    data: PreparedData,
    tokenizer: Any,
    collate: Any,
) -> tuple[Reference | None, PreparedData, str]:
    """The reference the plan decided: none (a reference-free loss), else rlkit.preference.reference's."""
    assert plan.reference is not None  # dpo_plan always decides one
    if not plan.reference.present:
        return None, data, f"none ({plan.reference.why})"
    return setup_reference(config, run, policy, data, tokenizer, collate)


def run_dpo(config: DPOConfig) -> Path | None:
    """Setup (tokenizer, pairs, policy, reference), train with the shared engine, then write OUT (None: --dry-run)."""
    check_options(config)
    plan = dpo_plan(config)
    if config.ref and not plan.has_reference:
        warn(f"--loss {config.loss} uses no reference model; --ref is ignored")
    if stop_for_dry_run(plan, config):
        return None
    run = TrainingRun(plan, config)
    set_seed(config.seed)
    tokenizer = run.load_tokenizer()
    data = load_pairs(run, config, tokenizer, config.model or "")
    policy = run.load_policy()
    if not plan.main.dropout:
        disable_dropout(policy)
    collate = pair_collate(config, tokenizer)
    reference, data, described = setup_dpo_reference(plan, config, run, policy, data, tokenizer, collate)
    info(f"reference: {described}")
    acc = run.accelerator
    objective = DPOObjective(config, reference, (lambda t: acc.reduce(t, "sum")) if acc.num_processes > 1 else None)
    if objective.reward_shift is not None:  # saved in every checkpoint, so --resume continues δ
        acc.register_for_checkpointing(objective.reward_shift)
    default_lr = 5e-6 if config.lora else 5e-7
    metrics = run.train(
        policy, objective, run.dataset_steps(data.train, collate), default_lr, Evaluation.of(data.eval, collate)
    )
    terms = loss_terms(config.loss, config.loss_weights)
    taken = dict.fromkeys(name for record, _ in terms for name in record.hyperparameters.values())
    card = (
        "## Preference optimisation\n\n"
        f"- loss: `{config.loss}`"
        + (f" (weights {', '.join(f'{weight:g}' for _, weight in terms)})" if len(terms) > 1 else "")
        + "".join(f", {name.replace('_', ' ')} {getattr(config, name)}" for name in taken)
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
