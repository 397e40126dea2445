"""From what the user gave (raw files or a packed dir) to train/eval row datasets.

`rlkit pack` and the training commands share this path, so data packed ahead of time and
data packed on the fly are the same bytes. On-the-fly results are cached under a key made of
everything that changes them, so a second run on the same data starts at once.

Three kinds of prepared data share it: "sft" rows (tokenized, labelled, optionally packed),
"pairs" (tokenized preference pairs for dpo and train-rm, see `rlkit.data.pairs`; they are
laid end to end per micro-batch at collate time, since batches are drawn at random) and
"unpaired" (labelled completions for kto, see `rlkit.data.unpaired`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import datasets

from rlkit import __version__
from rlkit.data.formats import Format, detect_format
from rlkit.data.load import load_records
from rlkit.data.packing import fill_ratio, pack_examples, unpacked_rows
from rlkit.data.pairs import PairStats, tokenize_pairs
from rlkit.data.templates import ChatTemplate, resolve_template
from rlkit.data.text import read_utf8
from rlkit.data.tokenize import TokenStats, tokenize_sft
from rlkit.data.unpaired import UnpairedStats, split_pair_data, tokenize_unpaired
from rlkit.errors import InputError

METADATA = "rlkit_pack.json"
KINDS = ("sft", "pairs", "unpaired")


@dataclass
class DataOptions:
    """The data-shaping options every training command shares (a subset of its config)."""

    sources: list[str]
    max_length: int = 1024
    template: str | None = None
    columns: str | None = None
    packing: bool = True
    completion_only: bool = True
    eval_data: str | None = None
    eval_fraction: float = 0.0
    seed: int = 42
    kind: str = "sft"  # "sft", "pairs", "unpaired", or (rlkit pack only) "auto": decided by the data's layout

    @classmethod
    def of(cls, config: Any) -> DataOptions:
        """A command's data options: its `data` as the sources, every other option by its name
        (one the command does not have keeps the default here)."""
        named = {
            f.name: getattr(config, f.name) for f in fields(cls) if f.name != "sources" and hasattr(config, f.name)
        }
        return cls(sources=config.data, **named)


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    metadata: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None  # where it lives on disk (a pack dir or the cache), if anywhere


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identity of a tokenizer by content (vocabulary and special tokens), not by path."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def is_packed_dir(path: str) -> bool:
    return (Path(path) / METADATA).is_file()


def packed_metadata(directory: str) -> dict[str, Any]:
    """A `rlkit pack` dir's metadata, or one line saying the dir is damaged."""
    path = Path(directory) / METADATA
    try:
        metadata = json.loads(read_utf8(path))
    except json.JSONDecodeError as err:
        raise InputError(
            f"{path}:{err.lineno}: not valid JSON ({err.msg}); the pack dir is damaged, re-run `rlkit pack`"
        )
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: expected a JSON object; the pack dir is damaged, re-run `rlkit pack`")
    return metadata


def _needs_template(fmt: Format) -> bool:
    return fmt is not Format.TEXT


def _split(records: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    if fraction <= 0:
        return records, None
    if not 0 < fraction < 1:
        raise InputError(f"--eval-fraction {fraction}: must be between 0 and 1")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(order) * fraction)))
    if n_eval >= len(order):
        raise InputError(f"--eval-fraction {fraction} leaves no training examples out of {len(order)}")
    return records.select(sorted(order[n_eval:])), records.select(sorted(order[:n_eval]))


def _rows(
    records: datasets.Dataset,
    fmt: Format,
    tokenizer: Any,
    template: ChatTemplate | None,
    opts: DataOptions,
    source: str,
) -> tuple[list[dict], TokenStats]:
    examples, stats = tokenize_sft(records, fmt, tokenizer, template, opts.max_length, opts.completion_only, source)
    if not examples:
        raise InputError(
            f"{source}: every example was dropped (no trainable token within --max-length {opts.max_length})"
        )
    rows = pack_examples(examples, opts.max_length) if opts.packing else unpacked_rows(examples)
    return rows, stats


Loaded = tuple[datasets.Dataset, Format, str]


def _load(opts: DataOptions) -> Loaded:
    """The training records, their format, and how to name them in messages."""
    records = load_records(opts.sources, opts.columns)
    source = ", ".join(opts.sources)
    return records, detect_format(records.column_names, source), source


def build_sft_data(
    opts: DataOptions, tokenizer: Any, tokenizer_name: str, loaded: Loaded | None = None
) -> PreparedData:
    """Load, detect, template, tokenize and (optionally) pack; returns rows plus metadata."""
    records, fmt, source = loaded or _load(opts)
    template = resolve_template(opts.template, tokenizer, tokenizer_name) if _needs_template(fmt) else None
    train_records, eval_records = _split(records, opts.eval_fraction, opts.seed)
    if opts.eval_data:
        eval_records = load_records([opts.eval_data], opts.columns)
        detect_format(eval_records.column_names, opts.eval_data)
    train_rows, stats = _rows(train_records, fmt, tokenizer, template, opts, source)
    eval_rows = None
    if eval_records is not None:
        eval_fmt = detect_format(eval_records.column_names, opts.eval_data or source)
        eval_rows, _ = _rows(eval_records, eval_fmt, tokenizer, template, opts, opts.eval_data or "eval split")
    metadata = {
        "rlkit_version": __version__,
        "kind": "sft",
        "format": fmt.value,
        "sources": opts.sources,
        "columns": opts.columns,
        "tokenizer": {"name": tokenizer_name, "fingerprint": tokenizer_fingerprint(tokenizer)},
        "template": {"name": template.name, "source": template.source} if template else None,
        "max_length": opts.max_length,
        "packing": opts.packing,
        "completion_only": opts.completion_only,
        "counts": {**stats.as_dict(), "rows": len(train_rows), "eval_rows": len(eval_rows or [])},
        "fill_ratio": round(fill_ratio(train_rows, opts.max_length), 4),
    }
    to_ds = lambda rows: datasets.Dataset.from_list(rows)  # noqa: E731
    return PreparedData(to_ds(train_rows), to_ds(eval_rows) if eval_rows else None, metadata)


def _pair_rows(
    records: datasets.Dataset, fmt: Format, tokenizer: Any, template: ChatTemplate, opts: DataOptions, source: str
) -> tuple[list[dict], PairStats]:
    if fmt is not Format.PREFERENCE:
        raise InputError(
            f"{source}: preference pairs needed (prompt/chosen/rejected, or chosen/rejected with an implicit prompt), "
            f"found {fmt.value} data; map other names with --columns, e.g. --columns prompt=question,chosen=response_j,rejected=response_k"
        )
    rows, stats = tokenize_pairs(records, tokenizer, template, opts.max_length, source)
    if not rows:
        raise InputError(
            f"{source}: every pair was dropped: each prompt alone fills --max-length {opts.max_length} tokens; "
            "raise --max-length or shorten the prompts"
        )
    return rows, stats


def _build_completion_data(
    opts: DataOptions,
    tokenizer: Any,
    tokenizer_name: str,
    loaded: Loaded | None,
    kind: str,
    tokenize: Callable[..., tuple[list[dict], Any]],
    empty_stats: Any,
    eval_counts: Callable[[list[dict], Any], dict[str, int]],
    unit: str,
) -> PreparedData:
    """Load, template and tokenize prompt + completion(s) data, train and eval, plus metadata:
    what pairs (dpo, train-rm) and unpaired examples (kto) share; `unit` names a row in messages."""
    records, fmt, source = loaded or _load(opts)
    template = resolve_template(opts.template, tokenizer, tokenizer_name)
    train_records, eval_records = _split(records, opts.eval_fraction, opts.seed)
    eval_source = "eval split"
    if opts.eval_data:
        eval_records, eval_source = load_records([opts.eval_data], opts.columns), opts.eval_data
    train_rows, stats = tokenize(train_records, fmt, tokenizer, template, opts, source)
    eval_rows: list[dict] = []
    eval_stats = empty_stats
    if eval_records is not None:
        eval_fmt = detect_format(eval_records.column_names, eval_source)
        eval_rows, eval_stats = tokenize(eval_records, eval_fmt, tokenizer, template, opts, eval_source)
    metadata = {
        "rlkit_version": __version__,
        "kind": kind,
        "format": fmt.value,
        "sources": opts.sources,
        "columns": opts.columns,
        "tokenizer": {"name": tokenizer_name, "fingerprint": tokenizer_fingerprint(tokenizer)},
        "template": {"name": template.name, "source": template.source},
        "max_length": opts.max_length,
        "packing": False,
        "counts": {**stats.as_dict(), **eval_counts(eval_rows, eval_stats)},
        "dropped": [
            {"source": name, unit: st.dropped, "records": st.dropped_records}
            for name, st in ((source, stats), (eval_source, eval_stats))
            if st.dropped
        ],
    }
    to_ds = lambda rows: datasets.Dataset.from_list(rows)  # noqa: E731
    return PreparedData(to_ds(train_rows), to_ds(eval_rows) if eval_rows else None, metadata)


def build_pair_data(
    opts: DataOptions, tokenizer: Any, tokenizer_name: str, loaded: Loaded | None = None
) -> PreparedData:
    """Load, template and tokenize preference pairs (train and eval); returns rows plus metadata."""
    return _build_completion_data(
        opts,
        tokenizer,
        tokenizer_name,
        loaded,
        "pairs",
        _pair_rows,
        PairStats(),
        lambda rows, st: {"eval_pairs": len(rows), "eval_dropped": st.dropped},
        "pairs",
    )


def _unpaired_rows(
    records: datasets.Dataset, fmt: Format, tokenizer: Any, template: ChatTemplate, opts: DataOptions, source: str
) -> tuple[list[dict], UnpairedStats]:
    rows, stats = tokenize_unpaired(records, fmt, tokenizer, template, opts.max_length, source)
    if not rows:
        raise InputError(
            f"{source}: every example was dropped: each prompt alone fills --max-length {opts.max_length} tokens; "
            "raise --max-length or shorten the prompts"
        )
    return rows, stats


def build_unpaired_data(
    opts: DataOptions, tokenizer: Any, tokenizer_name: str, loaded: Loaded | None = None
) -> PreparedData:
    """Labelled completions (or pairs split into them) for KTO, train and eval, plus metadata."""
    return _build_completion_data(
        opts,
        tokenizer,
        tokenizer_name,
        loaded,
        "unpaired",
        _unpaired_rows,
        UnpairedStats(),
        lambda rows, st: {
            "eval_examples": len(rows),
            "eval_desirable": st.desirable,
            "eval_undesirable": st.undesirable,
            "eval_dropped": st.dropped,
        },
        "examples",
    )


_AUTO_KIND = {Format.PREFERENCE: "pairs", Format.UNPAIRED: "unpaired"}
_BUILDERS = {"sft": build_sft_data, "pairs": build_pair_data, "unpaired": build_unpaired_data}


def build_data(opts: DataOptions, tokenizer: Any, tokenizer_name: str) -> PreparedData:
    """SFT rows, preference pairs or unpaired examples, per `opts.kind` ("auto": by the data's layout)."""
    loaded = _load(opts)
    kind = opts.kind
    if kind == "auto":
        kind = _AUTO_KIND.get(loaded[1], "sft")
    if kind not in KINDS:
        raise InputError(f"--kind {kind!r}: expected auto, {', '.join(KINDS)}")
    return _BUILDERS[kind](replace(opts, kind=kind), tokenizer, tokenizer_name, loaded)


def save_prepared(data: PreparedData, directory: Path) -> None:
    splits = {"train": data.train} | ({"eval": data.eval} if data.eval is not None else {})
    datasets.DatasetDict(splits).save_to_disk(str(directory))
    (directory / METADATA).write_text(json.dumps(data.metadata, indent=2) + "\n")


_KIND_WORDS = {"sft": "SFT rows", "pairs": "preference pairs", "unpaired": "unpaired (labelled) examples"}


def load_packed(directory: str, tokenizer: Any, model_name: str, kind: str | None = None) -> PreparedData:
    """A `rlkit pack` dir, refused when it was made with another tokenizer than the model's,
    or holds another kind of data than the command trains on (when `kind` is given)."""
    metadata = packed_metadata(directory)
    found = metadata.get("kind", "sft")
    if kind is not None and found != kind:
        raise InputError(
            f"{directory} holds {_KIND_WORDS.get(found, found)}, but this command trains on {_KIND_WORDS.get(kind, kind)}; "
            f"re-run `rlkit pack ... --kind {kind}` or give the raw data"
        )
    expected = metadata.get("tokenizer", {}).get("fingerprint")
    if expected != tokenizer_fingerprint(tokenizer):
        raise InputError(
            f"{directory} was packed with the tokenizer of {metadata.get('tokenizer', {}).get('name')!r}, which differs "
            f"from {model_name}'s; re-run `rlkit pack ... --tokenizer {model_name}` or give the raw data"
        )
    splits = datasets.load_from_disk(directory)
    return PreparedData(splits["train"], splits["eval"] if "eval" in splits else None, metadata, Path(directory))


def _cache_key(opts: DataOptions, tokenizer: Any) -> str:
    stamp = []
    for source in opts.sources + ([opts.eval_data] if opts.eval_data else []):
        path = Path(source)
        if path.is_file():
            info = path.stat()
            stamp.append((str(path.resolve()), info.st_size, info.st_mtime_ns))
        else:
            stamp.append((source, 0, 0))
    payload = json.dumps(
        [__version__, stamp, vars(opts), tokenizer_fingerprint(tokenizer), tokenizer.chat_template], default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cache_root() -> Path:
    return Path(os.environ.get("RLKIT_CACHE_DIR", Path.home() / ".cache" / "rlkit")) / "data"


def prepare_data(opts: DataOptions, tokenizer: Any, tokenizer_name: str) -> PreparedData:
    """A packed dir is used as it is; raw data is built once and cached (`opts.kind`: sft or pairs)."""
    if len(opts.sources) == 1 and is_packed_dir(opts.sources[0]):
        return load_packed(opts.sources[0], tokenizer, tokenizer_name, kind=opts.kind)
    cached = cache_root() / _cache_key(opts, tokenizer)
    if is_packed_dir(str(cached)):
        return load_packed(str(cached), tokenizer, tokenizer_name, kind=opts.kind)
    data = build_data(opts, tokenizer, tokenizer_name)
    staging = cached.with_name(cached.name + f".tmp{os.getpid()}")
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
        save_prepared(data, staging)
        staging.rename(cached)
        return load_packed(str(cached), tokenizer, tokenizer_name, kind=opts.kind)
    except OSError:  # a read-only home, or another process cached it first: train from memory
        shutil.rmtree(staging, ignore_errors=True)
        return data


def prepare_sft_data(opts: DataOptions, tokenizer: Any, tokenizer_name: str) -> PreparedData:
    """SFT rows from raw data (cached) or a `rlkit pack` dir of SFT rows."""
    return prepare_data(replace(opts, kind="sft"), tokenizer, tokenizer_name)


def prepare_pair_data(opts: DataOptions, tokenizer: Any, tokenizer_name: str) -> PreparedData:
    """Tokenized preference pairs from raw data (cached) or a `rlkit pack` dir of pairs."""
    return prepare_data(replace(opts, kind="pairs", packing=False, completion_only=True), tokenizer, tokenizer_name)


def prepare_unpaired_data(opts: DataOptions, tokenizer: Any, tokenizer_name: str) -> PreparedData:
    """Labelled completions for KTO from raw data (cached), or a `rlkit pack` dir of them or of pairs.

    A dir of packed pairs is split here, row by row, so one `rlkit pack` serves dpo and kto.
    """
    if len(opts.sources) == 1 and is_packed_dir(opts.sources[0]):
        found = packed_metadata(opts.sources[0]).get("kind")
        if found == "pairs":
            pairs = load_packed(opts.sources[0], tokenizer, tokenizer_name, kind="pairs")
            train, eval_split, metadata = split_pair_data(pairs.train, pairs.eval, pairs.metadata)
            return PreparedData(train, eval_split, metadata, pairs.directory)
    return prepare_data(replace(opts, kind="unpaired", packing=False, completion_only=True), tokenizer, tokenizer_name)
