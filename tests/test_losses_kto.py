"""KTO loss, KL reference point and the weight hint (mismatched pairs: tests/test_kto.py)."""

import math

import pytest
import torch

from rlkit.losses.kto import apo_zero_unpaired_loss, desirable_weight_hint, kl_reference_point, kto_loss


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def batch():
    # r = policy - reference = 1 for both examples
    return torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -2.0]), torch.tensor([True, False])


def test_both_branches():
    policy, ref, desirable = batch()
    losses, rewards = kto_loss(policy, ref, desirable, torch.tensor(0.5), beta=2.0)
    # desirable: 1 - σ(2(1 - 0.5)) = 1 - σ(1); undesirable: 1 - σ(2(0.5 - 1)) = 1 - σ(-1)
    assert losses.tolist() == pytest.approx([1 - sig(1.0), 1 - sig(-1.0)], abs=1e-6)
    assert rewards.tolist() == pytest.approx([2.0, 2.0])
    assert not rewards.requires_grad


def test_weights():
    policy, ref, desirable = batch()
    losses, _ = kto_loss(
        policy, ref, desirable, torch.tensor(0.5), beta=2.0, desirable_weight=1.5, undesirable_weight=0.5
    )
    assert losses.tolist() == pytest.approx([1.5 * (1 - sig(1.0)), 0.5 * (1 - sig(-1.0))], abs=1e-6)


def test_negative_kl_is_clamped_to_zero():
    policy, ref, desirable = batch()
    losses, _ = kto_loss(policy, ref, desirable, torch.tensor(-3.0), beta=2.0)
    # z0 = 0: desirable 1 - σ(2), undesirable 1 - σ(-2)
    assert losses.tolist() == pytest.approx([1 - sig(2.0), 1 - sig(-2.0)], abs=1e-6)


def test_kl_gets_no_gradient_but_policy_does():
    policy, ref, desirable = batch()
    policy.requires_grad_(True)
    kl = torch.tensor(0.5, requires_grad=True)
    losses, _ = kto_loss(policy, ref, desirable, kl, beta=2.0)
    losses.sum().backward()
    assert kl.grad is None
    # desirable: d/dπ [1 - σ(β(r - z))] = -β σ(1)(1 - σ(1))
    # undesirable: d/dπ [1 - σ(β(z - r))] = +β σ(-1)(1 - σ(-1)), the same magnitude
    s = sig(1.0) * (1 - sig(1.0))
    assert policy.grad.tolist() == pytest.approx([-2.0 * s, 2.0 * s], abs=1e-6)


def test_kl_reference_point():
    got = kl_reference_point(torch.tensor([-1.0, -1.0]), torch.tensor([-3.0, -2.0]))
    assert got.item() == pytest.approx(1.5)  # mean(2, 1)
    neg_policy = torch.tensor([-3.0, -4.0], requires_grad=True)
    neg = kl_reference_point(neg_policy, torch.tensor([-2.0, -2.0]))
    assert neg.item() == 0.0  # mean(-1, -2) = -1.5, clamped
    assert not neg.requires_grad
    assert kl_reference_point(neg_policy, torch.tensor([-2.0, -2.0]), clamp=False).item() == pytest.approx(-1.5)


def test_weight_hint():
    assert desirable_weight_hint(100, 100, 1.0, 1.0) is None  # ratio 1
    assert desirable_weight_hint(100, 100, 1.2, 1.0) is None  # ratio 1.2
    assert desirable_weight_hint(0, 100, 1.0, 1.0) is None  # nothing to balance
    # ratio 1.4 > 4/3 -> λ_D = 4/3
    assert desirable_weight_hint(100, 100, 1.4, 1.0) == pytest.approx((4 / 3, 1.0))
    # 50 desirable vs 100 undesirable: ratio 0.5 -> λ_D = 1 * 100 / 50 = 2
    assert desirable_weight_hint(50, 100, 1.0, 1.0) == pytest.approx((2.0, 1.0))
    # 300 vs 100, λ_U = 0.5: ratio 6 -> λ_D = (4/3) * 50 / 300 = 2/9
    lam_d, lam_u = desirable_weight_hint(300, 100, 1.0, 0.5)
    assert (lam_d, lam_u) == pytest.approx((2 / 9, 0.5))
    assert 1.0 <= lam_d * 300 / (lam_u * 100) <= 4 / 3 + 1e-9
    with pytest.raises(ValueError):
        desirable_weight_hint(10, 10, 0.0, 1.0)


def test_apo_zero_unpaired_anchors_rewards_at_zero():
    policy, ref, desirable = batch()
    losses, rewards = apo_zero_unpaired_loss(policy, ref, desirable, beta=2.0, desirable_weight=1.5)
    # r = 1, βr = 2: desirable 1.5 (1 - σ(2)); undesirable σ(2)
    assert losses.tolist() == pytest.approx([1.5 * (1 - sig(2.0)), sig(2.0)], abs=1e-6)
    assert rewards.tolist() == pytest.approx([2.0, 2.0]) and not rewards.requires_grad
