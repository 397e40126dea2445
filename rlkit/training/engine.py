"""The training loop every rlkit trainer runs: setup, train, cleanup.

A trainer hands over an `Objective`: how many loss units a micro-batch holds (tokens for
SFT, pairs for DPO) and the summed loss of a micro-batch. Everything else lives here once:
data order and sharding, gradient accumulation, the optimizer and schedule, clipping,
checkpoints and resume, interruption, NaN detection, evaluation, metrics and progress.

The loss of an optimizer step is the sum over every accumulated micro-batch on every
process divided by the total number of units, so a step means the same thing whatever the
micro-batch size, the accumulation or the number of processes: a 2-process run logs the same
losses as a 1-process run with the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator

from rlkit.errors import InputError, RunError
from rlkit.hardware import accelerator_available, cpu_bf16_hint, release_freed_host_memory
from rlkit.models.modes import to_device
from rlkit.training.metrics import MetricsSink, ProgressDisplay
from rlkit.training.options import TrainConfig
from rlkit.training.schedule import lr_multiplier, warmup_steps_for

Batch = dict[str, Any]


@dataclass
class StepOutput:
    """`loss` and every metric are sums over the micro-batch's units, not means.

    A metric that averages over a subset of the units instead (KTO's rewards of desirable
    examples only) gives its own count in `counts` under the same name; the engine then
    divides the step's summed metric by the step's summed count, and logs nothing for a
    step where that count is zero.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(Protocol):
    """What a trainer gives the engine. It may also define `derived_metrics(means) -> dict`,
    metrics computed from a step's (or an evaluation's) averaged ones, e.g. a margin."""

    def weight(self, batch: Batch) -> float:
        """Number of loss units in the micro-batch (known before the forward pass)."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> StepOutput:
        """Summed loss (and metric sums) of the micro-batch."""


_COUNT = "count::"


def _accumulate(sums: dict[str, float], out: StepOutput) -> None:
    for key, value in out.metrics.items():
        sums[key] = sums.get(key, 0.0) + float(value)
    for key, value in out.counts.items():
        sums[_COUNT + key] = sums.get(_COUNT + key, 0.0) + float(value)


def _means(sums: dict[str, float], units: float, objective: Objective) -> dict[str, float]:
    """Summed metrics to means: per unit, or per their own count (see StepOutput)."""
    means = {}
    for key, value in sums.items():
        if key.startswith(_COUNT):
            continue
        count = sums.get(_COUNT + key, None)
        if count is None:
            means[key] = value / max(units, 1e-12)
        elif count > 0:
            means[key] = value / count
    derive = getattr(objective, "derived_metrics", None)
    return {**means, **(derive(means) if derive else {})}


class StepSource(Protocol):
    """Makes each optimizer step's micro-batches itself, instead of the engine cutting them from data.

    For loops whose data is produced by the model being trained (PPO: a rollout, then several
    epochs of mini-batch updates on it). `batches(step, model)` is called at the start of
    optimizer step `step` (0-based) with the prepared model; `step_metrics()` is called after the
    step and its values are logged as they are (not divided by units). The engine keeps
    everything else: accumulation, clipping, NaN checks, checkpoints, resume, metrics, progress.
    """

    total_steps: int

    def batches(self, step: int, model: torch.nn.Module) -> list[Batch]:
        """This process's micro-batches for optimizer step `step`."""

    def step_metrics(self) -> dict[str, float]:
        """Extra metrics of the step just taken (may be empty)."""


class TrainerState:
    """What, beyond model/optimizer/schedule/RNG, a checkpoint must hold to resume exactly."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])


def precision_hint(config: TrainConfig) -> str | None:
    """A line for training runs left at `--precision auto` (fp32) on a bf16-capable CPU."""
    return (
        cpu_bf16_hint("--precision bf16", "trained SmolLM2-135M 1.4-1.6x faster")
        if config.precision == "auto"
        else None
    )


def make_accelerator(config: TrainConfig) -> Accelerator:
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    # Without an accelerator, accelerate only sets up gloo for a torchrun launch when told cpu=True.
    has_device = accelerator_available()
    return Accelerator(
        mixed_precision={"fp32": "no"}.get(precision, precision),
        cpu=not has_device,
        gradient_accumulation_steps=config.grad_accum,
    )


def _fused_adam_supported(params: list[torch.Tensor], device: torch.device) -> bool:
    """The fused AdamW kernel (one pass over each tensor instead of a dozen elementwise ops;
    ~2.5x faster optimizer steps on CPU) exists for floating tensors on CPU and CUDA, where
    the model is moved by `prepare` after the optimizer is made."""
    return device.type in ("cpu", "cuda") and all(
        p.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64) for p in params
    )


def checkpoints_in(run_dir: Path) -> list[Path]:
    found = [p for p in (run_dir / "checkpoints").glob("step-*") if re.fullmatch(r"step-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to checkpoint and leave at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        def handler(signum: int, _frame: Any) -> None:
            self.requested = True
            signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))  # a second Ctrl-C kills

        with contextlib.suppress(ValueError):  # not in the main thread: no signal handling
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self.previous.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, previous)


class Engine:
    def __init__(
        self,
        config: TrainConfig,
        accelerator: Accelerator,
        run_dir: Path,
        collate: Callable[[list[dict[str, Any]]], Batch],
        default_lr: float,
    ):
        self.config, self.accelerator, self.run_dir, self.collate = config, accelerator, run_dir, collate
        self.lr = config.lr if config.lr is not None else default_lr
        self.state = TrainerState()

    # ---- data order -------------------------------------------------------------------
    def _global_batch(self) -> int:
        return self.config.batch_size * self.config.grad_accum * self.accelerator.num_processes

    def _micro_batches(self, dataset: Any, step: int, steps_per_epoch: int) -> list[Batch]:
        """This process's micro-batches for optimizer step `step`, a pure function of the step.

        Each epoch is a seeded permutation; step k takes the k-th global batch of it, and
        micro-batch a of process r is its slice (a * processes + r), so the same global batch
        is seen whatever the split between accumulation and processes.
        """
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.config.seed + epoch))
        base, bs = k * self._global_batch(), self.config.batch_size
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        batches = []
        for a in range(self.config.grad_accum):
            start = base + (a * world + rank) * bs
            batches.append(self._to_device(self.collate(dataset.select(order[start : start + bs].tolist()))))
        return batches

    def _to_device(self, batch: Batch) -> Batch:
        return to_device(batch, self.accelerator.device)

    # ---- the loop ---------------------------------------------------------------------
    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise RunError("the model has no trainable parameters")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        c = self.config
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_epsilon,
            **({"fused": True} if _fused_adam_supported(params, self.accelerator.device) else {}),
        )

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        """Sum scalar values over processes in one collective."""
        if self.accelerator.num_processes == 1 or not values:
            return values
        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device)
        tensor = self.accelerator.reduce(tensor, reduction="sum")
        return dict(zip(keys, tensor.tolist()))

    def _save_checkpoint(self) -> Path:
        path = self.run_dir / "checkpoints" / f"step-{self.state.step:07d}"
        self.accelerator.save_state(str(path), safe_serialization=False)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            for old in checkpoints_in(self.run_dir)[: -max(1, self.config.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def _evaluate(self, model: torch.nn.Module, objective: Objective, dataset: Any) -> dict[str, float]:
        """Every process runs the same number of forwards (DDP/FSDP need it); extras count zero."""
        model.eval()
        bs, world, rank = self.config.batch_size, self.accelerator.num_processes, self.accelerator.process_index
        starts = list(range(0, len(dataset), bs))
        rounds = math.ceil(len(starts) / world)
        sums: dict[str, float] = {"weight": 0.0, "loss": 0.0}
        with torch.no_grad():
            for r in range(rounds):
                i = r * world + rank
                real = i < len(starts)
                start = starts[i] if real else 0
                batch = self._to_device(self.collate(dataset.select(range(start, min(start + bs, len(dataset))))))
                with self.accelerator.autocast():
                    out = objective.loss(model, batch)
                if real:
                    sums["weight"] += float(objective.weight(batch))
                    sums["loss"] += float(out.loss)
                    _accumulate(sums, out)
        model.train()
        sums = self._reduce(sums)
        weight = sums.pop("weight")
        return {f"eval/{k}": v for k, v in _means(sums, weight, objective).items()}

    def fit(
        self,
        model: torch.nn.Module,
        objective: Objective,
        train: Any,
        eval_data: Any | None,
        sink: MetricsSink | None,
        source: StepSource | None = None,
    ) -> dict[str, Any]:
        """Train `model` in place; returns the final metrics. `model` is not yet prepared.

        With a `source`, it makes the micro-batches of every step and `train` is unused.
        """
        c, acc = self.config, self.accelerator
        steps_per_epoch = source.total_steps if source is not None else len(train) // self._global_batch()
        if source is None and steps_per_epoch == 0:
            raise InputError(
                f"{len(train)} training rows are fewer than one global batch ({self._global_batch()} = "
                f"batch-size {c.batch_size} x grad-accum {c.grad_accum} x {acc.num_processes} processes); lower them"
            )
        total = (
            source.total_steps if source is not None else (c.max_steps if c.max_steps else c.epochs * steps_per_epoch)
        )
        optimizer = self._optimizer(model)
        warmup = warmup_steps_for(total, c.warmup_steps, c.warmup_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(c.scheduler, total, warmup))
        model, optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(scheduler, self.state)
        if c.resume and checkpoints_in(self.run_dir):
            latest = checkpoints_in(self.run_dir)[-1]
            acc.load_state(str(latest))
            if acc.is_main_process:
                from rlkit.console import console

                console.print(f"resuming from {latest} (step {self.state.step})")
        params = [p for p in model.parameters() if p.requires_grad]
        display = ProgressDisplay(total, self.state.step, c.log_every, acc.is_main_process)
        model.train()
        last: dict[str, Any] = {}
        started, tokens_at_start = time.time(), self.state.tokens
        try:
            with _StopRequest() as stop:
                while self.state.step < total:
                    t0 = time.time()
                    if source is not None:
                        micro = source.batches(self.state.step, model)
                        release_freed_host_memory(acc.device)  # the rollout's KV caches and logits
                    else:
                        micro = self._micro_batches(train, self.state.step, steps_per_epoch)
                    units = self._reduce({"w": sum(float(objective.weight(b)) for b in micro)})["w"]
                    sums: dict[str, float] = {"loss": 0.0, "tokens": 0.0}
                    for i, batch in enumerate(micro):
                        # accumulate() skips the gradient all-reduce until the last micro-batch (DDP)
                        # and tells DeepSpeed where the step boundary is; backward() divides by
                        # grad_accum, which the factor below undoes: the step's loss is sum / units.
                        # The backward runs outside autocast (as PyTorch advises): autocast holds a
                        # bf16 copy of every weight it cast until its context exits, which with
                        # gradient checkpointing would sit on top of the gradients (0.25 GiB for
                        # SmolLM2-135M, 7% of a DPO run's peak RSS).
                        with acc.accumulate(model):
                            with acc.autocast():
                                out = objective.loss(model, batch)
                            # the forward's dead tensors (autocast copies, chunk temporaries) leave
                            # holes the gradients do not fit; trimming here rather than also after
                            # the optimizer step gets the same peak with 40% fewer page faults
                            release_freed_host_memory(acc.device)
                            acc.backward(out.loss * acc.num_processes * c.grad_accum / max(units, 1e-12))
                        if i < len(micro) - 1:
                            # the next micro-batch's activations would otherwise start on top of
                            # this backward's dead temporaries (SmolLM2 LoRA PPO, bf16: its forward
                            # began ~0.4 GiB higher than the first one's, and set the step's peak)
                            release_freed_host_memory(acc.device)
                        sums["loss"] += float(out.loss.detach())
                        sums["tokens"] += float(batch.get("num_tokens", batch["input_ids"].numel()))
                        _accumulate(sums, out)
                    grad_norm = acc.clip_grad_norm_(params, c.max_grad_norm if c.max_grad_norm > 0 else float("inf"))
                    sums = self._reduce(sums)
                    grad_norm = None if grad_norm is None else float(grad_norm)  # DeepSpeed does not report it
                    if not math.isfinite(sums["loss"]) or (grad_norm is not None and not math.isfinite(grad_norm)):
                        optimizer.zero_grad(set_to_none=True)
                        kept = checkpoints_in(self.run_dir)
                        where = f"; the last good checkpoint is {kept[-1]} (--resume)" if kept else ""
                        raise RunError(
                            f"the loss became {sums['loss']} at step {self.state.step + 1} (grad norm {grad_norm}); "
                            f"lower --lr, check the data, or use --precision fp32{where}"
                        )
                    lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    self.state.step += 1
                    self.state.tokens += int(sums["tokens"])
                    elapsed = time.time() - t0
                    last = {
                        "loss": sums.pop("loss") / max(units, 1e-12),
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": sums["tokens"] / max(elapsed, 1e-9),
                        "epoch": round(self.state.step / steps_per_epoch, 4),
                        **_means({k: v for k, v in sums.items() if k != "tokens"}, units, objective),
                        "step_time_s": elapsed,
                    }
                    if source is not None:
                        last.update(source.step_metrics())
                    if (
                        eval_data is not None
                        and c.eval_every
                        and self.state.step % c.eval_every == 0
                        and self.state.step < total
                    ):
                        last.update(self._evaluate(model, objective, eval_data))
                    if sink is not None:
                        sink.log(self.state.step, last)
                    display.update(self.state.step, last)
                    if c.save_every and self.state.step % c.save_every == 0 and self.state.step < total:
                        self._save_checkpoint()
                    if self._reduce({"stop": float(stop.requested)})["stop"] > 0:
                        path = self._save_checkpoint()
                        raise RunError(
                            f"interrupted at step {self.state.step}; checkpoint saved in {path}; run again with --resume to continue"
                        )
        finally:
            display.close()
        final = dict(last)
        if eval_data is not None:
            final.update(self._evaluate(model, objective, eval_data))
            if sink is not None:
                sink.log(self.state.step, {k: v for k, v in final.items() if k.startswith("eval/")})
        wall = time.time() - started
        final.update(
            {
                "steps": self.state.step,
                "train_tokens": self.state.tokens,
                "train_time_s": round(wall, 2),
                "mean_tokens_per_s": round((self.state.tokens - tokens_at_start) / max(wall, 1e-9), 1),
            }
        )
        self.model = model
        return final
