"""Batch rows of (input_ids, labels, position_ids) into tensors without an attention mask.

Padding goes on the right with its own restarting positions, so it forms a separate
"sequence" that no real token can attend to (it comes after them, and the mask is causal);
the same collator serves packed rows and one-example rows.
"""

from __future__ import annotations

from typing import Any

import torch

from rlkit.data.tokenize import IGNORE


def collate_rows(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"])
        labels[i, :n] = torch.as_tensor(row["labels"])
        position_ids[i, :n] = torch.as_tensor(row["position_ids"])
        position_ids[i, n:] = torch.arange(width - n)
    num_tokens = sum(len(r["input_ids"]) for r in rows)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "num_tokens": num_tokens}
