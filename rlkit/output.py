"""Output directories that appear only when complete.

A run works in `OUT.partial/` (checkpoints, metrics) and renames it to `OUT` at the very end,
after the model, tokenizer, resolved config and model card are written, so a directory named
OUT is always a finished, loadable result and a Makefile target can depend on it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from rlkit import __version__
from rlkit.errors import InputError

CONFIG_FILE = "rlkit_config.yaml"
METRICS_FILE = "metrics.jsonl"


def partial_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def check_output(output: str | None, overwrite: bool, resume: bool) -> Path:
    """Refuse to clobber a finished result or silently restart an interrupted one (exit 2)."""
    if not output:
        raise InputError("missing -o/--output DIR")
    out = Path(output)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    partial = partial_dir(out)
    if partial.exists() and not resume and not overwrite and any((partial / "checkpoints").glob("step-*")):
        raise InputError(
            f"{partial} holds an interrupted run; pass --resume to continue it or --overwrite to start over"
        )
    return out


def open_run_dir(output: Path, resume: bool) -> Path:
    """Create (or reuse, with --resume) the working directory of a run."""
    partial = partial_dir(output)
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def write_config(run_dir: Path, command: str, config: dict[str, Any]) -> None:
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump({"command": command, **config}, sort_keys=False))


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    return "\n".join(["| metric | value |", "|---|---|", *rows])


def write_model_card(
    run_dir: Path, *, command: str, base_model: str, data: list[str], metrics: dict[str, Any], extra: str = ""
) -> None:
    """A README.md naming the base model, the data, the exact command and the final metrics."""
    invocation = " ".join(shlex.quote(a) for a in ["rlkit", *sys.argv[1:]]) if sys.argv else f"rlkit {command}"
    front = {"base_model": base_model, "library_name": "transformers", "tags": ["rlkit", command]}
    card = f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {run_dir.name.removesuffix(".partial")}

Trained with `rlkit {command}` (rlkit {__version__}).

- **Base model:** `{base_model}`
- **Data:** {", ".join(f"`{d}`" for d in data)}
- **Command:** `{invocation}`

{extra}
## Final metrics

{_metrics_table(metrics)}

The resolved configuration is in `{CONFIG_FILE}` and the per-step metrics in `{METRICS_FILE}`.
"""
    (run_dir / "README.md").write_text(card)
    (run_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def finalize(run_dir: Path, output: Path, keep_checkpoints: bool = False) -> Path:
    """Drop checkpoints and rename OUT.partial to OUT (replacing OUT when --overwrite)."""
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if output.exists():
        shutil.rmtree(output)
    run_dir.rename(output)
    return output
