"""What eval shows: ONE JSON object on stdout, a table on stderr, and optionally a report dir.

`--output-dir` gets report.json (the metrics plus per-example scores) and scores.png, a
histogram of each score distribution (policy vs baseline, chosen vs rejected). matplotlib is
the optional `plots` extra (`pip install rlkit[plots]`); without it the PNG is skipped with a
note and everything else is written.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from rlkit.console import console, info, warn
from rlkit.errors import InputError
from rlkit.output import writing


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_report(metrics: dict[str, Any], title: str) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if not isinstance(value, (dict, list)):
            table.add_row(key, _show(value))
    console.print(table)
    sys.stdout.write(json.dumps(metrics, default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(value: Any) -> Any:
    return str(value)


def plot_distributions(distributions: dict[str, list[float]], path: Path, title: str) -> Path | None:
    """Overlaid histograms of each named distribution; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    values = [v for series in distributions.values() for v in series if math.isfinite(v)]
    if not values:
        return None
    low, high = min(values), max(values)
    bins = 20 if high > low else 1
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, series in distributions.items():
        ax.hist(
            series,
            bins=bins,
            range=(low, high) if high > low else None,
            alpha=0.55,
            label=f"{label} (mean {sum(series) / max(len(series), 1):.3g})",
        )
    ax.set_xlabel("score")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report_dir(
    directory: str,
    metrics: dict[str, Any],
    examples: list[dict[str, Any]],
    distributions: dict[str, list[float]],
    title: str,
) -> None:
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output-dir {out}: exists and is not a directory")
    report = {"metrics": metrics, "examples": examples}
    with writing("the eval report in", out):
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "report.json.partial"
        tmp.write_text(json.dumps(report, indent=2, default=_jsonable, ensure_ascii=False) + "\n")
        tmp.rename(out / "report.json")
        if distributions and plot_distributions(distributions, out / "scores.png", title) is None:
            warn("matplotlib is not installed (pip install 'rlkit[plots]'); scores.png skipped")
    info(f"report: {out}")
