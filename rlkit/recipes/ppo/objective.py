"""PPO's update step: the clipped policy loss, plus the clipped value loss where there is a value function."""

from __future__ import annotations

from typing import Any

import torch

from rlkit.losses.ppo import clipped_policy_loss, clipped_value_loss, masked_mean
from rlkit.training.engine import StepOutput


class PPOObjective:
    """Clipped policy loss + vf_coef x clipped value loss on one micro-batch of a rollout.

    Losses are token means over the micro-batch's response tokens; the engine gets them as sums
    (x tokens) and divides by the tokens of the whole update, so an update is a token mean.
    Without a value function (the module's values are None) there is no value loss. Keeps
    running sums of its metrics over an RL step, for the per-step summary (`take_means`).

    Another recipe reuses it as it is (masks, ratio, the clip) or overrides `policy_loss` for
    another per-token surrogate; `config` needs `temperature`, `cliprange`, and with a value
    function `cliprange_value` and `vf_coef`.
    """

    #: the per-RL-step means are logged as PREFIX/NAME
    prefix = "ppo"

    def __init__(self, config: Any):
        self.c = config
        self.totals: dict[str, float] = {}

    def weight(self, batch: dict[str, Any]) -> float:
        return float(batch["response_mask"].sum())

    def policy_loss(
        self, logprobs: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(token-mean loss, token-mean metrics) of the policy on the micro-batch."""
        pg_loss, clipfrac, approx_kl = clipped_policy_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], batch["response_mask"], self.c.cliprange
        )
        return pg_loss, {"policy_loss": pg_loss.detach(), "clipfrac": clipfrac, "approx_kl": approx_kl}

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        c, mask = self.c, batch["response_mask"]
        logprobs, entropies, values = model(
            batch["input_ids"], batch["attention_mask"], batch["responses"], c.temperature
        )
        pg_loss, means = self.policy_loss(logprobs, batch)
        loss = pg_loss
        if values is not None:
            vf_loss, vf_clipfrac = clipped_value_loss(
                values, batch["old_values"], batch["returns"], mask, c.cliprange_value
            )
            loss = pg_loss + c.vf_coef * vf_loss
            means.update({"value_loss": vf_loss.detach(), "value_clipfrac": vf_clipfrac})
        with torch.no_grad():
            means["entropy"] = masked_mean(entropies, mask)
            log_ratio = torch.where(mask.bool(), logprobs.detach() - batch["old_logprobs"], 0)
            means["ratio"] = masked_mean(torch.exp(log_ratio), mask)
        n = mask.sum().to(pg_loss.dtype)
        metrics = {key: value * n for key, value in means.items()}
        self.totals["tokens"] = self.totals.get("tokens", 0.0) + float(n)
        for key, value in metrics.items():
            self.totals[key] = self.totals.get(key, 0.0) + float(value)
        return StepOutput(loss=loss * n, metrics=metrics)

    def take_means(self) -> dict[str, float]:
        n = max(self.totals.pop("tokens", 0.0), 1e-12)
        means = {f"{self.prefix}/{k}": v / n for k, v in self.totals.items()}
        self.totals = {}
        return means
