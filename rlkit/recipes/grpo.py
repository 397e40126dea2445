"""Online RL from verifiable rewards: GRPO and its family (Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++).

One GRPO step = one rollout of the global batch (batch-size x grad-accum x processes
completions: --num-generations G per prompt), scored by every --reward, turned into advantages
by the chosen estimator (group mean and std, leave-one-out, or batch-normalised returns:
`rlkit.losses.group_advantages`), then --num-iterations optimizer updates on it with the
clipped importance ratio (`rlkit.losses.grpo`). There is no critic: the group is the baseline.

It runs on PPO's on-policy seam, `rlkit.training.rollout.RolloutSteps` (generate -> score ->
advantages -> summary; merged-LoRA generation with left padding, first-EOS masks, decoding, the
mini-batches, resume mid-rollout), and trains `PolicyValue(policy, None, None, beta)`, the
critic-free module; `GRPOSteps` supplies only what differs:

- the prompt layout: the global rollout group by group, each process taking its slice, so a
  prompt's G completions may be spread over processes (the global batch must divide by G);
- seeded sampling in chunks of --generation-batch-size (default: a process's whole rollout, in
  one `generate` call, as TRL): chunk k of step s (in global order) is sampled from a generator
  seeded by (seed, s, k), so with the same chunk size two processes sample exactly what one
  process samples with the same global batch, and a resumed run what the uninterrupted one did;
- the rollout-time forward only where it is needed: with --num-iterations 1 the update's own
  log-probs are the rollout's (same weights, no dropout), so none is run and the ratio is
  exactly 1 (as TRL); the reference (for --beta) is the starting policy -- with LoRA the adapter
  disabled, never a copy -- and is not run at all when --beta is 0;
- the rewards: every --reward on this process's completions, weighted, with DAPO's overlong
  penalty; a function is called as TRL calls reward functions (`prompts=`, `completions=`,
  `completion_ids=` and every other column of the prompt records as keywords; messages for
  conversational prompts, strings otherwise: `rlkit.scoring.FunctionReward`) and may say None for
  "no opinion"; whatever one raises or returns wrong, on any process, stops every process with its
  one line naming it and the last checkpoint;
- the advantages from every process's rewards (a group statistic needs all G completions;
  gathering N numbers is cheap), this process keeping its rows, and the loss mask (truncated
  completions, zero-variance groups);
- the summary and the samples table the issue lists.

`--max-steps` and `--save-every` count GRPO steps; the engine is given them in updates.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object, set_seed

from rlkit.console import info
from rlkit.data.prompts import PromptRows, load_prompt_rows, prompts_that_fit
from rlkit.data.templates import resolve_template
from rlkit.errors import InputError, RlkitError, RunError
from rlkit.losses.group_advantages import (
    REWARD_AGGREGATIONS,
    group_advantages,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_variance_groups,
)
from rlkit.losses.grpo import grpo_loss, loss_mask, loss_units, policy_loss_record
from rlkit.losses.ppo import kl_penalty
from rlkit.models.modes import disable_dropout
from rlkit.preference.reference import Reference, on_the_fly_reference
from rlkit.recipes.grpo_config import GRPOConfig
from rlkit.recipes.ppo import PolicyValue
from rlkit.scoring import Reward, RewardBatch, load_reward, score_batch
from rlkit.training.engine import StepOutput
from rlkit.training.rollout import Rollout, RolloutSteps, response_logps
from rlkit.training.run import TrainingRun
from rlkit.training.samples import SAMPLES_FILE

# ---- rewards -------------------------------------------------------------------------------


def reward_names(specs: list[str]) -> list[str]:
    """Short unique names for the metrics: a function's name, a reward model dir's name."""
    names: list[str] = []
    for spec in specs:
        is_model = Path(spec).exists() or spec.endswith(".gguf")  # as `load_reward` tells them apart
        name = Path(spec.rstrip("/")).name if is_model else spec.rpartition(":")[2]
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

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        scores = []
        for reward in self.rewards:
            values = score_batch(reward, batch, allow_none=True)
            scores.append(torch.as_tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32))
        return torch.stack(scores, dim=1)


# ---- the objective -------------------------------------------------------------------------


class GRPOObjective:
    """--loss-type's policy loss on one micro-batch, as a sum over the units its aggregation averages over.

    The loss type's record (`rlkit.losses.grpo.POLICY_LOSSES`) names the options its surrogate
    reads; they are passed by name, next to the clip bounds every loss type is given.
    """

    def __init__(self, config: GRPOConfig):
        self.c = config
        self.beta = 0.0 if config.kl_in_reward else config.beta
        record = policy_loss_record(config.loss_type)
        self.options = {
            name: getattr(config, name) for name in record.options if name not in ("epsilon", "epsilon_high")
        }

    def weight(self, batch: dict[str, Any]) -> float:
        return float(loss_units(batch["loss_mask"], self.c.loss_type, self.c.max_new_tokens))

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        c = self.c
        logps, entropy, _ = model(batch["input_ids"], batch["attention_mask"], batch["responses"], c.temperature)
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
            **self.options,
        )
        mask = batch["response_mask"].bool()
        metrics = {name: total for name, (total, _) in out.metrics.items()}
        counts = {name: count for name, (_, count) in out.metrics.items()}
        metrics["entropy"] = torch.where(mask, entropy, 0).sum()
        counts["entropy"] = mask.sum().float()
        return StepOutput(loss=out.loss, metrics=metrics, counts=counts)

    def take_means(self) -> dict[str, float]:
        """Nothing kept per RL step: the engine logs every update's loss metrics itself."""
        return {}


# ---- the rollout, on the on-policy seam -------------------------------------------------------


class GRPOSteps(RolloutSteps):
    """GRPO's phases on `rlkit.training.rollout.RolloutSteps`: its prompt layout, seeded sampling,
    weighted rewards with the prompt columns, group advantages, and its summary and samples.

    The seam does the rest as it does for PPO: merged-LoRA generation with left padding, the
    first-EOS masks, the rollout-time forward (here only where it is needed), decoding, the
    mini-batches of each of the --num-iterations updates, resume mid-rollout.
    """

    name = "grpo"
    shared_prompts = True  # a rollout holds each prompt G times: its prefill runs once

    def __init__(
        self,
        config: GRPOConfig,
        run: TrainingRun,
        tokenizer: Any,
        prompts: PromptRows,
        prompt_ids: list[list[int]],
        rewards: RewardSet,
        reference: Reference | None,
        objective: GRPOObjective,
        steps: int,
    ):
        super().__init__(
            config,
            run,
            tokenizer,
            prompts.conversations,
            prompt_ids,
            rewards,
            reference,
            objective,
            steps,
            epochs=config.num_iterations,
            mini_batches=1,
            group_size=config.num_generations,
            columns=prompts.columns,
            conversational=prompts.conversational,
        )
        self.rewards = rewards
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.global_batch = self.rollout_size * self.world
        self.prompts_per_step = self.global_batch // config.num_generations
        # the rollout-time log-probs are needed to reuse a rollout, or for the KL in the reward
        self.needs_old = config.num_iterations > 1 or (config.kl_in_reward and config.beta > 0)

    @property
    def scale(self) -> str:
        c = self.c
        if c.scale_rewards != "auto":
            return c.scale_rewards
        aggregation = REWARD_AGGREGATIONS[c.multi_objective_aggregation]
        if aggregation.scale is not None and c.advantage != "reinforce++":
            return aggregation.scale
        return {"group": "group", "rloo": "none", "reinforce++": "batch"}[c.advantage]

    # -- generate: the global rollout group by group, this process's slice of it, seeded chunks
    def _prompt_indices(self, rl_step: int) -> list[int]:
        per_epoch = max(1, len(self.conversations) // self.prompts_per_step)
        epoch, k = divmod(rl_step, per_epoch)
        order = torch.randperm(
            len(self.conversations), generator=torch.Generator().manual_seed(self.c.seed + epoch)
        ).tolist()
        prompts = [order[(k * self.prompts_per_step + i) % len(order)] for i in range(self.prompts_per_step)]
        rows = [p for p in prompts for _ in range(self.group_size)]
        start = self.rank * self.rollout_size
        return rows[start : start + self.rollout_size]

    def generation_chunk(self) -> int:
        return self.c.generation_batch_size or self.rollout_size

    def sample_seed(self, rl_step: int, start: int) -> int:
        chunk = (self.rank * self.rollout_size + start) // self.generation_chunk()  # its place in the global rollout
        return self.c.seed * 1_000_003 + rl_step * 10_007 + chunk

    # -- forward: the policy's only where a rollout is reused or the KL goes into the reward
    def forward(self, rollout: Rollout, wrapper: torch.nn.Module) -> None:
        if self.needs_old:
            super().forward(rollout, wrapper)
            return
        t0, bs = time.time(), self.c.batch_size
        if self.reference is not None:
            ids, mask, responses = rollout.input_ids, rollout.attention_mask, rollout.responses
            parts = []
            for start in range(0, len(rollout.indices), bs):
                rows = {k: v[start : start + bs] for k, v in (("input_ids", ids), ("attention_mask", mask))}
                rows["responses"] = responses[start : start + bs]
                with self.acc.autocast():
                    parts.append(self.reference.logps(wrapper.policy, rows))
            rollout.ref_logprobs = torch.cat(parts)
        rollout.timings["forward_s"] = time.time() - t0

    # -- score: every reward on this process's completions, with the prompts' other columns
    def reward_scores(self, batch: RewardBatch) -> torch.Tensor:
        """[n, K] rewards of this process's rows; a failure on any process stops every process with its
        line (a reward function's exceptions, exits and own KeyboardInterrupts are all `RunError`s)."""
        problem, scores = None, None
        try:
            scores = self.rewards(batch)
        except RlkitError as err:
            problem = str(err)
        if self.world > 1:
            problems = [p for p in gather_object([problem]) if p]
            problem = problems[0] if problems else None
        if problem is not None:
            raise RunError(problem)
        assert scores is not None
        return scores

    def shape_scores(self, rollout: Rollout) -> torch.Tensor:
        """The combined reward: the terms by --multi-objective-aggregation (over every process's rows, as
        a group statistic needs), + the overlong penalty, - beta x the summed KL with --kl-in-reward."""
        c = self.c
        assert rollout.raw_scores is not None
        per_function = rollout.raw_scores
        rollout.extras["per_function"] = per_function
        combine = REWARD_AGGREGATIONS[c.multi_objective_aggregation].combine
        everyone = combine(self.gather(per_function), self.rewards.weights.to(per_function.device), self.group_size)
        rollout.raw_scores = everyone[self.rank * self.rollout_size : (self.rank + 1) * self.rollout_size]
        lengths = rollout.response_mask.sum(1)
        penalty = overlong_penalty(lengths, c.max_new_tokens, c.overlong_penalty).to(per_function.device)
        rollout.extras["overlong_penalty"] = penalty
        shaped = rollout.raw_scores + penalty
        if c.kl_in_reward and c.beta > 0 and c.advantage != "reinforce++":
            assert rollout.old_logprobs is not None and rollout.ref_logprobs is not None
            kl = torch.where(rollout.response_mask.bool(), rollout.old_logprobs - rollout.ref_logprobs, 0).sum(1)
            shaped = shaped - c.beta * kl
        return shaped

    # -- advantages: from every process's rewards; this process keeps its rows
    def advantages(self, rollout: Rollout, wrapper: torch.nn.Module) -> None:
        c = self.c
        assert rollout.scores is not None
        rewards = self.gather(rollout.scores)
        flat = zero_variance_groups(rewards, self.group_size)
        mine = slice(self.rank * self.rollout_size, (self.rank + 1) * self.rollout_size)
        if c.advantage == "reinforce++":
            kl = None
            if c.kl_in_reward and c.beta > 0:
                assert rollout.old_logprobs is not None and rollout.ref_logprobs is not None
                kl = kl_penalty(rollout.old_logprobs, rollout.ref_logprobs, "k1")
            rollout.advantages = reinforce_pp_advantages(
                rollout.scores, rollout.response_mask, kl, c.beta if kl is not None else 0.0, reduce=self.across()
            )
        else:
            estimator = group_advantages if c.advantage == "group" else rloo_advantages
            everyone = estimator(rewards, self.group_size, self.scale)
            rollout.advantages = everyone[mine]
            rollout.stats["advantage/std"] = float(everyone.std())
            rollout.stats["advantage/abs_mean"] = float(everyone.abs().mean())
        rollout.extras["zero_variance"] = flat
        rollout.update_extras["loss_mask"] = loss_mask(
            rollout.response_mask,
            ~rollout.has_eos,
            flat[mine],
            c.mask_truncated_completions,
            c.skip_zero_variance_groups,
        )
        if c.num_iterations == 1:  # the update's own log-probs are the rollout's (ratio exactly 1)
            rollout.old_logprobs = None

    # -- what each step shows
    def summary(self, rollout: Rollout) -> dict[str, float]:
        """The rollout's numbers over every process's completions (the issue's list)."""
        c, G = self.c, self.group_size
        assert rollout.raw_scores is not None and rollout.scores is not None
        per_function = self.gather(rollout.extras["per_function"])
        lengths = self.gather(rollout.response_mask.sum(1).float())
        flat = rollout.extras["zero_variance"].reshape(-1, G)[:, 0]
        summary: dict[str, float] = {}
        for k, name in enumerate(self.rewards.names):
            summary[f"rewards/{name}/mean"], summary[f"rewards/{name}/std"] = _nan_stats(per_function[:, k])
        if c.overlong_penalty:
            summary["rewards/overlong_penalty/mean"] = float(self.gather(rollout.extras["overlong_penalty"]).mean())
        summary["reward/mean"], summary["reward/std"] = _nan_stats(self.gather(rollout.scores))
        summary["frac_zero_variance_groups"] = float(flat.float().mean())
        summary["zero_variance_groups"] = float(flat.sum())
        summary["frac_unscorable"] = float(torch.isnan(self.gather(rollout.raw_scores)).float().mean())
        summary["completion_length/mean"] = float(lengths.mean())
        summary["completion_length/min"] = float(lengths.min())
        summary["completion_length/max"] = float(lengths.max())
        summary["frac_truncated"] = float(self.gather((~rollout.has_eos).float()).mean())
        summary.update(rollout.stats)
        t = rollout.timings
        all_tokens = self.gather(rollout.attention_mask.sum().reshape(1).float()).sum()  # prompt + completion
        summary.update(
            {
                "response_tokens": float(rollout.response_mask.sum()),
                "rollout_tokens": float(all_tokens),
                "time/generation_s": t["generation_s"],
                "time/forward_s": t["forward_s"],
                "time/scoring_s": t["scoring_s"],
                "time/rollout_s": t["rollout_s"],
                "generation_tokens_per_s": float(lengths.sum()) / max(t["generation_s"], 1e-9),
            }
        )
        return summary

    def step_metrics(self) -> dict[str, float]:
        metrics = super().step_metrics()
        if "rollout_tokens" in metrics:  # the RL step is complete: the training side of its throughput
            metrics["training_tokens_per_s"] = (
                metrics["rollout_tokens"] * self.updates / max(metrics["time/training_s"], 1e-9)
            )
        return metrics

    def step_line(self, rl_step: int, metrics: dict[str, float], generation_s: float) -> str:
        return (
            f"grpo step {rl_step + 1}: reward {metrics['reward/mean']:.3f} ± {metrics['reward/std']:.3f}  "
            f"zero-variance groups {metrics['frac_zero_variance_groups']:.2f}  "
            f"len {metrics['completion_length/mean']:.1f}  gen {generation_s:.1f}s train {self.training_s:.1f}s"
        )

    def sample_rows(self, rollout: Rollout) -> list[dict[str, Any]]:
        assert rollout.advantages is not None
        per_function = rollout.extras["per_function"]
        advantages = rollout.advantages
        if advantages.dim() == 2:  # reinforce++: the mean over the completion's tokens
            m = rollout.response_mask.bool()
            advantages = torch.where(m, advantages, 0).sum(1) / m.sum(1).clamp(min=1)
        rows = []
        for i, (messages, completion) in enumerate(zip(rollout.conversations, rollout.completions)):
            row: dict[str, Any] = {"prompt": messages[-1]["content"], "completion": completion}
            row.update({name: _number(per_function[i, k]) for k, name in enumerate(self.rewards.names)})
            row["advantage"] = float(advantages[i])
            rows.append(row)
        return rows


def _nan_stats(x: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of the non-NaN entries (NaN when there are none)."""
    x = x[~torch.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std()) if len(x) > 1 else 0.0


def _number(value: torch.Tensor) -> float | None:
    v = float(value)
    return None if math.isnan(v) else v


# ---- the command -----------------------------------------------------------------------------


def _check(config: GRPOConfig) -> list[float]:
    if not config.reward:
        raise InputError("missing --reward: module:function (e.g. rlkit.demo.task:reward) or a reward model dir")
    weights = parse_weights(config)
    loss_problem = policy_loss_record(config.loss_type).problem(vars(config))
    if loss_problem:
        raise InputError(loss_problem)
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
    if config.eval_data or config.eval_fraction:
        raise InputError(
            "grpo has no held-out loss to evaluate; measure the result with `rlkit eval OUT --prompts FILE --reward R`"
        )
    if config.ref and config.beta == 0:
        raise InputError(f"--ref {config.ref} is only used for the KL to the reference; give --beta > 0 as well")
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
    prompts = load_prompt_rows(config.data, config.columns)
    room = config.max_length - config.max_new_tokens
    kept, encoded = prompts_that_fit(tokenizer, template, prompts.conversations, room)
    prompts = prompts.select(kept)
    conversations = prompts.conversations
    local = config.batch_size * config.grad_accum
    if config.generation_batch_size and local % config.generation_batch_size:
        raise InputError(
            f"--generation-batch-size {config.generation_batch_size} does not divide a process's rollout of {local} "
            f"completions (batch-size {config.batch_size} x grad-accum {config.grad_accum})"
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
        reference, described = on_the_fly_reference(
            config, run, policy, tokenizer, response_logps(config.temperature, shared_prompts=True)
        )
    info(f"reference: {described}")
    objective = GRPOObjective(config)
    loop = GRPOSteps(config, run, tokenizer, prompts, encoded, rewards, reference, objective, steps)
    engine_config = loop.engine_config
    default_lr = 1e-5 if config.lora else 1e-6
    # critic-free: no value forward, no value loss; each group's prompt runs once per forward
    model = PolicyValue(policy, None, None, config.beta, shared_prompts=True)
    metrics = run.train(model, objective, loop, default_lr, engine_config=engine_config)
    metrics["grpo_steps"] = steps
    scale, loss = loop.scale, policy_loss_record(config.loss_type)
    card = (
        "## GRPO\n\n"
        f"- rewards: {', '.join(f'`{s}` (weight {w:g})' for s, w in zip(config.reward, weights))}\n"
        f"- advantages: {config.advantage}, scaled by {scale}; {config.num_generations} completions per prompt\n"
        f"- loss: {config.loss_type} ({loss.help.split('.')[0].strip()}; "
        + ", ".join(f"{name} {getattr(config, name)}" for name in loss.options)
        + f"), {config.importance_sampling}-level ratio"
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
