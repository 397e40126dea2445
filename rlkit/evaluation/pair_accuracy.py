"""Accuracy on preference pairs: of a reward model's scores, or of a policy's implicit reward.

Both use the pair tokenisation of training (`rlkit.data.pairs`), so a pair is scored here
exactly as train-rm / dpo scored it on their eval split. Ties count 1/2 (`implicit_reward_
accuracy`), so a model with no preference reads 50%.

The implicit reward of a DPO/KTO policy is r(x, y) = β (log π(y|x) − log π_ref(y|x)), with
log-probs summed over the completion tokens (`rlkit.preference.logps`). Its reference is `--ref`,
or, for an adapter policy, the base with the adapter disabled (no second copy of the base):
the strategies, and the tokenizer check, of `rlkit.preference.reference`, as in training.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import Any

import torch

from rlkit.console import info, warn
from rlkit.data.pairs import collate_pairs, tokenize_pairs
from rlkit.errors import InputError
from rlkit.losses.preference import implicit_reward_accuracy
from rlkit.models.modes import model_device, to_device
from rlkit.preference.reference import PAIR_LOGPS, Reference
from rlkit.scoring import RewardScorer


def tokenized_pairs(
    records: list[dict[str, Any]], tokenizer: Any, template: Any, max_length: int, source: str
) -> list[dict[str, Any]]:
    rows, stats = tokenize_pairs(records, tokenizer, template, max_length, source)
    if stats.dropped:
        warn(
            f"{source}: {stats.dropped} pair(s) dropped: their prompt alone fills --max-length {max_length} (record {stats.dropped_records[0]})"
        )
    if stats.truncated:
        warn(f"{source}: {stats.truncated} pair(s) truncated at --max-length {max_length}")
    if not rows:
        raise InputError(f"{source}: no pair left to evaluate within --max-length {max_length}")
    return rows


def ties_kept(rows: list[dict[str, Any]], chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """The rejected scores, with a pair whose two sides are the same tokens given its chosen score:
    such a pair is a tie (1/2) whatever the model, but its two copies sit at other places of a
    padding-free batch, where the kernels of some CPUs round their scores apart in the last bit."""
    same = torch.tensor([r["chosen_input_ids"] == r["rejected_input_ids"] for r in rows], dtype=torch.bool)
    return torch.where(same, chosen, rejected)


def _batches(rows: list[dict[str, Any]], size: int, pad_id: int) -> Iterator[dict[str, Any]]:
    for start in range(0, len(rows), size):
        yield collate_pairs(rows[start : start + size], pad_id)


def summarise(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    margins = chosen - rejected
    return {
        "pairs": int(chosen.numel()),
        "accuracy": float(implicit_reward_accuracy(chosen, rejected).double().mean()),
        "margin_mean": float(margins.mean()),
        "margin_median": float(statistics.median(margins.tolist())),
        "chosen_mean": float(chosen.mean()),
        "rejected_mean": float(rejected.mean()),
    }


@torch.no_grad()
def reward_model_scores(
    model: Any, rows: list[dict[str, Any]], pad_id: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected scores of every pair, [N] each, by the scorer train-rm trains (and ppo uses)."""
    scorer = RewardScorer(model, pad_id)
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for batch in _batches(rows, batch_size, pad_id):
        batch = to_device(batch, device)
        pairs = int(batch["num_pairs"])
        scores = scorer(batch["input_ids"], batch["position_ids"], batch["seq_index"], 2 * pairs).float().cpu()
        chosen.append(scores[:pairs])
        rejected.append(scores[pairs:])
    first = torch.cat(chosen)
    return first, ties_kept(rows, first, torch.cat(rejected))


@torch.no_grad()
def summed_logps(
    model: Any, rows: list[dict[str, Any]], pad_id: int, batch_size: int, reference: Reference | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of chosen and rejected, [N] each (float64 on CPU): the model's
    own, or, given its `reference` (a `PAIR_LOGPS` strategy), the reference's."""
    device = model_device(model)
    chosen, rejected = [], []
    for batch in _batches(rows, batch_size, pad_id):
        batch = to_device(batch, device)
        first, second = reference.logps(model, batch) if reference is not None else PAIR_LOGPS.measure(model, batch)
        chosen.append(first.double().cpu())
        rejected.append(second.double().cpu())
    first = torch.cat(chosen)
    return first, ties_kept(rows, first, torch.cat(rejected))


def implicit_reward_metrics(
    policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor], beta: float
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Metrics of the implicit rewards, and the chosen/rejected rewards themselves."""
    chosen = beta * (policy[0] - reference[0])
    rejected = beta * (policy[1] - reference[1])
    metrics = summarise(chosen, rejected)
    metrics |= {
        "logps_chosen_mean": float(policy[0].mean()),
        "logps_rejected_mean": float(policy[1].mean()),
        "beta": beta,
    }
    info(f"implicit rewards of {metrics['pairs']} pairs computed")
    return metrics, chosen, rejected
