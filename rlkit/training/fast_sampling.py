"""Cheaper CPU decoding for on-policy sampling, the same distribution as transformers' `generate`.

Two costs of a decoding step of a small model on one CPU thread are not the model's arithmetic
(SmolLM2-135M, 8 rows, fp32, measured on this project's 2-core Xeon):

- top-p's sort. transformers' `TopPLogitsWarper` sorts every row's [V] logits with `torch.sort`:
  ~31 ms for 8 x 49,152 per decoding step, a sixth of the step. numpy's sort of the same rows
  (its AVX-512 quicksort) takes ~7 ms. `SamplingWarper` applies transformers' temperature, top-k
  and top-p warpers in transformers' order with transformers' own arithmetic, only the sort is
  numpy's: the sorted logits, their softmax and cumulative sum are the same numbers, so the same
  tokens are removed, except where two tokens with exactly equal logits straddle the nucleus's
  edge (which of them is kept then follows the sort's tie order, which torch's unstable sort
  does not define either).
- the weights' layout. A [8, K] x [N, K]ᵀ product (`F.linear`) runs ~2x slower in MKL than the
  same product against the weight stored column-major (W as the transpose of a contiguous [K, N]),
  for every projection and the 49,152 x 576 output layer alike (~75 against ~54 ms of matmul per
  decoding step). `column_major_frozen_linears` lays the frozen weights out that way once; the
  products over hundreds of rows (training) give bit-identical results at the same speed, the
  decode products (8 rows) differ from the row-major ones in the last bits of fp32.

Both are opt-in (`RolloutSampling.fast_warpers`, a recipe's own call of the layout change): a
recipe that takes them samples from the same distribution, but its seeded samples need not be
bit-identical to those of a run without them.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import LogitsProcessor


class SamplingWarper(LogitsProcessor):
    """transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` in its
    order (min_tokens_to_keep 1), one processor, top-p's sort done by numpy on CPU tensors.

    Pass it as `generate(logits_processor=[...])` with `temperature=1.0, top_k=0, top_p=1.0`, so that
    transformers adds no warper of its own (a custom processor runs before its warpers)."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_k, self.top_p = float(temperature), top_k or 0, float(top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k:
            k = min(self.top_k, scores.size(-1))
            scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -float("inf"))
        if self.top_p < 1.0:
            scores = self._top_p(scores)
        return scores

    def _top_p(self, scores: torch.Tensor) -> torch.Tensor:
        """transformers' TopPLogitsWarper.__call__, the ascending sort by numpy on CPU."""
        if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
            order = torch.from_numpy(np.argsort(scores.detach().numpy(), axis=-1))
            sorted_logits, sorted_indices = scores.gather(-1, order), order
        else:
            sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_indices_to_remove = cumulative_probs <= (1 - self.top_p)
        sorted_indices_to_remove[..., -1:] = 0  # keep at least one token
        indices_to_remove = sorted_indices_to_remove.scatter(1, sorted_indices, sorted_indices_to_remove)
        return scores.masked_fill(indices_to_remove, -float("inf"))


def warper_kwargs(temperature: float, top_k: int | None, top_p: float) -> dict[str, object]:
    """`generate` keywords that sample through `SamplingWarper` instead of transformers' warpers."""
    return {
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "logits_processor": [SamplingWarper(temperature, top_k, top_p)],
    }


def column_major_frozen_linears(model: torch.nn.Module) -> int:
    """Lay every frozen `nn.Linear` weight of a CPU model out column-major (the transpose of a
    contiguous [in, out] tensor), once, in place of the row-major one; returns how many.

    Why: see the module's docstring (decode-sized products run ~2x faster in MKL). Only frozen
    weights (a LoRA base, a frozen output layer, tied or not) are touched: a trained weight keeps
    the layout its optimizer and gradient expect. The values are copied exactly, so every forward
    computes the same function; the memory is the same (each weight is replaced, not kept twice).
    A tied output layer shares its tensor with the input embedding, whose row lookups then gather
    strided rows (a few per token, no measurable cost). Nothing is done off the CPU, or for weights
    that are not a plain [out, in] matrix (sharded, quantised).
    """
    done: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or not isinstance(weight, torch.nn.Parameter):
            continue
        if id(weight) in done or weight.requires_grad or weight.device.type != "cpu" or weight.dim() != 2:
            continue
        if tuple(weight.shape) != (module.out_features, module.in_features) or not weight.is_floating_point():
            continue
        if type(weight.data) is not torch.Tensor:  # a DTensor, a quantised tensor subclass
            continue
        weight.data = weight.data.t().contiguous().t()
        done.add(id(weight))
    return len(done)
