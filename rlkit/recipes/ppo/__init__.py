"""PPO for RLHF (the StackLLaMA loop): rollouts, a reward, a per-token KL penalty, advantages, clipped updates.

One PPO step = one rollout (sample completions for a batch of prompts with the KV cache, score
them, compute log-probs, values and reference log-probs without gradient, shape the rewards
with the KL, estimate advantages by `--advantage`) followed by `--ppo-epochs` passes over it in
`--mini-batches` shuffled mini-batches, each one optimizer update. The maths lives in
`rlkit.losses.ppo` and `rlkit.losses.advantages` as pure functions (Schulman et al. 2017, 2016;
Ziegler et al. 2019; Huang et al. 2024); this package only moves tensors between them.

The package, by part:

- `rlkit.training.rollout` (shared with other on-policy recipes): the rollout's stages over typed
  records (prompt order, sampling with merged LoRA weights and left padding, first-EOS masks, the
  rollout-time forward, scoring); `rlkit.training.rollout_steps.RolloutSteps`, the engine's step
  source (mini-batches, resume mid-rollout, the step's metrics); `rlkit.training.samples` the
  samples table and file.
- `collect.PPORollout`: PPO's rollout, stage by stage (missing-EOS penalty, score normalisation
  and clip, KL-shaped per-token rewards, the estimator, the KL controller, the summary).
- `model.PolicyValue`: the trained module, the policy and its value function (a head on the
  trunk, `--critic rm`'s critic, or none when the estimator needs no values). The value
  function lives in the trained module, so checkpoints hold it; the KL controller is registered
  with the accelerator, so the adaptive coefficient resumes too.
- `objective.PPOObjective`: the update step, clipped policy loss (+ clipped value loss with a
  value function) as token means.
- `recipe.run_ppo`: the command.

Why the shared engine drives PPO through a step source instead of a loop of its own: PPO's
loop differs from supervised training only in where each optimizer update's micro-batches come
from. So an engine step is one PPO *update*, and everything else -- accumulation over
`--grad-accum` micro-batches, clipping, NaN checks, SIGTERM, checkpoints, `--resume`, the
metrics log and progress -- is the engine's. `--max-steps` and `--save-every` count PPO steps;
the engine is given them in updates.

How another recipe plugs in (GRPO, say): write an `OnPolicyAlgorithm`
(`rlkit.training.rollout_steps`) whose `collect` calls the stages in order, with its own score
shaping and estimator; train `PolicyValue(policy, None, None)` for critic-free RL (no value
forward, no value loss), and reuse `PPOObjective` or write an objective for another per-token
surrogate. A new advantage estimator for PPO itself is one function and
one record in `rlkit.losses.advantages` (then `--advantage NAME`).

Masking: response tokens are those up to and including the first EOS; everything after it (the
padding `generate` emits once a row has finished) has mask 0, and every loss, advantage, KL
and statistic is a masked one, so nothing after EOS contributes.
"""

from rlkit.recipes.ppo.collect import PPORollout, kl_controller
from rlkit.recipes.ppo.model import CRITIC_DIR, VALUE_HEAD_FILE, PolicyValue, hidden_size, make_value_head
from rlkit.recipes.ppo.objective import PPOObjective
from rlkit.recipes.ppo.recipe import run_ppo
from rlkit.recipes.ppo_config import PPOConfig
from rlkit.training.rollout import Rollout, first_eos_mask, rollout_reference_spec
from rlkit.training.samples import SAMPLES_FILE

__all__ = [
    "CRITIC_DIR",
    "SAMPLES_FILE",
    "VALUE_HEAD_FILE",
    "PPOConfig",
    "PPORollout",
    "PPOObjective",
    "PolicyValue",
    "Rollout",
    "first_eos_mask",
    "hidden_size",
    "kl_controller",
    "make_value_head",
    "rollout_reference_spec",
    "run_ppo",
]
