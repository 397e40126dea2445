"""Leaner backward passes for the RMSNorm and SwiGLU blocks of Llama-family models.

Without gradient checkpointing, what a step holds is mostly the tensors autograd saves for the
backward pass, and the stock modules save more than the backward needs:

- RMSNorm (`weight * (x * rsqrt(mean(x²) + eps))`) saves its input *and* the normalised
  activations: 2 x hidden floats per token. The gradient needs only the input and the per-token
  reciprocal RMS, from which the normalised activations are recomputed (one multiply).
- The SwiGLU MLP (`down(silu(gate(x)) * up(x))`) saves gate(x), silu(gate(x)), up(x) and their
  product: 4 x intermediate floats. `silu(g) * u` needs only g and u to be differentiated;
  the product is kept anyway by `down` as its input.

Per token and layer that is 2 x hidden + 1 x intermediate floats fewer (SmolLM2-135M: 2,688 of
~14,000, about a fifth of the activation memory) for a few element-wise operations redone in
the backward. Values and gradients are those of the stock modules (tested to 1e-6 in fp32).

Only module classes known to compute exactly the formulas above are changed (by instance
`forward`, so state dicts, saving and adapters are untouched); anything else keeps its own
forward.

On by default when training on an accelerator, off on CPU: there the recomputation costs 2-4% of
a SmolLM2 LoRA step, and glibc's heap keeps the freed bytes anyway, so peak RSS does not drop
(measured: it does, by ~235 MiB on a SmolLM2 DPO run, only with MALLOC_MMAP_THRESHOLD_ set).
`RLKIT_LEAN_BLOCKS=1` or `=0` forces it either way.
"""

from __future__ import annotations

import os
import types
from typing import Any

import torch
import torch.nn.functional as F

from rlkit.hardware import accelerator_available

# Classes whose forward is, line for line, LlamaRMSNorm.forward / LlamaMLP.forward (a test checks it
# against the installed transformers).
RMSNORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"})
SWIGLU_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "OlmoMLP", "Olmo2MLP"})


class _RMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)) computed in fp32 and cast back to x's dtype, as LlamaRMSNorm does;
    saves x and 1/rms(x) only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed.to(x.dtype)).reshape(-1, weight.numel()).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad_out * weight).float()
            # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed))
            grad_x = (rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        grad_up = grad_out * (gate * sig) if ctx.needs_input_grad[1] else None
        # d silu(g)/dg = sig * (1 + g * (1 - sig))
        grad_gate = grad_out * up * sig * (1 + gate * (1 - sig)) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def _rmsnorm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _is_silu(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.SiLU) or type(module).__name__ in ("SiLUActivation", "SiLU")


def use_lean_blocks(model: torch.nn.Module) -> int:
    """Give the known RMSNorm and SwiGLU modules of `model` their lean forward; returns how many."""
    if os.environ.get("RLKIT_LEAN_BLOCKS", "1" if accelerator_available() else "0") == "0":
        return 0
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if name in RMSNORM_CLASSES and isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rmsnorm_forward, module)
            changed += 1
        elif name in SWIGLU_CLASSES and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")) and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_swiglu_forward, module)
            changed += 1
    return changed
