"""The seed recipes of examples/*.mk, each run end to end at the smallest scale on the tiny model.

Every recipe is `make -f examples/<name>.mk` with MODEL, OUT and the scale variables overridden;
its default data (the demo data rewritten in the original dataset's layout) is made by the recipe
itself, so the column mappings and layouts run as they would at full scale. A new recipe is one
entry in RECIPES: its name and the files each stage must have written (the last stage listed is
the final one). Every recipe takes the TINY_SCALE variables (STEPS, BATCH, GRAD_ACCUM, MAX_LENGTH,
MAX_NEW_TOKENS where it generates, LOG_EVERY), MODEL, OUT, PYTHON and RLKIT.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]

# The smallest scale every recipe understands (unknown variables are simply unused by make).
TINY_SCALE = {
    "STEPS": "2",
    "BATCH": "2",
    "GRAD_ACCUM": "1",
    "MAX_LENGTH": "128",
    "MAX_NEW_TOKENS": "8",
    "LOG_EVERY": "1",
    "EVAL_BATCH": "8",
}
ADAPTER = ("adapter_model.safetensors", "adapter_config.json")
CARD = ("tokenizer_config.json", "rlkit_config.yaml", "metrics.jsonl", "final_metrics.json", "README.md")

# recipe name -> {stage dir under OUT: files it must hold when the recipe is done}
RECIPES = {
    "stack-llama": {
        "packed": ("rlkit_pack.json",),
        "sft": ADAPTER + CARD,
        "rm": ("model.safetensors", "config.json") + CARD,
        "ppo": ADAPTER + ("value_head.safetensors", "samples.jsonl") + CARD,
    },
    "stack-llama-2": {
        "sft": ADAPTER + CARD,
        "dpo": ADAPTER + CARD,
    },
    "tulu-2.5-dpo": {
        "dpo": ("model.safetensors", "config.json") + CARD,
    },
    "kto-iterated": {"kto-1": ADAPTER + CARD, "kto-2": ADAPTER + CARD, "kto-3": ADAPTER + CARD},
    "grpo-arithmetic": {"sft": ADAPTER + CARD, "grpo": ADAPTER + ("samples.jsonl",) + CARD},
    "grpo-tools": {"eval": ("report.json",), "sft": ADAPTER + CARD, "grpo": ADAPTER + ("samples.jsonl",) + CARD},
    "distill": {
        "eval/teacher": ("report.json",),
        "eval/student": ("report.json",),
        "student": ADAPTER + ("samples.jsonl",) + CARD,
    },
}
# recipe name -> the make variables it needs besides MODEL at the smallest scale
NEEDS = {
    "distill": {"TEACHER": "{model}"},
    # the calculator's schema in every prompt's system turn: ~550 tiny-tokenizer tokens
    "grpo-tools": {"MAX_LENGTH": "600"},
}

# recipe name -> {file the recipe wrote under OUT/data: columns of the original dataset's layout}
CONVERTED_DATA = {
    "stack-llama": {
        "stack-exchange-paired.jsonl": ("question", "response_j", "response_k"),
        "stack-exchange-questions.jsonl": ("question",),
    },
    "stack-llama-2": {"stack-exchange-paired.jsonl": ("question", "response_j", "response_k")},
    "tulu-2.5-dpo": {"ultrafeedback.jsonl": ("prompt", "chosen", "rejected", "messages")},
    "kto-iterated": {f"snorkel-iter{k}.jsonl": ("prompt", "chosen", "rejected", "messages") for k in (1, 2, 3)},
}

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def run_recipe(name: str, model: Path, out: Path, *make_args: str) -> subprocess.CompletedProcess:
    """`make -f examples/NAME.mk` from the repo root, with this interpreter's `rlkit` first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    # COLUMNS as many shells and CI runners export it (the terminal's width): make turns every
    # environment variable into a make variable, so a recipe must not read one of that name
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "80",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    needs = {k: v.format(model=model) for k, v in NEEDS.get(name, {}).items()}
    assigns = {"MODEL": str(model), "OUT": str(out), "PYTHON": sys.executable, **TINY_SCALE, **needs}
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-f",
            f"examples/{name}.mk",
            *make_args,
            *(f"{k}={v}" for k, v in assigns.items()),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


#: the recipe run by make itself, every stage a real `rlkit` process, as a user runs it
BY_MAKE = "grpo-arithmetic"
SHELL_SYNTAX = {"&&", "||", "|", ";", ">", ">>", "<", "2>", "&"}


def planned_commands(name: str, model: Path, out: Path) -> list[str]:
    """The shell commands `make` would run for the recipe, in order (`make -n`), continuation lines joined."""
    plan = run_recipe(name, model, out, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    return [line.strip() for line in plan.stdout.replace("\\\n", " ").splitlines() if line.strip()]


def run_plan(name: str, model: Path, out: Path) -> subprocess.CompletedProcess:
    """Run the recipe's own commands in make's order: each `rlkit ...` line through the app in this
    process (conftest.run_in_process: ~6 s of interpreter start-up saved per stage), every other
    line (data conversion, awk, echo) by the shell. The first failure is returned."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
    }
    for command in planned_commands(name, model, out):
        words = shlex.split(command)
        if words[0] == "rlkit" and not SHELL_SYNTAX & set(words):
            result = run_cli(*words[1:], cwd=REPO)
        else:
            result = subprocess.run(
                ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
            )
        if result.returncode != 0:
            return subprocess.CompletedProcess(command, result.returncode, result.stdout, f"{command}\n{result.stderr}")
    return subprocess.CompletedProcess(name, 0, "", "")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.process_boundary) if n == BY_MAKE else n for n in sorted(RECIPES)]
)
def test_recipe_runs_end_to_end(name, tiny_model_dir, tmp_path):
    """Every recipe's commands run and write every stage; `make -q` then finds nothing to redo, so
    the stages are the recipe's file targets. BY_MAKE runs under make itself, the others run make's
    own plan (`make -n`) with the rlkit stages in this process."""
    out = tmp_path / "out"
    result = run_recipe(name, tiny_model_dir, out) if name == BY_MAKE else run_plan(name, tiny_model_dir, out)
    assert result.returncode == 0, (
        f"make -f examples/{name}.mk failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    )

    for stage, files in RECIPES[name].items():
        missing = [f for f in files if not (out / stage / f).is_file()]
        assert not missing, f"{name}: {out / stage} lacks {missing}"
        assert not (out / f"{stage}.partial").exists()
    final_stage = list(RECIPES[name])[-1]
    metrics = json.loads((out / final_stage / "final_metrics.json").read_text())
    assert metrics, f"{name}: empty final metrics"
    steps = [
        json.loads(line) for line in (out / final_stage / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    assert steps, f"{name}: no per-step metrics"
    for data_file, columns in CONVERTED_DATA.get(name, {}).items():
        first = json.loads((out / "data" / data_file).read_text().splitlines()[0])
        assert set(columns) <= set(first), f"{name}: {data_file} is not in the original layout: {sorted(first)}"

    if name == "distill":  # the transfer table: a row per demo target
        table = (out / "transfer.md").read_text()
        assert all(f"| {target} |" in table for target in ("format", "opener", "closer", "no hedge", "right answer")), (
            table
        )

    if name == "kto-iterated":  # each round starts from and is held to the previous round
        for k in (2, 3):
            card = (out / f"kto-{k}" / "README.md").read_text()
            assert (
                f"reference: `{out / f'kto-{k - 1}'}`" in card and f"Base model:** `{out / f'kto-{k - 1}'}`" in card
            ), card

    # Every stage is a file target: once done, make has nothing left to do (`make -q` exits 0).
    assert run_recipe(name, tiny_model_dir, out, "--question").returncode == 0, (
        f"{name}: make would re-run a finished stage"
    )
