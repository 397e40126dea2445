"""One module per training command: its config and its batch-to-loss step on the shared engine."""
