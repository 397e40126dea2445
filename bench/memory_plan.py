"""`--dry-run`'s memory estimate against the measured peak of the same run on this CPU.

For each configuration the orchestrator runs one child process. The child runs the rlkit command
in-process (the same `main()` as the `rlkit` script) with three hooks:

- when `TrainingRun` starts, the planner's estimate of that exact configuration (`make_plan`);
- at the first `from_pretrained` of any model, the baseline: the resident set (VmRSS) of the
  process with Python, torch, transformers, peft and datasets imported, the tokenizer and the
  data loaded, and no model yet;
- when the engine starts training (every model loaded, the load's transient copies freed and
  handed back to the OS), the kernel's peak counter is reset (`/proc/self/clear_refs` 5), and
  when training ends its VmHWM is read: the peak of the training steps, loading left out.

What is compared: measured = peak RSS of the training steps - baseline, against the planner's
total. Both are per process. glibc hands large freed blocks back to the OS (rlkit.hardware
trims the heap after each forward and backward), so RSS follows what torch holds closely.

    .venv/bin/python bench/memory_plan.py                 # tiny model, each trainer
    .venv/bin/python bench/memory_plan.py --models tiny,smollm2 --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, log, markdown_table, replace_block, run_child  # noqa: E402

GGUF = REPO / ".cache" / "demo" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = REPO / "rlkit" / "demo" / "data"
MIB = 2**20


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024  # type: ignore[union-attr]


# ---- the child: one rlkit command, measured ------------------------------------------------


def child(args: list[str], result_path: str) -> None:
    import gc

    import datasets  # noqa: F401  (imported before the baseline: every run pays for them)
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import modeling_utils

    from rlkit.hardware import release_freed_host_memory
    from rlkit.training import engine, run
    from rlkit.training.memory_plan import make_plan

    record: dict[str, Any] = {"args": args}

    original_init = run.TrainingRun.__init__

    def init(self: Any, command: str, config: Any, *a: Any, **k: Any) -> None:
        plan = make_plan(command, config)
        record["plan"] = {
            "total": plan.total,
            **{name: plan.column(name) for name in ("weights", "grads", "optimizer", "activations")},
            "tokens": plan.tokens,
        }
        original_init(self, command, config, *a, **k)

    run.TrainingRun.__init__ = init  # type: ignore[method-assign]

    original_load = modeling_utils.PreTrainedModel.from_pretrained.__func__  # type: ignore[attr-defined]

    def from_pretrained(cls: Any, *a: Any, **k: Any) -> Any:
        if "baseline" not in record:
            gc.collect()
            release_freed_host_memory(torch.device("cpu"))
            record["baseline"] = _status("VmRSS")
        return original_load(cls, *a, **k)

    modeling_utils.PreTrainedModel.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign]

    original_fit = engine.Engine.fit

    def fit(self: Any, *a: Any, **k: Any) -> Any:
        gc.collect()
        release_freed_host_memory(torch.device("cpu"))
        record["loaded"] = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the peak counter restarts here: loading left out
        t0 = time.time()
        try:
            return original_fit(self, *a, **k)
        finally:
            record["peak"] = _status("VmHWM")
            record["train_s"] = time.time() - t0

    engine.Engine.fit = fit  # type: ignore[method-assign]

    from rlkit.cli import main

    sys.argv = ["rlkit", *args]
    try:
        main()
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    Path(result_path).write_text(json.dumps(record) + "\n")


# ---- the configurations ------------------------------------------------------------------


def build_tiny(out: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_model, build_tokenizer  # the test suite's tiny Llama

    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)


def configurations(model: str, model_path: str, work: Path) -> list[tuple[str, list[str]]]:
    """(label, rlkit arguments) of each trainer on `model`.

    The planner counts every row full (its worst case), so each run is sized to fill its rows:
    SFT packs examples into rows of --max-length; pairs and unpaired examples (a few dozen tokens
    each) are cut to a --max-length most of them exceed; ppo/grpo rows are a short prompt plus
    --max-new-tokens, with --max-length just above that."""
    length, batch = ("512", "16") if model == "tiny" else ("256", "4")
    steps = ["--max-steps", "2", "--seed", "0", "--log-every", "1"]
    sft = ["sft", model_path, str(DATA / "sft.jsonl"), "--max-length", length, "--batch-size", batch, *steps]
    pairs = [str(DATA / "pairs.jsonl"), "--batch-size", "8", "--max-length", "48", *steps]
    rl = [str(DATA / "prompts.jsonl"), "--reward", "rlkit.demo.task:reward", "--batch-size", "8"]
    rl += ["--max-new-tokens", "32", "--max-length", "80", "--temperature", "1.0", *steps]
    configs = [
        ("sft LoRA fp32", [*sft]),
        ("sft LoRA bf16", [*sft, "--precision", "bf16"]),
        ("sft full fp32", [*sft, "--full"]),
        ("sft full fp32, checkpointing", [*sft, "--full", "--gradient-checkpointing"]),
        ("train-rm LoRA fp32", ["train-rm", model_path, *pairs]),
        ("dpo LoRA fp32", ["dpo", model_path, *pairs, "--no-gradient-checkpointing"]),
        ("kto LoRA fp32", ["kto", model_path, str(DATA / "unpaired.jsonl"), *pairs[1:], "--no-gradient-checkpointing"]),
        ("ppo LoRA fp32", ["ppo", model_path, *rl, "--ppo-epochs", "1"]),
        ("grpo LoRA fp32", ["grpo", model_path, *rl, "--num-generations", "4"]),
    ]
    return [(label, [*argv, "-o", str(work / re.sub(r"\W+", "-", label)), "--overwrite"]) for label, argv in configs]


def estimate(argv: list[str]) -> dict[str, Any]:
    """The planner's estimate for `rlkit ARGV` now, computed here (the child's measurement may be cached)."""
    import typer.main

    from rlkit.cli import app
    from rlkit.config import resolve_config
    from rlkit.training.memory_plan import make_plan

    group = typer.main.get_command(app)
    command = group.commands[argv[0]]  # type: ignore[attr-defined]
    ctx = command.make_context(argv[0], list(argv[1:]))
    params = dict(ctx.params)
    config_file = params.pop("config", None)
    cls = command.callback.__wrapped__.config_class  # guarded() wraps the config command
    plan = make_plan(argv[0], resolve_config(cls, params, config_file))
    return {
        "total": plan.total,
        **{name: plan.column(name) for name in ("weights", "grads", "optimizer", "activations")},
        "tokens": plan.tokens,
    }


CACHE = REPO / ".cache" / "bench" / "memory_plan.json"


def measure(label: str, argv: list[str], work: Path, timeout: float, reuse: bool, cache: Path) -> dict[str, Any]:
    key = json.dumps([label, *(a for a in argv if not a.startswith(str(work)))])
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    if reuse and key in cached:
        result = cached[key]
    else:
        result = _measure(label, argv, work, timeout)
        if "error" not in result:
            cached[key] = result
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(cached, indent=1) + "\n")
    if "error" in result:
        return result
    result = {**result, "plan": estimate(argv)}
    measured = result["peak"] - result["baseline"]
    total = result["plan"]["total"]
    return {**result, "measured": measured, "estimate": total, "ratio": total / max(measured, 1)}


def _measure(label: str, argv: list[str], work: Path, timeout: float) -> dict[str, Any]:
    result_path = work / (re.sub(r"\W+", "-", label) + ".json")
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TQDM_DISABLE": "1"}
    logfile = work / (re.sub(r"\W+", "-", label) + ".log")
    result = run_child(
        [sys.executable, __file__, "--child", json.dumps(argv), "--result", str(result_path)],
        result_path,
        env=env,
        timeout=timeout,
        log_path=logfile,
    )
    return result


def row(model: str, label: str, r: dict[str, Any]) -> list[Any]:
    if "error" in r:
        return [model, label, "-", "-", "-", "-", f"failed: {r['error']}"]
    return [
        model,
        label,
        f"{r['baseline'] / MIB:,.0f}",
        f"{r['peak'] / MIB:,.0f}",
        f"{r['measured'] / MIB:,.1f}",
        f"{r['estimate'] / MIB:,.1f}",
        f"{100 * (r['ratio'] - 1):+.0f}%",
    ]


COLUMNS = [
    "model",
    "run",
    "baseline MiB",
    "peak MiB",
    "measured (peak - baseline) MiB",
    "--dry-run MiB",
    "estimate vs measured",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny", help="tiny, smollm2 (comma-separated)")
    parser.add_argument("--only", default="", help="run only the configurations whose label contains this")
    parser.add_argument("--exact", action="store_true", help="--only names one label exactly")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--reuse", action="store_true", help="reuse the measurements cached in --cache")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"where measurements are kept (default {CACHE})")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child), args.result)
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="rlkit-memory-plan-") as tmp:
        work = Path(tmp)
        for model in args.models.split(","):
            if model == "tiny":
                path = work / "tiny-llama"
                build_tiny(path)
            elif model == "smollm2":
                if not GGUF.is_file():
                    log(f"SmolLM2 skipped: {GGUF} is missing (`make demo-model` fetches it)")
                    continue
                path = GGUF
            else:
                raise SystemExit(f"unknown model {model!r}")
            for label, argv in configurations(model, str(path), work):
                if args.only and (args.only != label if args.exact else args.only not in label):
                    continue
                log(f"{model}: {label}")
                r = measure(f"{model} {label}", argv, work, args.timeout, args.reuse, args.cache)
                rows.append(row(model, label, r))
                log("  " + " | ".join(map(str, rows[-1][2:])))
    table = markdown_table(COLUMNS, rows)
    print(table)
    if args.write_docs:
        header = (
            f"Measured {time.strftime('%Y-%m-%d')} with `python bench/memory_plan.py --models {args.models}` "
            + (
                f"(the measurements reused from {args.cache.name}, where earlier runs of this bench left "
                "them, the estimates computed now; "
                if args.reuse
                else f"({(time.time() - started) / 60:.0f} min; "
            )
            + "1 torch thread, 2 training steps each, on a shared 2-core machine). Baseline: the "
            "process's RSS before its first model loads (Python, torch, transformers, peft, datasets, the tokenizer "
            "and the data); peak: the kernel's peak RSS over the training steps (the counter reset after loading)."
        )
        replace_block(REPO / "docs" / "benchmarks.md", "memory-plan", header + "\n\n" + table)


if __name__ == "__main__":
    main()
