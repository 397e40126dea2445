"""The CPU attention for bf16 training: stock values, fp32 gradients, recomputed exactly, less saved."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import build_model

from rlkit.models import attention
from rlkit.models.attention import NAME, use_fp32_attention_backward


@pytest.fixture(autouse=True)
def _on(monkeypatch):
    monkeypatch.setenv("RLKIT_FP32_ATTENTION_BACKWARD", "1")


def _batch():
    torch.manual_seed(5)
    ids = torch.randint(3, 600, (3, 20))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding: a real mask reaches the kernel
    return ids, mask


def _loss(model, ids, mask):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return logits.float().logsumexp(-1).mean()


def _grads(model):
    return {n: p.grad.float().clone() for n, p in model.named_parameters()}


def test_bf16_model_gradients_come_from_the_fp32_kernel_recomputed_exactly(monkeypatch):
    base = build_model(600).to(torch.bfloat16)
    switched = copy.deepcopy(base)
    assert use_fp32_attention_backward(switched)
    assert switched.config._attn_implementation == NAME
    ids, mask = _batch()
    _loss(switched, ids, mask).backward()
    recomputed = _grads(switched)

    # the same maths without the recomputation: sdpa on fp32 copies, autograd keeping them
    def kept(module, query, key, value, attention_mask, **kwargs):
        if not query.requires_grad:
            return attention._attention(module, query, key, value, attention_mask, **kwargs)
        return attention._fp32_sdpa(module, query, key, value, attention_mask, kwargs).to(torch.bfloat16), None

    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, NAME, kept)
    switched.zero_grad()
    _loss(switched, ids, mask).backward()
    for name, grad in _grads(switched).items():
        assert torch.equal(recomputed[name], grad), name

    # and close to the stock bf16 kernel's (which accumulates in fp32 as well)
    _loss(base, ids, mask).backward()
    for name, grad in _grads(base).items():
        torch.testing.assert_close(recomputed[name], grad, atol=2e-2, rtol=5e-2, msg=name)


def test_full_precision_weights_under_autocast_take_the_fp32_kernel_too():
    """fp32 weights + bf16 autocast (full fine-tuning): Llama's rotary embedding hands over fp32 q, k."""
    calls = []
    model = build_model(600)
    use_fp32_attention_backward(model)
    original = attention._Fp32Attention.apply
    attention._Fp32Attention.apply = lambda *a: calls.append(a[0].dtype) or original(*a)
    try:
        ids, mask = _batch()
        _loss(model, ids, mask).backward()
    finally:
        attention._Fp32Attention.apply = original
    assert calls == [torch.float32] * model.config.num_hidden_layers


def test_without_gradient_it_is_the_stock_kernel():
    base = build_model(600).to(torch.bfloat16)
    switched = copy.deepcopy(base)
    use_fp32_attention_backward(switched)
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(_loss(switched, ids, mask), _loss(base, ids, mask))


def test_it_saves_less_for_the_backward_than_the_stock_bf16_kernel():
    base = build_model(600, hidden=128).to(torch.bfloat16)
    switched = copy.deepcopy(base)
    use_fp32_attention_backward(switched)
    ids, mask = _batch()

    def saved(model):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _loss(model, ids, mask)
        return sum(storages.values())

    # stock keeps q, k and v expanded to every head, and the output; this keeps q, k, v as they came
    assert saved(switched) < saved(base)


def test_left_alone_with_an_accelerator_another_attention_or_the_switch_off(monkeypatch):
    monkeypatch.delenv("RLKIT_FP32_ATTENTION_BACKWARD")
    monkeypatch.setattr(attention, "accelerator_available", lambda: True)
    assert not use_fp32_attention_backward(build_model(600))
    monkeypatch.setattr(attention, "accelerator_available", lambda: False)
    eager = build_model(600)
    eager.set_attn_implementation("eager")
    assert not use_fp32_attention_backward(eager)
    monkeypatch.setenv("RLKIT_FP32_ATTENTION_BACKWARD", "0")
    model = build_model(600)
    assert not use_fp32_attention_backward(model)
    assert model.config._attn_implementation == "sdpa"


def test_a_saved_model_does_not_name_it(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(600)
    use_fp32_attention_backward(model)
    model.save_pretrained(tmp_path)
    assert NAME not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation != NAME


def test_a_lora_model_is_switched_through_its_base():
    from rlkit.models.load import add_lora

    model = add_lora(build_model(600), 4, 8, 0.0, "all-linear")
    assert use_fp32_attention_backward(model)
    assert model.get_base_model().config._attn_implementation == NAME
