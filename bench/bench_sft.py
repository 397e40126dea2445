"""SFT throughput and memory: rlkit against TRL's SFTTrainer, padded and packed.

    python bench/bench_sft.py                      # everything: tiny model + SmolLM2-135M, rlkit + TRL
    python bench/bench_sft.py --models tiny --trainers rlkit --no-doc   # a quick look

Each configuration runs in its own process, one after another (never two at once), and
records after every optimizer step the wall clock, the process CPU time and the real
(non-padding) tokens of the step. The first --warmup steps are left out; the others give the
median real tokens/s of a step (training wall time; model loading and tokenization are never
timed), the median CPU-seconds per 1k real tokens (all threads, user + system), the process's
peak RSS (getrusage, whole process: imports, model, data and training) and the loss of the
last step. Runs use one torch thread by default (--threads): on a machine whose cores other
jobs share, two OpenMP threads spin-wait for each other and a step costs 3-4x the CPU time
and wall time it costs with one, which would drown any difference between the trainers.

Both trainers get the same model directory, the same token ids and loss mask, the same
per-device batch, max length, optimizer (torch AdamW, lr, linear schedule, no warmup, clipping
at 1.0), fp32, no gradient checkpointing, and the same LoRA (r 16, alpha 32, dropout 0.05,
all-linear) or full fine-tuning:

- rlkit runs its CLI (`python -m rlkit sft ...`, in the child process so its steps can be
  timed) on the raw conversations, which it tokenizes and, with --packing, packs itself.
- TRL gets the same conversations tokenized by `rlkit pack --no-packing` (input_ids + labels,
  one example per row), so the two train on identical tokens with identical masks (TRL's own
  `assistant_only_loss` refuses both models' chat templates: they have no `{% generation %}`
  markers and TRL cannot patch them). TRL pads, or packs them with its best-fit-decreasing
  packing, which always goes with padding-free batches (one flattened row per batch).

TRL lives in its own virtual environment (--trl-venv, created on first use): it shares this
environment's packages through a .pth file and gets only `trl` itself, installed with
--no-deps, so it runs on the very same torch/transformers and never becomes an rlkit
dependency. SmolLM2 comes from the demo's .gguf file (`make demo-model` fetches it); it is
converted once to a plain HF dir that both trainers load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    StepClock,
    bench_model,
    command_line,
    ensure_venv_with,
    log,
    machine_info,
    markdown_table,
    matmul_params_of,
    matmul_peak_flops,
    mfu,
    mfu_line,
    model_flops_per_token,
    pool,
    replace_block,
    run_child,
    run_plain,
    trl_run_args,
    versions,
    write_result,
)

DEFAULT_GGUF = REPO / ".cache" / "demo" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DATA = REPO / "rlkit" / "demo" / "data" / "sft.jsonl"
DEFAULT_WORK = REPO / ".cache" / "bench"
TRL_REQUIREMENT = "trl==1.16.0"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"}


# ---- the tiny model (as tests/conftest.py builds it) --------------------------------------

SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def build_tiny(path: Path, data_dir: Path) -> None:
    """A random-init Llama (hidden 64, 2 layers, ~100k parameters) with a byte-level BPE trained
    on the demo data and the chatml template, the same as the test suite's tiny model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rlkit.data.templates import shipped_template

    corpus = []
    for file in sorted(data_dir.glob("*.jsonl")):
        corpus += [" ".join(str(v) for v in json.loads(line).values()) for line in file.read_text().splitlines()]
    corpus += ["Question: Answer: system user assistant [INST] [/INST] <<SYS>> <</SYS>>"] * 5
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[3:],
    )
    tokenizer.chat_template = shipped_template("chatml")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        attn_implementation="sdpa",
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def convert_gguf(gguf: Path, out: Path) -> None:
    """The dequantized GGUF model saved as a plain HF dir (model + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)


# ---- children: one configuration each ---------------------------------------------------


def child_rlkit(spec: dict[str, Any], result_path: str) -> None:
    """`rlkit sft` exactly as `python -m rlkit` runs it, with the metrics sink timing each step."""
    import torch

    from rlkit.training import engine, metrics

    clock = StepClock(warmup=spec["warmup"])
    fit, sink_log = engine.Engine.fit, metrics.MetricsSink.log

    def timed_fit(self, *args, **kwargs):
        clock.start()
        return fit(self, *args, **kwargs)

    def timed_log(self, step, values):
        if "tokens_per_s" in values and "step_time_s" in values:  # a training step (not the final eval line)
            clock.step(round(values["tokens_per_s"] * values["step_time_s"]), values.get("loss"))
        return sink_log(self, step, values)

    engine.Engine.fit, metrics.MetricsSink.log = timed_fit, timed_log
    argv = [
        "sft",
        spec["model"],
        spec["data"],
        "-o",
        spec["out"],
        "--overwrite",
        "--max-steps",
        str(spec["steps"]),
        "--batch-size",
        str(spec["batch"]),
        "--max-length",
        str(spec["max_length"]),
        "--packing" if spec["packing"] else "--no-packing",
        "--seed",
        str(spec["seed"]),
        "--precision",
        "fp32",
    ]
    argv += (
        [
            "--lora",
            "--lora-r",
            str(LORA["r"]),
            "--lora-alpha",
            str(LORA["alpha"]),
            "--lora-dropout",
            str(LORA["dropout"]),
            "--lora-targets",
            LORA["targets"],
        ]
        if spec["lora"]
        else ["--full"]
    )
    sys.argv = ["rlkit", *argv]
    from rlkit.cli import main

    try:
        main()
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    write_result(
        result_path,
        {**clock.summary(), "command": "rlkit " + command_line(argv), "torch_threads": torch.get_num_threads()},
    )


def child_trl(spec: dict[str, Any], result_path: str) -> None:
    """TRL's SFTTrainer on the same token ids/labels, same batch, max length, optimizer and LoRA."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    clock = StepClock(warmup=spec["warmup"])
    tokens_in_step = [0]

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step(tokens_in_step[0])
            tokens_in_step[0] = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    class CountingSFTTrainer(SFTTrainer):
        """Counts the real tokens of each micro-batch (padded: the attention mask; padding-free:
        the flattened row, which holds no padding)."""

        def training_step(self, model, inputs, *args, **kwargs):
            if "attention_mask" in inputs:
                tokens_in_step[0] += int(inputs["attention_mask"].sum())
            else:
                tokens_in_step[0] += int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, *args, **kwargs)

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:  # as rlkit does
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    train = datasets.load_from_disk(spec["tokens"])["train"].select_columns(["input_ids", "labels"])
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
    args = SFTConfig(
        output_dir=spec["out"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        max_length=spec["max_length"],
        packing=spec["packing"],
        packing_strategy="bfd",  # best-fit-decreasing; TRL turns padding-free on with it
        learning_rate=spec["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",  # torch.optim.AdamW, as rlkit
        **trl_run_args(spec["seed"]),
    )
    trainer = CountingSFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    trainer.train()
    info = {
        "padding_free": bool(trainer.padding_free),
        "rows": len(trainer.train_dataset),
        "torch_threads": torch.get_num_threads(),
    }
    write_result(result_path, {**clock.summary(), **info})


def child_main(kind: str, spec_json: str, result_path: str) -> None:
    spec = json.loads(spec_json)
    if kind == "rlkit":
        child_rlkit(spec, result_path)
    elif kind == "trl":
        child_trl(spec, result_path)
    elif kind == "build-tiny":
        build_tiny(Path(spec["out"]), Path(spec["data_dir"]))
    elif kind == "convert":
        convert_gguf(Path(spec["gguf"]), Path(spec["out"]))
    else:
        raise SystemExit(f"unknown child kind {kind}")


# ---- the orchestrator -------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2 (default: both)")
    p.add_argument("--trainers", default="rlkit,trl", help="comma-separated: rlkit, trl (default: both)")
    p.add_argument("--packing", default="padded,packed", help="comma-separated: padded, packed (default: both)")
    p.add_argument(
        "--gguf",
        type=Path,
        default=DEFAULT_GGUF,
        help="SmolLM2-135M-Instruct .gguf file (`make demo-model` fetches it)",
    )
    p.add_argument(
        "--smollm2-dir",
        type=Path,
        default=None,
        help="plain HF dir of SmolLM2 (default: converted once from --gguf into WORK/SmolLM2-135M-Instruct)",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SFT data (messages JSONL)")
    p.add_argument("--tiny-steps", type=int, default=20, help="measured steps per tiny-model run (default 20)")
    p.add_argument("--smollm2-steps", type=int, default=8, help="measured steps per SmolLM2 run (default 8)")
    p.add_argument("--warmup", type=int, default=1, help="steps run before measuring (default 1)")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs per configuration, in alternating order; their steps are pooled (default 2)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per run (OMP_NUM_THREADS); 0: the library default (default 1, see docs/benchmarks.md)",
    )
    p.add_argument("--tiny-batch", type=int, default=8)
    p.add_argument("--tiny-max-length", type=int, default=512)
    p.add_argument("--tiny-lora", action="store_true", help="LoRA on the tiny model (default: full fine-tuning)")
    p.add_argument("--smollm2-batch", type=int, default=4)
    p.add_argument("--smollm2-max-length", type=int, default=256)
    p.add_argument("--smollm2-full", action="store_true", help="full fine-tuning of SmolLM2 (default: LoRA)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache and results dir (default .cache/bench)")
    p.add_argument("--trl-python", default=None, help="a python that imports trl (default: the --trl-venv one)")
    p.add_argument(
        "--trl-venv",
        type=Path,
        default=None,
        help="separate venv for TRL, created on first use (default WORK/trl-venv)",
    )
    p.add_argument(
        "--trl-requirement", default=TRL_REQUIREMENT, help=f"what to pip install there (default {TRL_REQUIREMENT})"
    )
    p.add_argument("--timeout", type=float, default=1200, help="seconds before a run is given up (default 1200)")
    p.add_argument(
        "--doc", type=Path, default=REPO / "docs" / "benchmarks.md", help="markdown page whose SFT block is rewritten"
    )
    p.add_argument("--no-doc", action="store_true", help="print the table only")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits if abs(x) >= 1 or x == 0 else max(digits, 3)}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def run_order(trainers: list[str], packings: list[bool], repeat: int) -> list[tuple[str, bool]]:
    """Padded then packed; within each, the trainers alternate who goes first (rlkit, TRL | TRL,
    rlkit | ...), so a load that drifts during the run does not always favour the same one."""
    order, flip = [], repeat % 2 == 1
    for packing in packings:
        for trainer in reversed(trainers) if flip else trainers:
            order.append((trainer, packing))
        flip = not flip
    return order


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.spec, args.result)
        return 0

    started = time.time()
    # the MFU column's ceiling: this machine's matmul rate, measured now (bench/common.py)
    peaks = {dtype: matmul_peak_flops("cpu", dtype) for dtype in ("fp32", "bf16")}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    packings = [p.strip() == "packed" for p in args.packing.split(",") if p.strip()]
    work = args.work.resolve()
    logs = work / "sft" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    this = [sys.executable, str(Path(__file__).resolve())]

    trl_python = None
    if "trl" in trainers:
        if args.trl_python:
            trl_python = args.trl_python
        else:
            trl_python, message = ensure_venv_with(
                args.trl_venv or work / "trl-venv", args.trl_requirement, "trl", "from trl import SFTConfig, SFTTrainer"
            )
            log(message)
            if trl_python is None:
                notes.append(f"TRL rows skipped: {message}")

    tmp = Path(tempfile.mkdtemp(prefix="rlkit-bench-sft-"))
    env = {"RLKIT_CACHE_DIR": str(tmp / "rlkit-cache"), "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    run_env = dict(env)
    if args.threads > 0:
        run_env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
    rows: list[dict[str, Any]] = []
    settings: dict[str, str] = {}
    try:
        for name in models:
            model_dir, skipped = bench_model(
                name,
                child=this,
                tmp=tmp,
                smollm2_dir=args.smollm2_dir or work / "SmolLM2-135M-Instruct",
                gguf=args.gguf,
                data_dir=args.data.parent,
                env=env,
                logs=logs,
            )
            if model_dir is None:
                log(skipped)
                notes.append(skipped)
                continue
            if name == "tiny":
                label, lora, batch, max_length, steps = (
                    "tiny Llama",
                    args.tiny_lora,
                    args.tiny_batch,
                    args.tiny_max_length,
                    args.tiny_steps,
                )
            else:
                label, lora, batch, max_length, steps = (
                    "SmolLM2-135M-Instruct",
                    not args.smollm2_full,
                    args.smollm2_batch,
                    args.smollm2_max_length,
                    args.smollm2_steps,
                )
            lr = 2e-4 if lora else 2e-5
            matmul, layers, hidden = matmul_params_of(str(model_dir))
            flops = model_flops_per_token(matmul, layers, hidden, max_length, lora=lora)
            mode = (
                f"LoRA (r {LORA['r']}, alpha {LORA['alpha']}, dropout {LORA['dropout']}, {LORA['targets']})"
                if lora
                else "full fine-tuning"
            )
            settings[label] = (
                f"{mode}, per-device batch {batch}, max length {max_length}, lr {'2e-4' if lora else '2e-5'}"
            )

            tokens_dir = tmp / f"tokens-{name}"
            if trl_python:  # TRL trains on rlkit's tokenization: identical ids and loss masks
                pack = [
                    sys.executable,
                    "-m",
                    "rlkit",
                    "pack",
                    str(args.data),
                    "--tokenizer",
                    str(model_dir),
                    "-o",
                    str(tokens_dir),
                    "--no-packing",
                    "--max-length",
                    str(max_length),
                ]
                if run_plain(pack, env, logs / f"pack-{name}.log") != 0:
                    notes.append(f"TRL rows of {label} skipped: `rlkit pack` failed (see {logs / f'pack-{name}.log'})")

            runs: dict[tuple[str, bool], list[dict[str, Any]]] = {}
            for repeat in range(args.repeats):
                for trainer, packing in run_order(trainers, packings, repeat):
                    if trainer == "trl" and (trl_python is None or not (tokens_dir / "rlkit_pack.json").is_file()):
                        continue
                    key = f"{name}-{trainer}-{'packed' if packing else 'padded'}" + (
                        f"-{repeat + 1}" if args.repeats > 1 else ""
                    )
                    spec = {
                        "model": str(model_dir),
                        "data": str(args.data.resolve()),
                        "tokens": str(tokens_dir),
                        "out": str(tmp / "out" / key),
                        "batch": batch,
                        "max_length": max_length,
                        "packing": packing,
                        "lora": lora,
                        "seed": args.seed,
                        "steps": steps + args.warmup,
                        "warmup": args.warmup,
                        "lr": lr,
                        "threads": args.threads,
                    }
                    python = sys.executable if trainer == "rlkit" else trl_python
                    log(f"{key}: {args.warmup} warmup + {steps} measured steps ...")
                    result_path = work / "sft" / f"{key}.json"
                    result = run_child(
                        [python, this[1], "--child", trainer, "--spec", json.dumps(spec), "--result", str(result_path)],
                        result_path,
                        run_env,
                        args.timeout,
                        logs / f"{key}.log",
                    )
                    for leftover in (tmp / "out" / key, tmp / "out" / f"{key}.partial"):
                        shutil.rmtree(leftover, ignore_errors=True)
                    result.update({"key": key, "spec": spec})
                    result_path.write_text(json.dumps(result, indent=1) + "\n")
                    if "error" in result:
                        log(f"{key}: FAILED {result['error']} (log: {logs / (key + '.log')})")
                    else:
                        one = pool([result])
                        log(
                            f"{key}: {one['tokens_per_s']:.1f} tok/s, {one['cpu_s_per_1k_tokens']:.2f} CPU-s/1k tok, peak RSS {one['peak_rss_mib']:.0f} MiB, loss {one['final_loss']}"
                        )
                    runs.setdefault((trainer, packing), []).append(result)
            for packing in packings:
                for trainer in trainers:
                    results = runs.get((trainer, packing))
                    if not results:
                        continue
                    good = [r for r in results if "error" not in r]
                    row = pool(good) if good else {"error": results[0]["error"]}
                    row.update({"model": label, "trainer": trainer, "packing": packing, "flops_per_token": flops})
                    rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    total = time.time() - started
    trl_v = trl_version(trl_python)
    columns = [
        "model",
        "trainer",
        "packing",
        "real tokens/s",
        "MFU (fp32)",
        "CPU-s per 1k tokens",
        "peak RSS (MiB)",
        "steps measured",
        "tokens/step",
        "final loss",
    ]
    table_rows = []
    for r in rows:
        trainer = "rlkit" if r["trainer"] == "rlkit" else f"TRL {trl_v}"
        how = ("packed (BFD, padding-free)" if r["trainer"] == "trl" else "packed (BFD)") if r["packing"] else "padded"
        if "error" in r:
            table_rows.append([r["model"], trainer, how, "failed: " + r["error"][:80], "-", "-", "-", "-", "-", "-"])
            continue
        table_rows.append(
            [
                r["model"],
                trainer,
                how,
                fmt(r["tokens_per_s"]),
                f"{100 * mfu(r['tokens_per_s'], r['flops_per_token'], peaks['fp32']):.1f}%",
                fmt(r["cpu_s_per_1k_tokens"], 2),
                fmt(r["peak_rss_mib"], 0),
                r["steps_measured"],
                fmt(r["tokens_per_step"], 0),
                fmt(r["final_loss"], 4) if r.get("final_loss") is not None else "-",
            ]
        )
    table = markdown_table(columns, table_rows)
    notes.append(mfu_line("cpu", peaks))
    print(table)
    for note in notes:
        print(f"- {note}")
    (work / "sft" / "summary.json").write_text(
        json.dumps({"rows": rows, "settings": settings, "notes": notes, "total_s": total}, indent=1) + "\n"
    )
    log(f"done in {total / 60:.1f} min")

    if not args.no_doc and rows:
        write_doc(args, table, settings, notes, load_before, total, trl_v)
        log(f"wrote the table into {args.doc}")
    return 0 if rows and all("error" not in r for r in rows) else 1


def trl_version(python: str | None) -> str:
    return (versions(["trl"], python).get("trl") or "?") if python else "?"


def write_doc(
    args: argparse.Namespace,
    table: str,
    settings: dict[str, str],
    notes: list[str],
    load_before: Any,
    total: float,
    trl_v: str,
) -> None:
    machine = machine_info()
    v = versions(["rlkit", "torch", "transformers", "peft", "accelerate", "datasets"])
    if trl_v != "?":
        v["trl"] = trl_v
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    cmd = f"`python bench/bench_sft.py{' ' + command_line(sys.argv[1:]) if sys.argv[1:] else ''}`" + (
        "" if sys.argv[1:] else " (what `make bench` runs)"
    )
    threads = (
        f"{args.threads} torch thread{'s' if args.threads != 1 else ''} per run"
        if args.threads > 0
        else f"torch's default threads ({machine['torch_threads']})"
    )
    lines = [
        f"Measured on {time.strftime('%Y-%m-%d')} with {cmd}, which took {total / 60:.0f} min.",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM, "
        f"{'GPU ' + machine['gpu'] if machine['gpu'] else 'no GPU'}; {threads}; "
        f"load average {fmt_load(load_before)} before the run and {fmt_load(load_after)} after it (1/5/15 min).",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + f", Python {machine['python']}.",
    ]
    for label, setting in settings.items():
        steps = args.tiny_steps if label.startswith("tiny") else args.smollm2_steps
        runs = f"{args.repeats} runs" if args.repeats > 1 else "1 run"
        lines.append(
            f"- {label}: {setting}; the same for both trainers; {args.warmup} warmup step(s), then {steps} measured steps; {runs} per configuration."
        )
    lines += ["", table]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    replace_block(args.doc, "sft", "\n".join(lines))


def fmt_load(load: Any) -> str:
    return " / ".join(f"{x:.1f}" for x in load) if load else "?"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
