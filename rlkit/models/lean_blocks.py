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

On by default. On a CPU the recomputation costs 0-4% of a SmolLM2 LoRA step, and the saving
shows in peak RSS because the engine hands freed heap pages back to the OS after each forward
and backward (rlkit.hardware): SmolLM2 LoRA PPO in bf16, 1,675-1,696 MiB against 1,832-1,849
(2 runs each). `RLKIT_LEAN_BLOCKS=0` turns it off.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

from rlkit.performance import switches

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
        grad_up = grad_out * F.silu(gate) if ctx.needs_input_grad[1] else None
        # d silu(g)/dg = sig * (1 + g * (1 - sig)), one fused kernel (not six element-wise passes)
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def _rmsnorm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _is_silu(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.SiLU) or type(module).__name__ in ("SiLUActivation", "SiLU")


def use_lean_blocks(model: torch.nn.Module) -> int:
    """Give the known RMSNorm and SwiGLU modules of `model` their lean forward; returns how many."""
    if not switches().lean_blocks:  # RLKIT_LEAN_BLOCKS=0
        return 0
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if (
            name in RMSNORM_CLASSES
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and hasattr(module, "variance_epsilon")
        ):
            module.forward = types.MethodType(_rmsnorm_forward, module)
            changed += 1
        elif (
            name in SWIGLU_CLASSES
            and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj"))
            and _is_silu(getattr(module, "act_fn", None))
        ):
            module.forward = types.MethodType(_swiglu_forward, module)
            changed += 1
    return changed


def _cast_unless_autocast(self: torch.nn.Module, x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if x is None or x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)


def lora_inputs_uncast_under_autocast(model: torch.nn.Module) -> int:
    """Stop peft casting each LoRA layer's input to the adapter's dtype while autocast is on; returns how many layers.

    With a bf16 base and fp32 adapter weights under bf16 autocast, peft casts the input of every
    adapter to fp32 and autocast casts it back to bf16 for the adapter's matmul: two copies of
    the same values per adapter layer, and the second is what the backward keeps. q, k and v
    (and gate and up) read the same normalised hidden state, so each keeps its own copy of it:
    90 of the 571 MiB a SmolLM2 LoRA PPO micro-batch (8 x 85 tokens) saves, and the copies'
    time. Autocast rounds the input to bf16 for the matmul either way, so the values are the
    same bit for bit; outside autocast peft's cast stays.
    """
    changed = 0
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "_cast_input_dtype"):
            module._cast_input_dtype = types.MethodType(_cast_unless_autocast, module)
            changed += 1
    return changed
