"""Generation quality: sample from a policy, score, and compare with a reference and a baseline.

- score: the reward of each completion (mean and median);
- length: generated tokens per completion (EOS included when the model produced it);
- KL: the sequence-level KL estimate of PPO papers, mean over samples of
  Σ_t [log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)] over the generated tokens, with both
  log-probs at temperature 1. It is an unbiased estimate of KL(π || π_ref) only when the
  samples come from π itself, i.e. with --temperature 1 and --top-p 1; greedy decoding
  gives a "KL on the greedy completion", still useful to compare runs made the same way.
- win rate: the baseline generates on the same prompts with the same settings; a win is a
  higher score, a tie counts 1/2.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from rlkit.data.collate import collate_rows
from rlkit.data.tokenize import IGNORE
from rlkit.models.modes import model_device, to_device
from rlkit.preference.reference import LogpsSpec, Reference
from rlkit.tools.generation import GeneratedReply
from rlkit.training.logprobs import label_logprobs


def score_summary(scores: list[float]) -> dict[str, float]:
    return {
        "score_mean": statistics.fmean(scores),
        "score_median": float(statistics.median(scores)),
        "score_std": statistics.pstdev(scores),
    }


def win_rate(policy: list[float], baseline: list[float]) -> float:
    """Fraction of prompts where the policy's score beats the baseline's; ties count 1/2."""
    wins = [1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy, baseline, strict=True)]
    return statistics.fmean(wins)


def _completion_sums(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Each row's summed completion log-probs; the prompt tokens all rows start with (a system prompt,
    tool schemas) run once, in this call, under whichever weights `model` has now (a reference's too)."""
    logps, _ = label_logprobs(model, batch["input_ids"], batch["position_ids"], batch["labels"], reuse_prefix=True)
    return logps.double().sum(dim=1)


COMPLETION_LOGPS = LogpsSpec(_completion_sums, unit="completions")  # what eval's reference measures for the KL


@torch.no_grad()
def completion_logps(
    model: Any, rollouts: list[GeneratedReply], pad_id: int, batch_size: int, reference: Reference | None = None
) -> list[float]:
    """log π(completion | prompt) summed over each rollout's generated tokens (the model's own
    tokens of an episode with tools, not its tool turns): the model's own, or, given its
    `reference` (a `COMPLETION_LOGPS` strategy), the reference's."""
    device = model_device(model)
    sums: list[float] = []
    for start in range(0, len(rollouts), batch_size):
        rows = []
        for r in rollouts[start : start + batch_size]:
            ids = r.prompt_ids + r.completion_ids
            rows.append(
                {
                    "input_ids": ids,
                    "labels": [IGNORE] * len(r.prompt_ids) + r.sampled_labels,
                    "position_ids": list(range(len(ids))),
                }
            )
        batch = to_device(collate_rows(rows, pad_id), device)
        measured = reference.logps(model, batch) if reference is not None else _completion_sums(model, batch)
        sums += measured.cpu().tolist()
    return sums


def kl_summary(per_sample: list[float]) -> dict[str, float]:
    """Mean and median of the per-sample sums of log π − log π_ref."""
    return {"kl_mean": statistics.fmean(per_sample), "kl_median": float(statistics.median(per_sample))}
