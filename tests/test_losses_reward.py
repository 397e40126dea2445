"""Bradley–Terry reward-model loss, checked against hand-computed values."""

import math

import pytest
import torch

from rlkit.losses.reward import bradley_terry_loss


def softplus(x: float) -> float:
    """-logσ(-x) = log(1 + e^x), written out by hand."""
    return math.log1p(math.exp(x))


def test_per_pair_losses_shape_and_values():
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([1.0, 1.0])
    losses = bradley_terry_loss(chosen, rejected)
    assert losses.shape == (2,)
    # -logσ(1) = log(1 + e^-1); -logσ(-1) = log(1 + e)
    expected = [math.log(1 + math.exp(-1.0)), math.log(1 + math.e)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_margin_is_subtracted_from_reward_difference():
    losses = bradley_terry_loss(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0]), margin=torch.tensor([0.5, 3.0]))
    # r_c - r_r - m = 0.5 and -2.0
    assert losses.tolist() == pytest.approx([softplus(-0.5), softplus(2.0)], abs=1e-6)
    scalar = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=0.5)
    assert scalar.item() == pytest.approx(softplus(-0.5), abs=1e-6)


def test_centering_term_matches_trl_definition():
    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([1.0, -3.0])
    losses = bradley_terry_loss(chosen, rejected, center_coef=0.01)
    # pair 0: diff 1, sum 3 -> softplus(-1) + 0.01*9 ; pair 1: diff 2, sum -4 -> softplus(-2) + 0.01*16
    expected = [softplus(-1.0) + 0.09, softplus(-2.0) + 0.16]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    # batch mean == mean(BT) + coef * mean((r_c + r_r)^2), as TRL's center_rewards_coefficient
    trl_style = (softplus(-1.0) + softplus(-2.0)) / 2 + 0.01 * (9 + 16) / 2
    assert losses.mean().item() == pytest.approx(trl_style, abs=1e-6)


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).sum().backward()
    # d/dr_c of -logσ(r_c - r_r) at 0 = -σ(0) = -0.5
    assert chosen.grad.item() == pytest.approx(-0.5)
    assert rejected.grad.item() == pytest.approx(0.5)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shapes differ"):
        bradley_terry_loss(torch.zeros(4, 1), torch.zeros(4))
