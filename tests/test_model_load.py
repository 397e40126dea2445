"""What `load_causal_lm` adds to a model beyond transformers' loading."""

from __future__ import annotations

import torch

from rlkit.models.load import load_causal_lm, resolve_source


def test_the_output_layer_gets_a_contiguous_input(tiny_model_dir):
    """transformers hands the output layer `hidden[:, -k:]`, a strided view; with a frozen weight
    CPU linear layers take a slow path for it (170x in bf16), so the loader makes it contiguous."""
    model = load_causal_lm(resolve_source(str(tiny_model_dir))).eval().requires_grad_(False)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(input_ids=torch.randint(3, 100, (3, 7)), logits_to_keep=2)
        model.generate(
            input_ids=torch.randint(3, 100, (3, 7)),
            attention_mask=torch.ones(3, 7, dtype=torch.long),
            max_new_tokens=2,
            do_sample=False,
        )
    assert seen and all(seen)


def test_bf16_hints_only_for_auto_on_a_bf16_cpu(monkeypatch):
    """Training (`--precision auto`) and inference (`--dtype auto`) stay fp32 on CPU, and say
    once when the CPU would run bf16 much faster; never when the user chose, or on a GPU."""
    from rlkit import hardware
    from rlkit.models import inference
    from rlkit.training import engine
    from rlkit.training.options import TrainConfig

    monkeypatch.setattr(hardware, "accelerator_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_computes_bf16", lambda: True)
    assert "--dtype bfloat16" in inference.dtype_hint("auto")
    assert "--precision bf16" in engine.precision_hint(TrainConfig(precision="auto"))
    assert inference.dtype_hint("float32") is None and engine.precision_hint(TrainConfig(precision="fp32")) is None
    monkeypatch.setattr(hardware, "cpu_computes_bf16", lambda: False)
    assert inference.dtype_hint("auto") is None and engine.precision_hint(TrainConfig(precision="auto")) is None
    monkeypatch.setattr(hardware, "cpu_computes_bf16", lambda: True)
    monkeypatch.setattr(hardware, "accelerator_available", lambda: True)
    assert inference.dtype_hint("auto") is None
