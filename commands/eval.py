"""`rlkit eval [MODEL] --pairs|--prompts|--completions|--data FILE ...`."""

from rlkit.config import command_from_config
from rlkit.evaluation.config import EvalConfig

HELP = """Evaluate after training; prints ONE JSON object of metrics on stdout and a table on stderr.

--pairs: reward-model accuracy, or a policy's implicit-reward accuracy against --ref. --prompts --reward: generate, score, KL to --ref, win rate vs --baseline. --completions --reward: score existing completions. --data: SFT loss and perplexity."""

command = command_from_config(EvalConfig, "rlkit.evaluation.run:run_eval", HELP)
