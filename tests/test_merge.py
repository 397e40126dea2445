"""merge-lora: the merged model computes what the adapter model computed, as a plain transformers dir."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlkit.errors import InputError, RunError
from rlkit.tools.merge import MergeConfig, run_merge

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _nonzero_lora(model: torch.nn.Module) -> None:
    """A fresh adapter adds exactly zero; a trained one does not, so give B random values."""
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)


@pytest.fixture(scope="module")
def causal_adapter(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    path = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    _nonzero_lora(model)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    (path / "final_metrics.json").write_text(json.dumps({"loss": 1.25}))
    return path


@pytest.mark.process_boundary
def test_merged_logits_equal_the_adapter_and_dir_is_plain(tmp_path, causal_adapter, tiny_model_dir):
    out = tmp_path / "merged"
    result = run_cli("merge-lora", str(causal_adapter), "-o", str(out), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "max |Δlogit|" in result.stderr
    assert not any((out / f).exists() for f in PEFT_FILES)
    assert not out.with_name("merged.partial").exists()

    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), causal_adapter).eval()
    ids = torch.randint(3, merged.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = adapter(input_ids=ids).logits, merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (base - expected).abs().max() > 1e-3  # the adapter changes the model, so equality means something

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "im_start" in tokenizer.chat_template
    card = (out / "README.md").read_text()
    assert str(causal_adapter) in card and str(tiny_model_dir) in card and "adapter/loss" in card


def test_sequence_classification_adapter_keeps_its_score_head(tmp_path, tiny_model_dir, tiny_tokenizer):
    """A LoRA reward model (task SEQ_CLS): the trained score head is merged in with the adapter."""
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, pad_token_id=tiny_tokenizer.pad_token_id
    )
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    )
    _nonzero_lora(model)
    adapter = tmp_path / "rm-adapter"
    model.save_pretrained(adapter)
    ids = torch.tensor([tiny_tokenizer("What is 2 + 2? The answer is 4.").input_ids])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    out = run_merge(MergeConfig(adapter=str(adapter), output=str(tmp_path / "rm")))
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == tiny_tokenizer.pad_token_id
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
    assert not any((out / f).exists() for f in PEFT_FILES)


def test_quantized_base_is_refused_without_dequantize(tmp_path, causal_adapter, tiny_model_dir):
    base = tmp_path / "quantized-base"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="quantized.*--dequantize"):
        run_merge(MergeConfig(adapter=str(causal_adapter), output=str(tmp_path / "out"), base=str(base)))
    assert not (tmp_path / "out").exists()


def test_a_merge_over_tolerance_fails_and_writes_nothing(tmp_path, causal_adapter, monkeypatch):
    import rlkit.tools.merge

    calls = iter([torch.zeros(1, 3, 5), torch.ones(1, 3, 5)])
    monkeypatch.setattr(rlkit.tools.merge, "_probe_logits", lambda model, ids: next(calls))
    with pytest.raises(RunError, match="differ"):
        run_merge(MergeConfig(adapter=str(causal_adapter), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_not_an_adapter_is_a_usage_error(tmp_path, tiny_model_dir):
    with pytest.raises(InputError, match="not a LoRA adapter"):
        run_merge(MergeConfig(adapter=str(tiny_model_dir), output=str(tmp_path / "out")))
