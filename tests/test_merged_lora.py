"""Generation through merged LoRA weights: the adapter's function inside, the model untouched after."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model

from rlkit.models.merged_lora import lora_merged_for_generation


def _lora(model: torch.nn.Module, **extra) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, **extra))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # a trained-looking adapter (B starts at zero)
    return model.eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_weights_compute_the_adapter_and_are_undone_exactly(dtype):
    model = _lora(build_model(300).to(dtype))
    ids = torch.randint(3, 300, (2, 9))
    with_adapter = _logits(model, ids)
    with model.disable_adapter():
        base = _logits(model, ids)
    assert not torch.allclose(with_adapter, base, atol=1e-3)  # the adapter changes the function
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}

    with lora_merged_for_generation(model) as merged:
        inside = _logits(merged, ids)
        from peft.tuners.lora import LoraLayer

        assert not any(isinstance(m, LoraLayer) for m in merged.modules())  # the base projections carry the adapter now
    tolerance = 1e-5 if dtype == torch.float32 else 0.1  # bf16: the merged weights are rounded to bf16
    torch.testing.assert_close(inside, with_adapter, atol=tolerance, rtol=0)

    for name, p in model.named_parameters():  # the very same tensors, bit for bit
        ptr, value = before[name]
        assert p.data_ptr() == ptr, name
        assert torch.equal(p.detach(), value), name
    assert torch.equal(_logits(model, ids), with_adapter)  # the adapter layers are back


def test_models_it_does_not_merge_are_left_alone():
    plain = build_model(300).eval()
    with lora_merged_for_generation(plain) as same:
        assert same is plain
    # modules_to_save would be switched back to their originals with the adapter off: no merge
    model = _lora(build_model(300), modules_to_save=["lm_head"])
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    saved = weight.detach().clone()
    ids = torch.randint(3, 300, (2, 9))
    expected = _logits(model, ids)
    with lora_merged_for_generation(model) as same:
        assert torch.equal(weight.detach(), saved)
        assert torch.equal(_logits(same, ids), expected)


def test_eval_generation_samples_what_the_adapter_layers_would():
    """`generate_rollouts` (eval, piped chat) folds the adapter in and runs a shared system prompt
    once: greedy answers and their log-probs are those of plain `generate` through the adapter."""
    from conftest import build_tokenizer

    from rlkit.data.templates import resolve_template
    from rlkit.tools.generation import SamplingConfig, generate_rollouts, generated_token_logps, left_pad

    tokenizer = build_tokenizer()
    model = _lora(build_model(len(tokenizer)))
    template = resolve_template(None, tokenizer)
    system = {"role": "system", "content": "You answer questions about numbers and months, briefly and politely."}
    questions = ["What is 2 + 3?", "Which month comes after May?", "Name a prime."]
    conversations = [[system, {"role": "user", "content": q}] for q in questions]
    replies = generate_rollouts(
        model, tokenizer, template, conversations, SamplingConfig(max_new_tokens=8), with_logps=True
    )

    ids, mask = left_pad([r.prompt_ids for r in replies], tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
    plain = out.sequences[:, ids.shape[1] :]
    plain_logps = generated_token_logps(out.logits, plain)
    for i, reply in enumerate(replies):
        n = len(reply.completion_ids)
        assert reply.completion_ids == plain[i, :n].tolist()
        # fp32: merged weights and a cached prefix change each logit by rounding only (~1e-6 of
        # |logit| ≲ 10 through 2 layers); a log-softmax of a 300-token vocabulary stays within ~1e-5
        # per token, 8 tokens ~1e-4 (measured 4e-6 with the default, avx2 and avx512 kernels)
        assert reply.logp == pytest.approx(float(plain_logps[i, :n].sum()), abs=1e-4)
