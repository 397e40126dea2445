"""Options every training command shares, with one name everywhere (SPEC.md).

Each field is one flag; its help text is the field's documentation. Commands subclass
`TrainConfig` to add their own (loss, beta, packing, ...).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

from rlkit.config import opt
from rlkit.errors import InputError
from rlkit.performance import THREADS_HELP
from rlkit.training.schedule import SCHEDULES

QLORA_INSTALL = "pip install 'rlkit[qlora]'"


@dataclass
class TrainConfig:
    output: Optional[str] = opt(
        None,
        "Output directory (written under OUT.partial, renamed when complete).",
        flags=("-o", "--output"),
        panel="Inputs and outputs",
    )
    overwrite: bool = opt(
        False,
        "Replace an existing output directory (or an interrupted run) instead of refusing.",
        panel="Inputs and outputs",
    )
    resume: bool = opt(
        False,
        "Continue from the latest checkpoint of an interrupted run of the same output.",
        panel="Inputs and outputs",
    )
    seed: int = opt(
        42, "Seed for initialisation, data order and dropout; same seed, same result.", min=0, panel="Optimisation"
    )
    max_steps: Optional[int] = opt(
        None, "Stop after this many optimizer steps (overrides --epochs).", min=1, panel="Optimisation"
    )
    epochs: int = opt(1, "Passes over the training data.", min=1, panel="Optimisation")
    lr: Optional[float] = opt(
        None,
        "Peak learning rate (default depends on the command and on --lora/--full).",
        min=0,  # 0 is a legal no-op run (tests compare weights against it); negative or NaN is not
        panel="Optimisation",
    )
    batch_size: int = opt(
        8, "Rows per device per micro-batch (a packed row holds several examples).", min=1, panel="Optimisation"
    )
    grad_accum: int = opt(
        1,
        "Micro-batches accumulated per optimizer step; global batch = batch-size x grad-accum x processes.",
        min=1,
        panel="Optimisation",
    )
    max_length: int = opt(1024, "Maximum tokens per example (and per packed row).", min=2, panel="Data")
    lora: bool = opt(
        True, "Train a LoRA adapter (--lora) or all weights (--full).", flags=("--lora/--full",), panel="Model and LoRA"
    )
    lora_r: int = opt(16, "LoRA rank.", min=1, panel="Model and LoRA")
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r).", min=1, panel="Model and LoRA")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA path.", min=0, below=1, panel="Model and LoRA")
    lora_targets: str = opt(
        "all-linear",
        "Modules LoRA adapts: all-linear, or comma-separated names (q_proj,v_proj).",
        panel="Model and LoRA",
    )
    template: Optional[str] = opt(
        None,
        "Chat template: the tokenizer's own by default; chatml, tulu, llama-2, zephyr, stack-exchange, raw, or a .jinja file.",
        panel="Data",
    )
    columns: Optional[str] = opt(
        None,
        "Map columns onto the standard names, e.g. prompt=question,chosen=response_j,rejected=response_k.",
        panel="Data",
    )
    eval_data: Optional[str] = opt(
        None, "Held-out data file or dir, evaluated every --eval-every steps and at the end.", panel="Data"
    )
    eval_fraction: float = opt(
        0.0,
        "Hold out this fraction of the training data for evaluation instead of --eval-data.",
        min=0,
        below=1,
        panel="Data",
    )
    eval_every: int = opt(
        0,
        "Evaluate every N steps (0: only at the end, when there is eval data).",
        min=0,
        panel="Logging and checkpoints",
    )
    save_every: int = opt(
        0,
        "Save a resumable checkpoint every N steps (0: only on interruption).",
        min=0,
        panel="Logging and checkpoints",
    )
    keep_checkpoints: int = opt(
        2, "How many of the latest checkpoints to keep while training.", min=1, panel="Logging and checkpoints"
    )
    report_to: str = opt(
        "none",
        "Also log metrics to: none, tensorboard or wandb.",
        choices=("none", "tensorboard", "wandb"),
        panel="Logging and checkpoints",
    )
    scheduler: str = opt("linear", "Learning-rate schedule after warmup.", choices=SCHEDULES, panel="Optimisation")
    warmup_ratio: float = opt(0.0, "Warmup as a fraction of all steps.", min=0, max=1, panel="Optimisation")
    warmup_steps: int = opt(0, "Warmup steps (wins over --warmup-ratio when > 0).", min=0, panel="Optimisation")
    weight_decay: float = opt(
        0.0, "AdamW weight decay (matrices only; not biases or norms).", min=0, panel="Optimisation"
    )
    adam_beta1: float = opt(0.9, "AdamW beta1.", min=0, below=1, panel="Optimisation")
    adam_beta2: float = opt(0.999, "AdamW beta2.", min=0, below=1, panel="Optimisation")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.", above=0, panel="Optimisation")
    max_grad_norm: float = opt(
        1.0, "Clip the global gradient norm to this (0: no clipping).", min=0, panel="Optimisation"
    )
    gradient_checkpointing: bool = opt(
        False, "Recompute activations in the backward pass to save memory.", panel="Speed and memory"
    )
    precision: str = opt(
        "auto",
        "Compute precision: auto (bf16 where the GPU supports it, else fp32), bf16, fp16, fp32.",
        choices=("auto", "bf16", "fp16", "fp32"),
        panel="Speed and memory",
    )
    fsdp: bool = opt(
        False,
        "Shard weights, gradients and optimizer state over the processes (FSDP2; torchrun or accelerate launch).",
        panel="Speed and memory",
    )
    dry_run: bool = opt(
        False,
        "Print the memory this run needs per device (weights, gradients, optimizer state, activations; "
        "read from the model's config, no weights loaded) and exit without writing anything.",
        panel="Speed and memory",
    )
    threads: Optional[int] = opt(None, THREADS_HELP, min=1, panel="Speed and memory")
    log_every: int = opt(
        10, "Print a progress line every N steps when stderr is not a terminal.", min=1, panel="Logging and checkpoints"
    )
    load_in_4bit: bool = opt(
        False,
        "QLoRA: hold the frozen base in 4-bit NF4 (bitsandbytes, double quantisation) under the LoRA adapter; needs --lora and pip install 'rlkit[qlora]'.",
        panel="Model and LoRA",
    )
    bnb_compute_dtype: str = opt(
        "auto",
        "Dtype the 4-bit layers of --load-in-4bit compute in: auto (bf16 under --precision bf16, fp16 under fp16, else fp32), bf16, fp16, fp32.",
        choices=("auto", "bf16", "fp16", "fp32"),
        panel="Model and LoRA",
    )
    trust_remote_code: bool = opt(
        False, "Allow model repositories to run their own Python code.", panel="Model and LoRA"
    )

    def __post_init__(self) -> None:
        check_quantization(self)  # as the options are read: refused before anything loads


def check_quantization(config: TrainConfig) -> None:
    """`--load-in-4bit` only where it can run (QLoRA trains a LoRA adapter over a frozen 4-bit base)."""
    if not config.load_in_4bit:
        return
    if not config.lora:
        raise InputError(
            "--load-in-4bit needs --lora: 4-bit weights are frozen, QLoRA trains a LoRA adapter over them (drop --full)"
        )
    if config.fsdp:
        raise InputError("--load-in-4bit with --fsdp is not supported; use one or the other")
    model = str(getattr(config, "model", None) or "")
    if model.endswith(".gguf"):
        raise InputError(
            f"--load-in-4bit: {model} is a GGUF file, already quantized its own way (rlkit dequantizes it on load); "
            "drop --load-in-4bit, or give the model's safetensors dir"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(f"--load-in-4bit needs bitsandbytes, which is not installed: {QLORA_INSTALL}")


@contextlib.contextmanager
def bitsandbytes_only_when_used(config: object) -> Iterator[None]:
    """Keep bitsandbytes unimported by a command that does not use it.

    peft imports bitsandbytes whenever it is installed, and bitsandbytes brings in torch's
    compiler stack: 1.5 to 4 s more per training command, measured on this project's 2-core
    machines. So while a command that needs no 4-bit layers runs (no --load-in-4bit, no
    merge-lora --dequantize), `import bitsandbytes` fails as if it were absent; afterwards the
    process sees it again. Nothing changes when something imported either already.
    """
    used = getattr(config, "load_in_4bit", False) or getattr(config, "dequantize", False)
    if used or "bitsandbytes" in sys.modules or "peft" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # import raises ImportError; find_spec gives None
    try:
        yield
    finally:
        if sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]
