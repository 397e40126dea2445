"""`rlkit distill STUDENT PROMPTS... --teacher TEACHER -o OUT`."""

from rlkit.config import command_from_config
from rlkit.recipes.distill_config import DistillConfig

HELP = """On-policy distillation (GKD): the student samples completions, the teacher grades every token, and the student moves toward the teacher's next-token distribution.

The loss is the generalized Jensen-Shannon divergence over the full vocabulary (--beta 0 forward KL, 0.5 JSD, 1 reverse KL), computed a chunk of positions at a time for both models; --lmbda below 1 mixes in steps on the data's own completions. Writes the student (or adapter), metrics.jsonl and samples.jsonl. Prints OUT on stdout."""

command = command_from_config(DistillConfig, "rlkit.recipes.distill:run_distill", HELP)

#: the recipe's plan function (rlkit.training.run_plan.plan_of), for callers holding only the command name
PLAN = "rlkit.recipes.distill:distill_plan"
