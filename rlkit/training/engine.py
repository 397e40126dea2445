"""The training loop every rlkit trainer runs: setup, train, cleanup.

A trainer hands over an `Objective`: how many loss units a micro-batch holds (tokens for
SFT, pairs for DPO) and the summed loss of a micro-batch. Everything else lives here once:
data order and sharding, gradient accumulation, the optimizer and schedule, clipping,
checkpoints and resume, interruption, NaN detection, evaluation, metrics and progress.
Batches reach the engine one way, from a `StepSource`: `DatasetSteps` cuts them from a data set,
an RL recipe makes them from rollouts of the model being trained (rlkit.training.rollout).

The loss of an optimizer step is the sum over every accumulated micro-batch on every
process divided by the total number of units, so a step means the same thing whatever the
micro-batch size, the accumulation or the number of processes: a 2-process run logs the same
losses as a 1-process run with the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator

from rlkit.console import console, warn
from rlkit.errors import InputError, RunError
from rlkit.hardware import accelerator_available, cpu_bf16_hint, release_freed_host_memory
from rlkit.models.modes import to_device
from rlkit.output import checkpoints_in, resume_hint, writing
from rlkit.training import sharding
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
    """Where each optimizer step's micro-batches come from: the one way batches reach the engine.

    Supervised trainers use `DatasetSteps` (seeded shuffles of a data set); PPO makes them from
    the model being trained (a rollout, then mini-batch updates on it). `batches(step, model)` is
    called at the start of optimizer step `step` (0-based) with the prepared model;
    `step_metrics()` is called after the step and its values are logged as they are (not divided
    by units). `epoch` in the log is `step / steps_per_epoch`. The engine keeps everything else:
    accumulation, clipping, NaN checks, checkpoints, resume, metrics, progress.
    """

    total_steps: int
    steps_per_epoch: int

    def batches(self, step: int, model: torch.nn.Module) -> list[Batch]:
        """This process's micro-batches for optimizer step `step`."""

    def step_metrics(self) -> dict[str, float]:
        """Extra metrics of the step just taken (may be empty)."""


class DatasetSteps:
    """The supervised `StepSource`: each epoch a seeded permutation of the rows, cut into global batches.

    Step k of an epoch takes the k-th global batch of that epoch's permutation, and micro-batch
    a of process r is its slice (a * processes + r), so a step is a pure function of its number
    (resume needs no data-loader state) and the same global batch is seen whatever the split
    between accumulation and processes. Built before the run dir is opened, so too little data is
    refused with nothing written.
    """

    def __init__(
        self,
        dataset: Any,
        collate: Callable[[list[dict[str, Any]]], Batch],
        config: TrainConfig,
        accelerator: Accelerator,
    ):
        self.dataset, self.collate, self.config = dataset, collate, config
        self.world, self.rank, self.device = accelerator.num_processes, accelerator.process_index, accelerator.device
        self.global_batch = config.batch_size * config.grad_accum * self.world
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise InputError(
                f"{len(dataset)} training rows are fewer than one global batch ({self.global_batch} = "
                f"batch-size {config.batch_size} x grad-accum {config.grad_accum} x {self.world} processes); lower them"
            )
        self.total_steps = config.max_steps if config.max_steps else config.epochs * self.steps_per_epoch

    def batches(self, step: int, model: torch.nn.Module) -> list[Batch]:
        c = self.config
        epoch, k = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(c.seed + epoch))
        base, bs = k * self.global_batch, c.batch_size
        batches = []
        for a in range(c.grad_accum):
            start = base + (a * self.world + self.rank) * bs
            rows = self.dataset.select(order[start : start + bs].tolist())
            batches.append(to_device(self.collate(rows), self.device))
        return batches

    def step_metrics(self) -> dict[str, float]:
        return {}


@dataclass
class Evaluation:
    """Held-out rows and how to batch them; evaluated every `--eval-every` steps and at the end."""

    dataset: Any
    collate: Callable[[list[dict[str, Any]]], Batch]

    @classmethod
    def of(cls, dataset: Any | None, collate: Callable[[list[dict[str, Any]]], Batch]) -> Evaluation | None:
        return None if dataset is None else cls(dataset, collate)


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


def shards_itself(config: TrainConfig, accelerator: Accelerator) -> bool:
    """Whether the engine applies FSDP2 itself: `--fsdp` with several processes that accelerate does
    not shard (a torchrun launch on CPUs is MULTI_CPU whatever plugin it is given; GPUs launched
    without an FSDP config are MULTI_GPU). Under accelerate's FSDP or DeepSpeed, they shard."""
    from accelerate.utils import DistributedType

    sharded_by_accelerate = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    return config.fsdp and accelerator.num_processes > 1 and not sharded_by_accelerate


def _deepspeed_batch_sizes(config: TrainConfig, accelerator: Accelerator) -> None:
    """DeepSpeed needs its batch sizes before `prepare`, which reads them from a data loader, and
    the engine hands it none: a DeepSpeed config's `auto` sizes are filled in from the options
    (how accelerate documents it); sizes the config gives itself are kept."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = config.batch_size
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = config.batch_size * config.grad_accum * accelerator.num_processes


def _fused_adam_supported(params: list[torch.Tensor], device: torch.device) -> bool:
    """The fused AdamW kernel (one pass over each tensor instead of a dozen elementwise ops;
    ~2.5x faster optimizer steps on CPU) exists for floating tensors on CPU and CUDA, where
    the model is moved by `prepare` after the optimizer is made."""
    return device.type in ("cpu", "cuda") and all(
        p.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64) for p in params
    )


#: A checkpoint being written lives in `step-NNNNNNN.incomplete` until it is renamed.
_INCOMPLETE = ".incomplete"


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
    """Runs `fit`; one instance per run. `model` (after `fit`) is the prepared, trained model."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator, run_dir: Path, default_lr: float):
        self.config, self.accelerator, self.run_dir = config, accelerator, run_dir
        self.lr = config.lr if config.lr is not None else default_lr
        self.state = TrainerState()
        self.shards_itself = shards_itself(config, accelerator)

    # ---- setup ------------------------------------------------------------------------
    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise RunError("the model has no trainable parameters")
        fused = _fused_adam_supported(params, self.accelerator.device) and not self.shards_itself
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        c = self.config
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_epsilon,
            **({"fused": True} if fused else {}),
        )

    def _prepare(self, model: torch.nn.Module, total: int) -> tuple[torch.nn.Module, Any, Any]:
        """The optimizer and schedule, everything handed to accelerate and registered for checkpoints."""
        c, acc = self.config, self.accelerator
        if self.shards_itself:
            # FSDP2 applied here (accelerate would wrap the model in DDP): the optimizer is built over
            # the sharded parameters, and neither is handed to accelerate, whose checkpoints would
            # hold one process's shards; save_sharded/load_sharded keep them instead.
            model = sharding.shard(model, acc.device)
            local, whole = sharding.local_share(model)
            # every process says what it holds: the proof that the sharding is real
            console.print(
                f"fsdp: process {acc.process_index} of {acc.num_processes} holds {local:,} of {whole:,} parameter elements"
            )
        optimizer = self._optimizer(model)
        warmup = warmup_steps_for(total, c.warmup_steps, c.warmup_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(c.scheduler, total, warmup))
        if not self.shards_itself:
            _deepspeed_batch_sizes(c, acc)
            model, optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(scheduler, self.state)
        return model, optimizer, scheduler

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        """Sum scalar values over processes in one collective."""
        if self.accelerator.num_processes == 1 or not values:
            return values
        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device)
        tensor = self.accelerator.reduce(tensor, reduction="sum")
        return dict(zip(keys, tensor.tolist()))

    # ---- checkpoints --------------------------------------------------------------------
    def _save_checkpoint(self) -> Path:
        """Written beside its final name and renamed when every process has finished writing, so a
        kill or a full disk during a save leaves the previous checkpoints as they were and no
        half-written one (a refused write stays as `step-N.incomplete`, which resume skips; old
        checkpoints are deleted only once the new one is complete)."""
        acc = self.accelerator
        path = self.run_dir / "checkpoints" / f"step-{self.state.step:07d}"
        scratch = path.with_name(path.name + _INCOMPLETE)
        if acc.is_main_process:
            shutil.rmtree(scratch, ignore_errors=True)
        acc.wait_for_everyone()
        with writing("the checkpoint", path, self.run_dir):
            acc.save_state(str(scratch), safe_serialization=False)
            if self.shards_itself:
                sharding.save_sharded(scratch, self.model, self.optimizer)
        acc.wait_for_everyone()
        if acc.is_main_process:
            if path.exists():  # the same step saved again after a resume fell back past it
                shutil.rmtree(path)
            scratch.rename(path)
            for old in checkpoints_in(self.run_dir)[: -max(1, self.config.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return path

    def _resume(self) -> None:
        """Load the newest checkpoint that loads, warning about each one skipped (incomplete or unreadable)."""
        acc = self.accelerator
        if not self.config.resume:
            return
        for scratch in sorted((self.run_dir / "checkpoints").glob(f"step-*{_INCOMPLETE}")):
            warn(f"skipping {scratch}: an incomplete checkpoint (the run stopped while saving it)")
        found = checkpoints_in(self.run_dir)
        for path in reversed(found):
            reason = None
            try:
                acc.load_state(str(path))
                if self.shards_itself:
                    sharding.load_sharded(path, self.model, self.optimizer)
            # a truncated or missing file: torch, pickle and safetensors differ in what they raise
            except Exception as err:
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            # every process resumes from the same checkpoint, so one that fails anywhere is skipped everywhere
            if self._reduce({"failed": float(reason is not None)})["failed"] > 0:
                warn(f"skipping checkpoint {path}: it cannot be read ({reason or 'on another process'})")
                continue
            if acc.is_main_process:
                console.print(f"resuming from {path} (step {self.state.step})")
            return
        if found:
            raise RunError(
                f"none of the {len(found)} checkpoints in {self.run_dir / 'checkpoints'} can be read; "
                "start over with --overwrite"
            )

    # ---- one optimizer step ---------------------------------------------------------------
    def _accumulate_step(
        self, model: torch.nn.Module, objective: Objective, micro: list[Batch]
    ) -> tuple[float, dict[str, float]]:
        """Forward and backward of every micro-batch of a step; returns (all processes' units, this process's sums)."""
        c, acc = self.config, self.accelerator
        units = self._reduce({"w": sum(float(objective.weight(b)) for b in micro)})["w"]
        sums: dict[str, float] = {"loss": 0.0, "tokens": 0.0}
        for i, batch in enumerate(micro):
            # accumulate() skips the gradient all-reduce until the last micro-batch (DDP) and tells
            # DeepSpeed where the step boundary is; backward() divides by grad_accum, which the
            # factor below undoes: the step's loss is sum / units. The backward runs outside
            # autocast (as PyTorch advises): autocast holds a bf16 copy of every weight it cast
            # until its context exits, which with gradient checkpointing would sit on top of the
            # gradients.
            with acc.accumulate(model):
                with acc.autocast():
                    out = objective.loss(model, batch)
                # the forward's dead tensors (autocast copies, chunk temporaries) leave holes the
                # gradients do not fit; trimming here rather than also after the optimizer step
                # gets the same peak with fewer page faults
                release_freed_host_memory(acc.device)
                acc.backward(out.loss * acc.num_processes * c.grad_accum / max(units, 1e-12))
            if i < len(micro) - 1:
                # the next micro-batch's activations would otherwise start on top of this
                # backward's dead temporaries (and set the step's peak)
                release_freed_host_memory(acc.device)
            sums["loss"] += float(out.loss.detach())
            sums["tokens"] += float(batch.get("num_tokens", batch["input_ids"].numel()))
            _accumulate(sums, out)
        return units, sums

    def _check_finite(self, loss: float, grad_norm: float | None, optimizer: Any) -> None:
        """A NaN/inf loss or gradient stops the run before the optimizer applies it."""
        if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
            return
        optimizer.zero_grad(set_to_none=True)
        raise RunError(
            f"the loss became {loss} at step {self.state.step + 1} (grad norm {grad_norm}); "
            f"lower --lr, check the data, or use --precision fp32, then {resume_hint(self.run_dir)}"
        )

    def _after_step(
        self,
        model: torch.nn.Module,
        objective: Objective,
        evaluation: Evaluation | None,
        sink: MetricsSink | None,
        display: ProgressDisplay,
        last: dict[str, Any],
        total: int,
        stop: _StopRequest,
    ) -> None:
        """Evaluate, log, save and stop when asked, in that order (a saved step's metrics are logged)."""
        c, step = self.config, self.state.step
        if evaluation is not None and c.eval_every and step % c.eval_every == 0 and step < total:
            last.update(self._evaluate(model, objective, evaluation))
        if sink is not None:
            sink.log(step, last)
        display.update(step, last)
        if c.save_every and step % c.save_every == 0 and step < total:
            self._save_checkpoint()
        if self._reduce({"stop": float(stop.requested)})["stop"] > 0:
            path = self._save_checkpoint()
            raise RunError(
                f"interrupted at step {step}; checkpoint saved in {path}; run again with --resume to continue"
            )

    def _evaluate(self, model: torch.nn.Module, objective: Objective, evaluation: Evaluation) -> dict[str, float]:
        """Every process runs the same number of forwards (DDP/FSDP need it); extras count zero."""
        model.eval()
        dataset, acc = evaluation.dataset, self.accelerator
        bs, world, rank = self.config.batch_size, acc.num_processes, acc.process_index
        starts = list(range(0, len(dataset), bs))
        rounds = math.ceil(len(starts) / world)
        sums: dict[str, float] = {"weight": 0.0, "loss": 0.0}
        with torch.no_grad():
            for r in range(rounds):
                i = r * world + rank
                real = i < len(starts)
                start = starts[i] if real else 0
                rows = dataset.select(range(start, min(start + bs, len(dataset))))
                batch = to_device(evaluation.collate(rows), acc.device)
                with acc.autocast():
                    out = objective.loss(model, batch)
                if real:
                    sums["weight"] += float(objective.weight(batch))
                    sums["loss"] += float(out.loss)
                    _accumulate(sums, out)
        model.train()
        sums = self._reduce(sums)
        weight = sums.pop("weight")
        return {f"eval/{k}": v for k, v in _means(sums, weight, objective).items()}

    # ---- the loop ---------------------------------------------------------------------
    def fit(
        self,
        model: torch.nn.Module,
        objective: Objective,
        source: StepSource,
        evaluation: Evaluation | None,
        sink: MetricsSink | None,
    ) -> dict[str, Any]:
        """Train `model` (not yet prepared) in place on the steps of `source`; returns the final metrics."""
        c, acc = self.config, self.accelerator
        total = source.total_steps
        model, optimizer, scheduler = self._prepare(model, total)
        self.model, self.optimizer = model, optimizer  # what checkpoints of a self-sharded run hold
        self._resume()
        params = [p for p in model.parameters() if p.requires_grad]
        display = ProgressDisplay(total, self.state.step, c.log_every, acc.is_main_process)
        model.train()
        last: dict[str, Any] = {}
        started, tokens_at_start = time.time(), self.state.tokens
        try:
            with _StopRequest() as stop:
                while self.state.step < total:
                    t0 = time.time()
                    micro = source.batches(self.state.step, model)
                    units, sums = self._accumulate_step(model, objective, micro)
                    grad_norm = acc.clip_grad_norm_(params, c.max_grad_norm if c.max_grad_norm > 0 else float("inf"))
                    grad_norm = sharding.total_norm(grad_norm)
                    sums = self._reduce(sums)
                    grad_norm = None if grad_norm is None else float(grad_norm)  # DeepSpeed does not report it
                    self._check_finite(sums["loss"], grad_norm, optimizer)
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
                        "epoch": round(self.state.step / source.steps_per_epoch, 4),
                        **_means({k: v for k, v in sums.items() if k != "tokens"}, units, objective),
                        "step_time_s": elapsed,
                        **source.step_metrics(),
                    }
                    self._after_step(model, objective, evaluation, sink, display, last, total, stop)
        finally:
            display.close()
        final = dict(last)
        if evaluation is not None:
            final.update(self._evaluate(model, objective, evaluation))
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
