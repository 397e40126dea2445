"""DPO-family losses, checked against hand-computed values.

Shared example: π_c=-1, π_r=-3, ref_c=-2, ref_r=-2, so
h = (π_c - ref_c) - (π_r - ref_r) = 1 - (-1) = 2, and with β=0.5, βh = 1.
"""

import math

import pytest
import torch

from rlkit.losses.preference import (
    PREFERENCE_LOSSES,
    PreferenceLoss,
    add_sft_term,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    chosen_nll,
    cpo_loss,
    cpo_simpo_loss,
    discopop_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    loss_terms,
    nca_pair_loss,
    orpo_loss,
    robust_loss,
    sigmoid_loss,
    simpo_loss,
    sppo_hard_loss,
)

NEG_LOGSIG_1 = math.log(1 + math.exp(-1.0))  # -logσ(1)
NEG_LOGSIG_M1 = math.log(1 + math.exp(1.0))  # -logσ(-1)


def example(requires_grad: bool = False):
    pc = torch.tensor([-1.0], requires_grad=requires_grad)
    return pc, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])


def test_sigmoid_dpo_value_and_rewards():
    losses, chosen_r, rejected_r = sigmoid_loss(*example(), beta=0.5)
    assert losses.item() == pytest.approx(NEG_LOGSIG_1, abs=1e-6)
    assert chosen_r.item() == pytest.approx(0.5)  # 0.5 * (-1 - -2)
    assert rejected_r.item() == pytest.approx(-0.5)  # 0.5 * (-3 - -2)


def test_sigmoid_dpo_gradient_and_detached_rewards():
    pc, pr, rc, rr = example(requires_grad=True)
    losses, chosen_r, rejected_r = sigmoid_loss(pc, pr, rc, rr, beta=0.5)
    losses.sum().backward()
    # dL/dπ_c = -β σ(-βh) = -0.5 / (1 + e)
    assert pc.grad.item() == pytest.approx(-0.5 / (1 + math.e), abs=1e-6)
    assert not chosen_r.requires_grad and not rejected_r.requires_grad


def test_conservative_dpo_label_smoothing():
    losses, _, _ = sigmoid_loss(*example(), beta=0.5, label_smoothing=0.1)
    expected = 0.9 * NEG_LOGSIG_1 + 0.1 * NEG_LOGSIG_M1
    assert losses.item() == pytest.approx(expected, abs=1e-6)


def test_ipo():
    for beta, target in [(0.5, 1.0), (0.25, 2.0), (0.1, 5.0)]:
        losses, chosen_r, _ = ipo_loss(*example(), beta=beta)
        assert losses.item() == pytest.approx((2.0 - target) ** 2, abs=1e-5)
        assert chosen_r.item() == pytest.approx(beta * 1.0)


def test_hinge():
    assert hinge_loss(*example(), beta=0.5)[0].item() == pytest.approx(0.0)  # 1 - 0.5*2
    assert hinge_loss(*example(), beta=0.25)[0].item() == pytest.approx(0.5)  # 1 - 0.25*2
    # wrong ordering: h = -2 -> 1 + 0.5*2 = 2
    pc, pr, rc, rr = example()
    assert hinge_loss(pr, pc, rr, rc, beta=0.5)[0].item() == pytest.approx(2.0)


def test_robust_dpo():
    losses, _, _ = robust_loss(*example(), beta=0.5, label_smoothing=0.1)
    expected = (0.9 * NEG_LOGSIG_1 - 0.1 * NEG_LOGSIG_M1) / (1 - 0.2)
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    # ε = 0 reduces to plain DPO
    assert robust_loss(*example(), beta=0.5)[0].item() == pytest.approx(NEG_LOGSIG_1, abs=1e-6)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_dpo_rejects_bad_epsilon(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_loss(*example(), beta=0.5, label_smoothing=eps)


def test_simpo_is_reference_free():
    pc, pr = torch.tensor([-0.5]), torch.tensor([-1.5])  # mean per-token log-probs
    # β(π_c - π_r) - γ = 2*1 - 1 = 1
    losses, chosen_r, rejected_r = simpo_loss(pc, pr, beta=2.0, gamma=1.0)
    assert losses.item() == pytest.approx(NEG_LOGSIG_1, abs=1e-6)
    assert chosen_r.item() == pytest.approx(-1.0)
    assert rejected_r.item() == pytest.approx(-3.0)
    # it takes no reference log-probs at all, so its record needs no reference model
    assert PREFERENCE_LOSSES["simpo"].reference_free


def test_records_build_every_call_from_the_config():
    """Each record's function takes exactly the inputs and hyperparameters the record names."""
    from rlkit.recipes.dpo_config import DPOConfig

    config = DPOConfig(model="m", data=["d"], label_smoothing=0.1)
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
    inputs = {
        "policy_chosen_logps": pc,
        "policy_rejected_logps": pr,
        "reference_chosen_logps": torch.tensor([-2.0, -3.0]),
        "reference_rejected_logps": torch.tensor([-2.0, -3.0]),
        "chosen_tokens": torch.tensor([3, 4]),
        "reward_shift": torch.tensor(0.1),
    }
    for name, record in PREFERENCE_LOSSES.items():
        assert record.name == name
        out = record(inputs, record.hyperparameters_of(config))
        losses = out[0] if record.standalone else out
        assert losses.shape == (2,) and torch.isfinite(losses).all(), name
        if record.standalone:
            assert out[1].shape == out[2].shape == (2,), name
        assert all(hasattr(config, field) for field in record.hyperparameters.values()), name
    normalised = {n for n, r in PREFERENCE_LOSSES.items() if r.length_normalised}
    reference_free = {n for n, r in PREFERENCE_LOSSES.items() if r.reference_free}
    assert normalised == {"ipo", "simpo", "orpo", "cpo_simpo", "sigmoid_norm"}
    assert reference_free == {"simpo", "orpo", "cpo", "cpo_simpo", "sft"}


def test_a_record_cannot_drift_from_its_function():
    with pytest.raises(TypeError, match="hyperparameters"):  # SimPO's gamma not declared
        PreferenceLoss("x", simpo_loss, "x")
    with pytest.raises(TypeError, match="INPUTS"):
        PreferenceLoss("x", lambda policy_logps, *, beta: policy_logps, "x")


def test_add_sft_term():
    losses = torch.tensor([1.0, 2.0])
    chosen_logps = torch.tensor([-6.0, -2.0])  # summed
    lengths = torch.tensor([3, 4])
    # per-token NLL = [2.0, 0.5]; α = 0.5 -> [1 + 1.0, 2 + 0.25]
    assert add_sft_term(losses, chosen_logps, lengths, alpha=0.5).tolist() == pytest.approx([2.0, 2.25])
    assert add_sft_term(losses, chosen_logps, lengths, alpha=0.0).tolist() == [1.0, 2.0]
    # empty completion: length clamped to 1, no inf
    out = add_sft_term(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0]), alpha=1.0)
    assert torch.isfinite(out).all()


# --- the losses ported from TRL, on the shared example (a = π_c - ref_c = 1, b = π_r - ref_r = -1, h = 2)


def softplus(x: float) -> float:
    """-logσ(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_apo_zero_and_apo_down():
    # β = 0.5: βa = 0.5, βb = -0.5, β(a - b) = 1
    losses, chosen_r, rejected_r = apo_zero_loss(*example(), beta=0.5)
    assert losses.item() == pytest.approx((1 - sigma(0.5)) + sigma(-0.5), abs=1e-6)
    assert (chosen_r.item(), rejected_r.item()) == pytest.approx((0.5, -0.5))
    assert apo_down_loss(*example(), beta=0.5)[0].item() == pytest.approx(sigma(0.5) + 1 - sigma(1.0), abs=1e-6)


def test_apo_zero_raises_chosen_and_lowers_rejected_separately():
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    apo_zero_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)[0].sum().backward()
    # d/dπ_c (1 - σ(βa)) = -β σ(βa)σ(-βa); d/dπ_r σ(βb) = β σ(βb)σ(-βb)
    assert pc.grad.item() == pytest.approx(-0.5 * sigma(0.5) * sigma(-0.5), abs=1e-6)
    assert pr.grad.item() == pytest.approx(0.5 * sigma(-0.5) * sigma(0.5), abs=1e-6)


def test_nca_pair():
    # r_c = 0.5, r_r = -0.5: -logσ(0.5) - ½logσ(-0.5) - ½logσ(0.5)
    losses, chosen_r, rejected_r = nca_pair_loss(*example(), beta=0.5)
    expected = softplus(-0.5) + 0.5 * softplus(0.5) + 0.5 * softplus(-0.5)
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert (chosen_r.item(), rejected_r.item()) == pytest.approx((0.5, -0.5))


def test_bco_pair_with_its_reward_shift():
    # r_c = 0.5, r_r = -0.5, δ = 0.2: -logσ(0.3) - logσ(0.7)
    losses, _, _ = bco_pair_loss(*example(), torch.tensor(0.2), beta=0.5)
    assert losses.item() == pytest.approx(softplus(-0.3) + softplus(-0.7), abs=1e-6)
    shift = torch.tensor(0.2, requires_grad=True)
    bco_pair_loss(*example(requires_grad=True), shift, beta=0.5)[0].sum().backward()
    assert shift.grad is None  # δ is a baseline, not a parameter


def test_exo_pair():
    # βh = 1, ε = 0.1: σ(1)(logσ(1) - log 0.9) + σ(-1)(logσ(-1) - log 0.1)
    losses, _, _ = exo_pair_loss(*example(), beta=0.5, label_smoothing=0.1)
    expected = sigma(1) * (-softplus(-1) - math.log(0.9)) + sigma(-1) * (-softplus(1) - math.log(0.1))
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        exo_pair_loss(*example(), beta=0.5, label_smoothing=0.0)


def test_sppo_hard():
    # targets ±1/(2β): β = 0.5 puts a = 1 and b = -1 exactly on them; β = 0.25 (targets ±2) misses each by 1
    assert sppo_hard_loss(*example(), beta=0.5)[0].item() == pytest.approx(0.0, abs=1e-7)
    assert sppo_hard_loss(*example(), beta=0.25)[0].item() == pytest.approx(2.0, abs=1e-6)


def test_discopop():
    # βh = 1, τ = 0.05: w = σ(20); (1 - w)(-logσ(1)) + w e^-1
    losses, _, _ = discopop_loss(*example(), beta=0.5, tau=0.05)
    w = sigma(20.0)
    assert losses.item() == pytest.approx((1 - w) * NEG_LOGSIG_1 + w * math.exp(-1.0), abs=1e-6)
    # a large negative margin: w -> 0, the logistic loss
    assert discopop_loss(*example(), beta=-0.5, tau=0.05)[0].item() == pytest.approx(NEG_LOGSIG_M1, abs=1e-6)


def test_orpo_odds_ratio_plus_chosen_nll():
    pc, pr = torch.tensor([-0.5]), torch.tensor([-1.5])  # mean per-token log-probs
    log_odds = (-0.5 - math.log(1 - math.exp(-0.5))) - (-1.5 - math.log(1 - math.exp(-1.5)))
    losses, chosen_r, rejected_r = orpo_loss(pc, pr, beta=0.1)
    assert losses.item() == pytest.approx(0.5 + 0.1 * softplus(-log_odds), abs=1e-6)
    assert (chosen_r.item(), rejected_r.item()) == pytest.approx((-0.05, -0.15))
    assert orpo_loss(pc, pr, beta=0.0)[0].item() == pytest.approx(0.5)  # λ = 0: the chosen NLL alone
    assert torch.isfinite(orpo_loss(torch.tensor([0.0]), pr, beta=0.1)[0]).all()  # empty completion


def test_cpo_and_cpo_simpo():
    # CPO on summed log-probs: π_c = -6 over 3 tokens, π_r = -9; β = 0.5: -logσ(1.5) + 6/3
    pc, pr, tokens = torch.tensor([-6.0]), torch.tensor([-9.0]), torch.tensor([3])
    losses, chosen_r, _ = cpo_loss(pc, pr, tokens, beta=0.5)
    assert losses.item() == pytest.approx(softplus(-1.5) + 2.0, abs=1e-6)
    assert chosen_r.item() == pytest.approx(-3.0)
    smoothed = cpo_loss(pc, pr, tokens, beta=0.5, label_smoothing=0.1)[0].item()
    assert smoothed == pytest.approx(0.9 * softplus(-1.5) + 0.1 * softplus(1.5) + 2.0, abs=1e-6)
    # CPO-SimPO on mean log-probs: SimPO's -logσ(2·1 - 1) plus the chosen's NLL 0.5
    losses, _, _ = cpo_simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), beta=2.0, gamma=1.0)
    assert losses.item() == pytest.approx(NEG_LOGSIG_1 + 0.5, abs=1e-6)


def test_chosen_nll_and_sigmoid_norm():
    assert chosen_nll(torch.tensor([-6.0, -2.0]), torch.tensor([3, 0])).tolist() == pytest.approx([2.0, 2.0])
    norm = PREFERENCE_LOSSES["sigmoid_norm"]
    assert norm.fn is sigmoid_loss and norm.length_normalised and not PREFERENCE_LOSSES["sigmoid"].length_normalised


def test_loss_terms_parse_combinations():
    terms = loss_terms("sigmoid, sft", "1,0.5")
    assert [(record.name, weight) for record, weight in terms] == [("sigmoid", 1.0), ("sft", 0.5)]
    assert [(r.name, w) for r, w in loss_terms("ipo", [])] == [("ipo", 1.0)]
    assert [w for _, w in loss_terms("sigmoid,sft", ["2", " 0.25"])] == [2.0, 0.25]  # a YAML list
    for loss, weights, message in [
        ("sigmod", None, "unknown sigmod; choose from sigmoid, ipo"),
        ("sft", None, "rlkit sft"),
        ("sigmoid,sigmoid", None, "twice"),
        ("sigmoid,sft", "1", "1 weights for 2 losses"),
        ("sigmoid,sft", "1,x", "comma-separated numbers"),
        ("sigmoid,sft", "0,0", "not all 0"),
        ("sigmoid,sft", "1,-1", ">= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            loss_terms(loss, weights)


def test_the_dpo_options_load_without_running_torch():
    """`rlkit dpo --help` reads the loss records: importing them must not execute torch (a lazy
    module is bound, torch._C is not loaded), nor load transformers or datasets."""
    import subprocess
    import sys

    code = (
        "import sys, rlkit.recipes.dpo_config, rlkit.recipes.kto_config, rlkit.losses.preference\n"
        "loaded = [m for m in ('torch._C', 'transformers', 'datasets') if m in sys.modules]\n"
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
