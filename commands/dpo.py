"""`rlkit dpo MODEL PAIRS... -o OUT [--ref REF]`."""

from rlkit.config import command_from_config
from rlkit.recipes.dpo_config import DPOConfig

HELP = """Direct preference optimisation and its family (DPO/cDPO, IPO, SimPO, ORPO, CPO, APO, NCA, BCO, EXO, SPPO, DiscoPOP, ... and weighted sums of them, see --loss) on preference pairs.

The reference is --ref, else MODEL as it starts (with LoRA: the base with the adapter disabled); its log-probs are precomputed once and cached. Chosen and rejected share one padding-free forward. Prints OUT on stdout."""

command = command_from_config(DPOConfig, "rlkit.recipes.dpo:run_dpo", HELP)

#: the recipe's plan function (rlkit.training.run_plan.plan_of), for callers holding only the command name
PLAN = "rlkit.recipes.dpo:dpo_plan"
