"""Online RL from verifiable rewards: GRPO and its family (Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++).

One GRPO step = one rollout of the global batch (batch-size x grad-accum x processes
completions: --num-generations G per prompt, sampled with the KV cache on the merged LoRA
weights), scored by every --reward, turned into advantages by the chosen estimator (group
mean and std, leave-one-out, or batch-normalised returns: `rlkit.losses.group_advantages`), then
--num-iterations optimizer updates on it with the clipped importance ratio
(`rlkit.losses.grpo`). There is no critic: the group is the baseline.

The shared engine drives it through a `StepSource`, as it drives PPO: an engine step is one
optimizer update, `GRPOLoop.batches(step, model)` makes the rollout when a GRPO step starts and
hands out its micro-batches, and everything else (accumulation, clipping, NaN checks, SIGTERM,
checkpoints, `--resume`, metrics, progress) is the engine's. `--max-steps` and `--save-every`
count GRPO steps; the engine is given them in updates.

Why sampling is seeded per generation chunk: a rollout's rows are cut into chunks of
--batch-size in global order (chunk k of step s is the same rows whatever the number of
processes), and each chunk is sampled from a generator seeded by (seed, s, k). So a run on two
processes samples exactly what one process samples with the same global batch, and a resumed run
samples what the uninterrupted one did -- neither depends on what ran before. Micro-batches are
those chunks, each padded to its own width, so their forward passes are the same tensors too.

Why the rewards are gathered: a prompt's G completions may live on different processes, and a
group statistic needs all of them; every process gathers the whole rollout's rewards, computes
the advantages of all of it (cheap: N numbers) and keeps its own rows.

With --num-iterations 1 the rollout-time log-probs equal the update's (same weights, no
dropout), so no separate forward computes them and the ratio is exactly 1 (as TRL does); with
more, one no-grad forward at rollout time records them. The reference (for --beta) is the
starting policy -- with LoRA the adapter disabled, never a copy -- and is not run at all when
--beta is 0.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object, set_seed

from rlkit.console import console, info, warn
from rlkit.data.formats import Messages, as_messages
from rlkit.data.load import load_records
from rlkit.data.prompts import encode_prompt
from rlkit.data.templates import resolve_template
from rlkit.errors import InputError, RlkitError, RunError
from rlkit.losses.group_advantages import (
    combine_rewards,
    group_advantages,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_variance_groups,
)
from rlkit.losses.grpo import grpo_loss, loss_mask, loss_units
from rlkit.losses.ppo import kl_penalty
from rlkit.models.merged_lora import lora_merged_for_generation
from rlkit.models.modes import disable_dropout
from rlkit.preference.reference import Reference, on_the_fly_reference
from rlkit.recipes.grpo_config import GRPOConfig
from rlkit.recipes.ppo import first_eos_mask, response_logps
from rlkit.scoring import FunctionReward, Reward, is_model_dir, load_reward
from rlkit.tools.generation import left_pad
from rlkit.training.engine import StepOutput
from rlkit.training.logprobs import response_logprobs
from rlkit.training.run import TrainingRun

SAMPLES_FILE = "samples.jsonl"


# ---- prompts -------------------------------------------------------------------------------


def load_prompt_rows(config: GRPOConfig) -> tuple[list[Messages], list[dict[str, Any]]]:
    """(prompt messages, the record's other columns) per row; the columns reach the reward functions."""
    records = load_records(config.data, config.columns)
    where = ", ".join(config.data)
    if len(records) == 0:
        raise InputError(f"{where}: no prompts")
    names = records.column_names
    key = "prompt" if "prompt" in names else "messages" if "messages" in names else None
    if key is None:
        raise InputError(
            f"{where}: no `prompt` or `messages` column (found {', '.join(names)}); use --columns prompt=NAME"
        )
    conversations, extras = [], []
    for i, record in enumerate(records):
        messages = as_messages(record[key], "user", f"{where} row {i + 1}")
        while key == "messages" and messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise InputError(f"{where} row {i + 1}: empty prompt")
        conversations.append(messages)
        extras.append({k: v for k, v in record.items() if k != key})
    return conversations, extras


# ---- rewards -------------------------------------------------------------------------------


def reward_names(specs: list[str]) -> list[str]:
    """Short unique names for the metrics: a function's name, a reward model dir's name."""
    names: list[str] = []
    for spec in specs:
        name = Path(spec.rstrip("/")).name if is_model_dir(spec) else spec.rpartition(":")[2]
        base, k = name, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def parse_weights(config: GRPOConfig) -> list[float]:
    texts = [w.strip() for item in config.reward_weights for w in item.split(",") if w.strip()]
    if not texts:
        return [1.0] * len(config.reward)
    try:
        weights = [float(w) for w in texts]
    except ValueError:
        raise InputError(f"--reward-weights {','.join(texts)}: expected comma-separated numbers")
    if len(weights) != len(config.reward):
        raise InputError(
            f"--reward-weights has {len(weights)} values for {len(config.reward)} --reward; give one weight per reward"
        )
    if not all(math.isfinite(w) for w in weights):
        raise InputError(f"--reward-weights {','.join(texts)}: weights must be finite")
    return weights


class RewardSet:
    """Every --reward, scored on this process's completions: [n, K] with NaN where a function said None."""

    def __init__(self, rewards: list[Reward], names: list[str], weights: list[float]):
        self.rewards, self.names, self.weights = rewards, names, torch.tensor(weights, dtype=torch.float32)

    def __call__(
        self, conversations: list[Messages], completions: list[str], columns: list[dict[str, Any]]
    ) -> torch.Tensor:
        scores = []
        for reward in self.rewards:
            values = score_with_columns(reward, conversations, completions, columns)
            scores.append(torch.as_tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32))
        return torch.stack(scores, dim=1)


def score_with_columns(
    reward: Reward, conversations: list[Messages], completions: list[str], columns: list[dict[str, Any]]
) -> list[float | None]:
    """Scores of one reward; a function also gets each other prompt column as a keyword argument (TRL's way)
    and may say None (no opinion on that completion)."""
    if isinstance(reward, FunctionReward):
        keyed = {k: [row.get(k) for row in columns] for k in (columns[0] if columns else {})}
        return reward(conversations, completions, columns=keyed, allow_none=True)
    values = reward(conversations, completions)
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


# ---- the objective -------------------------------------------------------------------------


class GRPOObjective:
    """The clipped GRPO loss on one micro-batch, as a sum over the units its --loss-type averages over."""

    def __init__(self, config: GRPOConfig):
        self.c = config
        self.beta = 0.0 if config.kl_in_reward else config.beta

    def weight(self, batch: dict[str, Any]) -> float:
        return float(loss_units(batch["loss_mask"], self.c.loss_type, self.c.max_new_tokens))

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        c = self.c
        logps, entropy, _ = response_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["responses"], c.temperature
        )
        old = batch.get("old_logprobs")
        out = grpo_loss(
            logps,
            logps.detach() if old is None else old,
            batch["advantages"],
            batch["loss_mask"],
            epsilon=c.epsilon,
            epsilon_high=c.epsilon_high,
            importance_sampling=c.importance_sampling,
            loss_type=c.loss_type,
            max_new_tokens=c.max_new_tokens,
            ref_logprobs=batch.get("ref_logprobs"),
            beta=self.beta,
        )
        mask = batch["response_mask"].bool()
        metrics = {name: total for name, (total, _) in out.metrics.items()}
        counts = {name: count for name, (_, count) in out.metrics.items()}
        metrics["entropy"] = torch.where(mask, entropy, 0).sum()
        counts["entropy"] = mask.sum().float()
        return StepOutput(loss=out.loss, metrics=metrics, counts=counts)


# ---- rollouts and the step source ------------------------------------------------------------


def _trim(batch: dict[str, torch.Tensor], prompt_width: int) -> dict[str, torch.Tensor]:
    """Drop the left columns no row of the micro-batch uses (its own padding, not the rollout's)."""
    used = batch["attention_mask"][:, :prompt_width].any(0).nonzero()
    first = int(used[0]) if len(used) else prompt_width
    return {k: v[:, first:] if k in ("input_ids", "attention_mask") else v for k, v in batch.items()}


class GRPOLoop:
    """The engine's `StepSource` for GRPO: a rollout at the start of every GRPO step, then its updates."""

    def __init__(
        self,
        config: GRPOConfig,
        run: TrainingRun,
        tokenizer: Any,
        conversations: list[Messages],
        columns: list[dict[str, Any]],
        prompt_ids: list[list[int]],
        rewards: RewardSet,
        reference: Reference | None,
        steps: int,
    ):
        self.c, self.run, self.acc = config, run, run.accelerator
        self.tokenizer, self.rewards, self.reference = tokenizer, rewards, reference
        self.conversations, self.columns, self.prompt_ids = conversations, columns, prompt_ids
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.local = config.batch_size * config.grad_accum
        self.global_batch = self.local * self.world
        self.prompts_per_step = self.global_batch // config.num_generations
        self.updates = config.num_iterations
        self.total_steps = steps * self.updates
        self.steps_per_epoch = max(1, len(conversations) // self.prompts_per_step) * self.updates
        self.buffer: list[dict[str, torch.Tensor]] | None = None
        self.buffer_step = -1
        self.pending: dict[str, float] = {}
        self.training_s = 0.0
        self._t_batches = time.time()
        self._last_step = -1

    # -- StepSource
    def batches(self, step: int, model: torch.nn.Module) -> list[dict[str, Any]]:
        grpo_step = step // self.updates
        if self.buffer is None or self.buffer_step != grpo_step:
            self.buffer = self.rollout(grpo_step, model)
            self.buffer_step = grpo_step
            self.training_s = 0.0
        self._last_step = step
        self._t_batches = time.time()
        return [dict(b, num_tokens=int(b["response_mask"].sum())) for b in self.buffer]

    def step_metrics(self) -> dict[str, float]:
        self.training_s += time.time() - self._t_batches
        grpo_step, iteration = divmod(self._last_step, self.updates)
        metrics: dict[str, float] = {"grpo_step": grpo_step + 1}
        if iteration == self.updates - 1:  # the rollout's last update: its summary
            metrics.update(self.pending)
            gen = self.pending["time/generation_s"]
            total = self.pending["time/rollout_s"] + self.training_s
            metrics["time/training_s"] = self.training_s
            metrics["time/generation_share"] = gen / max(total, 1e-9)
            metrics["grpo_tokens_per_s"] = self.pending["rollout_tokens"] / max(total, 1e-9)
            metrics["training_tokens_per_s"] = (
                self.pending["rollout_tokens"] * self.updates / max(self.training_s, 1e-9)
            )
            if self.acc.is_main_process:
                console.print(
                    f"grpo step {grpo_step + 1}: reward {metrics['reward/mean']:.3f} ± {metrics['reward/std']:.3f}  "
                    f"zero-var {metrics['frac_zero_variance_groups']:.2f}  len {metrics['completion_length/mean']:.1f}  "
                    f"gen {gen:.1f}s train {self.training_s:.1f}s"
                )
        return metrics

    # -- the rollout
    def _prompt_indices(self, grpo_step: int) -> list[int]:
        """The prompts of a step (global, in order): a seeded permutation per epoch, cut into steps."""
        per_epoch = max(1, len(self.conversations) // self.prompts_per_step)
        epoch, k = divmod(grpo_step, per_epoch)
        order = torch.randperm(
            len(self.conversations), generator=torch.Generator().manual_seed(self.c.seed + epoch)
        ).tolist()
        return [order[(k * self.prompts_per_step + i) % len(order)] for i in range(self.prompts_per_step)]

    def _sample(self, generator: Any, ids: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
        c, tok = self.c, self.tokenizer
        devices = [self.acc.device] if self.acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            with self.acc.autocast():
                out = generator.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=c.max_new_tokens,
                    do_sample=True,
                    temperature=c.temperature,
                    top_p=c.top_p,
                    top_k=c.top_k or None,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                    use_cache=True,
                )
        return out[:, ids.shape[1] :]

    @torch.no_grad()
    def rollout(self, grpo_step: int, model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
        c, acc, tok = self.c, self.acc, self.tokenizer
        policy = acc.unwrap_model(model)
        device, G, bs = acc.device, c.num_generations, c.batch_size
        prompts = self._prompt_indices(grpo_step)
        rows = [p for p in prompts for _ in range(G)]  # the global rollout, group by group
        start = self.rank * self.local
        mine = rows[start : start + self.local]
        was_training = policy.training
        policy.eval()

        # generation: chunk k of the global rollout from a generator seeded by (seed, step, k)
        t0 = time.time()
        micro: list[dict[str, torch.Tensor]] = []
        with lora_merged_for_generation(policy) as generator:
            for a in range(c.grad_accum):
                chunk = mine[a * bs : (a + 1) * bs]
                ids, mask = left_pad([self.prompt_ids[i] for i in chunk], tok.pad_token_id)
                ids, mask = ids.to(device), mask.to(device)
                k = (start + a * bs) // bs
                responses = self._sample(generator, ids, mask, c.seed * 1_000_003 + grpo_step * 10_007 + k)
                response_mask, has_eos = first_eos_mask(responses, tok.eos_token_id)
                micro.append(
                    {
                        "input_ids": torch.cat([ids, responses], dim=1),
                        "attention_mask": torch.cat([mask, torch.ones_like(responses)], dim=1),
                        "responses": responses,
                        "response_mask": response_mask,
                        "truncated": ~has_eos,
                        "prompt_width": torch.tensor(ids.shape[1]),
                    }
                )
        t_gen = time.time() - t0

        # rollout-time log-probs (reused by --num-iterations > 1 and the KL in the reward) and the reference's
        t1 = time.time()
        need_old = c.num_iterations > 1 or (c.kl_in_reward and c.beta > 0)
        for b in micro:
            with acc.autocast():
                if need_old:
                    b["old_logprobs"] = response_logprobs(
                        policy, b["input_ids"], b["attention_mask"], b["responses"], c.temperature, want_entropy=False
                    )[0].float()
                if self.reference is not None:
                    b["ref_logprobs"] = self.reference.logps(policy, b).float()
        t_fwd = time.time() - t1
        policy.train(was_training)

        # rewards of this process's completions, then of the whole rollout
        t2 = time.time()
        completions, lengths, truncated = [], [], []
        for b in micro:
            for row, m in zip(b["responses"].tolist(), b["response_mask"].sum(1).tolist()):
                kept = [t for t in row[:m] if t != tok.eos_token_id]
                completions.append(tok.decode(kept, skip_special_tokens=True).strip())
            lengths.append(b["response_mask"].sum(1))
            truncated.append(b["truncated"])
        local_lengths, local_truncated = torch.cat(lengths), torch.cat(truncated)
        per_function = self._score(
            [self.conversations[i] for i in mine], completions, [self.columns[i] for i in mine]
        ).to(device)
        everyone = acc.gather if self.world > 1 else (lambda t: t)
        all_scores = everyone(per_function)
        all_lengths, all_truncated = everyone(local_lengths), everyone(local_truncated.long()).bool()
        rewards = combine_rewards(all_scores, self.rewards.weights.to(device))
        penalty = overlong_penalty(all_lengths, c.max_new_tokens, c.overlong_penalty)
        rewards = rewards + penalty
        seq_kl = None
        if c.kl_in_reward and c.beta > 0:
            local_kl = torch.cat(
                [torch.where(b["response_mask"].bool(), b["old_logprobs"] - b["ref_logprobs"], 0).sum(1) for b in micro]
            )
            seq_kl = everyone(local_kl)
        t_score = time.time() - t2

        # advantages (rlkit.losses.group_advantages), of every process's completions; this process keeps its rows
        flat = zero_variance_groups(rewards, G)
        mine_slice = slice(start, start + self.local)
        scale = self._scale()
        if c.advantage == "reinforce++":
            across = (lambda t: acc.reduce(t, reduction="sum")) if self.world > 1 else None
            local_scores = rewards[mine_slice]
            kl_tokens = None
            if seq_kl is not None:
                kl_tokens = [kl_penalty(b["old_logprobs"], b["ref_logprobs"], "k1") for b in micro]
            advantages = self._reinforce_pp(micro, local_scores, kl_tokens, across)
        else:
            shaped = rewards if seq_kl is None else rewards - c.beta * seq_kl
            estimator = group_advantages if c.advantage == "group" else rloo_advantages
            all_advantages = estimator(shaped, G, scale)
            local = all_advantages[mine_slice]
            advantages = [local[a * bs : (a + 1) * bs] for a in range(c.grad_accum)]
            self._advantage_stats = all_advantages
        for a, b in enumerate(micro):
            b["advantages"] = advantages[a]
            sl = slice(a * bs, (a + 1) * bs)
            b["loss_mask"] = loss_mask(
                b["response_mask"],
                b["truncated"],
                flat[mine_slice][sl],
                c.mask_truncated_completions,
                c.skip_zero_variance_groups,
            )
            if self.reference is None or c.kl_in_reward:
                b.pop("ref_logprobs", None)
            if c.num_iterations == 1:
                b.pop("old_logprobs", None)
        micro = [_trim(b, int(b.pop("prompt_width"))) for b in micro]
        for b in micro:
            b.pop("truncated")

        rollout_s = time.time() - t0
        tokens = torch.tensor(
            [float(sum(int(b["attention_mask"].sum()) for b in micro))], device=device
        )  # prompt + completion tokens
        total_tokens = float(everyone(tokens).sum())
        self.pending = self._summary(all_scores, rewards, penalty, flat, all_lengths, all_truncated)
        self.pending.update(
            {
                "rollout_tokens": total_tokens,
                "time/generation_s": t_gen,
                "time/forward_s": t_fwd,
                "time/scoring_s": t_score,
                "time/rollout_s": rollout_s,
                "generation_tokens_per_s": float(everyone(local_lengths.sum().reshape(1).float()).sum())
                / max(t_gen, 1e-9),
            }
        )
        if c.advantage != "reinforce++":
            self.pending["advantage/std"] = float(self._advantage_stats.std())
            self.pending["advantage/abs_mean"] = float(self._advantage_stats.abs().mean())
        self._write_samples(grpo_step, mine, completions, per_function, advantages, micro)
        return micro

    def _scale(self) -> str:
        c = self.c
        if c.scale_rewards != "auto":
            return c.scale_rewards
        return {"group": "group", "rloo": "none", "reinforce++": "batch"}[c.advantage]

    def _reinforce_pp(
        self,
        micro: list[dict[str, torch.Tensor]],
        scores: torch.Tensor,
        kl_tokens: list[torch.Tensor] | None,
        across: Any,
    ) -> list[torch.Tensor]:
        """REINFORCE++ over this process's rows, statistics over every process's tokens."""
        bs = self.c.batch_size
        width = max(b["responses"].shape[1] for b in micro)
        mask = torch.cat([F.pad(b["response_mask"], (0, width - b["response_mask"].shape[1])) for b in micro])
        kl = None
        if kl_tokens is not None:
            kl = torch.cat([F.pad(k, (0, width - k.shape[1])) for k in kl_tokens])
        adv = reinforce_pp_advantages(scores, mask, kl, self.c.beta if kl is not None else 0.0, reduce=across)
        return [adv[a * bs : (a + 1) * bs, : b["responses"].shape[1]] for a, b in enumerate(micro)]

    def _score(
        self, conversations: list[Messages], completions: list[str], columns: list[dict[str, Any]]
    ) -> torch.Tensor:
        """This process's [n, K] rewards; a failure on any process stops every process with its line."""
        problem, scores = None, None
        try:
            scores = self.rewards(conversations, completions, columns)
        except RlkitError as err:
            problem = str(err)
        if self.world > 1:
            problems = [p for p in gather_object([problem]) if p]
            problem = problems[0] if problems else None
        if problem is not None:
            raise RunError(problem)
        assert scores is not None
        return scores

    def _summary(
        self,
        per_function: torch.Tensor,
        rewards: torch.Tensor,
        penalty: torch.Tensor,
        flat: torch.Tensor,
        lengths: torch.Tensor,
        truncated: torch.Tensor,
    ) -> dict[str, float]:
        """The rollout's numbers (every process's completions): what the issue asks each step to show."""

        def stats(x: torch.Tensor) -> tuple[float, float]:
            x = x[~torch.isnan(x)]
            if len(x) == 0:
                return math.nan, math.nan
            return float(x.mean()), float(x.std()) if len(x) > 1 else 0.0

        summary: dict[str, float] = {}
        for k, name in enumerate(self.rewards.names):
            summary[f"rewards/{name}/mean"], summary[f"rewards/{name}/std"] = stats(per_function[:, k])
        if self.c.overlong_penalty:
            summary["rewards/overlong_penalty/mean"] = float(penalty.mean())
        summary["reward/mean"], summary["reward/std"] = stats(rewards)
        summary["frac_zero_variance_groups"] = float(flat.float().reshape(-1, self.c.num_generations)[:, 0].mean())
        summary["zero_variance_groups"] = float(flat.reshape(-1, self.c.num_generations)[:, 0].sum())
        summary["frac_unscorable"] = float(torch.isnan(rewards).float().mean())
        lengths = lengths.float()
        summary["completion_length/mean"] = float(lengths.mean())
        summary["completion_length/min"] = float(lengths.min())
        summary["completion_length/max"] = float(lengths.max())
        summary["frac_truncated"] = float(truncated.float().mean())
        return summary

    def _write_samples(
        self,
        grpo_step: int,
        mine: list[int],
        completions: list[str],
        per_function: torch.Tensor,
        advantages: list[torch.Tensor],
        micro: list[dict[str, torch.Tensor]],
    ) -> None:
        c = self.c
        if not c.sample_every or grpo_step % c.sample_every != 0 or not self.acc.is_main_process:
            return
        if self.run.run_dir is None:
            return
        from rich.table import Table

        per_row = torch.cat(
            [
                a
                if a.dim() == 1
                else torch.where(b["response_mask"].bool(), a, 0).sum(1) / b["response_mask"].sum(1).clamp(min=1)
                for a, b in zip(advantages, micro)
            ]
        ).tolist()
        table = Table(title=f"samples at GRPO step {grpo_step + 1}", show_lines=False, expand=False)
        table.add_column("prompt", max_width=40, overflow="fold")
        table.add_column("completion", max_width=60, overflow="fold")
        for name in self.rewards.names:
            table.add_column(name, justify="right")
        table.add_column("advantage", justify="right")
        lines = []
        for i in range(min(c.num_samples, len(completions))):
            prompt = self.conversations[mine[i]][-1]["content"]
            scores = {name: _number(per_function[i, k]) for k, name in enumerate(self.rewards.names)}
            lines.append(
                {
                    "step": grpo_step + 1,
                    "prompt": prompt,
                    "completion": completions[i],
                    "rewards": scores,
                    "advantage": per_row[i],
                }
            )
            table.add_row(
                prompt,
                completions[i],
                *("-" if v is None else f"{v:.3f}" for v in scores.values()),
                f"{per_row[i]:+.3f}",
            )
        console.print(table)
        with open(Path(self.run.run_dir) / SAMPLES_FILE, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")


def _number(value: torch.Tensor) -> float | None:
    v = float(value)
    return None if math.isnan(v) else v


# ---- the command -----------------------------------------------------------------------------


def _check(config: GRPOConfig) -> list[float]:
    if not config.reward:
        raise InputError("missing --reward: module:function (e.g. rlkit.demo.task:reward) or a reward model dir")
    weights = parse_weights(config)
    if config.epsilon_high is not None and config.epsilon_high < config.epsilon:
        raise InputError(
            f"--epsilon-high {config.epsilon_high} is below --epsilon {config.epsilon}; clip-higher raises it"
        )
    if config.overlong_penalty >= config.max_new_tokens:
        raise InputError(
            f"--overlong-penalty {config.overlong_penalty} must be below --max-new-tokens {config.max_new_tokens}"
        )
    if config.advantage == "reinforce++" and config.scale_rewards not in ("auto", "batch"):
        raise InputError("--advantage reinforce++ normalises over the batch; --scale-rewards must be auto or batch")
    if config.kl_in_reward and config.beta == 0:
        raise InputError("--kl-in-reward needs --beta > 0 (the KL coefficient)")
    return weights


def run_grpo(config: GRPOConfig) -> Path:
    """Setup (tokenizer, prompts, policy, reference, rewards), train with the engine, write OUT."""
    weights = _check(config)
    run = TrainingRun("grpo", config, config.model, config.data)
    set_seed(config.seed)
    world = run.accelerator.num_processes
    global_batch = config.batch_size * config.grad_accum * world
    if global_batch % config.num_generations:
        raise InputError(
            f"the global batch of {global_batch} completions (batch-size {config.batch_size} x grad-accum "
            f"{config.grad_accum} x {world} processes) is not a multiple of --num-generations {config.num_generations}; "
            "change one of them"
        )
    tokenizer = run.load_tokenizer()
    template = resolve_template(config.template, tokenizer, config.model or "the policy")
    conversations, columns = load_prompt_rows(config)
    room = config.max_length - config.max_new_tokens
    encoded = [encode_prompt(tokenizer, template, m) for m in conversations]
    kept = [i for i, ids in enumerate(encoded) if len(ids) <= room]
    if len(kept) < len(encoded):
        warn(
            f"{len(encoded) - len(kept)} of {len(encoded)} prompts are longer than --max-length - --max-new-tokens ({room} tokens) and were dropped"
        )
    conversations, columns, encoded = (
        [conversations[i] for i in kept],
        [columns[i] for i in kept],
        [encoded[i] for i in kept],
    )
    prompts_per_step = global_batch // config.num_generations
    if len(conversations) < prompts_per_step:
        raise InputError(
            f"{len(conversations)} usable prompts are fewer than one rollout's {prompts_per_step} "
            f"(global batch {global_batch} / --num-generations {config.num_generations}); lower --batch-size or --grad-accum"
        )
    steps = config.max_steps or config.epochs * (len(conversations) // prompts_per_step)
    info(
        f"prompts: {len(conversations)}; {steps} GRPO steps of {prompts_per_step} prompts x {config.num_generations} "
        f"completions, {config.num_iterations} update(s) each"
    )

    device = run.accelerator.device
    rewards = RewardSet(
        [
            load_reward(
                spec, tokenizer, template, run.weights_dtype, device, config.batch_size, config.trust_remote_code
            )
            for spec in config.reward
        ],
        reward_names(config.reward),
        weights,
    )
    policy = run.load_policy()
    disable_dropout(policy)  # the ratio must be 1 before the first update
    reference, described = None, "none (--beta 0)"
    if config.beta > 0:
        reference, described = on_the_fly_reference(config, run, policy, tokenizer, response_logps(config.temperature))
    info(f"reference: {described}")
    loop = GRPOLoop(config, run, tokenizer, conversations, columns, encoded, rewards, reference, steps)
    engine_config = replace(config, max_steps=steps * loop.updates, save_every=config.save_every * loop.updates)
    default_lr = 1e-5 if config.lora else 1e-6
    metrics = run.train(policy, GRPOObjective(config), loop, default_lr, engine_config=engine_config)
    metrics["grpo_steps"] = steps
    scale = loop._scale()
    card = (
        "## GRPO\n\n"
        f"- rewards: {', '.join(f'`{s}` (weight {w:g})' for s, w in zip(config.reward, weights))}\n"
        f"- advantages: {config.advantage}, scaled by {scale}; {config.num_generations} completions per prompt\n"
        f"- loss: {config.loss_type}, {config.importance_sampling}-level ratio clipped to "
        f"[1 - {config.epsilon}, 1 + {config.epsilon_high if config.epsilon_high is not None else config.epsilon}]"
        f"; beta {config.beta}" + (" (in the reward)" if config.kl_in_reward else "") + f"; reference: {described}\n"
        f"- samples: `{SAMPLES_FILE}`\n\n"
    )
    return run.finish(
        tokenizer,
        chat_template=template.source,
        metrics=metrics,
        data_info={"counts": {"prompts": len(conversations)}},
        extra_card=card,
    )
