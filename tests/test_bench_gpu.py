"""bench/gpu.py (`make bench-gpu`): its CPU dry run, and the FLOP and MFU arithmetic every bench shares."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

from common import gpu_peak_flops, matmul_peak_flops, mfu, model_flops_per_token  # noqa: E402


def test_model_flops_follow_palm_accounting():
    # 6N to train, 4N with LoRA (no weight gradients of the frozen base), 2N forward only
    assert model_flops_per_token(1000, layers=2, hidden=8, context=16) == 6000 + 12 * 2 * 8 * 16
    assert model_flops_per_token(1000, layers=2, hidden=8, context=16, lora=True) == 4000 + 12 * 2 * 8 * 16
    assert model_flops_per_token(1000, layers=2, hidden=8, context=16, train=False) == 2000 + 4 * 2 * 8 * 16
    assert mfu(100.0, 1e9, 1e12) == pytest.approx(0.1)
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert gpu_peak_flops("a CPU") is None
    assert matmul_peak_flops("cpu", "fp32", size=128, seconds=0.05) > 1e6


def test_cpu_dry_run_of_the_gpu_bench(tmp_path):
    """The command `make bench-gpu` runs, on the CPU with the tiny model: every trainer, one step,
    rlkit only (no TRL venv is built in a test)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--models", "tiny", "--steps", "1"]
        + ["--no-trl", "--no-doc", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| tiny |")]
    assert [line.split("|")[2].strip() for line in table] == ["sft", "dpo", "ppo", "grpo"], done.stdout
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[3].replace(",", "")) > 0, line  # tokens/s
        assert cells[5].endswith("%") and float(cells[5].split("%")[0]) > 0, line  # MFU
    assert "matmul peak measured in the same run" in done.stdout
    assert "TRL not run (--no-trl)" in done.stdout
