"""Per-token log-probabilities of the labelled tokens, computing logits only where needed.

Labels are aligned with input_ids (the HF convention); the logits at position t score the
token at t+1, so the shift happens here, once. Passing `logits_to_keep` with the positions that
have a label skips the vocabulary projection (the largest matmul of a small model) on prompt
and padding positions, and keeps the full [batch, length, vocab] logits out of memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlkit.data.tokenize import IGNORE


def label_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps, mask), both [batch, length-1]: log p(labels[t+1] | ids[:t+1]); 0 where unlabelled.

    No attention mask is passed, so transformers derives a block-diagonal causal mask from
    the restarting `position_ids` (packed rows, or padding after a single example).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE
    keep = mask.any(dim=0).nonzero().squeeze(1)
    out = model(input_ids=input_ids, position_ids=position_ids, logits_to_keep=keep, use_cache=False)
    logits = out.logits.to(torch.promote_types(out.logits.dtype, torch.float32))  # bf16 up to fp32; fp64 stays
    kept_targets = targets[:, keep]
    token_logps = -F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), kept_targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(kept_targets.shape)
    logps = torch.zeros(targets.shape, dtype=token_logps.dtype, device=token_logps.device)
    logps[:, keep] = token_logps
    return logps * mask, mask
