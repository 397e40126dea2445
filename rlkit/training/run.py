"""Setup and cleanup shared by every trainer (torchtune's recipe shape: setup / train / cleanup).

A trainer module computes its RunPlan (rlkit.training.run_plan), stops there under `--dry-run`
(`stop_for_dry_run`), then builds its data and objective; `TrainingRun` does the rest the same
way for all of them: refuse a bad output dir before any work, load the model (LoRA or full), run
the engine in OUT.partial, then save weights + tokenizer + config + card and rename to OUT.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from rlkit.config import config_to_dict
from rlkit.console import info
from rlkit.errors import InputError
from rlkit.models.attention import use_fp32_attention_backward
from rlkit.models.lean_blocks import lora_inputs_uncast_under_autocast, use_lean_blocks
from rlkit.models.load import (
    add_lora,
    drop_frozen_adapters,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_tokenizer,
    resolve_source,
)
from rlkit.output import (
    METRICS_FILE,
    check_output,
    finalize,
    open_run_dir,
    partial_dir,
    write_config,
    write_model_card,
    writing,
)
from rlkit.training.engine import (
    DatasetSteps,
    Engine,
    Evaluation,
    Objective,
    StepSource,
    make_accelerator,
    precision_hint,
)
from rlkit.training.metrics import MetricsSink
from rlkit.training.options import TrainConfig
from rlkit.training.plots import plot_training_curves
from rlkit.training.run_plan import RunPlan
from rlkit.training.sharding import gather_deepspeed_in_place, gather_in_place, is_sharded


def prepare_for_training(model: torch.nn.Module, config: TrainConfig, label: str) -> torch.nn.Module:
    """Last setup every trained model shares: lean norm/MLP backward passes and LoRA inputs saved once
    (rlkit.models.lean_blocks), the fp32 attention backward on CPU (rlkit.models.attention),
    optional checkpointing, and a line saying what trains.

    `label` opens the line, e.g. "model: NAME (LoRA"; the parameter counts close it.
    """
    use_lean_blocks(model)
    lora_inputs_uncast_under_autocast(model)
    use_fp32_attention_backward(model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    info(f"{label}; {trainable:,} of {total:,} parameters trainable)")
    hint = precision_hint(config)
    if hint:
        info(hint)
    return model


def stop_for_dry_run(plan: RunPlan, config: TrainConfig) -> bool:
    """Under `--dry-run`, show `plan`'s memory on stderr and answer True: the recipe returns there.

    Every recipe calls it between its option checks and its `TrainingRun`, with the plan its setup
    then reads, so the plan shown is the run's own; nothing is loaded or written yet (no OUT, no
    OUT.partial, no lock), and the command ends with exit 0 and nothing on stdout.
    """
    if not config.dry_run:
        return False
    from rlkit.training.memory_plan import show_plan

    show_plan(plan, config)
    return True


class TrainingRun:
    def __init__(self, plan: RunPlan, config: TrainConfig):
        """`plan`: the recipe's RunPlan (the model trained is its first; the data, `config.data`).
        Every recipe computes it first and stops at `stop_for_dry_run` under --dry-run, so a
        TrainingRun is only made for a run that trains."""
        self.plan, self.command = plan, plan.command
        model_name = plan.main.source
        self.config = config
        self.data: list[str] = list(getattr(config, "data", []))
        self.output = check_output(config.output, config.overwrite, config.resume)
        self.accelerator = make_accelerator(config)
        self.source = resolve_source(model_name or "")
        self.model: torch.nn.Module | None = None
        self.run_dir: Path | None = None

    @property
    def weights_dtype(self) -> torch.dtype:
        """Frozen LoRA bases can live in bf16; trained full weights stay fp32 under autocast."""
        return torch.bfloat16 if self.accelerator.mixed_precision == "bf16" and self.config.lora else torch.float32

    @property
    def compute_dtype_4bit(self) -> torch.dtype | None:
        """The compute dtype of a `--load-in-4bit` base (None without it): --bnb-compute-dtype, or --precision's."""
        if not self.config.load_in_4bit:
            return None
        name = self.config.bnb_compute_dtype
        if name == "auto":
            name = {"bf16": "bf16", "fp16": "fp16"}.get(str(self.accelerator.mixed_precision), "fp32")
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]

    def load_tokenizer(self) -> Any:
        return load_tokenizer(self.source, self.config.trust_remote_code)

    def load_policy(self) -> torch.nn.Module:
        c = self.config
        # a 4-bit base is quantized from float32 (merge-lora --dequantize does the same) and keeps
        # its other weights in float32 anyway (prepare_model_for_kbit_training)
        dtype = torch.float32 if c.load_in_4bit else self.weights_dtype
        model = load_causal_lm(self.source, dtype, c.trust_remote_code, self.compute_dtype_4bit)
        if c.lora:
            model = add_lora(model, c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_targets)
            # The adapter must name a base that `rlkit`/peft can load again (the .gguf file itself;
            # for a continued adapter, its .gguf base, not the adapter dir it was continued from).
            if self.source.gguf_file:
                gguf = (
                    str(Path(self.source.path) / self.source.gguf_file) if self.source.adapter_dir else self.source.name
                )
                for peft_config in model.peft_config.values():
                    peft_config.base_model_name_or_path = gguf
        elif self.source.adapter_dir:
            model = model.merge_and_unload()
        kind = "LoRA" if not c.load_in_4bit else f"QLoRA: NF4 base computing in {str(self.compute_dtype_4bit)[6:]}"
        return prepare_for_training(model, c, f"model: {self.source.name} ({kind if c.lora else 'full'}")

    def dataset_steps(self, train: Any, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> DatasetSteps:
        """The supervised step source over `train` (refuses too few rows before anything is written)."""
        return DatasetSteps(train, collate, self.config, self.accelerator)

    def train(
        self,
        model: torch.nn.Module,
        objective: Objective,
        source: StepSource,
        default_lr: float,
        evaluation: Evaluation | None = None,
        engine_config: TrainConfig | None = None,
    ) -> dict[str, Any]:
        """Run the engine in OUT.partial on the steps of `source`.

        `engine_config`: the config the engine runs with when its steps are not the command's (PPO
        counts PPO steps, the engine updates). An input error raised once the run dir exists (a
        missing metrics backend, a source that refuses its data) removes the dir this call made,
        so a refused run leaves nothing behind; a resumed run's dir is kept.
        """
        acc = self.accelerator
        partial = partial_dir(self.output)
        made_here = not (self.config.resume and partial.exists())
        if acc.is_main_process:
            open_run_dir(self.output, self.config.resume)
            write_config(partial, self.command, config_to_dict(self.config))
        acc.wait_for_everyone()
        self.run_dir = partial
        try:
            metrics, self.model = self._fit(model, objective, source, evaluation, default_lr, engine_config)
        except InputError:
            if made_here and acc.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            self.run_dir = None
            raise
        return metrics

    def _fit(
        self,
        model: torch.nn.Module,
        objective: Objective,
        source: StepSource,
        evaluation: Evaluation | None,
        default_lr: float,
        engine_config: TrainConfig | None,
    ) -> tuple[dict[str, Any], torch.nn.Module]:
        assert self.run_dir is not None
        acc, c = self.accelerator, self.config
        sink = (
            MetricsSink(self.run_dir / METRICS_FILE, c.report_to, self.output.name, config_to_dict(c))
            if acc.is_main_process
            else None
        )
        engine = Engine(engine_config or c, acc, self.run_dir, default_lr)
        try:
            metrics = engine.fit(model, objective, source, evaluation, sink)
        finally:
            if sink is not None:
                sink.close()
        return metrics, engine.model

    def finish(
        self,
        tokenizer: Any,
        chat_template: str | None,
        metrics: dict[str, Any],
        data_info: dict[str, Any] | None = None,
        extra_card: str = "",
    ) -> Path:
        """Write the finished result on the main process; every process returns OUT."""
        acc = self.accelerator
        acc.wait_for_everyone()
        assert self.model is not None
        if acc.distributed_type == DistributedType.DEEPSPEED:
            # ZeRO-3's modules hold empty placeholders: gathered by accelerate, every process taking part
            gather_deepspeed_in_place(acc, self.model)
        elif is_sharded(self.model):
            # a sharded model's own state_dict() holds one process's shard (how FSDP saves end up
            # with zero-size or partial tensors): gathered first, every process taking part
            gather_in_place(self.model, acc.is_main_process)
        if acc.is_main_process:
            assert self.run_dir is not None
            model = acc.unwrap_model(self.model)
            drop_frozen_adapters(model)  # training is over: OUT holds the trained adapter alone
            if chat_template:
                tokenizer.chat_template = chat_template
            with writing("the model in", self.run_dir, self.run_dir):
                model.save_pretrained(str(self.run_dir), safe_serialization=True)
                tokenizer.save_pretrained(str(self.run_dir))
            if data_info:
                counts = data_info.get("counts", {})
                extra_card = "## Data\n\n" + "\n".join(f"- {k}: {v}" for k, v in counts.items()) + "\n\n" + extra_card
            if plot_training_curves(
                self.run_dir / METRICS_FILE,
                self.run_dir / "training_curves.png",
                f"rlkit {self.command}: {self.output.name}",
            ):
                extra_card += "\n![training curves](training_curves.png)\n"
            write_model_card(
                self.run_dir,
                command=self.command,
                base_model=self.source.name,
                data=self.data,
                metrics=metrics,
                extra=extra_card,
            )
            finalize(self.run_dir, self.output)
        acc.wait_for_everyone()
        return self.output
