"""The options dpo, kto and train-rm share: preference data, and the frozen reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlkit.config import arg, opt
from rlkit.training.options import TrainConfig


@dataclass
class PairTrainConfig(TrainConfig):
    # Commands redefine `model` for their own help text; it keeps its place before PAIRS.
    model: Optional[str] = arg(
        "Model to start from: an HF dir, a hub name, a LoRA adapter dir or a .gguf file.", metavar="MODEL"
    )
    data: list[str] = arg(
        "Preference pairs: prompt/chosen/rejected (strings or messages; or chosen/rejected with an implicit prompt) "
        "as JSONL/JSON/Parquet/CSV files, save_to_disk dirs, dataset names, or a `rlkit pack` dir of pairs.",
        metavar="PAIRS...",
        default=[],
    )
    batch_size: int = opt(
        8, "Pairs per device per micro-batch (each pair is two sequences, chosen and rejected).", min=1
    )
    padding_free: bool = opt(
        True,
        "Lay the chosen and rejected sequences of a micro-batch end to end in rows, with per-sequence position_ids (--no-padding-free: one padded row per sequence).",
        panel="Speed and memory",
    )
    row_tokens: int = opt(
        0,
        "Width of a padding-free row in tokens (0: the longest sequence of the micro-batch; raise it with flash-attention, whose cost per row is linear).",
        min=0,
        panel="Speed and memory",
    )
    dropout: bool = opt(
        False,
        "Keep dropout active in training (off by default: pairs are compared through their log-probs or scores, and dropout only adds noise to them).",
        panel="Model and LoRA",
    )


@dataclass
class ReferenceConfig(PairTrainConfig):
    """The options of every trainer held to a frozen reference (dpo, kto)."""

    ref: Optional[str] = opt(
        None,
        "Reference model (HF dir, hub name, adapter dir or .gguf). Default: MODEL as it starts; with a fresh LoRA adapter, the base with the adapter disabled.",
        panel="Reference",
    )
    precompute_ref: bool = opt(
        True,
        "Compute the reference log-probs in one pass before training and cache them next to the data, so training holds no reference model (--no-precompute-ref: a reference forward every step).",
        panel="Reference",
    )
