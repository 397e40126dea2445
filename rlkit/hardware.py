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
