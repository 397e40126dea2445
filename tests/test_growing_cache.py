"""The in-place KV cache of sampling: what `DynamicLayer` holds, without a copy per token."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model
from transformers.cache_utils import DynamicCache, DynamicLayer

from rlkit.models.growing_cache import GrowingLayer, empty_growing_cache, growing


def _states(rows: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, tokens, 4, generator=g), torch.randn(rows, 2, tokens, 4, generator=g)


def test_updates_hold_what_concatenation_holds_through_reallocations_and_replacements():
    plain, grown = DynamicLayer(), GrowingLayer()
    with torch.no_grad():
        for step, tokens in enumerate([5, 1, 1, 70, 1, 3, 1]):  # 70: past the first buffer's room
            k, v = _states(3 if step <= 4 else 2, tokens, step)
            want, got = plain.update(k, v), grown.update(k, v)
            for a, b in zip(want, got):
                assert torch.equal(a, b)
            assert grown.get_seq_length() == plain.get_seq_length()
            if step == 4:  # what generate does to a cache between calls: select rows, crop
                for layer in (plain, grown):
                    layer.batch_select_indices(torch.tensor([2, 0]))
                    layer.crop(-2)
                assert torch.equal(grown.keys, plain.keys) and torch.equal(grown.values, plain.values)
    # tensors returned earlier keep their contents: later tokens go into room past them
    first_keys = grown.keys.clone()
    k, v = _states(2, 1, 99)
    with torch.no_grad():
        grown.update(k, v)
    assert torch.equal(grown.keys[..., :-1, :], first_keys)


def test_values_narrower_than_keys_get_their_own_buffer():
    layer = GrowingLayer()
    with torch.no_grad():
        for step in range(3):
            keys, values = torch.randn(2, 1, 40, 8), torch.randn(2, 1, 40, 4)  # 40: past the first room too
            got_keys, got_values = layer.update(keys, values)
            assert got_keys.shape == (2, 1, 40 * (step + 1), 8) and got_values.shape == (2, 1, 40 * (step + 1), 4)
            assert torch.equal(got_values[..., -40:, :], values)


def test_growing_refuses_autograd_and_keeps_a_prefix_cache_contents():
    cache = DynamicCache()
    with torch.no_grad():
        cache.update(*_states(2, 6, 0), layer_idx=0)
    keys = cache.layers[0].keys.clone()
    with pytest.raises(RuntimeError, match="no_grad"):
        growing(cache)
    with torch.no_grad():
        grown = growing(cache)
        assert isinstance(grown.layers[0], GrowingLayer) and torch.equal(grown.layers[0].keys, keys)
        grown.update(*_states(2, 1, 1), layer_idx=1)  # a layer added as it goes grows too
    assert isinstance(grown.layers[1], GrowingLayer)


@pytest.mark.parametrize("sample", [False, True])
def test_generate_samples_the_same_tokens_with_it(sample):
    model = build_model(300).eval()
    ids = torch.randint(3, 300, (4, 40))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # a left-padded row
    kwargs = {"max_new_tokens": 90, "min_new_tokens": 90, "do_sample": sample, "pad_token_id": 0}
    with torch.no_grad():
        torch.manual_seed(3)
        plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        cache = empty_growing_cache(model)
        torch.manual_seed(3)
        grown = model.generate(input_ids=ids, attention_mask=mask, cache=cache, **kwargs)
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 40 + 90 - 1  # it held every token, reallocating past the first room
    assert torch.equal(plain, grown)
