"""A KV cache for sampling that grows in place instead of being copied at every new token.

transformers' `DynamicLayer.update` appends a token's keys and values with `torch.cat`, which
copies the whole cache of the layer: every decoding step then moves the entire cache through
memory twice (keys and values), once per layer. With a long prompt that costs more than the
attention it feeds. SmolLM2-135M, 32 rows of 250 prompt tokens (the demo's tool schemas), fp32,
2 threads of this project's Xeon: `cat` took 36% of a decoding step (87 of 256 ms); the step
takes 158 ms without it (the same logits, bit for bit).

`GrowingLayer` keeps each layer's keys and values in a buffer with room to spare and writes a new
token into it; `keys` and `values` stay what `DynamicLayer` exposes (views of the filled part),
so masks, `get_seq_length` and everything else that reads them work unchanged. The buffer
doubles when it is full (amortised O(1) copies per token). Writing in place is only sound where
nothing holds the old tensors for a backward pass, so `growing` refuses a cache under autograd:
generation runs under `no_grad`, the training forwards that reuse a prefix cache keep `cat`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """`DynamicLayer` whose `update` writes into spare room of a buffer instead of concatenating."""

    _key_room: torch.Tensor | None = None
    _value_room: torch.Tensor | None = None

    def _owns(self, length: int) -> bool:
        """Whether `keys`/`values` are still the filled part of this layer's buffers (anything that
        replaced them, `crop`, `batch_select_indices`, `reorder_cache`, makes the buffers stale)."""
        rooms = self._key_room, self._value_room
        if rooms[0] is None or rooms[1] is None or self.keys is None or self.values is None:
            return False
        return all(
            t.data_ptr() == room.data_ptr() and t.shape[-2] == length and t.shape[:-2] == room.shape[:-2]
            for t, room in zip((self.keys, self.values), rooms)
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        new = key_states.shape[-2]
        if not self._owns(length) or length + new > self._key_room.shape[-2]:  # type: ignore[union-attr]
            self._reallocate(length, max(2 * (length + new), length + new + 64), key_states, value_states)
        assert self._key_room is not None and self._value_room is not None
        self._key_room[..., length : length + new, :].copy_(key_states)
        self._value_room[..., length : length + new, :].copy_(value_states)
        self.keys = self._key_room[..., : length + new, :]
        self.values = self._value_room[..., : length + new, :]
        return self.keys, self.values

    def _reallocate(self, length: int, capacity: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Buffers of `capacity` positions holding the `length` cached ones (keys and values laid out
        each as its own states: a value head may be narrower than a key head)."""
        rooms = []
        for filled, fresh in ((self.keys, keys), (self.values, values)):
            room = fresh.new_empty((*fresh.shape[:-2], capacity, fresh.shape[-1]))
            if length:
                assert filled is not None
                room[..., :length, :].copy_(filled)
            rooms.append(room)
        self._key_room, self._value_room = rooms


def growing(cache: Any) -> Any:
    """`cache` (a `DynamicCache`) with its plain `DynamicLayer`s turned into `GrowingLayer`s, in
    place, their contents kept; other layer kinds (sliding windows) and other caches are returned
    as they are. Refused under autograd (see the module's docstring)."""
    if torch.is_grad_enabled():
        raise RuntimeError("a growing KV cache writes in place: use it under torch.no_grad() only")
    if not isinstance(cache, DynamicCache):
        return cache
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            grown = GrowingLayer.__new__(GrowingLayer)
            grown.__dict__.update(layer.__dict__)
            cache.layers[i] = grown
    # a cache made without a config adds its layers as they are first updated
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = GrowingLayer
    return cache


def empty_growing_cache(model: Any) -> Any | None:
    """The cache `generate` would make for `model` (a `DynamicCache` laid out from its decoder's
    config), its full-attention layers growing in place; None where `generate` would make another
    kind (the model or its generation config asks for one), which it is then left to do."""
    from rlkit.scoring import unwrap_peft

    hf = unwrap_peft(model)
    supports = getattr(hf, "_supports_default_dynamic_cache", None)
    config = getattr(hf, "config", None)
    if supports is None or not supports() or config is None:
        return None
    if getattr(getattr(hf, "generation_config", None), "cache_implementation", None) is not None:
        return None
    return growing(DynamicCache(config=config.get_text_config(decoder=True)))
