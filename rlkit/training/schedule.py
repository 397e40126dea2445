"""Learning-rate schedules as multipliers of the peak rate (for torch's LambdaLR)."""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("linear", "cosine", "constant")


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """Explicit steps win; otherwise a ratio of the run (Tulu 2.5 uses 0.1)."""
    return warmup_steps if warmup_steps > 0 else int(math.ceil(total_steps * warmup_ratio))


def lr_multiplier(kind: str, total_steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warmup from 0, then linear decay to 0, half-cosine to 0, or flat."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return multiplier
