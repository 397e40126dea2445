"""Models loaded to be used, not trained: chat, eval and merge-lora share this.

Training loads a policy in float32 on CPU and lets accelerate place it; inference wants it on
the fastest device, in eval mode, with no gradients, and needs to know what kind of model a
directory holds (a causal LM or a one-score sequence classifier) before loading it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlkit.errors import InputError
from rlkit.hardware import cpu_bf16_hint
from rlkit.models.load import (  # noqa: F401  (adapter_config, is_reward_model re-exported: chat, eval, merge)
    ModelSource,
    adapter_config,
    is_reward_model,
    load_causal_lm,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inference_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def inference_dtype(name: str = "auto") -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it, float32 elsewhere (CPU bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise InputError(f"--dtype {name!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_hint(name: str) -> str | None:
    """A line for inference left at `--dtype auto` (float32) on a bf16-capable CPU; `auto` means
    the same on every CPU."""
    return cpu_bf16_hint("--dtype bfloat16", "generated with SmolLM2-135M 1.5x faster") if name == "auto" else None


def load_causal_lm_for_inference(source: ModelSource, dtype: torch.dtype | None = None) -> torch.nn.Module:
    model = load_causal_lm(source, dtype or inference_dtype())
    return model.to(inference_device()).eval().requires_grad_(False)


def adapter_score_labels(adapter_dir: str) -> int:
    """How many scores the adapter's saved head gives (its `score` weight's rows); 1 when unknown."""
    from safetensors import safe_open

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        return 1
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            if key.endswith("score.weight") or key.endswith("score.modules_to_save.weight"):
                return int(handle.get_slice(key).get_shape()[0])
    return 1
