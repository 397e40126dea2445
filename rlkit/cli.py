"""The `rlkit` entry point: registers the commands and turns rlkit errors into exit codes."""

from __future__ import annotations

import os

# Libraries' tqdm bars (GGUF dequantization, datasets) would interleave with rlkit's own progress.
os.environ.setdefault("TQDM_DISABLE", "1")

import functools
import importlib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from rlkit import __version__
from rlkit.cli_help import RlkitCommand, RlkitGroup
from rlkit.console import console, is_main_process
from rlkit.errors import RlkitError
from rlkit.output import release_output_locks, write_failure
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
    ("distill", "distill"),
]


def usage_problem(err: Any) -> str:
    """click's usage error as one line (typer draws a box around it, with the usage above): the
    option first, then what is wrong, then where the options are listed."""
    message = err.format_message().strip()
    invalid = re.match(r"Invalid value for '([^']+)': (?:Value error, )?(.*)$", message, re.S)
    if invalid:
        message = f"{invalid.group(1)}: {invalid.group(2)}"
    message = " ".join(message.split()).rstrip(".")
    where = err.ctx.command_path if getattr(err, "ctx", None) is not None else "rlkit"
    return f"{message} (see {where} --help)"


# typer may carry its own copy of click: its error classes are found through the one it exports
_CLICK = {cls.__name__: cls for cls in typer.BadParameter.__mro__}


class OneLineErrors(RlkitGroup):
    """A flag typer cannot parse (`--scheduler bogus`, `--batch-size abc`, an unknown option)
    answers as every other bad input does (SPEC.md): one `error:` line and exit 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _CLICK["UsageError"] as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # `rlkit` alone prints the help
                err.show()
                sys.exit(err.exit_code)
            console.print(f"[bold red]error:[/bold red] {escape(usage_problem(err))}")
            sys.exit(2)
        except _CLICK["ClickException"] as err:
            console.print(f"[bold red]error:[/bold red] {escape(err.format_message())}")
            sys.exit(err.exit_code)
        except typer.Abort:
            console.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="rlkit",
    help="Preference-tuning for language models: pack, sft, train-rm, dpo, kto, ppo, grpo, distill, merge-lora, chat, eval. Each command reads and writes standard Hugging Face dirs.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    cls=OneLineErrors,
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


def _failed(err: RlkitError) -> typer.Exit:
    """Print the failure's one `error:` line (once, on the main process); return the exit to raise."""
    if is_main_process():
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}")
    return typer.Exit(err.exit_code)


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """One clear line and an exit code for expected failures; the output path on stdout on success."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            result = command(*args, **kwargs)
        except RlkitError as err:
            raise _failed(err)
        except OSError as err:  # a full or read-only disk under a write no `output.writing` names
            failure = write_failure(err, str(err.filename or "a file"))
            if failure is None:
                raise
            raise _failed(failure)
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
