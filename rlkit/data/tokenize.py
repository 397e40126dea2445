"""Turn normalised records into token ids with labels, counting what was truncated or dropped."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from rlkit.data.formats import Format, record_tools, text_of, to_conversation
from rlkit.data.templates import ChatTemplate, render_segments

IGNORE = -100


@dataclass
class TokenStats:
    """Counts written into a packed dir's metadata and shown to the user."""

    examples: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    truncated: int = 0
    dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def wants_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS in front of text by itself (Llama yes, GPT-2/SmolLM no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def finish_ids(ids: list[int], labels: list[int], bos_id: int | None) -> tuple[list[int], list[int]]:
    """Exactly one leading BOS when wanted, and no label on the first token.

    The first token is never predicted from inside its own example; leaving it unlabelled is
    also what keeps packed rows from training one example's last token to predict the next's.
    """
    if bos_id is not None:
        if not ids or ids[0] != bos_id:
            ids, labels = [bos_id] + ids, [IGNORE] + labels
        while len(ids) > 1 and ids[1] == bos_id and ids[0] == bos_id:
            ids, labels = ids[1:], labels[1:]
    if labels:
        labels = [IGNORE] + labels[1:]
    return ids, labels


def char_budget(tokenizer: Any, max_length: int) -> int:
    """Characters that hold more than `max_length` tokens of any text, so cutting a text there
    before tokenising leaves its first `max_length` tokens as they were.

    No token is longer than the longest vocabulary entry (in characters; a byte-level entry has
    one character per byte), so `max_length` tokens never span more characters than that many
    entries; the factor 2 covers normalisers that shorten text. A 50 MB record then costs what
    its first tokens cost, not gigabytes of ids and offsets that truncation throws away.
    """
    longest = max((len(entry) for entry in tokenizer.get_vocab()), default=1)
    return 2 * max_length * max(longest, 1)


def encode_clipped(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, each cut to `char_budget` characters first (ids past `max_length` are
    truncated by every caller anyway)."""
    if not texts:
        return []
    budget = char_budget(tokenizer, max_length)
    return tokenizer([t if len(t) <= budget else t[:budget] for t in texts], add_special_tokens=False).input_ids


def _segments(
    record: dict[str, Any], fmt: Format, tokenizer: Any, template: ChatTemplate | None, where: str
) -> list[tuple[str, bool]]:
    if fmt is Format.TEXT:
        return [(text_of(record["text"], "'text'", where) + (tokenizer.eos_token or ""), True)]
    assert template is not None
    return render_segments(tokenizer, template, to_conversation(record, fmt, where), record_tools(record, where))


def tokenize_sft(
    records: Iterable[dict[str, Any]],
    fmt: Format,
    tokenizer: Any,
    template: ChatTemplate | None,
    max_length: int,
    completion_only: bool = True,
    source: str = "data",
) -> tuple[list[dict[str, list[int]]], TokenStats]:
    """Tokenize SFT examples segment by segment; examples longer than `max_length` are truncated,
    and examples left with no trainable token are dropped (both counted)."""
    per_record = [_segments(r, fmt, tokenizer, template, f"{source} record {i + 1}") for i, r in enumerate(records)]
    encoded = iter(encode_clipped(tokenizer, [text for segs in per_record for text, _ in segs], max_length))
    bos_id = tokenizer.bos_token_id if wants_bos(tokenizer) else None
    stats, examples = TokenStats(), []
    for segs in per_record:
        ids: list[int] = []
        labels: list[int] = []
        for _, trainable in segs:
            piece = next(encoded)
            ids += piece
            labels += piece if (trainable or not completion_only) else [IGNORE] * len(piece)
        ids, labels = finish_ids(ids, labels, bos_id)
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            stats.truncated += 1
        trainable_count = sum(1 for label in labels if label != IGNORE)
        if trainable_count == 0:
            stats.dropped += 1
            continue
        stats.examples += 1
        stats.tokens += len(ids)
        stats.trainable_tokens += trainable_count
        examples.append({"input_ids": ids, "labels": labels})
    return examples, stats
