"""stdout is for data, stderr is for people: every human-facing line goes through `console`."""

import os

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)


def is_main_process() -> bool:
    """True on rank 0 (or without a launcher), so only one process talks to the user."""
    return int(os.environ.get("RANK", "0")) == 0


def info(message: str) -> None:
    if is_main_process():
        console.print(message)


def warn(message: str) -> None:
    if is_main_process():
        console.print(f"[yellow]warning:[/yellow] {message}")


def quiet_libraries() -> None:
    """Libraries' own progress bars and advice would drown rlkit's output on stderr."""
    import logging
    import warnings

    # bitsandbytes (imported by peft when installed) warns on import about an optional CPU kernel
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message="Could not find a config file")  # peft, for a .gguf base
