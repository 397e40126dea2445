"""The engine's `StepSource` for on-policy RL: a thin adapter from a recipe's rollout to optimizer steps.

One RL step = one rollout (the recipe's `collect`, stages over typed records:
`rlkit.training.rollout`) followed by `epochs` passes over it in `mini_batches` shuffled
mini-batches, each pass's mini-batch one engine step (one optimizer update, itself accumulated
over `--grad-accum` micro-batches). The engine keeps accumulation, clipping, NaN checks, SIGTERM,
checkpoints and `--resume`: a run resumed in the middle of an RL step collects a fresh rollout
for that step's remaining updates (checkpoints taken every N RL steps fall on step boundaries,
where resuming is exact).

A recipe plugs in with an `OnPolicyAlgorithm`: how it collects a rollout, what it logs of one,
the rows of its samples table and the line printed after each RL step. Nothing here knows which
algorithm runs.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Protocol

import torch

from rlkit.console import console
from rlkit.hardware import release_freed_host_memory
from rlkit.training.rollout import Rollout, gathered
from rlkit.training.samples import SAMPLES_FILE, show_samples


class OnPolicyAlgorithm(Protocol):
    """What a recipe gives `RolloutSteps`: its name ("ppo step 3") and four functions of a rollout."""

    name: str

    def collect(self, rl_step: int, wrapper: torch.nn.Module) -> Rollout:
        """The rollout of RL step `rl_step` (no gradient, eval mode, the model gathered): the recipe's stages in order."""

    def summary(self, rollout: Rollout) -> dict[str, float]:
        """The logged metrics of the whole rollout (every process's rows)."""

    def sample_rows(self, rollout: Rollout) -> list[dict[str, Any]]:
        """The samples table's rows (written to the samples file as they are, with the step)."""

    def step_line(self, rl_step: int, metrics: dict[str, float], generation_s: float, training_s: float) -> str:
        """The line printed after each RL step."""


class RolloutSteps:
    """A rollout at the start of every RL step, then its mini-batches; the step's metrics and samples."""

    def __init__(
        self,
        algorithm: OnPolicyAlgorithm,
        config: Any,
        run: Any,
        objective: Any,
        rl_steps: int,
        *,
        epochs: int,
        mini_batches: int,
    ):
        """`config` reads seed, batch_size, grad_accum, max_steps, save_every, sample_every and num_samples."""
        self.algorithm, self.c, self.run, self.acc, self.objective = algorithm, config, run, run.accelerator, objective
        self.mini_batches = mini_batches
        self.updates = epochs * mini_batches
        self.total_steps = self.steps_per_epoch = rl_steps * self.updates
        self.rollout_size = config.batch_size * config.grad_accum * mini_batches
        self.buffer: dict[str, torch.Tensor] | None = None
        self.buffer_step = -1
        self.pending: dict[str, float] = {}
        self.training_s = 0.0
        self._t_batches = time.time()
        self._last_step = -1

    @property
    def engine_config(self) -> Any:
        """The config the engine runs with: its steps are optimizer updates, `updates` of them per RL
        step, so --max-steps (here already the number of RL steps) and --save-every, both given in RL
        steps, are converted once, here, for every recipe on the seam."""
        return replace(self.c, max_steps=self.total_steps, save_every=self.c.save_every * self.updates)

    @torch.no_grad()
    def rollout(self, rl_step: int, model: torch.nn.Module) -> Rollout:
        """The algorithm's rollout with the module in eval mode and gathered; its summary and samples."""
        wrapper = self.acc.unwrap_model(model)
        was_training = wrapper.training
        wrapper.eval()
        t0 = time.time()
        with gathered(wrapper):
            rollout = self.algorithm.collect(rl_step, wrapper)
        wrapper.train(was_training)
        rollout = replace(rollout, rollout_s=time.time() - t0)
        self.pending = self.algorithm.summary(rollout)
        self._samples(rl_step, rollout)
        return rollout

    # ---- StepSource -----------------------------------------------------------------------
    def batches(self, step: int, model: torch.nn.Module) -> list[dict[str, Any]]:
        rl_step, update = divmod(step, self.updates)
        if self.buffer is None or self.buffer_step != rl_step:
            self.buffer = self.rollout(rl_step, model).update_tensors()
            self.buffer_step = rl_step
            self.training_s = 0.0
        epoch, mb = divmod(update, self.mini_batches)
        order = torch.randperm(
            self.rollout_size, generator=torch.Generator().manual_seed(self.c.seed * 1000003 + rl_step * 101 + epoch)
        )
        if self.mini_batches == 1:
            order = torch.arange(self.rollout_size)  # one mini-batch: the rollout itself, in rollout order
        size = self.rollout_size // self.mini_batches
        chosen = order[mb * size : (mb + 1) * size]
        micro = []
        bs = self.c.batch_size
        for a in range(self.c.grad_accum):
            idx = chosen[a * bs : (a + 1) * bs].to(self.acc.device)
            batch = {k: v.index_select(0, idx) for k, v in self.buffer.items()}
            batch["num_tokens"] = int(batch["response_mask"].sum())
            micro.append(batch)
        self._last_step = step
        release_freed_host_memory(self.acc.device)  # the rollout's KV caches and logits
        self._t_batches = time.time()
        return micro

    def step_metrics(self) -> dict[str, float]:
        self.training_s += time.time() - self._t_batches
        name = self.algorithm.name
        rl_step, update = divmod(self._last_step, self.updates)
        metrics: dict[str, float] = {f"{name}_step": rl_step + 1}
        if update == self.updates - 1:  # the RL step is complete: its summary
            metrics.update(self.pending)
            metrics.update(self.objective.take_means())
            gen, total = (
                self.pending.get("time/generation_s", 0.0),
                self.pending.get("time/rollout_s", 0.0) + self.training_s,
            )
            metrics["time/training_s"] = self.training_s
            metrics["time/generation_share"] = gen / max(total, 1e-9)
            metrics[f"{name}_tokens_per_s"] = self.pending.get("response_tokens", 0.0) / max(total, 1e-9)
            if "rollout_tokens" in metrics:  # prompt + completion tokens: the training side of the throughput
                metrics["training_tokens_per_s"] = metrics["rollout_tokens"] * self.updates / max(self.training_s, 1e-9)
            if self.acc.is_main_process:
                console.print(self.algorithm.step_line(rl_step, metrics, gen, self.training_s))
        return metrics

    def _samples(self, rl_step: int, rollout: Rollout) -> None:
        c = self.c
        if not c.sample_every or rl_step % c.sample_every != 0 or not self.acc.is_main_process:
            return
        if self.run.run_dir is None:
            return
        rows = self.algorithm.sample_rows(rollout)[: c.num_samples]
        name = self.algorithm.name
        show_samples(
            f"samples at {name.upper()} step {rl_step + 1}", rl_step + 1, rows, self.run.run_dir / SAMPLES_FILE
        )
