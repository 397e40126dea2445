"""DeepSpeed ZeRO-2/3 through `accelerate launch --config_file examples/accelerate/deepspeed_zero{2,3}.yaml`.

What runs everywhere: the pieces rlkit adds to accelerate's documented path, with stand-ins for the
accelerator: the batch sizes a DeepSpeed config leaves `auto` are filled in from the options (the
engine hands `prepare` no data loader to read them from), and the final save takes the tensors
`accelerator.get_state_dict` gathers in place of ZeRO-3's empty partitions, so the saved dir is whole.

What needs a GPU: the end-to-end runs. DeepSpeed itself installs and runs on a CPU (0.19.8 builds
with DS_BUILD_OPS=0, its CPU accelerator talks over gloo), but accelerate 1.16 runs DeepSpeed only on
an accelerator device: told cpu=True (how a CPU-only launch gets gloo) it ignores the DeepSpeed
config, and otherwise it finds no distributed backend on a machine without one and gives every
process a world of one. So those runs are skipped without CUDA and deepspeed, and say so.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import DEMO_DATA, run_cli
from safetensors.torch import load_file

from rlkit.training.engine import _deepspeed_batch_sizes
from rlkit.training.options import TrainConfig
from rlkit.training.sharding import gather_deepspeed_in_place

REPO = Path(__file__).resolve().parents[1]


def _skip_reason() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed)"
    if not torch.cuda.is_available():
        return (
            "no CUDA device: accelerate 1.16 runs DeepSpeed only on an accelerator (with cpu=True it ignores the "
            "DeepSpeed config; without, it finds no backend on a CPU-only machine and each process is alone)"
        )
    return None


SKIP_REASON = _skip_reason()


def _accelerator(distributed_type: str, ds_config: dict | None = None, processes: int = 2) -> SimpleNamespace:
    from accelerate.utils import DistributedType

    return SimpleNamespace(
        distributed_type=DistributedType[distributed_type],
        num_processes=processes,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_config or {})),
    )


def test_auto_batch_sizes_are_filled_from_the_options_and_explicit_ones_kept():
    config = TrainConfig(batch_size=3, grad_accum=2)
    auto = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "zero_optimization": {"stage": 3}}
    _deepspeed_batch_sizes(config, _accelerator("DEEPSPEED", auto, processes=4))
    assert auto["train_micro_batch_size_per_gpu"] == 3 and auto["train_batch_size"] == 3 * 2 * 4
    explicit = {"train_micro_batch_size_per_gpu": 5, "train_batch_size": 40}
    _deepspeed_batch_sizes(config, _accelerator("DEEPSPEED", explicit))
    assert explicit == {"train_micro_batch_size_per_gpu": 5, "train_batch_size": 40}
    untouched: dict = {}
    _deepspeed_batch_sizes(config, _accelerator("MULTI_GPU", untouched))
    assert untouched == {}


def test_the_final_save_takes_the_gathered_tensors_in_place_of_zero3_partitions(tiny_model_dir, tmp_path):
    """ZeRO-3 leaves each module an empty placeholder per parameter; the tensors `get_state_dict`
    gathered (on the main process) replace them, and save_pretrained writes the whole model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    for param in model.parameters():
        param.data = torch.empty(0)  # what a ZeRO-3 partitioned parameter looks like outside its forward
    calls = []

    def get_state_dict(m):
        calls.append(m)
        return full

    accelerator = SimpleNamespace(get_state_dict=get_state_dict, is_main_process=True, unwrap_model=lambda m: m)
    gather_deepspeed_in_place(accelerator, model)
    assert calls == [model]
    model.save_pretrained(tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert saved.keys() == full.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, full[name]), name


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("mode", ["--full", "--lora"])
def test_zero_runs_save_ordinary_dirs_equal_to_one_process(stage, mode, tiny_model_dir, tmp_path):
    """accelerate launch with the shipped config (its process count and precision adjusted to this
    machine) writes an HF dir whose weights equal a plain run's with the same global batch."""
    import yaml

    processes = min(2, torch.cuda.device_count())
    config = yaml.safe_load((REPO / "examples" / "accelerate" / f"deepspeed_zero{stage}.yaml").read_text())
    config.update(num_processes=processes, mixed_precision="no")
    config_file = tmp_path / "ds.yaml"
    config_file.write_text(yaml.safe_dump(config))
    lr = "1e-2" if mode == "--lora" else "1e-3"
    common = ["--max-steps", "3", "--max-length", "128", "--lr", lr, "--precision", "fp32", "--lora-dropout", "0", mode]
    one = run_cli(
        "sft",
        str(tiny_model_dir),
        str(DEMO_DATA / "sft.jsonl"),
        "-o",
        str(tmp_path / "one"),
        "--batch-size",
        str(2 * processes),
        *common,
    )
    assert one.returncode == 0, one.stderr
    launch = [shutil.which("accelerate") or "accelerate", "launch", "--config_file", str(config_file)]
    launch += ["--main_process_port", str(_port()), "-m", "rlkit"]
    two = subprocess.run(
        [
            *launch,
            "sft",
            str(tiny_model_dir),
            str(DEMO_DATA / "sft.jsonl"),
            "-o",
            str(tmp_path / "ds"),
            "--batch-size",
            "2",
            *common,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        cwd=REPO,
    )
    assert two.returncode == 0, two.stderr
    name = "adapter_model.safetensors" if mode == "--lora" else "model.safetensors"
    a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "ds" / name))
    assert a.keys() == b.keys() and all(v.numel() > 0 for v in b.values())
    worst = max(float((a[k] - b[k].to(a[k].dtype)).abs().max()) for k in a)
    assert worst < 1e-4, worst
