"""QLoRA (`--load-in-4bit`): the frozen base really is NF4 (bitsandbytes `Linear4bit` layers holding
`Params4bit` weights), gradients flow through it after an eval-mode pass, sft and dpo train end to end
and save an adapter, merge-lora --dequantize writes the model training measured, and the flags that
cannot work are refused in one line. Runs on this CPU: bitsandbytes' NF4 forward and backward have a
CPU implementation. Skipped where bitsandbytes is not installed (`pip install 'rlkit[qlora]'`), except
the refusal that says so."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA, run_cli
from safetensors.torch import load_file

from rlkit.errors import InputError
from rlkit.models.load import add_lora, load_causal_lm, quantized_4bit, resolve_source
from rlkit.recipes.sft_config import SFTConfig
from rlkit.training.options import QLORA_INSTALL, TrainConfig

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason=f"bitsandbytes is not installed ({QLORA_INSTALL})")
COMMON = ["--max-length", "128", "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--lora-dropout", "0"]


@needs_bnb
def test_the_base_is_nf4_and_gradients_pass_it_after_an_eval_pass(tiny_model_dir):
    """Linear4bit layers with NF4, double-quantised Params4bit weights; only the adapter trains; and a
    no-grad eval-mode forward (a reference pass) leaves the backward intact: on an AVX512-BF16 CPU
    bitsandbytes would otherwise repack the weights for a kernel with no backward."""
    import bitsandbytes as bnb

    def lora_model() -> torch.nn.Module:
        torch.manual_seed(0)
        base = load_causal_lm(resolve_source(str(tiny_model_dir)), load_in_4bit=torch.float32)
        return add_lora(base, 4, 8, 0.0, "all-linear")

    model = lora_model()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14  # 7 linear layers per block x 2 blocks; the output layer stays full precision
    for layer in layers:
        assert type(layer.weight).__name__ == "Params4bit" and layer.weight.dtype == torch.uint8
        assert layer.weight.quant_type == "nf4" and layer.weight.quant_state.nested  # double quantisation
        assert not layer.weight.requires_grad
    assert quantized_4bit(model)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))

    def grads(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    fresh = grads(model)
    after_eval = lora_model()
    with torch.no_grad():
        after_eval.eval()
        after_eval(input_ids=ids)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        again = grads(after_eval)
    first_layer = [n for n in fresh if "layers.0." in n and "lora_B" in n]
    assert first_layer and all(fresh[n].abs().max() > 0 for n in first_layer)  # through the 4-bit layers above
    for name in fresh:
        torch.testing.assert_close(again[name], fresh[name], atol=1e-6, rtol=1e-5)


@needs_bnb
def test_sft_qlora_trains_an_adapter_and_merge_dequantize_writes_the_trained_model(tiny_model_dir, tmp_path):
    out = tmp_path / "qsft"
    result = run_cli(
        "sft", str(tiny_model_dir), str(DEMO_DATA / "sft.jsonl"), "-o", str(out), "--load-in-4bit", *COMMON
    )
    assert result.returncode == 0, result.stderr
    assert "QLoRA: NF4 base computing in float32" in result.stderr
    assert "autograd kernel was not registered" not in result.stderr
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert math.isfinite(metrics["loss"])
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter) and all(v.dtype == torch.float32 for v in adapter.values())
    assert not (out / "model.safetensors").exists()

    refused = run_cli("merge-lora", str(out), "-o", str(tmp_path / "m"))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error:") and "--dequantize" in refused.stderr
    assert not (tmp_path / "m").exists()

    merged_dir = tmp_path / "merged"
    merged = run_cli("merge-lora", str(out), "-o", str(merged_dir), "--dequantize")
    assert merged.returncode == 0, merged.stderr
    assert "quantized to NF4 as in training" in merged.stderr
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config  # a plain full-precision dir

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not quantized_4bit(plain)
    trained = PeftModel.from_pretrained(
        load_causal_lm(resolve_source(str(tiny_model_dir)), load_in_4bit=torch.float32), out
    )
    ids = torch.randint(3, 500, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = plain(input_ids=ids).logits, trained.eval()(input_ids=ids).logits
        original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)  # the model the adapter was trained with
    assert (original - expected).abs().max() > 1e-3
    # the merged linear layers are the NF4-rounded base plus the update, not the original weights
    base_q = load_file(str(Path(tiny_model_dir) / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(plain.model.layers[0].self_attn.q_proj.weight, base_q, atol=1e-4)


@needs_bnb
@pytest.mark.parametrize("reference", ["precomputed", "adapter-disabled"])
def test_dpo_qlora_against_the_quantised_base(reference, tiny_model_dir, tmp_path):
    """The reference is the 4-bit base with the adapter off: precomputed by the policy before its first
    step (cached under a key of its own), or on the fly with the adapter disabled."""
    out = tmp_path / "qdpo"
    extra = ["--no-precompute-ref", "--gradient-checkpointing"] if reference == "adapter-disabled" else []
    args = ["dpo", str(tiny_model_dir), str(DEMO_DATA / "pairs.jsonl"), "-o", str(out), "--load-in-4bit", *COMMON]
    result = run_cli(*args, *extra)
    assert result.returncode == 0, result.stderr
    assert "autograd kernel was not registered" not in result.stderr
    expected = "log-probs precomputed" if reference == "precomputed" else "(the base, adapter disabled), on the fly"
    assert expected in result.stderr
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["rewards/margins"])
    assert (out / "adapter_model.safetensors").is_file()
    if reference == "precomputed":
        keys = [p.name for p in Path(tmp_path / "cache").rglob("*") if p.is_dir() and "-nf4-" in p.name]
        assert keys, "the 4-bit reference's log-probs are cached under their own key"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--full"], "--load-in-4bit needs --lora"),
        (["--fsdp"], "--load-in-4bit with --fsdp is not supported"),
    ],
)
def test_flags_that_cannot_work_are_refused_in_one_line(flags, message, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli("sft", str(tiny_model_dir), str(DEMO_DATA / "sft.jsonl"), "-o", str(out), "--load-in-4bit", *flags)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_a_gguf_file_or_no_bitsandbytes_is_refused(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="GGUF file"):
        SFTConfig(model=str(tmp_path / "model.Q4_1.gguf"), load_in_4bit=True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(InputError, match=r"pip install 'rlkit\[qlora\]'"):
        TrainConfig(load_in_4bit=True)


def test_train_rm_refuses_load_in_4bit(tiny_model_dir, tmp_path):
    out = tmp_path / "rm"
    result = run_cli("train-rm", str(tiny_model_dir), str(DEMO_DATA / "pairs.jsonl"), "-o", str(out), "--load-in-4bit")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: train-rm --load-in-4bit is not supported")
    assert not out.exists() and not out.with_name("rm.partial").exists()
