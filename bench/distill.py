"""Distillation throughput and memory: `rlkit distill` against TRL's DistillationTrainer (trl 1.16, transformers `generate`, no vLLM).

    python bench/distill.py                                # tiny Llama, fp32: rlkit and TRL; 2 repeats
    python bench/distill.py --models tiny,smollm2          # also SmolLM2-135M-Instruct, LoRA: docs/distill.md's table (~15 min)
    python bench/distill.py --repeats 1 --steps 3 --no-doc # a quick look, table on stdout only

On-policy distillation with the same model directory as student and teacher: the student trained,
the teacher frozen. TRL loads the teacher as a second model; so does rlkit under full fine-tuning,
while a LoRA student's teacher (here the student's base itself) runs on the student's own copy of
the base weights (docs/distill.md: one copy of the base when the teacher is on it), as it does for
a teacher that is an adapter on the student's base. Every configuration runs in its own process, one after another, with one torch
thread (--threads). Both trainers are measured the same way: `GenerationMixin.generate` is wrapped
to time generation and count the prompt tokens (attention mask) and completion tokens (through the
first EOS) it produces, and the end of each optimizer step is marked (rlkit: its per-step summary
in the metrics log; TRL: `on_step_end`). The first --warmup steps are left out; a run's numbers
are medians over its measured steps, a configuration's the median over its --repeats runs (which
alternate who goes first), peak RSS the median of the runs' peaks.

tokens/s = completion tokens of a step (the tokens the divergence is trained on, EOS included) /
step time; the step time is split into generation (the student sampling) and training (the
teacher's and the student's forwards over prompt + completion, the chunked divergence over the
whole vocabulary, the backward and the optimizer step).

What is held equal: the model directory (student = teacher), the prompts
(rlkit/demo/data/grpo_prompts.jsonl, as one-message conversations both sides render with the
tokenizer's chat template), completion length (--max-new-tokens / max_completion_length), beta
(0.5: the symmetric JSD), temperature 1 (sampling and divergence), top-p 0.95, top-k 0, one
completion per prompt, always on-policy (rlkit --lmbda 1; TRL's DistillationTrainer always is),
the batch (per-device batch x accumulation; one rollout per optimizer step), learning rate and
its linear schedule without warmup, torch AdamW, gradient clipping at 1, dropout off in the
student (rlkit always; TRL `disable_dropout=True`), the teacher in fp32 as the student, seed,
precision, no gradient checkpointing, no samples logged. What differs is each trainer's own
(rlkit samples on the merged LoRA weights, column-major, with numpy's sort for top-p, computes the
divergence only at completion positions, 128 at a time, inside the student's forward, the frozen
output layer's gradient in closed form; TRL samples through the PEFT model and runs its
chunked-divergence kernel over every completion position of the padded batch, masked after).

Student = teacher makes the divergence 0 at the start (and with LoRA's zero-initialised B, 0
throughout: the gradient is 0), in both trainers alike; every forward, the divergence and the
backward still run in full, which is what is timed.

TRL lives in its own virtual environment (default .cache/bench/trl116-venv, created on first use
with `trl==1.16.0 --no-deps`, sharing this environment's torch/transformers through a .pth
bridge; see bench/common.py), the one bench/grpo.py uses. It never becomes an rlkit dependency.
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
    fmt,
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
    trainer_cells,
    trl_run_args,
    versions,
    versus,
    write_step_result,
)
from grpo import GRPOClock  # noqa: E402  (per step: wall, CPU, generation s, prompt and completion tokens)

DEFAULT_GGUF = REPO / ".cache" / "demo" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PROMPTS = REPO / "rlkit" / "demo" / "data" / "grpo_prompts.jsonl"
DEFAULT_WORK = REPO / ".cache" / "bench"
TRL_REQUIREMENT = "trl==1.16.0"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"}
LABELS = {"rlkit": "rlkit distill", "trl": "TRL DistillationTrainer"}


# ---- children --------------------------------------------------------------------------------


def finish(result_path: str, clock: GRPOClock, losses: list[float], warmup: int, extra: dict[str, Any]) -> None:
    write_step_result(result_path, clock.steps, warmup, {"losses": [round(x, 6) for x in losses], **extra})


def distill_argv(spec: dict[str, Any]) -> list[str]:
    argv = [
        "distill",
        spec["model"],
        spec["prompts"],
        "--teacher",
        spec["model"],
        "--teacher-precision",
        spec["precision"],
        "-o",
        spec["out"],
        "--overwrite",
        "--beta",
        str(spec["beta"]),
        "--lmbda",
        "1.0",
        "--num-generations",
        "1",
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
        "--top-p",
        str(spec["top_p"]),
        "--top-k",
        "0",
        "--lr",
        str(spec["lr"]),
        "--scheduler",
        "linear",
        "--max-grad-norm",
        "1.0",
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
    """`rlkit distill` as `python -m rlkit` runs it; its per-step summary marks the end of every step."""
    from rlkit.models.load import load_tokenizer, resolve_source
    from rlkit.training import engine, metrics

    clock = GRPOClock(load_tokenizer(resolve_source(spec["model"])).eos_token_id)
    clock.wrap_generate()
    losses: list[float] = []
    fit, sink_log = engine.Engine.fit, metrics.MetricsSink.log

    def timed_fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        clock.start()
        return fit(self, *args, **kwargs)

    def timed_log(self: Any, step: int, values: dict[str, Any]) -> Any:
        if "on_policy" in values:  # the step's summary: its (only) update is done
            clock.step()
            if isinstance(values.get("divergence"), (int, float)):
                losses.append(float(values["divergence"]))
        return sink_log(self, step, values)

    engine.Engine.fit, metrics.MetricsSink.log = timed_fit, timed_log
    argv = distill_argv(spec)
    sys.argv = ["rlkit", *argv]
    from rlkit.cli import main

    try:
        main()
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    finish(result_path, clock, losses, spec["warmup"], {"command": "rlkit " + command_line(argv)})


def child_trl(spec: dict[str, Any], result_path: str) -> None:
    """TRL's DistillationTrainer with the same student, teacher, prompts, lengths, beta, batch and
    hyper-parameters."""
    if spec["precision"] == "bf16":
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer  # trl.experimental.distillation before 1.16

    torch.manual_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token is None:  # as rlkit does
        tok.pad_token = tok.eos_token
    clock = GRPOClock(tok.eos_token_id)
    clock.wrap_generate()
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.step()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and isinstance(logs.get("loss"), (int, float)):
                losses.append(float(logs["loss"]))

    rows = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines() if line.strip()]
    train = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
    frozen = torch.bfloat16 if spec["precision"] == "bf16" and spec["lora"] else torch.float32
    student = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=frozen)
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
    args = DistillationConfig(
        output_dir=spec["out"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=spec["grad_accum"],
        max_completion_length=spec["max_new_tokens"],
        max_steps=spec["steps"],
        temperature=1.0,
        top_p=spec["top_p"],
        top_k=0,
        beta=spec["beta"],
        learning_rate=spec["lr"],
        lr_scheduler_type="linear",
        optim="adamw_torch",
        max_grad_norm=1.0,
        disable_dropout=True,  # rlkit distill always trains without dropout
        teacher_model_init_kwargs={"dtype": "bfloat16" if frozen == torch.bfloat16 else "float32"},
        log_completions=False,
        **{**trl_run_args(spec["seed"]), "bf16": spec["precision"] == "bf16"},
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=spec["model"],
        args=args,
        train_dataset=train,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    trainer.train()
    finish(result_path, clock, losses, spec["warmup"], {"trl": trl.__version__})


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
    """One run's medians over its measured steps; tokens are the completion tokens trained."""
    steps = result["steps"]
    med = lambda key: statistics.median(s[key] for s in steps)  # noqa: E731
    return {
        "step_s": med("wall_s"),
        "cpu_s": med("cpu_s"),
        "generation_s": med("generation_s"),
        "training_s": statistics.median(s["wall_s"] - s["generation_s"] for s in steps),
        "prompt_tokens_per_step": med("prompt_tokens"),
        "tokens_per_step": med("completion_tokens"),
        "tokens_per_s": statistics.median(s["completion_tokens"] / max(s["wall_s"], 1e-9) for s in steps),
        "generation_tokens_per_s": statistics.median(
            s["completion_tokens"] / max(s["generation_s"], 1e-9) for s in steps
        ),
        "peak_rss_mib": result["peak_rss_mib"],
        "steps_measured": len(steps),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="tiny", help="comma-separated: tiny, smollm2 (default: tiny)")
    p.add_argument("--trainers", default="rlkit,trl", help="comma-separated: rlkit, trl (default: both)")
    p.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="SmolLM2-135M-Instruct .gguf (`make demo-model`)")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument("--steps", type=int, default=10, help="measured steps per tiny-model run (default 10)")
    p.add_argument("--smollm2-steps", type=int, default=6, help="measured steps per SmolLM2 run (default 6)")
    p.add_argument("--warmup", type=int, default=1, help="steps run before measuring (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration, alternating order (default 2)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS; default 1)")
    p.add_argument("--batch", type=int, default=8, help="completions per micro-batch (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.5, help="generalized JSD beta (default 0.5)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--smollm2-full", action="store_true", help="full fine-tuning of SmolLM2 (default: LoRA r 16)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache and results dir (default .cache/bench)")
    p.add_argument("--trl-venv", type=Path, default=None, help="separate venv for TRL (default WORK/trl116-venv)")
    p.add_argument("--trl-requirement", default=TRL_REQUIREMENT)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument(
        "--doc", type=Path, default=REPO / "docs" / "distill.md", help="page whose bench:distill block is rewritten"
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
    results_dir, logs = work / "distill", work / "distill" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    trainers = [t for t in args.trainers.split(",") if t]
    trl_python, notes = None, []
    if "trl" in trainers:
        trl_python, message = ensure_venv_with(
            args.trl_venv or work / "trl116-venv",
            args.trl_requirement,
            "trl",
            "from trl import DistillationTrainer, DistillationConfig",
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
    mfu_of: dict[str, Any] = {"peak": matmul_peak_flops("cpu", args.precision), "train": {}, "forward": {}}
    settings: dict[str, str] = {}
    failures: dict[str, list[str]] = {}
    run_loads: list[float] = []
    tmp = Path(tempfile.mkdtemp(prefix="rlkit-bench-distill-"))
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
            context = (
                64 + args.max_new_tokens
            )  # short demo prompts (with the template's system turn), then the completion
            mfu_of["train"][label] = model_flops_per_token(matmul, layers, hidden, context, lora=lora)
            mfu_of["forward"][label] = model_flops_per_token(matmul, layers, hidden, context, train=False)
            lr = 1e-5 if lora else 1e-6
            batch = args.batch * args.grad_accum
            settings[label] = (
                f"student and teacher both this model (the teacher frozen in {args.precision}: TRL a second copy, rlkit {'sharing the base weights with the student' if lora else 'a second copy'}); "
                f"{'LoRA on the student (r 16, alpha 32, dropout 0.05 set and then turned off by both, all-linear)' if lora else 'full fine-tuning of the student'}; "
                f"{batch} completions per step ({batch} prompts x 1), micro-batch {args.batch} x grad-accum {args.grad_accum}; "
                f"up to {args.max_new_tokens} new tokens; beta {args.beta:g}, temperature 1, top-p {args.top_p:g}, top-k 0; "
                f"lr {lr:g}; {args.warmup} warmup + {steps} measured steps per run, {args.repeats} run(s) per configuration"
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
                        "max_new_tokens": args.max_new_tokens,
                        "beta": args.beta,
                        "top_p": args.top_p,
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
                        why = result.get("error", "no steps")
                        log(f"{key}: FAILED {why} (log: {logs / (key + '.log')})")
                        failures.setdefault(label, []).append(f"{LABELS[trainer]} run {repeat + 1} failed: {why}")
                        continue
                    one = run_summary(result)
                    log(
                        f"{key}: step {one['step_s']:.2f}s (generation {one['generation_s']:.2f}s), "
                        f"{one['tokens_per_s']:.1f} completion tok/s, peak RSS {one['peak_rss_mib']:.0f} MiB, "
                        f"losses {result.get('losses')}"
                    )
                    runs.setdefault(trainer, []).append(one)
            table[label] = [(t, combine_runs(runs[t])) for t in trainers if runs.get(t)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    notes += [f"{label}: {why}" for label, whys in failures.items() for why in whys]
    meta = {
        "command": command_line(["python", "bench/distill.py", *argv]),
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


def write_doc_block(doc: Path, name: str, content: str) -> None:
    """The bench:NAME block of `doc`; a page without it gets a "## Benchmark" section holding it,
    before "## Options" (the end of the page when there is none)."""
    begin = f"<!-- bench:{name}:begin -->"
    text = doc.read_text() if doc.is_file() else ""
    if begin not in text and "\n## Options" in text:
        head, tail = text.split("\n## Options", 1)
        section = "" if "\n## Benchmark" in head else "## Benchmark\n\n"
        text = f"{head.rstrip()}\n\n{section}{begin}\n<!-- bench:{name}:end -->\n\n## Options{tail}"
        doc.write_text(text)
    replace_block(doc, name, content)


def report(summary: dict[str, Any], doc: Path | None) -> int:
    """The table (stdout) and, with `doc`, its bench:distill block, from a run's summary."""
    table, meta = summary["table"], summary["meta"]
    trl_v = meta.get("trl")
    mfu_of = meta.get("mfu") or {}

    def utilisation(label: str, r: dict[str, Any]) -> str:
        """Per step: prompt + completion trained once by the student and run forward once by the
        teacher, every completion token also sampled (one forward); the divergence's own vocabulary
        products are not counted: a lower bound."""
        if label not in mfu_of.get("train", {}):
            return "-"
        rows = r["prompt_tokens_per_step"] + r["tokens_per_step"]
        work = (mfu_of["train"][label] + mfu_of["forward"][label]) * rows
        work += mfu_of["forward"][label] * r["tokens_per_step"]
        return f"{100 * mfu(1 / max(r['step_s'], 1e-9), work, mfu_of['peak']):.2f}%"

    rows = []
    for label, results in table.items():
        trl_row = dict(results).get("trl")
        for trainer, r in results:
            name = LABELS[trainer] + (f" {trl_v}" if trainer == "trl" and trl_v else "")
            rows.append(
                [
                    *trainer_cells(label, name, r),
                    fmt(r["generation_s"]),
                    fmt(r["training_s"]),
                    fmt(r["tokens_per_step"], 0),
                    fmt(r["tokens_per_s"], 1),
                    utilisation(label, r),
                    versus(r, trl_row, "tokens_per_s"),
                    fmt(r["peak_rss_mib"], 0),
                    versus(r, trl_row, "peak_rss_mib"),
                ]
            )
    columns = ["model", "trainer", "s / step", "range over runs", "generation s", "training s"]
    columns += ["completion tokens / step", "tokens/s", "MFU", "vs TRL", "peak RSS (MiB)", "RSS vs TRL"]
    t = markdown_table(columns, rows)
    print(t)
    notes = list(summary["notes"])
    if mfu_of:
        notes.append(
            mfu_line("cpu", {meta.get("precision", "fp32"): mfu_of["peak"]})
            + " Per step: prompt + completion tokens trained once by the student and run forward once by the"
            " teacher, every completion token also sampled; the divergence's vocabulary products beyond one"
            " output layer are not counted (a lower bound)."
        )
    header = run_header(meta, summary["settings"], notes)
    if doc is not None:  # one block per precision, and one for --smollm2-full runs
        name = f"distill-{meta['precision']}" + ("-full" if meta.get("smollm2_full") else "")
        write_doc_block(doc, name, "\n".join(header) + "\n\n" + t)
        log(f"wrote the bench:{name} block of {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
