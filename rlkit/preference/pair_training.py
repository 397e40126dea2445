"""What `dpo` and `train-rm` share: their common options, their data, their batches.

Both read preference pairs, tokenised once (cached, or from a `rlkit pack` dir) and batched
chosen-and-rejected in one forward, padding-free by default (see `rlkit.data.pairs`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from rlkit.console import info, warn
from rlkit.data.pairs import collate_pairs, describe_pair_data
from rlkit.data.prepare import DataOptions, PreparedData, prepare_pair_data
from rlkit.preference.config import PairTrainConfig
from rlkit.training.run import TrainingRun


def load_pairs(run: TrainingRun, config: PairTrainConfig, tokenizer: Any, model_name: str) -> PreparedData:
    """Tokenised pairs (train + eval), with a summary and a warning for any dropped pair."""
    opts = DataOptions.of(config)
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
