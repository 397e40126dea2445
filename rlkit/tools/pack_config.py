"""The options of `rlkit pack`, importable without torch so that `--help` starts at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlkit.config import arg, opt


@dataclass
class PackConfig:
    data: list[str] = arg(
        "Data to pack: JSONL/JSON/Parquet/CSV files, save_to_disk dirs or dataset names.", metavar="DATA...", default=[]
    )
    output: Optional[str] = opt(
        None,
        "Output `datasets` dir (with rlkit_pack.json metadata); optional with --show.",
        flags=("-o", "--output"),
        panel="Inputs and outputs",
    )
    tokenizer: Optional[str] = opt(
        None, "Model whose tokenizer to use: an HF dir, hub name, adapter dir or .gguf file."
    )
    template: Optional[str] = opt(
        None,
        "Chat template: the tokenizer's own by default; chatml, tulu, llama-2, zephyr, stack-exchange, raw, or a .jinja file.",
    )
    columns: Optional[str] = opt(None, "Map columns onto the standard names, e.g. prompt=question,completion=answer.")
    max_length: int = opt(1024, "Maximum tokens per example and per packed row.", min=2)
    packing: bool = opt(True, "Pack examples into rows with best-fit-decreasing (--no-packing: one example per row).")
    completion_only: bool = opt(True, "Labels on completion/assistant tokens only (--no-completion-only: every token).")
    eval_data: Optional[str] = opt(None, "Held-out data, tokenized into an 'eval' split.")
    eval_fraction: float = opt(0.0, "Hold out this fraction of DATA as the 'eval' split.", min=0, below=1)
    seed: int = opt(42, "Seed of the eval split.", min=0)
    kind: str = opt(
        "auto",
        "What to prepare: sft rows, preference pairs (dpo/train-rm), unpaired labelled examples (kto; pairs are split), "
        "or auto (pairs for prompt/chosen/rejected, unpaired for prompt/completion/label, else sft).",
        choices=("auto", "sft", "pairs", "unpaired"),
    )
    show: int = opt(0, "Print N rendered examples, trainable tokens in colour and masked ones dimmed.", min=0)
    overwrite: bool = opt(False, "Replace an existing output dir.", panel="Inputs and outputs")
    trust_remote_code: bool = opt(
        False, "Allow the tokenizer's repository to run its own code.", panel="Model and LoRA"
    )
