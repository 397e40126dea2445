"""The commands that train nothing: pack, merge-lora, chat, and the generation they share."""
