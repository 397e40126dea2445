"""The lean RMSNorm/SwiGLU forwards give the stock modules' values and gradients, and save less."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model

from rlkit.models.lean_blocks import use_lean_blocks


def _batch(vocab=600):
    torch.manual_seed(3)
    ids = torch.randint(3, vocab, (2, 24))
    return ids, torch.arange(24).repeat(2, 1)


def _loss(model, ids, positions):
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


@pytest.fixture(autouse=True)
def _lean_blocks_on(monkeypatch):
    """On by default; set here so that a developer's RLKIT_LEAN_BLOCKS=0 does not skew these tests."""
    monkeypatch.setenv("RLKIT_LEAN_BLOCKS", "1")


def test_lean_blocks_give_the_stock_values_and_gradients():
    stock = build_model(600)  # fp32: the norms compute in fp32 whatever the model dtype, as LlamaRMSNorm does
    lean = copy.deepcopy(stock)
    assert use_lean_blocks(lean) == 2 * 2 + 1 + 2  # per layer: 2 norms + 1 MLP; 2 layers; the final norm
    ids, positions = _batch()
    stock_loss, lean_loss = _loss(stock, ids, positions), _loss(lean, ids, positions)
    stock_loss.backward()
    lean_loss.backward()
    torch.testing.assert_close(lean_loss, stock_loss, atol=1e-7, rtol=0)
    for (name, a), b in zip(stock.named_parameters(), lean.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=0, msg=name)


def test_lean_blocks_under_bf16_autocast_match_the_stock_modules():
    stock = build_model(600)
    lean = copy.deepcopy(stock)
    use_lean_blocks(lean)
    ids, positions = _batch()
    losses = []
    for model in (stock, lean):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(model, ids, positions)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-3, rtol=1e-3)
    for a, b in zip(stock.parameters(), lean.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=2e-2, rtol=2e-2)


def _saved_bytes(model, ids, positions) -> int:
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, ids, positions)
    return sum(storages.values())


def test_lean_blocks_save_two_hidden_and_one_intermediate_vector_less_per_token_and_layer():
    stock = build_model(600)
    lean = copy.deepcopy(stock)
    use_lean_blocks(lean)
    ids, positions = _batch()
    config = stock.config
    tokens, layers = ids.numel(), config.num_hidden_layers
    expected = (
        4 * tokens * (layers * (2 * config.hidden_size + config.intermediate_size) + config.hidden_size)
    )  # fp32; + the final norm
    saved = _saved_bytes(stock, ids, positions) - _saved_bytes(lean, ids, positions)
    assert saved >= 0.95 * expected, (saved, expected)


def test_on_by_default(monkeypatch):
    monkeypatch.delenv("RLKIT_LEAN_BLOCKS")
    assert use_lean_blocks(build_model(600)) == 2 * 3 + 1


def test_unknown_modules_and_the_switch_leave_the_model_alone(monkeypatch):
    model = build_model(600)
    monkeypatch.setenv("RLKIT_LEAN_BLOCKS", "0")
    assert use_lean_blocks(model) == 0
    assert all("forward" not in vars(m) for m in model.modules())
    monkeypatch.setenv("RLKIT_LEAN_BLOCKS", "1")
    model.config.hidden_act = "gelu"
    from transformers.activations import ACT2FN

    for layer in model.model.layers:
        layer.mlp.act_fn = ACT2FN["gelu"]
    assert use_lean_blocks(model) == 2 * 2 + 1  # norms only


def test_the_known_classes_still_compute_what_the_lean_forwards_assume():
    import importlib
    import inspect

    from rlkit.models.lean_blocks import RMSNORM_CLASSES, SWIGLU_CLASSES

    llama = importlib.import_module("transformers.models.llama.modeling_llama")
    for names, reference in ((RMSNORM_CLASSES, llama.LlamaRMSNorm.forward), (SWIGLU_CLASSES, llama.LlamaMLP.forward)):
        for name in names:
            arch = name.removesuffix("RMSNorm").removesuffix("MLP").lower()
            cls = getattr(importlib.import_module(f"transformers.models.{arch}.modeling_{arch}"), name)
            assert inspect.getsource(cls.forward) == inspect.getsource(reference), name


def test_lora_inputs_are_not_cast_twice_under_autocast():
    """bf16 base + fp32 adapter under bf16 autocast: the same values bit for bit, one saved copy per input."""
    from rlkit.models.lean_blocks import lora_inputs_uncast_under_autocast
    from rlkit.models.load import add_lora

    base = build_model(600).to(torch.bfloat16)
    stock = add_lora(base, 4, 8, 0.0, "all-linear")
    for p in stock.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # lora_B starts at zero: give the adapter a gradient path
    lean = copy.deepcopy(stock)
    assert lora_inputs_uncast_under_autocast(lean) == 2 * 7  # q k v o gate up down, 2 layers
    ids, positions = _batch()

    def run(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(model, ids, positions)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (stock_loss, stock_grads), (lean_loss, lean_grads) = run(stock), run(lean)
    assert torch.equal(lean_loss, stock_loss)
    for name, grad in stock_grads.items():
        assert torch.equal(lean_grads[name], grad), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _saved_bytes(lean, ids, positions) < _saved_bytes(stock, ids, positions)
    with torch.no_grad():  # outside autocast peft's cast still applies: bf16 input, fp32 adapter
        assert torch.equal(
            lean(input_ids=ids, position_ids=positions).logits, stock(input_ids=ids, position_ids=positions).logits
        )
