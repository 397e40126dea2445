"""Bad input through the real CLI: exit 2, one `error:` line on stderr, no traceback, nothing written.

Two cases run as `python -m rlkit ...` subprocesses (started together in a module fixture), so the
exit code and streams are what a shell sees; the others run the same app in this process.
The YAML/flag precedence of `rlkit.config` is tested in process, on a small config dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import typer
from conftest import run_cli, write_jsonl
from typer.testing import CliRunner

from rlkit.config import arg, command_from_config, opt, resolve_config
from rlkit.data.templates import SHIPPED
from rlkit.errors import InputError

PAIRS = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(8)]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

#: the cases run as real `python -m rlkit` processes (one per command reached); the rest run the
#: same app in this process, where a new interpreter's ~6 s of imports would buy nothing
IN_A_PROCESS = {"malformed_line_sft", "missing_column_pack"}


@dataclass
class Case:
    args: list[str]
    output: str  # the -o dir, which must not appear (with its .partial) unless it pre-existed
    expect: list[str]  # substrings the error line must contain


BAD_CASES = [
    "malformed_line_sft",
    "missing_column_pack",
    "empty_file_pack",
    "no_chat_template_sft",
    "unknown_template_pack",
    "existing_output_sft",
    "missing_mapped_column_sft",
    "bad_config_key_sft",
]


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, tiny_model_dir, no_template_model_dir):
    root = tmp_path_factory.mktemp("bad-input")
    model, bare = str(tiny_model_dir), str(no_template_model_dir)
    good = write_jsonl(root / "good.jsonl", PAIRS)
    bad_line = root / "bad_line.jsonl"
    bad_line.write_text(
        json.dumps(PAIRS[0]) + "\n" + json.dumps(PAIRS[1]) + "\n" + '{"prompt": "x", "completion": oops}\n'
    )
    wrong_columns = write_jsonl(root / "wrong_columns.jsonl", [{"question": "q?", "answer": "a."}])
    empty = root / "empty.jsonl"
    empty.write_text("")
    messages = write_jsonl(
        root / "messages.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
    )
    existing = root / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    bad_key = root / "bad_key.yaml"
    bad_key.write_text("lr: 0.001\nlearning_rat: 0.1\n")

    def out(name: str) -> str:
        return str(root / f"out_{name}")

    def sft(name: str, data, *extra: str, model_dir: str = model, output: str | None = None, expect: list[str]) -> Case:
        output = output or out(name)
        return Case(["sft", model_dir, str(data), "-o", output, "--max-steps", "1", *extra], output, expect)

    def pack(name: str, data, *extra: str, expect: list[str]) -> Case:
        return Case(["pack", str(data), "--tokenizer", model, "-o", out(name), *extra], out(name), expect)

    accepted = [
        "text",
        "messages",
        "prompt+completion",
        "prompt+chosen+rejected",
        "prompt+completion+label",
        "--columns",
    ]
    cases = {
        "malformed_line_sft": sft("malformed_line_sft", bad_line, expect=[f"{bad_line}:3:", "not valid JSON"]),
        "missing_column_pack": pack(
            "missing_column_pack", wrong_columns, expect=[str(wrong_columns), "question", "answer", *accepted]
        ),
        "empty_file_pack": pack("empty_file_pack", empty, expect=[str(empty), "empty"]),
        "no_chat_template_sft": sft(
            "no_chat_template_sft", messages, model_dir=bare, expect=[bare, "no chat template", "--template", *SHIPPED]
        ),
        "unknown_template_pack": pack(
            "unknown_template_pack", good, "--template", "chatml2", expect=["--template", "chatml2", *SHIPPED]
        ),
        "existing_output_sft": sft(
            "existing_output_sft", good, output=str(existing), expect=[str(existing), "--overwrite"]
        ),
        "missing_mapped_column_sft": sft(
            "missing_mapped_column_sft",
            good,
            "--columns",
            "prompt=question,completion=answer",
            expect=["--columns", "question", "answer", "columns found: prompt, completion"],
        ),
        "bad_config_key_sft": sft(
            "bad_config_key_sft",
            good,
            "--config",
            str(bad_key),
            expect=[str(bad_key), "unknown option", "learning_rat"],
        ),
    }
    assert sorted(cases) == sorted(BAD_CASES)

    env = {**OFFLINE, "RLKIT_CACHE_DIR": str(root / "cache")}
    with ThreadPoolExecutor(max_workers=2) as pool:  # two real processes, as a shell starts them
        futures = {
            name: pool.submit(run_cli, *cases[name].args, env=env, timeout=120, process=True) for name in IN_A_PROCESS
        }
        results = {name: future.result() for name, future in futures.items()}
    for name in sorted(set(cases) - IN_A_PROCESS):  # the same app in this process (conftest.run_in_process)
        results[name] = run_cli(*cases[name].args, env=env)
    return {"root": root, "cases": cases, "results": results, "existing": existing}


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_input_exits_2_with_one_clear_line(cli_results, name):
    case, result = cli_results["cases"][name], cli_results["results"][name]
    context = f"rlkit {' '.join(case.args)}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert result.returncode == 2, context
    assert "Traceback" not in result.stdout + result.stderr, context
    assert result.stdout == "", context
    stderr = ANSI.sub("", result.stderr)  # in case a CI forces colour
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, context
    assert lines[0].startswith("error:"), context
    for needle in case.expect:
        assert needle in lines[0], f"{needle!r} missing from the error line\n{context}"


@pytest.mark.parametrize("name", [n for n in BAD_CASES if not n.startswith("existing_output")])
def test_bad_input_writes_nothing(cli_results, name):
    output = Path(cli_results["cases"][name].output)
    assert not output.exists()
    assert not output.with_name(output.name + ".partial").exists()


def test_existing_output_is_left_untouched(cli_results):
    existing = cli_results["existing"]
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert (existing / "keep.txt").read_text() == "precious"
    assert not existing.with_name(existing.name + ".partial").exists()


# --- resolve_config, in process ---------------------------------------------------------------------


@dataclass
class Toy:
    data: list[str] = arg("Data.", metavar="DATA...", default=[])
    lr: float = opt(1e-4, "Learning rate.")
    steps: int = opt(10, "Steps.")
    name: Optional[str] = opt(None, "A name.")
    packing: bool = opt(True, "Pack.")
    tags: list[str] = opt(["a"], "Tags.")
    eval_every: int = opt(0, "Evaluate every N steps.")


def _yaml(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def _flags(**given):
    """What typer passes: every option, None where the flag was not given."""
    values = {"data": None, "lr": None, "steps": None, "name": None, "packing": None, "tags": None, "eval_every": None}
    return {**values, **given}


def test_resolve_config_precedence_defaults_yaml_flags(tmp_path):
    only_defaults = resolve_config(Toy, _flags(data=("d.jsonl",)), None)
    assert (only_defaults.lr, only_defaults.steps, only_defaults.name, only_defaults.packing, only_defaults.tags) == (
        1e-4,
        10,
        None,
        True,
        ["a"],
    )

    config = _yaml(
        tmp_path, "lr: 5.0e-7\nsteps: 30\nname: from-yaml\npacking: false\ntags: [x, y]\ndata: [a.jsonl, b.jsonl]\n"
    )
    from_yaml = resolve_config(Toy, _flags(), config)
    assert (from_yaml.lr, from_yaml.steps, from_yaml.name, from_yaml.packing, from_yaml.tags) == (
        5e-7,
        30,
        "from-yaml",
        False,
        ["x", "y"],
    )
    assert from_yaml.data == ["a.jsonl", "b.jsonl"]

    flagged = resolve_config(Toy, _flags(steps=3, packing=True, tags="p, q", data=("c.jsonl",)), config)
    assert flagged.steps == 3 and flagged.packing is True and flagged.tags == ["p", "q"] and flagged.data == ["c.jsonl"]
    assert flagged.lr == 5e-7 and flagged.name == "from-yaml"  # not given as flags: YAML stays
    assert Toy().tags == ["a"] and Toy().tags is not Toy().tags  # list defaults are not shared


def test_resolve_config_accepts_dashed_yaml_keys_and_coerces_types(tmp_path):
    config = _yaml(tmp_path, "steps: '7'\npacking: 'no'\nlr: 1\ndata: d.jsonl\neval-every: 5\n")
    resolved = resolve_config(Toy, _flags(), config)
    assert (
        resolved.eval_every == 5
        and resolved.steps == 7
        and resolved.packing is False
        and resolved.lr == 1.0
        and isinstance(resolved.lr, float)
    )
    assert resolved.data == ["d.jsonl"]


def test_a_runs_own_rlkit_config_yaml_is_accepted(tmp_path):
    """OUT/rlkit_config.yaml starts with `command:`; feeding it back as --config re-runs the same options."""
    config = _yaml(tmp_path, "command: toy\nlr: 0.5\nsteps: 4\ndata: [d.jsonl]\n")
    resolved = resolve_config(Toy, _flags(), config)
    assert (resolved.lr, resolved.steps, resolved.data) == (0.5, 4, ["d.jsonl"])


def test_resolve_config_unknown_key_is_an_input_error(tmp_path):
    config = _yaml(tmp_path, "lr: 0.1\nlearning_rate: 0.1\n")
    with pytest.raises(InputError) as err:
        resolve_config(Toy, _flags(data=("d.jsonl",)), config)
    message = str(err.value)
    assert "learning_rate" in message and str(config) in message and "lr" in message


@pytest.mark.parametrize(
    "text,match",
    [
        ("steps: many\n", "steps"),
        ("packing: maybe\n", "packing"),
        ("- just\n- a list\n", "mapping"),
        ("lr: [unclosed\n", "YAML"),
    ],
)
def test_resolve_config_bad_values_are_input_errors(tmp_path, text, match):
    with pytest.raises(InputError, match=match):
        resolve_config(Toy, _flags(data=("d.jsonl",)), _yaml(tmp_path, text))


def test_resolve_config_missing_file_and_missing_argument(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        resolve_config(Toy, _flags(data=("d.jsonl",)), tmp_path / "absent.yaml")
    with pytest.raises(InputError, match="DATA"):
        resolve_config(Toy, _flags(), None)


def test_flags_override_yaml_through_the_typer_command(tmp_path):
    """The generated command passes None for flags not given, so YAML values survive; given flags win."""
    seen: list[Toy] = []
    app = typer.Typer()
    app.command()(command_from_config(Toy, seen.append, "A toy command."))
    config = _yaml(tmp_path, "lr: 5.0e-7\nsteps: 30\npacking: false\ntags: [x, y]\n")
    runner = CliRunner()

    result = runner.invoke(app, ["d.jsonl", "--config", str(config), "--steps", "3", "--name", "flag"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == Toy(
        data=["d.jsonl"], lr=5e-7, steps=3, name="flag", packing=False, tags=["x", "y"], eval_every=0
    )

    result = runner.invoke(app, ["d.jsonl", "--config", str(config), "--packing", "--tags", "p,q", "--eval-every", "4"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == Toy(data=["d.jsonl"], lr=5e-7, steps=30, name=None, packing=True, tags=["p", "q"], eval_every=4)

    result = runner.invoke(app, ["d.jsonl"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == Toy(data=["d.jsonl"])
    assert "--lr" in runner.invoke(app, ["--help"]).output


@pytest.mark.parametrize("message", ["exp[v1]/train.jsonl: no such file", "template 'llama-2' failed near [/INST]"])
def test_error_line_keeps_square_brackets(capsys, message):
    from rlkit.cli import guarded

    def fails():
        raise InputError(message)

    with pytest.raises(typer.Exit) as exit_info:
        guarded(fails)()
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


# --- the validation layer: each field declares what it accepts, flags and --config alike ----------


def _all_configs() -> list[type]:
    """Every options dataclass of rlkit: those its *_config.py, config.py and options.py modules define."""
    import importlib
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "rlkit"
    found = []
    for path in sorted(package.rglob("*.py")):
        if not (path.name.endswith("_config.py") or path.name in ("config.py", "options.py")) or path.parent == package:
            continue
        module = importlib.import_module(".".join(path.relative_to(package.parent).with_suffix("").parts))
        found += [v for v in vars(module).values() if dataclasses.is_dataclass(v) and v.__module__ == module.__name__]
    assert len(found) >= 10
    return found


def test_every_numeric_option_declares_its_range_and_its_default_is_in_it():
    import typing

    from rlkit.config import _unwrap_optional, value_problem

    undeclared, bad_defaults = [], []
    for cls in _all_configs():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _unwrap_optional(hints[f.name]) in (int, float) and all(
                f.metadata.get(k) is None for k in ("min", "max", "above", "below")
            ):
                undeclared.append(f"{cls.__name__}.{f.name}")
            if value_problem(getattr(cls(), f.name), f.metadata):
                bad_defaults.append(f"{cls.__name__}.{f.name}")
    assert undeclared == [] and bad_defaults == []


def _sft_flags(**given):
    from rlkit.recipes.sft_config import SFTConfig

    return {f.name: None for f in dataclasses.fields(SFTConfig)} | {"model": "m", "data": ("d",)} | given


@pytest.mark.parametrize(
    "given,line",
    [
        ({"batch_size": 0}, "--batch-size 0: must be >= 1"),
        ({"grad_accum": 0}, "--grad-accum 0: must be >= 1"),
        ({"lr": float("nan")}, "--lr nan: must be a finite number >= 0"),
        ({"lr": -0.001}, "--lr -0.001: must be >= 0"),
        ({"max_length": -5}, "--max-length -5: must be >= 2"),
        ({"max_steps": -3}, "--max-steps -3: must be >= 1"),
        ({"warmup_ratio": 1.5}, "--warmup-ratio 1.5: must be in [0, 1]"),
        ({"adam_beta1": 1.0}, "--adam-beta1 1.0: must be in [0, 1)"),
        ({"lr": float("inf")}, "--lr inf: must be a finite number >= 0"),
    ],
)
def test_flag_values_out_of_range_are_refused_with_the_flag_named(given, line):
    from rlkit.recipes.sft_config import SFTConfig

    with pytest.raises(InputError) as err:
        resolve_config(SFTConfig, _sft_flags(**given), None)
    assert str(err.value) == line


@pytest.mark.parametrize(
    "text,needles",
    [
        ("scheduler: exponential-ish\n", ["scheduler = 'exponential-ish'", "--scheduler", "linear, cosine"]),
        ("precision: fp99\n", ["precision = 'fp99'", "auto, bf16, fp16, fp32"]),
        ("report_to: mlflow\n", ["report_to = 'mlflow'", "none, tensorboard, wandb"]),
        ("batch_size: 0\n", ["batch_size = 0", "(--batch-size)", ">= 1"]),
        ("lr: .nan\n", ["lr = nan", "finite"]),
        ("max_steps: -3\n", ["max_steps = -3", ">= 1"]),
        ("batch_size: 2.5\n", ["batch_size", "cannot read 2.5 as int"]),
        ("epochs: true\n", ["epochs", "cannot read True as int"]),
        ("template: {name: chatml}\n", ["template", "cannot read {'name': 'chatml'} as str"]),
        ("lr: [0.1]\n", ["lr", "cannot read [0.1] as float"]),
    ],
)
def test_yaml_values_are_checked_like_flags(tmp_path, text, needles):
    from rlkit.recipes.sft_config import SFTConfig

    config = _yaml(tmp_path, text)
    with pytest.raises(InputError) as err:
        resolve_config(SFTConfig, _sft_flags(), config)
    message = str(err.value)
    assert message.startswith(f"--config {config}: ")
    for needle in needles:
        assert needle in message


def test_in_range_values_and_whole_floats_pass(tmp_path):
    from rlkit.recipes.sft_config import SFTConfig

    resolved = resolve_config(SFTConfig, _sft_flags(lr=1e-5), _yaml(tmp_path, "batch_size: 4.0\nscheduler: cosine\n"))
    assert (resolved.batch_size, resolved.scheduler, resolved.lr) == (4, "cosine", 1e-5)
    assert isinstance(resolved.batch_size, int)
