"""The options of `rlkit train-rm`, importable without torch so that `--help` starts at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlkit.config import arg, opt
from rlkit.preference.config import PairTrainConfig


@dataclass
class RewardModelConfig(PairTrainConfig):
    model: Optional[str] = arg(
        "Model to start from (its LM head is replaced by a one-score head): an HF dir, a hub name, a LoRA adapter dir "
        "(e.g. `rlkit sft --lora` output, merged into its base first) or a .gguf file.",
        metavar="MODEL",
    )
    center_rewards: float = opt(
        0.0,
        "COEF: add COEF x mean((r_chosen + r_rejected)^2) to the loss, keeping scores centred on 0 (Eisenstein et al. 2023; 0.01 is usual).",
        min=0,
    )
    merge: bool = opt(
        True,
        "With LoRA, write a full sequence-classification model with the adapter merged (--no-merge: the adapter, score head included).",
    )
