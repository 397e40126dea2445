"""training_curves.png: which panels a run's logged metrics call for, and that the PNG is written.

The panel selection is a pure function of the logged keys, so an RL run's panels (reward and each
reward function by name, KL, length, entropy, clip fractions, zero-variance groups) and a
supervised run's unchanged ones are checked without training or drawing anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlkit.training.plots import band, plot_training_curves, select_panels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Two reward functions with names the user picked (the set is open: nothing lists them in advance).
GRPO_KEYS = (
    "loss", "lr", "grad_norm", "tokens_per_s", "epoch", "clip_low", "clip_high", "clip_region", "ratio",
    "kl", "entropy", "grpo_step", "rewards/is_polite/mean", "rewards/is_polite/std",
    "rewards/cites_source_v2/mean", "rewards/cites_source_v2/std", "reward/mean", "reward/std",
    "frac_zero_variance_groups", "zero_variance_groups", "completion_length/mean",
    "completion_length/min", "completion_length/max", "frac_truncated", "time/generation_s",
)  # fmt: skip
SFT_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "epoch", "eval/loss")


def _write_metrics(path: Path, keys: tuple[str, ...], steps: int = 5) -> Path:
    """A metrics.jsonl whose every record logs `keys` (values vary by step so lines are visible)."""
    records = [{"step": s, **{k: math.sin(s + i) + 2 for i, k in enumerate(keys)}} for s in range(1, steps + 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _titles_and_keys(keys: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    return [(p.title, p.keys) for p in select_panels(keys)]


def test_grpo_panels_show_what_an_rl_user_watches():
    assert _titles_and_keys(GRPO_KEYS) == [
        ("loss", ("loss",)),
        ("reward", ("reward/mean",)),
        ("reward by function", ("rewards/is_polite/mean", "rewards/cites_source_v2/mean")),
        ("kl", ("kl",)),
        ("completion length", ("completion_length/mean",)),
        ("entropy", ("entropy",)),
        ("clip fractions", ("clip_low", "clip_high", "clip_region")),
        ("zero-variance groups (fraction)", ("frac_zero_variance_groups",)),
        ("lr", ("lr",)),
        ("grad_norm", ("grad_norm",)),
        ("tokens_per_s", ("tokens_per_s",)),
    ]
    by_function = next(p for p in select_panels(GRPO_KEYS) if p.title == "reward by function")
    assert by_function.labels == ("is_polite", "cites_source_v2")  # the legend names each function


def test_ppo_panels_include_value_clip_and_policy_value_losses():
    keys = ("loss", "policy_loss", "value_loss", "clipfrac", "approx_kl", "value_clipfrac", "entropy",
            "score/mean", "score/std", "kl", "rlhf_reward", "response_length", "ppo/clipfrac", "lr")  # fmt: skip
    panels = dict(_titles_and_keys(keys))
    assert panels["loss"] == ("loss", "policy_loss", "value_loss")
    assert panels["reward"] == ("score/mean", "rlhf_reward")
    assert panels["kl"] == ("kl", "approx_kl")
    assert panels["clip fractions"] == ("clipfrac", "value_clipfrac")  # ppo/clipfrac is their RL-step mean
    assert panels["completion length"] == ("response_length",)


def test_sft_and_dpo_panels_are_unchanged():
    assert _titles_and_keys(SFT_KEYS) == [
        ("loss", ("loss", "eval/loss")),
        ("lr", ("lr",)),
        ("grad_norm", ("grad_norm",)),
        ("tokens_per_s", ("tokens_per_s",)),
    ]
    dpo = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "lr")
    assert _titles_and_keys(dpo) == [
        ("loss", ("loss",)),
        ("rewards/accuracies", ("rewards/accuracies",)),
        ("rewards/margins", ("rewards/margins",)),
        ("rewards/chosen", ("rewards/chosen", "rewards/rejected")),
        ("lr", ("lr",)),
    ]


def test_band_prefers_min_max_then_std():
    series = {
        "completion_length/mean": [(1, 5.0), (2, 6.0)],
        "completion_length/min": [(1, 2.0), (2, 3.0)],
        "completion_length/max": [(1, 8.0), (2, 9.0)],
        "completion_length/std": [(1, 1.0), (2, 1.0)],
        "reward/mean": [(1, 0.5), (2, 0.7)],
        "reward/std": [(2, 0.1)],
        "kl": [(1, 0.1)],
    }
    assert band("completion_length/mean", series) == ("min-max", [1, 2], [2.0, 3.0], [8.0, 9.0])
    assert band("reward/mean", series) == ("± std", [2], [pytest.approx(0.6)], [pytest.approx(0.8)])
    assert band("kl", series) is None


@pytest.mark.parametrize("keys", [GRPO_KEYS, SFT_KEYS], ids=["grpo", "sft"])
def test_png_is_written(tmp_path, keys):
    pytest.importorskip("matplotlib")
    metrics = _write_metrics(tmp_path / "metrics.jsonl", keys)
    png = tmp_path / "training_curves.png"
    assert plot_training_curves(metrics, png, "rlkit test") == png
    assert png.read_bytes()[:8] == PNG_MAGIC
