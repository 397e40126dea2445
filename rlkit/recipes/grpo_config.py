"""The options of `rlkit grpo`, importable without torch so that `--help` starts at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlkit.agents.options import max_turns_option, tool_timeout_option, tools_option
from rlkit.config import arg, opt
from rlkit.losses.advantages import estimator_help
from rlkit.losses.group_advantages import GROUP_ESTIMATORS, REWARD_AGGREGATIONS
from rlkit.losses.grpo import POLICY_LOSSES
from rlkit.training.options import TrainConfig

ADVANTAGES = tuple(GROUP_ESTIMATORS)
SCALES = ("auto", "group", "batch", "none")
LOSS_TYPES = tuple(POLICY_LOSSES)
REWARD_AGGREGATION_NAMES = tuple(REWARD_AGGREGATIONS)


@dataclass
class GRPOConfig(TrainConfig):
    model: Optional[str] = arg(
        "Policy to train: an HF dir, a hub name, a LoRA adapter dir (e.g. `rlkit sft --lora` output) or a .gguf file.",
        metavar="POLICY",
    )
    data: list[str] = arg(
        "Prompts: files or dirs with a `prompt` column (string or messages) or `messages` (a final assistant turn is dropped); every other column reaches the reward functions as a keyword argument.",
        metavar="PROMPTS...",
        default=[],
    )
    reward: list[str] = opt(
        [],
        "Reward (repeatable): module:function called as TRL calls reward functions (prompts=, completions=, completion_ids=, every other column) -> one float or None per completion, or a `train-rm` output dir.",
    )
    reward_weights: list[str] = opt(
        [], "Weights of the --reward terms, comma-separated in the same order (default: 1 each)."
    )
    multi_objective_aggregation: str = opt(
        "sum_then_normalize",
        "How several --reward terms become one (TRL's multi_objective_aggregation): "
        + "; ".join(f"{name} ({record.help})" for name, record in REWARD_AGGREGATIONS.items())
        + ".",
        choices=REWARD_AGGREGATION_NAMES,
    )
    tools: list[str] = tools_option(
        "the model calls it in <tool_call> blocks and reads its result in a tool turn, for up to --max-turns rounds."
    )
    env: Optional[str] = opt(
        None,
        "Environment: module:Class (TRL's environment_factory): one instance per concurrent episode, reset(**row) before each (None, or text appended to the prompt), its public methods the tools; an optional get_reward() is one more reward (weight 1, named after the class; then --reward is optional).",
    )
    max_turns: Optional[int] = max_turns_option("episode")
    tool_timeout: float = tool_timeout_option()
    ref: Optional[str] = opt(
        None,
        "Reference model for --beta (default: the starting policy -- with LoRA the base with the adapter disabled, no second copy).",
        panel="Reference",
    )
    max_steps: Optional[int] = opt(
        None, "Stop after this many GRPO steps (rollouts; default: --epochs passes over the prompts).", min=1
    )
    batch_size: int = opt(
        8,
        "Completions per device per micro-batch; one rollout (global batch) is batch-size x grad-accum x processes completions, a multiple of --num-generations.",
        min=1,
    )
    max_length: int = opt(
        1024, "Maximum prompt tokens plus --max-new-tokens; longer prompts are dropped (with a count).", min=2
    )
    save_every: int = opt(0, "Save a resumable checkpoint every N GRPO steps (0: only on interruption).", min=0)
    num_generations: int = opt(8, "Completions sampled per prompt (the group size G).", min=2)
    generation_batch_size: int = opt(
        0,
        "Completions sampled per generate call (0: all of a process's rollout at once, as TRL; must divide it).",
        min=0,
    )
    max_new_tokens: int = opt(
        128,
        "Longest completion; sampling stops earlier at EOS. With --tools/--env the budget of the whole episode, tool turns included (TRL's max_completion_length).",
        min=1,
    )
    temperature: float = opt(1.0, "Sampling temperature (log-probs are computed at the same temperature).", above=0)
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest token set with this probability mass.", above=0, max=1)
    top_k: int = opt(0, "Sample among the k most likely tokens only (0: no limit).", min=0)
    advantage: str = opt(
        ADVANTAGES[0],
        estimator_help(GROUP_ESTIMATORS),
        choices=ADVANTAGES,
    )
    scale_rewards: str = opt(
        "auto",
        "Divide group/rloo advantages by the group's reward std (group), the batch's (batch) or not at all (none: Dr. GRPO); auto = "
        + ", ".join(f"{record.auto_scale} for {name}" for name, record in GROUP_ESTIMATORS.items())
        + ".",
        choices=SCALES,
    )
    loss_type: str = opt(
        "dapo",
        "Policy loss and what it is a mean over: "
        + "; ".join(f"{name} ({record.help})" for name, record in POLICY_LOSSES.items())
        + ".",
        choices=LOSS_TYPES,
    )
    importance_sampling: str = opt(
        "token",
        "Importance ratio per token, or per sequence (the length-normalised sequence ratio of GSPO).",
        choices=("token", "sequence"),
    )
    epsilon: float = opt(0.2, "Clip the importance ratio below at 1 - epsilon (and above at 1 + epsilon).", above=0)
    epsilon_high: Optional[float] = opt(
        None,
        "Upper clip at 1 + epsilon-high instead (DAPO's clip-higher: 0.28; default: --epsilon); with --loss-type cispo the bound on the importance weight itself, ε_max (required there; 5.0 in ScaleRL and TRL).",
        above=0,
    )
    sapo_temperature_pos: float = opt(
        1.0,
        "τ_pos of --loss-type sapo: the gate's temperature on tokens with a positive advantage (TRL's 1.0).",
        above=0,
    )
    sapo_temperature_neg: float = opt(
        1.05,
        "τ_neg of --loss-type sapo: the gate's temperature on the others; above τ_pos, their updates fade faster off-policy (TRL's 1.05).",
        above=0,
    )
    beta: float = opt(
        0.0,
        "KL coefficient to the reference (k3 per token in the loss; 0: no reference forward at all).",
        min=0,
        panel="Reference",
    )
    kl_in_reward: bool = opt(
        False,
        "Put the KL (k1, x --beta) into the reward instead of the loss: subtracted from each completion's reward (group, rloo) or per token (reinforce++).",
    )
    num_iterations: int = opt(
        1, "Updates per rollout (mu), each one against the rollout-time log-probs, with the clip.", min=1
    )
    mask_truncated_completions: bool = opt(
        False, "No loss on completions cut at --max-new-tokens without EOS (DAPO's overlong filtering)."
    )
    overlong_penalty: int = opt(
        0,
        "DAPO's soft length penalty: over the last L tokens before --max-new-tokens the reward falls linearly to -1 (0: off).",
        min=0,
    )
    skip_zero_variance_groups: bool = opt(
        False, "Leave groups whose rewards are all equal out of the loss (they are always counted and logged)."
    )
    sample_every: int = opt(
        10,
        "Every N GRPO steps, show a (prompt, completion, rewards, advantage) table on stderr and append it to samples.jsonl (0: never).",
        min=0,
    )
    num_samples: int = opt(4, "Rows in each samples table.", min=1)
