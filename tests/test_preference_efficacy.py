"""Efficacy on the demo task (rlkit/demo): chosen answers have the format, rejected ones lack it.

DPO, after a short SFT of the tiny model, must take held-out implicit-reward accuracy from
about 50% (at step 0 the policy is the reference, so every implicit reward is zero) to over
90%; a reward model must rank over 95% of the held-out pairs right. Held-out pairs are
`pairs_eval.jsonl`, whose prompts never occur in the training files.
"""

from __future__ import annotations

import json

from conftest import DEMO_DATA, run_cli


def rlkit(*args: str, env: dict | None = None):
    """`rlkit ...` in a subprocess, one intra-op thread: tiny models gain nothing from more, and on
    a shared CPU, spinning OpenMP threads of parallel test runs slow each other down ~20x."""
    return run_cli(*args, env={"OMP_NUM_THREADS": "1", **(env or {})})


def _final(out):
    return json.loads((out / "final_metrics.json").read_text())


def test_dpo_after_sft_lifts_held_out_preference_accuracy(tiny_model_dir, tmp_path):
    sft = tmp_path / "sft"
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
    out = tmp_path / "dpo"
    result = rlkit(
        "dpo",
        str(sft),
        str(DEMO_DATA / "pairs.jsonl"),
        "-o",
        str(out),
        "--eval-data",
        str(DEMO_DATA / "pairs_eval.jsonl"),
        "--lr",
        "4e-3",
        "--epochs",
        "1",
        "--batch-size",
        "8",
    )
    assert result.returncode == 0, result.stderr
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["rewards/accuracies"]
    after = _final(out)["eval/rewards/accuracies"]
    print(f"DPO implicit-reward accuracy: step 1 {first:.3f} (train batch), held-out after {after:.3f}")
    assert abs(first - 0.5) <= 0.25
    assert after > 0.9


def test_reward_model_ranks_held_out_pairs(tiny_model_dir, tmp_path):
    out = tmp_path / "rm"
    result = rlkit(
        "train-rm",
        str(tiny_model_dir),
        str(DEMO_DATA / "pairs.jsonl"),
        "-o",
        str(out),
        "--eval-data",
        str(DEMO_DATA / "pairs_eval.jsonl"),
        "--lr",
        "3e-3",
        "--epochs",
        "1",
        "--batch-size",
        "8",
    )
    assert result.returncode == 0, result.stderr
    accuracy = _final(out)["eval/accuracy"]
    print(f"reward model held-out pair accuracy: {accuracy:.3f}")
    assert accuracy > 0.95
