"""A model's modes and device: what every trainer sets before its first step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

Batch = dict[str, Any]


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout layer (the model's and LoRA's) to p=0, as TRL does for DPO and reward models."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """No dropout while computing reference log-probs, whatever mode training left it in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
