"""`rlkit pack`: tokenize (and for SFT, pack) data once, for many training runs.

Preference data (prompt/chosen/rejected) becomes tokenized pairs for dpo and train-rm by
default (`--kind auto`); `--kind sft` packs its prompt + chosen for SFT instead, and `--kind
unpaired` splits each pair into a desirable and an undesirable example for kto. Labelled
completions (prompt/completion/label) become unpaired examples by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from rlkit.console import console, warn
from rlkit.data.pairs import SIDES, describe_pair_data
from rlkit.data.prepare import DataOptions, build_data, save_prepared
from rlkit.data.tokenize import IGNORE
from rlkit.data.unpaired import describe_unpaired_data
from rlkit.errors import InputError
from rlkit.models.load import load_tokenizer, resolve_source
from rlkit.output import check_output, finalize, open_run_dir, writing
from rlkit.tools.pack_config import PackConfig


def _examples_of(rows: Any, n: int) -> list[tuple[list[int], list[int]]]:
    """Split packed rows back into examples at every position_ids restart."""
    found: list[tuple[list[int], list[int]]] = []
    for row in rows:
        ids, labels, positions = row["input_ids"], row["labels"], row["position_ids"]
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            found.append((ids[a:b], labels[a:b]))
            if len(found) == n:
                return found
    return found


def _styled(tokenizer: Any, ids: list[int], labels: list[int]) -> Text:
    """Trainable tokens in colour, masked ones dimmed."""
    text = Text()
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            text.append(tokenizer.decode(ids[start:i]), style="bold green" if labels[start] != IGNORE else "dim")
            start = i
    return text


def show_examples(rows: Any, tokenizer: Any, n: int) -> None:
    for k, (ids, labels) in enumerate(_examples_of(rows, n), 1):
        console.rule(f"example {k} ({len(ids)} tokens, {sum(label != IGNORE for label in labels)} trainable)")
        console.print(_styled(tokenizer, ids, labels))


def show_pairs(rows: Any, tokenizer: Any, n: int) -> None:
    """The prompt once, then each completion with the tokens whose log-prob is summed in colour."""
    for k in range(min(n, len(rows))):
        row = rows[k]
        prompt = row["prompt_input_ids"]
        console.rule(f"pair {k + 1} (prompt {len(prompt)} tokens)")
        console.print(_styled(tokenizer, prompt, [IGNORE] * len(prompt)))
        for side in SIDES:
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            console.print(Text(f"-- {side} ({sum(label != IGNORE for label in labels)} scored tokens)", style="bold"))
            console.print(_styled(tokenizer, ids, labels))


def show_unpaired(rows: Any, tokenizer: Any, n: int) -> None:
    """The prompt, then the completion with its scored tokens in colour, and its label."""
    for k in range(min(n, len(rows))):
        row = rows[k]
        prompt, ids, labels = row["prompt_input_ids"], row["completion_input_ids"], row["completion_labels"]
        console.rule(f"example {k + 1} ({'desirable' if row['label'] else 'undesirable'}; prompt {len(prompt)} tokens)")
        console.print(_styled(tokenizer, prompt, [IGNORE] * len(prompt)))
        console.print(_styled(tokenizer, ids, labels))


def summary_table(metadata: dict[str, Any]) -> Table:
    table = Table(title="rlkit pack", show_header=False)
    table.add_row("kind", metadata.get("kind", "sft"))
    table.add_row("format", metadata["format"])
    table.add_row("template", (metadata.get("template") or {}).get("name", "-"))
    for key, value in metadata["counts"].items():
        table.add_row(key.replace("_", " "), f"{value:,}")
    if metadata["packing"]:
        table.add_row("row fill", f"{metadata['fill_ratio']:.1%}")
    return table


def run_pack(config: PackConfig) -> Path | None:
    if not config.tokenizer:
        raise InputError("missing --tokenizer MODEL (the model the data will train)")
    if not config.output and not config.show:
        raise InputError("missing -o/--output DIR (or --show N to only look at the rendering)")
    output = check_output(config.output, config.overwrite, resume=False) if config.output else None
    source = resolve_source(config.tokenizer)
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    opts = DataOptions.of(config)
    data = build_data(opts, tokenizer, config.tokenizer)
    kind = data.metadata["kind"]
    if config.show:
        {"pairs": show_pairs, "unpaired": show_unpaired}.get(kind, show_examples)(data.train, tokenizer, config.show)
    console.print(summary_table(data.metadata))
    describe = {"pairs": describe_pair_data, "unpaired": describe_unpaired_data}.get(kind)
    for message in describe(data.metadata)[1] if describe else []:
        warn(message)
    if output is None:
        return None
    staging = open_run_dir(output, resume=False)
    with writing("the packed dataset", staging):
        save_prepared(data, staging)
    return finalize(staging, output)
