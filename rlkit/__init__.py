"""rlkit: a command-line toolkit for preference-tuning language models."""

__version__ = "0.1.0"
