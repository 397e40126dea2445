"""The options of `rlkit kto`, importable without torch so that `--help` starts at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlkit.config import arg, opt
from rlkit.preference.config import ReferenceConfig


@dataclass
class KTOConfig(ReferenceConfig):
    model: Optional[str] = arg(
        "Policy to start from: an HF dir, a hub name, a LoRA adapter dir (continued; its frozen start is the reference) "
        "or a .gguf file. For iterated KTO, the previous round's output, also given as --ref.",
        metavar="MODEL",
    )
    data: list[str] = arg(
        "Unpaired feedback: prompt/completion/label (label true = desirable), or preference pairs (each split into a "
        "desirable chosen and an undesirable rejected example); JSONL/JSON/Parquet/CSV files, save_to_disk dirs, "
        "dataset names, or a `rlkit pack` dir (of unpaired examples or of pairs).",
        metavar="DATA...",
        default=[],
    )
    batch_size: int = opt(
        8,
        "Examples per device per micro-batch, at least 2: z0 is averaged over the micro-batch's mismatched pairs (and over processes).",
        min=1,  # 1 is refused by kto itself, with the reason (z0 needs a mismatched pair)
    )
    loss: str = opt(
        "kto",
        "kto (Kahneman-Tversky, rewards against the KL reference point z0) or apo_zero_unpaired (APO-zero, one side "
        "per example: rewards anchored at 0, so no z0 is estimated and the policy's mismatched forward is skipped).",
        choices=("kto", "apo_zero_unpaired"),
    )
    beta: float = opt(
        0.1, "β: how strongly the policy is held to the reference; scales the implicit reward log π/π_ref.", above=0
    )
    desirable_weight: float = opt(
        1.0,
        "λ_D, the weight of desirable examples' losses. Keep λ_D·n_D/(λ_U·n_U) in [1, 4/3] (the paper's advice; rlkit warns and suggests weights otherwise).",
        above=0,
    )
    undesirable_weight: float = opt(1.0, "λ_U, the weight of undesirable examples' losses.", above=0)
