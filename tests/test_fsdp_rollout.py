"""`rlkit ppo` and `rlkit grpo` under `--fsdp` on two gloo processes: the rollout (generation with the
KV cache and merged LoRA weights, the rollout-time forward, the reference) runs on the gathered
model, the updates on the shards; the output is an ordinary HF dir (PPO's value head beside the
policy) equal to a one-process run with the same global batch and seed."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA, REPO, run_cli
from equivalence import LINEAR_ADAM, assert_same_training, drift_bound, weights
from safetensors.torch import load_file

TESTS = Path(__file__).parent
#: learning rates under LINEAR_ADAM (eps 1: a step of about lr x the gradient) that move the weights far past the drift bound
FULL_LR, LORA_LR = "1e-2", "1e-1"
ENV = {"PYTHONPATH": str(TESTS)}


def letters(prompts: list, completions: list[str], **columns) -> list[float]:
    """The share of ASCII letters and spaces: a random tiny model starts well below 1."""
    return [sum(ch.isascii() and (ch.isalpha() or ch == " ") for ch in c) / max(len(c), 1) for c in completions]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two(*args: str) -> subprocess.CompletedProcess:
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **ENV}
    return subprocess.run(
        [*launch, "-m", "rlkit", *args], capture_output=True, text=True, timeout=600, env=env, cwd=REPO
    )


def _one_and_two(tmp: Path, args: list[str], batch_one: int, batch_two: int) -> tuple[Path, Path]:
    """One process at `batch_one` and two FSDP processes at `batch_two` (the same global batch)."""
    one, two = tmp / "one", tmp / "two"
    result = run_cli(*args, "-o", str(one), "--batch-size", str(batch_one), env=ENV)
    assert result.returncode == 0, result.stderr
    result = _two(*args, "-o", str(two), "--batch-size", str(batch_two), "--fsdp")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [str(two)]
    held = re.findall(r"fsdp: process (\d) of 2 holds ([\d,]+) of ([\d,]+) parameter elements", result.stderr)
    assert sorted(p for p, _, _ in held) == ["0", "1"], result.stderr
    for _, local, total in held:  # the policy really is split in two
        local, total = int(local.replace(",", "")), int(total.replace(",", ""))
        assert abs(local - total / 2) <= 0.01 * total, (local, total)
    assert not (two / "checkpoints").exists()
    return one, two


def _assert_close(one: Path, two: Path, name: str, lr: str, start: dict[str, torch.Tensor] | None = None) -> None:
    """The two runs' `name` agree within tests/equivalence.py's bound for the optimizer updates the
    one-process run logged, having moved from `start` (the base weights; zeros for LoRA's B matrices
    and the value head, which start there) by far more than that bound."""
    a, b = weights(one, name), weights(two, name)
    if start is None:
        start = {k: torch.zeros_like(v) for k, v in b.items() if "lora_A" not in k}
    updates = sum("loss" in json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines())
    assert_same_training(a, b, drift_bound(float(lr), updates), start)


def _assert_full_model_loads(directory: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(directory)  # this process never saw the training
    saved = load_file(str(directory / "model.safetensors"))
    for name, param in loaded.state_dict().items():
        if name in saved:
            assert torch.equal(param, saved[name]), name


def _assert_adapter_loads(directory: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    saved = load_file(str(directory / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # the adapter only, no base weights
    AutoPeftModelForCausalLM.from_pretrained(directory)


def _ppo(model_dir: Path, mode: str, lr: str) -> list[str]:
    # greedy: PPO samples from the running generator, which two processes do not share
    return [
        "ppo",
        str(model_dir),
        str(DEMO_DATA / "prompts.jsonl"),
        "--reward",
        "test_fsdp_rollout:letters",
        "--max-steps",
        "2",
        "--max-new-tokens",
        "6",
        "--ppo-epochs",
        "2",
        "--temperature",
        "0",
        "--sample-every",
        "0",
        "--precision",
        "fp32",
        "--lora-dropout",
        "0",
        "--lr",
        lr,
        mode,
        *LINEAR_ADAM,
    ]


def _grpo(model_dir: Path, mode: str, lr: str, *extra: str) -> list[str]:
    # the same sampling chunks whether a process holds 8 rows or 4: two processes sample what one does
    return [
        "grpo",
        str(model_dir),
        str(DEMO_DATA / "grpo_prompts.jsonl"),
        "--reward",
        "test_fsdp_rollout:letters",
        "--max-steps",
        "2",
        "--grad-accum",
        "2",
        "--num-generations",
        "4",
        "--generation-batch-size",
        "4",
        "--max-new-tokens",
        "8",
        "--beta",
        "0.1",
        "--sample-every",
        "0",
        "--precision",
        "fp32",
        "--lora-dropout",
        "0",
        "--lr",
        lr,
        mode,
        *LINEAR_ADAM,
        *extra,
    ]


def test_ppo_full_with_its_value_head(tiny_model_dir, tmp_path):
    one, two = _one_and_two(tmp_path, _ppo(tiny_model_dir, "--full", FULL_LR), 4, 2)
    _assert_close(one, two, "model.safetensors", FULL_LR, load_file(str(tiny_model_dir / "model.safetensors")))
    _assert_close(one, two, "value_head.safetensors", FULL_LR)
    _assert_full_model_loads(two)
    from transformers import AutoModelForCausalLM

    from rlkit.recipes.ppo import VALUE_HEAD_FILE, make_value_head

    head = make_value_head(AutoModelForCausalLM.from_pretrained(two), [str(two)])  # what a continued run starts from
    saved = load_file(str(two / VALUE_HEAD_FILE))
    assert float(saved["weight"].abs().max()) > 0  # trained, not the zero initialisation
    assert torch.equal(head.weight.detach(), saved["weight"]) and torch.equal(head.bias.detach(), saved["bias"])


def test_ppo_lora(tiny_model_dir, tmp_path):
    one, two = _one_and_two(tmp_path, _ppo(tiny_model_dir, "--lora", LORA_LR), 4, 2)
    _assert_close(one, two, "adapter_model.safetensors", LORA_LR)
    _assert_close(one, two, "value_head.safetensors", LORA_LR)
    _assert_adapter_loads(two)


@pytest.mark.parametrize(
    "mode, lr, extra",
    [("--lora", LORA_LR, ()), ("--full", FULL_LR, ("--num-iterations", "2"))],
    ids=["lora", "full-two-iterations"],
)
def test_grpo(tiny_model_dir, tmp_path, mode, lr, extra):
    one, two = _one_and_two(tmp_path, _grpo(tiny_model_dir, mode, lr, *extra), 4, 2)
    if mode == "--full":
        _assert_close(one, two, "model.safetensors", lr, load_file(str(tiny_model_dir / "model.safetensors")))
        _assert_full_model_loads(two)
    else:
        _assert_close(one, two, "adapter_model.safetensors", lr)
        _assert_adapter_loads(two)
    assert not (two / "value_head.safetensors").exists()  # critic-free
