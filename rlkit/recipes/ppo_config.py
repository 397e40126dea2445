"""The options of `rlkit ppo`, importable without torch so that `--help` starts at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlkit.config import arg, opt
from rlkit.losses.advantages import ADVANTAGE_ESTIMATORS, estimator_help
from rlkit.training.options import TrainConfig
from rlkit.training.schedule import SCHEDULES


@dataclass
class PPOConfig(TrainConfig):
    model: Optional[str] = arg(
        "Policy to train: an HF dir, a hub name, a LoRA adapter dir (e.g. `rlkit sft --lora` output) or a .gguf file.",
        metavar="POLICY",
    )
    data: list[str] = arg(
        "Prompts: files or dirs with a `prompt` column (string or messages) or `messages` (a final assistant turn is dropped).",
        metavar="PROMPTS...",
        default=[],
    )
    reward: Optional[str] = opt(
        None,
        "Reward: a `train-rm` output dir (any one-score sequence classifier, full or SEQ_CLS adapter), or module:function called as TRL calls reward functions (prompts=, completions=, completion_ids=, every other column) -> list[float].",
    )
    ref: Optional[str] = opt(
        None,
        "Reference model for the KL penalty (default: the starting policy -- with LoRA the base with the adapter disabled, no second copy).",
        panel="Reference",
    )
    critic: str = opt(
        "shared",
        "Value function: a scalar head on the policy's trunk (shared), or a separate critic initialised from the reward model dir (rm).",
        choices=("shared", "rm"),
    )
    max_steps: Optional[int] = opt(
        None, "Stop after this many PPO steps (rollouts; default: --epochs passes over the prompts).", min=1
    )
    batch_size: int = opt(
        8,
        "Prompts per device per micro-batch; one rollout is batch-size x grad-accum x mini-batches prompts per device.",
        min=1,
    )
    max_length: int = opt(
        1024, "Maximum prompt tokens plus --max-new-tokens; longer prompts are dropped (with a count).", min=2
    )
    scheduler: str = opt("constant", "Learning-rate schedule after warmup.", choices=SCHEDULES)
    save_every: int = opt(0, "Save a resumable checkpoint every N PPO steps (0: only on interruption).", min=0)
    max_new_tokens: int = opt(64, "Longest completion sampled per prompt; sampling stops earlier at EOS.", min=1)
    temperature: float = opt(1.0, "Sampling temperature (log-probs are computed at the same temperature).", min=0)
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest token set with this probability mass.", above=0, max=1)
    missing_eos_penalty: float = opt(
        0.0, "Subtract this from the score of a completion that ends without EOS (0: no penalty).", min=0
    )
    score_norm: str = opt(
        "none",
        "Normalise scores before the KL shaping: none, or batch (standardise over the rollout of all processes).",
        choices=("none", "batch"),
    )
    score_clip: float = opt(0.0, "Clip (normalised) scores to [-C, C] (0: no clipping).", min=0)
    whiten_rewards: bool = opt(False, "Whiten the per-token rewards (scale only, mean kept) before GAE.")
    kl_coef: float = opt(0.05, "KL penalty coefficient beta (the initial one with --target-kl).", min=0)
    kl_estimator: str = opt(
        "k1",
        "Per-token KL estimator: k1 (log-ratio, unbiased) or k3 (non-negative, lower variance).",
        choices=("k1", "k3"),
    )
    target_kl: Optional[float] = opt(
        None,
        "Adapt beta so the mean per-sequence KL tracks this target (Ziegler et al.); unset: fixed --kl-coef.",
        above=0,
    )
    kl_horizon: int = opt(10000, "Horizon (in sampled sequences) of the adaptive KL controller.", min=1)
    advantage: str = opt(
        tuple(ADVANTAGE_ESTIMATORS)[0],
        estimator_help(ADVANTAGE_ESTIMATORS),
        choices=tuple(ADVANTAGE_ESTIMATORS),
    )
    gamma: float = opt(1.0, "Discount factor of GAE.", min=0, max=1)
    lam: float = opt(0.95, "GAE lambda.", min=0, max=1)
    cliprange: float = opt(0.2, "PPO clip range of the policy ratio.", above=0)
    cliprange_value: float = opt(0.2, "Clip range of the value function around the rollout-time values.", above=0)
    vf_coef: float = opt(0.1, "Weight of the value loss in the total loss.", min=0)
    ppo_epochs: int = opt(4, "Passes over each rollout batch.", min=1)
    mini_batches: int = opt(1, "Mini-batches per pass over a rollout batch (each one optimizer update).", min=1)
    sample_every: int = opt(
        10,
        "Every N PPO steps, show a (prompt, response, score) table on stderr and append it to samples.jsonl (0: never).",
        min=0,
    )
    num_samples: int = opt(4, "Rows in each samples table.", min=1)
