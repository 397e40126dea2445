"""The shared engine: exact resume after SIGTERM, and 2-process runs that match 1-process runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from equivalence import LINEAR_ADAM, assert_same_metrics
from safetensors.torch import load_file

from rlkit.training.schedule import lr_multiplier

SFT_DATA = REPO / "rlkit" / "demo" / "data" / "sft.jsonl"
COMMON = ["--batch-size", "2", "--max-length", "128", "--lr", "1e-3", "--log-every", "1000"]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(out / name)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigterm_is_bit_identical(tiny_model_dir, tmp_path):
    steps = "60"
    reference = tmp_path / "reference"
    done = run_cli("sft", str(tiny_model_dir), str(SFT_DATA), "-o", str(reference), "--max-steps", steps, *COMMON)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "interrupted"
    partial = tmp_path / "interrupted.partial"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rlkit",
            "sft",
            str(tiny_model_dir),
            str(SFT_DATA),
            "-o",
            str(out),
            "--max-steps",
            steps,
            *COMMON,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # one thread, as the reference and the resumed run
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = partial / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    assert "interrupted at step" in stderr and "--resume" in stderr
    assert not out.exists()
    checkpoints = list((partial / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 10 <= stopped_at < int(steps)

    refused = run_cli("sft", str(tiny_model_dir), str(SFT_DATA), "-o", str(out), "--max-steps", steps, *COMMON)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = run_cli(
        "sft", str(tiny_model_dir), str(SFT_DATA), "-o", str(out), "--max-steps", steps, "--resume", *COMMON
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {stopped_at}" in resumed.stderr
    expected, got = _weights(reference), _weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    losses = {m["step"]: m["loss"] for m in _metrics(out) if "loss" in m}
    assert sorted(losses) == list(range(1, int(steps) + 1))
    assert losses == {m["step"]: m["loss"] for m in _metrics(reference) if "loss" in m}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one(tiny_model_dir, tmp_path):
    """Same global batch (2 x 2 rows vs 1 x 4 rows): the same losses, to 1e-5."""
    args = [
        str(tiny_model_dir),
        str(SFT_DATA),
        "--max-steps",
        "6",
        "--max-length",
        "128",
        "--lr",
        "1e-3",
        "--full",
        *LINEAR_ADAM,
    ]
    single = tmp_path / "single"
    one = run_cli("sft", *args, "-o", str(single), "--batch-size", "4")
    assert one.returncode == 0, one.stderr
    double = tmp_path / "double"
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "rlkit",
            "sft",
            *args,
            "-o",
            str(double),
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout.strip().splitlines() == [str(double)]  # only rank 0 prints the path
    a = [m for m in _metrics(single) if "loss" in m]
    b = [m for m in _metrics(double) if "loss" in m]
    assert len(a) == len(b) == 6
    assert_same_metrics(a, b, ("loss", "grad_norm"), terms=4 * 128)  # 4 rows of up to 128 tokens


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedules_warm_up_then_follow_their_shape(kind):
    f = lr_multiplier(kind, total_steps=100, warmup=10)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0)
    if kind == "constant":
        assert f(99) == 1.0
    else:
        assert f(55) == pytest.approx(0.5, abs=0.02)
        assert f(99) < 0.05


def test_gradient_accumulation_matches_a_bigger_batch(tiny_model_dir, tmp_path):
    """Loss normalised by the trainable tokens of the whole accumulated step: 1x4 == 2x2 accumulated."""
    args = [
        str(tiny_model_dir),
        str(SFT_DATA),
        "--max-steps",
        "4",
        "--max-length",
        "128",
        "--lr",
        "1e-3",
        "--full",
        *LINEAR_ADAM,
    ]
    big, accumulated = tmp_path / "big", tmp_path / "accumulated"
    assert run_cli("sft", *args, "-o", str(big), "--batch-size", "4").returncode == 0
    assert run_cli("sft", *args, "-o", str(accumulated), "--batch-size", "2", "--grad-accum", "2").returncode == 0
    assert_same_metrics(_metrics(big), _metrics(accumulated), ("loss", "grad_norm"), terms=4 * 128)


def test_backward_runs_outside_autocast(tiny_model_dir, tmp_path):
    """Autocast keeps a low-precision copy of every weight it cast until its context exits; a
    backward inside it (with gradient checkpointing, where nothing else holds those copies)
    carries them on top of the full gradients, at the run's memory peak. In a fresh process:
    accelerate's state is a per-process singleton, and this run needs bf16."""
    script = tmp_path / "watch.py"
    script.write_text(f"""
import json, torch
from rlkit.recipes.sft import SFTConfig, SFTObjective, run_sft
seen, loss = [], SFTObjective.loss
def watched(self, model, batch):
    out = loss(self, model, batch)
    out.loss.register_hook(lambda grad: seen.append(torch.is_autocast_enabled("cpu")))
    return out
SFTObjective.loss = watched
run_sft(SFTConfig(model={str(tiny_model_dir)!r}, data=[{str(SFT_DATA)!r}], output={str(tmp_path / "out")!r}, max_steps=2,
                  batch_size=2, max_length=128, precision="bf16", lora=False, gradient_checkpointing=True, log_every=1000))
print(json.dumps(seen))
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [False, False]


def test_freed_host_memory_is_released_after_each_forward_and_between_micro_batches(tiny_model_dir, tmp_path):
    """On the CPU the engine trims glibc's heap where a phase's tensors have just died: after each
    micro-batch's forward (before the backward allocates the gradients), and after a backward that
    another micro-batch's forward follows."""
    script = tmp_path / "watch.py"
    script.write_text(f"""
import json
import rlkit.training.engine as engine
from rlkit.recipes.sft import SFTConfig, run_sft
seen = []
engine.release_freed_host_memory = lambda device: seen.append(device.type)
run_sft(SFTConfig(model={str(tiny_model_dir)!r}, data=[{str(SFT_DATA)!r}], output={str(tmp_path / "out")!r}, max_steps=2,
                  batch_size=1, grad_accum=2, max_length=128, lora=False, log_every=1000))
print(json.dumps(seen))
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert (
        json.loads(done.stdout.strip().splitlines()[-1]) == ["cpu"] * 6
    )  # 2 steps x (2 forwards + 1 backward between them)


def _sft(tiny_model_dir: Path, out: Path, **options) -> Path:
    """4 steps of sft in this process, with checkpoints after steps 1, 2, 3 (the last 2 kept); one thread,
    so that runs compare bit for bit."""
    from rlkit.recipes.sft import SFTConfig, run_sft

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_sft(
            SFTConfig(
                model=str(tiny_model_dir),
                data=[str(SFT_DATA)],
                output=str(out),
                max_steps=4,
                save_every=1,
                batch_size=2,
                max_length=128,
                lr=1e-3,
                log_every=1000,
                **options,
            )
        )
    finally:
        torch.set_num_threads(threads)


def _interrupted_sft(tiny_model_dir: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`_sft` crashed before writing OUT: OUT.partial holds the checkpoints of steps 2 and 3."""
    import rlkit.training.run as run_module
    from rlkit.errors import RunError

    def crash(*args, **kwargs):
        raise RunError("simulated crash before the output was written")

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "finalize", crash)
        with pytest.raises(RunError):
            _sft(tiny_model_dir, out)
    partial = out.with_name(out.name + ".partial")
    assert [p.name for p in sorted((partial / "checkpoints").iterdir())] == ["step-0000002", "step-0000003"]
    return partial


def _truncate(checkpoint: Path) -> None:
    for f in checkpoint.iterdir():
        if f.name.endswith((".bin", ".safetensors")):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_resume_skips_a_torn_checkpoint_and_refuses_when_none_is_good(tiny_model_dir, tmp_path, monkeypatch, capsys):
    whole = _sft(tiny_model_dir, tmp_path / "whole")

    out = tmp_path / "torn"
    partial = _interrupted_sft(tiny_model_dir, out, monkeypatch)
    all_torn = tmp_path / "all-torn"
    shutil.copytree(partial, all_torn.with_name("all-torn.partial"))
    newest = partial / "checkpoints" / "step-0000003"
    _truncate(newest)
    (partial / "checkpoints" / "step-0000004.incomplete").mkdir()  # what a kill during the next save leaves
    capsys.readouterr()
    _sft(tiny_model_dir, out, resume=True)
    stderr = capsys.readouterr().err
    assert f"skipping checkpoint {newest}" in stderr
    assert "step-0000004.incomplete: an incomplete checkpoint" in stderr
    assert "step-0000002 (step 2)" in stderr
    expected, got = _weights(whole), _weights(out)
    for name in expected:  # resumed from step 2: the same result as the run that was never interrupted
        assert torch.equal(expected[name], got[name]), name

    out, partial = all_torn, all_torn.with_name("all-torn.partial")
    for checkpoint in (partial / "checkpoints").iterdir():
        _truncate(checkpoint)
    args = [str(tiny_model_dir), str(SFT_DATA), "-o", str(out), "--max-steps", "4", "--resume", *COMMON]
    refused = run_cli("sft", *args)
    assert refused.returncode == 1, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "none of the 2 checkpoints" in errors[0] and "--overwrite" in errors[0], refused.stderr
    assert "Traceback" not in refused.stderr and "Aborted" not in refused.stderr
    assert not out.exists() and partial.is_dir()  # the checkpoints stay for the user to inspect


def test_a_save_writes_beside_the_final_name_and_renames(tiny_model_dir, tmp_path, monkeypatch):
    """While accelerate writes, the checkpoint's final name does not exist; afterwards only it does."""
    from accelerate import Accelerator

    seen = []
    real_save = Accelerator.save_state

    def watch(self, output_dir, **kwargs):
        final = Path(output_dir).with_name(Path(output_dir).name.removesuffix(".incomplete"))
        seen.append((Path(output_dir).name, final.exists()))
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", watch)
    partial = _interrupted_sft(tiny_model_dir, tmp_path / "out", monkeypatch)
    assert seen == [(f"step-000000{i}.incomplete", False) for i in (1, 2, 3)]
    assert not list((partial / "checkpoints").glob("*.incomplete"))


def test_input_errors_leave_no_run_dir(tiny_model_dir, tmp_path, monkeypatch):
    # refused before the run dir is opened: too few rows for one global batch
    out = tmp_path / "few"
    done = run_cli("sft", str(tiny_model_dir), str(SFT_DATA), "-o", str(out), "--batch-size", "400", *COMMON[2:])
    assert done.returncode == 2 and "fewer than one global batch" in done.stderr, done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == done.stderr.strip().splitlines()[
        -1:
    ]
    assert not out.exists() and not out.with_name("few.partial").exists()

    # raised once the run dir exists (here from inside the engine): the dir this run made is removed,
    # a resumed run's dir is kept
    import rlkit.training.engine as engine
    from rlkit.errors import InputError
    from rlkit.recipes.sft import SFTConfig, run_sft

    def refuse(self, *args, **kwargs):
        assert self.run_dir.is_dir()
        raise InputError("refused by the engine")

    monkeypatch.setattr(engine.Engine, "fit", refuse)
    out = tmp_path / "inside"
    config = SFTConfig(model=str(tiny_model_dir), data=[str(SFT_DATA)], output=str(out), max_steps=1, max_length=128)
    with pytest.raises(InputError, match="refused by the engine"):
        run_sft(config)
    assert not out.exists() and not out.with_name("inside.partial").exists()
    kept = out.with_name("inside.partial")
    (kept / "checkpoints" / "step-0000001").mkdir(parents=True)
    config.resume = True
    with pytest.raises(InputError, match="refused by the engine"):
        run_sft(config)
    assert (kept / "checkpoints" / "step-0000001").is_dir()
