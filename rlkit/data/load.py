"""Load records from files, `save_to_disk` dirs or dataset names, with errors a user can act on.

A `save_to_disk` dir or a dataset name may name its split after a colon
(`HuggingFaceH4/ultrafeedback_binarized:train_prefs`, `data/prefs:test`, and for names a
`datasets` slice such as `NAME:train[:1000]`); without one, the `train` split is read.

JSONL is parsed here rather than by `datasets` so a malformed line is reported with its file
and line number instead of an Arrow traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet

from rlkit.data.formats import text_of
from rlkit.data.text import decode_lines, read_utf8
from rlkit.errors import InputError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def parse_columns(spec: str | None) -> dict[str, str]:
    """`prompt=question,chosen=response_j` -> {"question": "prompt", ...} (source -> canonical)."""
    if not spec:
        return {}
    mapping: dict[str, str] = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise InputError(
                f"--columns {spec!r}: expected NAME=COLUMN pairs such as prompt=question,chosen=response_j"
            )
        canonical, source = (part.strip() for part in item.split("=", 1))
        if source in mapping or canonical in mapping.values():
            raise InputError(f"--columns {spec!r}: each name and each column may appear only once")
        mapping[source] = canonical
    return mapping


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open("rb") as handle:
        for number, line in enumerate(decode_lines(handle, str(path)), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(
                    f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); fix or remove that line"
                )
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
            records.append(record)
    return records


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = read_utf8(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one JSON value followed by more: a JSONL file with a .json name
            return _read_jsonl(path)
        raise InputError(f"{path}:{err.lineno}: not valid JSON ({err.msg})")
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError(f"{path}: expected a list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(f"{path}: expected a list of JSON objects")
    return data


def _digest(path: Path) -> str:
    """The file's content hash: it names the dataset read from it (and so its cache entries)."""
    hasher = hashlib.sha256(b"rlkit-records-v1")
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()[:16]


def _dataset_of(records: list[dict[str, Any]], fingerprint: str) -> datasets.Dataset:
    """`Dataset.from_list`, named by `fingerprint`: from_list names a dataset by pickling its whole
    table, which held two more copies of a 50 MB record at once (tests/test_huge_records.py).
    Columns are every key any record has, in the order first seen (from_list keeps only the first
    record's keys, which silently dropped an optional column such as `tools` that record 1 lacks);
    a record without a column holds null there."""
    from datasets.arrow_writer import OptimizedTypedSequence
    from datasets.table import InMemoryTable

    keys = list(dict.fromkeys(key for record in records for key in record))
    columns = {key: OptimizedTypedSequence([r.get(key) for r in records], col=key) for key in keys}
    table = InMemoryTable.from_pydict(mapping=columns)
    info = datasets.DatasetInfo(features=datasets.Features({k: c.get_inferred_type() for k, c in columns.items()}))
    return datasets.Dataset(table, info=info, fingerprint=fingerprint)


MESSAGE_COLUMNS = ("messages", "prompt", "chosen", "rejected", "completion")


def _text_parts_joined(record: dict[str, Any], where: str) -> dict[str, Any]:
    """Messages whose content is a list of text parts get it as one string, before Arrow sees them:
    Arrow cannot hold a string content on one message and a list on another."""
    for column in MESSAGE_COLUMNS:
        value = record.get(column)
        if isinstance(value, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in value):
            record[column] = [
                {**m, "content": text_of(m["content"], f"{column!r} message {k}'s content", where)}
                if isinstance(m, dict) and isinstance(m.get("content"), list)
                else m
                for k, m in enumerate(value, 1)
            ]
    return record


def _tool_fields_as_json(record: dict[str, Any]) -> dict[str, Any]:
    """The `tools` column and each message's `tool_calls` as JSON text, before Arrow sees them.

    Arrow gives every struct of a column one schema, the union of all records' keys, and fills a key
    a record lacks with null: one tool's parameters would gain another tool's as nulls, rendered into
    the prompt. As text they stay exactly as written; `formats.record_tools` and `formats.as_messages`
    parse them back (and accept them already parsed, from a dataset `datasets` loaded itself).
    """
    if isinstance(record.get("tools"), list):
        record["tools"] = json.dumps(record["tools"], ensure_ascii=False)
    for column in MESSAGE_COLUMNS:
        value = record.get(column)
        if isinstance(value, list) and any(
            isinstance(m, dict) and isinstance(m.get("tool_calls"), list) for m in value
        ):
            record[column] = [
                {**m, "tool_calls": json.dumps(m["tool_calls"], ensure_ascii=False)}
                if isinstance(m, dict) and isinstance(m.get("tool_calls"), list)
                else m
                for m in value
            ]
    return record


def _kind(value: Any) -> str:
    return "null" if value is None else "a number" if isinstance(value, (int, float)) else f"a {type(value).__name__}"


def _first_clash(records: list[dict[str, Any]]) -> str:
    """`: record N has 'col' as a list, earlier records a str`, for the first top-level clash found."""
    seen: dict[str, str] = {}
    for number, record in enumerate(records, 1):
        for key, value in record.items():
            kind = _kind(value)
            if kind == "null":
                continue
            if seen.setdefault(key, kind) != kind:
                return f": record {number} has {key!r} as {kind}, earlier records {seen[key]}"
    return ""


SOURCE_WITH_SPLIT = re.compile(r"^(?P<base>.+?):(?P<split>[A-Za-z_][\w.-]*(\[[^\]]*\])?)$")


def split_source(source: str) -> tuple[str, str | None]:
    """`NAME:SPLIT` -> (NAME, SPLIT); a source that exists as given, or has no such suffix, has no split."""
    match = SOURCE_WITH_SPLIT.match(source)
    if match is None or Path(source).exists():
        return source, None
    return match["base"], match["split"]


def _load_one(source: str) -> datasets.Dataset:
    source, split = split_source(source)
    path = Path(source)
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise InputError(f"{path}: a directory but not a `datasets` save_to_disk dir ({err})")
        if isinstance(loaded, datasets.DatasetDict):
            wanted = split or "train"
            if wanted not in loaded:
                hint = "" if split else f"; name one as {path}:SPLIT"
                raise InputError(f"{path}: no {wanted!r} split (splits: {', '.join(loaded)}){hint}")
            loaded = loaded[wanted]
        elif split:
            raise InputError(f"{path}:{split}: the dir holds a single dataset, not splits; drop ':{split}'")
        return loaded
    if path.is_file():
        if split:
            raise InputError(f"{path}:{split}: a file has no splits; drop ':{split}'")
        if path.stat().st_size == 0:
            raise InputError(f"{path}: the file is empty")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            records = _read_jsonl(path)
        elif suffix == ".json":
            records = _read_json(path)
        elif suffix in (".parquet", ".csv"):
            try:
                if suffix == ".parquet":
                    pyarrow.parquet.read_schema(str(path))  # fails quietly, where `datasets` would log the error
                    return datasets.Dataset.from_parquet(str(path))
                with path.open("rb") as handle:
                    for _ in decode_lines(handle, str(path)):  # pandas would name neither line nor byte
                        pass
                return datasets.Dataset.from_csv(str(path), encoding="utf-8-sig")
            except InputError:
                raise
            except Exception as err:  # pyarrow/pandas errors (a corrupt file), wrapped or not by `datasets`
                cause = err.__cause__ or err
                raise InputError(
                    f"{path}: cannot read it as {suffix[1:].upper()} ({(str(cause).splitlines() or [type(cause).__name__])[0]})"
                )
        else:
            raise InputError(f"{path}: unknown file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
        if not records:
            raise InputError(f"{path}: no records in the file")
        records = [_tool_fields_as_json(_text_parts_joined(r, f"{path} record {i}")) for i, r in enumerate(records, 1)]
        try:
            return _dataset_of(records, _digest(path))
        except (TypeError, ValueError, Exception) as err:  # Arrow type clashes between lines
            raise InputError(
                f"{path}: records do not share one layout{_first_clash(records)} ({str(err).splitlines()[0]})"
            )
    if path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/")):
        raise InputError(f"{source}: no such file")
    try:
        return datasets.load_dataset(source, split=split or "train")
    except Exception as err:  # the hub may be unreachable, or the name or split unknown
        raise InputError(
            f"{source}: no such file, and `datasets` could not load it as a dataset name ({str(err).splitlines()[0]})"
        )


def load_records(sources: list[str], columns: str | None = None) -> datasets.Dataset:
    """Load and concatenate every source, then rename columns per `--columns`."""
    if not sources:
        raise InputError("no data given")
    parts = [_load_one(source) for source in sources]
    for source, part in zip(sources, parts):
        if len(part) == 0:
            raise InputError(f"{source}: no records")
    layouts = "; ".join(f"{s}: {', '.join(p.column_names)}" for s, p in zip(sources, parts))
    if any(
        set(p.column_names) != set(parts[0].column_names) for p in parts
    ):  # `datasets` would fill the gaps with None
        raise InputError(f"the data files have different columns ({layouts})")
    try:
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except ValueError as err:
        raise InputError(f"the data files have different column types ({str(err).splitlines()[0]})")
    mapping = parse_columns(columns)
    missing = [source for source in mapping if source not in dataset.column_names]
    if missing:
        raise InputError(
            f"--columns names {', '.join(missing)}, not found in {', '.join(sources)} "
            f"(columns found: {', '.join(dataset.column_names)})"
        )
    clashes = [c for c in mapping.values() if c in dataset.column_names and c not in mapping]
    if clashes:
        dataset = dataset.remove_columns(clashes)
    return dataset.rename_columns(mapping) if mapping else dataset
