"""GKD's generalized JSD against hand computations, and the chunked, checkpointed `distill_loss` against
the whole-vocabulary computation (values and gradients), in float64 so that no comparison depends on
the CPU's kernels (AVX2, AVX-512 or AMX reorder float32 sums differently)."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit.losses.distill import DistillTerms, distill_loss, generalized_jsd

# Student S and teacher T over a 3-token vocabulary; logits log p give back p under softmax.
S = [0.5, 0.3, 0.2]
T = [0.1, 0.6, 0.3]
LN = math.log

# Float64 comparisons of two orderings of the same arithmetic: each value is a sum of at most
# N x V = 6 x 17 terms of magnitude <= ~10, each after a dozen roundings, so the two differ by far
# less than 1000 x N x V x eps64 (2.3e-11); a wrong or missing position moves them by >= 1e-3.
N_TRAINED, B, L, H, H2, V = 6, 2, 5, 4, 3, 17
TOL64 = 1000 * N_TRAINED * V * torch.finfo(torch.float64).eps


def jsd(student: list[float], teacher: list[float], beta: float, temperature: float = 1.0) -> float:
    logits = torch.tensor([[LN(p) for p in student]], dtype=torch.float64)
    teacher_logits = torch.tensor([[LN(p) for p in teacher]], dtype=torch.float64)
    out = generalized_jsd(logits, teacher_logits, beta, temperature)
    assert out.shape == (1,) and out.dtype == torch.float64
    return out.item()


def test_beta_0_is_the_forward_kl_teacher_to_student():
    # KL(T ‖ S) = Σ T log(T / S)
    expected = 0.1 * LN(0.1 / 0.5) + 0.6 * LN(0.6 / 0.3) + 0.3 * LN(0.3 / 0.2)
    assert jsd(S, T, 0.0) == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_beta_1_is_the_reverse_kl_student_to_teacher():
    # KL(S ‖ T) = Σ S log(S / T)
    expected = 0.5 * LN(0.5 / 0.1) + 0.3 * LN(0.3 / 0.6) + 0.2 * LN(0.2 / 0.3)
    assert jsd(S, T, 1.0) == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_beta_half_is_the_jensen_shannon_divergence():
    # M = (S + T) / 2 = (0.3, 0.45, 0.25); JSD = ½ KL(T ‖ M) + ½ KL(S ‖ M)
    kl_teacher = 0.1 * LN(0.1 / 0.3) + 0.6 * LN(0.6 / 0.45) + 0.3 * LN(0.3 / 0.25)
    kl_student = 0.5 * LN(0.5 / 0.3) + 0.3 * LN(0.3 / 0.45) + 0.2 * LN(0.2 / 0.25)
    assert jsd(S, T, 0.5) == pytest.approx(0.5 * kl_teacher + 0.5 * kl_student, rel=1e-12)


def test_beta_quarter_mixes_a_quarter_of_the_teacher():
    # TRL's mixture: M = β T + (1 - β) S = 0.25 T + 0.75 S = (0.4, 0.375, 0.225)
    # JSD(β) = β KL(T ‖ M) + (1 - β) KL(S ‖ M)
    kl_teacher = 0.1 * LN(0.1 / 0.4) + 0.6 * LN(0.6 / 0.375) + 0.3 * LN(0.3 / 0.225)
    kl_student = 0.5 * LN(0.5 / 0.4) + 0.3 * LN(0.3 / 0.375) + 0.2 * LN(0.2 / 0.225)
    assert jsd(S, T, 0.25) == pytest.approx(0.25 * kl_teacher + 0.75 * kl_student, rel=1e-12)


def test_temperature_divides_the_logits():
    # logits log p at τ = 2 give p^(1/2), renormalised
    zs, zt = sum(math.sqrt(p) for p in S), sum(math.sqrt(p) for p in T)
    s = [math.sqrt(0.5) / zs, math.sqrt(0.3) / zs, math.sqrt(0.2) / zs]
    t = [math.sqrt(0.1) / zt, math.sqrt(0.6) / zt, math.sqrt(0.3) / zt]
    forward = t[0] * LN(t[0] / s[0]) + t[1] * LN(t[1] / s[1]) + t[2] * LN(t[2] / s[2])
    assert jsd(S, T, 0.0, temperature=2.0) == pytest.approx(forward, rel=1e-12)
    m = [0.5 * t[0] + 0.5 * s[0], 0.5 * t[1] + 0.5 * s[1], 0.5 * t[2] + 0.5 * s[2]]
    kl_teacher = t[0] * LN(t[0] / m[0]) + t[1] * LN(t[1] / m[1]) + t[2] * LN(t[2] / m[2])
    kl_student = s[0] * LN(s[0] / m[0]) + s[1] * LN(s[1] / m[1]) + s[2] * LN(s[2] / m[2])
    assert jsd(S, T, 0.5, temperature=2.0) == pytest.approx(0.5 * kl_teacher + 0.5 * kl_student, rel=1e-12)


def test_endpoints_are_the_kls_the_divergence_approaches():
    # JSD(β) ≈ β KL(T ‖ S) near 0 and (1 - β) KL(S ‖ T) near 1 (an O(β²) error): TRL's β = 0 and 1 are
    # those KLs unscaled, so the loss's size jumps at the endpoints.
    small = 1e-6
    assert jsd(S, T, small) / small == pytest.approx(jsd(S, T, 0.0), rel=1e-5)
    assert jsd(S, T, 1 - small) / small == pytest.approx(jsd(S, T, 1.0), rel=1e-5)


def test_leading_dimensions_are_kept_and_each_position_is_its_own():
    logits = torch.tensor([[LN(p) for p in S], [LN(p) for p in T]], dtype=torch.float64)
    out = generalized_jsd(logits.view(2, 1, 3), logits.flip(0).view(2, 1, 3), 0.0)
    assert out.shape == (2, 1)
    assert out[0, 0].item() == pytest.approx(jsd(S, T, 0.0), rel=1e-12)
    assert out[1, 0].item() == pytest.approx(jsd(T, S, 0.0), rel=1e-12)


@pytest.mark.parametrize("beta", [-0.1, 1.1, float("nan")])
def test_beta_outside_the_unit_interval_is_refused(beta):
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(logits, logits, beta)
    hidden, mask = torch.zeros(1, 2, 3), torch.ones(1, 2)
    with pytest.raises(ValueError, match="beta"):
        distill_loss(hidden, hidden, lambda h: h, lambda h: h, mask, beta)


def test_bad_temperature_chunk_shapes_and_vocabularies_are_refused():
    hidden, mask = torch.zeros(1, 2, 3), torch.ones(1, 2)
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd(hidden, hidden, 0.5, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        distill_loss(hidden, hidden, lambda h: h, lambda h: h, mask, 0.5, chunk_size=0)
    with pytest.raises(ValueError, match="mask"):
        distill_loss(hidden, hidden, lambda h: h, lambda h: h, torch.ones(1, 3), 0.5)
    with pytest.raises(ValueError, match="vocabulary"):
        distill_loss(hidden, hidden, lambda h: h, lambda h: h[:, :2], mask, 0.5)


# ---------------------------------------------------------------- the chunked path


def setup(seed: int = 0):
    """Student [B, L, H] and teacher [B, L, H2] hidden states with N_TRAINED trained positions, and
    float64 output layers (the student's with a bias, so both of its parameters get gradients)."""
    torch.manual_seed(seed)
    student_head = torch.nn.Linear(H, V, bias=True).double()
    teacher_head = torch.nn.Linear(H2, V, bias=False).double()
    student_hidden = torch.randn(B, L, H, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(B, L, H2, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 0, 1, 0, 1]])
    assert mask.sum() == N_TRAINED
    return student_hidden, teacher_hidden, student_head, teacher_head, mask


def whole_vocabulary(student_hidden, teacher_hidden, student_head, teacher_head, mask, beta, temperature):
    """Σ over trained positions of generalized_jsd on the full [B, L, V] logits."""
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    per_position = generalized_jsd(student_head(student_hidden), teacher_logits, beta, temperature)
    return per_position[mask.bool()].sum()


def grads(value, student_hidden, student_head):
    return torch.autograd.grad(value, [student_hidden, student_head.weight, student_head.bias])


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 6, 50])  # 2, 3, 6 divide the 6 positions; 1 and 50 bound them
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_chunked_equals_whole_vocabulary_values_and_gradients(beta, chunk_size):
    student_hidden, teacher_hidden, student_head, teacher_head, mask = setup()
    expected = whole_vocabulary(student_hidden, teacher_hidden, student_head, teacher_head, mask, beta, 1.5)
    expected_grads = grads(expected, student_hidden, student_head)

    terms = distill_loss(
        student_hidden, teacher_hidden, student_head, teacher_head, mask, beta, temperature=1.5, chunk_size=chunk_size
    )
    assert isinstance(terms, DistillTerms) and terms.tokens == N_TRAINED
    assert terms.divergence_sum.shape == () and expected.item() > 1e-3
    torch.testing.assert_close(terms.divergence_sum, expected, atol=TOL64, rtol=0)
    for got, want in zip(grads(terms.divergence_sum, student_hidden, student_head), expected_grads):
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, atol=TOL64, rtol=0)
    assert teacher_head.weight.grad is None  # the teacher runs without gradient

    with torch.no_grad():  # evaluation: no checkpoint, the same value
        plain = distill_loss(student_hidden, teacher_hidden, student_head, teacher_head, mask, beta, 1.5, chunk_size)
    torch.testing.assert_close(plain.divergence_sum, expected.detach(), atol=TOL64, rtol=0)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_a_teacher_identical_to_the_student_gives_zero_loss_and_zero_gradient(beta):
    student_hidden, _, student_head, _, mask = setup()
    terms = distill_loss(student_hidden, student_hidden.detach(), student_head, student_head, mask, beta, chunk_size=4)
    assert abs(terms.divergence_sum.item()) <= TOL64
    for g in grads(terms.divergence_sum, student_hidden, student_head):
        assert g.abs().max().item() <= TOL64
    assert terms.agreement_sum.item() == N_TRAINED
    torch.testing.assert_close(terms.student_entropy_sum, terms.teacher_entropy_sum, atol=1e-6, rtol=0)


def test_masked_positions_do_not_contribute():
    student_hidden, teacher_hidden, student_head, teacher_head, mask = setup()
    expected = whole_vocabulary(student_hidden, teacher_hidden, student_head, teacher_head, mask, 0.5, 1.0)
    off = ~mask.bool()
    garbage_student = student_hidden.detach().masked_fill(off[..., None], float("nan")).requires_grad_(True)
    garbage_teacher = teacher_hidden.masked_fill(off[..., None], float("nan"))
    terms = distill_loss(garbage_student, garbage_teacher, student_head, teacher_head, mask, 0.5, chunk_size=4)
    torch.testing.assert_close(terms.divergence_sum, expected.detach(), atol=TOL64, rtol=0)
    (grad_hidden,) = torch.autograd.grad(terms.divergence_sum, [garbage_student])
    assert (grad_hidden[off] == 0).all() and grad_hidden[~off].abs().max() > 1e-3


def test_no_trained_position_gives_a_zero_that_still_reaches_the_student_head():
    student_hidden, teacher_hidden, student_head, teacher_head, mask = setup()
    terms = distill_loss(student_hidden, teacher_hidden, student_head, teacher_head, torch.zeros_like(mask), 0.5)
    assert terms.tokens == 0 and terms.divergence_sum.item() == 0.0 and terms.agreement_sum.item() == 0.0
    terms.divergence_sum.backward()
    assert (student_head.weight.grad == 0).all() and (student_hidden.grad == 0).all()


def test_agreement_and_entropy_sums_on_a_hand_case():
    # Identity heads: the hidden states are the logits. At τ = 2 the logits 2 log p give back p.
    student = [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]]
    teacher = [[0.5, 0.25, 0.25], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.1, 0.1, 0.8]]
    mask = torch.tensor([[1, 1, 0, 1]])  # position 2 (which would agree) is not trained

    def logits(rows):
        return torch.tensor([[[2 * LN(p) for p in row] for row in rows]], dtype=torch.float64)

    terms = distill_loss(logits(student), logits(teacher), lambda h: h, lambda h: h, mask, 0.5, temperature=2.0)
    assert terms.tokens == 3
    assert terms.agreement_sum.item() == 2  # argmax 0 = 0, 1 ≠ 2, 2 = 2
    # H(p) = -Σ p log p, at the trained positions 0, 1, 3
    student_entropy = (
        -(0.5 * LN(0.5) + 0.25 * LN(0.25) + 0.25 * LN(0.25))
        - (0.25 * LN(0.25) + 0.5 * LN(0.5) + 0.25 * LN(0.25))
        - (0.2 * LN(0.2) + 0.2 * LN(0.2) + 0.6 * LN(0.6))
    )
    teacher_entropy = (
        -(0.5 * LN(0.5) + 0.25 * LN(0.25) + 0.25 * LN(0.25))
        - (0.2 * LN(0.2) + 0.3 * LN(0.3) + 0.5 * LN(0.5))
        - (0.1 * LN(0.1) + 0.1 * LN(0.1) + 0.8 * LN(0.8))
    )
    for value in (terms.agreement_sum, terms.student_entropy_sum, terms.teacher_entropy_sum):
        assert value.dtype == torch.float32 and not value.requires_grad
    assert terms.student_entropy_sum.item() == pytest.approx(student_entropy, rel=1e-6)
    assert terms.teacher_entropy_sum.item() == pytest.approx(teacher_entropy, rel=1e-6)


def test_logits_exist_a_chunk_at_a_time_and_are_recomputed_in_the_backward():
    student_hidden, teacher_hidden, student_head, teacher_head, mask = setup()
    calls: dict[str, list[tuple[int, ...]]] = {"student": [], "teacher": []}

    def recording(name, head):
        def call(h):
            calls[name].append(tuple(h.shape))
            return head(h)

        return call

    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        terms = distill_loss(
            student_hidden,
            teacher_hidden,
            recording("student", student_head),
            recording("teacher", teacher_head),
            mask,
            0.5,
            chunk_size=4,
        )
    # what the graph keeps outside the checkpoints: the mask's bookkeeping [B, L] and each chunk's
    # hidden states (the checkpoints' inputs, at most [4, H]), nothing vocabulary-sized ([1, V] or more)
    assert saved and max(saved) <= max(B * L, 4 * H, 4 * H2) < V
    assert calls["student"] == [(4, H), (2, H)] and calls["teacher"] == [(4, H2), (2, H2)]
    terms.divergence_sum.backward()
    # the backward rebuilt each chunk's logits (the teacher's with them), again a chunk at a time
    assert sorted(calls["student"]) == [(2, H), (2, H), (4, H), (4, H)]
    assert sorted(calls["teacher"]) == [(2, H2), (2, H2), (4, H2), (4, H2)]


@pytest.mark.parametrize("frozen_head", [False, True])  # the checkpointed and the fused path
def test_bf16_hidden_states_get_fp32_softmax_math(frozen_head):
    # Small integers: every logit (|z| <= 16) and partial sum is exact in bf16, whatever the kernel,
    # so the only error left is the fp32 softmax math: a few eps32 per term, N x V terms of size
    # <= ~5, well under 1e-4; the same math in bf16 would be off by ~1e-2.
    torch.manual_seed(0)
    weight = torch.randint(-1, 2, (16, 8)).double()
    student_hidden = torch.randint(-2, 3, (2, 5, 8)).double()
    teacher_hidden = torch.randint(-2, 3, (2, 5, 8)).double()
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 0, 1, 0, 1]])
    head64 = torch.nn.Linear(8, 16, bias=False).double()
    teacher64 = torch.nn.Linear(8, 16, bias=False).double()
    with torch.no_grad():
        head64.weight.copy_(weight)
        teacher64.weight.copy_(weight.flip(0))
    hidden64 = student_hidden.clone().requires_grad_(True)
    expected = whole_vocabulary(hidden64, teacher_hidden, head64, teacher64, mask, 0.5, 1.0)
    (expected_grad,) = torch.autograd.grad(expected, [hidden64])

    head16, teacher16 = head64.to(torch.bfloat16).requires_grad_(not frozen_head), teacher64.to(torch.bfloat16)
    hidden16 = student_hidden.to(torch.bfloat16).requires_grad_(True)
    terms = distill_loss(hidden16, teacher_hidden.to(torch.bfloat16), head16, teacher16, mask, 0.5, chunk_size=4)
    assert terms.divergence_sum.dtype == torch.float32
    assert abs(terms.divergence_sum.item() - expected.item()) < 1e-4
    (grad,) = torch.autograd.grad(terms.divergence_sum, [hidden16])
    assert grad.dtype == torch.bfloat16
    # the gradient is rounded to bf16 on its way back through the bf16 head: 2^-8 relative, and
    # a sum of 16 such products
    torch.testing.assert_close(grad.double(), expected_grad, atol=2**-4 * expected_grad.abs().max().item(), rtol=0)


# ---------------------------------------------------------------- the fused path (a frozen Linear head)


def frozen(head: torch.nn.Linear) -> torch.nn.Linear:
    return head.requires_grad_(False)


@pytest.mark.parametrize("chunk_size", [1, 4, 6, 50])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_frozen_head_fused_gradient_equals_whole_vocabulary(beta, chunk_size):
    # A frozen plain Linear (LoRA's untouched output layer) takes the analytic gradient: the same
    # value, the same gradient to the hidden states as autograd through the whole-vocabulary path.
    student_hidden, teacher_hidden, student_head, teacher_head, mask = setup()
    student_head = frozen(student_head)
    expected = whole_vocabulary(student_hidden, teacher_hidden, student_head, teacher_head, mask, beta, 1.5)
    (expected_grad,) = torch.autograd.grad(expected, [student_hidden])
    terms = distill_loss(student_hidden, teacher_hidden, student_head, teacher_head, mask, beta, 1.5, chunk_size)
    assert terms.tokens == N_TRAINED and terms.divergence_sum.dtype == torch.float64
    torch.testing.assert_close(terms.divergence_sum, expected, atol=TOL64, rtol=0)
    (grad,) = torch.autograd.grad(terms.divergence_sum * 3.0, [student_hidden])  # the incoming gradient scales it
    assert expected_grad.abs().max() > 1e-3
    torch.testing.assert_close(grad, 3.0 * expected_grad, atol=3 * TOL64, rtol=0)
    with torch.no_grad():  # evaluation: the same value and metrics, no gradient computed
        plain = distill_loss(student_hidden, teacher_hidden, student_head, teacher_head, mask, beta, 1.5, chunk_size)
    torch.testing.assert_close(plain.divergence_sum, expected.detach(), atol=TOL64, rtol=0)


def test_frozen_head_fused_metrics_equal_the_checkpointed_path():
    student_hidden, teacher_hidden, student_head, teacher_head, mask = setup()
    reference = distill_loss(student_hidden, teacher_hidden, student_head, teacher_head, mask, 0.5, 1.5, 4)
    fused = distill_loss(student_hidden, teacher_hidden, frozen(student_head), teacher_head, mask, 0.5, 1.5, 4)
    assert fused.agreement_sum.item() == reference.agreement_sum.item()
    for got, want in ((fused.student_entropy_sum, reference.student_entropy_sum), (fused.teacher_entropy_sum, reference.teacher_entropy_sum)):  # fmt: skip
        assert got.dtype == torch.float32 and not got.requires_grad
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_frozen_head_fused_keeps_nothing_vocabulary_sized_and_recomputes_nothing():
    student_hidden, teacher_hidden, student_head, teacher_head, mask = setup()
    student_head = frozen(student_head)
    calls = {"teacher": 0}

    def teacher(h):
        calls["teacher"] += 1
        return teacher_head(h)

    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        terms = distill_loss(student_hidden, teacher_hidden, student_head, teacher, mask, 0.5, chunk_size=4)
    assert set(saved) == {B * L, N_TRAINED * H}  # the mask's bookkeeping and the [N, H] gradient, nothing [.., V]
    assert calls["teacher"] == 2
    terms.divergence_sum.backward()
    assert calls["teacher"] == 2  # the backward rebuilt no logits
    assert student_hidden.grad is not None and student_hidden.grad.abs().max() > 1e-3
