"""`rlkit sft MODEL DATA... -o OUT`."""

from rlkit.config import command_from_config
from rlkit.recipes.sft_config import SFTConfig

HELP = """Supervised fine-tuning (full or LoRA) on text, conversations or prompt/completion data.

Loss on completion/assistant tokens only; examples packed into rows by default. Prints OUT on stdout."""

command = command_from_config(SFTConfig, "rlkit.recipes.sft:run_sft", HELP)

#: the recipe's plan function (rlkit.training.run_plan.plan_of), for callers holding only the command name
PLAN = "rlkit.recipes.sft:sft_plan"
