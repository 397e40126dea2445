"""The `rlkit` entry point: registers the commands and turns rlkit errors into exit codes."""

from __future__ import annotations

import os

# Libraries' tqdm bars (GGUF dequantization, datasets) would interleave with rlkit's own progress.
os.environ.setdefault("TQDM_DISABLE", "1")

import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from rlkit import __version__
from rlkit.cli_help import RlkitCommand, RlkitGroup
from rlkit.console import console, is_main_process
from rlkit.errors import RlkitError
from rlkit.output import release_output_locks
from rlkit.performance import wait_without_spinning

wait_without_spinning()  # before any command's module loads torch and, with it, OpenMP

# (name, module in rlkit.commands): only commands that work are listed.
COMMANDS = [
    ("pack", "pack"),
    ("sft", "sft"),
    ("train-rm", "train_rm"),
    ("dpo", "dpo"),
    ("kto", "kto"),
    ("merge-lora", "merge_lora"),
    ("chat", "chat"),
    ("eval", "eval"),
    ("ppo", "ppo"),
    ("grpo", "grpo"),
]

app = typer.Typer(
    name="rlkit",
    help="Preference-tuning for language models: pack, sft, train-rm, dpo, kto, ppo, merge-lora, chat, eval. Each command reads and writes standard Hugging Face dirs.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    cls=RlkitGroup,
)


def _version(value: bool) -> None:
    if value:
        print(f"rlkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit.", metavar=""
    ),
) -> None:
    """rlkit COMMAND INPUTS... -o OUT [options] [--config FILE.yaml]"""


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """One clear line and an exit code for expected failures; the output path on stdout on success."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            result = command(*args, **kwargs)
        except RlkitError as err:
            if is_main_process():
                console.print(f"[bold red]error:[/bold red] {escape(str(err))}")
            raise typer.Exit(err.exit_code)
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(130)
        finally:
            release_output_locks()  # a run that ended early, whatever the reason, frees its OUT
        if isinstance(result, Path) and is_main_process():
            print(result, flush=True)

    return wrapper


# Each command module holds only its torch-free config and the name of its run function, so
# registering all of them costs milliseconds; the run function's module loads when it runs.
for name, module in COMMANDS:
    command = importlib.import_module(f"rlkit.commands.{module}")
    app.command(name, help=command.HELP, cls=RlkitCommand)(guarded(command.command))


def main() -> None:
    app()
