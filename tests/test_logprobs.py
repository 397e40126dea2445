"""The chunked log-prob head gives the values and gradients of a plain log-softmax, and
`label_logprobs` gives the same result through it as through full logits."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model

from rlkit.data.tokenize import IGNORE
from rlkit.training import logprobs
from rlkit.training.logprobs import label_logprobs, response_logprobs, token_logps


def _plain(hidden, head, targets):
    return torch.log_softmax(head(hidden).double(), dim=-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("frozen_head", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logps_and_gradients_equal_a_plain_log_softmax(frozen_head, bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=bias).double().requires_grad_(not frozen_head)
    hidden = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    upstream = torch.randn(11, dtype=torch.float64)

    expected = _plain(hidden, head, targets)
    expected_grads = torch.autograd.grad(
        (expected * upstream).sum(), [hidden, *[p for p in head.parameters() if p.requires_grad]]
    )
    got = token_logps(hidden, head, targets, chunk=4)  # 3 chunks, the last one short
    got_grads = torch.autograd.grad(
        (got * upstream).sum(), [hidden, *[p for p in head.parameters() if p.requires_grad]]
    )

    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert len(got_grads) == len(expected_grads)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=0)


@pytest.mark.parametrize("frozen_head", [False, True])
def test_chunked_logps_at_a_temperature_and_their_entropy(frozen_head):
    """scale = 1/T: log softmax(logits / T)[y], its gradients, and the entropy of softmax(logits / T)."""
    torch.manual_seed(3)
    head = torch.nn.Linear(8, 50, bias=True).double().requires_grad_(not frozen_head)
    hidden = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    upstream = torch.randn(9, dtype=torch.float64)
    wrt = [hidden, *[p for p in head.parameters() if p.requires_grad]]

    scaled = head(hidden).double() / 0.7
    expected = torch.log_softmax(scaled, dim=-1).gather(1, targets[:, None]).squeeze(1)
    expected_entropy = -(torch.softmax(scaled, -1) * torch.log_softmax(scaled, -1)).sum(-1)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), wrt)
    got, entropy = logprobs._ChunkedTokenLogps.apply(hidden, head.weight, head.bias, targets, 4, 1 / 0.7, True)
    got_grads = torch.autograd.grad((got * upstream).sum(), wrt)

    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy.detach(), atol=1e-12, rtol=0)
    assert not entropy.requires_grad
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=0)


def test_chunked_logps_pass_gradcheck():
    torch.manual_seed(1)
    head = torch.nn.Linear(4, 7).double()
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (5,))
    assert torch.autograd.gradcheck(
        lambda h, w, b: logprobs._ChunkedTokenLogps.apply(h, w, b, targets, 2)[0], (hidden, head.weight, head.bias)
    )
    assert torch.autograd.gradcheck(
        lambda h, w, b: logprobs._ChunkedTokenLogps.apply(h, w, b, targets, 2, 1 / 1.3)[0],
        (hidden, head.weight, head.bias),
    )


def _batch():
    torch.manual_seed(2)
    input_ids = torch.randint(3, 600, (3, 20))
    position_ids = torch.arange(20).repeat(3, 1)
    position_ids[1, 9:] = torch.arange(11)  # a packed row: two sequences
    labels = input_ids.clone()
    labels[:, :6] = IGNORE
    labels[1, 9:13] = IGNORE
    labels[2, 15:] = IGNORE
    return input_ids, position_ids, labels


def test_label_logprobs_fused_equal_full_logits(monkeypatch):
    model = build_model(600).double()
    input_ids, position_ids, labels = _batch()
    fused, fused_mask = label_logprobs(model, input_ids, position_ids, labels)
    fused.sum().backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    monkeypatch.setattr(logprobs, "output_layer_slot", lambda model: None)  # the plain path
    plain, plain_mask = label_logprobs(model, input_ids, position_ids, labels)
    plain.sum().backward()

    assert fused_mask.tolist() == plain_mask.tolist()
    torch.testing.assert_close(fused, plain, atol=1e-10, rtol=0)
    for fused_grad, p in zip(fused_grads, model.parameters()):
        torch.testing.assert_close(fused_grad, p.grad, atol=1e-10, rtol=0)
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # the output layer is back


def test_label_logprobs_fused_under_bf16_autocast_match_the_autocast_output_layer(monkeypatch):
    model = build_model(600)
    input_ids, position_ids, labels = _batch()
    results = []
    for slot in (logprobs.output_layer_slot, lambda model: None):
        monkeypatch.setattr(logprobs, "output_layer_slot", slot)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, _ = label_logprobs(model, input_ids, position_ids, labels)
        logps.sum().backward()
        results.append(
            (logps.detach(), model.lm_head.weight.grad.clone(), model.model.embed_tokens.weight.grad.clone())
        )
    (fused, *fused_grads), (plain, *plain_grads) = results
    assert fused.dtype == plain.dtype == torch.float32
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
    for f, p in zip(fused_grads, plain_grads):
        torch.testing.assert_close(f, p, atol=1e-3, rtol=1e-3)


def test_models_that_post_process_logits_take_the_plain_path():
    model = build_model(600)
    assert logprobs.output_layer_slot(model) is not None
    model.config.final_logit_softcapping = 30.0
    assert logprobs.output_layer_slot(model) is None


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_response_logprobs_fused_equal_full_logits(monkeypatch, temperature):
    """Rollout rows (left-padded prompt + response): the fused head gives the log-probs, entropies
    and gradients of the plain path (full logits of the response columns, log-softmax at T)."""
    model = build_model(600).double()
    torch.manual_seed(4)
    input_ids = torch.randint(3, 600, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # shorter prompts, left-padded
    attention_mask[2, :2] = 0
    responses = input_ids[:, -5:]
    results = []
    for slot in (logprobs.output_layer_slot, lambda model: None):
        monkeypatch.setattr(logprobs, "output_layer_slot", slot)
        model.zero_grad()
        logps, entropy, _ = response_logprobs(model, input_ids, attention_mask, responses, temperature)
        (logps * torch.arange(15, dtype=logps.dtype).view(3, 5)).sum().backward()
        results.append((logps.detach(), entropy, [p.grad.clone() for p in model.parameters()]))
    (fused, fused_entropy, fused_grads), (plain, plain_entropy, plain_grads) = results
    assert fused.shape == fused_entropy.shape == (3, 5) and not fused_entropy.requires_grad
    torch.testing.assert_close(fused, plain, atol=1e-10, rtol=0)
    torch.testing.assert_close(fused_entropy, plain_entropy, atol=1e-10, rtol=0)
    for f, p in zip(fused_grads, plain_grads):
        torch.testing.assert_close(f, p, atol=1e-10, rtol=0)
    # and they are the log-probs of each response token given everything before it
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = (
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, -6:-1]
        / temperature
    )
    direct = torch.log_softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1)
    torch.testing.assert_close(fused, direct.detach(), atol=1e-10, rtol=0)
