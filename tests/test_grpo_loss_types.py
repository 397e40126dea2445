"""`rlkit grpo` trains with every loss type and reward aggregation beyond the clipped objective.

The losses themselves are checked against hand computations in test_losses_grpo.py; here each
one runs a tiny rollout with --num-iterations 2 (so the second update's ratio is not 1 and the
surrogate's gate or clip is exercised) and must finish with a finite loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import DEMO_DATA, run_cli

PROMPTS = DEMO_DATA / "grpo_prompts.jsonl"
TESTS = Path(__file__).parent


def _run(model_dir: Path, out: Path, *flags: str):
    return run_cli(
        "grpo",
        str(model_dir),
        str(PROMPTS),
        "-o",
        str(out),
        "--reward",
        "test_grpo:letters",
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--num-generations",
        "4",
        "--max-new-tokens",
        "4",
        "--num-iterations",
        "2",
        "--sample-every",
        "0",
        "--precision",
        "fp32",
        *flags,
        env={"PYTHONPATH": str(TESTS)},
    )


@pytest.mark.parametrize(
    "flags",
    [
        ("--loss-type", "cispo", "--epsilon-high", "5.0"),
        ("--loss-type", "sapo"),
        ("--loss-type", "luspo", "--importance-sampling", "sequence"),
        (
            "--reward",
            "test_grpo:short",
            "--reward-weights",
            "1,0.5",
            "--multi-objective-aggregation",
            "normalize_then_sum",
        ),
    ],
    ids=["cispo", "sapo", "luspo", "normalize_then_sum"],
)
def test_each_variant_trains(tiny_model_dir, tmp_path, flags):
    out = tmp_path / "grpo"
    result = _run(tiny_model_dir, out, *flags)
    assert result.returncode == 0, result.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(math.isfinite(v) for v in losses)


def test_cispo_without_its_bound_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "grpo"
    result = _run(tiny_model_dir, out, "--loss-type", "cispo")
    assert result.returncode == 2, result.stderr
    assert "--epsilon-high" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr
    assert not out.exists()


def test_bad_sapo_temperature_and_aggregation_are_refused(tiny_model_dir, tmp_path):
    result = _run(tiny_model_dir, tmp_path / "a", "--loss-type", "sapo", "--sapo-temperature-neg", "0")
    assert result.returncode == 2 and "--sapo-temperature-neg" in result.stderr
    result = _run(tiny_model_dir, tmp_path / "b", "--multi-objective-aggregation", "mean")
    assert result.returncode == 2 and "normalize_then_sum" in result.stderr
