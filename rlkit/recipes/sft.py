"""Supervised fine-tuning: the batch-to-loss step, and the setup / train / cleanup recipe."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from rlkit.console import info
from rlkit.data.collate import collate_rows
from rlkit.data.prepare import DataOptions, prepare_sft_data
from rlkit.data.tokenize import IGNORE
from rlkit.recipes.sft_config import SFTConfig
from rlkit.training.engine import Evaluation, StepOutput
from rlkit.training.logprobs import label_logprobs
from rlkit.training.run import TrainingRun, stop_for_dry_run
from rlkit.training.run_plan import MicroBatch, RunPlan, trained_policy


class SFTObjective:
    """Token-level cross-entropy; the engine divides the sum by the trainable tokens of the step."""

    def weight(self, batch: dict[str, Any]) -> float:
        return float((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        logps, _ = label_logprobs(model, batch["input_ids"], batch["position_ids"], batch["labels"])
        return StepOutput(loss=-logps.sum())


def sft_plan(config: SFTConfig) -> RunPlan:
    """The policy, trained (LoRA or full) on micro-batches of batch-size rows of max-length tokens."""
    return RunPlan("sft", (trained_policy(config, dropout=True),), MicroBatch(config.batch_size, config.max_length))


def run_sft(config: SFTConfig) -> Path | None:
    """Setup (tokenizer, data, model), train with the shared engine, then write OUT (None: --dry-run)."""
    plan = sft_plan(config)
    if stop_for_dry_run(plan, config):
        return None
    run = TrainingRun(plan, config)
    set_seed(config.seed)
    tokenizer = run.load_tokenizer()
    opts = DataOptions.of(config)
    with run.accelerator.main_process_first():
        data = prepare_sft_data(opts, tokenizer, config.model)
    counts = data.metadata["counts"]
    info(
        f"data: {counts['examples']} examples, {counts['tokens']:,} tokens ({counts['trainable_tokens']:,} trainable), "
        f"{counts['truncated']} truncated, {counts['dropped']} dropped -> {counts['rows']} rows"
        + (f" (packed, fill {data.metadata['fill_ratio']:.1%})" if data.metadata["packing"] else "")
    )
    model = run.load_policy()
    collate = functools.partial(collate_rows, pad_id=tokenizer.pad_token_id)
    default_lr = 2e-4 if config.lora else 2e-5
    metrics = run.train(
        model, SFTObjective(), run.dataset_steps(data.train, collate), default_lr, Evaluation.of(data.eval, collate)
    )
    template = (data.metadata.get("template") or {}).get("source")
    return run.finish(tokenizer, chat_template=template, metrics=metrics, data_info=data.metadata)
