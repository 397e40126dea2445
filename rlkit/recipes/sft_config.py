"""The options of `rlkit sft`, importable without torch so that `--help` starts at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlkit.config import arg, opt
from rlkit.training.options import TrainConfig


@dataclass
class SFTConfig(TrainConfig):
    model: Optional[str] = arg(
        "Model to fine-tune: an HF dir, a hub name, a LoRA adapter dir or a .gguf file.", metavar="MODEL"
    )
    data: list[str] = arg(
        "Training data: JSONL/JSON/Parquet/CSV files, save_to_disk dirs, dataset names, or a `rlkit pack` dir.",
        metavar="DATA...",
        default=[],
    )
    packing: bool = opt(
        True, "Pack examples into rows of --max-length (best-fit-decreasing, attention kept per example)."
    )
    completion_only: bool = opt(
        True, "Put the loss on completion/assistant tokens only (--no-completion-only: every token)."
    )
