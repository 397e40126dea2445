"""Training curves as a PNG beside the metrics, for people who would rather look than read.

matplotlib is an optional extra (`pip install rlkit[plots]`): without it the run still
writes metrics.jsonl and simply skips the picture.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rlkit.output import writing

# Panels in the order people look for them; any logged metric in this list gets a panel.
PANELS = (
    ("loss", "eval/loss"),
    ("rewards/accuracies", "eval/rewards/accuracies", "accuracy", "eval/accuracy"),
    ("rewards/margins", "eval/rewards/margins", "margin"),
    ("rewards/chosen", "rewards/rejected", "eval/rewards/chosen", "eval/rewards/rejected"),
    ("score/mean", "rlhf_reward", "non_score_reward", "score_mean"),
    ("kl",),
    ("lr",),
    ("grad_norm",),
    ("tokens_per_s",),
)


def _series(metrics_path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, []).append((record["step"], float(value)))
    return series


def plot_training_curves(metrics_path: Path, png_path: Path, title: str) -> Path | None:
    """Write `png_path` (one panel per metric group); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = _series(metrics_path)
    panels, used = [], set()
    for group in PANELS:
        keys = [k for k in group if k in series and k not in used]
        if keys:
            panels.append(keys)
            used.update(keys)
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, keys in zip(axes.flat, panels):
        for key in keys:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o" if len(steps) < 3 else None, label=key)
        ax.set_xlabel("step")
        ax.set_title(keys[0])
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with writing("the training curves", png_path, png_path.parent):
            fig.savefig(png_path, dpi=90)
    finally:
        plt.close(fig)
    return png_path
