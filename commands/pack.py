"""`rlkit pack DATA... -o DIR --tokenizer MODEL`."""

from rlkit.config import command_from_config
from rlkit.tools.pack_config import PackConfig

HELP = """Tokenize, template, mask and pack data once, into a `datasets` dir any training command reads.

Writes rlkit_pack.json beside the data: tokenizer, template, max length and counts."""

command = command_from_config(PackConfig, "rlkit.tools.pack:run_pack", HELP)
