"""Reward models: scores read where transformers' head reads them, the Bradley-Terry objective, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import DEMO_DATA, run_cli, write_jsonl
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from rlkit.data.pairs import collate_pairs, pair_sequences, tokenize_pairs
from rlkit.data.templates import resolve_template
from rlkit.recipes.reward_model import RewardObjective, RewardScorer


def rlkit(*args: str, env: dict | None = None):
    """`rlkit ...` in a subprocess, one intra-op thread: tiny models gain nothing from more, and on
    a shared CPU, spinning OpenMP threads of parallel test runs slow each other down ~20x."""
    return run_cli(*args, env={"OMP_NUM_THREADS": "1", **(env or {})})


def _classifier(vocab_size: int, pad_id: int) -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=pad_id,
        attn_implementation="sdpa",
    )
    return LlamaForSequenceClassification(config).double().eval()


@pytest.fixture(scope="module")
def pair_rows(tiny_tokenizer):
    # eight pairs of the demo's varied lengths, so that padding-free rows hold several sequences
    records = [json.loads(line) for line in (DEMO_DATA / "pairs.jsonl").read_text().splitlines()[:8]]
    return tokenize_pairs(records, tiny_tokenizer, resolve_template(None, tiny_tokenizer), 1024)[0]


@pytest.mark.parametrize("pad", ["pad", "eos"], ids=["own-pad-token", "pad-is-eos"])
def test_padding_free_scores_equal_the_hf_head_on_each_sequence(tiny_tokenizer, pair_rows, pad):
    """The score of a sequence is what AutoModelForSequenceClassification gives it alone, or padded in a batch."""
    pad_id = tiny_tokenizer.pad_token_id if pad == "pad" else tiny_tokenizer.eos_token_id
    model = _classifier(len(tiny_tokenizer), pad_id)
    scorer = RewardScorer(model, pad_id)
    batch = collate_pairs(pair_rows, pad_id)
    assert batch["input_ids"].shape[0] < 2 * len(pair_rows)  # several sequences share rows
    with torch.no_grad():
        scores = scorer(batch["input_ids"], batch["position_ids"], batch["seq_index"], 2 * len(pair_rows))
        sequences = [ids for ids, _ in pair_sequences(pair_rows)]
        alone = torch.stack([model(input_ids=torch.tensor([ids])).logits[0, 0] for ids in sequences])
        width = max(map(len, sequences))
        padded = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in sequences])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in sequences])
        batched = model(input_ids=padded, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(scores, alone.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, batched.float(), atol=1e-5, rtol=0)


def test_bradley_terry_objective_with_margin_and_centring(tiny_tokenizer, pair_rows):
    model = _classifier(len(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    scorer = RewardScorer(model, tiny_tokenizer.pad_token_id)
    rows = [{**row, "margin": float(k)} for k, row in enumerate(pair_rows)]
    batch = collate_pairs(rows, tiny_tokenizer.pad_token_id)
    n = len(rows)
    with torch.no_grad():
        scores = scorer(batch["input_ids"], batch["position_ids"], batch["seq_index"], 2 * n)
        out = RewardObjective(center_rewards=0.01).loss(scorer, batch)
    chosen, rejected = scores[:n], scores[n:]
    margin = torch.arange(n, dtype=scores.dtype)
    expected = (-F.logsigmoid(chosen - rejected - margin) + 0.01 * (chosen + rejected) ** 2).sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (
        out.metrics["accuracy"].item()
        == ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).sum().item()
    )
    assert out.metrics["margin"].item() == pytest.approx((chosen - rejected).sum().item(), rel=1e-5)


def _accuracy(model, tokenizer, pairs_path):
    """Held-out pair accuracy of a saved reward model, scored by transformers alone (padded batch)."""
    rows = tokenize_pairs(
        [json.loads(line) for line in pairs_path.read_text().splitlines()],
        tokenizer,
        resolve_template(None, tokenizer),
        1024,
    )[0]
    sequences = [ids for ids, _ in pair_sequences(rows)]
    width = max(map(len, sequences))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        scores = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    n = len(rows)
    return (scores[:n] > scores[n:]).float().mean().item()


@pytest.mark.process_boundary
def test_lora_reward_model_end_to_end(tiny_model_dir, tmp_path):
    """Default output: a full classifier (LoRA merged) that transformers loads and scores as training did."""
    out = tmp_path / "rm"
    eval_path = DEMO_DATA / "pairs_eval.jsonl"
    result = rlkit(
        "train-rm",
        str(tiny_model_dir),
        str(DEMO_DATA / "pairs.jsonl"),
        "-o",
        str(out),
        "--eval-data",
        str(eval_path),
        "--max-steps",
        "10",
        "--lr",
        "3e-3",
        "--eval-every",
        "5",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "LoRA + score head" in result.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "margin", "grad_norm", "tokens_per_s"} <= set(metrics[0])
    assert "eval/accuracy" in metrics[4]
    final = json.loads((out / "final_metrics.json").read_text())
    assert f"held-out pair accuracy: {final['eval/accuracy']:.4f}" in (out / "README.md").read_text()
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == AutoTokenizer.from_pretrained(out).pad_token_id
    assert _accuracy(model, AutoTokenizer.from_pretrained(out), eval_path) == pytest.approx(
        final["eval/accuracy"], abs=1 / 64 + 1e-6
    )


def test_adapter_output_stack_exchange_columns_and_margin(tiny_model_dir, tmp_path):
    """--no-merge writes an adapter (score head inside); other layouts come in through --columns."""
    from peft import PeftModel

    pairs = [json.loads(line) for line in (DEMO_DATA / "pairs_eval.jsonl").read_text().splitlines()]
    data = write_jsonl(
        tmp_path / "se.jsonl",
        [
            {"question": p["prompt"], "response_j": p["chosen"], "response_k": p["rejected"], "margin": 0.5}
            for p in pairs
        ],
    )
    out = tmp_path / "rm"
    result = rlkit(
        "train-rm",
        str(tiny_model_dir),
        str(data),
        "-o",
        str(out),
        "--columns",
        "prompt=question,chosen=response_j,rejected=response_k",
        "--template",
        "stack-exchange",
        "--no-merge",
        "--center-rewards",
        "0.01",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
    )
    assert result.returncode == 0, result.stderr
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "Question:" in tokenizer.chat_template
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    model = PeftModel.from_pretrained(base, out)
    trained_head = model.base_model.model.score.modules_to_save["default"].weight
    assert not torch.equal(trained_head, model.base_model.model.score.original_module.weight)


def test_full_reward_model_from_an_sft_adapter(tiny_model_dir, tmp_path):
    """MODEL may be a LoRA SFT adapter: its trunk is merged under the new score head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "sft-adapter"
    sft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    sft.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
    sft.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    out = tmp_path / "rm"
    result = rlkit(
        "train-rm",
        str(adapter),
        str(DEMO_DATA / "pairs_eval.jsonl"),
        "-o",
        str(out),
        "--full",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "0",
    )
    assert result.returncode == 0, result.stderr
    model = AutoModelForSequenceClassification.from_pretrained(out)
    merged = sft.merge_and_unload()
    torch.testing.assert_close(
        model.model.layers[0].self_attn.q_proj.weight, merged.model.layers[0].self_attn.q_proj.weight
    )


def test_pairs_without_room_exit_2(tiny_model_dir, tmp_path):
    out = tmp_path / "rm"
    result = rlkit(
        "train-rm", str(tiny_model_dir), str(DEMO_DATA / "pairs_eval.jsonl"), "-o", str(out), "--max-length", "8"
    )
    assert result.returncode == 2 and "every pair was dropped" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
