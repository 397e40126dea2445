"""The options of `rlkit distill`, importable without torch so that `--help` starts at once.

Defaults follow TRL's `DistillationConfig` (beta 1.0, temperature 1.0, top-p 0.95, top-k 0, one
completion per prompt) and its GKD mix (`lmbda`: here 1.0, always on-policy, so prompt-only data
works as it does with `DistillationTrainer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlkit.agents.options import max_turns_option, tool_timeout_option, tools_option
from rlkit.config import arg, opt
from rlkit.training.options import TrainConfig

TEACHER_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class DistillConfig(TrainConfig):
    model: Optional[str] = arg(
        "Student to train: an HF dir, a hub name, a LoRA adapter dir or a .gguf file (full, --lora or --load-in-4bit).",
        metavar="STUDENT",
    )
    data: list[str] = arg(
        "Prompts: files or dirs with a `prompt` column (string or messages) or `messages`; off-policy steps (--lmbda below 1) train on the records' own completions: a `completion` column or the final assistant turn of `messages`.",
        metavar="PROMPTS...",
        default=[],
    )
    teacher: Optional[str] = opt(
        None,
        "The teacher (required): any model rlkit loads (HF dir, LoRA adapter dir, .gguf), frozen; it must share the student's tokenizer.",
        panel="Reference",
    )
    teacher_precision: str = opt(
        "auto",
        "The teacher's weights: auto (the student's frozen-weight dtype: bf16 under --precision bf16 with LoRA, else fp32), fp32, bf16 or fp16.",
        choices=TEACHER_PRECISIONS,
        panel="Reference",
    )
    beta: float = opt(
        1.0,
        "Generalized JSD interpolation (TRL's beta): 0 forward KL(teacher||student), 0.5 JSD, 1 reverse KL(student||teacher).",
        min=0,
        max=1,
    )
    lmbda: float = opt(
        1.0,
        "Fraction of steps that are on-policy (GKD's lambda): the student samples; the other steps train on the data's own completions.",
        min=0,
        max=1,
    )
    tools: list[str] = tools_option(
        "on on-policy steps the student calls it in <tool_call> blocks and reads its result in a tool turn, which the teacher's divergence leaves out (mask 0), for up to --max-turns rounds."
    )
    env: Optional[str] = opt(
        None,
        "Environment: module:Class (TRL's environment_factory): one instance per concurrent episode, reset(**row) before each, its public methods the student's tools (a get_reward() is not used: the teacher is the signal).",
    )
    max_turns: Optional[int] = max_turns_option("episode")
    tool_timeout: float = tool_timeout_option()
    max_steps: Optional[int] = opt(
        None, "Stop after this many distillation steps (default: --epochs passes over the prompts).", min=1
    )
    batch_size: int = opt(
        8,
        "Completions per device per micro-batch; one step is batch-size x grad-accum x processes completions, a multiple of --num-generations.",
        min=1,
    )
    max_length: int = opt(
        1024, "Maximum prompt tokens plus --max-new-tokens; longer prompts are dropped (with a count).", min=2
    )
    save_every: int = opt(0, "Save a resumable checkpoint every N steps (0: only on interruption).", min=0)
    num_generations: int = opt(1, "Completions sampled per prompt on on-policy steps (TRL's 1).", min=1)
    generation_batch_size: int = opt(
        0,
        "Completions sampled per generate call (0: all of a process's step at once; must divide it).",
        min=0,
    )
    max_new_tokens: int = opt(128, "Longest completion; sampling stops earlier at EOS.", min=1)
    temperature: float = opt(
        1.0, "Sampling temperature, and the temperature of both distributions in the divergence.", above=0
    )
    top_p: float = opt(0.95, "Nucleus sampling of the student's completions (TRL's 0.95).", above=0, max=1)
    top_k: int = opt(0, "Sample among the k most likely tokens only (0: no limit).", min=0)
    loss_chunk: int = opt(
        128,
        "Positions whose full-vocabulary distributions are computed at once (both models); memory is chunk x vocab, never length x vocab.",
        min=1,
        panel="Speed and memory",
    )
    sample_every: int = opt(
        10,
        "Every N steps, show a (prompt, completion, student and teacher log-prob) table on stderr and append it to samples.jsonl (0: never).",
        min=0,
    )
    num_samples: int = opt(4, "Rows in each samples table.", min=1)
