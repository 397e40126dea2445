"""GRPO-family advantages and losses, checked against hand-computed values."""

import math

import pytest
import torch

from rlkit.losses.group_advantages import (
    STD_EPS,
    combine_rewards,
    group_advantages,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_variance_groups,
)
from rlkit.losses.grpo import aggregate, grpo_loss, importance_log_ratio, loss_mask


def approx(values, abs=1e-5):
    return pytest.approx(values, abs=abs)


# two prompts, G = 3: group 0 has rewards 1, 2, 3 (mean 2, unbiased std 1); group 1: 0, 0, 6 (mean 2, std sqrt(12))
REWARDS = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])


def test_group_advantages_scaled_by_the_group_std():
    s1 = math.sqrt(12)
    assert group_advantages(REWARDS, 3, "group").tolist() == approx(
        [-1 / (1 + STD_EPS), 0.0, 1 / (1 + STD_EPS), -2 / (s1 + STD_EPS), -2 / (s1 + STD_EPS), 4 / (s1 + STD_EPS)]
    )


def test_group_advantages_scaled_by_the_batch_std_and_not_at_all():
    # batch: mean 2, squares 1+0+1+4+4+16 = 26, unbiased var 26/5
    sb = math.sqrt(26 / 5)
    assert group_advantages(REWARDS, 3, "batch").tolist() == approx([v / (sb + STD_EPS) for v in (-1, 0, 1, -2, -2, 4)])
    assert group_advantages(REWARDS, 3, "none").tolist() == approx([-1, 0, 1, -2, -2, 4])  # Dr. GRPO


def test_group_advantages_leave_unscorable_completions_out():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 5.0, 5.0, 5.0])
    # group 0: scorable 1 and 3 (mean 2, std sqrt(2)); the NaN one gets 0; group 1 is flat: all 0
    s = math.sqrt(2)
    assert group_advantages(rewards, 3, "group").tolist() == approx([-1 / (s + STD_EPS), 0, 1 / (s + STD_EPS), 0, 0, 0])
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), 3)


def test_rloo_leave_one_out_baseline():
    # group 0: 1 - (2+3)/2 = -1.5, 2 - 2 = 0, 3 - 1.5 = 1.5; group 1: 0 - 3 = -3, -3, 6 - 0 = 6
    assert rloo_advantages(REWARDS, 3).tolist() == approx([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0])
    # = G/(G-1) x the group-mean advantage
    assert rloo_advantages(REWARDS, 3).tolist() == approx((1.5 * group_advantages(REWARDS, 3, "none")).tolist())
    # batch: mean 0, squares 2.25 + 2.25 + 9 + 9 + 36 = 58.5, unbiased std sqrt(58.5 / 5)
    sb = math.sqrt(58.5 / 5)
    assert rloo_advantages(REWARDS, 3, "batch").tolist() == approx(
        [v / (sb + STD_EPS) for v in (-1.5, 0, 1.5, -3, -3, 6)]
    )
    # an unscorable sibling is left out of the baseline; a lone scorable completion gets 0
    rewards = torch.tensor([1.0, float("nan"), 3.0, float("nan"), 7.0, float("nan")])
    assert rloo_advantages(rewards, 3).tolist() == approx([-2.0, 0.0, 2.0, 0.0, 0.0, 0.0])


def test_reinforce_pp_batch_normalised_returns():
    scores = torch.tensor([1.0, 3.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # no KL: the return of every token is its sequence's score: tokens 1, 1, 3 -> mean 5/3, unbiased var 4/3
    mean, std = 5 / 3, math.sqrt(4 / 3)
    adv = reinforce_pp_advantages(scores, mask)
    assert adv.tolist() == [approx([(1 - mean) / std, (1 - mean) / std, 0.0]), approx([(3 - mean) / std, 0.0, 0.0])]


def test_reinforce_pp_with_the_kl_in_the_reward():
    scores = torch.tensor([1.0, 3.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kl = torch.tensor([[0.5, 1.0, 99.0], [2.0, 99.0, 99.0]])
    # beta 0.1: rewards row 0 = [-0.05, -0.1 + 1], row 1 = [-0.2 + 3]; returns = [0.85, 0.9], [2.8]
    returns = [0.85, 0.9, 2.8]
    mean = sum(returns) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / 2)
    adv = reinforce_pp_advantages(scores, mask, kl, kl_coef=0.1)
    assert adv[0, :2].tolist() == approx([(0.85 - mean) / std, (0.9 - mean) / std])
    assert adv[1, 0].item() == approx((2.8 - mean) / std)
    assert adv[0, 2].item() == 0.0 and adv[1, 1:].tolist() == [0.0, 0.0]


def test_zero_variance_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, float("nan"), float("nan")])
    assert zero_variance_groups(rewards, 3).tolist() == [True] * 3 + [False] * 3 + [True] * 3


def test_combine_rewards_weights_and_none():
    per_function = torch.tensor([[1.0, 0.5], [float("nan"), 1.0], [float("nan"), float("nan")]])
    combined = combine_rewards(per_function, torch.tensor([2.0, -1.0]))
    assert combined[:2].tolist() == approx([1.5, -1.0])
    assert math.isnan(combined[2].item())


def test_overlong_penalty():
    # L_max 10, L_cache 4: no penalty up to 6 tokens, then -(len - 6) / 4 down to -1
    lengths = torch.tensor([3, 6, 7, 8, 10, 12])
    assert overlong_penalty(lengths, 10, 4).tolist() == approx([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    assert overlong_penalty(lengths, 10, 0).tolist() == [0.0] * 6


MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_aggregations():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 99.0]])
    # grpo: mean over sequences of each sequence's token mean: (2 + 4) / 2
    total, units = aggregate(per_token, MASK, "grpo", 8)
    assert (total / units).item() == approx(3.0)
    # bnpo / dapo: over all 4 tokens: 10 / 4
    for kind in ("bnpo", "dapo"):
        total, units = aggregate(per_token, MASK, kind, 8)
        assert (total.item(), units.item()) == (10.0, 4.0)
    # dr_grpo: 10 / (2 sequences x 8 max new tokens)
    total, units = aggregate(per_token, MASK, "dr_grpo", 8)
    assert (total.item(), units.item()) == (10.0, 16.0)
    with pytest.raises(ValueError):
        aggregate(per_token, MASK, "mean", 8)


def test_ratio_one_means_minus_the_mean_advantage_and_nothing_clipped():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.1], [0.2, 0.3, 0.3]]))
    out = grpo_loss(logp, logp.clone(), torch.tensor([1.0, -2.0]), MASK, loss_type="dapo")
    # dapo: -(1 + 1 + 1 - 2) / 4 tokens
    assert (out.loss / out.units).item() == approx(-0.25)
    for key in ("clip_low", "clip_high", "clip_region"):
        assert out.metrics[key][0].item() == 0.0 and out.metrics[key][1].item() == 4.0
    assert out.metrics["ratio"][0].item() / out.metrics["ratio"][1].item() == approx(1.0)


def test_token_clipping_and_clip_higher():
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3, dtype=torch.long)
    # ratios 1.5, 0.5, 1.25
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.25]]))
    # positive advantage: 1.5 and 1.25 clipped to 1.2; 0.5 not clipped (min keeps the smaller term)
    out = grpo_loss(logp, old, torch.tensor([1.0]), mask, epsilon=0.2, loss_type="bnpo")
    assert (out.loss / out.units).item() == approx(-(1.2 + 0.5 + 1.2) / 3)
    assert out.metrics["clip_high"][0].item() == 2.0 and out.metrics["clip_low"][0].item() == 0.0
    # clip-higher (DAPO): eps_high 0.28 lets 1.25 through, 1.5 stops at 1.28
    out = grpo_loss(logp, old, torch.tensor([1.0]), mask, epsilon=0.2, epsilon_high=0.28, loss_type="bnpo")
    assert (out.loss / out.units).item() == approx(-(1.28 + 0.5 + 1.25) / 3)
    assert out.metrics["clip_high"][0].item() == 1.0
    # negative advantage: 0.5 is clipped at 0.8 (the low side); max(-A ρ) keeps 1.5 and 1.25 unclipped
    out = grpo_loss(logp, old, torch.tensor([-1.0]), mask, epsilon=0.2, epsilon_high=0.28, loss_type="bnpo")
    assert (out.loss / out.units).item() == approx((1.5 + 0.8 + 1.25) / 3)
    assert out.metrics["clip_low"][0].item() == 1.0 and out.metrics["clip_high"][0].item() == 0.0


def test_gradient_of_the_clipped_terms_is_zero():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 1.0]])).requires_grad_(True)
    out = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), loss_type="dapo")
    (out.loss / out.units).backward()
    # d/dlogp of -ρA/2 = -ρA/2: 0 for the clipped token, -0.5 for the other
    assert logp.grad.tolist() == [approx([0.0, -0.5])]


def test_sequence_level_ratio_gspo():
    old = torch.zeros(2, 2)
    logp = torch.tensor([[math.log(2.0), 0.0], [math.log(0.9), 99.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # s_0 = exp((log 2 + 0) / 2) = sqrt 2; s_1 = 0.9
    log_s = importance_log_ratio(logp, old, mask, "sequence")
    assert log_s.squeeze(1).exp().tolist() == approx([math.sqrt(2), 0.9])
    out = grpo_loss(logp, old, torch.tensor([1.0, 1.0]), mask, importance_sampling="sequence", loss_type="grpo")
    # sequence 0 clipped at 1.2, sequence 1 at 0.9: loss -(1.2 + 0.9) / 2; one clip among 2 sequences
    assert (out.loss / out.units).item() == approx(-(1.2 + 0.9) / 2)
    assert (out.metrics["clip_high"][0].item(), out.metrics["clip_high"][1].item()) == (1.0, 2.0)


def test_k3_kl_term():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    mask = torch.ones(1, 2)
    out = grpo_loss(logp, logp.clone(), torch.tensor([0.0]), mask, loss_type="bnpo", ref_logprobs=ref, beta=0.1)
    # k3 per token: r - 1 - log r, r = ref / π = 0.5 and 2
    k3 = [0.5 - 1 - math.log(0.5), 2 - 1 - math.log(2)]
    assert (out.loss / out.units).item() == approx(0.1 * sum(k3) / 2)
    assert out.metrics["kl"][0].item() / out.metrics["kl"][1].item() == approx(sum(k3) / 2)


def test_loss_mask_truncated_and_zero_variance():
    mask = torch.ones(3, 2, dtype=torch.long)
    truncated = torch.tensor([False, True, False])
    flat = torch.tensor([False, False, True])
    assert loss_mask(mask, truncated, flat).tolist() == mask.tolist()
    assert loss_mask(mask, truncated, flat, mask_truncated=True).tolist() == [[1, 1], [0, 0], [1, 1]]
    assert loss_mask(mask, truncated, flat, True, True).tolist() == [[1, 1], [0, 0], [0, 0]]
    # under grpo a masked-out row still counts as a sequence: (mean 1 over row 0) / 3 rows
    per_token = torch.ones(3, 2)
    total, units = aggregate(per_token, loss_mask(mask, truncated, flat, True, True), "grpo", 2)
    assert (total.item(), units.item()) == (1.0, 3.0)
