"""Kahneman–Tversky optimisation: the example-to-loss step, and the recipe.

KTO learns from a thumbs-up or thumbs-down per completion, no pairs needed. A micro-batch of
B examples costs two forwards: one with gradient over each prompt + its own completion, one
without over each prompt + its mismatched completion (another example's, see
`rlkit.data.unpaired.mismatched_partners`), which estimates the reference point z0 = KL(π‖π_ref).
The mismatched forward needs no backward, so it costs a third of the first. The reference's
log-probs of both come precomputed by default (`rlkit.preference.reference`, shared with dpo).

The iterated recipe (each round's model is the next round's reference):

    R1=$(rlkit kto SFT  data.jsonl -o kto-1 --ref SFT)
    R2=$(rlkit kto "$R1" data.jsonl -o kto-2 --ref "$R1")
    R3=$(rlkit kto "$R2" data.jsonl -o kto-3 --ref "$R2")
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rlkit.console import info, warn
from rlkit.data.prepare import DataOptions, PreparedData, prepare_unpaired_data
from rlkit.data.unpaired import collate_unpaired, describe_unpaired_data, with_kl_completions
from rlkit.errors import InputError
from rlkit.losses.kto import apo_zero_unpaired_loss, desirable_weight_hint, kl_reference_point, kto_loss
from rlkit.models.modes import disable_dropout, model_device, to_device
from rlkit.preference.logps import sequence_logps
from rlkit.preference.reference import LogpsSpec, Reference, setup_reference
from rlkit.recipes.kto_config import KTOConfig
from rlkit.training.engine import Evaluation, StepOutput
from rlkit.training.run import TrainingRun, stop_for_dry_run
from rlkit.training.run_plan import MicroBatch, NoGradForward, RunPlan, reference_of, trained_policy


def _kto_measure(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each example's own completion and of its mismatched completion."""
    n = int(batch["num_examples"])
    return sequence_logps(model, batch, n)[0], sequence_logps(model, batch, n, prefix="kl_")[0]


KTO_LOGPS = LogpsSpec(_kto_measure, ("ref_completion_logps", "ref_kl_logps"), unit="examples")


def mean_over_processes(accelerator: Accelerator) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce(value: torch.Tensor) -> torch.Tensor:
        if accelerator.num_processes == 1:
            return value
        return accelerator.reduce(value.detach().reshape(1).float(), reduction="mean").reshape(())

    return reduce


def uses_kl_forward(config: KTOConfig) -> bool:
    """Whether a step runs the no-grad forward over the mismatched completions: KTO's z0 needs it;
    apo_zero_unpaired anchors the rewards at 0, so it has no z0 to estimate."""
    return config.loss == "kto"


class KTOObjective:
    """Per-example KTO (or APO-zero) loss; rewards and log-probs averaged over desirable / undesirable examples."""

    def __init__(
        self, config: KTOConfig, reference: Reference, across_processes: Callable[[torch.Tensor], torch.Tensor]
    ):
        self.reference, self.across_processes = reference, across_processes
        self.beta, self.weights = config.beta, (config.desirable_weight, config.undesirable_weight)
        self.uses_kl = uses_kl_forward(config)

    def weight(self, batch: dict[str, Any]) -> float:
        return float(batch["num_examples"])

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        batch = to_device(batch, model_device(model))
        n = int(batch["num_examples"])
        ref_logps, ref_kl_logps = self.reference.logps(model, batch)  # before the policy forward
        desirable = batch["label"].bool()
        metrics = {}
        if self.uses_kl:
            with torch.no_grad():
                kl_logps, _ = sequence_logps(model, batch, n, prefix="kl_")
            # z0: this micro-batch's mean over its mismatched pairs, then the mean over processes.
            z0 = self.across_processes(kl_reference_point(kl_logps, ref_kl_logps, clamp=False)).clamp(min=0)
            logps, _ = sequence_logps(model, batch, n)
            losses, rewards = kto_loss(logps, ref_logps, desirable, z0, self.beta, *self.weights)
            metrics["kl"] = z0 * n
        else:
            logps, _ = sequence_logps(model, batch, n)
            losses, rewards = apo_zero_unpaired_loss(logps, ref_logps, desirable, self.beta, *self.weights)
        undesirable = ~desirable
        metrics |= {
            "rewards/chosen": rewards[desirable].sum(),
            "rewards/rejected": rewards[undesirable].sum(),
            "logps/chosen": logps.detach()[desirable].sum(),
            "logps/rejected": logps.detach()[undesirable].sum(),
        }
        counts = {
            "rewards/chosen": desirable.sum(),
            "rewards/rejected": undesirable.sum(),
            "logps/chosen": desirable.sum(),
            "logps/rejected": undesirable.sum(),
        }
        return StepOutput(loss=losses.sum(), metrics=metrics, counts=counts)

    @staticmethod
    def derived_metrics(means: dict[str, float]) -> dict[str, float]:
        """The margin between the mean desirable and mean undesirable implicit rewards."""
        if "rewards/chosen" in means and "rewards/rejected" in means:
            return {"rewards/margins": means["rewards/chosen"] - means["rewards/rejected"]}
        return {}


def check_options(config: KTOConfig) -> None:
    """Refuse option values KTO cannot use, before any model is loaded."""
    if config.beta <= 0:
        raise InputError(f"--beta {config.beta}: must be > 0")
    if config.desirable_weight <= 0 or config.undesirable_weight <= 0:
        raise InputError(
            f"--desirable-weight {config.desirable_weight} / --undesirable-weight {config.undesirable_weight}: both must be > 0"
        )
    if config.batch_size < 2:
        raise InputError(
            f"--batch-size {config.batch_size}: KTO needs at least 2 examples per micro-batch; its reference point z0 "
            "is the mean over the micro-batch's mismatched pairs, and one pair is no estimate of a KL"
        )


def check_weights(config: KTOConfig, counts: dict[str, int]) -> None:
    """Warn when λ_D·n_D/(λ_U·n_U) is outside [1, 4/3] (KTO paper, Sec. 4.2), with weights that fix it."""
    n_d, n_u = counts["desirable"], counts["undesirable"]
    if n_d == 0 or n_u == 0:
        warn(f"the training data has {n_d} desirable and {n_u} undesirable examples; KTO learns from both kinds")
        return
    hint = desirable_weight_hint(n_d, n_u, config.desirable_weight, config.undesirable_weight)
    if hint is not None:
        ratio = config.desirable_weight * n_d / (config.undesirable_weight * n_u)
        warn(
            f"λ_D·n_D/(λ_U·n_U) = {config.desirable_weight:g}·{n_d}/({config.undesirable_weight:g}·{n_u}) = {ratio:.3f} is outside "
            f"the KTO paper's recommended [1, 4/3]; e.g. --desirable-weight {hint[0]:.4g} --undesirable-weight {hint[1]:.4g}"
        )


def load_unpaired(run: TrainingRun, config: KTOConfig, tokenizer: Any) -> PreparedData:
    """Tokenised examples (train + eval) with their mismatched completions attached."""
    opts = DataOptions.of(config)
    with run.accelerator.main_process_first():
        data = prepare_unpaired_data(opts, tokenizer, config.model or "")
    line, warnings = describe_unpaired_data(data.metadata)
    info(line)
    for message in warnings:
        warn(message)
    max_length = data.metadata["max_length"]
    train, clashes = with_kl_completions(data.train, max_length, config.seed)
    if clashes:
        warn(
            f"{clashes} of {len(train)} mismatched pairs share a prompt (one prompt holds most of the data); z0 is biased towards the rewards"
        )
    eval_split = (
        with_kl_completions(data.eval, max_length, config.seed)[0]
        if data.eval is not None and len(data.eval) >= 2
        else None
    )
    return PreparedData(train, eval_split, data.metadata, data.directory)


def kto_plan(config: KTOConfig) -> RunPlan:
    """The policy, trained on batch-size examples a micro-batch (dropout only with --dropout), with
    --loss kto's no-grad forward over their mismatched completions (z0's); the reference
    precomputed (the default) or held on the fly (--no-precompute-ref)."""
    return RunPlan(
        "kto",
        (trained_policy(config, dropout=config.dropout),),
        MicroBatch(config.batch_size, config.max_length),
        reference=reference_of(config, config.ref, precomputed=config.precompute_ref),
        no_grad_forwards=(NoGradForward("KL forward (no grad)"),) if uses_kl_forward(config) else (),
    )


def run_kto(config: KTOConfig) -> Path | None:
    """Setup (tokenizer, examples, policy, reference), train with the shared engine, then write OUT (None: --dry-run)."""
    check_options(config)
    plan = kto_plan(config)
    if stop_for_dry_run(plan, config):
        return None
    run = TrainingRun(plan, config)
    set_seed(config.seed)
    tokenizer = run.load_tokenizer()
    data = load_unpaired(run, config, tokenizer)
    check_weights(config, data.metadata["counts"])
    policy = run.load_policy()
    if not plan.main.dropout:
        disable_dropout(policy)
    collate = functools.partial(
        collate_unpaired,
        pad_id=tokenizer.pad_token_id,
        padding_free=config.padding_free,
        capacity=config.row_tokens or None,
    )
    reference, data, described = setup_reference(
        config, run, policy, data, tokenizer, collate, KTO_LOGPS, cache_tag=f"-kto-kl{config.seed}"
    )
    info(f"reference: {described}")
    objective = KTOObjective(config, reference, mean_over_processes(run.accelerator))
    default_lr = 5e-6 if config.lora else 5e-7
    metrics = run.train(
        policy, objective, run.dataset_steps(data.train, collate), default_lr, Evaluation.of(data.eval, collate)
    )
    counts = data.metadata["counts"]
    card = (
        "## Kahneman-Tversky optimisation\n\n"
        f"- loss `{config.loss}`, beta {config.beta}, desirable weight {config.desirable_weight}, undesirable weight {config.undesirable_weight}\n"
        f"- data: {counts['desirable']} desirable and {counts['undesirable']} undesirable examples"
        + (f" (from {counts['from_pairs']} pairs)" if counts.get("from_pairs") else "")
        + f"\n- reference: {described}\n"
        + (f"- final KL estimate z0: {metrics['kl']:.4f}\n" if "kl" in metrics else "")
        + "\n"
    )
    template = (data.metadata.get("template") or {}).get("source")
    return run.finish(tokenizer, chat_template=template, metrics=metrics, data_info=data.metadata, extra_card=card)
