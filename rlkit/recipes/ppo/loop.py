"""PPO's rollout: KL-shaped rewards and the advantage estimator of `--advantage`, on the shared seam.

Everything else of a rollout (prompt order, generation, first-EOS masks, the rollout-time
forward, scoring, mini-batches, the samples table) is `rlkit.training.rollout.RolloutSteps`'s.
"""

from __future__ import annotations

from typing import Any

import torch

from rlkit.data.formats import Messages
from rlkit.data.prompts import PromptRows
from rlkit.data.templates import ChatTemplate
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
from rlkit.training.rollout import Rollout, RolloutSteps


class PPOLoop(RolloutSteps):
    """The engine's `StepSource` for PPO: one rollout per PPO step, `--ppo-epochs` x `--mini-batches` updates on it."""

    name = "ppo"

    def __init__(
        self,
        config: PPOConfig,
        run: Any,
        tokenizer: Any,
        template: ChatTemplate,
        conversations: list[Messages],
        prompt_ids: list[list[int]],
        reward: Any,
        reference: Any,
        objective: Any,
        ppo_steps: int,
        prompts: PromptRows | None = None,
    ):
        """`prompts` (the loaded `PromptRows`, the same rows as `conversations`) give a reward
        function the prompts' other columns and their style, as grpo does."""
        super().__init__(
            config,
            run,
            tokenizer,
            conversations,
            prompt_ids,
            reward,
            reference,
            objective,
            ppo_steps,
            epochs=config.ppo_epochs,
            mini_batches=config.mini_batches,
            columns=prompts.columns if prompts is not None else None,
            conversational=prompts.conversational if prompts is not None else False,
        )
        self.template = template
        self.estimator = ADVANTAGE_ESTIMATORS[config.advantage]
        if config.target_kl:
            self.kl_ctl: Any = AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(config.kl_coef)

    def shape_scores(self, rollout: Rollout) -> torch.Tensor:
        """The missing-EOS penalty, `--score-norm` over the rollout of every process, `--score-clip`."""
        c, scores = self.c, super().shape_scores(rollout)
        if c.missing_eos_penalty:
            scores = torch.where(rollout.has_eos, scores, scores - c.missing_eos_penalty)
        if c.score_norm == "batch" and len(scores) * self.acc.num_processes > 1:
            scores = standardise_scores(scores, reduce=self.across())
        if c.score_clip > 0:
            scores = scores.clamp(-c.score_clip, c.score_clip)
        return scores

    def advantages(self, rollout: Rollout, wrapper: torch.nn.Module) -> None:
        """Per-token rewards (score at the last token, -beta x KL on each), the estimator, the KL controller."""
        c, acc, across, mask = self.c, self.acc, self.across(), rollout.response_mask
        assert rollout.old_logprobs is not None and rollout.ref_logprobs is not None and rollout.scores is not None
        kl_coef = float(wrapper.kl_coef)
        kl = kl_penalty(rollout.old_logprobs, rollout.ref_logprobs, c.kl_estimator)
        rewards, non_score = per_token_rewards(rollout.scores, kl, mask, kl_coef)
        if c.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, reduce=across)
        params = {name: getattr(c, name) for name in self.estimator.params}
        rollout.advantages, rollout.returns = self.estimator.fn(rewards, mask, rollout.values, across, **params)
        rollout.rewards = rewards
        seq_kl = torch.where(mask.bool(), kl, 0).sum(1)
        mean_kl = (
            float(acc.reduce(seq_kl.mean().detach(), reduction="mean"))
            if acc.num_processes > 1
            else float(seq_kl.mean())
        )
        self.kl_ctl.value = kl_coef
        self.kl_ctl.update(mean_kl, self.rollout_size * acc.num_processes)
        wrapper.kl_coef.fill_(self.kl_ctl.value)
        rollout.extras["non_score_reward"] = non_score
        rollout.stats.update({"kl": mean_kl, "kl_coef": kl_coef})

    def summary(self, rollout: Rollout) -> dict[str, float]:
        """The shared summary plus the shaped score, the KL and its coefficient, the value function's fit."""
        metrics = super().summary(rollout)
        across, mask = self.across(), rollout.response_mask
        shaped, non_score = self.gather(rollout.scores), self.gather(rollout.extras["non_score_reward"])
        metrics.update(
            {
                "score/shaped_mean": float(shaped.mean()),
                **rollout.stats,
                "non_score_reward": float(non_score.mean()),
                "rlhf_reward": float(shaped.mean() + non_score.mean()),
            }
        )
        if rollout.values is not None:
            token_sums = torch.stack(
                [torch.where(mask.bool(), rollout.values, 0).sum(), mask.sum().to(rollout.values.dtype)]
            )
            value_sum, n_tokens = (across(token_sums) if across else token_sums).tolist()
            metrics["explained_variance"] = float(
                explained_variance(rollout.values, rollout.returns, mask, reduce=across)
            )
            metrics["value/mean"] = value_sum / max(n_tokens, 1.0)
        return metrics
