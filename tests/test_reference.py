"""The one reference (rlkit.preference.reference): its tokenizer check in every command that takes --ref.

`dpo` and `ppo` are compared in test_ppo.py; here `kto` and `eval` give the same refusal.
"""

from __future__ import annotations

import shutil

from conftest import DEMO_DATA, build_tokenizer, run_cli


def test_kto_and_eval_refuse_a_ref_with_another_tokenizer(tiny_model_dir, tmp_path):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, other)
    build_tokenizer(vocab_size=500).save_pretrained(other)
    expected = f"error: --ref {other}: its tokenizer differs from {tiny_model_dir}'s; the reference must share the policy's tokens"
    for args in (
        ["kto", str(tiny_model_dir), str(DEMO_DATA / "unpaired.jsonl"), "-o", str(tmp_path / "kto")],
        [
            "eval",
            str(tiny_model_dir),
            "--pairs",
            str(DEMO_DATA / "pairs_eval.jsonl"),
            "--output-dir",
            str(tmp_path / "eval"),
        ],
    ):
        result = run_cli(*args, "--ref", str(other))
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert errors == [expected] and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / args[0]).exists() and not (tmp_path / f"{args[0]}.partial").exists()


def test_ppo_measure_through_each_on_the_fly_strategy(tiny_model_dir, tmp_path):
    """PPO's [B, R] response log-probs through the shared strategies: a continued adapter's frozen
    start (after the policy's adapter moved), the base with the adapter off, a separate model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rlkit.models.load import load_causal_lm, resolve_source
    from rlkit.preference.reference import AdapterReference, DisabledAdapterReference, ModelReference
    from rlkit.recipes.ppo import rollout_reference_spec
    from rlkit.training.logprobs import response_logprobs

    torch.manual_seed(0)
    base = load_causal_lm(resolve_source(str(tiny_model_dir)))
    start = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    start.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
    start.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[0, 5, 6, 7, 40, 41, 42], [9, 10, 11, 12, 43, 44, 45]])
    rows = {"input_ids": ids, "attention_mask": torch.tensor([[0] + [1] * 6, [1] * 7]), "responses": ids[:, -3:]}
    spec = rollout_reference_spec(0.7)

    def measured(model):
        with torch.no_grad():
            return response_logprobs(model, rows["input_ids"], rows["attention_mask"], rows["responses"], 0.7)[0]

    expected_start = measured(start)
    with start.disable_adapter():
        expected_base = measured(start)
    policy = load_causal_lm(resolve_source(str(tmp_path / "adapter")))
    reference = AdapterReference(policy, str(tmp_path / "adapter"), spec)
    with torch.no_grad():  # training moves the policy's adapter
        for name, param in policy.named_parameters():
            if "lora_A.default" in name:
                param.add_(0.3)
    got = reference.logps(policy, rows)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, expected_start, atol=1e-5, rtol=0)
    assert (measured(policy) - expected_start).abs().max() > 1e-3  # the policy itself has moved
    torch.testing.assert_close(DisabledAdapterReference(spec).logps(policy, rows), expected_base, atol=1e-5, rtol=0)
    separate = load_causal_lm(resolve_source(str(tiny_model_dir)))
    torch.testing.assert_close(ModelReference(separate, spec).logps(policy, rows), expected_base, atol=1e-5, rtol=0)
