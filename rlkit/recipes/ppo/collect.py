"""PPO's rollout, stage by stage: sample, the rollout-time forward, score, KL-shaped advantages.

The stages and their records are `rlkit.training.rollout`'s; this module adds what is PPO's own:
the score shaping (missing-EOS penalty, --score-norm, --score-clip), the per-token rewards
(the score at the last token, -beta x KL on each), the advantage estimator of --advantage, the KL
controller, and what a PPO step logs and shows.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rlkit.losses.advantages import ADVANTAGE_ESTIMATORS, masked_whiten
from rlkit.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    kl_penalty,
    per_token_rewards,
    standardise_scores,
)
from rlkit.recipes.ppo_config import PPOConfig
from rlkit.scoring import RewardSet
from rlkit.training.rollout import (
    Advantages,
    Rollout,
    RolloutForward,
    RolloutInputs,
    RolloutSampling,
    Samples,
    Scored,
    entropy_and_length,
    prompt_indices,
    rollout_forward,
    sample,
    score_samples,
)

KLController = FixedKLController | AdaptiveKLController


def kl_controller(config: PPOConfig) -> KLController:
    """--kl-coef fixed, or adapted towards --target-kl over --kl-horizon (a checkpointed object)."""
    if config.target_kl:
        return AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
    return FixedKLController(config.kl_coef)


class PPORollout:
    """PPO's `rlkit.training.rollout_steps.OnPolicyAlgorithm`: one rollout per PPO step."""

    name = "ppo"

    def __init__(
        self,
        config: PPOConfig,
        inputs: RolloutInputs,
        rewards: RewardSet,
        reference: Any,
        controller: KLController,
        generation_rows: int,
    ):
        """`rewards`: the one --reward (PPO's must score every completion); `reference` measures
        `rollout_reference_spec`; `controller` the KL coefficient, updated after every rollout;
        `generation_rows` the rows per `generate` call, as the run's plan has them."""
        self.c, self.inputs, self.rewards, self.reference, self.controller = (
            config,
            inputs,
            rewards,
            reference,
            controller,
        )
        self.estimator = ADVANTAGE_ESTIMATORS[config.advantage]
        self.rollout_size = config.batch_size * config.grad_accum * config.mini_batches
        self.sampling = RolloutSampling(
            config.max_new_tokens, config.temperature, config.top_p, None, chunk=generation_rows
        )

    def prompt_indices(self, rl_step: int) -> list[int]:
        acc = self.inputs.accelerator
        n = len(self.inputs.prompts.conversations)
        return prompt_indices(n, rl_step, self.c.seed, self.rollout_size, 1, acc.process_index, acc.num_processes)

    def collect(self, rl_step: int, wrapper: torch.nn.Module) -> Rollout:
        c, inputs = self.c, self.inputs
        # 1. sample a response to each of this process's prompts (the running generator)
        samples = sample(inputs, wrapper, self.prompt_indices(rl_step), rl_step, self.sampling)
        # 2. the policy's log-probs, entropy and values, the reference's log-probs: no gradient
        forward = rollout_forward(inputs, wrapper, samples, c.batch_size, c.temperature, self.reference)
        # 3. the reward, shaped: missing-EOS penalty, --score-norm over every process, --score-clip
        scored = self.score(samples)
        # 4. per-token rewards with the KL penalty, the estimator's advantages, the KL controller's update
        advantages = self.estimate(samples, forward, scored)
        return Rollout(samples, forward, scored, advantages, rollout_s=0.0)

    def score(self, samples: Samples) -> Scored:
        c, t0 = self.c, time.time()
        per_reward = score_samples(self.inputs, samples, self.rewards)
        reward = per_reward[:, 0]
        scores = reward.clone()
        if c.missing_eos_penalty:
            scores = torch.where(samples.has_eos, scores, scores - c.missing_eos_penalty)
        if c.score_norm == "batch" and len(scores) * self.inputs.accelerator.num_processes > 1:
            scores = standardise_scores(scores, reduce=self.inputs.across())
        if c.score_clip > 0:
            scores = scores.clamp(-c.score_clip, c.score_clip)
        return Scored(per_reward, reward, scores, {}, time.time() - t0)

    def estimate(self, samples: Samples, forward: RolloutForward, scored: Scored) -> Advantages:
        c, inputs, mask = self.c, self.inputs, samples.response_mask
        acc, across = inputs.accelerator, inputs.across()
        assert forward.old_logprobs is not None and forward.ref_logprobs is not None
        kl_coef = self.controller.value
        kl = kl_penalty(forward.old_logprobs, forward.ref_logprobs, c.kl_estimator)
        rewards, non_score = per_token_rewards(scored.shaped, kl, mask, kl_coef)
        if c.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, reduce=across)
        params = {name: getattr(c, name) for name in self.estimator.params}
        advantages, returns = self.estimator.fn(rewards, mask, forward.values, across, **params)
        seq_kl = torch.where(mask.bool(), kl, 0).sum(1)
        mean_kl = (
            float(acc.reduce(seq_kl.mean().detach(), reduction="mean"))
            if acc.num_processes > 1
            else float(seq_kl.mean())
        )
        self.controller.update(mean_kl, self.rollout_size * acc.num_processes)
        non_score_mean = float(inputs.gather(non_score).mean())
        metrics = {"kl": mean_kl, "kl_coef": kl_coef, "non_score_reward": non_score_mean}
        return Advantages(advantages, returns, mask, metrics)

    def summary(self, rollout: Rollout) -> dict[str, float]:
        """The score (as given and shaped), entropy, length, the KL and its coefficient, the value function's fit, times."""
        inputs, s, f = self.inputs, rollout.samples, rollout.forward
        assert f.entropy is not None
        all_scores = inputs.gather(rollout.scored.combined)
        entropy, length = entropy_and_length(inputs, s, f.entropy)
        t = {"generation_s": s.generation_s, "forward_s": f.forward_s, "scoring_s": rollout.scored.scoring_s}
        shaped = inputs.gather(rollout.scored.shaped)
        est = rollout.advantages.metrics
        metrics = {
            "score/mean": float(all_scores.mean()),
            "score/std": float(all_scores.std()) if len(all_scores) > 1 else 0.0,
            "entropy": entropy,
            "response_length": length,
            "eos_rate": float(inputs.gather(s.has_eos.float()).mean()),
            "response_tokens": float(s.response_mask.sum(1).float().sum()),
            **{f"time/{k}": v for k, v in t.items()},
            "time/rollout_s": rollout.rollout_s,
            "generation_tokens_per_s": float(s.responses.numel()) / max(s.generation_s, 1e-9),
            "score/shaped_mean": float(shaped.mean()),
            "kl": est["kl"],
            "kl_coef": est["kl_coef"],
            "non_score_reward": est["non_score_reward"],
            "rlhf_reward": float(shaped.mean() + est["non_score_reward"]),
        }
        if f.values is not None:
            across, mask = inputs.across(), s.response_mask
            returns = rollout.advantages.returns
            token_sums = torch.stack([torch.where(mask.bool(), f.values, 0).sum(), mask.sum().to(f.values.dtype)])
            value_sum, n_tokens = (across(token_sums) if across else token_sums).tolist()
            metrics["explained_variance"] = float(explained_variance(f.values, returns, mask, reduce=across))
            metrics["value/mean"] = value_sum / max(n_tokens, 1.0)
        return metrics

    def sample_rows(self, rollout: Rollout) -> list[dict[str, Any]]:
        s = rollout.samples
        return [
            {"prompt": messages[-1]["content"], "response": completion, "score": score}
            for messages, completion, score in zip(s.conversations, s.completions, rollout.scored.combined.tolist())
        ]

    def step_line(self, rl_step: int, metrics: dict[str, float], generation_s: float, training_s: float) -> str:
        nan = float("nan")
        return (
            f"ppo step {rl_step + 1}: score {metrics.get('score/mean', nan):.3f} ± {metrics.get('score/std', nan):.3f}  "
            f"kl {metrics['kl']:.3f}  entropy {metrics.get('entropy', nan):.3f}  len {metrics.get('response_length', nan):.1f}  "
            f"gen {generation_s:.1f}s train {training_s:.1f}s"
        )
