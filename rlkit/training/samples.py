"""The samples an RL recipe shows as it trains: a table on stderr and the same rows in OUT/samples.jsonl.

Why both: the table lets a person watching see what the policy writes (and how the reward sees
it) while it trains; the file keeps every table for later reading (reward hacking shows in the
text long before it shows in the curves).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlkit.console import console
from rlkit.output import writing

SAMPLES_FILE = "samples.jsonl"

#: the width of the first text column (the prompt) and of every other one (responses)
_FIRST_WIDTH, _TEXT_WIDTH = 40, 60


def show_samples(title: str, step: int, rows: list[dict[str, Any]], path: Path) -> None:
    """Print `rows` (one dict per sample, the same keys in each) as a table and append them to `path`,
    each with `step` first. Numbers are shown to 3 decimals, right-aligned; text folds."""
    if not rows:
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, show_lines=False, expand=False)
    columns = list(rows[0])
    numeric = {k for k in columns if all(isinstance(r[k], (int, float)) for r in rows)}
    texts = [k for k in columns if k not in numeric]
    for key in columns:
        if key in numeric:
            table.add_column(key, justify="right")
        else:
            table.add_column(key, max_width=_FIRST_WIDTH if key == texts[0] else _TEXT_WIDTH, overflow="fold")
    for row in rows:
        # texts are shown as written: a `[tool NAME]` marker or a `[word]` a model wrote is not rich markup
        table.add_row(*(f"{row[k]:.3f}" if k in numeric else escape(str(row[k])) for k in columns))
    console.print(table)
    with writing("the samples file", path, path.parent), open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"step": step, **row}) + "\n")
