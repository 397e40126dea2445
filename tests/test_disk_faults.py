"""A full, read-only or failing disk ends a run with one line and leaves no OUT that looks complete.

Real faults where the kernel can make them: a small tmpfs that the run fills (the final save, a
checkpoint, the metrics log, pack's and merge-lora's outputs) or remounts read-only. That needs
root (mount); those tests skip where mounting is not allowed. The other write sites are checked
by making `open` refuse one file with one errno, in process.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import typer
from conftest import REPO, run_cli

from rlkit.errors import RunError
from rlkit.output import disk_fault, partial_dir, writing

SFT_DATA = REPO / "rlkit" / "demo" / "data" / "sft.jsonl"
TINY_RUN = ["--max-steps", "2", "--batch-size", "2", "--max-length", "128", "--log-every", "1000"]


def _mount(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def small_disk() -> Iterator[Callable[[Path, str], Path]]:
    """`small_disk(dir, "size=256k")` mounts a tmpfs on `dir`; every mount is undone after the test."""
    mounted: list[Path] = []

    def mount(where: Path, options: str) -> Path:
        _mount(where, options)
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(disk: Path) -> Path:
    """Write a file until the disk is full; deleting it makes room again."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: closing it has nothing left to write
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


def _remount(disk: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(disk)], check=True, capture_output=True)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    """The run failed (exit 1) with exactly one `error:` line and no traceback; returns the line."""
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def _sft(model: Path, out: Path, **options) -> Path:
    """A tiny sft run in this process (one thread), so that a test can hook into it."""
    import torch

    from rlkit.recipes.sft import SFTConfig, run_sft

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = {"max_steps": 2, "batch_size": 2, "max_length": 128, "log_every": 1000, **options}
        return run_sft(SFTConfig(model=str(model), data=[str(SFT_DATA)], output=str(out), **config))
    finally:
        torch.set_num_threads(threads)


# ---- real faults ------------------------------------------------------------------------------


def test_a_full_disk_at_the_final_save_ends_with_one_line_and_no_output(tiny_model_dir, tmp_path, small_disk):
    """model.safetensors (~600 kB) does not fit in 256 kB; the config and metrics before it do."""
    disk = small_disk(tmp_path / "disk", "size=256k")
    out = disk / "out"
    done = run_cli("sft", str(tiny_model_dir), str(SFT_DATA), "-o", str(out), "--full", *TINY_RUN)
    line = _one_error_line(done)
    assert f"could not write the model in {partial_dir(out)}: No space left on device; free space and run again" in line
    assert not out.exists() and partial_dir(out).is_dir()


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one_and_resume_continues(
    tiny_model_dir, tmp_path, small_disk, monkeypatch, capsys
):
    """The disk fills just before step 3's checkpoint: steps 1 and 2 stay whole, step 3 stays
    `.incomplete`, the line names step 2; once there is room, --resume goes on from step 2."""
    from accelerate import Accelerator

    disk = small_disk(tmp_path / "disk", "size=8m")
    out = disk / "out"
    real_save = Accelerator.save_state

    def fill_before_step_3(self, output_dir, **kwargs):
        if Path(output_dir).name == "step-0000003.incomplete":
            _fill(disk)
        return real_save(self, output_dir, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Accelerator, "save_state", fill_before_step_3)
        with pytest.raises(RunError) as failed:
            _sft(tiny_model_dir, out, max_steps=4, save_every=1)
    checkpoints = partial_dir(out) / "checkpoints"
    assert str(failed.value) == (
        f"could not write the checkpoint {checkpoints / 'step-0000003'}: No space left on device; free space and "
        f"run again with --resume (the last complete checkpoint is {checkpoints / 'step-0000002'})"
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000001", "step-0000002", "step-0000003.incomplete"]
    assert not out.exists()

    (disk / "filler").unlink()
    capsys.readouterr()
    assert _sft(tiny_model_dir, out, max_steps=4, save_every=1, resume=True) == out
    stderr = capsys.readouterr().err
    assert "step-0000003.incomplete: an incomplete checkpoint" in stderr
    assert f"resuming from {checkpoints / 'step-0000002'} (step 2)" in stderr
    assert (out / "adapter_model.safetensors").is_file() and not partial_dir(out).exists()


def test_a_full_disk_under_the_metrics_log_names_it(tiny_model_dir, tmp_path, small_disk, monkeypatch):
    """The log's first line meets a full disk (tmpfs: a line that fits the file's last page would
    not); closing the log, which tries the buffered line again, says the same."""
    from rlkit.training.metrics import MetricsSink

    disk = small_disk(tmp_path / "disk", "size=1m")
    out = disk / "out"
    real_log = MetricsSink.log

    def fill_before_step_1(self, step, metrics):
        if step == 1:
            _fill(disk)
        return real_log(self, step, metrics)

    monkeypatch.setattr(MetricsSink, "log", fill_before_step_1)
    with pytest.raises(RunError, match="could not write the metrics log .*metrics.jsonl: No space left on device"):
        _sft(tiny_model_dir, out)
    assert not out.exists()


def test_a_disk_turned_read_only_at_the_final_save(tiny_model_dir, tmp_path, small_disk, monkeypatch):
    """OUT.partial is its own tmpfs (so the lock beside it stays writable), remounted read-only
    once training is done; --resume reuses the mount point instead of recreating it."""
    import rlkit.training.run as run_module

    out = tmp_path / "out"
    partial = small_disk(partial_dir(out), "size=4m")
    real_fit = run_module.TrainingRun._fit

    def then_read_only(self, *args, **kwargs):
        done = real_fit(self, *args, **kwargs)
        _remount(partial, "ro")
        return done

    monkeypatch.setattr(run_module.TrainingRun, "_fit", then_read_only)
    with pytest.raises(RunError) as failed:
        _sft(tiny_model_dir, out, resume=True)
    assert str(failed.value) == (
        f"could not write the model in {partial}: Read-only file system; make the file system writable and run again"
    )
    assert not out.exists()


def test_pack_on_a_full_disk_ends_with_one_line(tiny_model_dir, tmp_path, small_disk):
    disk = small_disk(tmp_path / "disk", "size=8k")
    out = disk / "packed"
    done = run_cli("pack", str(SFT_DATA), "--tokenizer", str(tiny_model_dir), "-o", str(out), "--max-length", "128")
    line = _one_error_line(done)
    assert f"could not write the packed dataset {partial_dir(out)}: No space left on device" in line
    assert not out.exists()


def test_merge_lora_on_a_full_disk_writes_no_output(tiny_model_dir, tiny_tokenizer, tmp_path, small_disk):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlkit.tools.merge import MergeConfig, run_merge

    adapter = tmp_path / "adapter"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear")
    )
    model.save_pretrained(adapter)
    tiny_tokenizer.save_pretrained(adapter)
    out = small_disk(tmp_path / "disk", "size=256k") / "merged"
    with pytest.raises(RunError, match=f"could not write the merged model in {partial_dir(out)}: No space left"):
        run_merge(MergeConfig(adapter=str(adapter), output=str(out)))
    assert not out.exists()


# ---- injected faults --------------------------------------------------------------------------


def _refuse(monkeypatch: pytest.MonkeyPatch, name: str, code: int) -> None:
    """Every open of a file called `name` for writing fails with `code`, as the kernel would say it."""
    real_open = io.open

    def refusing(file, mode="r", *args, **kwargs):
        if Path(os.fsdecode(file)).name == name and set(mode) & set("wax+"):
            raise OSError(code, os.strerror(code), os.fsdecode(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", refusing)  # pathlib's write_text and open
    monkeypatch.setattr(builtins, "open", refusing)  # open() itself (matplotlib's and PIL's writers)


@pytest.mark.parametrize(
    ("name", "code", "what", "remedy"),
    [
        ("rlkit_config.yaml", errno.EROFS, "the resolved config", "make the file system writable"),
        ("README.md", errno.ENOSPC, "the model card", "free space"),
        ("final_metrics.json", errno.EACCES, "the final metrics", "make the directory writable"),
        ("training_curves.png", errno.EDQUOT, "the training curves", "free space within your disk quota"),
        ("metrics.jsonl", errno.EIO, "the metrics log", "check the disk"),
    ],
)
def test_each_file_of_a_run_names_itself_when_refused(tiny_model_dir, tmp_path, monkeypatch, name, code, what, remedy):
    out = tmp_path / "out"
    _refuse(monkeypatch, name, code)
    with pytest.raises(RunError) as failed:
        _sft(tiny_model_dir, out, lora=False)  # peft writes a README.md of its own into an adapter
    assert str(failed.value) == (
        f"could not write {what} {partial_dir(out) / name}: {os.strerror(code)}; {remedy} and run again"
    )
    assert not out.exists()


def test_the_samples_file_names_itself_when_refused(tmp_path, monkeypatch):
    from rlkit.training.samples import show_samples

    _refuse(monkeypatch, "samples.jsonl", errno.ENOSPC)
    with pytest.raises(RunError, match="could not write the samples file .*samples.jsonl: No space left on device"):
        show_samples("samples", 1, [{"prompt": "p", "reward": 1.0}], tmp_path / "samples.jsonl")


def test_the_eval_report_names_itself_when_refused(tmp_path, monkeypatch):
    from rlkit.evaluation.report import write_report_dir

    _refuse(monkeypatch, "report.json.partial", errno.ENOSPC)
    with pytest.raises(RunError) as failed:
        write_report_dir(str(tmp_path / "report"), {"accuracy": 1.0}, [], {}, "eval")
    assert str(failed.value) == (
        f"could not write the eval report in {tmp_path / 'report'}: No space left on device; free space and run again"
    )


@pytest.mark.parametrize(
    ("raised", "reason"),
    [
        # safetensors' own error type, in its words
        (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "No space left"),
        # torch's zip writer when it cannot open its file
        (RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: Read-only file system"), "Read-only"),
        # a short write without an errno, on a disk that is not full
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), "a write came up short"),
    ],
)  # fmt: skip
def test_writers_words_are_read_for_the_reason(tmp_path, raised, reason):
    assert disk_fault(raised, tmp_path)[0].startswith(reason)
    with pytest.raises(RunError, match=f"could not write the thing {tmp_path}: {reason}"):
        with writing("the thing", tmp_path):
            raise raised


def test_other_failures_pass_through_unchanged(tmp_path):
    for other in (OSError(errno.ENOENT, "No such file or directory"), ValueError("a bug")):
        with pytest.raises(type(other)):
            with writing("the thing", tmp_path):
                raise other


def test_a_refused_write_that_escapes_every_writing_block_is_still_one_line(capsys):
    """The last resort in `guarded`: exit 1, one `error:` line, no traceback; other OSErrors stay bugs."""
    from rlkit.cli import guarded

    def full(path: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    with pytest.raises(typer.Exit) as ended:
        guarded(full)("runs/x.partial/vocab.json")
    assert ended.value.exit_code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: could not write runs/x.partial/vocab.json: No space left on device; free space and run again"
    ]

    def missing() -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    with pytest.raises(FileNotFoundError):
        guarded(missing)()
