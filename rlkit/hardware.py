"""What the machine can do, asked once by training (precision, lean blocks) and inference (dtype).

Kept apart from the engine so that inference commands can ask without importing accelerate.
"""

from __future__ import annotations

import torch


def accelerator_available() -> bool:
    """A CUDA, MPS or XPU device is present: training and inference run there, not on the CPU."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def cpu_computes_bf16() -> bool:
    """True on CPUs with AMX tiles (Intel Xeon 4th generation and later), whose bf16 matmuls run
    several times faster than fp32 ones (6.5x for a SmolLM2 MLP projection on our CI machine)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def cpu_bf16_hint(flag: str, measured: str) -> str | None:
    """The one line training and inference print when they run in fp32 on a CPU that computes
    bf16 natively (`flag`: the option that switches, `measured`: what it gained here). Not a
    switch made for the user: bf16 changes the numbers, and on very small models autocast's
    casts cost more than they save."""
    if accelerator_available() or not cpu_computes_bf16():
        return None
    return f'this CPU computes bf16 natively (AMX): {flag} {measured} on such a CPU (docs/guide.md, "Precision on CPU")'
