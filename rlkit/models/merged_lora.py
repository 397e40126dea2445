"""Generation through a LoRA policy at the speed of its base model.

A LoRA layer adds s·B·A·x to the projection it wraps. In a training forward over many tokens
that costs little, but generation runs the model once per new token on a handful of rows,
where the two extra matmuls, the casts and the Python of every wrapped layer cost about as
much as the base projection itself: SmolLM2-135M, all-linear r 16, 8 prompts x 32 new tokens,
bf16 on CPU: 4.6-4.8 s through the adapter layers, 2.7-2.9 s without them.

So for the duration of a generation each adapter layer is replaced by the projection it wraps,
given the merged weight W + s·B·A as a new tensor. The original weight tensors are put back
untouched afterwards: nothing drifts, where an in-place merge/unmerge round trip would not
give W back in bf16. The merged weights are rounded to the base's dtype, so a bf16 base
samples from a distribution that differs from the adapter forward by rounding only; PPO
scores every sample with the adapter forward afterwards, so its log-probs do not depend on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _plain_lora_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, Any, list[str]]] | None:
    """(parent, attribute, LoRA layer, its active adapters) for every LoRA layer to merge, or None
    when some layer is not a plain unmerged LoRA Linear, or the adapter also trains whole modules
    (switching the adapter off would switch those back)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        from peft.utils.other import AuxiliaryTrainingWrapper as Auxiliary  # modules_to_save, trainable tokens
    except ImportError:  # older peft
        from peft.utils.other import ModulesToSaveWrapper as Auxiliary

    layers = []
    for parent in model.modules():
        for name, module in parent.named_children():
            if isinstance(module, Auxiliary) or (
                isinstance(module, BaseTunerLayer) and not isinstance(module, LoraLayer)
            ):
                return None
            if not isinstance(module, LoraLayer):
                continue
            active = [a for a in module.active_adapters if a in module.lora_A]
            if not active:
                continue
            base = module.get_base_layer()
            plain = (
                isinstance(base, torch.nn.Linear)
                and tuple(base.weight.shape) == (base.out_features, base.in_features)  # not sharded (FSDP, ZeRO-3)
                and all(
                    module.lora_B[a].weight.shape[0] == base.out_features
                    and module.lora_A[a].weight.shape[1] == base.in_features
                    for a in active
                )
                and not module.merged
                and not any(module.use_dora.get(a, False) for a in active)
                and not any(getattr(module, "lora_bias", {}).get(a, False) for a in active)
            )
            if not plain:
                return None
            layers.append((parent, name, module, active))
    return layers


@contextmanager
def lora_merged_for_generation(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside: every LoRA layer of `model` is replaced by its base projection, carrying W + s·B·A.

    The layers are taken out of the module tree rather than switched off, because a switched-off
    adapter layer still costs its Python on every call (4.1 s against 2.8 s for the generation
    above). A model without LoRA layers, or with adapters of another kind (DoRA, biases,
    modules to save), is left as it is.
    """
    from peft import PeftModel

    layers = _plain_lora_layers(model) if isinstance(model, PeftModel) else None
    if not layers:
        yield model
        return
    originals = []  # (base projection, its own weight tensor)
    with torch.no_grad():
        for parent, name, layer, active in layers:
            base = layer.get_base_layer()
            delta = sum(layer.get_delta_weight(a).float() for a in active)
            originals.append((base, base.weight.data))
            base.weight.data = (base.weight.data.float() + delta).to(base.weight.dtype)
            setattr(parent, name, base)
    try:
        yield model
    finally:
        for (parent, name, layer, _), (base, weight) in zip(layers, originals):
            base.weight.data = weight
            setattr(parent, name, layer)
