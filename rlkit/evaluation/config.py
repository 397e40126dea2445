"""The eval options, and the one place that decides which question the flags ask.

The question is named by its data flag (--pairs, --prompts, --completions, --data): exactly
one must be given, and every other flag either belongs to that question or is refused with
a line saying which question it belongs to, so a wrong combination is never half-obeyed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rlkit.agents.options import check_tool_options, max_turns_option, tool_timeout_option, tools_option
from rlkit.config import arg, check_config, opt
from rlkit.errors import InputError
from rlkit.output import check_creatable
from rlkit.performance import THREADS_HELP

QUESTIONS = (
    "--pairs FILE (reward-model accuracy, or with a policy its implicit-reward accuracy against --ref), "
    "--prompts FILE --reward R (generation quality), --completions FILE --reward R (score existing completions), "
    "or --data FILE (SFT loss and perplexity)"
)


@dataclass
class EvalConfig:
    model: Optional[str] = arg(
        "Model to evaluate: a reward model dir (with --pairs), or a policy (HF dir, hub name, LoRA adapter dir or .gguf). "
        "Not given with --completions.",
        metavar="MODEL",
        default="",  # optional: --completions takes none
    )
    pairs: Optional[str] = opt(
        None,
        "Preference pairs (prompt/chosen/rejected): accuracy of a reward MODEL, or implicit-reward accuracy and margins of a policy MODEL against --ref.",
    )
    prompts: Optional[str] = opt(
        None,
        "Prompts (prompt or messages column): generate with MODEL, score with --reward; KL to --ref, win rate against --baseline.",
    )
    completions: Optional[str] = opt(
        None,
        "Completions already made (prompt/completion JSONL, e.g. `rlkit chat` output): score them with --reward; no MODEL.",
    )
    data: Optional[str] = opt(
        None,
        "SFT data (text, messages or prompt/completion): MODEL's loss and perplexity on its completion/assistant tokens.",
    )
    reward: Optional[str] = opt(
        None,
        "Scorer for --prompts/--completions: a reward model dir, or module:function called as TRL calls reward functions (prompts=, completions=, completion_ids=, every other column), returning floats.",
    )
    ref: Optional[str] = opt(
        None,
        "Reference policy for the implicit reward (--pairs) and the KL (--prompts). Default for an adapter MODEL: its base with the adapter disabled.",
    )
    kl: bool = opt(
        True,
        "With --prompts: the KL of MODEL's answers to --ref, a forward of the reference over every answer (with "
        "--tools, one of MODEL too); --no-kl skips it when only the scores matter.",
    )
    baseline: Optional[str] = opt(
        None,
        "Baseline model (--prompts): generates on the same prompts with the same settings; reports its scores and MODEL's win rate (ties count 1/2).",
    )
    beta: float = opt(
        0.1,
        "β of the implicit reward β·(log π − log π_ref) (--pairs with a policy); use the β the policy was trained with.",
        above=0,
    )
    template: Optional[str] = opt(
        None,
        "Chat template: the tokenizer's own by default; chatml, tulu, llama-2, zephyr, stack-exchange, raw, or a .jinja file.",
        panel="Data",
    )
    columns: Optional[str] = opt(
        None,
        "Map columns onto the standard names, e.g. prompt=question,chosen=response_j,rejected=response_k.",
        panel="Data",
    )
    max_length: int = opt(
        1024,
        "Maximum tokens per scored sequence (longer completions are truncated; pairs whose prompt fills it are dropped and counted).",
        min=2,
        panel="Data",
    )
    max_new_tokens: int = opt(
        128,
        "Most tokens generated per completion (--prompts); with --tools the budget of the whole episode, tool turns included (as grpo's).",
        min=1,
    )
    temperature: float = opt(0.0, "Sampling temperature for --prompts (0: greedy).", min=0)
    top_p: float = opt(1.0, "Nucleus sampling for --prompts (1: off).", above=0, max=1)
    seed: int = opt(42, "Seed for sampling (--prompts); same seed, same completions.", min=0)
    tools: list[str] = tools_option(
        "with --prompts the model (and --baseline) answers in episodes as grpo's, the calls run and their results "
        "appended, the rewards scored on the transcript, tool metrics reported."
    )
    max_turns: Optional[int] = max_turns_option()
    tool_timeout: float = tool_timeout_option()
    batch_size: int = opt(8, "Sequences (or pairs) per forward pass.", min=1)
    limit: int = opt(0, "Evaluate only the first N records (0: all).", min=0)
    dtype: str = opt(
        "auto",
        "Weights dtype: auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16, float16.",
        choices=("auto", "float32", "bfloat16", "float16"),
        panel="Speed and memory",
    )
    threads: Optional[int] = opt(None, THREADS_HELP, min=1, panel="Speed and memory")
    output_dir: Optional[str] = opt(
        None,
        "Also write report.json (metrics and per-example scores) and scores.png (score distributions) into this dir.",
        panel="Inputs and outputs",
    )


def question(config: EvalConfig) -> str:
    """`pairs`, `prompts`, `completions` or `data`, after refusing every contradictory flag."""
    check_config(config)
    if config.output_dir:  # before any model is loaded, not after the whole evaluation
        check_creatable(Path(config.output_dir), "--output-dir")
    given = [name for name in ("pairs", "prompts", "completions", "data") if getattr(config, name)]
    if len(given) != 1:
        what = "none was given" if not given else f"got {', '.join('--' + g for g in given)}"
        raise InputError(f"choose exactly one of {QUESTIONS}; {what}")
    mode = given[0]
    if mode == "completions" and config.model:
        raise InputError(
            f"--completions scores completions already made, so it takes no MODEL (got {config.model}); to generate from MODEL use --prompts"
        )
    if mode != "completions" and not config.model:
        raise InputError(f"--{mode} evaluates a MODEL; give it as the first argument")
    if mode in ("prompts", "completions") and not config.reward:
        raise InputError(f"--{mode} needs --reward RM_DIR or module:function to score the completions")
    if config.reward and mode not in ("prompts", "completions"):
        raise InputError(
            f"--reward scores generated completions (--prompts or --completions); --{mode} does not use it"
        )
    if config.baseline and mode != "prompts":
        raise InputError(f"--baseline generates on the same prompts as MODEL (--prompts); --{mode} does not use it")
    if config.tools and mode != "prompts":
        raise InputError(
            f"--tools runs the model's tool calls while it generates (--prompts); --{mode} does not use it"
        )
    check_tool_options(config.tools, config.max_turns)
    if not config.kl and mode != "prompts":
        raise InputError(f"--no-kl turns off the KL of --prompts; --{mode} computes none")
    if config.ref and not config.kl:
        raise InputError("--ref is the reference of the KL, which --no-kl turns off; drop one of them")
    if config.ref and mode not in ("pairs", "prompts"):
        raise InputError(
            f"--ref is the reference policy of --pairs (implicit reward) and --prompts (KL); --{mode} does not use it"
        )
    return mode
