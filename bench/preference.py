"""DPO, KTO and reward-model throughput and memory: rlkit (defaults and toggles) against TRL.

    python bench/preference.py [--sizes tiny,small] [--epochs 1] [--repeats 2] [--doc docs/dpo.md]
    python bench/preference.py --sizes medium --tasks dpo --max-steps 8 --repeats 1 --block preference-memory
    python bench/preference.py --tasks kto --doc docs/kto.md --block kto

Every configuration trains the same model (full fine-tuning, fp32, CPU unless a GPU is there)
on the same pairs (the demo's pairs.jsonl, chatml), with the same batch and max length, in
its own child process (`bench/common.py`). rlkit runs with its defaults (padding-free rows,
precomputed reference log-probs; for DPO also gradient checkpointing, as TRL), then with each
toggled, so the gain of each shows, and once with RLKIT_MALLOC_TRIM=0; TRL's
DPOTrainer and RewardTrainer run with their defaults (padded batches, a reference model copy
consulted every step) in a separate environment that shares this one's torch/transformers.

KTO (`--tasks kto`) trains on the demo's 300 labelled completions (unpaired.jsonl; TRL gets the
same records as conversational prompt/completion/label rows), batch 8 examples, against TRL's
KTOTrainer with its defaults (reference model copy, `loss_type="kto"`, so it also runs the
mismatched-completion KL forward, with gradient checkpointing on) and once more with gradient
checkpointing off (rlkit's default). Its tokens/s counts each example's own prompt+completion
tokens only: the no-grad forward over the mismatched (KL) completions that both trainers run
every step is work done but not counted, for both alike.

Columns: tokens/s is real (non-padding) prompt+completion tokens of both sides per second of
training steps (first step left out); end-to-end is the child's wall time from before data
preparation to the trained model (tokenising, reference pass, training, and for rlkit saving);
peak RSS is the child's, the highest over the repeats (glibc's heap makes it vary by a few
hundred MiB between identical runs). Each configuration runs `--repeats` times, interleaved, and the best
tokens/s is kept: on a shared CPU the slowest runs measure the neighbours, not the trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    ensure_venv_with,
    log,
    machine_info,
    markdown_table,
    matmul_params_of,
    matmul_peak_flops,
    mfu,
    mfu_line,
    model_flops_per_token,
    replace_block,
    run_child,
    versions,
    write_result,
)

DATA = REPO / "rlkit" / "demo" / "data" / "pairs.jsonl"
UNPAIRED = REPO / "rlkit" / "demo" / "data" / "unpaired.jsonl"
SIZES = {"tiny": (64, 2), "small": (256, 4), "medium": (512, 8)}  # hidden, layers (vocab 600: the test tokenizer)
BATCH, MAX_LENGTH, LR = 8, 256, 1e-4
_RLKIT_PREFERENCE = {
    "rlkit (defaults)": [],
    "rlkit --no-padding-free": ["--no-padding-free"],
    "rlkit --no-precompute-ref": ["--no-precompute-ref"],
    "rlkit, both off": ["--no-padding-free", "--no-precompute-ref"],
}
RLKIT_DPO = {  # dpo's defaults checkpoint activations, as TRL's
    **_RLKIT_PREFERENCE,
    "rlkit --no-gradient-checkpointing": ["--no-gradient-checkpointing"],
    # freed heap pages left to glibc, as every other trainer does: what the engine's trim gains
    "rlkit (defaults), RLKIT_MALLOC_TRIM=0": ["RLKIT_MALLOC_TRIM=0"],
}
RLKIT_KTO = {
    **_RLKIT_PREFERENCE,
    "rlkit --gradient-checkpointing": ["--gradient-checkpointing"],
}  # TRL's default; kto's is off
RLKIT_RM = {"rlkit (defaults)": [], "rlkit --no-padding-free": ["--no-padding-free"]}
RLKIT = {"dpo": RLKIT_DPO, "kto": RLKIT_KTO, "rm": RLKIT_RM}
# TRL rows per task: (name, flags); the first is the baseline of the "vs TRL" columns
TRL = {
    "dpo": [
        ("TRL DPOTrainer (defaults)", []),
        ("TRL DPOTrainer, no gradient checkpointing", ["no-gradient-checkpointing"]),
    ],
    "kto": [
        ("TRL KTOTrainer (defaults)", []),
        ("TRL KTOTrainer, no gradient checkpointing", ["no-gradient-checkpointing"]),
    ],
    "rm": [("TRL RewardTrainer (defaults)", [])],
}
TITLES = {"dpo": "DPO (full fine-tuning)", "kto": "KTO (full fine-tuning)", "rm": "Reward model (full fine-tuning)"}


SMOLLM2_GGUF = REPO / ".cache" / "demo" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def describe_size(size: str) -> str:
    if size == "smollm2":
        return "smollm2 = SmolLM2-135M-Instruct (vocab 49,152; dequantised from the demo .gguf to an fp32 HF dir)"
    return f"{size} = Llama hidden {SIZES[size][0]} x {SIZES[size][1]} layers"


def make_model(directory: Path, size: str) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_model, build_tokenizer

    if size == "smollm2" and not (directory / "config.json").is_file():
        from bench_sft import convert_gguf  # both trainers read the same HF dir (`make demo-model` fetches the .gguf)

        convert_gguf(SMOLLM2_GGUF, directory)
    if not (directory / "config.json").is_file():
        tokenizer = build_tokenizer()
        hidden, layers = SIZES[size]
        build_model(len(tokenizer), hidden=hidden, layers=layers).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def epoch_tokens(model: Path, task: str = "dpo", data: Path | None = None) -> tuple[int, int]:
    """(real tokens of one pass over the data, pairs or examples): the numerator for every trainer.

    For KTO: each example's prompt + its own completion, not the mismatched (KL) completions."""
    from transformers import AutoTokenizer

    from rlkit.data.templates import resolve_template

    tokenizer = AutoTokenizer.from_pretrained(model)
    template = resolve_template(None, tokenizer)
    if task == "kto":
        from rlkit.data.formats import Format
        from rlkit.data.unpaired import tokenize_unpaired

        records = [json.loads(line) for line in (data or UNPAIRED).read_text().splitlines()]
        _, unpaired = tokenize_unpaired(records, Format.UNPAIRED, tokenizer, template, MAX_LENGTH)
        return unpaired.tokens, unpaired.examples
    from rlkit.data.pairs import tokenize_pairs

    records = [json.loads(line) for line in (data or DATA).read_text().splitlines()]
    _, stats = tokenize_pairs(records, tokenizer, template, MAX_LENGTH)
    return stats.tokens, stats.pairs


# ---- children -----------------------------------------------------------------------------


def child_rlkit(args: argparse.Namespace) -> dict[str, Any]:
    from rlkit.console import quiet_libraries

    quiet_libraries()
    scratch = tempfile.TemporaryDirectory(prefix="rlkit-bench-pref-")  # the saved model is ~0.5 GB per SmolLM2 run
    out = Path(scratch.name) / "out"
    common = dict(
        model=args.model,
        data=[args.data],
        output=str(out),
        lora=False,
        lr=LR,
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        epochs=args.epochs,
        max_steps=args.max_steps or None,
        precision=args.precision,
        log_every=10_000,
    )
    flags = json.loads(args.flags)
    if "RLKIT_MALLOC_TRIM=0" in flags:
        os.environ["RLKIT_MALLOC_TRIM"] = "0"
    toggles: dict[str, Any] = {"padding_free": "--no-padding-free" not in flags}
    for flag in ("--gradient-checkpointing", "--no-gradient-checkpointing"):
        if flag in flags:  # otherwise each command's own default
            toggles["gradient_checkpointing"] = flag == "--gradient-checkpointing"
    started = time.perf_counter()
    if args.task == "dpo":
        from rlkit.recipes.dpo import DPOConfig, run_dpo

        run_dpo(DPOConfig(**common, **toggles, precompute_ref="--no-precompute-ref" not in flags))
    elif args.task == "kto":
        from rlkit.recipes.kto import KTOConfig, run_kto

        run_kto(KTOConfig(**common, **toggles, precompute_ref="--no-precompute-ref" not in flags))
    else:
        from rlkit.recipes.reward_model import RewardModelConfig, run_train_rm

        run_train_rm(RewardModelConfig(**common, **toggles))
    total = time.perf_counter() - started
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "step_time_s" in s]
    scratch.cleanup()
    return {"step_walls": [s["step_time_s"] for s in steps], "end_to_end_s": total}


def child_trl(args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    if args.task == "kto":  # TRL's unpaired format, conversational: the same records rlkit reads
        records = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
        conversational = [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
                "label": bool(r["label"]),
            }
            for r in records
        ]
    else:
        records = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
        conversational = [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in records
        ]
    dataset = datasets.Dataset.from_list(conversational)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    walls: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            walls.append(time.perf_counter() - self.t0)

    scratch = tempfile.TemporaryDirectory(prefix="rlkit-bench-pref-trl-")  # collected with the process
    common = dict(
        output_dir=scratch.name,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        num_train_epochs=args.epochs,
        max_length=MAX_LENGTH,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        use_cpu=True,
        bf16=args.precision == "bf16",
        max_steps=args.max_steps or -1,
    )
    started = time.perf_counter()
    if args.task == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(args.model)
        extra = {"gradient_checkpointing": False} if "no-gradient-checkpointing" in json.loads(args.flags) else {}
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(**common, **extra, beta=0.1),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
    elif args.task == "kto":
        from trl import KTOConfig, KTOTrainer

        model = AutoModelForCausalLM.from_pretrained(args.model)
        extra = {"gradient_checkpointing": False} if "no-gradient-checkpointing" in json.loads(args.flags) else {}
        config = KTOConfig(**common, **extra)  # beta 0.1, weights 1/1, loss_type "kto", no precompute: its defaults
        trainer = KTOTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()]
        )
        rows = trainer.train_dataset
        trl_tokens = sum(len(p) + len(c) for p, c in zip(rows["prompt_ids"], rows["completion_ids"]))
        settings = {
            k: getattr(config, k)
            for k in (
                "loss_type",
                "beta",
                "desirable_weight",
                "undesirable_weight",
                "max_length",
                "precompute_ref_log_probs",
                "gradient_checkpointing",
                "bf16",
                "train_sampling_strategy",
            )
        }
        trainer.train()
        return {
            "step_walls": walls,
            "end_to_end_s": time.perf_counter() - started,
            "trl_tokens": trl_tokens,
            "trl_examples": len(rows),
            "trl_settings": settings,
            "calculate_kl": bool(trainer.calculate_KL),
            "ref_model": trainer.ref_model is not None,
        }
    else:
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(
            args.model, num_labels=1, pad_token_id=tokenizer.pad_token_id
        )
        trainer = RewardTrainer(
            model=model,
            args=RewardConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
    trainer.train()
    return {"step_walls": walls, "end_to_end_s": time.perf_counter() - started}


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401  (imported before any clock starts)

    torch.manual_seed(0)
    result = child_rlkit(args) if args.trainer == "rlkit" else child_trl(args)
    write_result(args.result, result)


# ---- orchestrator -------------------------------------------------------------------------


def summarise(result: dict[str, Any], tokens: int, pairs: int, epochs: int) -> dict[str, Any]:
    walls = result["step_walls"]
    measured = walls[1:] if len(walls) > 1 else walls
    per_step = tokens / pairs * BATCH  # the mean real tokens of a step of BATCH pairs
    summary = {
        "tokens_per_s": per_step * len(measured) / max(sum(measured), 1e-9),
        "end_to_end_s": result["end_to_end_s"],
        "peak_rss_mib": result["peak_rss_mib"],
        "steps": len(walls),
    }
    # TRL's own tokenisation of the same records, to check that the numerator fits it too
    return summary | {
        k: result[k] for k in ("trl_tokens", "trl_examples", "trl_settings", "calculate_kl", "ref_model") if k in result
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "child"))
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0: --epochs)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tasks", default="dpo,rm")
    parser.add_argument("--threads", default="1", help="OMP/torch threads per child (1: stable on a shared CPU)")
    parser.add_argument("--doc", default=str(REPO / "docs" / "dpo.md"))
    parser.add_argument("--block", default="preference", help="name of the marked block of --doc to replace")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="both trainers: rlkit --precision, TRL bf16=True/False (full fine-tuning: fp32 weights, bf16 autocast)",
    )
    parser.add_argument(
        "--records",
        type=int,
        default=0,
        help="train on the first N records of the data only (0: all); e.g. for SmolLM2 on CPU",
    )
    parser.add_argument(
        "--defaults-only", action="store_true", help="only rlkit's and TRL's default configurations (no toggles)"
    )
    # child-only
    (parser.add_argument("--data"),)
    (
        parser.add_argument("--trainer"),
        parser.add_argument("--task"),
        parser.add_argument("--model"),
        parser.add_argument("--result"),
        parser.add_argument("--flags", default="[]"),
    )
    args = parser.parse_args()
    if args.mode == "child":
        return child(args)

    work = REPO / "build" / "bench-preference"
    work.mkdir(parents=True, exist_ok=True)
    trl_python = None
    if not args.no_trl:
        trl_python, message = ensure_venv_with(REPO / "build" / "bench-venv-trl", "trl==1.16.0", "trl")
        log(message)
    env = {
        "OMP_NUM_THREADS": args.threads,
        "MKL_NUM_THREADS": args.threads,
        "RLKIT_CACHE_DIR": str(work / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    # the MFU column's ceiling: this machine's matmul rate in the run's precision, measured now
    peak = matmul_peak_flops("cpu", args.precision)
    tables = []
    for task in args.tasks.split(","):
        rows = []
        for size in args.sizes.split(","):
            model = make_model(work / f"model-{size}", size)
            data = UNPAIRED if task == "kto" else DATA
            if args.records:
                subset = work / f"{data.stem}-{args.records}.jsonl"
                subset.write_text("".join(data.read_text().splitlines(keepends=True)[: args.records]))
                data = subset
            tokens, pairs = epoch_tokens(model, task, data)
            matmul, layers, hidden = matmul_params_of(str(model))
            sequence = tokens / (pairs if task == "kto" else 2 * pairs)  # the mean real length a token attends over
            flops = model_flops_per_token(matmul, layers, hidden, sequence)  # full fine-tuning (6N + attention)
            log(
                f"{task} {size}: {tokens:,} real tokens in {pairs} {'examples' if task == 'kto' else 'pairs'} (the numerator)"
            )
            configs = [("rlkit", name, flags) for name, flags in RLKIT[task].items()]
            if trl_python:
                configs += [("trl", name, flags) for name, flags in TRL[task]]
            if args.defaults_only:
                configs = [
                    c
                    for c in configs
                    if "(defaults)" in c[1] or "gradient checkpointing" in c[1] or "gradient-checkpointing" in c[1]
                ]
            results: dict[str, Any] = {}
            for trainer, name, flags in [c for _ in range(args.repeats) for c in configs]:
                python = sys.executable if trainer == "rlkit" else trl_python
                # a fresh cache per rlkit run: the reference pass and tokenising are part of what is timed
                run_env = {
                    **env,
                    "RLKIT_CACHE_DIR": str(work / "cache" / f"{task}-{size}-{len(results)}-{time.time_ns()}"),
                }
                cmd = [
                    python,
                    __file__,
                    "child",
                    "--trainer",
                    trainer,
                    "--task",
                    task,
                    "--model",
                    str(model),
                    "--data",
                    str(data),
                    "--result",
                    str(work / "result.json"),
                    "--flags",
                    json.dumps(flags),
                    "--epochs",
                    str(args.epochs),
                    "--max-steps",
                    str(args.max_steps),
                    "--precision",
                    args.precision,
                ]
                log(f"{task} {size}: {name}")
                result = run_child(cmd, work / "result.json", env=run_env, log_path=work / "child.log")
                summary = result if "error" in result else summarise(result, tokens, pairs, args.epochs)
                log(f"  -> {summary}")
                highest_rss = max(summary.get("peak_rss_mib", 0), results.get(name, {}).get("peak_rss_mib", 0))
                if name not in results or results[name].get("tokens_per_s", -1) < summary.get("tokens_per_s", 0):
                    results[name] = summary
                if highest_rss:
                    results[name]["peak_rss_mib"] = highest_rss  # memory: the worst run, not the fastest one's
            base = results.get(TRL[task][0][0], {})
            for name, r in results.items():
                if "error" in r:
                    rows.append([size, name, r["error"], "", "", "", "", ""])
                    continue
                speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base.get("tokens_per_s") else "-"
                memory = f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x" if base.get("peak_rss_mib") else "-"
                rows.append(
                    [
                        size,
                        name,
                        f"{r['tokens_per_s']:,.0f}",
                        f"{100 * mfu(r['tokens_per_s'], flops, peak):.1f}%",
                        speed,
                        f"{r['end_to_end_s']:.1f}",
                        f"{r['peak_rss_mib']:,.0f}",
                        memory,
                    ]
                )
        title = TITLES[task]
        table = markdown_table(
            ["model", "configuration", "tokens/s", "MFU", "vs TRL", "end-to-end s", "peak RSS MiB", "RSS vs TRL"], rows
        )
        tables.append(f"### {title}\n\n{table}")
        print(f"{title}\n{table}\n")
    info = machine_info()
    vers = versions(["torch", "transformers", "peft"]) | (
        {"trl": versions(["trl"], trl_python).get("trl")} if trl_python else {}
    )
    header = (
        f"Measured by `python bench/preference.py` on {info['cpu']} ({info['cores']} cores, {args.threads} thread(s) per run, "
        f"load average {', '.join(f'{x:.1f}' for x in info['load_average'] or [])}); "
        + ", ".join(f"{k} {v}" for k, v in vers.items())
        + (
            f". Demo labelled completions (unpaired.jsonl, {args.records or 300} examples, chatml), batch {BATCH} examples, max length {MAX_LENGTH}, "
            if args.tasks == "kto"
            else f". Demo pairs ({args.records or 300}, chatml), batch {BATCH} pairs, max length {MAX_LENGTH}, "
        )
        + (f"{args.max_steps} steps" if args.max_steps else f"{args.epochs} epoch(s)")
        + f", tokens/s the best of {args.repeats} runs, peak RSS the highest, "
        + ("fp32" if args.precision == "fp32" else "bf16 autocast over fp32 weights on both sides")
        + ", models: "
        + ", ".join(describe_size(s) for s in args.sizes.split(","))
        + ". "
        + mfu_line("cpu", {args.precision: peak})
    )
    replace_block(Path(args.doc), args.block, header + "\n\n" + "\n\n".join(tables))
    log(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
