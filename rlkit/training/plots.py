"""Training curves as a PNG beside the metrics, for people who would rather look than read.

Which panels a run gets is decided by the metric keys it logged, not by the command: each
`PanelGroup` names a title and the key patterns it draws, and a group whose patterns match
nothing is left out. So an sft/dpo run shows loss, lr, grad norm (and its accuracy/margins),
while a grpo/ppo run also shows reward (and each reward function by its logged name), KL,
completion length, entropy, clip fractions and zero-variance groups (and, with tools, tool calls
per episode by tool, turns per episode and the failure fractions). A `NAME/mean` line is
shaded with its `NAME/min`..`NAME/max` range, or else `NAME/mean ± NAME/std`, when those are logged.

matplotlib is an optional extra (`pip install rlkit[plots]`): without it the run still
writes metrics.jsonl and simply skips the picture.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from rlkit.output import writing

Series = dict[str, list[tuple[int, float]]]


class PanelGroup(NamedTuple):
    """One panel's title and the metric keys it draws (regexes matched against the whole key).

    A pattern may match many keys (one line each, e.g. one per reward function, whose names the
    user picks); a named group `label` makes that part the line's legend label. A title of None
    keeps the first matched key as the title: the panels that predate the titles look as before.
    """

    title: str | None
    patterns: tuple[str, ...]


class Panel(NamedTuple):
    """A panel to draw: its title, its keys in drawing order and each key's legend label."""

    title: str
    keys: tuple[str, ...]
    labels: tuple[str, ...]


# In the order people look for them. The first group that matches a key owns it, so no line is
# drawn twice. ppo also logs `ppo/<metric>`, the RL step's mean of the per-update metric drawn here.
PANEL_GROUPS: tuple[PanelGroup, ...] = (
    PanelGroup(None, ("loss", "eval/loss", "policy_loss", "value_loss")),
    PanelGroup(None, ("rewards/accuracies", "eval/rewards/accuracies", "accuracy", "eval/accuracy")),
    PanelGroup(None, ("rewards/margins", "eval/rewards/margins", "margin")),
    PanelGroup(None, ("rewards/chosen", "rewards/rejected", "eval/rewards/chosen", "eval/rewards/rejected")),
    PanelGroup("reward", ("reward/mean", "score/mean", "rlhf_reward", "non_score_reward", "score_mean")),
    PanelGroup("reward by function", (r"rewards/(?P<label>[^/]+)/mean",)),
    PanelGroup(None, ("kl", "approx_kl")),
    PanelGroup("completion length", ("completion_length/mean", "response_length")),
    PanelGroup("entropy", ("entropy",)),
    PanelGroup("clip fractions", ("clip_low", "clip_high", "clip_region", "clipfrac", "value_clipfrac")),
    PanelGroup("zero-variance groups (fraction)", ("frac_zero_variance_groups",)),
    # grpo --tools/--env: how the episodes use their tools
    PanelGroup("tool calls per episode", ("tools/call_frequency", r"tools/(?P<label>[^/]+)/call_frequency")),
    PanelGroup("model turns per episode", ("tools/turns/mean",)),
    PanelGroup(
        "tool failures, max-turns stops (fraction)", ("tools/failure_frequency", "tools/frac_stopped_by_max_turns")
    ),
    PanelGroup(None, ("lr",)),
    PanelGroup(None, ("grad_norm",)),
    PanelGroup(None, ("tokens_per_s",)),
)


def select_panels(keys: Iterable[str], groups: tuple[PanelGroup, ...] = PANEL_GROUPS) -> list[Panel]:
    """The panels the logged `keys` call for, in `groups` order; keys keep their logged order.

    Pure (keys in, panels out) so that what a run's picture shows is tested without drawing it.
    """
    remaining = list(dict.fromkeys(keys))
    panels = []
    for group in groups:
        keys_, labels = [], []
        for pattern in group.patterns:
            for key in remaining:
                match = re.fullmatch(pattern, key)
                if match and key not in keys_:
                    keys_.append(key)
                    labels.append(match.groupdict().get("label") or key)
        if keys_:
            remaining = [k for k in remaining if k not in keys_]
            panels.append(Panel(group.title or keys_[0], tuple(keys_), tuple(labels)))
    return panels


def _series(metrics_path: Path) -> Series:
    """Each metric's (step, value) points; non-numbers and NaN/inf are skipped, not plotted as gaps."""
    series: Series = {}
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, []).append((record["step"], float(value)))
    return series


def band(key: str, series: Series) -> tuple[str, list[int], list[float], list[float]] | None:
    """The shaded spread around a `NAME/mean` line: its min..max if logged, else ± its std.

    Returns (what the shade is, steps, lower, upper) over the steps where both are logged, or None.
    A mean alone hides a batch whose answers range from empty to the length limit.
    """
    if not key.endswith("/mean"):
        return None
    base = key[: -len("/mean")]
    mean = dict(series[key])
    if f"{base}/min" in series and f"{base}/max" in series:
        low, high = dict(series[f"{base}/min"]), dict(series[f"{base}/max"])
        steps = [s for s in mean if s in low and s in high]
        return "min-max", steps, [low[s] for s in steps], [high[s] for s in steps]
    if f"{base}/std" in series:
        std = dict(series[f"{base}/std"])
        steps = [s for s in mean if s in std]
        return "± std", steps, [mean[s] - std[s] for s in steps], [mean[s] + std[s] for s in steps]
    return None


def _draw(ax: Any, panel: Panel, series: Series) -> None:
    """One panel: a line per key, its band shaded in the line's colour, a legend only for several lines."""
    shaded = []
    for key, label in zip(panel.keys, panel.labels):
        steps, values = zip(*series[key])
        (line,) = ax.plot(steps, values, marker="o" if len(steps) < 3 else None, label=label)
        spread = band(key, series)
        if spread and spread[1]:
            what, band_steps, low, high = spread
            ax.fill_between(band_steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
            shaded.append(what)
    ax.set_xlabel("step")
    ax.set_title(panel.title + (f" (shaded: {', '.join(dict.fromkeys(shaded))})" if shaded else ""))
    ax.grid(alpha=0.3)
    if len(panel.keys) > 1:
        ax.legend(fontsize=8)


def plot_training_curves(metrics_path: Path, png_path: Path, title: str) -> Path | None:
    """Write `png_path` (one panel per metric group); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = _series(metrics_path)
    panels = select_panels(series)
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        _draw(ax, panel, series)
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
