"""The GPU benchmark: sft, dpo, ppo and grpo on SmolLM2-135M and a ~1B Llama, bf16, with tokens/s,
peak GPU memory and MFU, rlkit and (where the CPU benches already run it) TRL side by side.

    make bench-gpu                                   # on a CUDA machine: everything below, ~15-25 min
    python bench/gpu.py --models smollm2 --trainers sft,grpo --steps 5
    python bench/gpu.py --device cpu --models tiny --steps 1 --no-trl --no-doc   # the CPU dry run (a test)

Nothing but this repo is needed: SmolLM2-135M-Instruct comes from the demo's .gguf (`make demo-model`,
converted once to an HF dir), and the ~1B model is a Llama built from a config with random weights
(hidden 2048, 16 layers, MLP 8192, 32 heads / 8 KV heads, tied embeddings, a 49,152-entry vocabulary:
1.07B parameters) with SmolLM2's tokenizer, or the test suite's when the .gguf is absent: it never
needs a download.

Each (model, trainer, side) runs in its own process, one after another. Measured per run:

- tokens/s: rlkit sft and dpo, the engine's trained tokens (every non-padding token of the step's
  micro-batches) over the step's wall time; grpo and ppo, the measures of bench/grpo.py and
  bench/ppo.py on both sides (grpo: prompt + completion tokens of a step over its wall time; ppo:
  response tokens over the step's wall time, generation included), whose children run here as is;
- peak GPU memory: `torch.cuda.max_memory_allocated()` over training (reset when training starts),
  and `max_memory_reserved()` (what the caching allocator took from the driver);
- MFU: model FLOPs per second (bench/common.py `model_flops_per_token`: 6N per trained token, 4N with
  LoRA, + 12 x layers x hidden x context for attention; generation and no-grad forwards of ppo/grpo
  are not counted, so their MFU is a lower bound) over the bf16 matmul peak measured in the same
  run (a large `torch.mm`), and over the GPU's data-sheet peak when it is a known one.

TRL runs for grpo and ppo through bench/grpo.py's and bench/ppo.py's own TRL children, each in the
venv its CPU bench builds on first use (bench/common.py `ensure_venv_with`): grpo on TRL 1.16
(.cache/bench/trl116-venv), ppo on bench/ppo.py's pin (.cache/bench/trl112-venv: the
`trl.experimental.ppo` PPOTrainer its child drives). sft and dpo have no TRL column yet:
bench/bench_sft.py's and bench/preference.py's TRL children are fp32 / CPU-only. `--no-trl`, or no
TRL venv and no network to build one, runs rlkit alone (the table's notes say so).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO,
    bench_model,
    ensure_venv_with,
    gpu_peak_flops,
    log,
    markdown_table,
    matmul_params_of,
    matmul_peak_flops,
    mfu,
    mfu_line,
    model_flops_per_token,
    replace_block,
    run_child,
)

DATA = REPO / "rlkit" / "demo" / "data"
DEFAULT_GGUF = REPO / ".cache" / "demo" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_WORK = REPO / ".cache" / "bench"
TRL_REQUIREMENT = "trl==1.16.0"
TRAINERS = ("sft", "dpo", "ppo", "grpo")
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    rope_theta=500000.0,
)


# ---- the runs ---------------------------------------------------------------------------------


def settings(trainer: str, device: str, steps: int, warmup: int) -> dict[str, Any]:
    """Sizes per trainer; the CPU dry run shrinks them to seconds."""
    small = device == "cpu"
    return {
        "sft": {"batch": 2 if small else 8, "max_length": 128 if small else 1024},
        "dpo": {"batch": 2 if small else 8, "max_length": 128 if small else 1024},
        "ppo": {
            "batch": 2 if small else 16,
            "grad_accum": 1,
            "mini_batches": 1,
            "ppo_epochs": 1 if small else 2,
            "max_new_tokens": 8 if small else 128,
        },
        "grpo": {
            "batch": 4 if small else 16,
            "grad_accum": 1 if small else 2,
            "num_generations": 2 if small else 8,
            "max_new_tokens": 8 if small else 128,
        },
    }[trainer] | {"steps": steps + warmup, "warmup": warmup}


def spec_for(
    trainer: str, model_dir: Path, out: Path, precision: str, lora: bool, s: dict[str, Any], rm: Path | None
) -> dict[str, Any]:
    spec = {
        "model": str(model_dir),
        "out": str(out),
        "precision": precision,
        "lora": lora,
        "lr": 1e-5 if lora else 1e-6,
        "seed": 42,
        **s,
    }
    if trainer == "grpo":
        spec["prompts"] = str(DATA / "grpo_prompts.jsonl")
    if trainer == "ppo":
        spec.update(prompts=str(DATA / "prompts.jsonl"), rm=str(rm), temperature=1.0, kl_coef=0.05)
    return spec


def rlkit_argv(trainer: str, spec: dict[str, Any]) -> list[str]:
    """The `rlkit` command of sft and dpo (ppo and grpo: bench/ppo.py's and bench/grpo.py's own)."""
    data = DATA / ("sft.jsonl" if trainer == "sft" else "pairs.jsonl")
    argv = [
        trainer,
        spec["model"],
        str(data),
        "-o",
        spec["out"],
        "--overwrite",
        "--max-steps",
        str(spec["steps"]),
        "--batch-size",
        str(spec["batch"]),
        "--max-length",
        str(spec["max_length"]),
        "--precision",
        spec["precision"],
        "--seed",
        str(spec["seed"]),
        "--lr",
        str(spec["lr"]),
        "--log-every",
        "1000",
    ]
    return argv + (["--lora"] if spec["lora"] else ["--full"])


def _gpu_memory(result_path: str, device: str) -> None:
    """Add the peak GPU memory of training to a child's JSON result."""
    import torch

    result = json.loads(Path(result_path).read_text())
    if device == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["reserved_gpu_mib"] = torch.cuda.max_memory_reserved() / 2**20
    Path(result_path).write_text(json.dumps(result, indent=1) + "\n")


def _reset_peak_at_fit() -> None:
    """Peak GPU memory from the start of training: loading's transient copies left out."""
    import torch

    from rlkit.training import engine

    fit = engine.Engine.fit

    def fit_from_zero(self: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return fit(self, *args, **kwargs)

    engine.Engine.fit = fit_from_zero  # type: ignore[method-assign]


def child_rlkit_engine(trainer: str, spec: dict[str, Any], result_path: str) -> None:
    """rlkit sft/dpo in-process; every step's trained tokens and wall time from its metrics."""
    from rlkit.training import metrics

    steps: list[dict[str, float]] = []
    sink_log = metrics.MetricsSink.log

    def timed_log(self: Any, step: int, values: dict[str, Any]) -> Any:
        if "tokens_per_s" in values and "step_time_s" in values:
            steps.append({"tokens": values["tokens_per_s"] * values["step_time_s"], "wall_s": values["step_time_s"]})
        return sink_log(self, step, values)

    metrics.MetricsSink.log = timed_log  # type: ignore[method-assign]
    argv = rlkit_argv(trainer, spec)
    sys.argv = ["rlkit", *argv]
    from rlkit.cli import main

    try:
        main()
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    skip = min(spec["warmup"], max(len(steps) - 1, 0))
    Path(result_path).write_text(json.dumps({"steps": steps[skip:], "command": "rlkit " + " ".join(argv)}) + "\n")


def child(kind: str, spec: Any, result_path: str, device: str) -> None:
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the dry run stays on the CPU even on a GPU machine
    if kind == "all:rlkit":  # the CPU dry run: every trainer in one process
        from rlkit.training import engine, metrics

        for trainer, one, path in spec:
            saved = engine.Engine.fit, metrics.MetricsSink.log
            try:
                child(f"{trainer}:rlkit", one, path, device)
            finally:
                engine.Engine.fit, metrics.MetricsSink.log = saved  # each child's own timers, undone
        return
    trainer, side = kind.split(":")
    _reset_peak_at_fit()
    if side == "rlkit" and trainer in ("sft", "dpo"):
        child_rlkit_engine(trainer, spec, result_path)
    elif trainer == "grpo":
        import grpo

        (grpo.child_rlkit if side == "rlkit" else grpo.child_trl)(spec, result_path)
    elif trainer == "ppo":
        import ppo

        ppo.child_rlkit(spec, result_path, "rm") if side == "rlkit" else ppo.child_trl(spec, result_path)
    else:
        raise SystemExit(f"no {side} child for {trainer}")
    _gpu_memory(result_path, device)


def tokens_per_s(trainer: str, side: str, result: dict[str, Any]) -> float:
    """The run's median over its measured steps, in each bench's own measure (see the docstring)."""
    steps = result["steps"]
    if trainer in ("sft", "dpo"):
        rates = [s["tokens"] / max(s["wall_s"], 1e-9) for s in steps]
    elif trainer == "grpo":
        rates = [(s["prompt_tokens"] + s["completion_tokens"]) / max(s["wall_s"], 1e-9) for s in steps]
    else:
        rates = [s["response_tokens"] / max(s["wall_s"], 1e-9) for s in steps]
    return statistics.median(rates) if rates else float("nan")


def context_of(trainer: str, spec: dict[str, Any]) -> float:
    """The row length attention runs over, for the attention term of the FLOPs."""
    if trainer in ("sft", "dpo"):
        return float(spec["max_length"])
    return 64.0 + spec["max_new_tokens"]  # the demo prompts are short (tens of tokens)


# ---- models -----------------------------------------------------------------------------------


def build_llama_1b(tokenizer_dir: Path, out: Path, device: str) -> None:
    """A Llama-3.2-1B-shaped model with random weights, saved in bf16, with the tokenizer of
    `tokenizer_dir` and a 49,152-entry vocabulary (SmolLM2's size; a smaller tokenizer, such as the
    test suite's, uses the first entries), so nothing needs downloading."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=max(len(tok), 49152),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        **LLAMA_1B,
    )
    torch.manual_seed(0)
    with torch.device(device if device == "cuda" else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    partial.rename(out)


def models(args: argparse.Namespace, work: Path, tmp: Path, logs: Path, notes: list[str]) -> list[tuple[str, Path]]:
    this_grpo = [sys.executable, str(Path(__file__).resolve().parent / "grpo.py")]  # its build-tiny / convert children
    found: list[tuple[str, Path]] = []
    smollm2 = work / "SmolLM2-135M-Instruct"
    for name in [m for m in args.models.split(",") if m]:
        if name == "tiny":  # built here: a subprocess would cost the CPU dry run another start-up
            from bench_sft import build_tiny

            path, skipped = tmp / "tiny-llama", ""
            build_tiny(path, DATA)
        elif name == "smollm2":
            path, skipped = bench_model(
                name, child=this_grpo, tmp=tmp, smollm2_dir=smollm2, gguf=args.gguf, data_dir=DATA, env={}, logs=logs
            )
        elif name == "llama-1b":
            path, skipped = work / "llama-1b-random", ""
            if not (path / "config.json").is_file():
                # SmolLM2's tokenizer when the demo model is here, else the test suite's (no download either way)
                base, _ = bench_model(
                    "smollm2",
                    child=this_grpo,
                    tmp=tmp,
                    smollm2_dir=smollm2,
                    gguf=args.gguf,
                    data_dir=DATA,
                    env={},
                    logs=logs,
                )
                if base is None:
                    from bench_sft import build_tiny

                    base = tmp / "tokenizer-source"
                    build_tiny(base, DATA)
                log(f"building the ~1B Llama (random weights) in {path} (once)")
                build_llama_1b(base, path, args.device)
            if not (path / "config.json").is_file():
                path, skipped = None, skipped or "llama-1b skipped: it could not be built"
        else:
            raise SystemExit(f"unknown model {name!r} (tiny, smollm2, llama-1b)")
        if path is None:
            notes.append(skipped)
        else:
            found.append((name, path))
    return found


# ---- the orchestrator ---------------------------------------------------------------------------


def run_all(
    args: argparse.Namespace,
    name: str,
    runs: list[tuple[str, str, str, dict[str, Any]]],
    tmp: Path,
    logs: Path,
    env: dict[str, str],
    trl_pythons: dict[str, str],
) -> dict[str, dict[str, Any]]:
    """Each run's JSON result (or {'error': ...}) by key: one process per run on a GPU; on the CPU
    (the dry run) rlkit's runs share one process, one start-up instead of four."""
    this = str(Path(__file__).resolve())
    results: dict[str, dict[str, Any]] = {}
    if args.device == "cpu":
        batch = [(trainer, spec, str(tmp / f"{key}.json")) for trainer, side, key, spec in runs if side == "rlkit"]
        log(f"{name}: rlkit {', '.join(t for t, _, _ in batch)} (one process)")
        done = run_child(
            [sys.executable, this, "--device", "cpu", "--child", "all:rlkit", "--spec", json.dumps(batch)]
            + ["--result", batch[-1][2]],
            Path(batch[-1][2]),
            env=env,
            timeout=args.timeout,
            log_path=logs / f"{name}-rlkit.log",
        )
        for _trainer, side, key, _ in runs:
            path = tmp / f"{key}.json"
            if side == "rlkit":
                results[key] = json.loads(path.read_text()) if "error" not in done and path.is_file() else done
    for trainer, side, key, spec in runs:
        if key in results:
            continue
        log(f"{name} {trainer} ({side})")
        path = tmp / f"{key}.json"
        results[key] = run_child(
            [trl_pythons[trainer] if side == "trl" else sys.executable, this, "--device", args.device]
            + ["--child", f"{trainer}:{side}", "--spec", json.dumps(spec), "--result", str(path)],
            path,
            env=env,
            timeout=args.timeout,
            log_path=logs / f"{key}.log",
        )
    return results


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--models", default="smollm2,llama-1b", help="comma-separated: smollm2, llama-1b, tiny")
    p.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated: sft, dpo, ppo, grpo")
    p.add_argument("--steps", type=int, default=10, help="measured steps per run (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="steps run before measuring (default 2; 0 with --steps 1)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--lora", action="store_true", help="LoRA r 16 (default: full fine-tuning)")
    p.add_argument("--no-trl", action="store_true", help="rlkit only")
    p.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p.add_argument("--trl-venv", type=Path, default=None, help="default WORK/trl116-venv")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--no-doc", action="store_true", help="print the table only (else also docs/benchmarks.md)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child, json.loads(args.spec), args.result, args.device)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; `--device cpu --models tiny --steps 1` is the CPU dry run")
    precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    warmup = 0 if args.steps == 1 else args.warmup
    started = time.time()
    work = args.work.resolve()
    logs = work / "gpu" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    gpu_name = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    peaks = {
        dt: matmul_peak_flops(args.device, dt) for dt in (("bf16",) if args.device == "cuda" else ("fp32", "bf16"))
    }
    peak = peaks["bf16"] if precision == "bf16" else peaks["fp32"]
    sheet = gpu_peak_flops(gpu_name)
    log(", ".join(f"{k} matmul peak {v / 1e12:.2f} TFLOP/s" for k, v in peaks.items()))
    trainers = [t for t in args.trainers.split(",") if t]
    # TRL per trainer, each in the venv its CPU bench uses: GRPO on TRL 1.16 (bench/grpo.py); PPO on
    # bench/ppo.py's pin, where trl.experimental.ppo's PPOTrainer is the one its TRL child drives
    trl_pythons: dict[str, str] = {}
    if args.no_trl:
        notes.append("TRL not run (--no-trl): rlkit only")
    else:
        import ppo

        wanted = {
            "grpo": (args.trl_venv or work / "trl116-venv", TRL_REQUIREMENT, "from trl import GRPOTrainer"),
            "ppo": (work / "trl112-venv", ppo.TRL_REQUIREMENT, "from trl.experimental.ppo import PPOTrainer"),
        }
        for trainer in [t for t in trainers if t in wanted]:
            venv, requirement, check = wanted[trainer]
            python, message = ensure_venv_with(venv, requirement, "trl", check)
            log(message)
            if python is None:
                notes.append(f"TRL not run for {trainer}: {message}")
            else:
                trl_pythons[trainer] = python
        notes.append(
            "sft and dpo have no TRL column yet (bench/bench_sft.py's and bench/preference.py's TRL children are fp32 / CPU-only)"
        )
    rows = []
    env = {"TQDM_DISABLE": "1", "PYTHONPATH": str(Path(__file__).resolve().parent)}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    tmp = Path(tempfile.mkdtemp(prefix="rlkit-bench-gpu-"))
    for name, model_dir in models(args, work, tmp, logs, notes):
        matmul, layers, hidden = matmul_params_of(str(model_dir))
        rm = None
        if "ppo" in trainers:
            rm = tmp / f"{name}-rm"
            import ppo

            ppo.build_reward_model(model_dir, rm)  # the small random reward model bench/ppo.py scores with
        runs = []
        for trainer in trainers:
            s = settings(trainer, args.device, args.steps, warmup)
            for side in ["rlkit"] + (["trl"] if trainer in trl_pythons else []):
                key = f"{name}-{trainer}-{side}"
                runs.append((trainer, side, key, spec_for(trainer, model_dir, tmp / key, precision, args.lora, s, rm)))
        results = run_all(args, name, runs, tmp, logs, env, trl_pythons)
        for trainer, side, key, spec in runs:
            result = results[key]
            label = "rlkit" if side == "rlkit" else "TRL"
            if "error" in result:
                rows.append(
                    [name, trainer, label, "-", "-", "-", f"failed: {result['error']} ({logs / (key + '.log')})"]
                )
                continue
            rate = tokens_per_s(trainer, side, result)
            flops = model_flops_per_token(matmul, layers, hidden, context_of(trainer, spec), lora=args.lora)
            util = mfu(rate, flops, peak)
            util_text = f"{100 * util:.1f}%" + (f" ({100 * mfu(rate, flops, sheet):.1f}%)" if sheet else "")
            memory = f"{result['peak_gpu_mib']:,.0f}" if "peak_gpu_mib" in result else "- (cpu)"
            rows.append([name, trainer, label, f"{rate:,.0f}", memory, util_text, ""])
            log(f"  {name} {trainer} {label}: " + " | ".join(rows[-1][3:6]))
    columns = ["model", "trainer", "side", "tokens/s", "peak GPU MiB", "MFU", "note"]
    table = markdown_table(columns, rows)
    mode = "LoRA r 16" if args.lora else "full fine-tuning"
    header = [
        f"`python bench/gpu.py {' '.join(argv)}` on {gpu_name or 'the CPU'}, {time.strftime('%Y-%m-%d')}, "
        f"{(time.time() - started) / 60:.0f} min; {precision}, {mode}; {warmup} warmup + {args.steps} measured steps per run.",
        "",
        "- " + mfu_line(args.device, peaks, gpu_name),
        *[f"- {n}" for n in notes],
    ]
    print("\n".join(header) + "\n\n" + table)
    if not args.no_doc and args.device == "cuda":
        replace_block(REPO / "docs" / "benchmarks.md", "gpu", "\n".join(header) + "\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
