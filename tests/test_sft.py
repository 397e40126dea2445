"""SFT end to end through the CLI: it learns, and what it writes loads and generates."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkit.data.prompts import encode_prompt
from rlkit.data.templates import resolve_template

FACTS = [
    ("What is the secret word?", "The secret word is banana."),
    ("Name the ocean.", "The ocean is Pacific."),
    ("What colour is the sky?", "The sky is blue."),
    ("Who wins?", "The answer is 42."),
]


def _memorisation_data(path):
    return write_jsonl(path, [{"prompt": p, "completion": c} for p, c in FACTS] * 4)


def _losses(out):
    return [
        json.loads(line)["loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]


def _greedy(model, tokenizer, prompt):
    template = resolve_template(None, tokenizer)
    ids = torch.tensor([encode_prompt(tokenizer, template, [{"role": "user", "content": prompt}])])
    out = model.generate(
        ids,
        max_new_tokens=32,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_full_sft_memorises_and_reloads(tiny_model_dir, tmp_path):
    data = _memorisation_data(tmp_path / "facts.jsonl")
    out = tmp_path / "out"
    result = run_cli(
        "sft",
        str(tiny_model_dir),
        str(data),
        "-o",
        str(out),
        "--full",
        "--lr",
        "3e-3",
        "--max-steps",
        "200",
        "--batch-size",
        "4",
        "--max-length",
        "64",
        "--no-packing",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    losses = _losses(out)
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "README.md",
        "rlkit_config.yaml",
        "metrics.jsonl",
    ):
        assert (out / name).is_file(), name
    assert not (out.parent / "out.partial").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template
    for prompt, answer in FACTS:
        assert _greedy(model, tokenizer, prompt).strip() == answer


@pytest.mark.process_boundary
def test_lora_sft_writes_an_adapter_that_reloads(tiny_model_dir, tmp_path):
    """LoRA cannot teach a random-init model much (its embeddings and head stay random), so the
    adapter trains on a tiny model that a short full SFT gave some structure first."""
    from peft import PeftModel

    from rlkit.data.collate import collate_rows
    from rlkit.data.formats import Format
    from rlkit.data.tokenize import tokenize_sft
    from rlkit.training.logprobs import label_logprobs

    demo = tiny_model_dir.parent.parent / "demo-sft.jsonl"
    write_jsonl(
        demo,
        [
            {"prompt": f"Say {w}.", "completion": f"{w} {w}."}
            for w in ("one", "two", "red", "blue", "cat", "dog", "sun", "sky")
        ]
        * 2,
    )
    base = tmp_path / "base"
    assert (
        run_cli(
            "sft",
            str(tiny_model_dir),
            str(demo),
            "-o",
            str(base),
            "--full",
            "--lr",
            "3e-3",
            "--max-steps",
            "60",
            "--batch-size",
            "4",
            "--max-length",
            "64",
        ).returncode
        == 0
    )
    data = _memorisation_data(tmp_path / "facts.jsonl")
    out = tmp_path / "adapter"
    result = run_cli(
        "sft",
        str(base),
        str(data),
        "-o",
        str(out),
        "--lora",
        "--lr",
        "3e-3",
        "--max-steps",
        "150",
        "--batch-size",
        "4",
        "--max-length",
        "64",
        "--eval-data",
        str(data),
    )
    assert result.returncode == 0, result.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()
    losses = _losses(out)
    assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])
    # The reloaded adapter is the trained one: it reproduces the run's final eval loss.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    examples, _ = tokenize_sft(records, Format.PROMPT_COMPLETION, tokenizer, resolve_template(None, tokenizer), 64)
    batch = collate_rows(
        [{**e, "position_ids": list(range(len(e["input_ids"])))} for e in examples], tokenizer.pad_token_id
    )
    with torch.no_grad():
        logps, mask = label_logprobs(model, batch["input_ids"], batch["position_ids"], batch["labels"])
    final = json.loads((out / "final_metrics.json").read_text())
    assert abs(float(-logps.sum() / mask.sum()) - final["eval/loss"]) < 1e-4
    without = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    with torch.no_grad(), without.disable_adapter():
        base_logps, _ = label_logprobs(without, batch["input_ids"], batch["position_ids"], batch["labels"])
    assert base_logps.sum() < logps.sum() - 1.0  # the adapter, not the base, carries what was learnt


def test_packed_dir_input_and_tokenizer_mismatch(tiny_model_dir, no_template_model_dir, tmp_path):
    data = _memorisation_data(tmp_path / "facts.jsonl")
    packed = tmp_path / "packed"
    result = run_cli("pack", str(data), "--tokenizer", str(tiny_model_dir), "-o", str(packed), "--max-length", "64")
    assert result.returncode == 0, result.stderr
    meta = json.loads((packed / "rlkit_pack.json").read_text())
    assert meta["counts"]["examples"] == 16 and meta["packing"] is True
    out = tmp_path / "out"
    ok = run_cli("sft", str(tiny_model_dir), str(packed), "-o", str(out), "--max-steps", "2", "--batch-size", "1")
    assert ok.returncode == 0, ok.stderr
    # another tokenizer (the no-template fixture has the same vocabulary but no chat template, so build a different one)
    from conftest import build_model, build_tokenizer

    other = tmp_path / "other-model"
    tok = build_tokenizer(vocab_size=500)
    build_model(len(tok)).save_pretrained(other)
    tok.save_pretrained(other)
    refused = run_cli("sft", str(other), str(packed), "-o", str(tmp_path / "o2"), "--max-steps", "1")
    assert refused.returncode == 2
    assert "packed with the tokenizer" in refused.stderr and "Traceback" not in refused.stderr


def test_nan_loss_stops_with_a_clear_message(tiny_model_dir, tmp_path):
    data = _memorisation_data(tmp_path / "facts.jsonl")
    out = tmp_path / "out"
    result = run_cli(
        "sft",
        str(tiny_model_dir),
        str(data),
        "-o",
        str(out),
        "--full",
        "--lr",
        "1e30",
        "--max-grad-norm",
        "0",
        "--max-steps",
        "20",
        "--batch-size",
        "4",
        "--save-every",
        "1",
        "--no-packing",
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "loss became" in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()
    assert any((tmp_path / "out.partial" / "checkpoints").glob("step-*"))


def test_config_file_tensorboard_checkpointing_and_eval_split(tiny_model_dir, tmp_path):
    """A YAML recipe with a flag overriding it; TensorBoard events, gradient checkpointing, eval split."""
    import yaml

    data = _memorisation_data(tmp_path / "facts.jsonl")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "data": [str(data)],
                "max-steps": 3,
                "batch_size": 2,
                "lr": 1e-3,
                "report_to": "tensorboard",
                "gradient_checkpointing": True,
                "eval_fraction": 0.25,
                "eval_every": 1,
                "packing": False,
            }
        )
    )
    out = tmp_path / "out"
    result = run_cli("sft", "--config", str(recipe), "-o", str(out), "--max-steps", "4")
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((out / "rlkit_config.yaml").read_text())
    assert saved["max_steps"] == 4 and saved["batch_size"] == 2 and saved["gradient_checkpointing"] is True
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval/loss" in m] == [1, 2, 3, 4]  # every step, the last one at the end
    assert json.loads((out / "final_metrics.json").read_text())["steps"] == 4
