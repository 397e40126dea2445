"""Comparing two training runs that should agree (one process vs two, FSDP vs not, DeepSpeed vs not)
with a bound that holds on every CPU kind, derived rather than tuned.

Why a run pair drifts at all: the two runs compute the same micro-batch gradients, but combine them
in another order (accumulation on one process, a reduce-scatter on two), take the clipping norm over
shards, and step with another AdamW kernel (fused on one process, per-tensor ops over shards). Each
of these rounds differently, and differently again on each kernel set (`ATEN_CPU_CAPABILITY`
default / avx2 / avx512, oneDNN's AVX2 vs AVX-512 vs AMX matmuls): a gradient element differs by a
few hundred units in the last place at most. With clipping at --max-grad-norm 1 every element is
at most 1, so the difference is at most GRADIENT_ROUNDING = 256 * 2^-24 ~ 1.5e-5.

Why Adam's default epsilon cannot be compared that way: AdamW's step is lr * m / (sqrt(v) + eps),
and for a gradient near zero (a weight whose per-token terms cancel) the ratio is ~ +-1 whatever
the gradient's size, so a last-bit difference can flip a whole update of size lr (this is what
turned 1.9e-7 on one CPU into 2e-5 to 5e-5 on an AVX2-only AMD EPYC, and under
ATEN_CPU_CAPABILITY=avx2 with ONEDNN_MAX_CPU_ISA=AVX2 on an Intel Xeon). With eps = 1 (the
LINEAR_ADAM flags) the step is Lipschitz in the gradient: |d step / d g| <= 2 lr / eps for
gradients of at most 1 (the momentum is a convex average of gradients, and the second-moment
term adds at most as much again), so T steps move a weight apart by at most

    T * 2 lr / eps * GRADIENT_ROUNDING

to first order (the feedback of a weight difference into later gradients is lr times the loss
curvature per step, negligible at these learning rates). The tests also require the weights to
have moved by far more than that bound, so agreement is not that of two untouched models.
Measured on an Intel Xeon (sft --full, lr 1e-2, 30 steps): 7.5e-9 under every kernel set, against
a bound of 9e-6 and a movement of 1.2e-2.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

GRADIENT_ROUNDING = 256 * 2.0**-24
ADAM_EPSILON = 1.0
#: AdamW whose step is linear in small gradients; --max-grad-norm 1 (the default) bounds every gradient element by 1.
LINEAR_ADAM = ["--adam-epsilon", str(ADAM_EPSILON), "--max-grad-norm", "1"]


def drift_bound(lr: float, steps: int, updates_per_step: int = 1) -> float:
    """The largest weight difference two runs of `steps` optimizer steps (each of `updates_per_step`
    AdamW updates: PPO's epochs x mini-batches) may show under LINEAR_ADAM (module docstring)."""
    return steps * updates_per_step * 2 * lr / ADAM_EPSILON * GRADIENT_ROUNDING


def weights(directory: Path, name: str | None = None) -> dict[str, torch.Tensor]:
    if name is None:
        adapter = directory / "adapter_model.safetensors"
        name = adapter.name if adapter.exists() else "model.safetensors"
    return load_file(str(directory / name))


def assert_same_training(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], bound: float, start: dict[str, torch.Tensor] | None = None
) -> float:
    """The two runs' weights agree within `bound`; with `start`, they moved by at least 100 x `bound`
    (a comparison that could not tell a real difference from rounding would prove nothing)."""
    assert a.keys() == b.keys() and a
    assert all(v.numel() > 0 for v in b.values())
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= bound, f"largest weight difference {worst:.3e} > derived bound {bound:.3e}"
    if start is not None:
        moved = max(float((b[k].float() - start[k].float()).abs().max()) for k in start if k in b)
        assert moved >= 100 * bound, f"the weights moved only {moved:.3e} (bound {bound:.3e})"
    return worst


def reduction_bound(terms: int) -> float:
    """The relative difference two float32 sums of the same `terms` values, taken in other orders
    (one process's batch against two processes' halves, a micro-batch of 4 against two of 2), may
    show: n u for recursive summation of n terms (Higham, Accuracy and Stability, 4.2), here with
    u = 2^-24 and relative to the sum of the terms' magnitudes, which a logged mean bounds from below."""
    return terms * 2.0**-24


def assert_same_metrics(a: list[dict], b: list[dict], keys: tuple[str, ...], terms: int) -> None:
    """Per-step logged metrics of two runs agree within `reduction_bound(terms)` of each metric's
    largest magnitude over the run (a metric near zero at one step is a sum of larger terms)."""
    assert len(a) == len(b) and a
    for key in keys:
        scale = max(abs(m[key]) for m in a + b if key in m)
        for x, y in zip(a, b):
            if key in x:
                assert abs(x[key] - y[key]) <= reduction_bound(terms) * scale, (key, x, y)
