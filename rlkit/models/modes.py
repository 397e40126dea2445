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


@contextlib.contextmanager
def adapter_frozen_in_use(peft_model: Any, adapter: str | None) -> Iterator[None]:
    """A PEFT model's forwards run as a frozen model: as the frozen `adapter` loaded beside the trained
    one, or as the bare base (`adapter` None: every adapter off); in eval mode, and switched back to
    the trained adapter afterwards, whatever happens. How a reference or a teacher that is the
    trained model's base (or an adapter on it) runs without a second copy of the base."""
    if adapter is None:
        with eval_mode(peft_model), peft_model.disable_adapter():
            yield
        return
    trained = peft_model.active_adapter
    with eval_mode(peft_model):
        peft_model.set_adapter(adapter, inference_mode=True)  # its weights stay frozen
        try:
            yield
        finally:
            peft_model.set_adapter(trained)


def load_frozen_adapter(peft_model: Any, adapter_dir: str, name: str) -> None:
    """Load `adapter_dir` beside the trained adapter as `name`, frozen, leaving the trained one active
    (for `adapter_frozen_in_use`; `drop_frozen_adapters` removes it before the result is saved)."""
    trained = peft_model.active_adapter
    peft_model.load_adapter(adapter_dir, adapter_name=name, is_trainable=False)
    peft_model.set_adapter(trained)
