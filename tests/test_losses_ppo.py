"""PPO building blocks, checked against hand-computed values."""

import math

import pytest
import torch

from rlkit.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    standardise_scores,
)


def approx(values, abs=1e-5):
    return pytest.approx(values, abs=abs)


def test_kl_estimators():
    logp, ref = torch.tensor([[math.log(0.5), math.log(0.25)]]), torch.tensor([[math.log(0.25), math.log(0.5)]])
    assert kl_penalty(logp, ref, "k1").tolist() == [approx([math.log(2), -math.log(2)])]
    # k3 = (r - 1) - log r with r = π_ref/π: r = 0.5 -> -0.5 + log 2 ; r = 2 -> 1 - log 2
    assert kl_penalty(logp, ref, "k3").tolist() == [approx([-0.5 + math.log(2), 1 - math.log(2)])]
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k2")


def test_per_token_rewards_score_at_last_real_token():
    scores = torch.tensor([1.0, 2.0, 3.0])
    kl = torch.tensor([[1.0, 1.0, 1.0, 100.0], [1.0, 100.0, 100.0, 100.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    rewards, non_score = per_token_rewards(scores, kl, mask, kl_coef=0.1)
    assert rewards.tolist() == [
        approx([-0.1, -0.1, -0.1 + 1.0, 0.0]),
        approx([-0.1 + 2.0, 0.0, 0.0, 0.0]),
        approx([0.0, 0.0, 0.0, 0.0]),  # empty row: no crash, no score
    ]
    assert non_score.tolist() == approx([-0.3, -0.1, 0.0])


def test_gae_with_a_row_that_ends_early():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 50.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma, lam)

    # row 0 (full length): V after the last token is 0
    a2 = 1.0 - 0.7
    a1 = (0.0 + 0.9 * 0.7 - 0.6) + 0.72 * a2
    a0 = (0.0 + 0.9 * 0.6 - 0.5) + 0.72 * a1
    # row 1 ends at t=1: its t=2 reward/value (99, 50) must be ignored, next V = 0
    b1 = 2.0 - 0.5
    b0 = (0.0 + 0.9 * 0.5 - 1.0) + 0.72 * b1
    assert adv.tolist() == [approx([a0, a1, a2]), approx([b0, b1, 0.0])]
    assert ret.tolist() == [approx([a0 + 0.5, a1 + 0.6, a2 + 0.7]), approx([b0 + 1.0, b1 + 0.5, 0.0])]
    assert [a0, a1, a2] == approx([0.21712, 0.246, 0.3])
    assert [b0, b1] == approx([0.53, 1.5])


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    adv, _ = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert adv.tolist() == [approx([6 - 0.5, 5 - 0.5, 3 - 0.5])]


def test_masked_stats_and_whitening():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # masked entries 1..5: mean 3, squared deviations 4+1+0+1+4 = 10
    assert masked_mean(x, mask).item() == pytest.approx(3.0)
    assert masked_var(x, mask).item() == pytest.approx(10 / 4)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(10 / 5)
    w = masked_whiten(x, mask)
    s = math.sqrt(2.5)
    assert w.tolist() == [approx([-2 / s, -1 / s, 0.0, 0.0]), approx([1 / s, 2 / s, 0.0, 0.0])]
    real = w[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-5)
    w_keep = masked_whiten(x, mask, shift_mean=False)
    assert w_keep[0, :3].tolist() == approx([-2 / s + 3, -1 / s + 3, 3.0])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # empty mask: no nan


def test_policy_loss_ratio_one():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    adv = torch.tensor([[1.0, -2.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, clipfrac, approx_kl = clipped_policy_loss(logp, logp.clone(), adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(-(1.0 - 2.0) / 2)
    assert clipfrac.item() == 0.0
    assert approx_kl.item() == 0.0


def test_policy_loss_with_active_clipping():
    old = torch.zeros(1, 4)
    logp = torch.tensor([[0.5, -0.5, 0.1, -0.5]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    loss, clipfrac, approx_kl = clipped_policy_loss(logp, old, adv, torch.ones(1, 4), cliprange=0.2)
    # t0: A>0, ρ=e^.5>1.2 -> clipped -1.2 ; t1: A<0, ρ=e^-.5<0.8 -> clipped +0.8
    # t2: ρ=e^.1 inside -> -2e^.1 ; t3: A>0, ρ<0.8 -> pessimistic max keeps unclipped -e^-.5
    expected = (-1.2 + 0.8 - 2 * math.exp(0.1) - math.exp(-0.5)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(0.5 * (0.25 + 0.25 + 0.01 + 0.25) / 4, abs=1e-6)
    loss.backward()
    # clipped tokens get no gradient; others get -A ρ / N
    assert logp.grad.tolist() == [approx([0.0, 0.0, -2 * math.exp(0.1) / 4, -math.exp(-0.5) / 4])]


def test_tokens_after_eos_do_not_affect_policy_loss():
    mask = torch.tensor([[1, 1, 0, 0]])
    rewards = torch.tensor([[0.0, 1.0, 7.0, 7.0]])
    values = torch.tensor([[0.2, 0.3, 4.0, 4.0]])
    adv, _ = gae(rewards, values, mask, 1.0, 0.95)
    assert adv[0, 2:].tolist() == [0.0, 0.0]

    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    logp = torch.tensor([[-0.8, -1.3, -1.0, -1.0]], requires_grad=True)
    base, _, _ = clipped_policy_loss(logp, old, adv, mask, cliprange=0.2)
    perturbed = logp.detach().clone()
    perturbed[0, 2:] = torch.tensor([50.0, float("nan")])
    perturbed.requires_grad_(True)
    loss, _, kl = clipped_policy_loss(perturbed, old, adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(base.item())
    assert torch.isfinite(kl)
    loss.backward()
    assert perturbed.grad[0, 2:].tolist() == [0.0, 0.0]


def test_value_loss_with_active_clipping():
    values = torch.tensor([[1.5, 0.9, 123.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 9.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, clipfrac = clipped_value_loss(values, old, returns, mask, cliprange_value=0.2)
    # t0: clip(1.5) = 1.2 -> max(0.25, 0.64) = 0.64 (clipped); t1: inside range -> 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert clipfrac.item() == pytest.approx(0.5)
    loss.backward()
    # clipped term is constant in v -> 0 grad; t1: 0.5 * 2(v - R) / 2 = 0.45 ; masked -> 0
    assert values.grad.tolist() == [approx([0.0, 0.45, 0.0])]


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, float("-inf"), float("-inf")]]])
    assert entropy_from_logits(logits).tolist() == [approx([math.log(4), math.log(2)])]


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # error 0.5 clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    ctl.update(current_kl=torch.tensor(6.6), n_steps=256)  # error 0.1
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 0.0256) * (1 + 0.1 * 0.0256))
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(0.0, 256)  # error -1 clipped to -0.2
    assert ctl.value == pytest.approx(0.2 * (1 - 0.2 * 0.0256))
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0)
    # residuals (0.5, -0.5, 0.5, -0.5): var 0.25 vs var(R) = 1.25 -> 1 - 0.2
    values = torch.tensor([[0.5, 2.5, 2.5, 4.5, 0.0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.8)


def _simulated_processes(parts, fn):
    """Run fn(part, reduce) in one thread per part, with `reduce` a sum over the threads (an all-reduce)."""
    import threading

    barrier, slots, results = threading.Barrier(len(parts)), [None] * len(parts), [None] * len(parts)

    def worker(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()  # everyone has read the slots before the next call overwrites them
            return total

        results[rank] = fn(parts[rank], reduce)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_whitening_across_processes_matches_one_process_with_the_whole_rollout():
    torch.manual_seed(0)
    x = torch.randn(6, 5) * 3 + 2
    x[0] += 10  # the rows of the two "processes" have very different means
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    x[1, 4] = float("nan")  # garbage after EOS stays out of the statistics
    parts = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    for shift_mean in (True, False):
        whole = masked_whiten(x, mask, shift_mean=shift_mean)
        split = _simulated_processes(
            parts, lambda p, reduce, s=shift_mean: masked_whiten(p[0], p[1], shift_mean=s, reduce=reduce)
        )
        assert torch.allclose(torch.cat(split), whole, atol=1e-6)
        # without the reduction each process whitens with its own statistics: not the same advantages
        local = torch.cat([masked_whiten(p[0], p[1], shift_mean=shift_mean) for p in parts])
        assert (local - whole).abs().max() > 0.1
    var = _simulated_processes(parts, lambda p, reduce: masked_var(p[0], p[1], reduce=reduce))
    assert var[0].item() == pytest.approx(masked_var(x, mask).item()) and var[1].item() == pytest.approx(var[0].item())


def test_score_standardisation_across_processes_matches_one_process():
    scores = torch.tensor([0.5, 1.5, 2.5, 9.0, 11.0, 13.0])
    whole = standardise_scores(scores)
    assert torch.allclose(whole, (scores - scores.mean()) / scores.std(), atol=1e-6)
    split = _simulated_processes([scores[:3], scores[3:]], lambda p, reduce: standardise_scores(p, reduce=reduce))
    assert torch.allclose(torch.cat(split), whole, atol=1e-6)
    assert not torch.allclose(
        torch.cat([standardise_scores(scores[:3]), standardise_scores(scores[3:])]), whole, atol=0.1
    )


def test_explained_variance_across_processes_matches_one_process():
    torch.manual_seed(1)
    returns, values = torch.randn(6, 4), torch.randn(6, 4)
    returns[:3] += 5  # one process's returns sit far from the other's
    mask = torch.ones(6, 4, dtype=torch.long)
    mask[2, 2:] = 0
    whole = explained_variance(values, returns, mask)
    split = _simulated_processes(
        [(values[:3], returns[:3], mask[:3]), (values[3:], returns[3:], mask[3:])],
        lambda p, reduce: explained_variance(p[0], p[1], p[2], reduce=reduce),
    )
    assert split[0].item() == pytest.approx(whole.item()) and split[1].item() == pytest.approx(whole.item())


def test_gae_estimator_whitens_the_advantages_and_keeps_the_returns():
    from rlkit.losses.advantages import ADVANTAGE_ESTIMATORS, gae_advantages

    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 50.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantages(rewards, mask, values, gamma=0.9, lam=0.8)
    # the hand-computed GAE of test_gae_with_a_row_that_ends_early, whitened over the 5 real tokens
    raw = [0.21712, 0.246, 0.3, 0.53, 1.5]
    mean = sum(raw) / 5
    std = math.sqrt(sum((a - mean) ** 2 for a in raw) / 4)  # unbiased
    white = [(a - mean) / std for a in raw]
    assert adv.tolist() == [approx(white[:3], abs=1e-4), approx([white[3], white[4], 0.0], abs=1e-4)]
    assert ret.tolist() == [approx([0.71712, 0.846, 1.0]), approx([1.53, 2.0, 0.0])]
    record = ADVANTAGE_ESTIMATORS["gae"]
    assert record.fn is gae_advantages and record.needs_values and record.params == ("gamma", "lam")
    with pytest.raises(ValueError, match="value function"):
        gae_advantages(rewards, mask, None, gamma=0.9, lam=0.8)
