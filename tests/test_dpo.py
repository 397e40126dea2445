"""DPO: summed completion log-probs, the reference (precomputed, disabled adapter, frozen adapter), the CLI.

The log-prob tests run the tiny model in float32 and compare against a plain forward of each
sequence on its own, so they check the label shift, the masking and the padding-free layout at
once.
"""

from __future__ import annotations

import copy
import functools
import json
import math

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import DEMO_DATA, build_model, run_cli, write_jsonl

from rlkit.data.pairs import collate_pairs, pair_sequences, tokenize_pairs
from rlkit.data.templates import resolve_template
from rlkit.models.load import add_lora, load_causal_lm, resolve_source
from rlkit.preference.logps import pair_logps
from rlkit.preference.reference import (
    AdapterReference,
    DisabledAdapterReference,
    ModelReference,
    PrecomputedReference,
    compute_reference_logps,
)
from rlkit.recipes.dpo import DPOConfig, DPOObjective


def rlkit(*args: str, env: dict | None = None):
    """`rlkit ...` in a subprocess, one intra-op thread: tiny models gain nothing from more, and on
    a shared CPU, spinning OpenMP threads of parallel test runs slow each other down ~20x."""
    return run_cli(*args, env={"OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def pair_rows(tiny_tokenizer):
    # eight pairs of the demo's varied lengths, so that padding-free rows hold several sequences
    records = [json.loads(line) for line in (DEMO_DATA / "pairs.jsonl").read_text().splitlines()[:8]]
    rows, _ = tokenize_pairs(records, tiny_tokenizer, resolve_template(None, tiny_tokenizer), 1024)
    return rows


@pytest.fixture(scope="module")
def base(tiny_tokenizer):
    """float64, so layouts can be compared far below float32's rounding of sums near -250."""
    return build_model(len(tiny_tokenizer), seed=1).double().eval()


def _perturbed_lora(model, seed=0):
    """A LoRA policy whose adapter is no longer zero, as after some training."""
    policy = add_lora(copy.deepcopy(model), r=4, alpha=8, dropout=0.0, targets="all-linear").to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return policy.eval()


def _independent_logps(model, ids, prompt_length):
    """Sum of log p(token t | tokens < t) over completion tokens, from a forward of this sequence alone."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = F.log_softmax(logits, dim=-1)
    return sum(logprobs[t - 1, ids[t]].item() for t in range(prompt_length, len(ids)))


def test_summed_logps_equal_independent_per_token_logps(base, pair_rows, tiny_tokenizer):
    batch = collate_pairs(pair_rows, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        out = pair_logps(base, batch)
    for k, row in enumerate(pair_rows):
        prompt = row["prompt_input_ids"]
        for side, got, count in (
            ("chosen", out.chosen[k], out.chosen_tokens[k]),
            ("rejected", out.rejected[k], out.rejected_tokens[k]),
        ):
            ids = prompt + row[f"{side}_input_ids"]
            expected = _independent_logps(base, ids, len(prompt))
            assert got.item() == pytest.approx(expected, abs=1e-5)
            assert count.item() == len(row[f"{side}_input_ids"])  # completion tokens only
            with_prompt = _independent_logps(base, ids, 1)
            assert abs(with_prompt - expected) > 1e-3  # the prompt's tokens would have changed the sum


@pytest.mark.parametrize("capacity", [None, 10_000])
def test_padding_free_equals_padded(base, pair_rows, tiny_tokenizer, capacity):
    free = collate_pairs(pair_rows, tiny_tokenizer.pad_token_id, capacity=capacity)
    padded = collate_pairs(pair_rows, tiny_tokenizer.pad_token_id, padding_free=False)
    assert free["input_ids"].numel() < padded["input_ids"].numel()
    with torch.no_grad():
        a, b = pair_logps(base, free), pair_logps(base, padded)
    for x, y in ((a.chosen, b.chosen), (a.rejected, b.rejected), (a.chosen_tokens, b.chosen_tokens)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_lora_with_adapter_disabled_is_the_base(base, pair_rows, tiny_tokenizer):
    policy = _perturbed_lora(base)
    ids = torch.tensor([pair_sequences(pair_rows)[0][0]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        assert not torch.allclose(policy(input_ids=ids).logits, expected, atol=1e-3)
        with policy.disable_adapter():
            torch.testing.assert_close(policy(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
    # the same, as the reference strategy the objective uses
    batch = collate_pairs(pair_rows, tiny_tokenizer.pad_token_id)
    disabled = DisabledAdapterReference().logps(policy, batch)
    frozen = ModelReference(copy.deepcopy(base)).logps(policy, batch)
    for x, y in zip(disabled, frozen):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def _config(loss="sigmoid", **kwargs):
    return DPOConfig(model="m", data=["d"], loss=loss, **kwargs)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust"])
def test_precomputed_and_on_the_fly_reference_give_the_same_loss(base, pair_rows, tiny_tokenizer, loss):
    from accelerate import Accelerator

    collate = functools.partial(collate_pairs, pad_id=tiny_tokenizer.pad_token_id)
    start = add_lora(
        copy.deepcopy(base), r=4, alpha=8, dropout=0.0, targets="all-linear"
    ).double()  # the policy at step 0
    dataset = datasets.Dataset.from_list(pair_rows)
    columns = compute_reference_logps(start, dataset, collate, batch_size=4, accelerator=Accelerator(cpu=True))
    with_ref = dataset.add_column("ref_chosen_logps", columns["ref_chosen_logps"]).add_column(
        "ref_rejected_logps", columns["ref_rejected_logps"]
    )
    policy = _perturbed_lora(base)  # later in training
    config = _config(loss, label_smoothing=0.1 if loss == "robust" else 0.0, sft_weight=0.3)
    with torch.no_grad():
        precomputed = DPOObjective(config, PrecomputedReference()).loss(policy, collate(with_ref))
        on_the_fly = DPOObjective(config, DisabledAdapterReference()).loss(policy, collate(dataset))
    assert precomputed.loss.item() == pytest.approx(on_the_fly.loss.item(), abs=1e-5)
    for key in precomputed.metrics:
        assert precomputed.metrics[key].item() == pytest.approx(on_the_fly.metrics[key].item(), abs=1e-4), key


def test_objective_matches_the_papers_formulas(base, pair_rows, tiny_tokenizer):
    batch = collate_pairs(pair_rows, tiny_tokenizer.pad_token_id)
    policy = _perturbed_lora(base)
    with torch.no_grad():
        pol = pair_logps(policy, batch)
        ref_c, ref_r = DisabledAdapterReference().logps(policy, batch)
        beta = 0.1
        h = (pol.chosen - ref_c) - (pol.rejected - ref_r)
        expected = (-F.logsigmoid(beta * h) + 0.5 * -pol.chosen / pol.chosen_tokens).sum()
        got = DPOObjective(_config(beta=beta, sft_weight=0.5), DisabledAdapterReference()).loss(policy, batch)
        assert got.loss.item() == pytest.approx(expected.item(), rel=1e-5)
        acc = ((pol.chosen - ref_c) > (pol.rejected - ref_r)).float().sum()
        assert got.metrics["rewards/accuracies"].item() == acc.item()
        assert got.metrics["logps/chosen"].item() == pytest.approx(pol.chosen.sum().item(), rel=1e-6)
        # IPO: length-normalised log-ratios, target 1/(2 beta)
        n_c, n_r = pol.chosen_tokens, pol.rejected_tokens
        h_norm = (pol.chosen - ref_c) / n_c - (pol.rejected - ref_r) / n_r
        got = DPOObjective(_config("ipo", beta=beta), DisabledAdapterReference()).loss(policy, batch)
        assert got.loss.item() == pytest.approx(((h_norm - 1 / (2 * beta)) ** 2).sum().item(), rel=1e-5)
        # SimPO: no reference at all; mean log-probs, margin gamma
        got = DPOObjective(_config("simpo", beta=2.0, simpo_gamma=0.5), None).loss(policy, batch)
        logits = 2.0 * (pol.chosen / n_c - pol.rejected / n_r) - 0.5
        assert got.loss.item() == pytest.approx((-F.logsigmoid(logits)).sum().item(), rel=1e-5)
        # at step 0 (policy == reference) every implicit reward is 0: accuracy reads 50%
        start = add_lora(copy.deepcopy(base), r=4, alpha=8, dropout=0.0, targets="all-linear").double().eval()
        got = DPOObjective(_config(), DisabledAdapterReference()).loss(start, batch)
        assert got.metrics["rewards/accuracies"].item() == pytest.approx(0.5 * len(pair_rows))
        assert got.loss.item() == pytest.approx(len(pair_rows) * math.log(2), rel=1e-5)


def test_continued_adapter_reference_is_the_frozen_start(base, pair_rows, tiny_tokenizer, tmp_path):
    """MODEL = an adapter dir: the reference is that adapter as it was, on the same base (no second base)."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base.save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    sft = _perturbed_lora(base, seed=3)
    sft.peft_config["default"].base_model_name_or_path = str(base_dir)
    sft.save_pretrained(adapter_dir)
    batch = collate_pairs(pair_rows, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        expected = pair_logps(sft, batch)
    policy = load_causal_lm(resolve_source(str(adapter_dir)), dtype=torch.float64)
    reference = AdapterReference(policy, str(adapter_dir))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    with torch.no_grad():  # training moves the policy's adapter
        for name, param in policy.named_parameters():
            if "lora_A.default" in name:
                param.add_(0.3)
    ref_c, ref_r = reference.logps(policy, batch)
    torch.testing.assert_close(ref_c, expected.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_r, expected.rejected, atol=1e-5, rtol=0)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable  # switched back, still trainable
    assert abs(pair_logps(policy, batch).chosen - expected.chosen).max() > 1e-3


# ---- the command ---------------------------------------------------------------------------


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.process_boundary
def test_lora_dpo_end_to_end_and_reference_cache(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dpo"
    args = [
        "dpo",
        str(tiny_model_dir),
        str(DEMO_DATA / "pairs.jsonl"),
        "-o",
        str(out),
        "--eval-data",
        str(DEMO_DATA / "pairs_eval.jsonl"),
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--eval-every",
        "3",
    ]
    env = {"RLKIT_CACHE_DIR": str(tmp_path / "cache")}
    result = rlkit(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "reference log-probs: 224 pairs" in result.stderr and "precomputed" in result.stderr  # 160 + 64
    rows = _metrics(out)
    for key in (
        "loss",
        "grad_norm",
        "tokens_per_s",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert key in rows[0], key
    assert "eval/rewards/accuracies" in rows[2]
    final = json.loads((out / "final_metrics.json").read_text())
    assert "held-out implicit-reward accuracy" in (out / "README.md").read_text()
    assert 0 <= final["eval/rewards/accuracies"] <= 1
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert model is not None
    again = rlkit(*args, "--overwrite", env=env)  # same reference, same data: no reference pass
    assert again.returncode == 0, again.stderr
    assert "reference log-probs: cached" in again.stderr
    assert json.loads((out / "final_metrics.json").read_text())["loss"] == pytest.approx(final["loss"], abs=1e-6)


def test_continued_adapter_on_the_fly_writes_the_trained_adapter_alone(base, tiny_tokenizer, tmp_path):
    """The frozen start loaded beside the trained adapter is no part of OUT (peft would save it as
    OUT/reference/): the adapter saved is the trained one, and OUT loads as it."""
    from peft import PeftModel
    from safetensors.torch import load_file

    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    base.save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    start = _perturbed_lora(base, seed=3)
    start.peft_config["default"].base_model_name_or_path = str(base_dir)
    start.save_pretrained(adapter_dir)
    args = ("--no-precompute-ref", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2")
    result = rlkit("dpo", str(adapter_dir), str(DEMO_DATA / "pairs_eval.jsonl"), "-o", str(out), *args)
    assert result.returncode == 0, result.stderr
    assert "its adapter, frozen" in result.stderr
    assert not (out / "reference").exists() and (out / "adapter_model.safetensors").is_file()
    saved, started = load_file(out / "adapter_model.safetensors"), load_file(adapter_dir / "adapter_model.safetensors")
    assert saved.keys() == started.keys()
    assert any(not torch.equal(saved[k], started[k]) for k in saved)  # trained, not the frozen start
    loaded = PeftModel.from_pretrained(load_causal_lm(resolve_source(str(base_dir))), out)
    assert list(loaded.peft_config) == ["default"]


def test_full_dpo_with_ref_on_the_fly_and_simpo(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    result = rlkit(
        "dpo",
        str(tiny_model_dir),
        str(DEMO_DATA / "pairs_eval.jsonl"),
        "-o",
        str(out),
        "--full",
        "--ref",
        str(tiny_model_dir),
        "--no-precompute-ref",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--loss",
        "ipo",
        "--no-padding-free",
    )
    assert result.returncode == 0, result.stderr
    assert "on the fly" in result.stderr
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    out = tmp_path / "simpo"
    result = rlkit(
        "dpo",
        str(tiny_model_dir),
        str(DEMO_DATA / "pairs_eval.jsonl"),
        "-o",
        str(out),
        "--loss",
        "simpo",
        "--beta",
        "2",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
    )
    assert result.returncode == 0, result.stderr
    assert "reference: none" in result.stderr


def test_long_prompts_are_dropped_with_a_warning_and_all_dropped_is_exit_2(tiny_model_dir, tmp_path):
    pairs = [
        {"prompt": f"What is {i} + 1?", "chosen": f"The answer is {i + 1}. #done", "rejected": "No idea."}
        for i in range(8)
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs + [{"prompt": "word " * 200, "chosen": "a", "rejected": "b"}])
    out = tmp_path / "out"
    result = rlkit(
        "dpo",
        str(tiny_model_dir),
        str(path),
        "-o",
        str(out),
        "--max-length",
        "64",
        "--max-steps",
        "1",
        "--batch-size",
        "4",
    )
    assert result.returncode == 0, result.stderr
    assert "dropped 1 pair(s) whose prompt alone fills --max-length 64" in result.stderr and "record 9" in result.stderr
    out = tmp_path / "none"
    result = rlkit("dpo", str(tiny_model_dir), str(path), "-o", str(out), "--max-length", "8")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "every pair was dropped" in lines[-1] and "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "none.partial").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss": "robust", "label_smoothing": 0.5}, "--label-smoothing"),
        ({"beta": 0.0}, "--beta"),
        ({"sft_weight": -1.0}, "--sft-weight"),
    ],
)
def test_bad_options_are_refused(options, message):
    from rlkit.errors import InputError
    from rlkit.recipes.dpo import check_options

    with pytest.raises(InputError, match=message):
        check_options(_config(**options))


def test_tulu_recipe_is_expressible_as_flags(tmp_path):
    from rlkit.config import resolve_config

    recipe = tmp_path / "tulu.yaml"
    recipe.write_text(
        "lr: 5.0e-7\nbatch_size: 8\ngrad_accum: 4\nscheduler: linear\nwarmup_ratio: 0.1\nepochs: 3\nlora: false\ntemplate: tulu\nbeta: 0.1\n"
    )
    config = resolve_config(DPOConfig, {"model": "sft", "data": ["uf.jsonl"], "output": "out"}, recipe)
    assert (config.lr, config.batch_size * config.grad_accum, config.scheduler, config.warmup_ratio, config.epochs) == (
        5e-7,
        32,
        "linear",
        0.1,
        3,
    )
    assert (config.adam_beta1, config.adam_beta2, config.adam_epsilon) == (0.9, 0.999, 1e-8)


# ---- losses from their records -------------------------------------------------------------


def test_weighted_losses_sum_their_components_and_log_each(base, pair_rows, tiny_tokenizer):
    """`--loss sigmoid,sft --loss-weights 1,0.5` is `--loss sigmoid --sft-weight 0.5`, with each part logged."""
    batch = collate_pairs(pair_rows, tiny_tokenizer.pad_token_id)
    policy = _perturbed_lora(base)
    with torch.no_grad():
        combined = DPOObjective(_config("sigmoid,sft", loss_weights=["1", "0.5"]), DisabledAdapterReference()).loss(
            policy, batch
        )
        rpo = DPOObjective(_config(sft_weight=0.5), DisabledAdapterReference()).loss(policy, batch)
        pol = pair_logps(policy, batch)
    assert combined.loss.item() == pytest.approx(rpo.loss.item(), rel=1e-10)
    sigmoid = DPOObjective(_config(), DisabledAdapterReference()).loss(policy, batch).loss
    assert combined.metrics["loss/sigmoid"].item() == pytest.approx(sigmoid.item(), rel=1e-10)
    assert combined.metrics["loss/sft"].item() == pytest.approx((-pol.chosen / pol.chosen_tokens).sum().item())
    for key in rpo.metrics:
        assert combined.metrics[key].item() == pytest.approx(rpo.metrics[key].item(), rel=1e-10), key
    assert "loss/sigmoid" not in rpo.metrics  # one loss: its value is `loss`


def test_length_normalised_and_reference_free_records_get_their_inputs(base, pair_rows, tiny_tokenizer):
    """sigmoid_norm: TRL's formula on mean per-token log-ratios; orpo: no reference, mean log-probs."""
    batch = collate_pairs(pair_rows, tiny_tokenizer.pad_token_id)
    policy = _perturbed_lora(base)
    with torch.no_grad():
        pol = pair_logps(policy, batch)
        ref_c, ref_r = DisabledAdapterReference().logps(policy, batch)
        n_c, n_r = pol.chosen_tokens, pol.rejected_tokens
        got = DPOObjective(_config("sigmoid_norm", beta=0.1), DisabledAdapterReference()).loss(policy, batch)
        h_norm = (pol.chosen - ref_c) / n_c - (pol.rejected - ref_r) / n_r
        assert got.loss.item() == pytest.approx((-F.logsigmoid(0.1 * h_norm)).sum().item(), rel=1e-10)
        got = DPOObjective(_config("orpo", beta=0.1), None).loss(policy, batch)
        pc, pr = pol.chosen / n_c, pol.rejected / n_r
        log_odds = (pc - torch.log1p(-torch.exp(pc))) - (pr - torch.log1p(-torch.exp(pr)))
        assert got.loss.item() == pytest.approx((-pc - 0.1 * F.logsigmoid(log_odds)).sum().item(), rel=1e-8)
        assert got.metrics["rewards/chosen"].item() == pytest.approx((0.1 * pc).sum().item(), rel=1e-10)


def test_bco_reward_shift_is_the_mean_of_training_rewards_and_is_checkpointed(tmp_path):
    from accelerate import Accelerator

    from rlkit.recipes.dpo import RewardShift

    shift = RewardShift()
    assert shift(torch.tensor([1.0, 3.0]), update=False).item() == pytest.approx(2.0)  # nothing seen: the batch's
    assert shift(torch.tensor([1.0, 3.0]), update=True).item() == pytest.approx(2.0)
    assert shift(torch.tensor([5.0, 7.0, 9.0, 11.0]), update=True).item() == pytest.approx(6.0)  # 36 / 6
    assert shift(torch.tensor([100.0]), update=False).item() == pytest.approx(6.0)  # evaluation only reads it
    accelerator = Accelerator(cpu=True)
    accelerator.register_for_checkpointing(shift)
    accelerator.save_state(str(tmp_path / "checkpoint"))
    shift.load_state_dict({"total": 0.0, "count": 0.0})
    accelerator.load_state(str(tmp_path / "checkpoint"))
    assert shift.state_dict() == {"total": 36.0, "count": 6.0}


def _tiny_dpo(tiny_model_dir, out, **options):
    """A few steps of dpo in this process, one thread."""
    from rlkit.recipes.dpo import run_dpo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = DPOConfig(
            model=str(tiny_model_dir),
            data=[str(DEMO_DATA / "pairs_eval.jsonl")],
            output=str(out),
            batch_size=4,
            lr=1e-3,
            log_every=1000,
            **options,
        )
        return run_dpo(config)
    finally:
        torch.set_num_threads(threads)


def test_bco_pair_resumes_with_its_reward_shift(tiny_model_dir, tmp_path, monkeypatch):
    """Interrupted after step 3 and resumed, BCO ends where the uninterrupted run does: δ was in the checkpoint."""
    from safetensors.torch import load_file

    import rlkit.training.run as run_module
    from rlkit.errors import RunError

    monkeypatch.setenv("RLKIT_CACHE_DIR", str(tmp_path / "cache"))
    options = {"loss": "bco_pair", "max_steps": 4, "save_every": 1}
    whole = _tiny_dpo(tiny_model_dir, tmp_path / "whole", **options)

    def crash(*args, **kwargs):
        raise RunError("simulated crash before the output was written")

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "finalize", crash)
        with pytest.raises(RunError):
            _tiny_dpo(tiny_model_dir, out, **options)
    checkpoint = sorted((tmp_path / "resumed.partial" / "checkpoints").iterdir())[-1]
    assert torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)["count"] == 2 * 4 * 3
    _tiny_dpo(tiny_model_dir, out, resume=True, **options)
    expected, got = load_file(whole / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["reward_shift"] == pytest.approx(
        json.loads((whole / "final_metrics.json").read_text())["reward_shift"]
    )


NEW_LOSSES = [
    "orpo",
    "cpo",
    "cpo_simpo",
    "apo_zero",
    "apo_down",
    "nca_pair",
    "bco_pair",
    "exo_pair",
    "sppo_hard",
    "discopop",
    "sigmoid_norm",
    "ipo,sft",
]


@pytest.mark.parametrize("loss", NEW_LOSSES)
def test_every_ported_loss_trains_and_writes_its_output(tiny_model_dir, tmp_path, monkeypatch, loss):
    monkeypatch.setenv("RLKIT_CACHE_DIR", str(tmp_path / "cache"))
    options = {"label_smoothing": 0.1} if loss == "exo_pair" else {}
    if "," in loss:
        options["loss_weights"] = ["1", "0.5"]
    out = _tiny_dpo(tiny_model_dir, tmp_path / "out", loss=loss, max_steps=2, **options)
    final = json.loads((out / "final_metrics.json").read_text())
    assert math.isfinite(final["loss"]) and (out / "adapter_model.safetensors").is_file()
    assert f"loss: `{loss}`" in (out / "README.md").read_text()


def test_the_docs_table_lists_every_loss():
    """docs/dpo.md has one row per record, naming its options, its log-probs and whether it needs a reference."""
    from conftest import REPO

    from rlkit.losses.preference import PREFERENCE_LOSSES

    rows = {
        line.split("|")[1].strip(): line
        for line in (REPO / "docs" / "dpo.md").read_text().splitlines()
        if line.startswith("| `")
    }
    for name, record in PREFERENCE_LOSSES.items():
        row = rows.get(f"`{name}`")
        assert row is not None, f"docs/dpo.md has no row for --loss {name}"
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert all(f"`{flag}`" in cells[4] for flag in record.flags), (name, cells[4])
        assert cells[2] == ("per-token mean" if record.length_normalised else "summed"), name
        assert cells[3] == ("none" if record.reference_free else "yes"), name


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss": "sigmod"}, "unknown sigmod"),
        ({"loss": "exo_pair"}, "--label-smoothing ε > 0"),
        ({"loss": "sigmoid,sft", "loss_weights": ["1"]}, "--loss-weights 1: 1 weights for 2 losses"),
        ({"discopop_tau": 0.0}, "--discopop-tau"),
    ],
)
def test_bad_loss_options_are_refused(options, message):
    from rlkit.errors import InputError
    from rlkit.recipes.dpo import check_options

    with pytest.raises(InputError, match=message):
        check_options(_config(**options))
