"""`rlkit ppo POLICY PROMPTS... -o OUT --reward RM_DIR|module:function`."""

from rlkit.config import command_from_config
from rlkit.recipes.ppo_config import PPOConfig

HELP = """PPO on prompts against a reward model dir or a Python reward, with a per-token KL penalty to the reference.

Rollouts with the KV cache, k1/k3 KL (fixed or adaptive), GAE, whitened advantages, clipped policy and value losses. Writes the policy (or adapter) with value_head.safetensors beside it, metrics.jsonl and samples.jsonl. Prints OUT on stdout."""

command = command_from_config(PPOConfig, "rlkit.recipes.ppo:run_ppo", HELP)

#: the recipe's plan function (rlkit.training.run_plan.plan_of), for callers holding only the command name
PLAN = "rlkit.recipes.ppo.plan:ppo_plan"
