"""`ppo_plan`: what a PPO run holds, decided once for its setup and its `--dry-run` alike."""

from __future__ import annotations

from rlkit.losses.advantages import ADVANTAGE_ESTIMATORS
from rlkit.recipes.ppo_config import PPOConfig
from rlkit.training.run_plan import (
    Generation,
    MicroBatch,
    RunPlan,
    Trained,
    reference_of,
    reward_models,
    trained_policy,
)


def value_function_plan(config: PPOConfig) -> Trained | None:
    """The value function trained beside the policy: none when --advantage needs no values (then no
    value forward and no value loss run), --critic rm's critic (the reward model dir, a one-score
    classifier trained in full, dropout off), else a scalar head on the policy's trunk."""
    if not ADVANTAGE_ESTIMATORS[config.advantage].needs_values:
        return None
    if config.critic == "rm":
        return Trained("critic", config.reward or "", classifier=True, dropout=False, label="critic (--critic rm)")
    return Trained("value head", None)


def ppo_plan(config: PPOConfig) -> RunPlan:
    """The policy, trained with dropout off (PPO's ratio must be 1 before the first update), and its
    value function; the reference on the fly (the rollouts are new every step: nothing to
    precompute); the reward model, when --reward is a dir; --batch-size rows per `generate` call."""
    value = value_function_plan(config)
    trained = (trained_policy(config, dropout=False),) + ((value,) if value is not None else ())
    return RunPlan(
        "ppo",
        trained,
        MicroBatch(config.batch_size, config.max_length),
        reference=reference_of(config, config.ref, precomputed=False),
        frozen=reward_models([config.reward] if config.reward else []),
        generation=Generation(rows=config.batch_size, length=config.max_length),
    )
