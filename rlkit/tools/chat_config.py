"""The options of `rlkit chat`, importable without torch so that `--help` starts at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlkit.agents.options import max_turns_option, tool_timeout_option, tools_option
from rlkit.config import arg, opt
from rlkit.performance import THREADS_HELP


@dataclass
class ChatConfig:
    model: Optional[str] = arg(
        "Model to chat with: an HF dir, a hub name, a LoRA adapter dir or a .gguf file.", metavar="MODEL"
    )
    template: Optional[str] = opt(
        None,
        "Chat template: the tokenizer's own by default; chatml, tulu, llama-2, zephyr, stack-exchange, raw, or a .jinja file.",
        panel="Data",
    )
    system: Optional[str] = opt(
        None, "System message put before every conversation (piped: unless a line's messages have their own)."
    )
    max_new_tokens: int = opt(
        256,
        "Most tokens generated per reply; with --tools the budget of the whole reply, tool turns included (as grpo's).",
        min=1,
    )
    temperature: Optional[float] = opt(
        None, "Sampling temperature; 0 is greedy. Default: 0.7 on a terminal, 0 (greedy) when stdin is piped.", min=0
    )
    top_p: float = opt(
        1.0, "Nucleus sampling: keep the smallest set of tokens with this total probability (1: all).", above=0, max=1
    )
    seed: Optional[int] = opt(
        None, "Seed for sampling; the same seed, input and --batch-size give the same output.", min=0
    )
    n: int = opt(1, "Samples per prompt when piped (one JSON line each); use with --temperature > 0.", min=1)
    batch_size: int = opt(8, "Prompts generated together when piped.", min=1)
    tools: list[str] = tools_option(
        "when a reply calls it, chat runs it, shows the call and the result (piped: in the JSON line's messages) "
        "and lets the model go on."
    )
    max_turns: Optional[int] = max_turns_option()
    tool_timeout: float = tool_timeout_option()
    dtype: str = opt(
        "auto",
        "Weights dtype: auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16, float16.",
        choices=("auto", "float32", "bfloat16", "float16"),
        panel="Speed and memory",
    )
    threads: Optional[int] = opt(None, THREADS_HELP, min=1, panel="Speed and memory")
