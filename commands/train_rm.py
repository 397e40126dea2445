"""`rlkit train-rm MODEL PAIRS... -o OUT`."""

from rlkit.config import command_from_config
from rlkit.recipes.reward_model_config import RewardModelConfig

HELP = """Train a reward model (one score per sequence) with the Bradley-Terry loss on preference pairs.

Optional per-pair `margin` column and --center-rewards; held-out pair accuracy at every eval and in the model card. Writes a sequence-classification model dir (or, with --no-merge, a LoRA adapter with its score head). Prints OUT on stdout."""

command = command_from_config(RewardModelConfig, "rlkit.recipes.reward_model:run_train_rm", HELP)

#: the recipe's plan function (rlkit.training.run_plan.plan_of), for callers holding only the command name
PLAN = "rlkit.recipes.reward_model:reward_model_plan"
