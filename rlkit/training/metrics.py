"""Where metrics go: a JSONL file always, TensorBoard or W&B when asked, and people's eyes.

The display is a rich progress bar when stderr is a terminal and plain log lines otherwise
(CI logs, `make`, redirected stderr), so logs stay readable wherever they end up.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlkit.console import console
from rlkit.errors import InputError
from rlkit.output import writing


def _fmt(value: Any) -> str:
    if isinstance(value, float) and abs(value) >= 100:
        return f"{value:,.0f}"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


class MetricsSink:
    """Append-only metrics JSONL plus an optional TensorBoard/W&B writer (main process only)."""

    def __init__(self, path: Path, report_to: str, run_name: str, config: dict[str, Any]):
        self.path = path
        with self._writing():
            self.handle = path.open("a", encoding="utf-8")
        self.writer = None
        self.wandb = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
            self.writer = SummaryWriter(str(path.parent / "tensorboard"))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise InputError("--report-to wandb needs the wandb package: pip install wandb")
            self.wandb = wandb.init(project="rlkit", name=run_name, config=config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with self._writing():
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.writer is not None:
            for key, value in numeric.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)

    def _writing(self) -> AbstractContextManager[None]:
        """A refused write of the log ends the run with one line (rlkit.output.writing)."""
        return writing("the metrics log", self.path, self.path.parent)

    def close(self) -> None:
        # a line a full disk refused is still buffered, and close tries it again: the same one line
        with self._writing():
            self.handle.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


class ProgressDisplay:
    """Step, loss, lr, tokens/s and ETA on stderr; silent on non-main processes."""

    def __init__(self, total: int, start: int, log_every: int, enabled: bool):
        self.total, self.log_every, self.enabled = total, max(1, log_every), enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.started = time.time()
        self.start_step = start
        self.bar = None
        if self.interactive:
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, status="")
            self.bar.start()

    def _status(self, metrics: dict[str, Any]) -> str:
        keys = ("loss", "lr", "grad_norm", "tokens_per_s")
        return "  ".join(f"{k.replace('tokens_per_s', 'tok/s')} {_fmt(metrics[k])}" for k in keys if k in metrics)

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, status=self._status(metrics))
        elif step % self.log_every == 0 or step == self.total:
            done = step - self.start_step
            eta = (time.time() - self.started) / max(done, 1) * (self.total - step)
            console.print(
                f"step {step}/{self.total}  {self._status(metrics)}  eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"
            )

    def message(self, text: str) -> None:
        if self.enabled:
            console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
