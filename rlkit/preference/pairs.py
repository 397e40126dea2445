"""What `dpo` and `train-rm` share: their common options, their data, their batches.

Both read preference pairs, tokenised once (cached, or from a `rlkit pack` dir) and batched
chosen-and-rejected in one forward, padding-free by default (see `rlkit.data.pairs`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from rlkit.config import arg, opt
from rlkit.console import info, warn
from rlkit.data.pairs import collate_pairs, describe_pair_data
from rlkit.data.prepare import DataOptions, PreparedData, prepare_pair_data
from rlkit.training.options import TrainConfig
from rlkit.training.run import TrainingRun


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
    batch_size: int = opt(8, "Pairs per device per micro-batch (each pair is two sequences, chosen and rejected).")
    padding_free: bool = opt(
        True,
        "Lay the chosen and rejected sequences of a micro-batch end to end in rows, with per-sequence position_ids (--no-padding-free: one padded row per sequence).",
    )
    row_tokens: int = opt(
        0,
        "Width of a padding-free row in tokens (0: the longest sequence of the micro-batch; raise it with flash-attention, whose cost per row is linear).",
    )
    dropout: bool = opt(
        False,
        "Keep dropout active in training (off by default: pairs are compared through their log-probs or scores, and dropout only adds noise to them).",
    )


def load_pairs(run: TrainingRun, config: PairTrainConfig, tokenizer: Any, model_name: str) -> PreparedData:
    """Tokenised pairs (train + eval), with a summary and a warning for any dropped pair."""
    opts = DataOptions(
        sources=config.data,
        max_length=config.max_length,
        template=config.template,
        columns=config.columns,
        eval_data=config.eval_data,
        eval_fraction=config.eval_fraction,
        seed=config.seed,
    )
    with run.accelerator.main_process_first():
        data = prepare_pair_data(opts, tokenizer, model_name)
    line, warnings = describe_pair_data(data.metadata)
    info(line)
    for message in warnings:
        warn(message)
    return data


def pair_collate(config: PairTrainConfig, tokenizer: Any) -> Callable[[Any], dict[str, Any]]:
    return functools.partial(
        collate_pairs,
        pad_id=tokenizer.pad_token_id,
        padding_free=config.padding_free,
        capacity=config.row_tokens or None,
    )
