"""Best-fit-decreasing packing, and the property packing rests on: examples sharing a row never see each other.

A packed row is run with no attention mask and position_ids that restart at 0 per example;
transformers turns the restarts into a block-diagonal causal mask. If that ever stops being
true (a transformers upgrade, a cache passed by mistake), every packed SFT run silently trains
on cross-example attention, so these tests compare packed logits with each example run alone.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import build_model

from rlkit.data.collate import collate_rows
from rlkit.data.packing import best_fit_decreasing, fill_ratio, pack_examples, unpacked_rows
from rlkit.data.tokenize import IGNORE
from rlkit.training.logprobs import label_logprobs

VOCAB = 600
PAD = 2


# --- best-fit-decreasing --------------------------------------------------------------------------


def _check_bins(bins, lengths, capacity):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths))), "every index exactly once"
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins), "no bin over capacity"
    assert all(b for b in bins), "no empty bin"


@pytest.mark.parametrize("seed", range(5))
def test_bfd_uniform_lengths(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    bins = best_fit_decreasing(lengths, 100)
    _check_bins(bins, lengths, 100)
    # BFD uses at most 11/9 OPT + 6/9 bins, and OPT is at least the volume bound.
    assert len(bins) <= 11 / 9 * -(-sum(lengths) // 100) + 1


def test_bfd_skewed_lengths_fill_rows():
    rng = random.Random(0)
    lengths = [min(512, max(1, int(rng.lognormvariate(4.5, 0.9)))) for _ in range(2000)]
    assert max(lengths) == 512 and min(lengths) < 20  # really skewed, with some full-length items
    bins = best_fit_decreasing(lengths, 512)
    _check_bins(bins, lengths, 512)
    fill = sum(lengths) / (512 * len(bins))
    assert fill >= 0.95, fill
    assert len(bins) <= -(-sum(lengths) // 512) + 5  # within a few rows of the volume bound


def test_bfd_edge_cases():
    assert best_fit_decreasing([], 10) == []
    assert best_fit_decreasing([10, 10], 10) == [[0], [1]]
    assert sorted(map(sorted, best_fit_decreasing([6, 4, 5, 5], 10))) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="truncate"):
        best_fit_decreasing([3, 11], 10)


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        labels = [IGNORE] + [t if k % 3 else IGNORE for k, t in enumerate(ids[1:], 1)]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_pack_examples_rows_and_positions():
    lengths = [30, 5, 17, 50, 2, 44, 9, 12]
    examples = _examples(lengths)
    rows = pack_examples(examples, 64)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(lengths)
    found = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:]):
            assert row["position_ids"][a:b] == list(range(b - a)), "positions restart at 0 per example"
            found.append((row["input_ids"][a:b], row["labels"][a:b]))
    expected = [(e["input_ids"], e["labels"]) for e in examples]
    assert sorted(found) == sorted(expected), "every example exactly once, unchanged"
    assert fill_ratio(rows, 64) == pytest.approx(sum(lengths) / (64 * len(rows)))


def test_unpacked_rows_one_example_each():
    examples = _examples([4, 7])
    rows = unpacked_rows(examples)
    assert [r["input_ids"] for r in rows] == [e["input_ids"] for e in examples]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 3], list(range(7))]


def test_collate_pads_right_with_restarting_positions():
    rows = unpacked_rows(_examples([3, 5]))
    batch = collate_rows(rows, pad_id=PAD)
    assert batch["input_ids"].shape == (2, 5) and batch["num_tokens"] == 8
    assert batch["input_ids"][0, 3:].tolist() == [PAD, PAD]
    assert batch["labels"][0, 3:].tolist() == [IGNORE, IGNORE]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4]


# --- isolation: a packed example computes exactly what it computes alone -----------------------------


@pytest.fixture(scope="module")
def model():
    m = build_model(VOCAB).eval()
    assert m.config._attn_implementation == "sdpa"
    return m


def _alone(model, example):
    with torch.no_grad():
        return model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0]


def _packed_row(examples):
    """One row holding `examples` in order, as pack_examples lays them out."""
    return {
        "input_ids": [t for e in examples for t in e["input_ids"]],
        "labels": [t for e in examples for t in e["labels"]],
        "position_ids": [p for e in examples for p in range(len(e["input_ids"]))],
    }


def _forward(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


def test_packed_row_logits_equal_each_example_alone(model):
    examples = _examples([11, 23, 6], seed=1)
    batch = collate_rows([_packed_row(examples)], pad_id=PAD)
    assert "attention_mask" not in batch
    logits = _forward(model, batch)[0]
    start = 0
    for example in examples:
        n = len(example["input_ids"])
        torch.testing.assert_close(logits[start : start + n], _alone(model, example), atol=1e-5, rtol=0)
        start += n
    # The check has teeth: without restarting positions the later examples do see the earlier ones.
    flat = model(input_ids=batch["input_ids"], use_cache=False).logits[0].detach()
    assert (flat[11:34] - _alone(model, examples[1])).abs().max() > 1e-3


def test_batch_of_two_packed_rows_of_different_lengths(model):
    first, second = _examples([9, 17, 4], seed=2), _examples([13, 5], seed=3)
    batch = collate_rows([_packed_row(first), _packed_row(second)], pad_id=PAD)
    assert batch["input_ids"].shape == (2, 30)
    assert batch["input_ids"][1, 18:].eq(PAD).all()  # the shorter row is padded on the right
    logits = _forward(model, batch)
    for row, examples in enumerate((first, second)):
        start = 0
        for example in examples:
            n = len(example["input_ids"])
            torch.testing.assert_close(logits[row, start : start + n], _alone(model, example), atol=1e-5, rtol=0)
            start += n


def test_pack_examples_output_is_isolated_too(model):
    examples = _examples([20, 7, 13, 3, 9, 14], seed=4)
    rows = pack_examples(examples, 32)
    assert len(rows) < len(examples)
    batch = collate_rows(rows, pad_id=PAD)
    logits = _forward(model, batch)
    by_ids = {tuple(e["input_ids"]): e for e in examples}
    seen = 0
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            example = by_ids[tuple(row["input_ids"][a:b])]
            torch.testing.assert_close(logits[r, a:b], _alone(model, example), atol=1e-5, rtol=0)
            seen += 1
    assert seen == len(examples)


def _alone_logprobs(model, example):
    batch = collate_rows(unpacked_rows([example]), pad_id=PAD)
    with torch.no_grad():
        logps, mask = label_logprobs(model, batch["input_ids"], batch["position_ids"], batch["labels"])
    return logps[0], mask[0]


def test_label_logprobs_packed_equal_alone(model):
    first, second = _examples([12, 25, 7], seed=5), _examples([19, 8], seed=6)
    batch = collate_rows([_packed_row(first), _packed_row(second)], pad_id=PAD)
    with torch.no_grad():
        logps, mask = label_logprobs(model, batch["input_ids"], batch["position_ids"], batch["labels"])
    assert logps.shape == mask.shape == (2, 43)
    for row, examples in enumerate((first, second)):
        start = 0
        for example in examples:
            n = len(example["input_ids"])
            alone_logps, alone_mask = _alone_logprobs(model, example)
            # logps[t] scores token t+1; the slice of an example stops before its last token scores the next example.
            torch.testing.assert_close(logps[row, start : start + n - 1], alone_logps, atol=1e-5, rtol=0)
            assert mask[row, start : start + n - 1].tolist() == alone_mask.tolist()
            assert alone_mask.sum() == sum(label != IGNORE for label in example["labels"])
            start += n
        # The token before each example start scores that example's first token, which has no label.
        boundaries = [sum(len(e["input_ids"]) for e in examples[: k + 1]) - 1 for k in range(len(examples) - 1)]
        assert all(not mask[row, b] and logps[row, b] == 0 for b in boundaries)
    assert not mask[1, 27:].any() and logps[1, 27:].eq(0).all()  # padding carries nothing
    assert torch.isfinite(logps).all()


def test_label_logprobs_match_a_plain_log_softmax(model):
    example = _examples([15], seed=7)[0]
    logps, mask = _alone_logprobs(model, example)
    logits = _alone(model, example)
    reference = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(example["input_ids"][1:])[:, None])[:, 0]
    expected_mask = torch.tensor([label != IGNORE for label in example["labels"][1:]])
    assert mask.tolist() == expected_mask.tolist()
    torch.testing.assert_close(logps, reference * expected_mask, atol=1e-5, rtol=0)
