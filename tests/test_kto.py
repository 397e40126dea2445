"""`rlkit kto`: unpaired data, mismatched pairs, the detached KL, the objective, the command, efficacy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import DEMO_DATA, build_model, run_cli, write_jsonl
from equivalence import LINEAR_ADAM, assert_same_metrics

from rlkit.data.formats import Format
from rlkit.data.pairs import tokenize_pairs
from rlkit.data.prepare import DataOptions, build_data, prepare_unpaired_data, save_prepared
from rlkit.data.templates import resolve_template
from rlkit.data.unpaired import (
    collate_unpaired,
    mismatched_partners,
    parse_label,
    tokenize_unpaired,
    with_kl_completions,
)
from rlkit.errors import InputError
from rlkit.losses.kto import kto_loss
from rlkit.preference.logps import sequence_logps
from rlkit.preference.reference import PrecomputedReference
from rlkit.recipes.kto import KTO_LOGPS, KTOConfig, KTOObjective

PAIRS = DEMO_DATA / "pairs.jsonl"
UNPAIRED = DEMO_DATA / "unpaired.jsonl"


def rlkit(*args: str):
    return run_cli(*args, env={"OMP_NUM_THREADS": "1"})


def _records(path, n=None):
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


# ---- mismatched pairs ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5, 8, 64, 301])
def test_every_example_gets_another_examples_completion(n):
    partners, clashes = mismatched_partners(list(range(n)), seed=0)
    assert clashes == 0
    assert all(j != i for i, j in enumerate(partners))
    assert sorted(partners) == list(range(n))  # each completion used exactly once


def test_split_pairs_never_meet_their_own_prompt():
    """Pairs split in two put two examples on one prompt; neither may get the other's completion."""
    prompts = [k // 2 for k in range(200)] + [k // 4 for k in range(400)]  # 2 and 4 completions per prompt
    for seed in range(5):
        partners, clashes = mismatched_partners(prompts, seed=seed)
        assert clashes == 0
        assert all(prompts[i] != prompts[j] for i, j in enumerate(partners))
    assert mismatched_partners(prompts, seed=1) == mismatched_partners(prompts, seed=1)
    assert mismatched_partners(prompts, seed=1) != mismatched_partners(prompts, seed=2)


def test_unavoidable_clashes_are_counted_and_too_little_data_refused():
    prompts = ["a"] * 8 + ["b", "c"]  # one prompt holds 80% of the data
    partners, clashes = mismatched_partners(prompts, seed=0)
    assert clashes == sum(prompts[i] == prompts[j] for i, j in enumerate(partners)) > 0
    with pytest.raises(InputError, match="at least 2"):
        mismatched_partners(["a"], seed=0)
    with pytest.raises(InputError, match="same prompt"):
        mismatched_partners(["a", "a", "a"], seed=0)


def test_kl_completion_is_the_partners_cut_to_fit(tiny_tokenizer):
    import datasets

    rows = [
        {"prompt_input_ids": [1] * 3, "completion_input_ids": [10, 11], "completion_labels": [10, 11], "label": True},
        {
            "prompt_input_ids": [2] * 6,
            "completion_input_ids": [20, 21, 22, 23],
            "completion_labels": [20, 21, 22, 23],
            "label": False,
        },
        {"prompt_input_ids": [3] * 2, "completion_input_ids": [30], "completion_labels": [30], "label": True},
    ]
    ds, clashes = with_kl_completions(datasets.Dataset.from_list(rows), max_length=8, seed=0)
    assert clashes == 0
    for i, row in enumerate(ds):
        partner = rows[row["kl_partner"]]
        assert row["kl_partner"] != i
        room = 8 - len(row["prompt_input_ids"])
        assert row["kl_input_ids"] == partner["completion_input_ids"][:room]
        assert row["kl_labels"] == partner["completion_labels"][:room]


# ---- data ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,expected",
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("true", True),
        ("False", False),
        ("desirable", True),
        ("no", False),
    ],
)
def test_labels(value, expected):
    assert parse_label(value, "x") is expected


def test_bad_label_is_refused():
    with pytest.raises(InputError, match="'label' must be true/false"):
        parse_label("maybe", "data record 3")


def test_pairs_become_one_desirable_and_one_undesirable_example(tiny_tokenizer, tmp_path):
    records = _records(PAIRS, 40)
    template = resolve_template(None, tiny_tokenizer, "tiny")
    rows, stats = tokenize_unpaired(records, Format.PREFERENCE, tiny_tokenizer, template, 1024)
    pairs, _ = tokenize_pairs(records, tiny_tokenizer, template, 1024)
    assert (stats.examples, stats.desirable, stats.undesirable, stats.from_pairs) == (80, 40, 40, 40)
    for pair, chosen, rejected in zip(pairs, rows[0::2], rows[1::2]):  # the same tokens dpo sees
        assert chosen["label"] is True and rejected["label"] is False
        assert chosen["prompt_input_ids"] == rejected["prompt_input_ids"] == pair["prompt_input_ids"]
        assert (chosen["completion_input_ids"], chosen["completion_labels"]) == (
            pair["chosen_input_ids"],
            pair["chosen_labels"],
        )
        assert (rejected["completion_input_ids"], rejected["completion_labels"]) == (
            pair["rejected_input_ids"],
            pair["rejected_labels"],
        )
    # the counts reach the metadata, from raw pairs and from a `rlkit pack` dir of pairs alike
    opts = DataOptions(sources=[str(tmp_path / "pairs.jsonl")])
    write_jsonl(tmp_path / "pairs.jsonl", records)
    counts = build_data(DataOptions(sources=opts.sources, kind="unpaired"), tiny_tokenizer, "tiny").metadata["counts"]
    assert (counts["examples"], counts["desirable"], counts["undesirable"], counts["from_pairs"]) == (80, 40, 40, 40)
    save_prepared(
        build_data(DataOptions(sources=opts.sources, kind="pairs"), tiny_tokenizer, "tiny"), tmp_path / "packed"
    )
    split = prepare_unpaired_data(DataOptions(sources=[str(tmp_path / "packed")]), tiny_tokenizer, "tiny")
    assert split.metadata["kind"] == "unpaired" and split.metadata["counts"]["desirable"] == 40
    assert split.train[0] == rows[0] and split.train[1] == rows[1]


def test_labelled_completions_keep_their_labels(tiny_tokenizer):
    records = _records(UNPAIRED, 50)
    rows, stats = tokenize_unpaired(
        records, Format.UNPAIRED, tiny_tokenizer, resolve_template(None, tiny_tokenizer, "tiny"), 1024
    )
    assert [row["label"] for row in rows] == [bool(r["label"]) for r in records]
    assert stats.desirable == sum(bool(r["label"]) for r in records) and stats.from_pairs == 0


# ---- the objective -------------------------------------------------------------------------


def _batch(tokenizer, n=6):
    import datasets

    template = resolve_template(None, tokenizer, "tiny")
    rows, _ = tokenize_unpaired(_records(UNPAIRED, n), Format.UNPAIRED, tokenizer, template, 1024)
    ds, _ = with_kl_completions(datasets.Dataset.from_list(rows), 1024, seed=0)
    return ds


def _policy_and_precomputed_batch(tiny_tokenizer):
    """A policy and a batch carrying another model's log-probs as its precomputed reference."""
    policy, reference = (
        build_model(len(tiny_tokenizer), seed=1).double(),
        build_model(len(tiny_tokenizer), seed=2).double(),
    )
    ds = _batch(tiny_tokenizer)
    collate = lambda rows: collate_unpaired(rows, pad_id=tiny_tokenizer.pad_token_id)  # noqa: E731
    with torch.no_grad():
        ref_logps, ref_kl = KTO_LOGPS.measure(reference, collate(ds))
    ds = ds.add_column("ref_completion_logps", ref_logps.tolist()).add_column("ref_kl_logps", ref_kl.tolist())
    return policy, collate(ds), len(ds), ref_logps, ref_kl


def test_kl_is_detached_and_the_loss_matches_the_formula(tiny_tokenizer):
    """The gradient equals that of the KTO loss with z0 a constant: no gradient through the KL pairs."""
    torch.manual_seed(0)
    policy, batch, n, ref_logps, ref_kl = _policy_and_precomputed_batch(tiny_tokenizer)
    config = KTOConfig(model="m", data=["d"], beta=0.5, desirable_weight=1.3, undesirable_weight=0.7)
    objective = KTOObjective(config, PrecomputedReference(KTO_LOGPS), lambda value: value)
    out = objective.loss(policy, batch)
    out.loss.backward()
    got = {name: p.grad.clone() for name, p in policy.named_parameters()}
    policy.zero_grad()

    with torch.no_grad():
        z0 = (sequence_logps(policy, batch, n, "kl_")[0] - ref_kl).mean().clamp(min=0)
    logps = sequence_logps(policy, batch, n)[0]
    r = logps - ref_logps
    desirable = batch["label"].bool()
    by_hand = torch.where(
        desirable, 1.3 * (1 - torch.sigmoid(0.5 * (r - z0))), 0.7 * (1 - torch.sigmoid(0.5 * (z0 - r)))
    )
    assert torch.allclose(out.loss, by_hand.sum(), atol=1e-10)
    assert torch.allclose(out.loss, kto_loss(logps, ref_logps, desirable, z0, 0.5, 1.3, 0.7)[0].sum(), atol=1e-10)
    by_hand.sum().backward()
    for name, p in policy.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-10), name
    assert float(out.metrics["kl"]) == pytest.approx(float(z0) * n)
    assert float(out.counts["rewards/chosen"]) == int(desirable.sum())
    assert float(out.metrics["rewards/chosen"]) == pytest.approx(float((0.5 * r.detach())[desirable].sum()))


def test_apo_zero_unpaired_objective_runs_no_mismatched_forward(tiny_tokenizer):
    """--loss apo_zero_unpaired: the APO-zero formula, no z0 (no `kl` metric), one policy forward."""
    policy, batch, n, ref_logps, _ = _policy_and_precomputed_batch(tiny_tokenizer)
    config = KTOConfig(model="m", data=["d"], loss="apo_zero_unpaired", beta=0.5, desirable_weight=1.3)
    forwards = []
    handle = policy.register_forward_hook(lambda *_: forwards.append(1))
    out = KTOObjective(config, PrecomputedReference(KTO_LOGPS), lambda value: value).loss(policy, batch)
    handle.remove()
    with torch.no_grad():
        r = sequence_logps(policy, batch, n)[0] - ref_logps
    desirable = batch["label"].bool()
    by_hand = torch.where(desirable, 1.3 * (1 - torch.sigmoid(0.5 * r)), torch.sigmoid(0.5 * r))
    assert out.loss.item() == pytest.approx(by_hand.sum().item(), rel=1e-10)
    assert "kl" not in out.metrics and len(forwards) == 1


# ---- the command ---------------------------------------------------------------------------


def test_batch_size_one_is_a_clear_error(tiny_model_dir, tmp_path):
    result = rlkit("kto", str(tiny_model_dir), str(UNPAIRED), "-o", str(tmp_path / "out"), "--batch-size", "1")
    assert result.returncode == 2
    assert "--batch-size 1: KTO needs at least 2 examples per micro-batch" in result.stderr
    assert not (tmp_path / "out").exists()


def test_unbalanced_data_warns_with_weights_that_fix_it(tiny_model_dir, tmp_path):
    records = _records(UNPAIRED)
    good = [r for r in records if r["label"]][:60]
    bad = [r for r in records if not r["label"]][:20]
    write_jsonl(tmp_path / "skewed.jsonl", good + bad)
    out = tmp_path / "out"
    result = rlkit(
        "kto",
        str(tiny_model_dir),
        str(tmp_path / "skewed.jsonl"),
        "-o",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--max-length",
        "128",
    )
    assert result.returncode == 0, result.stderr
    # 60 desirable / 20 undesirable: ratio 3; λ_D = 4/3 * 20 / 60 = 0.4444 brings it to 4/3
    assert "= 3.000 is outside the KTO paper's recommended [1, 4/3]" in result.stderr
    assert "--desirable-weight 0.4444 --undesirable-weight 1" in result.stderr
    card = (out / "README.md").read_text()
    assert "- desirable: 60" in card and "- undesirable: 20" in card
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {
        "loss",
        "kl",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "tokens_per_s",
    } <= set(metrics[0])


def test_pairs_train_kto_and_reference_logps_are_cached(tiny_model_dir, tmp_path):
    args = [str(tiny_model_dir), str(PAIRS), "--max-steps", "2", "--batch-size", "4", "--max-length", "128"]
    first = rlkit("kto", *args, "-o", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    assert "data: 320 examples (160 desirable, 160 undesirable; from 160 pairs)" in first.stderr
    second = rlkit("kto", *args, "-o", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    assert "reference log-probs: cached" in second.stderr
    a, b = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab")
    assert [m["loss"] for m in a] == [m["loss"] for m in b]


@pytest.mark.process_boundary
def test_apo_zero_unpaired_trains_and_names_its_loss(tiny_model_dir, tmp_path):
    out = tmp_path / "apo"
    args = [str(tiny_model_dir), str(UNPAIRED), "-o", str(out), "--loss", "apo_zero_unpaired", "--max-steps", "2"]
    result = rlkit("kto", *args, "--batch-size", "4", "--max-length", "128")
    assert result.returncode == 0, result.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "kl" not in metrics[0] and {"loss", "rewards/chosen", "rewards/rejected"} <= set(metrics[0])
    assert "- loss `apo_zero_unpaired`" in (out / "README.md").read_text()


def test_on_the_fly_reference_matches_precomputed(tiny_model_dir, tmp_path):
    args = [
        str(tiny_model_dir),
        str(UNPAIRED),
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--max-length",
        "128",
        "--full",
        "--lr",
        "1e-3",
        *LINEAR_ADAM,
    ]
    assert rlkit("kto", *args, "-o", str(tmp_path / "pre")).returncode == 0
    live = rlkit("kto", *args, "-o", str(tmp_path / "live"), "--no-precompute-ref")
    assert live.returncode == 0, live.stderr
    pre, fly = (
        [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("pre", "live")
    )
    # the reference's log-probs computed in another batch layout: 4 examples x up to 128 tokens
    assert_same_metrics(pre, fly, ("loss", "kl"), terms=4 * 128)


@pytest.fixture(scope="module")
def sft_model(tiny_model_dir, tmp_path_factory):
    """The tiny model after a short SFT on the demo conversations."""
    sft = tmp_path_factory.mktemp("kto") / "sft"
    result = rlkit(
        "sft",
        str(tiny_model_dir),
        str(DEMO_DATA / "sft.jsonl"),
        "-o",
        str(sft),
        "--full",
        "--lr",
        "3e-3",
        "--max-steps",
        "60",
        "--batch-size",
        "4",
        "--max-length",
        "256",
    )
    assert result.returncode == 0, result.stderr
    return sft


def test_two_processes_average_the_kl_like_one_process(sft_model, tiny_model_dir, tmp_path):
    """2 processes x 4 examples = 1 process x 8: the same z0 (mean over processes) and losses.

    The reference is the untrained model, so z0 is far from 0 and differs between the two
    halves of a batch: a z0 not averaged over processes would change the losses.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        str(sft_model),
        str(UNPAIRED),
        "--ref",
        str(tiny_model_dir),
        "--max-steps",
        "3",
        "--max-length",
        "128",
        "--full",
        "--lr",
        "1e-3",
        *LINEAR_ADAM,
    ]
    one = rlkit("kto", *args, "-o", str(tmp_path / "one"), "--batch-size", "8")
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "-m",
            "rlkit",
            "kto",
            *args,
            "-o",
            str(tmp_path / "two"),
            "--batch-size",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr
    a, b = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two"))
    assert len(a) == len(b) == 3
    assert min(m["kl"] for m in a) > 1.0
    # 8 examples x up to 128 tokens summed per metric (tests/equivalence.py)
    assert_same_metrics(a, b, ("loss", "kl", "rewards/chosen", "rewards/rejected"), terms=8 * 128)


def test_kto_after_sft_lifts_held_out_preference_accuracy(sft_model, tmp_path):
    """Only unpaired labels: held-out pair accuracy of the implicit reward from 50% to over 90%.

    The labels are the held-out pairs' preference (the hedge, which the demo's reward-model pairs
    show: chosen unhedged, rejected hedged), given unpaired: each training pair contributes one
    side only, alternately its chosen (desirable) and its rejected (undesirable), so no prompt
    is seen with both labels. (The demo's own unpaired.jsonl labels a different behaviour, the
    closer, which these held-out pairs do not measure.)
    """
    sft = sft_model
    pairs = _records(PAIRS)
    unpaired = [
        {"prompt": r["prompt"], "completion": r["chosen" if i % 2 == 0 else "rejected"], "label": i % 2 == 0}
        for i, r in enumerate(pairs)
    ]
    data = write_jsonl(tmp_path / "unpaired.jsonl", unpaired)
    labels = Counter(r["label"] for r in unpaired)
    assert labels[True] >= len(pairs) // 2 and labels[False] >= len(pairs) // 2 and len(pairs) >= 100
    out = tmp_path / "kto"
    result = rlkit(
        "kto", str(sft), str(data), "-o", str(out), "--full", "--lr", "1e-3", "--epochs", "4", "--batch-size", "8"
    )
    assert result.returncode == 0, result.stderr

    def accuracy(model):
        result = rlkit("eval", str(model), "--pairs", str(DEMO_DATA / "pairs_eval.jsonl"), "--ref", str(sft))
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["accuracy"]

    before, after = accuracy(sft), accuracy(out)
    print(f"KTO implicit-reward accuracy on held-out pairs: before {before:.3f}, after {after:.3f}")
    assert before == 0.5  # policy == reference: every implicit reward is 0, every pair a tie
    assert after > 0.9


def test_examples_whose_prompt_fills_max_length_are_dropped_and_named(tiny_tokenizer, tmp_path):
    from rlkit.data.unpaired import describe_unpaired_data

    records = _records(UNPAIRED, 6)
    records[2] = {**records[2], "prompt": "word " * 400}
    write_jsonl(tmp_path / "long.jsonl", records)
    data = build_data(
        DataOptions(sources=[str(tmp_path / "long.jsonl")], kind="unpaired", max_length=128), tiny_tokenizer, "tiny"
    )
    assert data.metadata["counts"]["examples"] == 5 and data.metadata["counts"]["dropped"] == 1
    line, warnings = describe_unpaired_data(data.metadata)
    assert "5 examples" in line
    assert warnings == [
        f"{tmp_path / 'long.jsonl'}: dropped 1 example(s) whose prompt alone fills --max-length 128 tokens (record 3); raise --max-length to keep them"
    ]
