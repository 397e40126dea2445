"""GRPO throughput and memory: `rlkit grpo` against TRL's GRPOTrainer (trl 1.16, transformers `generate`, no vLLM).

    python bench/grpo.py                                  # tiny Llama, fp32: rlkit and TRL; 3 repeats
    python bench/grpo.py --models tiny,smollm2            # also SmolLM2-135M-Instruct, LoRA (needs `make demo-model`)
    python bench/grpo.py --models smollm2 --smollm2-full --precision bf16
    python bench/grpo.py --repeats 1 --steps 3 --no-doc   # a quick look, table on stdout only
    python bench/grpo.py --tools --models smollm2 --repeats 2   # the tools row: multi-turn episodes with a calculator

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

--tools runs the tools row instead (block bench:grpo-tools-PRECISION): both trainers sample
multi-turn episodes with the demo calculator (`rlkit.demo.tools:calculator`) as their one tool,
up to --max-turns tool rounds (TRL's max_tool_calling_iterations) within --tools-max-new-tokens
for the whole episode (TRL's max_completion_length), the template `chatml-tools` on both sides
(rlkit `--template chatml-tools`; TRL gets it as the tokenizer's chat_template and, since TRL 1.16
only knows the response formats of the chat templates it ships, its own Qwen parser
`trl.chat_template_utils.qwen3_template` as the tokenizer's `response_template`: the same
`<tool_call>{json}</tool_call>` blocks). A model that has never seen a call rarely writes one, so
both start from the same model that has: MODEL merged with a LoRA adapter that `rlkit sft` trained
once on synthetic calculator conversations (--tools-sft-examples, written into WORK/grpo-tools; see
`tool_sft_rows`), cached for SmolLM2 as WORK/SmolLM2-135M-Instruct-tools; each trainer then trains
a fresh LoRA (or the full model) on top, as in the single-turn rows. Tokens are counted from what
each trainer trains on, not from `generate` (a later turn's `generate` input repeats the episode so
far): per step the prompt tokens (first turn, as rendered with the tool schema), the model's tokens
(sampled, loss mask 1) and the tool tokens (tool turns and template markup appended between turns,
mask 0), and the tool calls, failures and model turns of the step's episodes.

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
    trainer_cells,
    trl_run_args,
    versions,
    versus,
    write_step_result,
)

DEFAULT_GGUF = REPO / ".cache" / "demo" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PROMPTS = REPO / "rlkit" / "demo" / "data" / "grpo_prompts.jsonl"
DEFAULT_WORK = REPO / ".cache" / "bench"
TRL_REQUIREMENT = "trl==1.16.0"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"}
LABELS = {"rlkit": "rlkit grpo", "trl": "TRL GRPOTrainer"}
TOOL = "rlkit.demo.tools:calculator"
TOOLS_TEMPLATE = "chatml-tools"


def bench_reward(prompts: list[Any], completions: list[Any], answer: list[int], **_: Any) -> list[float]:
    """The demo checker on plain text: TRL hands conversational completions as message lists."""
    from rlkit.demo.task import arithmetic_reward

    def text(x: Any) -> str:  # a tool message's content may be TRL's {"error": ...}
        return x if isinstance(x, str) else " ".join(str(m.get("content") or "") for m in x)

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

    def add(self, **values: float) -> None:
        """Numbers a trainer hook adds to the step under way (the tools row's token and call counts)."""
        for key, value in values.items():
            self.pending[key] = self.pending.get(key, 0.0) + float(value)

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
    if spec.get("tools"):  # the whole episode's budget is --max-new-tokens (TRL's max_completion_length)
        argv += ["--template", TOOLS_TEMPLATE, "--tools", TOOL, "--max-turns", str(spec["max_turns"])]
        argv += ["--tool-timeout", "0"]  # no time limit, as TRL (which has none)
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
    if spec.get("tools"):
        count_rlkit_episodes(clock)
    argv = grpo_argv(spec)
    sys.argv = ["rlkit", *argv]
    from rlkit.cli import main

    try:
        main()
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    finish(result_path, clock, spec["warmup"], {"command": "rlkit " + command_line(argv)})


def count_rlkit_episodes(clock: GRPOClock) -> None:
    """The tools row's counts from rlkit's multi-turn sampler: what the step trains on."""
    import rlkit.recipes.grpo as recipe

    real = recipe.sample_episodes

    def counted(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        samples = real(*args, **kwargs)
        model = float(samples.response_mask.sum())  # loss mask 1: the sampled ids
        clock.add(
            episodes_s=time.perf_counter() - t0,
            episodes=len(samples.turns),
            prompt_kept=float(samples.query_mask.sum()),
            model_tokens=model,
            tool_tokens=sum(len(ids) for ids in samples.completion_ids) - model,
            turns=sum(samples.turns),
            calls=samples.tool_counts.calls,
            failures=samples.tool_counts.failures,
        )
        return samples

    recipe.sample_episodes = counted


def count_trl_episodes(clock: GRPOClock) -> None:
    """The same counts from TRL's `_generate` (prompt ids, completion ids, tool mask, completions)
    and its `_tool_call_loop` (calls and failures)."""
    from trl import GRPOTrainer

    generate, loop = GRPOTrainer._generate, GRPOTrainer._tool_call_loop

    def counted(self: Any, prompts: list[Any]) -> Any:
        t0 = time.perf_counter()
        out = generate(self, prompts)
        prompt_ids, completion_ids, tool_mask, completions = out[:4]
        masks = tool_mask if tool_mask is not None else [[1] * len(c) for c in completion_ids]
        model = float(sum(sum(m) for m in masks))
        clock.add(
            episodes_s=time.perf_counter() - t0,
            episodes=len(completion_ids),
            prompt_kept=sum(len(p) for p in prompt_ids),
            model_tokens=model,
            tool_tokens=sum(len(c) for c in completion_ids) - model,
            turns=sum(sum(m.get("role") == "assistant" for m in c) for c in completions),
        )
        return out

    def counted_loop(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = loop(self, *args, **kwargs)
        clock.add(calls=out[4], failures=out[5])
        return out

    GRPOTrainer._generate, GRPOTrainer._tool_call_loop = counted, counted_loop


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
    tool_args: dict[str, Any] = {}
    if spec.get("tools"):
        from trl.chat_template_utils import qwen3_template

        from rlkit.data.templates import shipped_template
        from rlkit.demo.tools import calculator

        # rlkit's chatml-tools as the chat template; TRL 1.16 parses calls only for the templates it ships
        # (add_response_schema refuses any other), so it gets its own parser of the same
        # <tool_call>{json}</tool_call> blocks after <|im_start|>assistant\n (Qwen's) as response_template
        tok.chat_template = shipped_template(TOOLS_TEMPLATE)
        tok.response_template = qwen3_template
        tool_args = {"tools": [calculator]}
        count_trl_episodes(clock)

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
        max_tool_calling_iterations=spec.get("max_turns"),
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
        **tool_args,
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


# ---- the tools row's starting model ---------------------------------------------------------


def tools_system_text(model_dir: Path) -> str:
    """The system turn chatml-tools writes for the calculator's schema (transformers'
    `get_json_schema`, as both trainers render it), so SFT examples hold the very prompt GRPO shows."""
    from transformers import AutoTokenizer

    from rlkit.data.templates import shipped_template
    from rlkit.demo.tools import calculator

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "x"}],
        tools=[calculator],
        chat_template=shipped_template(TOOLS_TEMPLATE),
        tokenize=False,
    )
    head, end = "<|im_start|>system\n", "<|im_end|>\n<|im_start|>user\n"
    if not text.startswith(head) or end not in text:
        raise SystemExit(f"{TOOLS_TEMPLATE} rendered an unexpected system turn: {text[:120]!r}")
    return text[len(head) : text.index(end)]


def tool_sft_rows(n: int, seed: int, system: str) -> list[dict[str, Any]]:
    """`n` synthetic conversations in the demo prompts' phrasings (other numbers): the question, a
    calculator call as chatml-tools renders `tool_calls`, its result as a tool turn, the answer."""
    import random

    rng = random.Random(seed)
    names = ["Ava", "Ben", "Leo", "Mia", "Sam", "Zoe"]
    things = ["apples", "cards", "coins", "books", "shells", "marbles"]
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        kind = rng.choice(["+", "-", "*", "story+", "story-", "story*"])
        if kind in ("-", "story-") and b > a:
            a, b = b, a
        if kind in ("*", "story*"):
            b = rng.randint(2, 12)
        op = kind[-1]
        who, what = rng.choice(names), rng.choice(things)
        question = {
            "+": rng.choice([f"What is {a} plus {b}?", f"How much is {a} + {b}?", f"What is {a} + {b}?"]),
            "-": rng.choice([f"What is {a} minus {b}?", f"What is {a} - {b}?", f"Calculate {a} - {b}."]),
            "*": rng.choice([f"Compute {a} * {b}.", f"What is {a} times {b}?", f"What is {a} multiplied by {b}?"]),
            "story+": f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?",
            "story-": f"{who} has {a} {what} and gives away {b}. How many {what} are left?",
            "story*": f"There are {b} boxes with {a} {what} in each box. How many {what} are there in total?",
        }[kind]
        expression = f"{a} {op} {b}"
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        call = {"name": "calculator", "arguments": {"expression": expression}}
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": f"<tool_call>\n{json.dumps(call)}\n</tool_call>"},
                    {"role": "tool", "content": str(result)},
                    {"role": "assistant", "content": f"{expression} = {result}. The answer is {result}."},
                ]
            }
        )
    return rows


def tools_model(
    base: Path, merged: Path, sft_dir: Path, data: Path, args: argparse.Namespace, env: dict[str, str], logs: Path
) -> tuple[Path | None, str]:
    """`base` merged with a LoRA adapter `rlkit sft` trained on `tool_sft_rows` (made once: an
    existing `merged` is reused), or (None, why not)."""
    if (merged / "config.json").is_file():
        return merged, ""
    data.parent.mkdir(parents=True, exist_ok=True)
    rows = tool_sft_rows(args.tools_sft_examples, args.seed, tools_system_text(base))
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log(f"teaching {base.name} the call format: rlkit sft on {len(rows)} calculator conversations, then merge-lora")
    sft = [sys.executable, "-m", "rlkit", "sft", str(base), str(data), "-o", str(sft_dir), "--overwrite"]
    sft += [
        "--template",
        TOOLS_TEMPLATE,
        "--lora",
        "--no-packing",
        "--max-steps",
        str(args.tools_sft_steps),
        "--batch-size",
        "8",
    ]
    sft += ["--lr", "3e-4", "--max-length", "1024", "--seed", str(args.seed), "--log-every", "10"]
    merge = [sys.executable, "-m", "rlkit", "merge-lora", str(sft_dir), "-o", str(merged), "--overwrite"]
    for what, cmd in (("sft", sft), ("merge-lora", merge)):
        if run_plain(cmd, env, logs / f"tools-{what}-{base.name}.log") != 0:
            return None, f"tools row skipped: rlkit {what} failed (see {logs / f'tools-{what}-{base.name}.log'})"
    shutil.rmtree(sft_dir, ignore_errors=True)
    return merged, ""


# ---- the orchestrator ------------------------------------------------------------------------


def failed_note(key: str, error: str) -> str:
    """The line under the table for a run that gave no numbers (its configuration's are the other runs')."""
    if error.startswith("exit -9"):
        return f"Run {key} was killed (SIGKILL, what the kernel's out-of-memory killer sends) and gave no numbers."
    return f"Run {key} failed ({error}) and gave no numbers."


def run_summary(result: dict[str, Any]) -> dict[str, float]:
    """One run's medians over its measured steps."""
    steps = result["steps"]
    med = lambda key: statistics.median(s[key] for s in steps)  # noqa: E731
    tokens = [s["prompt_tokens"] + s["completion_tokens"] for s in steps]
    out = {
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
    if "model_tokens" in steps[0]:  # the tools row: counted from what the step trains on (see the module doc)
        kept = [s["prompt_kept"] + s["model_tokens"] + s["tool_tokens"] for s in steps]
        per_s = lambda key: statistics.median(s[key] / max(s["wall_s"], 1e-9) for s in steps)  # noqa: E731
        total = lambda key: sum(s.get(key, 0.0) for s in steps)  # noqa: E731
        out.update(
            episodes_s=med("episodes_s"),
            rest_s=statistics.median(s["wall_s"] - s["episodes_s"] for s in steps),
            prompt_tokens_per_step=med("prompt_kept"),
            model_tokens_per_step=med("model_tokens"),
            tool_tokens_per_step=med("tool_tokens"),
            tokens_per_step=statistics.median(kept),
            completion_tokens_per_step=med("model_tokens"),
            tokens_per_s=statistics.median(t / max(s["wall_s"], 1e-9) for t, s in zip(kept, steps)),
            model_tokens_per_s=per_s("model_tokens"),
            tool_tokens_per_s=per_s("tool_tokens"),
            calls_per_episode=total("calls") / max(total("episodes"), 1),
            failure_share=total("failures") / max(total("calls"), 1),
            turns_per_episode=total("turns") / max(total("episodes"), 1),
            sampled_tokens_per_step=med("completion_tokens"),
        )
    return out


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
    p.add_argument(
        "--tools", action="store_true", help="the tools row instead: multi-turn episodes with the calculator"
    )
    p.add_argument("--max-turns", type=int, default=2, help="tools row: tool rounds per episode (default 2)")
    p.add_argument(
        "--tools-max-new-tokens", type=int, default=96, help="tools row: the whole episode's token budget (default 96)"
    )
    p.add_argument("--tools-sft-examples", type=int, default=128, help="tools row: SFT conversations (default 128)")
    p.add_argument("--tools-sft-steps", type=int, default=32, help="tools row: SFT steps of 8 (default 32)")
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
            if args.tools:  # both trainers start from the same model that has seen the call format
                merged = (tmp if name == "tiny" else work) / f"{model_dir.name}-tools"
                sft_data = results_dir / "tools-sft" / f"{name}.jsonl"
                model_dir, skipped = tools_model(model_dir, merged, tmp / f"sft-{name}", sft_data, args, env, logs)
                if model_dir is None:
                    notes.append(skipped)
                    continue
            max_new = args.tools_max_new_tokens if args.tools else args.max_new_tokens
            lora = name != "tiny" and not args.smollm2_full
            steps = args.steps if name == "tiny" else args.smollm2_steps
            label = ("tiny Llama" if name == "tiny" else "SmolLM2-135M-Instruct") + (" LoRA" if lora else " full")
            label += f", {args.precision}" + (", calculator tool" if args.tools else "")
            matmul, layers, hidden = matmul_params_of(str(model_dir))
            # short demo prompts (about 250 tokens with the tool schema in the system turn), then the completion
            context = (256 if args.tools else 64) + max_new
            mfu_of["train"][label] = model_flops_per_token(matmul, layers, hidden, context, lora=lora)
            mfu_of["sample"][label] = model_flops_per_token(matmul, layers, hidden, context, train=False)
            lr = 1e-5 if lora else 1e-6
            batch = args.batch * args.grad_accum
            settings[label] = (
                f"{'LoRA (r 16, alpha 32, dropout 0.05, all-linear)' if lora else 'full fine-tuning'}; "
                f"{batch} completions per step ({batch // args.num_generations} prompts x G {args.num_generations}), "
                f"micro-batch {args.batch} x grad-accum {args.grad_accum}; up to {max_new} new tokens; lr {lr:g}; "
                f"{args.warmup} warmup + {steps} measured steps per run, {args.repeats} runs per configuration"
            )
            if args.tools:
                settings[label] += (
                    f"; tool {TOOL}, template {TOOLS_TEMPLATE}, up to {args.max_turns} tool rounds per episode "
                    f"(TRL max_tool_calling_iterations), the {max_new} new tokens the whole episode's budget, model "
                    f"and tool turns together (TRL max_completion_length); starting model: {model_dir.name}, the "
                    f"model merged with a LoRA adapter from `rlkit sft` on {args.tools_sft_examples} synthetic "
                    f"calculator conversations ({args.tools_sft_steps} steps of 8, lr 3e-4)"
                )
            runs: dict[str, list[dict[str, Any]]] = {}
            for repeat in range(args.repeats):
                for trainer in list(reversed(trainers)) if repeat % 2 else list(trainers):
                    key = f"{name}-{'lora' if lora else 'full'}-{args.precision}{'-tools' if args.tools else ''}"
                    key += f"-{trainer}-{repeat + 1}"
                    spec = {
                        "model": str(model_dir),
                        "prompts": str(args.prompts.resolve()),
                        "out": str(tmp / "out" / key),
                        "steps": steps + args.warmup,
                        "warmup": args.warmup,
                        "batch": args.batch,
                        "grad_accum": args.grad_accum,
                        "num_generations": args.num_generations,
                        "max_new_tokens": max_new,
                        "lr": lr,
                        "seed": args.seed,
                        "lora": lora,
                        "precision": args.precision,
                    }
                    if args.tools:
                        spec.update(tools=True, max_turns=args.max_turns)
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
                        notes.append(failed_note(key, result.get("error", "no steps")))
                        continue
                    one = run_summary(result)
                    log(
                        f"{key}: step {one['step_s']:.2f}s (generation {one['generation_s']:.2f}s), "
                        f"{one['tokens_per_s']:.0f} tok/s, peak RSS {one['peak_rss_mib']:.0f} MiB"
                        + (
                            f", {one['calls_per_episode']:.2f} calls and {one['turns_per_episode']:.2f} turns per episode"
                            if "calls_per_episode" in one
                            else ""
                        )
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
        "tools": args.tools,
        "max_turns": args.max_turns if args.tools else None,
        "trl": versions(["trl"], trl_python).get("trl") if trl_python else None,
        "precision": args.precision,
        "mfu": mfu_of,
    }
    summary = {"table": table, "settings": settings, "notes": notes, "meta": meta}
    (results_dir / f"summary-{'tools-' if args.tools else ''}{args.precision}.json").write_text(
        json.dumps(summary, indent=1, default=str) + "\n"
    )
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

    rows: list[list[str]] = []
    if meta.get("tools"):
        rows = tools_rows(table, trl_v, utilisation)
        columns = ["model", "trainer", "s / step", "range over runs", "episodes s", "generation s", "the rest s"]
        columns += ["calls / episode", "turns / episode", "prompt + model + tool tokens / step", "tokens/s", "vs TRL"]
        columns += ["model tokens/s", "vs TRL", "tool tokens/s", "MFU", "peak RSS (MiB)", "RSS vs TRL"]
    else:
        for label, results in table.items():
            trl_row = dict(results).get("trl")
            for trainer, r in results:
                name = LABELS[trainer] + (f" {trl_v}" if trainer == "trl" and trl_v else "")
                rows.append(
                    [
                        *trainer_cells(label, name, r),
                        fmt(r["generation_s"]),
                        fmt(r["rest_s"]),
                        fmt(r["tokens_per_step"], 0),
                        fmt(r["tokens_per_s"], 0),
                        utilisation(label, r),
                        versus(r, trl_row, "tokens_per_s"),
                        fmt(r["peak_rss_mib"], 0),
                        versus(r, trl_row, "peak_rss_mib"),
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
    if meta.get("tools"):
        notes.append(tools_note(table))
    header = run_header(meta, summary["settings"], notes)
    if doc is not None:  # one block per precision, one for --smollm2-full runs, one for the tools row
        name = f"grpo-{'tools-' if meta.get('tools') else ''}{meta['precision']}"
        name += "-full" if meta.get("smollm2_full") else ""
        replace_block(doc, name, "\n".join(header) + "\n\n" + t)
        log(f"wrote the bench:{name} block of {doc}")
    return 0


def tools_rows(
    table: dict[str, list[tuple[str, dict[str, Any]]]], trl_v: str | None, utilisation: Any
) -> list[list[str]]:
    """The tools row's table: the step's time split into the episodes (all turns, tools and templates
    included), `generate` within them and the rest; tokens counted apart (see the module doc)."""
    rows = []
    for label, results in table.items():
        trl_row = dict(results).get("trl")
        for trainer, r in results:
            name = LABELS[trainer] + (f" {trl_v}" if trainer == "trl" and trl_v else "")
            rows.append(
                [
                    *trainer_cells(label, name, r),
                    fmt(r["episodes_s"]),
                    fmt(r["generation_s"]),
                    fmt(r["rest_s"]),
                    fmt(r["calls_per_episode"]),
                    fmt(r["turns_per_episode"]),
                    f"{r['prompt_tokens_per_step']:,.0f} + {r['model_tokens_per_step']:,.0f} + "
                    f"{r['tool_tokens_per_step']:,.0f}",
                    fmt(r["tokens_per_s"], 0),
                    versus(r, trl_row, "tokens_per_s"),
                    fmt(r["model_tokens_per_s"], 1),
                    versus(r, trl_row, "model_tokens_per_s"),
                    fmt(r["tool_tokens_per_s"], 1),
                    utilisation(label, r),
                    fmt(r["peak_rss_mib"], 0),
                    versus(r, trl_row, "peak_rss_mib"),
                ]
            )
    return rows


def tools_note(table: dict[str, list[tuple[str, dict[str, Any]]]]) -> str:
    """The line under the tools table: calls, failures and what `generate` sampled beyond what was kept."""
    parts = []
    for label, results in table.items():
        for trainer, r in results:
            parts.append(
                f"{LABELS[trainer]} ({label}): {r['calls_per_episode']:.2f} calls per episode, "
                f"{100 * r['failure_share']:.0f}% of them failed; `generate` sampled "
                f"{r['sampled_tokens_per_step']:,.0f} tokens a step (through each row's first EOS) for "
                f"{r['model_tokens_per_step']:,.0f} kept"
            )
    return (
        "Tool use in the measured steps (medians over runs): "
        + "; ".join(parts)
        + ". tokens/s = (prompt + model + tool tokens of a step) / step time, every count from what the step"
        " trains on; model tokens/s counts the sampled tokens (loss mask 1) alone, tool tokens/s the tool turns"
        " and template markup appended between turns (mask 0)."
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
