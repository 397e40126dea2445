"""The settings that change how fast rlkit runs or how much memory it holds, in one place.

Three environment variables switch off a speed or memory measure that is on by default (they
exist for A/B runs and for a model the measure does not suit): RLKIT_LEAN_BLOCKS,
RLKIT_FP32_ATTENTION_BACKWARD and RLKIT_MALLOC_TRIM. Their names, defaults and parsing live
only here; the code they steer asks `switches()`, and every run writes `switches().record()`
into its rlkit_config.yaml and model card, so a saved run says how it ran. CPU threads are an
option (`--threads`) rather than a variable, applied by `use_threads` before any model work.

Torch-free at import: the CLI imports this module before it knows whether a command will run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

LEAN_BLOCKS = "RLKIT_LEAN_BLOCKS"
FP32_ATTENTION_BACKWARD = "RLKIT_FP32_ATTENTION_BACKWARD"
MALLOC_TRIM = "RLKIT_MALLOC_TRIM"


@dataclass(frozen=True)
class PerformanceSwitches:
    """Each switch as the environment sets it; `0` turns one off, anything else (or unset) leaves the default."""

    lean_blocks: bool = True
    """Lean RMSNorm and SwiGLU forwards that save less for the backward (rlkit.models.lean_blocks)."""
    fp32_attention_backward: bool | None = None
    """bf16 training's CPU attention backward in fp32, recomputed (rlkit.models.attention). None: on
    exactly when no accelerator is present."""
    malloc_trim: bool = True
    """Freed heap pages returned to the OS between training phases on the CPU (rlkit.hardware)."""

    @classmethod
    def from_environ(cls, environ: Any = None) -> PerformanceSwitches:
        env = os.environ if environ is None else environ

        def setting(name: str) -> bool | None:
            return None if name not in env else env[name] != "0"

        return cls(
            lean_blocks=setting(LEAN_BLOCKS) is not False,
            fp32_attention_backward=setting(FP32_ATTENTION_BACKWARD),
            malloc_trim=setting(MALLOC_TRIM) is not False,
        )

    def record(self) -> dict[str, Any]:
        """The switches as they applied to this run, by variable name, and the threads it ran with
        (for rlkit_config.yaml and the model card)."""
        import torch

        from rlkit.hardware import accelerator_available

        attention = (
            not accelerator_available() if self.fp32_attention_backward is None else self.fp32_attention_backward
        )
        return {
            LEAN_BLOCKS: self.lean_blocks,
            FP32_ATTENTION_BACKWARD: attention,
            MALLOC_TRIM: self.malloc_trim,
            "torch_threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
        }


def switches() -> PerformanceSwitches:
    """The switches of this process. The environment is read at each call (a run's does not change,
    and the tests set it per test), but nowhere else."""
    return PerformanceSwitches.from_environ()


THREADS_HELP = (
    "CPU threads for torch's operators. Default: torch's own count (one per core, or OMP_NUM_THREADS), "
    "with threads that sleep rather than spin while they wait for each other (OMP_WAIT_POLICY=PASSIVE), "
    "so that other jobs on the same cores slow a run down instead of collapsing it (docs/guide.md, Threads)."
)


def wait_without_spinning() -> None:
    """Make OpenMP threads sleep at a barrier instead of spinning there; before torch loads.

    A spinning thread holds its core while the thread it waits for cannot get one: with one other
    job on a 2-core machine, torch's two threads turned a 5 s training step into 75 s that way
    (bench/threads.py measures it). libgomp reads the variable once, when torch loads it, so the CLI
    calls this before importing any command's module. A policy or spin count the user set wins."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def use_threads(threads: int | None) -> None:
    """Apply `--threads` (None: leave torch's count) before any model work, intra- and inter-op alike."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # settable once per process, before inter-op work: a second command in one process
        pass
