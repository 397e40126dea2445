"""`rlkit merge-lora ADAPTER -o OUT [--base MODEL]`."""

from rlkit.config import command_from_config
from rlkit.tools.merge_config import MergeConfig

HELP = """Merge a LoRA adapter (causal LM or reward model) into its base and write a full model dir.

The base comes from the adapter's config unless --base. Verifies on a probe input that the merged logits equal the adapter model's (max difference on stderr; exit 1 over tolerance). Prints OUT on stdout."""

command = command_from_config(MergeConfig, "rlkit.tools.merge:run_merge", HELP)
