"""PPO throughput and memory: `rlkit ppo` against TRL's PPOTrainer (trl 1.12, `trl.experimental.ppo`).

    python bench/ppo.py                                   # tiny Llama: rlkit, TRL, plain generate; 3 repeats
    python bench/ppo.py --models tiny,smollm2             # also SmolLM2-135M-Instruct (needs `make demo-model`)
    python bench/ppo.py --repeats 1 --steps 3 --no-doc    # a quick look, table on stdout only

Every configuration runs in its own process, one after another, with one torch thread
(--threads). A child records, at the end of every PPO step (one rollout + its updates), the wall
clock, the process CPU time, the time spent generating, the time the rollout took (generation,
the no-grad forwards of policy, value model and reference, and scoring), the sampled tokens and
the response tokens (up to and including the first EOS). The first --warmup steps are left out;
a run's numbers are medians over its measured steps, a configuration's numbers the median over
its --repeats runs (which alternate who goes first), peak RSS the median of the runs' peaks.

What is held equal: the policy directory, the reward model (one saved sequence classifier,
the same weights for both), the value model (initialised from the reward model and trained in
full: rlkit `--critic rm`, TRL's `value_model`), the prompts (rlkit/demo/data/prompts.jsonl,
encoded by rlkit's chat-template code for both), rollout size (batch x grad-accum x
mini-batches), generation chunk (= batch), response length, temperature, PPO epochs,
mini-batches, learning rate, KL coefficient and estimator, clip ranges, vf coef, fp32, no
gradient checkpointing, no gradient clipping (TRL's PPO loop never clips), seed. Differences
that remain are the trainers' own (see docs/ppo.md, "Benchmark").

A third configuration, "plain generate", loads the policy with transformers and runs only the
`model.generate` loop on the same number of prompts in the same chunks with the same sampling
settings: what rlkit's rollout generation adds on top of generation itself. A fourth, rlkit
with its default shared value head (`--critic shared`), is measured with --with-shared.

TRL lives in its own virtual environment (default .cache/bench/trl112-venv, created on first use
with `trl==1.12.0 --no-deps`, sharing this environment's torch/transformers through a .pth
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
    run_plain,
    trl_run_args,
    versions,
    write_step_result,
)

DEFAULT_GGUF = REPO / ".cache" / "demo" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PROMPTS = REPO / "rlkit" / "demo" / "data" / "prompts.jsonl"
DEFAULT_WORK = REPO / ".cache" / "bench"
TRL_REQUIREMENT = "trl==1.12.0"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"}
LABELS = {
    "rlkit": "rlkit (`--critic rm`)",
    "rlkit-shared": "rlkit (`--critic shared`, default)",
    "trl": "TRL",
    "generate": "plain `model.generate`",
}


# ---- models ----------------------------------------------------------------------------------


def build_reward_model(policy_dir: Path, out: Path, seed: int = 1, kind: str = "small") -> None:
    """A one-score sequence classifier that uses the policy's tokenizer (TRL scores the policy's
    token ids directly, so the two must share a vocabulary).

    kind "small": a random-init Llama (hidden 64, 2 layers), so that scoring and the value model
    cost next to nothing on either side. kind "policy": the policy's own weights with a fresh
    score head, the model `rlkit train-rm` starts from: a reward model the policy's size, as in
    StackLLaMA, which also makes TRL's value model (initialised from it, trained in full) the
    policy's size.
    """
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    tok = AutoTokenizer.from_pretrained(policy_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(seed)
    if kind == "policy":
        model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        torch.nn.init.normal_(model.score.weight, std=0.5 / model.config.hidden_size**0.5)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        num_labels=1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attn_implementation="sdpa",
    )
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def encoded_prompts(model_dir: str, prompts_file: str) -> list[list[int]]:
    """The prompts as rlkit encodes them for generation (the policy's chat template, generation prompt)."""
    from rlkit.data.prompts import encode_prompt
    from rlkit.data.templates import resolve_template
    from rlkit.models.load import load_tokenizer, resolve_source

    tok = load_tokenizer(resolve_source(model_dir))
    template = resolve_template(None, tok)
    rows = [json.loads(line) for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    return [encode_prompt(tok, template, [{"role": "user", "content": r["prompt"]}]) for r in rows]


# ---- children --------------------------------------------------------------------------------


class PPOClock:
    """Per PPO step: wall, CPU, generation s, rollout s, sampled and response tokens."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.mark = (0.0, 0.0)

    def start(self) -> None:
        self.mark = (time.perf_counter(), time.process_time())

    def step(self, generation_s: float, rollout_s: float, sampled: float, response: float) -> None:
        now = (time.perf_counter(), time.process_time())
        wall, cpu = now[0] - self.mark[0], now[1] - self.mark[1]
        self.steps.append(
            {
                "wall_s": wall,
                "cpu_s": cpu,
                "generation_s": generation_s,
                "rollout_s": rollout_s,
                "update_s": wall - rollout_s,
                "sampled_tokens": sampled,
                "response_tokens": response,
            }
        )
        self.mark = now


def finish(result_path: str, clock: PPOClock, warmup: int, extra: dict[str, Any]) -> None:
    write_step_result(result_path, clock.steps, warmup, extra)


def ppo_argv(spec: dict[str, Any], critic: str) -> list[str]:
    argv = [
        "ppo",
        spec["model"],
        spec["prompts"],
        "-o",
        spec["out"],
        "--overwrite",
        "--reward",
        spec["rm"],
        "--critic",
        critic,
        "--max-steps",
        str(spec["steps"]),
        "--batch-size",
        str(spec["batch"]),
        "--grad-accum",
        str(spec["grad_accum"]),
        "--mini-batches",
        str(spec["mini_batches"]),
        "--ppo-epochs",
        str(spec["ppo_epochs"]),
        "--max-new-tokens",
        str(spec["max_new_tokens"]),
        "--temperature",
        str(spec["temperature"]),
        "--lr",
        str(spec["lr"]),
        "--kl-coef",
        str(spec["kl_coef"]),
        "--max-grad-norm",
        "0",
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
    if spec.get("gradient_checkpointing"):
        argv += ["--gradient-checkpointing"]
    if spec["lora"]:
        argv += [
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
    else:
        argv += ["--full"]
    return argv


def child_rlkit(spec: dict[str, Any], result_path: str, critic: str) -> None:
    """`rlkit ppo` as `python -m rlkit` runs it; the metrics sink marks the end of every PPO step."""
    from rlkit.training import engine, metrics

    clock = PPOClock()
    fit, sink_log = engine.Engine.fit, metrics.MetricsSink.log

    def timed_fit(self, *args, **kwargs):
        clock.start()
        return fit(self, *args, **kwargs)

    def timed_log(self, step, values):
        if "score/mean" in values:  # the summary line: the last update of a PPO step
            gen = values["time/generation_s"]
            clock.step(
                gen, values["time/rollout_s"], values["generation_tokens_per_s"] * gen, values["response_tokens"]
            )
        return sink_log(self, step, values)

    engine.Engine.fit, metrics.MetricsSink.log = timed_fit, timed_log
    argv = ppo_argv(spec, critic)
    sys.argv = ["rlkit", *argv]
    from rlkit.cli import main

    try:
        main()
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    finish(result_path, clock, spec["warmup"], {"command": "rlkit " + command_line(argv)})


def frozen_dtype(spec: dict[str, Any]) -> Any:
    """Where the frozen weights live, as rlkit keeps them: a LoRA base (and the reward model
    scoring it) in bf16 under bf16 precision; everything else in fp32 (autocast computes in bf16)."""
    import torch

    return torch.bfloat16 if spec["precision"] == "bf16" and spec["lora"] else torch.float32


def variant(precision: str, gradient_checkpointing: bool, reward_model: str = "small") -> str:
    """'' for the main configuration, else e.g. '-bf16', '-gc', '-bf16-gc', '-bf16-policy-rm': summary file and doc block suffix."""
    return (
        ("" if precision == "fp32" else f"-{precision}")
        + ("-gc" if gradient_checkpointing else "")
        + ("-policy-rm" if reward_model == "policy" else "")
    )


def summary_name(precision: str, gradient_checkpointing: bool = False, reward_model: str = "small") -> str:
    return f"summary{variant(precision, gradient_checkpointing, reward_model)}.json"


def child_trl(spec: dict[str, Any], result_path: str) -> None:
    """TRL's PPOTrainer with the same models, prompts, rollout size, lengths, epochs and hyper-parameters."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if spec["precision"] == "bf16":
        # what `accelerate launch --mixed_precision bf16` sets: TRL's PPOTrainer makes its own
        # Accelerator without a precision, so `bf16=True` alone would leave it in fp32
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    import datasets
    import torch
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(spec["seed"])
    clock = PPOClock()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token is None:  # as rlkit does
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # TRL's PPO generates after the query: left-padded queries
    eos = tok.eos_token_id
    step = {"generation_s": 0.0, "sampled": 0, "response": 0, "rollout_end": None}

    real_generation, real_forward = ppo_module.batch_generation, ppo_module.forward

    def timed_generation(model, queries, *args, **kwargs):
        t0 = time.perf_counter()
        query_responses, logits = real_generation(model, queries, *args, **kwargs)
        step["generation_s"] += time.perf_counter() - t0
        responses = query_responses[:, queries.shape[1] :]
        step["sampled"] += responses.numel()
        is_eos = responses == eos
        ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, responses.shape[1])
        step["response"] += int(ends.sum())
        return query_responses, logits

    def timed_forward(model, *args, **kwargs):
        if torch.is_grad_enabled() and step["rollout_end"] is None:  # the first training forward: the rollout is over
            step["rollout_end"] = time.perf_counter()
        return real_forward(model, *args, **kwargs)

    ppo_module.batch_generation, ppo_module.forward = timed_generation, timed_forward

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            rollout_s = (step["rollout_end"] or time.perf_counter()) - self.t0
            clock.step(step["generation_s"], rollout_s, step["sampled"], step["response"])
            step.update(generation_s=0.0, sampled=0, response=0, rollout_end=None)
            self.t0 = time.perf_counter()

    ids = encoded_prompts(spec["model"], spec["prompts"])
    train = datasets.Dataset.from_dict({"input_ids": ids})
    frozen = frozen_dtype(spec)
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=frozen)
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["rm"], num_labels=1, dtype=frozen)
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["rm"], num_labels=1, dtype=torch.float32)
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
    rollout = spec["batch"] * spec["grad_accum"] * spec["mini_batches"]
    args = PPOConfig(
        output_dir=spec["out"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=spec["grad_accum"] * spec["mini_batches"],  # TRL: rollout = batch x accumulation
        num_mini_batches=spec["mini_batches"],
        num_ppo_epochs=spec["ppo_epochs"],
        total_episodes=spec["steps"] * rollout,
        local_rollout_forward_batch_size=spec["batch"],  # generation / no-grad forward chunk, as rlkit's --batch-size
        response_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        stop_token="eos",
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        optim="adamw_torch",
        kl_coef=spec["kl_coef"],
        kl_estimator="k1",
        num_sample_generations=0,
        **{
            **trl_run_args(spec["seed"]),
            "bf16": spec["precision"] == "bf16",
            "gradient_checkpointing": bool(spec.get("gradient_checkpointing")),
        },
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=None,
        reward_model=reward_model,
        train_dataset=train,
        value_model=value_model,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    trainer.train()
    finish(result_path, clock, spec["warmup"], {"trl": trl.__version__})


def child_generate(spec: dict[str, Any], result_path: str) -> None:
    """Only `model.generate`: rlkit's rollout prompts, chunks and sampling settings, nothing else."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlkit.models.load import load_tokenizer, resolve_source
    from rlkit.tools.generation import left_pad

    torch.manual_seed(spec["seed"])
    tok = load_tokenizer(resolve_source(spec["model"]))
    ids = encoded_prompts(spec["model"], spec["prompts"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=frozen_dtype(spec)).eval()
    if spec["lora"]:  # the same unmerged adapter layers rlkit's policy generates through
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=LORA["r"],
                lora_alpha=LORA["alpha"],
                lora_dropout=LORA["dropout"],
                target_modules=LORA["targets"],
                task_type="CAUSAL_LM",
            ),
        ).eval()
    rollout = spec["batch"] * spec["grad_accum"] * spec["mini_batches"]
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(spec["seed"])).tolist()
    clock = PPOClock()
    clock.start()
    for s in range(spec["steps"]):
        chosen = [ids[order[(s * rollout + i) % len(ids)]] for i in range(rollout)]
        prompt_ids, mask = left_pad(chosen, tok.pad_token_id)
        t0 = time.perf_counter()
        sampled = response = 0
        with (
            torch.no_grad(),
            torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16"),
        ):
            for start in range(0, rollout, spec["batch"]):
                batch_ids, batch_mask = prompt_ids[start : start + spec["batch"]], mask[start : start + spec["batch"]]
                out = model.generate(
                    input_ids=batch_ids,
                    attention_mask=batch_mask,
                    max_new_tokens=spec["max_new_tokens"],
                    do_sample=True,
                    temperature=spec["temperature"],
                    top_p=1.0,
                    top_k=None,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                    use_cache=True,
                )
                responses = out[:, batch_ids.shape[1] :]
                sampled += responses.numel()
                is_eos = responses == tok.eos_token_id
                response += int(torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, responses.shape[1]).sum())
        gen = time.perf_counter() - t0
        clock.step(gen, gen, sampled, response)
    finish(result_path, clock, spec["warmup"], {})


def child_main(kind: str, spec_json: str, result_path: str) -> None:
    spec = json.loads(spec_json)
    if kind in ("rlkit", "rlkit-shared"):
        child_rlkit(spec, result_path, "rm" if kind == "rlkit" else "shared")
    elif kind == "trl":
        child_trl(spec, result_path)
    elif kind == "generate":
        child_generate(spec, result_path)
    elif kind == "build-tiny":
        from bench_sft import build_tiny

        build_tiny(Path(spec["out"]), Path(spec["data_dir"]))
    elif kind == "build-rm":
        build_reward_model(Path(spec["policy"]), Path(spec["out"]), kind=spec.get("kind", "small"))
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
    return {
        "step_s": med("wall_s"),
        "cpu_s": med("cpu_s"),
        "rollout_s": med("rollout_s"),
        "generation_s": med("generation_s"),
        "update_s": med("update_s"),
        "generated_tokens_per_s": statistics.median(s["sampled_tokens"] / max(s["generation_s"], 1e-9) for s in steps),
        "response_tokens_per_step": med("response_tokens"),
        "sampled_tokens_per_step": med("sampled_tokens"),
        "response_tokens_per_s": statistics.median(s["response_tokens"] / max(s["wall_s"], 1e-9) for s in steps),
        "peak_rss_mib": result["peak_rss_mib"],
        "steps_measured": len(steps),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="tiny", help="comma-separated: tiny, smollm2 (default: tiny)")
    p.add_argument(
        "--trainers",
        default="rlkit,trl,generate",
        help="comma-separated: rlkit, trl, generate, rlkit-shared (default: rlkit,trl,generate)",
    )
    p.add_argument(
        "--with-shared", action="store_true", help="also rlkit with its default shared value head (--critic shared)"
    )
    p.add_argument(
        "--gguf",
        type=Path,
        default=DEFAULT_GGUF,
        help="SmolLM2-135M-Instruct .gguf file (`make demo-model` fetches it)",
    )
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument("--steps", type=int, default=20, help="measured PPO steps per tiny-model run (default 20)")
    p.add_argument("--smollm2-steps", type=int, default=2, help="measured PPO steps per SmolLM2 run (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="PPO steps run before measuring (default 1)")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per configuration, alternating order; the median is reported (default 3)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32 (default), or bf16 for both trainers: rlkit --precision bf16, TRL bf16=True under accelerate's bf16 autocast, "
        "LoRA bases and the reward model stored in bf16 on both sides; its table goes to the bench:ppo-bf16 block",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="ask both trainers for gradient checkpointing (rlkit --gradient-checkpointing, TRL gradient_checkpointing=True); "
        "its table goes to the bench:ppo-gc (or ppo-bf16-gc) block",
    )
    p.add_argument(
        "--reward-model",
        choices=("small", "policy"),
        default="small",
        help="small (default): a random 2-layer, 64-wide classifier, so scoring and TRL's value model cost little; "
        "policy: the policy's own weights with a fresh score head (what train-rm starts from), a reward and value "
        "model the policy's size as in StackLLaMA; its table goes to the bench:ppo[-bf16]-policy-rm block",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS); 0: library default (default 1)"
    )
    p.add_argument("--batch", type=int, default=8, help="prompts per micro-batch and per generation chunk (default 8)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per update (default 2)")
    p.add_argument(
        "--mini-batches",
        type=int,
        default=1,
        help="updates per PPO epoch (default 1; see the note on TRL in docs/ppo.md)",
    )
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--smollm2-full", action="store_true", help="full fine-tuning of SmolLM2 (default: LoRA r 16, all-linear)"
    )
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache and results dir (default .cache/bench)")
    p.add_argument("--trl-venv", type=Path, default=None, help="separate venv for TRL (default WORK/trl112-venv)")
    p.add_argument("--trl-requirement", default=TRL_REQUIREMENT)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument(
        "--doc",
        type=Path,
        default=REPO / "docs" / "ppo.md",
        help="page whose `bench:ppo` block is rewritten (docs/benchmarks.md gets a pointer)",
    )
    p.add_argument("--no-doc", action="store_true", help="print the tables only")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rebuild the tables (and the doc block) from WORK/ppo/summary.json of the last run",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.spec, args.result)
        return 0
    if args.report_only:
        summary_file = (
            args.work.resolve() / "ppo" / summary_name(args.precision, args.gradient_checkpointing, args.reward_model)
        )
        return report(json.loads(summary_file.read_text()), None if args.no_doc else args.doc)
    started = time.time()
    load_before = os.getloadavg()
    work = args.work.resolve()
    results_dir, logs = work / "ppo", work / "ppo" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    this = [sys.executable, str(Path(__file__).resolve())]
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    if args.with_shared and "rlkit-shared" not in trainers:
        trainers.insert(1, "rlkit-shared")
    notes: list[str] = []
    trl_python = None
    if "trl" in trainers:
        trl_python, message = ensure_venv_with(
            args.trl_venv or work / "trl112-venv",
            args.trl_requirement,
            "trl",
            "from trl.experimental.ppo import PPOConfig, PPOTrainer",
        )
        log(message)
        if trl_python is None:
            notes.append(f"TRL rows skipped: {message}")
            trainers.remove("trl")
    tmp = Path(tempfile.mkdtemp(prefix="rlkit-bench-ppo-"))
    env = {
        "RLKIT_CACHE_DIR": str(tmp / "rlkit-cache"),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
    }
    run_env = dict(env)
    if args.threads > 0:
        run_env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
    table: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    settings: dict[str, str] = {}
    run_loads: list[float] = []
    # the MFU column: model FLOPs per response token over this CPU's matmul rate, measured now
    peak = matmul_peak_flops("cpu", args.precision)
    flops: dict[str, float] = {}
    try:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
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
            label, lora, steps = (
                ("tiny Llama", False, args.steps)
                if name == "tiny"
                else ("SmolLM2-135M-Instruct", not args.smollm2_full, args.smollm2_steps)
            )
            matmul, layers, hidden = matmul_params_of(str(model_dir))
            context = 64 + args.max_new_tokens  # short demo prompts, then the response
            # a response token is sampled once (a forward) and trained on --ppo-epochs times; the prompt's
            # tokens and the rollout's no-grad forwards are left out: a lower bound
            flops[label] = model_flops_per_token(matmul, layers, hidden, context, train=False) + args.ppo_epochs * (
                model_flops_per_token(matmul, layers, hidden, context, lora=lora)
            )
            rm_dir = tmp / f"rm-{name}"
            rm_spec = {"policy": str(model_dir), "out": str(rm_dir), "kind": args.reward_model}
            run_plain(this + ["--child", "build-rm", "--spec", json.dumps(rm_spec)], env, logs / f"build-rm-{name}.log")
            lr = 1.4e-5 if lora else 3e-6
            rollout = args.batch * args.grad_accum * args.mini_batches
            settings[label] = (
                f"policy {'LoRA (r 16, alpha 32, dropout 0.05, all-linear)' if lora else 'full fine-tuning'}; "
                + (
                    "reward model: the policy's weights with a fresh score head (the policy's size); "
                    if args.reward_model == "policy"
                    else "reward model: a random 2-layer, 64-wide Llama classifier; "
                )
                + "value model initialised from the reward model, trained in full (TRL; rlkit `--critic rm`); "
                f"rollout {rollout} prompts (batch {args.batch} x grad-accum {args.grad_accum} x mini-batches {args.mini_batches}), generated in chunks of {args.batch}; "
                f"{args.max_new_tokens} new tokens max, temperature {args.temperature}; {args.ppo_epochs} PPO epochs; lr {lr:g}, KL coef {args.kl_coef} (k1); "
                f"{args.warmup} warmup + {steps} measured PPO steps per run, {args.repeats} runs per configuration; "
                + (
                    "fp32"
                    if args.precision == "fp32"
                    else "bf16 autocast on both sides, the LoRA base and the reward model stored in bf16, the value model in fp32"
                )
                + (
                    "; gradient checkpointing asked of both (rlkit `--gradient-checkpointing`, TRL `gradient_checkpointing=True`)"
                    if args.gradient_checkpointing
                    else ""
                )
            )
            runs: dict[str, list[dict[str, Any]]] = {}
            for repeat in range(args.repeats):
                order = list(reversed(trainers)) if repeat % 2 else list(trainers)
                for trainer in order:
                    key = f"{name}-{trainer}{variant(args.precision, args.gradient_checkpointing, args.reward_model) or '-fp32'}-{repeat + 1}"
                    spec = {
                        "model": str(model_dir),
                        "rm": str(rm_dir),
                        "prompts": str(args.prompts.resolve()),
                        "out": str(tmp / "out" / key),
                        "steps": steps + args.warmup,
                        "warmup": args.warmup,
                        "batch": args.batch,
                        "grad_accum": args.grad_accum,
                        "mini_batches": args.mini_batches,
                        "ppo_epochs": args.ppo_epochs,
                        "max_new_tokens": args.max_new_tokens,
                        "temperature": args.temperature,
                        "lr": lr,
                        "kl_coef": args.kl_coef,
                        "seed": args.seed,
                        "lora": lora,
                        "precision": args.precision,
                        "gradient_checkpointing": args.gradient_checkpointing,
                    }
                    python = trl_python if trainer == "trl" else sys.executable
                    run_loads.append(os.getloadavg()[0])
                    log(
                        f"{key}: {args.warmup} warmup + {steps} measured PPO steps (load average {run_loads[-1]:.1f}) ..."
                    )
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
                    result.update({"key": key, "spec": spec})
                    result_path.write_text(json.dumps(result, indent=1) + "\n")
                    if "error" in result or not result.get("steps"):
                        log(f"{key}: FAILED {result.get('error', 'no steps')} (log: {logs / (key + '.log')})")
                        continue
                    one = run_summary(result)
                    log(
                        f"{key}: step {one['step_s']:.2f}s (rollout {one['rollout_s']:.2f}s, generation {one['generation_s']:.2f}s), "
                        f"{one['generated_tokens_per_s']:.0f} generated tok/s, peak RSS {one['peak_rss_mib']:.0f} MiB"
                    )
                    runs.setdefault(trainer, []).append(one)
            table[label] = [(t, combine_runs(runs[t])) for t in trainers if runs.get(t)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    meta = {
        "command": command_line(["python", "bench/ppo.py", *argv]),
        "date": time.strftime("%Y-%m-%d"),
        "minutes": (time.time() - started) / 60,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "run_loads": run_loads,
        "threads": args.threads,
        "trl": versions(["trl"], trl_python).get("trl") if trl_python else None,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "reward_model": args.reward_model,
        "mfu": {"peak": peak, "flops_per_response_token": flops},
    }
    summary = {"table": table, "settings": settings, "notes": notes, "meta": meta}
    (results_dir / summary_name(args.precision, args.gradient_checkpointing, args.reward_model)).write_text(
        json.dumps(summary, indent=1, default=str) + "\n"
    )
    return report(summary, None if args.no_doc else args.doc)


def report(summary: dict[str, Any], doc: Path | None) -> int:
    """The two tables (stdout) and, with `doc`, its `bench:ppo` block, from a run's summary.json."""
    table, meta = summary["table"], summary["meta"]
    trl_v = meta.get("trl")
    mfu_of = meta.get("mfu") or {}  # summaries written before the MFU column have none
    main_rows, gen_rows = [], []
    for label, rows in table.items():
        trl_row = dict(rows).get("trl")
        for trainer, r in rows:
            name = LABELS[trainer] + (f" {trl_v}" if trainer == "trl" and trl_v else "")
            spread = f"{r['step_s_range'][0]:.2f}-{r['step_s_range'][1]:.2f}"
            if trainer != "generate":
                # the targets: response tokens/s (the tokens PPO trains on) and peak RSS, against TRL's
                vs_trl = f"{r['response_tokens_per_s'] / trl_row['response_tokens_per_s']:.2f}x" if trl_row else "-"
                rss_vs_trl = f"{r['peak_rss_mib'] / trl_row['peak_rss_mib']:.2f}x" if trl_row else "-"
                main_rows.append(
                    [
                        label,
                        name,
                        fmt(r["step_s"]),
                        spread,
                        fmt(r["cpu_s"]),
                        fmt(r["rollout_s"]),
                        fmt(r["generation_s"]),
                        fmt(r["update_s"]),
                        fmt(r["generated_tokens_per_s"], 0),
                        fmt(r["response_tokens_per_step"], 0),
                        fmt(r["response_tokens_per_s"], 1),
                        f"{100 * mfu(r['response_tokens_per_s'], mfu_of['flops_per_response_token'][label], mfu_of['peak']):.2f}%"
                        if label in mfu_of.get("flops_per_response_token", {})
                        else "-",
                        vs_trl,
                        fmt(r["peak_rss_mib"], 0),
                        rss_vs_trl,
                    ]
                )
        plain = dict((t, r) for t, r in rows).get("generate")
        for trainer, r in rows:
            name = LABELS[trainer] + (f" {trl_v}" if trainer == "trl" and trl_v else "")
            what = "`model.generate` loop only" if trainer == "generate" else "rollout generation (in the PPO step)"
            vs = f"{r['generated_tokens_per_s'] / plain['generated_tokens_per_s']:.2f}x" if plain else "-"
            gen_rows.append(
                [
                    label,
                    name,
                    what,
                    fmt(r["generation_s"]),
                    fmt(r["sampled_tokens_per_step"], 0),
                    fmt(r["generated_tokens_per_s"], 0),
                    vs,
                ]
            )
            if trainer != "generate":
                rvs = (
                    f"{r['sampled_tokens_per_step'] / max(r['rollout_s'], 1e-9) / plain['generated_tokens_per_s']:.2f}x"
                    if plain
                    else "-"
                )
                gen_rows.append(
                    [
                        label,
                        name,
                        "whole rollout (generation + no-grad forwards + scoring)",
                        fmt(r["rollout_s"]),
                        fmt(r["sampled_tokens_per_step"], 0),
                        fmt(r["sampled_tokens_per_step"] / max(r["rollout_s"], 1e-9), 0),
                        rvs,
                    ]
                )
    t1 = markdown_table(
        [
            "model",
            "trainer",
            "s / PPO step",
            "range over runs",
            "CPU-s / PPO step",
            "rollout s",
            "of which generation s",
            "update s",
            "generated tok/s",
            "response tok / step",
            "response tok/s",
            "MFU",
            "vs TRL",
            "peak RSS (MiB)",
            "RSS vs TRL",
        ],
        main_rows,
    )
    t2 = markdown_table(
        ["model", "who", "what is timed", "s / step", "sampled tok / step", "tok/s", "vs plain generate"], gen_rows
    )
    print(f"{t1}\n\n{t2}")
    notes = list(summary["notes"])
    if mfu_of:
        notes.append(
            mfu_line("cpu", {meta.get("precision", "fp32"): mfu_of["peak"]})
            + " Per response token: one forward to sample it, --ppo-epochs trainings; prompts and the rollout's"
            " no-grad forwards are not counted (a lower bound)."
        )
    header = run_header(meta, summary["settings"], notes)
    block = "\n".join(header) + "\n\n" + t1 + "\n\n" + t2
    if doc is not None:
        name = "ppo" + variant(
            meta.get("precision", "fp32"), bool(meta.get("gradient_checkpointing")), meta.get("reward_model", "small")
        )
        replace_block(doc, name, block)
        log(f"wrote the bench:{name} block of {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
