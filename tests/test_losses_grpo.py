"""GRPO-family advantages and losses, checked against hand-computed values."""

import dataclasses
import math

import pytest
import torch

from rlkit.losses.group_advantages import (
    REWARD_AGGREGATIONS,
    STD_EPS,
    combine_rewards,
    group_advantages,
    normalize_then_sum,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_variance_groups,
)
from rlkit.losses.grpo import (
    POLICY_LOSSES,
    TOKEN_MEAN,
    PolicyLoss,
    aggregate,
    grpo_loss,
    importance_log_ratio,
    loss_mask,
)


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


# ---- the loss-type records and the variants beyond the clipped objective ------------------------


def test_every_loss_type_is_a_record_and_the_options_come_from_them():
    from rlkit.recipes.grpo_config import LOSS_TYPES, REWARD_AGGREGATION_NAMES, GRPOConfig

    assert LOSS_TYPES == tuple(POLICY_LOSSES) == ("grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "luspo")
    assert REWARD_AGGREGATION_NAMES == ("sum_then_normalize", "normalize_then_sum")
    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    for record in POLICY_LOSSES.values():
        assert f"{record.name} ({record.help})" in fields["loss_type"].metadata["help"]
        assert all(name in fields for name in record.options)  # every option a record reads is declared
    assert fields["multi_objective_aggregation"].default == "sum_then_normalize"
    # TRL's defaults for SAPO's temperatures
    assert (fields["sapo_temperature_pos"].default, fields["sapo_temperature_neg"].default) == (1.0, 1.05)


def test_a_record_cannot_drift_from_its_surrogate():
    def wrong(ratio, advantages, logprobs, *, tau):
        raise AssertionError

    with pytest.raises(TypeError):
        PolicyLoss("x", wrong, TOKEN_MEAN, "help", {"temperature": "sapo_temperature_pos"})
    assert POLICY_LOSSES["cispo"].problem({"epsilon_high": None}) is not None
    assert POLICY_LOSSES["cispo"].problem({"epsilon_high": 5.0}) is None


def test_cispo_clips_the_detached_weight_and_keeps_every_gradient():
    # ratios π/π_old: 0.4/0.2 = 2, 0.1/0.2 = 0.5, 0.8/0.1 = 8; ε_max 5: weights 2, 0.5, 5 (8 clipped), A = 1
    old = torch.log(torch.tensor([[0.2, 0.2, 0.1]]))
    logp = torch.log(torch.tensor([[0.4, 0.1, 0.8]])).requires_grad_(True)
    out = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 3), epsilon_high=5.0, loss_type="cispo")
    # ℓ_t = -w_t A log π_t, mean over the 3 tokens (cispo aggregates as dapo)
    expected = -(2 * math.log(0.4) + 0.5 * math.log(0.1) + 5 * math.log(0.8)) / 3
    assert out.units.item() == 3.0 and (out.loss / out.units).item() == approx(expected)
    (out.loss / out.units).backward()
    # d/dlog π_t = -w_t A / 3: the weight is a constant (no -ρ A log π / 3 term from it), and the clipped
    # token still has a gradient (PPO's clip would give it 0)
    assert logp.grad.tolist() == [approx([-2 / 3, -0.5 / 3, -5 / 3])]
    assert out.metrics["clip_high"][0].item() == 1.0 and out.metrics["clip_low"][0].item() == 0.0
    # a negative advantage: the same weights, the sign flipped, nothing counted as clipped
    out = grpo_loss(logp.detach(), old, torch.tensor([-1.0]), torch.ones(1, 3), epsilon_high=5.0, loss_type="cispo")
    assert (out.loss / out.units).item() == approx(-expected)
    assert out.metrics["clip_region"][0].item() == 0.0
    with pytest.raises(ValueError):  # ε_max has no default: TRL would fall back to ε = 0.2
        grpo_loss(logp.detach(), old, torch.tensor([1.0]), torch.ones(1, 3), loss_type="cispo")


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_sapo_soft_gate_by_the_sign_of_the_advantage():
    # sequence 0: ratios 1, 1.5 with A = +1 (τ_pos 1); sequence 1: ratios 1, 0.5 with A = -1 (τ_neg 1.05)
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.0, 1.5], [1.0, 0.5]]))
    out = grpo_loss(
        logp,
        old,
        torch.tensor([1.0, -1.0]),
        torch.ones(2, 2),
        loss_type="sapo",
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
    )
    # f(ρ) = 4/τ σ(τ(ρ - 1)), ℓ = -f A: sequence 0: -(4σ(0) + 4σ(0.5)) / 2 tokens;
    # sequence 1: +(4/1.05 σ(0) + 4/1.05 σ(-0.525)) / 2; sapo aggregates as grpo: mean of the two
    seq0 = -(4 * 0.5 + 4 * _sigmoid(0.5)) / 2
    seq1 = (4 / 1.05 * 0.5 + 4 / 1.05 * _sigmoid(-1.05 * 0.5)) / 2
    assert out.units.item() == 2.0 and (out.loss / out.units).item() == approx((seq0 + seq1) / 2)
    assert out.metrics["clip_region"][0].item() == 0.0  # a soft gate clips nothing


def test_sapo_on_policy_gradient_is_the_clipped_objectives():
    # at ρ = 1, ∂f/∂ρ = 4σ(0)(1 - σ(0)) = 1 for every τ: the gradient is -A per token, as PPO's
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.2, 0.3]])).requires_grad_(True)
    adv, mask = torch.tensor([1.0, -2.0]), torch.ones(2, 2)
    options = dict(sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    out = grpo_loss(logp, logp.detach(), adv, mask, loss_type="sapo", **options)
    (out.loss / out.units).backward()
    # grpo aggregation: each token weighs 1 / (2 tokens x 2 sequences)
    assert logp.grad.tolist() == [approx([-0.25, -0.25]), approx([0.5, 0.5])]
    clipped = logp.detach().requires_grad_(True)
    out = grpo_loss(clipped, clipped.detach(), adv, mask, loss_type="grpo")
    (out.loss / out.units).backward()
    assert clipped.grad.tolist() == [approx(row) for row in logp.grad.tolist()]


def test_luspo_weights_gspos_sequence_term_by_its_length():
    # as test_sequence_level_ratio_gspo: s_0 = sqrt 2 clipped at 1.2 (2 tokens), s_1 = 0.9 (1 token), A = 1
    old = torch.zeros(2, 2)
    logp = torch.tensor([[math.log(2.0), 0.0], [math.log(0.9), 99.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    out = grpo_loss(logp, old, torch.tensor([1.0, 1.0]), mask, importance_sampling="sequence", loss_type="luspo")
    # 1/|B| Σ_i |y_i| ℓ_i = (2 x -1.2 + 1 x -0.9) / 2 (GSPO, grpo: (-1.2 - 0.9) / 2)
    assert out.units.item() == 2.0 and (out.loss / out.units).item() == approx(-(2 * 1.2 + 0.9) / 2)
    assert (out.metrics["clip_high"][0].item(), out.metrics["clip_high"][1].item()) == (1.0, 2.0)


def test_normalize_then_sum_standardises_each_reward_in_its_group():
    nan = float("nan")
    # G = 3, weights (1, 2)
    per_function = torch.tensor(
        [
            [1.0, 0.0],  # group 0: a = 1, 0, 0 and b = 0, 1, 0: mean 1/3, unbiased std 1/sqrt 3 each
            [0.0, 1.0],
            [0.0, 0.0],
            [1.0, 2.0],  # group 1: a = 1, -, 0 (mean 0.5, std sqrt 0.5); b = 2, 2, - (no spread: 0)
            [nan, 2.0],
            [0.0, nan],
            [nan, nan],  # group 2: unscorable; a = -, 3, 5 (mean 4, std sqrt 2); b never scored
            [3.0, nan],
            [5.0, nan],
        ]
    )
    combined = normalize_then_sum(per_function, torch.tensor([1.0, 2.0]), 3)
    s, h, t = 1 / math.sqrt(3) + STD_EPS, math.sqrt(0.5) + STD_EPS, math.sqrt(2) + STD_EPS
    # group 0: (2/3 - 2 x 1/3) / s = 0, (-1/3 + 2 x 2/3) / s = 1/s, (-1/3 - 2 x 1/3) / s = -1/s
    # group 1: 0.5/h + 2 x 0, 2 x 0, -0.5/h; group 2: NaN, -1/t, 1/t
    expected = [0.0, 1 / s, -1 / s, 0.5 / h, 0.0, -0.5 / h, None, -1 / t, 1 / t]
    got = combined.tolist()
    assert math.isnan(got[6])
    assert [v for i, v in enumerate(got) if i != 6] == approx([v for v in expected if v is not None])
    # the weighted sum first would give group 0 rewards 1, 2, 0: (1, 0) and (0, 1) apart only by the weights
    assert REWARD_AGGREGATIONS["sum_then_normalize"].combine(
        per_function[:3], torch.tensor([1.0, 2.0]), 3
    ).tolist() == [
        1.0,
        2.0,
        0.0,
    ]
    # GDPO then normalises the sum over the batch: --scale-rewards auto means batch with it
    assert REWARD_AGGREGATIONS["normalize_then_sum"].scale == "batch"
    assert REWARD_AGGREGATIONS["sum_then_normalize"].scale is None
