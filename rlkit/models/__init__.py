"""Loading models and tokenizers (dirs, hub names, adapters, GGUF files) and adding LoRA."""
