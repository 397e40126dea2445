"""The CLI a person meets first: help and version without torch, help that reads at 80 columns,
threads applied before any model work, and the performance switches recorded with each run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from rlkit.cli import COMMANDS, app
from rlkit.config import COMMAND_PANEL, PANELS, command_from_config, field_panels, opt, resolve_config
from rlkit.performance import PerformanceSwitches

HEAVY = ("torch", "transformers", "datasets", "accelerate", "peft")

_PROBE = """
import json, sys
from rlkit.cli import app
for args in json.loads(sys.argv[1]):
    try:
        app(args, prog_name="rlkit")
    except SystemExit:
        pass
    # a package that ran has submodules loaded (torch._C, transformers.utils...); a lazy module bound
    # for later use (rlkit.losses binds torch so) has none until it is first used
    print(json.dumps([args, [m for m in {heavy!r} if any(k.startswith(m + ".") for k in sys.modules)]]), file=sys.stderr)
"""


def test_help_version_and_a_bad_flag_import_no_heavy_library():
    """`rlkit --help`, `rlkit CMD --help` for every command, `rlkit --version` and a refused flag, in one
    fresh process: none of them waits for torch."""
    bad_flag = ["sft", "model", "data.jsonl", "-o", "out", "--lr", "nan"]
    runs = [["--help"], ["--version"], *[[name, "--help"] for name, _ in COMMANDS], bad_flag]
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY), json.dumps(runs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    seen = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("[[")]
    assert [args for args, _ in seen] == runs, result.stderr
    assert all(not loaded for _, loaded in seen), seen
    assert "rlkit 0.1.0" in result.stdout and "Usage: rlkit dpo" in result.stdout
    assert "error: --lr nan" in result.stderr


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("name,module", COMMANDS)
def test_help_reads_at_80_columns(name, module):
    text = _help(name)
    assert "<bool>" not in text and "(False)" not in text and "[default: (" not in text
    assert "…" not in text, "a flag or help text was cut off"
    assert max(map(len, text.splitlines())) <= 80
    config = __import__(f"rlkit.commands.{module}", fromlist=["command"]).command.config_class
    for f in dataclasses.fields(config):
        if not f.metadata.get("positional"):
            flag = (f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",))[-1].split("/")[0]
            assert flag in text, f"{flag} missing from `rlkit {name} --help`"


def test_dpo_help_groups_options_into_panels_with_plain_defaults():
    text = _help("dpo")
    titles = [line.split("─ ", 1)[1].split(" ─")[0] for line in text.splitlines() if line.startswith("╭─ ")]
    assert titles == ["Arguments", COMMAND_PANEL, *PANELS]
    assert "--overwrite/--no-overwrite" in text and "--lora/--full" in text
    assert "[default: False]" in text and "[default: 0.1]" in text
    # a switch too long for its cell breaks after the slash, whole names on both lines
    assert "--gradient-checkpointing/" in text and "--no-gradient-checkpointing" in text


def test_root_help_shows_no_bool_type():
    text = _help()
    assert "<bool>" not in text and "--version" in text


def test_a_field_keeps_its_panel_where_a_subclass_redefines_it():
    from rlkit.recipes.dpo_config import DPOConfig
    from rlkit.recipes.ppo_config import PPOConfig

    dpo, ppo = field_panels(DPOConfig), field_panels(PPOConfig)
    assert dpo["batch_size"] == ppo["batch_size"] == "Optimisation"  # redefined by PairTrainConfig, PPOConfig
    assert dpo["gradient_checkpointing"] == "Speed and memory"  # redefined by DPOConfig
    assert dpo["ref"] == ppo["ref"] == "Reference"
    assert dpo["beta"] == ppo["kl_coef"] == COMMAND_PANEL
    assert "model" not in dpo  # arguments have their own panel


def test_an_unknown_panel_is_refused_where_it_is_declared():
    with pytest.raises(ValueError, match="Optimisation"):
        opt(1, "A value.", panel="Optimization")


@dataclasses.dataclass
class _Threaded:
    threads: int | None = opt(None, "Threads.", min=1)


def _run_threaded(*args: str) -> int:
    """The torch threads a command built from `_Threaded` sees when its run function starts."""
    import torch
    import typer

    seen: list[int] = []
    toy = typer.Typer()
    toy.command()(command_from_config(_Threaded, lambda config: seen.append(torch.get_num_threads()), "Toy."))
    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(toy, list(args))
        assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(before)
    return seen[0]


def test_threads_are_applied_before_the_run_function_starts():
    import torch

    assert _run_threaded("--threads", "1") == 1
    assert _run_threaded() == torch.get_num_threads()  # unset: torch's own count stays


def test_every_command_that_runs_a_model_takes_threads():
    modules = dict(COMMANDS)
    for name in ("sft", "train-rm", "dpo", "kto", "ppo", "chat", "eval", "merge-lora"):
        config = __import__(f"rlkit.commands.{modules[name]}", fromlist=["command"]).command.config_class
        assert "threads" in {f.name for f in dataclasses.fields(config)}, name


def test_the_cli_makes_openmp_threads_wait_without_spinning():
    probe = "import os, rlkit.cli; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout == "PASSIVE\n"
    mine = subprocess.run(
        [sys.executable, "-c", probe], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True, text=True
    )
    assert mine.stdout == "ACTIVE\n"  # the user's own setting wins


def test_switches_are_read_from_the_environment_in_one_place():
    assert PerformanceSwitches.from_environ({}) == PerformanceSwitches(True, None, True)
    off = PerformanceSwitches.from_environ(
        {"RLKIT_LEAN_BLOCKS": "0", "RLKIT_FP32_ATTENTION_BACKWARD": "0", "RLKIT_MALLOC_TRIM": "0"}
    )
    assert off == PerformanceSwitches(False, False, False)
    assert PerformanceSwitches.from_environ({"RLKIT_FP32_ATTENTION_BACKWARD": "1"}).fp32_attention_backward is True


def test_a_runs_config_and_card_record_the_switches_and_the_config_is_reusable(tmp_path, monkeypatch):
    from rlkit.output import write_config, write_model_card
    from rlkit.recipes.sft_config import SFTConfig

    monkeypatch.setenv("RLKIT_MALLOC_TRIM", "0")
    monkeypatch.delenv("RLKIT_LEAN_BLOCKS", raising=False)
    write_config(tmp_path, "sft", {"model": "m", "data": ["d.jsonl"], "lr": 0.5})
    saved = yaml.safe_load((tmp_path / "rlkit_config.yaml").read_text())
    assert saved["performance"]["RLKIT_MALLOC_TRIM"] is False and saved["performance"]["RLKIT_LEAN_BLOCKS"] is True
    assert set(saved["performance"]) >= {"RLKIT_LEAN_BLOCKS", "RLKIT_FP32_ATTENTION_BACKWARD", "RLKIT_MALLOC_TRIM"}
    assert resolve_config(SFTConfig, {}, tmp_path / "rlkit_config.yaml").lr == 0.5  # fed back as --config
    write_model_card(tmp_path, command="sft", base_model="m", data=["d.jsonl"], metrics={"loss": 1.0})
    card = (tmp_path / "README.md").read_text()
    assert "`RLKIT_MALLOC_TRIM=0`" in card and "`RLKIT_LEAN_BLOCKS=1`" in card
