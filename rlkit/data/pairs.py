"""Preference pairs as token ids, and micro-batches of them laid out padding-free or padded.

Tokenising. Each (prompt, chosen, rejected) record becomes the prompt's ids and, per
completion, ids with labels. The prompt is what generation sees (`prompt_text`: the
conversation plus the assistant header), tokenised alone with the single-BOS rule of SFT;
a completion is what rendering prompt + reply adds after that header (EOS ensured), cut
into the same segments as SFT (`render_segments`) so SFT, DPO and the reward model agree
token for token at the prompt/completion boundary. The prompt is stored once per pair, not
once per completion. A completion that does not fit in --max-length after its prompt is
truncated (counted); a pair whose prompt alone fills --max-length leaves no completion token
to compare, so it is dropped (counted, and reported by the command).

Batching. A micro-batch of B pairs is 2B sequences, prompt+chosen for every pair and then
prompt+rejected, so sequence k < B is pair k's chosen and B + k its rejected; all go through
the model in one forward. Padding-free (the default), they are laid end to end, best-fit,
into rows of at most `capacity` tokens, each with its own position_ids restarting at 0,
exactly like packed SFT rows: transformers builds a block-diagonal causal mask from the
restarts when no attention mask is passed, so no sequence sees another. `seq_index` says
which sequence each token belongs to (-1 for padding), so per-sequence sums are one
`index_add`. The padded layout (one sequence per row, right-padded) exists to measure what
padding-free saves and to check both give the same numbers.

Why rows as wide as the longest sequence by default, not one row for everything: the SDPA
and eager kernels compute a row's attention densely and mask it, so their cost grows with
the square of the row; rows of the longest sequence's width cost no more attention per row
than padded rows, while two or three short sequences share a row instead of padding (on the
demo pairs, 11 rows instead of 16 per 8 pairs, ~1.3-1.9x the tokens/s of padded batches on
CPU). With flash-attention's varlen kernels a row's cost is linear, so `capacity` can grow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from rlkit.data.formats import Messages, record_tools, shown, split_pair
from rlkit.data.packing import best_fit_decreasing
from rlkit.data.templates import ChatTemplate, prompt_text, render_segments
from rlkit.data.tokenize import IGNORE, encode_clipped, finish_ids, wants_bos
from rlkit.errors import InputError

#: Columns of a tokenised pair; `margin` (reward models) and reference log-probs are optional.
PAIR_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
OPTIONAL_COLUMNS = ("margin", "ref_chosen_logps", "ref_rejected_logps")
SIDES = ("chosen", "rejected")


@dataclass
class PairStats:
    """Counts written into a prepared dir's metadata and shown to the user."""

    pairs: int = 0
    tokens: int = 0  # both sequences of every kept pair, prompt counted twice (as computed)
    completion_tokens: int = 0  # tokens whose log-prob is summed (both completions)
    truncated: int = 0  # pairs with at least one completion cut at --max-length
    dropped: int = 0  # pairs whose prompt alone fills --max-length
    dropped_records: list[int] = field(default_factory=list)  # first few 1-based record numbers
    identical: int = 0  # kept pairs whose chosen and rejected completions are the same text

    def as_dict(self) -> dict[str, int]:
        counts = asdict(self)
        counts.pop("dropped_records")
        if not counts["identical"]:  # clean data keeps the counts it always had
            counts.pop("identical")
        return counts


def completion_segments(
    tokenizer: Any,
    template: ChatTemplate,
    prompt: Messages,
    completion: Messages,
    where: str,
    tools: Sequence[dict[str, Any]] | None = None,
) -> list[tuple[str, bool]]:
    """(text, trainable) segments of `completion` as it follows `prompt`, trailing markup dropped.

    These are the segments `render_segments` gives the whole conversation, from the
    completion's first reply on: its text starts exactly where `prompt_text(prompt)` ends.
    Markup between two replies of a multi-message completion stays untrained, as in SFT;
    markup after the last reply cannot change any completion log-prob, so it is not kept.
    """
    if not completion or completion[0]["role"] != "assistant":
        raise InputError(f"{where}: chosen and rejected must start with an assistant reply after the prompt")
    segments = render_segments(tokenizer, template, prompt + completion, tools)
    replies_in_prompt = sum(1 for message in prompt if message["role"] == "assistant")
    seen, start = 0, len(segments)
    for i, (_, trainable) in enumerate(segments):
        if trainable:
            if seen == replies_in_prompt:
                start = i
                break
            seen += 1
    kept = segments[start:]
    while kept and not kept[-1][1]:
        kept.pop()
    return kept


def _render_pair(
    record: dict[str, Any], tokenizer: Any, template: ChatTemplate, where: str
) -> list[list[tuple[str, bool]]]:
    """[prompt segments, chosen segments, rejected segments] of one record (with its `tools` column's
    schemas shown, as SFT shows them)."""
    prompt, chosen, rejected = split_pair(record, where)
    tools = record_tools(record, where)
    return [
        [(prompt_text(tokenizer, template, prompt, tools), False)],
        completion_segments(tokenizer, template, prompt, chosen, where, tools),
        completion_segments(tokenizer, template, prompt, rejected, where, tools),
    ]


Rendered = list[list[tuple[str, bool]]]  # [prompt segments, completion segments, ...] of one record


def encode_rendered(
    rendered: list[Rendered], tokenizer: Any, max_length: int
) -> list[tuple[list[int], list[tuple[list[int], list[int]]]]]:
    """Per record: the prompt's ids (single-BOS rule of SFT) and each completion's (ids, labels).

    All segments of all records go through the tokenizer in one call (fast tokenizers batch it),
    each cut first to what can matter within `max_length` tokens (`encode_clipped`).
    """
    flat = [text for parts in rendered for segs in parts for text, _ in segs]
    encoded = iter(encode_clipped(tokenizer, flat, max_length))
    bos_id = tokenizer.bos_token_id if wants_bos(tokenizer) else None
    out = []
    for parts in rendered:
        pieces = [[(next(encoded), trainable) for _, trainable in segs] for segs in parts]
        prompt_ids = [i for piece, _ in pieces[0] for i in piece]
        prompt_ids, _ = finish_ids(prompt_ids, [IGNORE] * len(prompt_ids), bos_id)
        completions = [
            (
                [i for piece, _ in segs for i in piece],
                [i if trainable else IGNORE for piece, trainable in segs for i in piece],
            )
            for segs in pieces[1:]
        ]
        out.append((prompt_ids, completions))
    return out


def fit_completion(
    prompt_ids: list[int], ids: list[int], labels: list[int], max_length: int
) -> tuple[list[int], list[int], bool]:
    """The completion cut to the room its prompt leaves in `max_length`, and whether it was cut."""
    room = max(max_length - len(prompt_ids), 0)
    if len(ids) > room:
        return ids[:room], labels[:room], True
    return ids, labels, False


def has_label(labels: list[int]) -> bool:
    return any(label != IGNORE for label in labels)


def tokenize_pairs(
    records: Iterable[dict[str, Any]],
    tokenizer: Any,
    template: ChatTemplate,
    max_length: int,
    source: str = "data",
) -> tuple[list[dict[str, Any]], PairStats]:
    """Tokenise preference records; returns rows of PAIR_COLUMNS (+ `margin` when given) and counts."""
    records = list(records)
    rendered = [_render_pair(r, tokenizer, template, f"{source} record {i + 1}") for i, r in enumerate(records)]
    stats, rows = PairStats(), []
    for number, (record, (prompt_ids, encoded)) in enumerate(
        zip(records, encode_rendered(rendered, tokenizer, max_length)), 1
    ):
        completions = [fit_completion(prompt_ids, ids, labels, max_length) for ids, labels in encoded]
        if not all(has_label(labels) for _, labels, _ in completions):  # the prompt alone fills max_length
            stats.dropped += 1
            if len(stats.dropped_records) < 10:
                stats.dropped_records.append(number)
            continue
        row: dict[str, Any] = {"prompt_input_ids": prompt_ids}
        for side, (ids, labels, _) in zip(SIDES, completions):
            row[f"{side}_input_ids"], row[f"{side}_labels"] = ids, labels
            stats.tokens += len(prompt_ids) + len(ids)
            stats.completion_tokens += sum(1 for label in labels if label != IGNORE)
        margin = record.get("margin")
        if margin is not None:
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                raise InputError(f"{source} record {number}: 'margin' must be a finite number, got {shown(margin)}")
            row["margin"] = float(margin)
        stats.truncated += any(cut for _, _, cut in completions)
        stats.identical += encoded[0] == encoded[1]
        stats.pairs += 1
        rows.append(row)
    if any("margin" in row for row in rows) and not all("margin" in row for row in rows):
        raise InputError(f"{source}: the 'margin' column is empty for some pairs; give every pair a margin or none")
    return rows, stats


# ---- batches -------------------------------------------------------------------------------


def pair_sequences(rows: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of the 2B sequences of B pairs: every chosen, then every rejected.

    The prompt carries no label, and neither does the first token of any sequence: in a
    padding-free row it would otherwise be "predicted" from the previous sequence's end.
    """
    return [
        prompted_sequence(row["prompt_input_ids"], row[f"{side}_input_ids"], row[f"{side}_labels"])
        for side in SIDES
        for row in rows
    ]


def prompted_sequence(prompt_ids: list[int], ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(ids, labels) of prompt + completion, the labels on the completion only."""
    labels = [IGNORE] * len(prompt_ids) + list(labels)
    labels[0] = IGNORE
    return list(prompt_ids) + list(ids), labels


def collate_sequences(
    sequences: list[tuple[list[int], list[int]]],
    pad_id: int,
    padding_free: bool = True,
    capacity: int | None = None,
) -> dict[str, Any]:
    """input_ids, labels, position_ids and seq_index [rows, width] of `sequences`, and num_tokens.

    Padding-free, the sequences are laid end to end, best-fit, in rows of at most `capacity`
    tokens (None or 0: the longest sequence's length; a longer sequence gets a row of its
    own); padded, one sequence per row. seq_index k marks sequence k's tokens, -1 padding.
    """
    lengths = [len(ids) for ids, _ in sequences]
    if padding_free:
        bins = best_fit_decreasing(lengths, max(capacity or 0, max(lengths)))
    else:
        bins = [[k] for k in range(len(sequences))]
    width = max(sum(lengths[k] for k in group) for group in bins)
    shape = (len(bins), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    seq_index = torch.full(shape, -1, dtype=torch.long)
    for r, group in enumerate(bins):
        at = 0
        for k in sorted(group):
            ids, labs = sequences[k]
            n = len(ids)
            input_ids[r, at : at + n] = torch.as_tensor(ids)
            labels[r, at : at + n] = torch.as_tensor(labs)
            position_ids[r, at : at + n] = torch.arange(n)
            seq_index[r, at : at + n] = k
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # padding: a block of its own
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "seq_index": seq_index,
        "num_tokens": sum(lengths),
    }


def per_row_columns(rows: list[dict[str, Any]], columns: Iterable[str]) -> dict[str, torch.Tensor]:
    """The optional per-example columns present in `rows`, as float64 [B] tensors."""
    return {
        column: torch.tensor([float(row[column]) for row in rows], dtype=torch.float64)
        for column in columns
        if rows and column in rows[0] and rows[0][column] is not None
    }


def collate_pairs(
    rows: Iterable[dict[str, Any]],
    pad_id: int,
    padding_free: bool = True,
    capacity: int | None = None,
) -> dict[str, Any]:
    """Tensors for one micro-batch of pairs (see the module docstring for the layouts).

    Returns input_ids, labels, position_ids and seq_index [rows, width]; num_pairs;
    num_tokens (real tokens, for tokens/s); and the optional per-pair columns as [B] tensors.
    """
    rows = list(rows)
    batch = collate_sequences(pair_sequences(rows), pad_id, padding_free, capacity)
    return {**batch, "num_pairs": len(rows), **per_row_columns(rows, OPTIONAL_COLUMNS)}


def sequence_sums(
    values: torch.Tensor, seq_index: torch.Tensor, mask: torch.Tensor, num_sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of `values` where `mask`, and how many terms each sum has.

    `values`, `seq_index` and `mask` share one shape (any layout); the result is [num_sequences].
    """
    index = seq_index[mask]
    sums = torch.zeros(num_sequences, dtype=values.dtype, device=values.device).index_add(0, index, values[mask])
    counts = torch.zeros(num_sequences, dtype=values.dtype, device=values.device).index_add(
        0, index, torch.ones_like(values[mask])
    )
    return sums, counts


def last_token_index(
    input_ids: torch.Tensor, seq_index: torch.Tensor, pad_id: int | None, num_sequences: int
) -> torch.Tensor:
    """Flat position of each sequence's last non-pad token (where a reward head reads its score).

    This is the rule of transformers' sequence-classification heads (last token that is not
    `pad_token_id`), applied per sequence instead of per row, so scores read here equal what
    `AutoModelForSequenceClassification` gives the same sequence alone. When pad == EOS (many
    tokenizers), that is the token before the EOS, for both. A sequence made only of pad
    tokens falls back to its last token.
    """
    flat_seq = seq_index.reshape(-1)
    positions = torch.arange(flat_seq.numel(), device=flat_seq.device)
    real = flat_seq >= 0
    fallback = torch.full((num_sequences,), -1, dtype=torch.long, device=flat_seq.device)
    fallback = fallback.scatter_reduce(0, flat_seq[real], positions[real], reduce="amax")
    if pad_id is None:
        return fallback
    keep = real & (input_ids.reshape(-1) != pad_id)
    last = torch.full((num_sequences,), -1, dtype=torch.long, device=flat_seq.device)
    last = last.scatter_reduce(0, flat_seq[keep], positions[keep], reduce="amax")
    return torch.where(last >= 0, last, fallback)


def describe_pair_data(metadata: dict[str, Any]) -> tuple[str, list[str]]:
    """A one-line summary of prepared pairs, and a warning per source that lost pairs.

    Kept apart from tokenising so the warning is shown whenever the data is used, also when
    it comes from a `rlkit pack` dir or the cache rather than being tokenised now.
    """
    counts = metadata["counts"]
    line = (
        f"data: {counts['pairs']} pairs, {counts['tokens']:,} tokens ({counts['completion_tokens']:,} in completions), "
        f"{counts['truncated']} truncated, {counts['dropped']} dropped"
        + (f"; eval: {counts['eval_pairs']} pairs" if counts.get("eval_pairs") else "")
    )
    return line, dropped_warnings(metadata, "pairs", "pair") + identical_warnings(counts)


def identical_warnings(counts: dict[str, Any]) -> list[str]:
    """One warning when some pairs prefer a completion to itself: legal, but they teach nothing."""
    n = counts.get("identical", 0)
    if not n:
        return []
    return [
        f"{n} of {counts['pairs']} pairs have a chosen completion identical to the rejected one; they carry no "
        "preference (their DPO/reward-model loss cannot move the margin) and only dilute the batches; drop them"
    ]


def dropped_warnings(metadata: dict[str, Any], unit: str, noun: str) -> list[str]:
    """One warning per source that lost rows (`unit` is the metadata key, `noun` the word)."""
    warnings = []
    for lost in metadata.get("dropped", []):
        where = ", ".join(map(str, lost["records"])) + (", ..." if lost[unit] > len(lost["records"]) else "")
        warnings.append(
            f"{lost['source']}: dropped {lost[unit]} {noun}(s) whose prompt alone fills --max-length "
            f"{metadata['max_length']} tokens (record {where}); raise --max-length to keep them"
        )
    return warnings
