"""FSDP2 on two gloo processes (`torchrun --nproc_per_node 2 -m rlkit sft ... --fsdp`): the sharding is
real, the final output is an ordinary HF dir equal to a one-process run's, checkpoints are sharded
and resume to the same weights, and merge-lora takes the LoRA output."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from equivalence import LINEAR_ADAM, assert_same_training, drift_bound, weights

REPO = Path(__file__).resolve().parents[1]
SFT_DATA = REPO / "rlkit" / "demo" / "data" / "sft.jsonl"
STEPS = 30  # long enough for the resume test's signal to land mid-run
#: every comparison here runs AdamW with a step linear in small gradients (tests/equivalence.py)
COMMON = ["--max-length", "128", "--precision", "fp32", "--lora-dropout", "0", *LINEAR_ADAM]
LR = {"--lora": 1e-1, "--full": 1e-2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    return [*launch, str(_free_port()), "-m", "rlkit", *args]


_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _two(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun(*args), capture_output=True, text=True, timeout=600, env=_ENV, cwd=REPO)


def _start(model_dir: Path, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the trained tensors started from: the base weights, or zero for LoRA's B matrices (peft's init)."""
    if all("lora_" in k for k in trained):
        return {k: torch.zeros_like(v) for k, v in trained.items() if "lora_B" in k}
    return weights(model_dir, "model.safetensors")


def _assert_sharded_in_half(stderr: str) -> None:
    """Both processes report holding half of the parameter elements (FSDP2 shards dim 0 evenly)."""
    held = re.findall(r"fsdp: process (\d) of 2 holds ([\d,]+) of ([\d,]+) parameter elements", stderr)
    assert sorted(p for p, _, _ in held) == ["0", "1"], stderr
    for _, local, total in held:
        local, total = int(local.replace(",", "")), int(total.replace(",", ""))
        assert abs(local - total / 2) <= 0.01 * total, (local, total)


def _sft(out: Path, mode: str, steps: int, batch: int, *extra: str) -> list[str]:
    return [
        "sft",
        *(str(x) for x in extra),
        str(SFT_DATA),
        "-o",
        str(out),
        "--max-steps",
        str(steps),
        "--batch-size",
        str(batch),
        "--lr",
        str(LR[mode]),
        mode,
        *COMMON,
    ]


@pytest.fixture(scope="module")
def full_runs(tiny_model_dir, tmp_path_factory):
    """One process accumulating two micro-batches of 2 and two FSDP processes of one each: the same
    global batch, micro-batches and seed. (One process at batch 4 would sum the same gradients in
    another order: more rounding to bound, no more to learn.)"""
    tmp = tmp_path_factory.mktemp("fsdp-full")
    one = run_cli(*_sft(tmp / "one", "--full", STEPS, 2, tiny_model_dir), "--grad-accum", "2")
    assert one.returncode == 0, one.stderr
    two = _two(*_sft(tmp / "two", "--full", STEPS, 2, tiny_model_dir), "--fsdp")
    assert two.returncode == 0, two.stderr
    return tmp, two


def test_full_fine_tuning_two_fsdp_processes_equal_one(full_runs, tiny_model_dir):
    tmp, two = full_runs
    _assert_sharded_in_half(two.stderr)
    assert two.stdout.strip().splitlines() == [str(tmp / "two")]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (tmp / "two").iterdir()}
    assert not (tmp / "two" / "checkpoints").exists()
    saved = weights(tmp / "two")
    assert_same_training(weights(tmp / "one"), saved, drift_bound(LR["--full"], STEPS), _start(tiny_model_dir, saved))
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp / "two")  # this process never saw the training
    for name, param in loaded.state_dict().items():
        if name in saved:
            assert torch.equal(param, saved[name]), name


def test_lora_with_checkpointing_two_fsdp_processes_equal_one_and_merge(tiny_model_dir, tmp_path):
    one = run_cli(*_sft(tmp_path / "one", "--lora", 4, 2, tiny_model_dir), "--grad-accum", "2")
    assert one.returncode == 0, one.stderr
    two = _two(*_sft(tmp_path / "two", "--lora", 4, 2, tiny_model_dir), "--fsdp", "--gradient-checkpointing")
    assert two.returncode == 0, two.stderr
    _assert_sharded_in_half(two.stderr)
    adapter = weights(tmp_path / "two")
    assert adapter and all("lora_" in k for k in adapter)  # the adapter only, no base weights
    bound = drift_bound(LR["--lora"], 4)
    assert_same_training(weights(tmp_path / "one"), adapter, bound, _start(tiny_model_dir, adapter))

    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(tmp_path / "two")
    merged = run_cli("merge-lora", str(tmp_path / "two"), "-o", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    reference = run_cli("merge-lora", str(tmp_path / "one"), "-o", str(tmp_path / "merged-one"))
    assert reference.returncode == 0, reference.stderr
    # merging multiplies B by A (entries below 1) and adds it to the base: the bound carries over
    assert_same_training(weights(tmp_path / "merged-one"), weights(tmp_path / "merged"), bound)


def _sharded_chunks(checkpoint: Path) -> dict[str, list[tuple[int, ...]]]:
    """Each model tensor's chunk sizes as the distributed checkpoint stores them."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint / "sharded")).read_metadata()
    chunks: dict[str, list[tuple[int, ...]]] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("model.") and hasattr(meta, "chunks"):
            chunks[key] = [tuple(c.sizes) for c in meta.chunks]
    return chunks


def test_resume_from_a_sharded_checkpoint_reaches_the_uninterrupted_weights(full_runs, tiny_model_dir, tmp_path):
    """SIGTERM the launcher mid-run: both processes write their shard of a checkpoint, and --resume
    from it ends with the weights of the uninterrupted two-process run."""
    reference_dir, _ = full_runs
    args = _sft(tmp_path / "out", "--full", STEPS, 2, tiny_model_dir)
    partial = tmp_path / "out.partial"
    proc = subprocess.Popen(
        [*_torchrun(*args), "--fsdp"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_ENV,
        cwd=REPO,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = partial / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 1:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    checkpoints = sorted((partial / "checkpoints").glob("step-*"))
    if proc.returncode == 0:
        pytest.fail("the run finished before the signal reached it")
    assert "interrupted at step" in stderr, stderr
    assert len(checkpoints) == 1, stderr
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 1 <= stopped_at < STEPS
    shard_files = sorted(p.name for p in (checkpoints[0] / "sharded").glob("*.distcp"))
    assert len(shard_files) == 2  # one per process
    chunks = _sharded_chunks(checkpoint=checkpoints[0])
    matrices = {k: v for k, v in chunks.items() if len(v[0]) == 2}
    assert matrices
    for name, sizes in matrices.items():  # every matrix split in two halves along its rows
        assert len(sizes) == 2 and sizes[0] == sizes[1], (name, sizes)

    resumed = _two(*args, "--fsdp", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {stopped_at}" in resumed.stderr
    # the same processes and kernels before and after the interruption: no drift is allowed for
    assert_same_training(weights(reference_dir / "two"), weights(tmp_path / "out"), bound=0.0)
    losses = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(m["step"] for m in losses if "loss" in m) == list(range(1, STEPS + 1))


# ---- dpo, kto and train-rm ------------------------------------------------------------------

DEMO = REPO / "rlkit" / "demo" / "data"
PREFERENCE_STEPS = 3

#: (command, data, --full/--lora, extra flags): each reference strategy that holds a model under
#: FSDP (a frozen copy of the start, sharded like the policy; the base with the adapter disabled),
#: the precomputed one, and gradient checkpointing in each trainer. Two cases run in the fast suite
#: (the sharded frozen copy, and train-rm's merged score head; about 45 s each on 2 loaded cores); four are marked slow.
PREFERENCE_CASES = {
    "dpo-full-frozen-copy": (
        "dpo",
        DEMO / "pairs.jsonl",
        "--full",
        ("--no-precompute-ref", "--gradient-checkpointing"),
    ),
    "dpo-lora-adapter-disabled": ("dpo", DEMO / "pairs.jsonl", "--lora", ("--no-precompute-ref",)),
    "kto-full-precomputed": ("kto", DEMO / "unpaired.jsonl", "--full", ()),
    "kto-lora-adapter-disabled": (
        "kto",
        DEMO / "unpaired.jsonl",
        "--lora",
        ("--no-precompute-ref", "--gradient-checkpointing"),
    ),
    "train-rm-full": ("train-rm", DEMO / "pairs.jsonl", "--full", ()),
    "train-rm-lora-merged": ("train-rm", DEMO / "pairs.jsonl", "--lora", ("--gradient-checkpointing",)),
}
SLOW_CASES = {"dpo-lora-adapter-disabled", "kto-full-precomputed", "kto-lora-adapter-disabled", "train-rm-full"}


def _preference(
    command: str, model: Path, data: Path, out: Path, mode: str, batch: int, grad_accum: int, *extra: str
) -> list[str]:
    steps = ["--max-steps", str(PREFERENCE_STEPS), "--batch-size", str(batch), "--grad-accum", str(grad_accum)]
    return [command, str(model), str(data), "-o", str(out), *steps, "--lr", str(LR[mode]), mode, *COMMON, *extra]


def _loads_as_saved(directory: Path, command: str) -> None:
    """`from_pretrained` in this process (which never trained) gives back exactly the saved tensors."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    saved = weights(directory)
    if (directory / "adapter_model.safetensors").exists():
        from peft import AutoPeftModelForCausalLM

        loaded = AutoPeftModelForCausalLM.from_pretrained(directory)
        state = {k.replace(".default", ""): v for k, v in loaded.state_dict().items()}
        assert all(torch.equal(state[k], v) for k, v in saved.items())
        return
    auto = AutoModelForSequenceClassification if command == "train-rm" else AutoModelForCausalLM
    loaded = auto.from_pretrained(directory)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    if command == "train-rm":  # the score head is in the dir and is what from_pretrained loads
        assert "score.weight" in saved and loaded.config.num_labels == 1
        assert torch.equal(loaded.score.weight, saved["score.weight"])


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in PREFERENCE_CASES]
)
def test_preference_trainers_two_fsdp_processes_equal_one(case, tiny_model_dir, tmp_path):
    """One process and two FSDP processes of one micro-batch of 2 each, at the same global batch,
    seed and micro-batches, end with the same weights (within tests/equivalence.py's derived bound),
    and the two-process output is an ordinary HF dir.

    The one-process run accumulates two micro-batches of 2 (one micro-batch of 4 sums the same
    gradient in another order). KTO's is one micro-batch of 4: its reference point z0 is a mean over
    the micro-batch of every process at once (an accumulated micro-batch has its own), so that is
    what two processes of 2 compute.
    """
    command, data, mode, extra = PREFERENCE_CASES[case]
    batch, accum = (4, 1) if command == "kto" else (2, 2)
    one = run_cli(*_preference(command, tiny_model_dir, data, tmp_path / "one", mode, batch, accum, *extra))
    assert one.returncode == 0, one.stderr
    two = _two(*_preference(command, tiny_model_dir, data, tmp_path / "two", mode, 2, 1, *extra, "--fsdp"))
    assert two.returncode == 0, two.stderr
    _assert_sharded_in_half(two.stderr)
    if "frozen-copy" in case:  # the reference copy is sharded too: half of it on each process
        held = re.findall(r"fsdp: reference on process (\d) of 2 holds ([\d,]+) of ([\d,]+)", two.stderr)
        assert sorted(p for p, _, _ in held) == ["0", "1"], two.stderr
        assert all(
            abs(2 * int(a.replace(",", "")) - int(b.replace(",", ""))) <= 0.02 * int(b.replace(",", ""))
            for _, a, b in held
        )
    assert two.stdout.strip().splitlines() == [str(tmp_path / "two")]
    assert not (tmp_path / "two" / "checkpoints").exists()
    trained = weights(tmp_path / "two")
    bound = drift_bound(LR[mode], PREFERENCE_STEPS)
    worst = assert_same_training(weights(tmp_path / "one"), trained, bound, _start(tiny_model_dir, trained))
    print(f"{case}: max |1 process - 2 FSDP processes| = {worst:.2e}")
    _loads_as_saved(tmp_path / "two", command)
