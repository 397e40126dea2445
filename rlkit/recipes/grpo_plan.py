"""`grpo_plan`: what a GRPO run holds, decided once for its setup and its `--dry-run` alike."""

from __future__ import annotations

from rlkit.recipes.grpo_config import GRPOConfig
from rlkit.training.run_plan import (
    Generation,
    MicroBatch,
    ReferencePlan,
    RunPlan,
    reference_of,
    reward_models,
    trained_policy,
)


def grpo_plan(config: GRPOConfig) -> RunPlan:
    """The policy alone is trained, dropout off (the ratio must be 1 before the first update): the
    group is the baseline, no critic. A reference only for the KL term, so only when --beta > 0,
    on the fly; the reward model dirs among --reward; --generation-batch-size rows per `generate`
    call (default: a process's whole rollout, batch-size x grad-accum, in one call, as TRL)."""
    if config.beta > 0:
        reference = reference_of(config, config.ref, precomputed=False)
    else:
        reference = ReferencePlan("none", why="--beta 0")
    rows = config.generation_batch_size or config.batch_size * config.grad_accum
    return RunPlan(
        "grpo",
        (trained_policy(config, dropout=False),),
        MicroBatch(config.batch_size, config.max_length),
        reference=reference,
        frozen=reward_models(list(config.reward)),
        generation=Generation(rows=rows, length=config.max_length),
    )
