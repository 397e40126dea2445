"""Cheaper CPU decoding (rlkit.training.fast_sampling): transformers' warpers' numbers with numpy's
sort, and a column-major weight layout that computes the same function."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from rlkit.training.fast_sampling import SamplingWarper, column_major_frozen_linears, warper_kwargs


def _transformers_warpers(temperature: float, top_k: int | None, top_p: float) -> LogitsProcessorList:
    """What `generate` builds for do_sample with these settings, in its order."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, 0.95), (0.7, None, 0.9), (1.3, 50, 0.8), (1.0, 20, 1.0), (0.5, None, 0.3), (1.0, None, 1.0)],
)
def test_warper_removes_what_transformers_removes(temperature, top_k, top_p):
    torch.manual_seed(0)
    scores = torch.randn(8, 5000) * 3  # distinct values: no tie at the nucleus's edge
    ids = torch.zeros(8, 1, dtype=torch.long)
    ours = SamplingWarper(temperature, top_k, top_p)(ids, scores.clone())
    theirs = _transformers_warpers(temperature, top_k, top_p)(ids, scores.clone())
    assert torch.equal(ours, theirs)  # the same numbers, -inf at the same places


def test_warper_keeps_one_token_and_refuses_bad_settings():
    scores = torch.tensor([[0.0, 10.0, -3.0]])
    kept = SamplingWarper(1.0, None, 0.01)(torch.zeros(1, 1, dtype=torch.long), scores)
    assert torch.isfinite(kept).tolist() == [[False, True, False]]
    with pytest.raises(ValueError):
        SamplingWarper(0.0, None, 0.9)
    with pytest.raises(ValueError):
        SamplingWarper(1.0, None, 0.0)


def test_generate_samples_the_same_tokens_through_the_warper():
    model = build_model(300).eval()
    ids = torch.randint(3, 300, (4, 6))
    outs = []
    for kwargs in ({"temperature": 0.8, "top_k": None, "top_p": 0.9}, warper_kwargs(0.8, None, 0.9)):
        torch.manual_seed(3)
        outs.append(model.generate(input_ids=ids, do_sample=True, max_new_tokens=12, pad_token_id=0, **kwargs))
    assert torch.equal(outs[0], outs[1])


def test_column_major_layout_keeps_the_function_and_the_trained_weights():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model(300), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.eval()
    ids = torch.randint(3, 300, (4, 40))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = {n: p.data_ptr() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    changed = column_major_frozen_linears(model)
    assert changed > 0
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])  # the same values
        if name in trained:
            assert p.is_contiguous() and p.data_ptr() == trained[name]  # trained weights untouched
    frozen = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    assert frozen and all(w.t().is_contiguous() for w in frozen)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert column_major_frozen_linears(model) == changed  # again: the same weights, still the same values
