"""Summed completion log-probs of both sides of every pair, in one forward pass.

The batch comes from `rlkit.data.pairs.collate_pairs` (padding-free or padded, the result is
the same). Log-probs are taken per labelled token by `label_logprobs` (label shift there,
logits only at labelled positions), then summed per sequence with `index_add` on the
batch's `seq_index`: prompt tokens, template markup and padding carry no label, so they are
never counted. Losses that are defined length-normalised divide by `*_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlkit.data.pairs import sequence_sums
from rlkit.training.logprobs import label_logprobs


@dataclass
class PairLogps:
    """Per-pair [B] tensors: summed completion log-probs and completion token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def normalised(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean per-token log-probs (for the losses in rlkit.losses.LENGTH_NORMALISED)."""
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, Any], num_sequences: int, prefix: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs [num_sequences] of the sequences laid out under `prefix`
    (see `rlkit.data.pairs.collate_sequences`), and their completion token counts."""
    logps, mask = label_logprobs(
        model, batch[f"{prefix}input_ids"], batch[f"{prefix}position_ids"], batch[f"{prefix}labels"]
    )
    return sequence_sums(logps, batch[f"{prefix}seq_index"][:, 1:].to(logps.device), mask, num_sequences)


def pair_logps(model: torch.nn.Module, batch: dict[str, Any]) -> PairLogps:
    """log π(completion | prompt), summed over completion tokens, for chosen and rejected."""
    pairs = int(batch["num_pairs"])
    sums, counts = sequence_logps(model, batch, 2 * pairs)
    return PairLogps(sums[:pairs], sums[pairs:], counts[:pairs], counts[pairs:])
