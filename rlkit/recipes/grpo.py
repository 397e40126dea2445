"""Online RL from verifiable rewards: GRPO and its family (Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++).

One GRPO step = one rollout of the global batch (batch-size x grad-accum x processes
completions: --num-generations G per prompt), scored by every --reward, turned into advantages
by the chosen estimator (group mean and std, leave-one-out, or batch-normalised returns:
`rlkit.losses.group_advantages`), then --num-iterations optimizer updates on it with the
clipped importance ratio (`rlkit.losses.grpo`). There is no critic: the group is the baseline.

It collects its rollout with the on-policy stages of `rlkit.training.rollout` (sample ->
forward -> score -> estimate, over typed records; merged-LoRA generation with left padding,
first-EOS masks, decoding), `rlkit.training.rollout_steps.RolloutSteps` cuts the updates'
mini-batches (resume mid-rollout), and it trains `PolicyValue(policy, None, None)`, the
critic-free module. `GRPORollout.collect` reads as the algorithm's steps; what is GRPO's own:

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
- with --tools / --env, multi-turn episodes (`rlkit.training.episodes.sample_episodes`, the same
  `Samples` record, the loss mask 0 on tool turns) instead of one completion per row: the tools,
  the environment and the template are loaded and checked before any weights load
  (`rlkit.agents.setup`), the prompts show the tools' schemas, and an environment's `get_reward()`
  is one more reward (`EnvironmentReward`, weight 1, named after the class);
- the summary (with tools: turns and calls per episode, failures, max-turns stops) and the samples table.

`--max-steps` and `--save-every` count GRPO steps; the engine is given them in updates.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from rlkit.agents.environment import EnvironmentReward
from rlkit.agents.setup import Agents
from rlkit.console import info
from rlkit.data.prompts import rollout_prompts
from rlkit.errors import InputError
from rlkit.losses.group_advantages import (
    GROUP_ESTIMATORS,
    REWARD_AGGREGATIONS,
    GroupRollout,
    overlong_penalty,
    zero_variance_groups,
)
from rlkit.losses.grpo import grpo_loss, loss_mask, loss_units, policy_loss_record
from rlkit.losses.ppo import kl_penalty
from rlkit.models.modes import disable_dropout
from rlkit.preference.reference import Reference, on_the_fly_reference
from rlkit.recipes.grpo_config import GRPOConfig
from rlkit.recipes.grpo_plan import grpo_plan
from rlkit.recipes.ppo import PolicyValue
from rlkit.scoring import RewardSet, load_reward
from rlkit.training.engine import StepOutput
from rlkit.training.episodes import EpisodeSamples, episode_metrics, sample_episodes
from rlkit.training.rollout import (
    Advantages,
    Rollout,
    RolloutForward,
    RolloutInputs,
    RolloutSampling,
    Samples,
    Scored,
    check_rollout_layout,
    prompt_indices,
    prompts_per_rollout,
    rollout_forward,
    rollout_reference_spec,
    sample,
    score_samples,
)
from rlkit.training.rollout_steps import RolloutSteps
from rlkit.training.run import TrainingRun, stop_for_dry_run
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


# ---- the rollout, stage by stage ------------------------------------------------------------------


class GRPORollout:
    """GRPO's `rlkit.training.rollout_steps.OnPolicyAlgorithm`: one rollout of the global batch per
    GRPO step, G completions of each prompt, every reward combined, group advantages."""

    name = "grpo"

    def __init__(
        self,
        config: GRPOConfig,
        inputs: RolloutInputs,
        rewards: RewardSet,
        reference: Reference | None,
        generation_rows: int,
        agents: Agents | None = None,
    ):
        """`generation_rows`: the rows per `generate` call, as the run's plan has them."""
        c = config
        self.c, self.inputs, self.rewards, self.reference = config, inputs, rewards, reference
        self.agents = agents  # --tools / --env: multi-turn episodes
        acc = inputs.accelerator
        self.world, self.rank, self.group_size = acc.num_processes, acc.process_index, c.num_generations
        self.rollout_size = c.batch_size * c.grad_accum
        self.mine = slice(self.rank * self.rollout_size, (self.rank + 1) * self.rollout_size)
        self.sampling = RolloutSampling(
            c.max_new_tokens,
            c.temperature,
            c.top_p,
            c.top_k or None,
            chunk=generation_rows,
            shared_prompts=True,  # a rollout holds each prompt G times: its prefill runs once
            seed=self.sample_seed,
        )
        self.estimator = GROUP_ESTIMATORS[c.advantage]
        # the rollout-time log-probs are needed to reuse a rollout, or for the KL in the reward
        self.needs_old = c.num_iterations > 1 or (c.kl_in_reward and c.beta > 0)

    @property
    def scale(self) -> str:
        c = self.c
        if c.scale_rewards != "auto":
            return c.scale_rewards
        aggregation = REWARD_AGGREGATIONS[c.multi_objective_aggregation]
        if aggregation.scale is not None and not self.estimator.per_token:
            return aggregation.scale
        assert self.estimator.auto_scale is not None
        return self.estimator.auto_scale

    def sample_seed(self, rl_step: int, start: int) -> int:
        """Chunk k of step s (in global order) is sampled from a generator seeded by (seed, s, k)."""
        chunk = (self.rank * self.rollout_size + start) // self.sampling.chunk  # its place in the global rollout
        return self.c.seed * 1_000_003 + rl_step * 10_007 + chunk

    def collect(self, rl_step: int, wrapper: torch.nn.Module) -> Rollout:
        c, inputs = self.c, self.inputs
        # 1. sample: the global rollout group by group (G completions of each prompt), this process's slice
        n = len(inputs.prompts.conversations)
        indices = prompt_indices(n, rl_step, c.seed, self.rollout_size, self.group_size, self.rank, self.world)
        if self.agents is not None:  # episodes with tools or an environment: every running episode a turn at a time
            samples = sample_episodes(inputs, wrapper, indices, rl_step, self.sampling, self.agents)
        else:
            samples = sample(inputs, wrapper, indices, rl_step, self.sampling)
        # 2. the rollout-time forward: the policy's only to reuse a rollout or for a KL in the reward,
        #    the reference's for --beta
        forward = rollout_forward(
            inputs, wrapper, samples, c.batch_size, c.temperature, self.reference, policy=self.needs_old
        )
        # 3. score: every reward, combined by --multi-objective-aggregation, shaped
        scored = self.score(samples, forward)
        # 4. advantages from every process's rewards (a group statistic needs all G), the loss mask
        advantages = self.estimate(samples, forward, scored)
        if c.num_iterations == 1:  # the update's own log-probs are the rollout's: the ratio is exactly 1
            forward = replace(forward, old_logprobs=None)
        return Rollout(samples, forward, scored, advantages, rollout_s=0.0)

    def score(self, samples: Samples, forward: RolloutForward) -> Scored:
        """Each reward; combined by --multi-objective-aggregation (over every process's rows, as a group
        statistic needs); + the overlong penalty, - beta x the summed KL with --kl-in-reward."""
        c, inputs, t0 = self.c, self.inputs, time.time()
        per_reward = score_samples(inputs, samples, self.rewards)
        combine = REWARD_AGGREGATIONS[c.multi_objective_aggregation].combine
        everyone = combine(inputs.gather(per_reward), self.rewards.weights.to(per_reward.device), self.group_size)
        combined = everyone[self.mine]
        # against the budget --max-new-tokens is: the whole completion, an episode's tool turns included
        lengths = torch.tensor([len(ids) for ids in samples.completion_ids])
        penalty = overlong_penalty(lengths, c.max_new_tokens, c.overlong_penalty).to(per_reward.device)
        shaped = combined + penalty
        if c.kl_in_reward and c.beta > 0 and not self.estimator.per_token:
            assert forward.old_logprobs is not None and forward.ref_logprobs is not None
            kl = torch.where(samples.response_mask.bool(), forward.old_logprobs - forward.ref_logprobs, 0).sum(1)
            shaped = shaped - c.beta * kl
        metrics = {}
        if c.overlong_penalty:
            metrics["rewards/overlong_penalty/mean"] = float(inputs.gather(penalty).mean())
        return Scored(per_reward, combined, shaped, metrics, time.time() - t0)

    def estimate(self, samples: Samples, forward: RolloutForward, scored: Scored) -> Advantages:
        """--advantage's estimator over every process's rewards, this process keeping its rows; the loss
        mask (truncated completions, zero-variance groups)."""
        c, inputs, G = self.c, self.inputs, self.group_size
        rewards = inputs.gather(scored.shaped)
        flat = zero_variance_groups(rewards, G)
        kl = None
        if self.estimator.per_token and c.kl_in_reward and c.beta > 0:  # the KL charged per token
            assert forward.old_logprobs is not None and forward.ref_logprobs is not None
            kl = kl_penalty(forward.old_logprobs, forward.ref_logprobs, "k1")
        rollout = GroupRollout(rewards, self.mine, G, samples.response_mask, kl, c.beta, inputs.across())
        advantages = self.estimator.fn(rollout, self.scale)
        metrics: dict[str, float] = {}
        if advantages.dim() == 1:  # per sequence: their spread over the whole rollout
            everyone = inputs.gather(advantages)
            metrics["advantage/std"] = float(everyone.std())
            metrics["advantage/abs_mean"] = float(everyone.abs().mean())
        groups = flat.reshape(-1, G)[:, 0]
        metrics["frac_zero_variance_groups"] = float(groups.float().mean())
        metrics["zero_variance_groups"] = float(groups.sum())
        mask = loss_mask(
            samples.response_mask,
            ~samples.has_eos,
            flat[self.mine],
            c.mask_truncated_completions,
            c.skip_zero_variance_groups,
        )
        return Advantages(advantages, None, mask, metrics)

    # -- what each step shows
    def summary(self, rollout: Rollout) -> dict[str, float]:
        """The rollout's numbers over every process's completions."""
        inputs, s, scored = self.inputs, rollout.samples, rollout.scored
        per_reward = inputs.gather(scored.per_reward)
        lengths = inputs.gather(s.response_mask.sum(1).float())
        est = dict(rollout.advantages.metrics)
        summary: dict[str, float] = {}
        for k, name in enumerate(self.rewards.names):
            summary[f"rewards/{name}/mean"], summary[f"rewards/{name}/std"] = _nan_stats(per_reward[:, k])
        summary.update(scored.metrics)
        summary["reward/mean"], summary["reward/std"] = _nan_stats(inputs.gather(scored.shaped))
        summary["frac_zero_variance_groups"] = est.pop("frac_zero_variance_groups")
        summary["zero_variance_groups"] = est.pop("zero_variance_groups")
        summary["frac_unscorable"] = float(torch.isnan(inputs.gather(scored.combined)).float().mean())
        summary["completion_length/mean"] = float(lengths.mean())
        summary["completion_length/min"] = float(lengths.min())
        summary["completion_length/max"] = float(lengths.max())
        summary["frac_truncated"] = float(inputs.gather((~s.has_eos).float()).mean())
        summary.update(est)
        if self.agents is not None:
            assert isinstance(s, EpisodeSamples)
            summary.update(episode_metrics(inputs, s, self.agents.tool_names))
        all_tokens = inputs.gather(s.attention_mask.sum().reshape(1).float()).sum()  # prompt + completion
        summary.update(
            {
                "response_tokens": float(s.response_mask.sum()),
                "rollout_tokens": float(all_tokens),
                "time/generation_s": s.generation_s,
                "time/forward_s": rollout.forward.forward_s,
                "time/scoring_s": scored.scoring_s,
                "time/rollout_s": rollout.rollout_s,
                "generation_tokens_per_s": float(lengths.sum()) / max(s.generation_s, 1e-9),
            }
        )
        return summary

    def step_line(self, rl_step: int, metrics: dict[str, float], generation_s: float, training_s: float) -> str:
        tools = ""
        if "tools/call_frequency" in metrics:
            tools = (
                f"tool calls/episode {metrics['tools/call_frequency']:.2f} "
                f"(failed {metrics['tools/failure_frequency']:.2f})  "
            )
        return (
            f"grpo step {rl_step + 1}: reward {metrics['reward/mean']:.3f} ± {metrics['reward/std']:.3f}  "
            f"zero-variance groups {metrics['frac_zero_variance_groups']:.2f}  "
            f"len {metrics['completion_length/mean']:.1f}  {tools}gen {generation_s:.1f}s train {training_s:.1f}s"
        )

    def sample_rows(self, rollout: Rollout) -> list[dict[str, Any]]:
        s, per_reward = rollout.samples, rollout.scored.per_reward
        advantages = rollout.advantages.advantages
        if advantages.dim() == 2:  # reinforce++: the mean over the completion's tokens
            m = s.response_mask.bool()
            advantages = torch.where(m, advantages, 0).sum(1) / m.sum(1).clamp(min=1)
        rows = []
        for i, (messages, completion) in enumerate(zip(s.conversations, s.completions)):
            row: dict[str, Any] = {"prompt": messages[-1]["content"], "completion": completion}
            row.update({name: _number(per_reward[i, k]) for k, name in enumerate(self.rewards.names)})
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
    if not config.reward and not config.env:
        raise InputError(
            "missing --reward: module:function (e.g. rlkit.demo.task:reward) or a reward model dir "
            "(or --env with an environment whose get_reward() scores its episodes)"
        )
    if config.max_turns is not None and not (config.tools or config.env):
        raise InputError(f"--max-turns {config.max_turns} caps tool-calling rounds; give --tools or --env as well")
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
    estimator = GROUP_ESTIMATORS[config.advantage]
    if config.scale_rewards != "auto" and config.scale_rewards not in estimator.scales:
        raise InputError(
            f"--advantage {config.advantage} {estimator.scale_reason}; "
            f"--scale-rewards must be auto or {' or '.join(estimator.scales)}"
        )
    if config.kl_in_reward and config.beta == 0:
        raise InputError("--kl-in-reward needs --beta > 0 (the KL coefficient)")
    if config.eval_data or config.eval_fraction:
        raise InputError(
            "grpo has no held-out loss to evaluate; measure the result with `rlkit eval OUT --prompts FILE --reward R`"
        )
    if config.ref and config.beta == 0:
        raise InputError(f"--ref {config.ref} is only used for the KL to the reference; give --beta > 0 as well")
    return weights


def run_grpo(config: GRPOConfig) -> Path | None:
    """Setup (tokenizer, prompts, policy, reference, rewards), train with the engine, write OUT
    (None: --dry-run showed the plan)."""
    # 1. check what the options' declarations cannot; the run's plan (what --dry-run shows); open the run
    weights = _check(config)
    plan = grpo_plan(config)
    if stop_for_dry_run(plan, config):
        return None
    run = TrainingRun(plan, config)
    set_seed(config.seed)
    world = run.accelerator.num_processes
    check_rollout_layout(config, world)
    # 2. the prompts that leave room for a completion, and how many GRPO steps they make
    tokenizer = run.load_tokenizer()
    template, prompts, encoded, agents = rollout_prompts(config, tokenizer)  # agents: --tools / --env
    if agents is not None and not config.reward and not (agents.environment and agents.environment.has_reward):
        raise InputError(f"missing --reward: --env {config.env} has no get_reward() to score its episodes")
    conversations = prompts.conversations
    prompts_per_step = prompts_per_rollout(config, world, len(conversations))
    steps = config.max_steps or config.epochs * (len(conversations) // prompts_per_step)
    info(
        f"prompts: {len(conversations)}; {steps} GRPO steps of {prompts_per_step} prompts x {config.num_generations} "
        f"completions, {config.num_iterations} update(s) each"
    )

    # 3. the models: rewards, policy, reference (for --beta)
    device = run.accelerator.device
    rewards = [
        load_reward(spec, tokenizer, template, run.weights_dtype, device, config.batch_size, config.trust_remote_code)
        for spec in config.reward
    ]
    names, sources = reward_names(config.reward), list(config.reward)
    environment = agents.environment if agents is not None else None
    if environment is not None and environment.has_reward:  # TRL: one more reward, weight 1, the class's name
        rewards.append(EnvironmentReward(environment))
        names.append(environment.name if environment.name not in names else f"{environment.name}_env")
        sources.append(f"{config.env}.get_reward")
        weights = [*weights, 1.0]
    reward_set = RewardSet(rewards, names, weights)
    policy = run.load_policy()
    if not plan.main.dropout:  # the ratio must be 1 before the first update
        disable_dropout(policy)
    reference, described = None, f"none ({plan.reference.why})" if plan.reference is not None else "none"
    if plan.has_reference:
        reference, described = on_the_fly_reference(
            config, run, policy, tokenizer, rollout_reference_spec(config.temperature)
        )
    info(f"reference: {described}")
    # critic-free: no value forward, no value loss; each group's prompt runs once per forward
    model = PolicyValue(policy, None, None)

    # 4. train: a rollout per GRPO step (GRPORollout), --num-iterations updates on it
    inputs = RolloutInputs(run.accelerator, tokenizer, prompts, encoded, run)
    assert plan.generation is not None
    algorithm = GRPORollout(config, inputs, reward_set, reference, plan.generation.rows, agents)
    objective = GRPOObjective(config)
    loop = RolloutSteps(algorithm, config, run, objective, steps, epochs=config.num_iterations, mini_batches=1)
    default_lr = 1e-5 if config.lora else 1e-6
    metrics = run.train(model, objective, loop, default_lr, engine_config=loop.engine_config)
    metrics["grpo_steps"] = steps

    # 5. OUT: the policy, its card
    scale, loss = algorithm.scale, policy_loss_record(config.loss_type)
    card = (
        "## GRPO\n\n"
        f"- rewards: {', '.join(f'`{s}` (weight {w:g})' for s, w in zip(sources, weights))}\n"
        + (f"- episodes: {agents.describe()}\n" if agents is not None else "")
        + f"- advantages: {config.advantage}, scaled by {scale}; {config.num_generations} completions per prompt\n"
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
