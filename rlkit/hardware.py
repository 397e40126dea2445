"""What the machine can do, asked once by training (precision, lean blocks) and inference (dtype).

Kept apart from the engine so that inference commands can ask without importing accelerate.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

from rlkit.performance import switches


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


@functools.cache
def _malloc_trim() -> Callable[[int], Any] | None:
    """glibc's malloc_trim, or None where there is none (macOS, Windows, musl) or the user turned
    it off with RLKIT_MALLOC_TRIM=0."""
    if not sys.platform.startswith("linux") or not switches().malloc_trim:
        return None
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def release_freed_host_memory(device: torch.device) -> None:
    """Hand the pages of freed tensors back to the OS when training runs on the CPU.

    glibc keeps what a freed tensor occupied in its heap for the next allocation, but a step's
    tensors rarely fit back into the holes the last phase left (bf16 weight copies, activations,
    gradients all differ in size), so a process's resident memory climbs well above what is live:
    for SmolLM2-135M DPO in bf16 with checkpointing, ~0.25 GiB of a 3.2 GiB peak. Trimming where a
    phase's tensors have just died (after each forward, between micro-batches, after a PPO
    rollout: rlkit.training.engine) costs page faults
    when the next phase touches the pages again (~0.6 GiB a step there, within the step time's
    noise); on a GPU the host heap holds little, so it is skipped. RLKIT_MALLOC_TRIM=0 turns it off.
    """
    trim = _malloc_trim() if device.type == "cpu" else None
    if trim is not None:
        trim(0)
