"""`rlkit chat MODEL` (terminal) / `rlkit chat MODEL < prompts > out.jsonl` (piped)."""

from rlkit.config import command_from_config
from rlkit.tools.chat_config import ChatConfig

HELP = """Chat with a model (full dir, adapter dir or .gguf) using its chat template.

On a terminal: streamed multi-turn chat with /reset, /system TEXT, /save FILE, /exit. Piped: one prompt per line (text, or JSON with prompt/messages) in, one JSON line per completion out (greedy unless --temperature)."""

command = command_from_config(ChatConfig, "rlkit.tools.chat:run_chat", HELP)
