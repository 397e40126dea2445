"""GRPO throughput and memory: `rlkit grpo` against TRL's GRPOTrainer (trl 1.16, transformers `generate`, no vLLM).

    python bench/grpo.py                                  # tiny Llama, fp32: rlkit and TRL; 3 repeats
    python bench/grpo.py --models tiny,smollm2            # also SmolLM2-135M-Instruct, LoRA (needs `make demo-model`)
    python bench/grpo.py --models smollm2 --smollm2-full --precision bf16
    python bench/grpo.py --repeats 1 --steps 3 --no-doc   # a quick look, table on stdout only

Every configuration runs in its own process, one after another, with one torch thread
(--threads). Both trainers are measured the same way: `GenerationMixin.generate` is wrapped to
time generation and count the prompt tokens (attention mask) and completion tokens (through the
first EOS) it produces, and the end of each optimizer step is marked (rlkit: its per-step
summary in the metrics log; TRL: `on_step_end`). The first --warmup steps are left out; a run's
numbers are medians over its measured steps, a configuration's the median over its --repeats
runs (which alternate who goes first), peak RSS the median of the runs' peaks.

tokens/s = (prompt + completion tokens of a step) / step time, the issue's measure; the step
time is split into generation and the rest (scoring, the no-grad forwards, the update).

What is held equal: the model directory, the prompts (rlkit/demo/data/grpo_prompts.jsonl, as
one-message conversations both sides render with the tokenizer's chat template), G
(--num-generations / num_generations), completion length (--max-new-tokens /
max_completion_length), the reward (`bench_reward` below: the demo task's arithmetic checker on
the `answer` column, which both trainers pass as a keyword argument), the batch (completions per
micro-batch x accumulation; one rollout per optimizer step, num_iterations 1), learning rate,
beta 0 (no reference on either side), loss_type dapo, scale_rewards group, epsilon 0.2,
temperature 1, gradient clipping at 1, seed, precision, no gradient checkpointing. What differs
is each trainer's own (rlkit generates a process's whole rollout at once on the merged LoRA
weights, each distinct prompt prefilled once for its G rows, and runs each prompt once per
micro-batch in its forwards; TRL generates its whole generation batch at once through the PEFT
model and runs every row whole).

TRL lives in its own virtual environment (default .cache/bench/trl116-venv, created on first use
with `trl==1.16.0 --no-deps`, sharing this environment's torch/transformers through a .pth
bridge; see bench/common.py). It never becomes an rlkit dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    combine_runs,
    command_line,
    ensure_venv_with,
    log,
    markdown_table,
    matmul_params_of,
    matmul_peak_flops,
    mfu,
    mfu_line,
    model_flops_per_token,
    replace_block,
    run_child,
    run_header,
    trl_run_args,
    versions,
    write_step_result,
)

DEFAULT_GGUF = REPO / ".cache" / "demo" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PROMPTS = REPO / "rlkit" / "demo" / "data" / "grpo_prompts.jsonl"
DEFAULT_WORK = REPO / ".cache" / "bench"
TRL_REQUIREMENT = "trl==1.16.0"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"}
LABELS = {"rlkit": "rlkit grpo", "trl": "TRL GRPOTrainer"}


def bench_reward(prompts: list[Any], completions: list[Any], answer: list[int], **_: Any) -> list[float]:
    """The demo checker on plain text: TRL hands conversational completions as message lists."""
    from rlkit.demo.task import arithmetic_reward

    def text(x: Any) -> str:
        return x if isinstance(x, str) else " ".join(m["content"] for m in x)

    return arithmetic_reward([text(p) for p in prompts], [text(c) for c in completions], answer)


# ---- children --------------------------------------------------------------------------------


class GRPOClock:
    """Per optimizer step: wall, CPU, generation s, prompt and completion tokens (from `generate`)."""

    def __init__(self, eos_id: int | None = None) -> None:
        self.steps: list[dict[str, float]] = []
        self.mark = (0.0, 0.0)
        self.eos_id = eos_id
        self.pending = {"generation_s": 0.0, "prompt_tokens": 0.0, "completion_tokens": 0.0}

    def wrap_generate(self) -> None:
        """Time and count every `generate` call (both trainers sample through it)."""
        import torch
        from transformers.generation.utils import GenerationMixin

        real = GenerationMixin.generate
        clock = self

        def timed(model: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = real(model, *args, **kwargs)
            clock.pending["generation_s"] += time.perf_counter() - t0
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            completions = sequences[:, ids.shape[1] :]
            is_eos = completions == clock.eos_id
            ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completions.shape[1])
            clock.pending["prompt_tokens"] += float(mask.sum() if mask is not None else ids.numel())
            clock.pending["completion_tokens"] += float(ends.sum())
            return out

        GenerationMixin.generate = timed

    def start(self) -> None:
        self.mark = (time.perf_counter(), time.process_time())

    def step(self) -> None:
        now = (time.perf_counter(), time.process_time())
        wall, cpu = now[0] - self.mark[0], now[1] - self.mark[1]
        self.steps.append({"wall_s": wall, "cpu_s": cpu, **self.pending})
        self.pending = {k: 0.0 for k in self.pending}
        self.mark = now


def finish(result_path: str, clock: GRPOClock, warmup: int, extra: dict[str, Any]) -> None:
    write_step_result(result_path, clock.steps, warmup, extra)


def grpo_argv(spec: dict[str, Any]) -> list[str]:
    argv = [
        "grpo",
        spec["model"],
        spec["prompts"],
        "-o",
        spec["out"],
        "--overwrite",
        "--reward",
        "grpo:bench_reward",
        "--num-generations",
        str(spec["num_generations"]),
        "--max-steps",
        str(spec["steps"]),
        "--batch-size",
        str(spec["batch"]),
        "--grad-accum",
        str(spec["grad_accum"]),
        "--max-new-tokens",
        str(spec["max_new_tokens"]),
        "--temperature",
        "1.0",
        "--lr",
        str(spec["lr"]),
        "--scheduler",
        "linear",
        "--seed",
        str(spec["seed"]),
        "--precision",
        spec["precision"],
        "--sample-every",
        "0",
        "--log-every",
        "1000",
        "--max-length",
        "2048",
    ]
    if spec["lora"]:
        argv += ["--lora", "--lora-r", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"])]
        argv += ["--lora-dropout", str(LORA["dropout"]), "--lora-targets", LORA["targets"]]
    else:
        argv += ["--full"]
    return argv


def child_rlkit(spec: dict[str, Any], result_path: str) -> None:
    """`rlkit grpo` as `python -m rlkit` runs it; its per-step summary marks the end of every step."""
    from rlkit.models.load import load_tokenizer, resolve_source
    from rlkit.training import engine, metrics

    clock = GRPOClock(load_tokenizer(resolve_source(spec["model"])).eos_token_id)
    clock.wrap_generate()
    fit, sink_log = engine.Engine.fit, metrics.MetricsSink.log

    def timed_fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        clock.start()
        return fit(self, *args, **kwargs)

    def timed_log(self: Any, step: int, values: dict[str, Any]) -> Any:
        if "reward/mean" in values:  # the step's summary: its (only) update is done
            clock.step()
        return sink_log(self, step, values)

    engine.Engine.fit, metrics.MetricsSink.log = timed_fit, timed_log
    argv = grpo_argv(spec)
    sys.argv = ["rlkit", *argv]
    from rlkit.cli import main

    try:
        main()
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    finish(result_path, clock, spec["warmup"], {"command": "rlkit " + command_line(argv)})


def child_trl(spec: dict[str, Any], result_path: str) -> None:
    """TRL's GRPOTrainer with the same model, prompts, G, lengths, reward, batch and hyper-parameters."""
    if spec["precision"] == "bf16":
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token is None:  # as rlkit does
        tok.pad_token = tok.eos_token
    clock = GRPOClock(tok.eos_token_id)
    clock.wrap_generate()

    class Timer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.step()

    rows = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines() if line.strip()]
    train = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )
    frozen = torch.bfloat16 if spec["precision"] == "bf16" and spec["lora"] else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=frozen)
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["targets"],
            task_type="CAUSAL_LM",
        )
    args = GRPOConfig(
        output_dir=spec["out"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=spec["grad_accum"],
        num_generations=spec["num_generations"],
        max_completion_length=spec["max_new_tokens"],
        max_steps=spec["steps"],
        temperature=1.0,
        learning_rate=spec["lr"],
        lr_scheduler_type="linear",
        optim="adamw_torch",
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        epsilon=0.2,
        num_iterations=1,
        max_grad_norm=1.0,
        log_completions=False,
        **{**trl_run_args(spec["seed"]), "bf16": spec["precision"] == "bf16"},
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[bench_reward],
        args=args,
        train_dataset=train,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    trainer.train()
    finish(result_path, clock, spec["warmup"], {"trl": trl.__version__})


def child_main(kind: str, spec_json: str, result_path: str) -> None:
    spec = json.loads(spec_json)
    if kind == "rlkit":
        child_rlkit(spec, result_path)
    elif kind == "trl":
        child_trl(spec, result_path)
    elif kind == "build-tiny":
        from bench_sft import build_tiny

        build_tiny(Path(spec["out"]), Path(spec["data_dir"]))
    elif kind == "convert":
        from bench_sft import convert_gguf

        convert_gguf(Path(spec["gguf"]), Path(spec["out"]))
    else:
        raise SystemExit(f"unknown child kind {kind}")


# ---- the orchestrator ------------------------------------------------------------------------


def run_summary(result: dict[str, Any]) -> dict[str, float]:
    """One run's medians over its measured steps."""
    steps = result["steps"]
    med = lambda key: statistics.median(s[key] for s in steps)  # noqa: E731
    tokens = [s["prompt_tokens"] + s["completion_tokens"] for s in steps]
    return {
        "step_s": med("wall_s"),
        "cpu_s": med("cpu_s"),
        "generation_s": med("generation_s"),
        "rest_s": statistics.median(s["wall_s"] - s["generation_s"] for s in steps),
        "tokens_per_step": statistics.median(tokens),
        "completion_tokens_per_step": med("completion_tokens"),
        "tokens_per_s": statistics.median(t / max(s["wall_s"], 1e-9) for t, s in zip(tokens, steps)),
        "peak_rss_mib": result["peak_rss_mib"],
        "steps_measured": len(steps),
    }


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="tiny", help="comma-separated: tiny, smollm2 (default: tiny)")
    p.add_argument("--trainers", default="rlkit,trl", help="comma-separated: rlkit, trl (default: both)")
    p.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="SmolLM2-135M-Instruct .gguf (`make demo-model`)")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument("--steps", type=int, default=10, help="measured steps per tiny-model run (default 10)")
    p.add_argument("--smollm2-steps", type=int, default=3, help="measured steps per SmolLM2 run (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="steps run before measuring (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration, alternating order (default 3)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS; default 1)")
    p.add_argument("--num-generations", type=int, default=8, help="G (default 8)")
    p.add_argument("--batch", type=int, default=16, help="completions per micro-batch (default 16)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--smollm2-full", action="store_true", help="full fine-tuning of SmolLM2 (default: LoRA r 16)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache and results dir (default .cache/bench)")
    p.add_argument("--trl-venv", type=Path, default=None, help="separate venv for TRL (default WORK/trl116-venv)")
    p.add_argument("--trl-requirement", default=TRL_REQUIREMENT)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument(
        "--doc", type=Path, default=REPO / "docs" / "grpo.md", help="page whose bench:grpo block is rewritten"
    )
    p.add_argument("--no-doc", action="store_true", help="print the table only")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.spec, args.result)
        return 0
    started, load_before = time.time(), os.getloadavg()
    work = args.work.resolve()
    results_dir, logs = work / "grpo", work / "grpo" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    trainers = [t for t in args.trainers.split(",") if t]
    trl_python, notes = None, []
    if "trl" in trainers:
        trl_python, message = ensure_venv_with(
            args.trl_venv or work / "trl116-venv", args.trl_requirement, "trl", "from trl import GRPOTrainer"
        )
        log(message)
        if trl_python is None:
            notes.append(f"TRL skipped: {message}")
            trainers.remove("trl")
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    run_env = {**env, "PYTHONPATH": str(Path(__file__).resolve().parent), "TQDM_DISABLE": "1"}
    this = [sys.executable, str(Path(__file__).resolve())]
    table: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    # the MFU column: model FLOPs over this CPU's matmul rate in the run's precision, measured now
    mfu_of: dict[str, Any] = {"peak": matmul_peak_flops("cpu", args.precision), "train": {}, "sample": {}}
    settings: dict[str, str] = {}
    run_loads: list[float] = []
    tmp = Path(tempfile.mkdtemp(prefix="rlkit-bench-grpo-"))
    try:
        for name in [m for m in args.models.split(",") if m]:
            model_dir, skipped = bench_model(
                name,
                child=this,
                tmp=tmp,
                smollm2_dir=work / "SmolLM2-135M-Instruct",
                gguf=args.gguf,
                data_dir=args.prompts.parent,
                env=env,
                logs=logs,
            )
            if model_dir is None:
                notes.append(skipped)
                continue
            lora = name != "tiny" and not args.smollm2_full
            steps = args.steps if name == "tiny" else args.smollm2_steps
            label = ("tiny Llama" if name == "tiny" else "SmolLM2-135M-Instruct") + (" LoRA" if lora else " full")
            label += f", {args.precision}"
            matmul, layers, hidden = matmul_params_of(str(model_dir))
            context = 64 + args.max_new_tokens  # short demo prompts, then the completion
            mfu_of["train"][label] = model_flops_per_token(matmul, layers, hidden, context, lora=lora)
            mfu_of["sample"][label] = model_flops_per_token(matmul, layers, hidden, context, train=False)
            lr = 1e-5 if lora else 1e-6
            batch = args.batch * args.grad_accum
            settings[label] = (
                f"{'LoRA (r 16, alpha 32, dropout 0.05, all-linear)' if lora else 'full fine-tuning'}; "
                f"{batch} completions per step ({batch // args.num_generations} prompts x G {args.num_generations}), "
                f"micro-batch {args.batch} x grad-accum {args.grad_accum}; up to {args.max_new_tokens} new tokens; lr {lr:g}; "
                f"{args.warmup} warmup + {steps} measured steps per run, {args.repeats} runs per configuration"
            )
            runs: dict[str, list[dict[str, Any]]] = {}
            for repeat in range(args.repeats):
                for trainer in list(reversed(trainers)) if repeat % 2 else list(trainers):
                    key = f"{name}-{'lora' if lora else 'full'}-{args.precision}-{trainer}-{repeat + 1}"
                    spec = {
                        "model": str(model_dir),
                        "prompts": str(args.prompts.resolve()),
                        "out": str(tmp / "out" / key),
                        "steps": steps + args.warmup,
                        "warmup": args.warmup,
                        "batch": args.batch,
                        "grad_accum": args.grad_accum,
                        "num_generations": args.num_generations,
                        "max_new_tokens": args.max_new_tokens,
                        "lr": lr,
                        "seed": args.seed,
                        "lora": lora,
                        "precision": args.precision,
                    }
                    python = trl_python if trainer == "trl" else sys.executable
                    run_loads.append(os.getloadavg()[0])
                    log(f"{key}: {args.warmup} warmup + {steps} measured steps (load average {run_loads[-1]:.1f}) ...")
                    result_path = results_dir / f"{key}.json"
                    result = run_child(
                        [python, this[1], "--child", trainer, "--spec", json.dumps(spec), "--result", str(result_path)],
                        result_path,
                        run_env,
                        args.timeout,
                        logs / f"{key}.log",
                    )
                    for leftover in (tmp / "out" / key, tmp / "out" / f"{key}.partial"):
                        shutil.rmtree(leftover, ignore_errors=True)
                    if "error" in result or not result.get("steps"):
                        log(f"{key}: FAILED {result.get('error', 'no steps')} (log: {logs / (key + '.log')})")
                        continue
                    one = run_summary(result)
                    log(
                        f"{key}: step {one['step_s']:.2f}s (generation {one['generation_s']:.2f}s), "
                        f"{one['tokens_per_s']:.0f} tok/s, peak RSS {one['peak_rss_mib']:.0f} MiB"
                    )
                    runs.setdefault(trainer, []).append(one)
            table[label] = [(t, combine_runs(runs[t])) for t in trainers if runs.get(t)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = {
        "command": command_line(["python", "bench/grpo.py", *argv]),
        "date": time.strftime("%Y-%m-%d"),
        "minutes": (time.time() - started) / 60,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "run_loads": run_loads,
        "threads": args.threads,
        "smollm2_full": args.smollm2_full,
        "trl": versions(["trl"], trl_python).get("trl") if trl_python else None,
        "precision": args.precision,
        "mfu": mfu_of,
    }
    summary = {"table": table, "settings": settings, "notes": notes, "meta": meta}
    (results_dir / f"summary-{args.precision}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return report(summary, None if args.no_doc else args.doc)


def report(summary: dict[str, Any], doc: Path | None) -> int:
    """The table (stdout) and, with `doc`, its bench:grpo block, from a run's summary."""
    table, meta = summary["table"], summary["meta"]
    trl_v = meta.get("trl")
    mfu_of = meta.get("mfu") or {}  # summaries written before the MFU column have none

    def utilisation(label: str, r: dict[str, Any]) -> str:
        """Every token of a step trained once, every completion token also sampled (one forward);
        the rollout's no-grad forwards are not counted: a lower bound."""
        if label not in mfu_of.get("train", {}):
            return "-"
        work = mfu_of["train"][label] * r["tokens_per_step"] + mfu_of["sample"][label] * r["completion_tokens_per_step"]
        return f"{100 * mfu(1 / max(r['step_s'], 1e-9), work, mfu_of['peak']):.2f}%"

    rows = []
    for label, results in table.items():
        trl_row = dict(results).get("trl")
        for trainer, r in results:
            rows.append(
                [
                    label,
                    LABELS[trainer] + (f" {trl_v}" if trainer == "trl" and trl_v else ""),
                    fmt(r["step_s"]),
                    f"{r['step_s_range'][0]:.2f}-{r['step_s_range'][1]:.2f}",
                    fmt(r["generation_s"]),
                    fmt(r["rest_s"]),
                    fmt(r["tokens_per_step"], 0),
                    fmt(r["tokens_per_s"], 0),
                    utilisation(label, r),
                    f"{r['tokens_per_s'] / trl_row['tokens_per_s']:.2f}x" if trl_row else "-",
                    fmt(r["peak_rss_mib"], 0),
                    f"{r['peak_rss_mib'] / trl_row['peak_rss_mib']:.2f}x" if trl_row else "-",
                ]
            )
    columns = ["model", "trainer", "s / step", "range over runs", "generation s", "the rest s"]
    columns += ["tokens / step", "tokens/s", "MFU", "vs TRL", "peak RSS (MiB)", "RSS vs TRL"]
    t = markdown_table(columns, rows)
    print(t)
    notes = list(summary["notes"])
    if mfu_of:
        notes.append(
            mfu_line("cpu", {meta.get("precision", "fp32"): mfu_of["peak"]})
            + " Per step: every token trained once, every completion token also sampled; the rollout's no-grad"
            " forwards are not counted (a lower bound)."
        )
    header = run_header(meta, summary["settings"], notes)
    if doc is not None:  # one block per precision, and one for --smollm2-full runs
        name = f"grpo-{meta['precision']}" + ("-full" if meta.get("smollm2_full") else "")
        replace_block(doc, name, "\n".join(header) + "\n\n" + t)
        log(f"wrote the bench:{name} block of {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
