"""Prefix reuse: the leading tokens every row shares run once, batch 1, and the rows go on from their
cache (eval's log-probs, generation's prefill); the numbers are those of the plain path."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_same_up_to_fp32, build_model

from rlkit.data.collate import collate_rows
from rlkit.data.tokenize import IGNORE
from rlkit.tools import generation
from rlkit.training import logprobs
from rlkit.training.logprobs import PREFIX_MIN_TOKENS, common_prefix, label_logprobs
from rlkit.training.rollout import RolloutSampling, generate_rows

VOCAB = 600


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _eval_batch(prompts: list[list[int]], completions: list[list[int]]) -> dict:
    """Right-padded rows as eval's `completion_logps` builds them: the completion labelled."""
    rows = [
        {"input_ids": p + c, "labels": [IGNORE] * len(p) + c, "position_ids": list(range(len(p) + len(c)))}
        for p, c in zip(prompts, completions)
    ]
    return collate_rows(rows, pad_id=2)


def _calls(monkeypatch, name: str) -> list[int]:
    """Count the calls of `logprobs.<name>` (the batch-1 prefix forward)."""
    calls: list[int] = []
    real = getattr(logprobs, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(logprobs, name, counted)
    return calls


def _both_paths(model, batch, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, int]:
    calls = _calls(monkeypatch, "_common_prefix_cache")
    with torch.no_grad():
        reused, reused_mask = label_logprobs(
            model, batch["input_ids"], batch["position_ids"], batch["labels"], reuse_prefix=True
        )
        plain, plain_mask = label_logprobs(model, batch["input_ids"], batch["position_ids"], batch["labels"])
    assert reused_mask.tolist() == plain_mask.tolist()
    return reused, plain, len(calls)


def test_common_prefix_counts_shared_real_columns():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 7, 8]])
    assert common_prefix(ids) == 3
    assert common_prefix(ids[[0, 2]]) == 4
    real = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    assert common_prefix(ids, real) == 2


@pytest.mark.parametrize("fused", [True, False])
def test_label_logprobs_with_a_shared_prefix_equal_the_plain_path(monkeypatch, fused):
    model = build_model(VOCAB).double().eval()
    if not fused:
        monkeypatch.setattr(logprobs, "output_layer_slot", lambda model: None)
    system = _tokens(24, 0)
    prompts = [system + _tokens(5, 1), system + _tokens(11, 2), system[:20], system]
    completions = [_tokens(7, 3), _tokens(2, 4), [_tokens(1, 5)[0]], _tokens(13, 6)]  # row 3: the prefix + 1 token
    reused, plain, calls = _both_paths(model, _eval_batch(prompts, completions), monkeypatch)
    assert calls == 1
    torch.testing.assert_close(reused, plain, atol=1e-12, rtol=0)
    assert bool((plain != 0).any())


def test_label_logprobs_without_a_shared_prefix_take_the_plain_path(monkeypatch):
    model = build_model(VOCAB).double().eval()
    short = _tokens(PREFIX_MIN_TOKENS - 1, 0)
    for prompts in (
        [_tokens(30, 1), _tokens(30, 2)],  # nothing shared
        [short + _tokens(10, 3), short + _tokens(10, 4)],  # too little shared
    ):
        reused, plain, calls = _both_paths(model, _eval_batch(prompts, [_tokens(4, 5), _tokens(6, 6)]), monkeypatch)
        assert calls == 0
        assert torch.equal(reused, plain)


def test_label_logprobs_prefix_stops_before_the_first_scored_logit(monkeypatch):
    """A row whose completion starts inside the shared tokens caps the prefix there."""
    model = build_model(VOCAB).double().eval()
    system = _tokens(40, 0)
    prompts, completions = [system[:20], system[:30]], [system[20:40], system[30:40] + _tokens(3, 1)]
    reused, plain, calls = _both_paths(model, _eval_batch(prompts, completions), monkeypatch)
    assert calls == 1
    torch.testing.assert_close(reused, plain, atol=1e-12, rtol=0)


def test_a_disabled_adapter_reference_computes_the_prefix_without_the_adapter(monkeypatch):
    """Through `Reference.logps` the prefix runs inside the same call, adapter off: the base's numbers."""
    from peft import LoraConfig, get_peft_model

    from rlkit.evaluation.generation import COMPLETION_LOGPS
    from rlkit.preference.reference import DisabledAdapterReference

    base = build_model(VOCAB).double().eval()
    system = _tokens(30, 0)
    batch = _eval_batch([system + _tokens(3, 1), system + _tokens(8, 2)], [_tokens(5, 3), _tokens(9, 4)])
    with torch.no_grad():
        expected = label_logprobs(base, batch["input_ids"], batch["position_ids"], batch["labels"])[0].sum(1)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config).double()
    calls = _calls(monkeypatch, "_common_prefix_cache")
    reference = DisabledAdapterReference(COMPLETION_LOGPS).logps(peft_model, batch)
    with torch.no_grad():
        policy = COMPLETION_LOGPS.measure(peft_model, batch)
    assert len(calls) == 2
    torch.testing.assert_close(reference, expected, atol=1e-10, rtol=0)
    assert (policy - expected).abs().max() > 1e-3  # the adapter does change the policy's numbers


def _generate(model, rows: list[list[int]]) -> torch.Tensor:
    from rlkit.tools.generation import left_pad

    ids, mask = left_pad(rows, 2)
    inputs = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext),
        tokenizer=SimpleNamespace(eos_token_id=1, pad_token_id=2),
    )
    how = RolloutSampling(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=None, chunk=8)
    return generate_rows(inputs, model, ids, mask, how, None, 8, shared_prompts=False)


def test_greedy_generation_from_a_common_prefix_gives_the_same_tokens(monkeypatch):
    model = build_model(VOCAB).double().eval()
    system = _tokens(20, 0)
    rows = [system + _tokens(9, 1), system + _tokens(1, 2), system + _tokens(4, 3), system + [7]]
    calls = _calls(monkeypatch, "_common_prefix_cache")
    reused = _generate(model, rows)
    assert len(calls) == 1
    monkeypatch.setattr(generation, "left_padded_prefix", lambda *args: None)  # where the samplers look it up
    plain = _generate(model, rows)
    assert reused.shape == plain.shape == (4, 8)
    assert reused.tolist() == plain.tolist()


def test_left_padded_prefix_moves_the_padding_after_the_prefix():
    model = build_model(VOCAB).double().eval()
    system = _tokens(PREFIX_MIN_TOKENS, 0)
    ids = torch.tensor([[2, 2] + system + [9], system + [5, 6, 7]])
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[2], [0]])).long()
    cache, new_ids, new_mask, _ = logprobs.left_padded_prefix(model, ids, mask)
    assert new_ids.tolist() == [system + [2, 2, 9], system + [5, 6, 7]]
    assert new_mask.tolist() == [[1] * len(system) + [0, 0, 1], [1] * (len(system) + 3)]
    assert cache.get_seq_length() == len(system)
    assert logprobs.left_padded_prefix(model, ids[:, :-1], mask[:, :-1]) is None  # row 0 would keep no token


@pytest.mark.parametrize("fused", [True, False])
def test_rollout_rows_sharing_a_system_prompt_run_it_once(monkeypatch, fused):
    """PPO's rows (left-padded prompts that share only a system prompt, then the responses): the
    prompt-cached log-probs, entropies, the last hidden states at the response's states (what a
    value head reads) and the gradients are the plain forward's (`assert_same_up_to_fp32`); the
    system prompt runs once. A model whose output layer is not a plain Linear takes the plain path."""
    from rlkit.tools.generation import left_pad
    from rlkit.training.logprobs import prompt_cached_logprobs, response_logprobs

    model = build_model(VOCAB).double().train()
    if not fused:
        model.config.final_logit_softcapping = 30.0  # the fused head stands aside: the plain path
    system = _tokens(PREFIX_MIN_TOKENS + 4, 0)
    prompts = [system + _tokens(n, seed) for seed, n in ((1, 9), (2, 1), (3, 4), (4, 6))]
    query, query_mask = left_pad(prompts, 2)
    responses = torch.tensor([_tokens(5, 10 + i) for i in range(4)])
    response_mask = torch.tensor([[1] * 5, [1] * 5, [1, 1, 0, 0, 0], [1] * 5])
    ids, mask = torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(function):
        logps, entropy, out = function(model, ids, mask, responses, 0.7, output_hidden_states=True)
        states = out.hidden_states[-1][:, -6:-1]
        grads = torch.autograd.grad((logps * response_mask).sum() + states.sum(), params, allow_unused=True)
        return logps, entropy, states, grads

    calls = _calls(monkeypatch, "_common_prefix_cache")
    cached = run(prompt_cached_logprobs)
    assert len(calls) == (1 if fused else 0)
    plain = run(response_logprobs)
    for got, expected in zip([*cached[:3], *cached[3]], [*plain[:3], *plain[3]], strict=True):
        assert_same_up_to_fp32(got, expected)
