"""Attention for training in bf16/fp16 on a CPU: the backward runs in fp32.

PyTorch's CPU flash-attention kernel is fast forward in bf16, but its backward is not: on
SmolLM2-135M's shapes (8 rows x 85 tokens, 9 heads of 64) it takes 21 ms per layer in bf16
and 6 ms in fp32, forward included 23 ms against 9 ms. In a SmolLM2 LoRA PPO update on a
2-core CPU that was 22% of the step. So when the attention inputs carry a gradient, this calls
the same kernel on fp32 copies of q, k and v and rounds the output back; without a gradient
(rollouts, reference log-probs, generation) and on accelerators it is the stock `sdpa` path.

The values are those the stock bf16 kernel approximates (it accumulates in fp32 too). Keeping
the fp32 copies for the backward would cost memory (SmolLM2, 680 tokens: ~90 MiB more over 30
layers), so only q, k and v are kept, as they came (k and v before their grouped-query
expansion), and the backward recomputes the attention from them: ~3 ms a layer there, and less
kept than the stock bf16 kernel keeps (expanded k and v, and the output).

Registered with transformers' attention and mask interfaces as `rlkit_sdpa`, so the model's own
forward, masks and KV-cache handling stay the stock `sdpa` ones.
"""

from __future__ import annotations

from typing import Any

import torch

from rlkit.hardware import accelerator_available
from rlkit.performance import switches

NAME = "rlkit_sdpa"
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _low_precision(query: torch.Tensor) -> torch.dtype | None:
    """The dtype the stock kernel would run in, when it is bf16/fp16 (the inputs', or autocast's)."""
    if query.dtype in _LOW_PRECISION:
        return query.dtype
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in _LOW_PRECISION:
        return torch.get_autocast_dtype("cpu")  # Llama's rotary embedding hands over fp32 q and k under autocast
    return None


class _Fp32Attention(torch.autograd.Function):
    """sdpa on fp32 copies of q, k, v; saves the inputs as they came (bf16, k and v before their
    grouped-query expansion) and recomputes the attention forward in the backward."""

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        module: torch.nn.Module,
        kwargs: dict[str, Any],
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        ctx.module, ctx.kwargs = module, kwargs
        ctx.mask_is_tensor = isinstance(attention_mask, torch.Tensor)
        ctx.save_for_backward(query, key, value, attention_mask if ctx.mask_is_tensor else None)
        ctx.mask = None if ctx.mask_is_tensor else attention_mask
        return _fp32_sdpa(module, query, key, value, attention_mask, kwargs).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, mask = ctx.saved_tensors
        inputs = [
            t.detach().float().requires_grad_(need) for t, need in zip((query, key, value), ctx.needs_input_grad[:3])
        ]
        with torch.enable_grad():
            out = _fp32_sdpa(ctx.module, *inputs, mask if ctx.mask_is_tensor else ctx.mask, ctx.kwargs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out.float()))
        back = [next(grads).to(orig.dtype) if t.requires_grad else None for t, orig in zip(inputs, (query, key, value))]
        return (*back, None, None, None, None)


def _fp32_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast("cpu", enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)[0]


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    low = (
        _low_precision(query)
        if query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad
        else None
    )
    if low is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return _Fp32Attention.apply(query, key, value, attention_mask, module, kwargs, low), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, _attention)
        AttentionMaskInterface.register(NAME, AttentionMaskInterface._global_mapping["sdpa"])


def use_fp32_attention_backward(model: torch.nn.Module) -> bool:
    """Switch a CPU model that uses `sdpa` to `rlkit_sdpa`; True when switched.

    Off when an accelerator is present (where the stock kernels are the fast ones); models with
    another attention (eager, flash-attention) are left as they are. `RLKIT_FP32_ATTENTION_BACKWARD`
    `=0` or `=1` forces it either way.
    """
    forced = switches().fp32_attention_backward
    if forced is False or (forced is None and accelerator_available()):
        return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    inner.set_attn_implementation(NAME)
    return True
