"""`merge-lora`: fold a LoRA adapter into its base and write a plain transformers dir.

Why verify: a merge that silently changes the model (a wrong base, a dtype that loses the
small LoRA update, a head left out of `modules_to_save`) is only found much later, by a
worse eval. So the adapter model and the merged model both score one probe input, and the
merge is refused (exit 1, nothing written) when their logits differ by more than the
tolerance, measured relative to the largest logit: max|Δ| <= tol x max(1, max|logit|).

A quantized (bitsandbytes) base cannot take a merged update without rounding it away, so it
is refused unless `--dequantize`, which dequantizes the base to --dtype first. A `.gguf` base
is dequantized on load anyway (rlkit.models.load).

A QLoRA adapter (trained with `--load-in-4bit`, as its rlkit_config.yaml records) learnt its
update against the NF4-rounded base, not the full-precision weights its adapter_config names.
`--dequantize` merges it into exactly that: the base quantized to NF4 the way training did
(rlkit.models.load.nf4_config), dequantized to --dtype, plus the update, so the merged model is
the one training measured. Without `--dequantize` such an adapter is refused, as a quantized base is.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from rlkit.config import config_to_dict
from rlkit.console import info
from rlkit.errors import InputError, RunError
from rlkit.models.inference import DTYPES, adapter_config, adapter_score_labels
from rlkit.models.load import (
    DAMAGED,
    ModelSource,
    damaged,
    load_tokenizer,
    nf4_config,
    resolve_source,
    strip_gguf_marker,
)
from rlkit.output import check_output, finalize, open_run_dir, write_config, write_model_card, writing
from rlkit.tools.merge_config import MergeConfig
from rlkit.training.options import QLORA_INSTALL

TASKS = {"CAUSAL_LM": "causal LM", "SEQ_CLS": "sequence classifier (reward model)"}
# Default tolerance per dtype: fp32 merges are exact up to summation order; half precision
# rounds W + BA to 8 (bf16) or 11 (fp16) mantissa bits.
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
PROBE = "The quick brown fox jumps over the lazy dog. Question: What is 2 + 2? Answer: 4."


def _check_adapter(adapter: str) -> dict[str, Any]:
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise InputError(
            f"{adapter}: not a LoRA adapter dir (no adapter_config.json); merge-lora takes `rlkit sft/dpo --lora` output"
        )
    config = adapter_config(adapter)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise InputError(f"{adapter}: a {config.get('peft_type')} adapter; merge-lora merges LoRA adapters only")
    task = config.get("task_type") or "CAUSAL_LM"
    if task not in TASKS:
        raise InputError(f"{adapter}: task_type {task!r} is not supported (causal LM or SEQ_CLS reward model)")
    return config


def _quantization(source: ModelSource) -> str | None:
    """The quantization method named in the base's config.json (None for a plain or GGUF base)."""
    config = Path(source.path) / "config.json"
    if source.gguf_file or not config.is_file():
        return None
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") or ("bitsandbytes" if quant else None)


def trained_in_4bit(adapter: str) -> bool:
    """Whether rlkit trained `adapter` over a 4-bit base (`--load-in-4bit`, in its rlkit_config.yaml)."""
    path = Path(adapter) / "rlkit_config.yaml"
    if not path.is_file():
        return False
    import yaml

    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(recorded, dict) and recorded.get("load_in_4bit") is True


def _load_base(
    source: ModelSource,
    task: str,
    adapter: str,
    dtype: torch.dtype,
    pad_id: int | None,
    trust_remote_code: bool,
    as_trained_in_4bit: bool = False,
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, **source.kwargs()}
    if as_trained_in_4bit:  # the NF4 base the adapter trained over, quantized from float32 as training does
        kwargs.update(dtype=torch.float32, quantization_config=nf4_config(torch.float32))
    try:
        if task == "SEQ_CLS":
            model = AutoModelForSequenceClassification.from_pretrained(
                source.path, num_labels=adapter_score_labels(adapter), pad_token_id=pad_id, **kwargs
            )
            model.config.pad_token_id = pad_id
        else:
            model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as err:
        raise InputError(f"{source.name}: cannot load the base model ({str(err).splitlines()[0]})")
    strip_gguf_marker(model)
    if getattr(model, "hf_quantizer", None) is not None:
        model = model.dequantize()
    return model.to(dtype)


@torch.no_grad()
def _probe_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def _lineage(adapter: str, base: str) -> tuple[str, dict[str, Any]]:
    """Model-card section naming base and adapter, with the adapter's own card and metrics."""
    section = f"## Lineage\n\n- **Base model:** `{base}`\n- **Adapter:** `{adapter}` (merged)\n\n"
    metrics: dict[str, Any] = {}
    metrics_file = Path(adapter) / "final_metrics.json"
    if metrics_file.is_file():
        try:
            metrics = {f"adapter/{k}": v for k, v in json.loads(metrics_file.read_text()).items()}
        except json.JSONDecodeError:
            metrics = {}
    card = Path(adapter) / "README.md"
    if card.is_file() and "rlkit" in card.read_text():  # peft's empty template card says nothing
        text = card.read_text()
        if text.startswith("---"):  # drop the adapter's YAML front matter; this card has its own
            text = text.split("---", 2)[-1]
        body = "\n".join(("#" + line if line.startswith("#") else line) for line in text.strip().splitlines())
        section += "### The adapter's model card\n\n" + body + "\n\n"
    return section, metrics


def run_merge(config: MergeConfig) -> Path:
    """Load base + adapter, merge, verify on a probe, then write OUT (complete, or not at all)."""
    if not config.adapter:
        raise InputError("missing argument ADAPTER")
    adapter_cfg = _check_adapter(config.adapter)
    output = check_output(config.output, config.overwrite, resume=False)
    task = adapter_cfg.get("task_type") or "CAUSAL_LM"
    base_name = config.base or adapter_cfg.get("base_model_name_or_path")
    if not base_name:
        raise InputError(f"{config.adapter}: adapter_config.json names no base model; pass --base MODEL")
    source = resolve_source(base_name)
    if source.adapter_dir:
        raise InputError(
            f"--base {base_name}: is itself an adapter dir; merge it first, then pass the merged dir as --base"
        )
    quant = _quantization(source)
    if quant and not config.dequantize:
        raise InputError(
            f"{base_name} is quantized ({quant}); merging into it would round the LoRA update away; pass --dequantize to merge into a {config.dtype} copy"
        )
    qlora = trained_in_4bit(config.adapter)
    if qlora and not config.dequantize:
        raise InputError(
            f"{config.adapter} was trained over a 4-bit NF4 base (--load-in-4bit); pass --dequantize to merge it into "
            f"that base dequantized to {config.dtype}, the model it was trained and measured with"
        )
    if qlora and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(f"{config.adapter}: re-creating its 4-bit base needs bitsandbytes: {QLORA_INSTALL}")
    if qlora and source.gguf_file:
        raise InputError(f"{config.adapter}: a QLoRA adapter names a .gguf base ({base_name}); pass its --base dir")
    dtype = DTYPES[config.dtype]
    tokenizer = load_tokenizer(
        ModelSource(source.name, source.path, source.gguf_file, adapter_dir=config.adapter), config.trust_remote_code
    )
    info(
        f"merge: {config.adapter} ({TASKS[task]}) into {base_name}"
        + (" quantized to NF4 as in training, dequantized to " if qlora else ", ")
        + config.dtype
    )

    from peft import PeftModel

    base = _load_base(source, task, config.adapter, dtype, tokenizer.pad_token_id, config.trust_remote_code, qlora)
    try:
        model = PeftModel.from_pretrained(base, config.adapter, is_trainable=False)
    except DAMAGED as err:  # a truncated adapter file is not a wrong base
        raise damaged(config.adapter, "the LoRA adapter", err)
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(
            f"{config.adapter}: does not fit base {base_name} ({str(err).splitlines()[0]}); pass the right --base"
        )
    model.eval()
    ids = torch.tensor([tokenizer(PROBE).input_ids])
    before = _probe_logits(model, ids)
    merged = model.merge_and_unload()
    after = _probe_logits(merged, ids)
    diff = float((before - after).abs().max())
    scale = max(1.0, float(before.abs().max()))
    tolerance = config.tolerance or DEFAULT_TOLERANCE[config.dtype]
    info(
        f"merge check: max |Δlogit| = {diff:.3g} on a {ids.shape[1]}-token probe (tolerance {tolerance:g} x {scale:.3g} = {tolerance * scale:.3g})"
    )
    if not diff <= tolerance * scale:
        raise RunError(
            f"merged logits differ from the adapter model's by {diff:.3g} > {tolerance * scale:.3g}; nothing written (try --dtype float32)"
        )

    run_dir = open_run_dir(output, resume=False)
    with writing("the merged model in", run_dir):
        merged.save_pretrained(str(run_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(run_dir))
    write_config(run_dir, "merge-lora", config_to_dict(config))
    section, adapter_metrics = _lineage(config.adapter, base_name)
    metrics = {"merge/max_abs_logit_diff": diff, "merge/tolerance": tolerance * scale, **adapter_metrics}
    write_model_card(
        run_dir, command="merge-lora", base_model=base_name, data=[config.adapter], metrics=metrics, extra=section
    )
    return finalize(run_dir, output)
