"""Reward models: one score per sequence, trained with the Bradley-Terry loss on pairs.

The model is `AutoModelForSequenceClassification` with `num_labels=1` and `pad_token_id`
set in its config: transformers' head reads the score at the last token that is not padding,
and without a pad id it cannot find it (batches fail, or scores land on padding and accuracy
collapses). With LoRA, peft's SEQ_CLS task puts the new score head in `modules_to_save`, so
it is trained in full next to the adapter.

What the engine trains is `rlkit.scoring.RewardScorer`, the one scorer: it reads each
padding-free pair sequence's score at its last non-pad token (why, there), and `ppo` and
`eval` score completions with it, tokenised by the same `rlkit.data.pairs` code, so a reward
model scores in use exactly what it scored on its eval split here.

The output is a full sequence-classification dir by default (LoRA merged), which
`AutoModelForSequenceClassification.from_pretrained(OUT)` loads as is, score head, one label and
pad id included: a reward model is consumed as a scorer (PPO, eval), and an adapter cannot
carry the head's config. `--no-merge` writes the adapter (score head inside) instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from rlkit.console import warn
from rlkit.errors import InputError
from rlkit.losses.preference import implicit_reward_accuracy
from rlkit.losses.reward import bradley_terry_loss
from rlkit.models.load import add_lora, load_causal_lm
from rlkit.models.modes import disable_dropout, model_device, to_device
from rlkit.preference.pair_training import load_pairs, pair_collate
from rlkit.recipes.reward_model_config import RewardModelConfig
from rlkit.scoring import RewardScorer, classifier_from_pretrained
from rlkit.training.engine import Evaluation, StepOutput
from rlkit.training.run import TrainingRun, prepare_for_training, stop_for_dry_run
from rlkit.training.run_plan import MicroBatch, RunPlan, trained_policy


class RewardObjective:
    """Bradley-Terry loss per pair (minus its margin, plus the centring term); sums for the engine."""

    def __init__(self, center_rewards: float):
        self.center_rewards = center_rewards

    def weight(self, batch: dict[str, Any]) -> float:
        return float(batch["num_pairs"])

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        batch = to_device(batch, model_device(model))
        pairs = int(batch["num_pairs"])
        scores = model(batch["input_ids"], batch["position_ids"], batch["seq_index"], 2 * pairs)
        chosen, rejected = scores[:pairs], scores[pairs:]
        margin = batch["margin"].to(scores.dtype) if "margin" in batch else None
        losses = bradley_terry_loss(chosen, rejected, margin, self.center_rewards)
        chosen, rejected = chosen.detach(), rejected.detach()
        metrics = {
            "accuracy": implicit_reward_accuracy(chosen, rejected).sum(),
            "margin": (chosen - rejected).sum(),
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
        }
        return StepOutput(loss=losses.sum(), metrics=metrics)


def load_reward_model(run: TrainingRun, tokenizer: Any) -> torch.nn.Module:
    """A one-score sequence classifier from MODEL, LoRA-wrapped (score head trained) or full."""
    c, source = run.config, run.source
    dtype = run.weights_dtype
    model = classifier_from_pretrained(source, tokenizer.pad_token_id, dtype, c.trust_remote_code, num_labels=1)
    if source.adapter_dir:  # an SFT adapter: its trunk, merged, under the new head
        causal = load_causal_lm(source, dtype, c.trust_remote_code).merge_and_unload()
        trunk = getattr(model, model.base_model_prefix)
        trunk.load_state_dict(getattr(causal, causal.base_model_prefix).state_dict())
        del causal
    if c.lora:
        model = add_lora(model, c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_targets, task_type="SEQ_CLS")
        for param in model.parameters():  # the score head copy may sit in the frozen base's bf16
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    return prepare_for_training(model, c, f"reward model: {source.name} ({'LoRA + score head' if c.lora else 'full'}")


def reward_model_plan(config: RewardModelConfig) -> RunPlan:
    """MODEL as a one-score classifier, trained (LoRA + score head, or full) on both sides of each
    pair in one forward; dropout only with --dropout."""
    model = trained_policy(config, dropout=config.dropout, role="reward model", classifier=True)
    return RunPlan("train-rm", (model,), MicroBatch(config.batch_size, config.max_length, sides=2))


def run_train_rm(config: RewardModelConfig) -> Path | None:
    """Setup (tokenizer, pairs, model), train with the shared engine, then write OUT (None: --dry-run)."""
    if config.center_rewards < 0:
        raise InputError(f"--center-rewards {config.center_rewards}: must be >= 0")
    if config.load_in_4bit:
        raise InputError(
            "train-rm --load-in-4bit is not supported: the reward model is written merged, and merging into 4-bit "
            "weights would round the update away; train it with --lora on the full-precision model"
        )
    plan = reward_model_plan(config)
    if stop_for_dry_run(plan, config):
        return None
    run = TrainingRun(plan, config)
    set_seed(config.seed)
    tokenizer = run.load_tokenizer()
    data = load_pairs(run, config, tokenizer, config.model or "")
    merge = config.merge
    if config.lora and run.source.adapter_dir and not merge:
        warn(
            "MODEL is an adapter dir: its base alone is not the reward model's trunk, so the LoRA reward model is written merged"
        )
        merge = True
    model = load_reward_model(run, tokenizer)
    if not plan.main.dropout:
        disable_dropout(model)
    scorer = RewardScorer(model, tokenizer.pad_token_id, merge=merge)
    default_lr = 1e-4 if config.lora else 1e-5
    collate = pair_collate(config, tokenizer)
    steps, evaluation = run.dataset_steps(data.train, collate), Evaluation.of(data.eval, collate)
    metrics = run.train(scorer, RewardObjective(config.center_rewards), steps, default_lr, evaluation)
    card = "## Reward model\n\n- one score per sequence, read at its last non-pad token (Bradley-Terry loss"
    card += (f", centring {config.center_rewards}" if config.center_rewards else "") + ")\n"
    if "eval/accuracy" in metrics:
        card += f"- held-out pair accuracy: {metrics['eval/accuracy']:.4f} ({data.metadata['counts'].get('eval_pairs', 0)} pairs)\n"
    template = (data.metadata.get("template") or {}).get("source")
    return run.finish(
        tokenizer, chat_template=template, metrics=metrics, data_info=data.metadata, extra_card=card + "\n"
    )
