"""SFT loss and perplexity: mean negative log-likelihood per trainable token, as `rlkit sft` trains it.

The data goes through SFT's own tokenisation (`build_sft_data`, unpacked), so the loss is on
exactly the tokens training puts a label on (completion/assistant tokens of chat data, every
token of `text` data) and is comparable with the eval loss in a run's metrics.jsonl.
Perplexity is exp(loss) over all those tokens together (a token-weighted mean, not a mean
of per-example perplexities).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlkit.data.collate import collate_rows
from rlkit.data.prepare import DataOptions, build_sft_data
from rlkit.errors import RunError
from rlkit.training.logprobs import label_logprobs


def sft_rows(
    path: str, tokenizer: Any, name: str, template: str | None, columns: str | None, max_length: int, limit: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    opts = DataOptions(sources=[path], max_length=max_length, template=template, columns=columns, packing=False)
    data = build_sft_data(opts, tokenizer, name)
    rows = data.train.select(range(min(limit, len(data.train)))) if limit else data.train
    return [dict(r) for r in rows], data.metadata


@torch.no_grad()
def sft_metrics(model: Any, rows: list[dict[str, Any]], pad_id: int, batch_size: int) -> dict[str, float]:
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate_rows(rows[start : start + batch_size], pad_id)
        logps, mask = label_logprobs(
            model, batch["input_ids"].to(device), batch["position_ids"].to(device), batch["labels"].to(device)
        )
        total -= float(logps.double().sum())
        tokens += int(mask.sum())
    loss = total / max(tokens, 1)
    if not math.isfinite(loss):
        raise RunError("the loss is not finite (NaN/inf); check the model's weights and --dtype")
    return {"examples": len(rows), "tokens": tokens, "loss": loss, "perplexity": math.exp(min(loss, 700.0))}
