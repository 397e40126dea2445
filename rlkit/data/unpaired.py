"""Unpaired feedback for KTO: one completion per example, labelled desirable or not.

A row is `prompt_input_ids`, `completion_input_ids`, `completion_labels` and `label` (True:
desirable). Records in the prompt/completion/label layout give one row each. Preference pairs
give two, the chosen completion desirable and the rejected one undesirable, tokenised by the
very code that tokenises pairs for dpo, so both commands see the same tokens for the same
text (and the prompt/completion boundary is the one SFT trains).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
import numpy as np

from rlkit.data.formats import Format, as_messages, record_tools
from rlkit.data.pairs import (
    IGNORE,
    collate_sequences,
    completion_segments,
    dropped_warnings,
    encode_rendered,
    fit_completion,
    has_label,
    per_row_columns,
    prompted_sequence,
    tokenize_pairs,
)
from rlkit.data.templates import ChatTemplate, prompt_text
from rlkit.errors import InputError

UNPAIRED_COLUMNS = ("prompt_input_ids", "completion_input_ids", "completion_labels", "label")

_TRUE = {"true", "1", "yes", "desirable", "good", "thumbs_up", "+1"}
_FALSE = {"false", "0", "no", "undesirable", "bad", "thumbs_down", "-1"}


@dataclass
class UnpairedStats:
    """Counts written into a prepared dir's metadata and shown to the user."""

    examples: int = 0
    desirable: int = 0
    undesirable: int = 0
    from_pairs: int = 0  # preference pairs split into one desirable + one undesirable example
    tokens: int = 0
    completion_tokens: int = 0
    truncated: int = 0
    dropped: int = 0  # examples whose prompt alone fills --max-length
    dropped_records: list[int] = field(default_factory=list)
    identical: int = 0  # pairs split into one completion labelled both desirable and undesirable

    def as_dict(self) -> dict[str, int]:
        counts = asdict(self)
        counts.pop("dropped_records")
        if not counts["identical"]:  # clean data keeps the counts it always had
            counts.pop("identical")
        return counts


def parse_label(value: Any, where: str) -> bool:
    """A desirable flag from a bool, 1/0, or a word ("true"/"false", "desirable"/"undesirable", ...)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise InputError(f"{where}: 'label' must be true/false (desirable or not), got {value!r}")


def _add(
    stats: UnpairedStats,
    rows: list[dict[str, Any]],
    prompt_ids: list[int],
    ids: list[int],
    labels: list[int],
    desirable: bool,
) -> None:
    rows.append(
        {"prompt_input_ids": prompt_ids, "completion_input_ids": ids, "completion_labels": labels, "label": desirable}
    )
    stats.examples += 1
    stats.desirable += desirable
    stats.undesirable += not desirable
    stats.tokens += len(prompt_ids) + len(ids)
    stats.completion_tokens += sum(1 for label in labels if label != IGNORE)


def _from_pairs(
    records: list[dict[str, Any]], tokenizer: Any, template: ChatTemplate, max_length: int, source: str
) -> tuple[list[dict[str, Any]], UnpairedStats]:
    pairs, pair_stats = tokenize_pairs(records, tokenizer, template, max_length, source)
    stats, rows = (
        UnpairedStats(
            from_pairs=pair_stats.pairs,
            dropped=2 * pair_stats.dropped,
            dropped_records=pair_stats.dropped_records,
            identical=pair_stats.identical,
        ),
        [],
    )
    for pair in pairs:
        for side, desirable in (("chosen", True), ("rejected", False)):
            _add(stats, rows, pair["prompt_input_ids"], pair[f"{side}_input_ids"], pair[f"{side}_labels"], desirable)
    stats.truncated = pair_stats.truncated
    return rows, stats


def _from_labelled(
    records: list[dict[str, Any]], tokenizer: Any, template: ChatTemplate, max_length: int, source: str
) -> tuple[list[dict[str, Any]], UnpairedStats]:
    rendered, flags = [], []
    for i, record in enumerate(records):
        where = f"{source} record {i + 1}"
        prompt = as_messages(record["prompt"], "user", where)
        completion = as_messages(record["completion"], "assistant", where)
        tools = record_tools(record, where)
        rendered.append(
            [
                [(prompt_text(tokenizer, template, prompt, tools), False)],
                completion_segments(tokenizer, template, prompt, completion, where, tools),
            ]
        )
        flags.append(parse_label(record["label"], where))
    stats, rows = UnpairedStats(), []
    for number, ((prompt_ids, [(ids, labels)]), desirable) in enumerate(
        zip(encode_rendered(rendered, tokenizer, max_length), flags), 1
    ):
        ids, labels, cut = fit_completion(prompt_ids, ids, labels, max_length)
        if not has_label(labels):
            stats.dropped += 1
            if len(stats.dropped_records) < 10:
                stats.dropped_records.append(number)
            continue
        stats.truncated += cut
        _add(stats, rows, prompt_ids, ids, labels, desirable)
    return rows, stats


def split_pair_data(
    train: datasets.Dataset, eval_split: datasets.Dataset | None, metadata: dict[str, Any]
) -> tuple[datasets.Dataset, datasets.Dataset | None, dict[str, Any]]:
    """Prepared pairs (a `rlkit pack` dir) as unpaired rows: chosen desirable, rejected undesirable."""

    def split(pairs: datasets.Dataset) -> tuple[datasets.Dataset, UnpairedStats]:
        rows: list[dict[str, Any]] = []
        stats = UnpairedStats(from_pairs=len(pairs))
        for pair in pairs:
            for side, desirable in (("chosen", True), ("rejected", False)):
                _add(
                    stats, rows, pair["prompt_input_ids"], pair[f"{side}_input_ids"], pair[f"{side}_labels"], desirable
                )
        return datasets.Dataset.from_list(rows), stats

    train_rows, stats = split(train)
    stats.truncated, stats.dropped = metadata["counts"].get("truncated", 0), 2 * metadata["counts"].get("dropped", 0)
    eval_rows, eval_stats = split(eval_split) if eval_split is not None else (None, UnpairedStats())
    counts = {
        **stats.as_dict(),
        "eval_examples": eval_stats.examples,
        "eval_desirable": eval_stats.desirable,
        "eval_undesirable": eval_stats.undesirable,
        "eval_dropped": 2 * metadata["counts"].get("eval_dropped", 0),
    }
    dropped = [
        {"source": d["source"], "examples": 2 * d["pairs"], "records": d["records"]}
        for d in metadata.get("dropped", [])
    ]
    return train_rows, eval_rows, {**metadata, "kind": "unpaired", "counts": counts, "dropped": dropped}


def tokenize_unpaired(
    records: Iterable[dict[str, Any]],
    fmt: Format,
    tokenizer: Any,
    template: ChatTemplate,
    max_length: int,
    source: str = "data",
) -> tuple[list[dict[str, Any]], UnpairedStats]:
    """Rows of UNPAIRED_COLUMNS from prompt/completion/label records or from preference pairs."""
    records = list(records)
    if fmt is Format.PREFERENCE:
        return _from_pairs(records, tokenizer, template, max_length, source)
    if fmt is Format.UNPAIRED:
        return _from_labelled(records, tokenizer, template, max_length, source)
    raise InputError(
        f"{source}: KTO needs labelled completions (prompt/completion/label) or preference pairs "
        f"(prompt/chosen/rejected), found {fmt.value} data; map other names with --columns, e.g. --columns label=is_good"
    )


def describe_unpaired_data(metadata: dict[str, Any]) -> tuple[str, list[str]]:
    """A one-line summary of prepared unpaired data, and a warning per source that lost examples."""
    counts = metadata["counts"]
    line = (
        f"data: {counts['examples']} examples ({counts['desirable']} desirable, {counts['undesirable']} undesirable"
        + (f"; from {counts['from_pairs']} pairs" if counts.get("from_pairs") else "")
        + f"), {counts['tokens']:,} tokens, {counts['truncated']} truncated, {counts['dropped']} dropped"
        + (f"; eval: {counts['eval_examples']} examples" if counts.get("eval_examples") else "")
    )
    identical = counts.get("identical", 0)
    contradictions = (
        [
            f"{identical} of {counts['from_pairs']} pairs have a chosen completion identical to the rejected one, so the "
            "same completion is labelled both desirable and undesirable and its two losses pull against each other; drop them"
        ]
        if identical
        else []
    )
    return line, dropped_warnings(metadata, "examples", "example") + contradictions


# ---- the mismatched (KL) completions and batches ------------------------------------------

KL_COLUMNS = ("kl_input_ids", "kl_labels", "kl_partner")
OPTIONAL_COLUMNS = ("label", "ref_completion_logps", "ref_kl_logps")


def mismatched_partners(
    prompt_keys: list[Any], seed: int, attempts: int = 8, shifts: int = 64
) -> tuple[list[int], int]:
    """For each example i, the index j of the example whose completion is paired with i's prompt
    for the KL estimate of KTO's reference point; and how many pairs share a prompt anyway.

    How the pairs are formed: the examples are put in a seeded random order and each takes
    the completion of the example `shift` places further along that cycle, for the smallest
    shift (1, 2, ...) at which no example meets a completion written for its own prompt (which
    matters for pairs split into two examples, or data with several completions per prompt).
    So j != i always; every completion is used exactly once; (x_i, y_j) is a mismatched pair
    unless a prompt holds over half the data, where some clash is unavoidable and the fewest
    clashes found are kept and counted. The partners are fixed for the run (as in TRL, which
    rotates completions within dataset-order batches), so their reference log-probs can be
    precomputed with the rest. Any micro-batch of B >= 2 examples averages B such pairs.
    """
    n = len(prompt_keys)
    if n < 2:
        raise InputError(f"KTO needs at least 2 examples to form mismatched pairs for its KL estimate; got {n}")
    dense: dict[Any, int] = {}
    ids = np.array([dense.setdefault(key, len(dense)) for key in prompt_keys])
    if len(dense) == 1:
        raise InputError(
            "every example has the same prompt: KTO's KL estimate needs completions written for other prompts"
        )
    rng = np.random.default_rng(seed)
    best: tuple[int, np.ndarray, int] | None = None
    for _ in range(attempts):
        order = rng.permutation(n)
        for shift in range(1, min(n, shifts + 1)):
            clashes = int((ids[order] == ids[np.roll(order, -shift)]).sum())
            if best is None or clashes < best[0]:
                best = (clashes, order, shift)
            if clashes == 0:
                break
        if best[0] == 0:
            break
    clashes, order, shift = best
    partners = np.empty(n, dtype=np.int64)
    partners[order] = np.roll(order, -shift)
    return partners.tolist(), clashes


def with_kl_completions(dataset: datasets.Dataset, max_length: int, seed: int) -> tuple[datasets.Dataset, int]:
    """`dataset` with each example's mismatched completion (`kl_*`, cut to fit after its own
    prompt) and the partner's index; and the number of unavoidable same-prompt pairs."""
    prompts = dataset["prompt_input_ids"]
    completions, labels = dataset["completion_input_ids"], dataset["completion_labels"]
    partners, clashes = mismatched_partners([tuple(p) for p in prompts], seed)
    kl_ids, kl_labels = [], []
    for prompt, j in zip(prompts, partners):
        ids, labs, _ = fit_completion(prompt, completions[j], labels[j], max_length)
        kl_ids.append(ids)
        kl_labels.append(labs)
    for name, values in zip(KL_COLUMNS, (kl_ids, kl_labels, partners)):
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        dataset = dataset.add_column(name, values)
    return dataset, clashes


def collate_unpaired(
    rows: Iterable[dict[str, Any]], pad_id: int, padding_free: bool = True, capacity: int | None = None
) -> dict[str, Any]:
    """One micro-batch of B examples: their own prompt + completion sequences (input_ids,
    labels, position_ids, seq_index), and under `kl_` the same prompts with their mismatched
    completions, each laid out as `collate_sequences` does; num_examples, num_tokens (both
    parts), and the per-example columns (label, reference log-probs) as [B] tensors."""
    rows = list(rows)
    own = collate_sequences(
        [prompted_sequence(r["prompt_input_ids"], r["completion_input_ids"], r["completion_labels"]) for r in rows],
        pad_id,
        padding_free,
        capacity,
    )
    kl = collate_sequences(
        [prompted_sequence(r["prompt_input_ids"], r["kl_input_ids"], r["kl_labels"]) for r in rows],
        pad_id,
        padding_free,
        capacity,
    )
    return {
        **own,
        **{f"kl_{key}": value for key, value in kl.items() if key != "num_tokens"},
        "num_examples": len(rows),
        "num_tokens": own["num_tokens"] + kl["num_tokens"],
        **per_row_columns(rows, OPTIONAL_COLUMNS),
    }
