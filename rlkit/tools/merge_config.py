"""The options of `rlkit merge-lora`, importable without torch so that `--help` starts at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlkit.config import arg, opt
from rlkit.performance import THREADS_HELP


@dataclass
class MergeConfig:
    adapter: Optional[str] = arg(
        "LoRA adapter dir (causal LM or reward model), e.g. `rlkit sft --lora` output.", metavar="ADAPTER"
    )
    output: Optional[str] = opt(
        None,
        "Output directory for the merged model (written under OUT.partial, renamed when complete).",
        flags=("-o", "--output"),
        panel="Inputs and outputs",
    )
    base: Optional[str] = opt(
        None, "Base model (HF dir, hub name or .gguf). Default: the base named in the adapter's adapter_config.json."
    )
    dtype: str = opt(
        "float32",
        "Dtype of the merged weights (the merge itself runs in it).",
        choices=("float32", "bfloat16", "float16"),
    )
    threads: Optional[int] = opt(None, THREADS_HELP, min=1, panel="Speed and memory")
    dequantize: bool = opt(
        False,
        "Allow a quantized (bitsandbytes) base, or a QLoRA adapter's 4-bit base: dequantize it to --dtype before merging (refused otherwise).",
    )
    tolerance: float = opt(
        0.0,
        "Largest allowed logit difference between adapter and merged model on the probe, as a fraction of max(1, largest absolute logit) (0: 1e-4 for float32, 1e-2 float16, 5e-2 bfloat16).",
        min=0,
    )
    overwrite: bool = opt(
        False, "Replace an existing output directory instead of refusing.", panel="Inputs and outputs"
    )
    trust_remote_code: bool = opt(
        False, "Allow model repositories to run their own Python code.", panel="Model and LoRA"
    )
