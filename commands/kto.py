"""`rlkit kto MODEL DATA... -o OUT [--ref REF]`."""

from rlkit.config import command_from_config
from rlkit.recipes.kto_config import KTOConfig

HELP = """Kahneman-Tversky optimisation from unpaired feedback: prompt/completion/label examples, or preference pairs split into a desirable and an undesirable example.

The reference is --ref, else MODEL as it starts (with LoRA: the base with the adapter disabled); its log-probs, of each completion and of a mismatched completion for the KL reference point, are precomputed once and cached. For iterated KTO, give the previous round's output as both MODEL and --ref. Prints OUT on stdout."""

command = command_from_config(KTOConfig, "rlkit.recipes.kto:run_kto", HELP)

#: the recipe's plan function (rlkit.training.run_plan.plan_of), for callers holding only the command name
PLAN = "rlkit.recipes.kto:kto_plan"
