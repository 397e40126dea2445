"""`rlkit grpo POLICY PROMPTS... -o OUT --reward module:function|RM_DIR [--reward ...]`."""

from rlkit.config import command_from_config
from rlkit.recipes.grpo_config import GRPOConfig

HELP = """Online RL from verifiable rewards: GRPO and its family (Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++), no critic.

Samples --num-generations completions per prompt with the KV cache, scores them with reward functions (every other prompt column reaches them as a keyword argument) and/or reward models, and learns from group-relative advantages with a clipped importance ratio. Writes the policy (or adapter), metrics.jsonl and samples.jsonl. Prints OUT on stdout."""

command = command_from_config(GRPOConfig, "rlkit.recipes.grpo:run_grpo", HELP)

#: the recipe's plan function (rlkit.training.run_plan.plan_of), for callers holding only the command name
PLAN = "rlkit.recipes.grpo_plan:grpo_plan"
