"""Loading every input kind SPEC.md lists, detecting the standard layouts, --columns and eval splits."""

from __future__ import annotations

import json

import datasets
import pytest
from conftest import write_jsonl

from rlkit.data.formats import Format, detect_format, split_pair, to_conversation
from rlkit.data.load import load_records, parse_columns
from rlkit.data.prepare import DataOptions, _split, build_sft_data
from rlkit.errors import InputError

RECORDS = [{"prompt": f"question {i}?", "completion": f"answer {i}."} for i in range(6)]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# --- loading -----------------------------------------------------------------------------------


def _write_jsonl(path):
    write_jsonl(path, RECORDS)


def _write_json_list(path):
    path.write_text(json.dumps(RECORDS, indent=2))


def _write_json_object(path):
    path.write_text(json.dumps({"version": 1, "data": RECORDS}))


def _write_jsonl_named_json(path):
    write_jsonl(path, RECORDS)


def _write_parquet(path):
    datasets.Dataset.from_list(RECORDS).to_parquet(str(path))


def _write_csv(path):
    datasets.Dataset.from_list(RECORDS).to_csv(str(path), index=False)


def _write_saved_dataset(path):
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(path))


def _write_saved_dataset_dict(path):
    full = datasets.Dataset.from_list(RECORDS)
    datasets.DatasetDict({"train": full, "test": full.select([0])}).save_to_disk(str(path))


@pytest.mark.parametrize(
    "name,writer",
    [
        ("data.jsonl", _write_jsonl),
        ("data.json", _write_json_list),
        ("object.json", _write_json_object),
        ("lines.json", _write_jsonl_named_json),
        ("data.parquet", _write_parquet),
        ("data.csv", _write_csv),
        ("saved", _write_saved_dataset),
        ("saved_dict", _write_saved_dataset_dict),
    ],
)
def test_every_input_kind_loads_the_same_records(tmp_path, name, writer):
    path = tmp_path / name
    writer(path)
    loaded = load_records([str(path)])
    assert sorted(loaded.column_names) == ["completion", "prompt"]
    assert loaded.to_list() == RECORDS
    assert detect_format(loaded.column_names, str(path)) is Format.PROMPT_COMPLETION


def test_message_lists_survive_jsonl_and_parquet(tmp_path):
    records = [{"messages": [user(f"hi {i}"), assistant(f"hello {i}")]} for i in range(3)]
    write_jsonl(tmp_path / "m.jsonl", records)
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "m.parquet"))
    for name in ("m.jsonl", "m.parquet"):
        loaded = load_records([str(tmp_path / name)])
        assert loaded.to_list() == records
        assert detect_format(loaded.column_names, name) is Format.MESSAGES


def test_a_column_only_later_records_have_is_kept(tmp_path):
    """An optional column (a `tools` schema list, a `margin`) that the first record lacks is a column
    all the same, null where absent: it was once dropped silently, with every later record's value."""
    records = [
        {"messages": [user("hi"), assistant("hello")]},
        {"messages": [user("2+2?"), assistant("4")], "margin": 1.5},
    ]
    loaded = load_records([str(write_jsonl(tmp_path / "m.jsonl", records))])
    assert loaded.column_names == ["messages", "margin"]
    assert loaded["margin"] == [None, 1.5]


def test_several_sources_concatenate_in_order(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", RECORDS[:2])
    write_jsonl(tmp_path / "b.jsonl", RECORDS[2:])
    assert load_records([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]).to_list() == RECORDS


def test_sources_with_different_columns_are_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", RECORDS[:2])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    with pytest.raises(InputError, match="different columns"):
        load_records([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completion": 3}])
    with pytest.raises(InputError, match="different column types"):
        load_records([str(tmp_path / "a.jsonl"), str(tmp_path / "c.jsonl")])


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(InputError) as err:
        load_records([str(path)])
    assert f"{path}:4:" in str(err.value)


def test_malformed_pretty_json_names_the_real_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    with pytest.raises(InputError) as err:
        load_records([str(path)])
    assert f"{path}:3:" in str(err.value)


@pytest.mark.parametrize(
    "name,content", [("bad.parquet", b"not a parquet file"), ("bad.csv", b'text\n"never closed\n')]
)
def test_corrupt_parquet_and_csv_are_input_errors(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=name):
        load_records([str(path)])


@pytest.mark.parametrize("content", ["", "\n  \n\n", "[]"])
def test_empty_inputs_are_refused(tmp_path, content):
    path = tmp_path / ("empty.json" if content == "[]" else "empty.jsonl")
    path.write_text(content)
    with pytest.raises(InputError, match="empty|no records"):
        load_records([str(path)])


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_records([str(tmp_path / "absent.jsonl")])
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(InputError, match="unknown file type"):
        load_records([str(tmp_path / "data.txt")])


# --- format detection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "columns,expected",
    [
        (["text"], Format.TEXT),
        (["text", "id"], Format.TEXT),
        (["messages"], Format.MESSAGES),
        (["prompt", "completion"], Format.PROMPT_COMPLETION),
        (["prompt", "chosen", "rejected"], Format.PREFERENCE),
        (["chosen", "rejected"], Format.PREFERENCE),
        (["prompt", "completion", "label"], Format.UNPAIRED),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns, "data.jsonl") is expected


def test_unknown_layout_names_columns_and_accepted_formats():
    with pytest.raises(InputError) as err:
        detect_format(["question", "answer"], "data.jsonl")
    message = str(err.value)
    assert "data.jsonl" in message and "question" in message and "answer" in message
    for name in (
        "text",
        "messages",
        "prompt+completion",
        "prompt+chosen+rejected",
        "prompt+completion+label",
        "--columns",
    ):
        assert name in message


def test_to_conversation_for_each_format():
    assert to_conversation({"prompt": "Q?", "completion": "A."}, Format.PROMPT_COMPLETION, "r") == [
        user("Q?"),
        assistant("A."),
    ]
    assert to_conversation({"prompt": "Q?", "completion": "A.", "label": False}, Format.UNPAIRED, "r") == [
        user("Q?"),
        assistant("A."),
    ]
    convo = [{"role": "system", "content": "Be brief."}, user("Q?"), assistant("A.")]
    assert to_conversation({"messages": convo}, Format.MESSAGES, "r") == convo
    pair = {"prompt": "Q?", "chosen": "good", "rejected": "bad"}
    assert to_conversation(pair, Format.PREFERENCE, "r") == [user("Q?"), assistant("good")]
    with pytest.raises(InputError, match="record 7"):
        to_conversation({"messages": ["hi", "hello"]}, Format.MESSAGES, "record 7")


def test_split_pair_explicit_string_prompt():
    prompt, chosen, rejected = split_pair({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, "r")
    assert (prompt, chosen, rejected) == ([user("Q?")], [assistant("good")], [assistant("bad")])


def test_split_pair_explicit_message_prompt():
    record = {
        "prompt": [{"role": "system", "content": "S"}, user("Q?")],
        "chosen": [assistant("good")],
        "rejected": [assistant("bad")],
    }
    prompt, chosen, rejected = split_pair(record, "r")
    assert prompt == [{"role": "system", "content": "S"}, user("Q?")]
    assert (chosen, rejected) == ([assistant("good")], [assistant("bad")])


def test_split_pair_implicit_string_prompt():
    record = {
        "chosen": "Human: What is 2+2?\n\nAssistant: Four.",
        "rejected": "Human: What is 2+2?\n\nAssistant: Five, I think.",
    }
    prompt, chosen, rejected = split_pair(record, "r")
    assert prompt == [user("Human: What is 2+2?\n\nAssistant: ")]
    assert chosen == [assistant("Four.")] and rejected == [assistant("Five, I think.")]


@pytest.mark.parametrize(
    "good,bad",
    [("Goodness me.", "Good."), ("yes sir", "yes"), ("yes", "yes sir")],
)
def test_split_pair_implicit_string_prompt_cuts_at_a_word_boundary(good, bad):
    """Replies that share a first word (or one that is a prefix of the other) keep it whole."""
    head = "Human: Is it fine?\n\nAssistant: "
    prompt, chosen, rejected = split_pair({"chosen": head + good, "rejected": head + bad}, "r")
    assert prompt == [user(head)]
    assert chosen == [assistant(good)] and rejected == [assistant(bad)]


def test_split_pair_implicit_message_prompt():
    history = [{"role": "system", "content": "S"}, user("Q1"), assistant("A1"), user("Q2")]
    record = {"chosen": history + [assistant("good")], "rejected": history + [assistant("bad")]}
    prompt, chosen, rejected = split_pair(record, "r")
    assert prompt == history
    assert chosen == [assistant("good")] and rejected == [assistant("bad")]


def test_split_pair_prompt_column_repeated_inside_conversations():
    """UltraFeedback-binarized: a prompt string plus chosen/rejected conversations that start with it."""
    record = {"prompt": "Q?", "chosen": [user("Q?"), assistant("good")], "rejected": [user("Q?"), assistant("bad")]}
    prompt, chosen, rejected = split_pair(record, "r")
    assert prompt == [user("Q?")]
    assert chosen == [assistant("good")] and rejected == [assistant("bad")]
    assert to_conversation(record, Format.PREFERENCE, "r") == [user("Q?"), assistant("good")]


def test_split_pair_message_prompt_repeated_inside_conversations():
    history = [{"role": "system", "content": "S"}, user("Q?")]
    record = {"prompt": history, "chosen": history + [assistant("good")], "rejected": history + [assistant("bad")]}
    assert split_pair(record, "r") == (history, [assistant("good")], [assistant("bad")])


def test_split_pair_without_any_shared_prompt_is_refused():
    with pytest.raises(InputError, match="prompt"):
        split_pair({"chosen": "good", "rejected": "bad"}, "r")
    with pytest.raises(InputError, match="prompt"):
        split_pair({"chosen": [user("a"), assistant("good")], "rejected": [user("b"), assistant("bad")]}, "r")


# --- column mapping -----------------------------------------------------------------------------


def test_parse_columns():
    assert parse_columns("prompt=question, chosen=response_j,rejected=response_k,") == {
        "question": "prompt",
        "response_j": "chosen",
        "response_k": "rejected",
    }
    assert parse_columns(None) == {} and parse_columns("") == {}
    with pytest.raises(InputError, match="NAME=COLUMN"):
        parse_columns("prompt")
    for twice in ("prompt=a,prompt=b", "prompt=a,completion=a"):
        with pytest.raises(InputError, match="only once"):
            parse_columns(twice)


def test_columns_mapping_adapts_stack_exchange_layout(tmp_path):
    rows = [{"qid": i, "question": f"Q{i}?", "response_j": f"good {i}", "response_k": f"bad {i}"} for i in range(3)]
    path = write_jsonl(tmp_path / "se.jsonl", rows)
    loaded = load_records([str(path)], "prompt=question,chosen=response_j,rejected=response_k")
    assert set(loaded.column_names) == {"qid", "prompt", "chosen", "rejected"}
    assert detect_format(loaded.column_names, str(path)) is Format.PREFERENCE
    assert split_pair(loaded[1], "r") == ([user("Q1?")], [assistant("good 1")], [assistant("bad 1")])


def test_columns_mapping_replaces_a_clashing_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "old", "question": "new", "completion": "c"}])
    loaded = load_records([str(path)], "prompt=question")
    assert loaded.to_list() == [{"prompt": "new", "completion": "c"}]


def test_columns_mapping_naming_a_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(InputError) as err:
        load_records([str(path)], "prompt=question")
    assert "question" in str(err.value) and "prompt, completion" in str(err.value)


# --- eval split ---------------------------------------------------------------------------------


def _numbered(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"text": f"example {i}", "i": i} for i in range(n)])


@pytest.mark.parametrize("n,fraction,n_eval", [(100, 0.1, 10), (50, 0.25, 12), (7, 0.01, 1)])
def test_eval_split_by_fraction_is_disjoint_and_sized(n, fraction, n_eval):
    train, held = _split(_numbered(n), fraction, seed=3)
    train_ids, eval_ids = set(train["i"]), set(held["i"])
    assert len(held) == n_eval and len(train) == n - n_eval
    assert not train_ids & eval_ids and train_ids | eval_ids == set(range(n))
    again_train, again_held = _split(_numbered(n), fraction, seed=3)
    assert again_held["i"] == held["i"] and again_train["i"] == train["i"]


def test_eval_split_depends_on_seed_and_is_not_the_tail():
    _, a = _split(_numbered(100), 0.1, seed=1)
    _, b = _split(_numbered(100), 0.1, seed=2)
    assert a["i"] != b["i"]
    assert a["i"] != list(range(90, 100))


def test_eval_split_off_and_bad_fractions():
    train, held = _split(_numbered(10), 0.0, seed=0)
    assert held is None and len(train) == 10
    for bad in (1.0, 1.5):
        with pytest.raises(InputError, match="eval-fraction"):
            _split(_numbered(10), bad, seed=0)
    with pytest.raises(InputError, match="no training examples"):
        _split(_numbered(1), 0.5, seed=0)


def test_build_sft_data_holds_out_an_eval_split(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"question number {i}?", "completion": f"answer {i}."} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    opts = DataOptions(sources=[str(path)], max_length=64, packing=False, eval_fraction=0.25, seed=0)
    data = build_sft_data(opts, tiny_tokenizer, "tiny")
    assert len(data.train) == 15 and len(data.eval) == 5
    assert data.metadata["counts"]["rows"] == 15 and data.metadata["counts"]["eval_rows"] == 5
    assert data.metadata["format"] == "prompt/completion"
    decode = lambda ds: {tiny_tokenizer.decode(r["input_ids"]) for r in ds}  # noqa: E731
    assert not decode(data.train) & decode(data.eval)


def test_a_split_is_named_after_a_colon(tmp_path, monkeypatch):
    records = {
        "train_prefs": [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3,
        "test_prefs": [{"prompt": "x", "chosen": "y", "rejected": "z"}] * 2,
    }
    saved = tmp_path / "prefs"
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in records.items()}).save_to_disk(str(saved))
    assert load_records([f"{saved}:test_prefs"])["prompt"] == ["x", "x"]
    assert len(load_records([f"{saved}:train_prefs"])) == 3
    with pytest.raises(InputError, match=r"no 'train' split \(splits: train_prefs, test_prefs\); name one as .*:SPLIT"):
        load_records([str(saved)])
    with pytest.raises(InputError, match="no 'dev' split"):
        load_records([f"{saved}:dev"])
    jsonl = write_jsonl(tmp_path / "d.jsonl", records["test_prefs"])
    with pytest.raises(InputError, match="a file has no splits"):
        load_records([f"{jsonl}:train"])
    # a dataset name: the split (or a slice) goes to datasets.load_dataset; none means train
    seen = []
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda name, split: seen.append((name, split)) or datasets.Dataset.from_list(records["test_prefs"]),
    )
    load_records(["org/ultrafeedback:train_prefs[:100]"])
    load_records(["org/ultrafeedback"])
    assert seen == [("org/ultrafeedback", "train_prefs[:100]"), ("org/ultrafeedback", "train")]


# --- strict records: roles, text content, nothing stringified -----------------------------------


@pytest.mark.parametrize(
    "messages,needle",
    [
        ([{"role": "wizard", "content": "abracadabra"}], 'message 1 has role "wizard"'),
        ([user("hi"), {"role": "assistant"}], "message 2 (assistant) has no content"),
        ([user("hi"), {"role": "assistant", "content": None}], "message 2 (assistant) has no content"),
        ([user("hi"), {"role": "assistant", "content": 5}], "message 2's content must be a string"),
        ([user("hi"), {"role": "assistant", "content": {"a": 1}}], 'got {"a": 1}'),
        ([{"content": "no role"}], "has role null"),
        (["just a string"], 'message 1 is "just a string"'),
        ([], "non-empty list"),
    ],
)
def test_bad_messages_are_refused_with_the_record_and_message(messages, needle):
    with pytest.raises(InputError) as err:
        to_conversation({"messages": messages}, Format.MESSAGES, "data.jsonl record 7")
    assert str(err.value).startswith("data.jsonl record 7: ") and needle in str(err.value), str(err.value)


def test_text_parts_are_joined_and_extra_keys_dropped():
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world."}]
    messages = [user("hi"), {"role": "assistant", "content": parts, "name": None}]
    assert to_conversation({"messages": messages}, Format.MESSAGES, "r") == [user("hi"), assistant("Hello, world.")]
    with pytest.raises(InputError, match="must be a string"):
        to_conversation({"messages": [user("hi"), assistant([{"type": "image", "url": "x"}])]}, Format.MESSAGES, "r")


def test_a_null_content_filled_in_by_arrow_is_refused_not_trained_as_none(tmp_path, tiny_tokenizer):
    """One record lacks `content`: Arrow fills it with None; it used to become the text "None"."""
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"messages": [user("a"), assistant("b")]},
            {"messages": [user("c"), {"role": "assistant"}]},
        ],
    )
    with pytest.raises(InputError, match=f"{path} record 2: message 2 \\(assistant\\) has no content"):
        build_sft_data(DataOptions(sources=[str(path)], template="chatml"), tiny_tokenizer, "tiny")


@pytest.mark.parametrize("value", [5, None, ["a", "b"], {"x": 1}])
def test_text_that_is_not_a_string_is_refused(tmp_path, tiny_tokenizer, value):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": value}, {"text": value}])  # one Arrow type throughout
    with pytest.raises(InputError, match=f"{path} record 1: 'text' must be a string"):
        build_sft_data(DataOptions(sources=[str(path)]), tiny_tokenizer, "tiny")


def test_a_tool_message_needs_a_template_that_renders_tools(tiny_tokenizer):
    from rlkit.data.templates import ChatTemplate, render

    messages = [user("what time is it?"), {"role": "tool", "content": "12:00"}]
    with pytest.raises(InputError, match="does not render a 'tool' role"):
        render(tiny_tokenizer, ChatTemplate("chatml", "{% for m in messages %}{{ m.content }}{% endfor %}"), messages)
    tool_aware = "{% for m in messages %}{% if m.role == 'tool' %}[tool]{% endif %}{{ m.content }}{% endfor %}"
    assert render(tiny_tokenizer, ChatTemplate("mine", tool_aware), messages) == "what time is it?[tool]12:00"


# --- UTF-8: a BOM accepted, other bytes one line with the file and line ---------------------------


def test_utf8_with_a_bom_loads_in_every_text_format(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in RECORDS).encode())
    js = tmp_path / "bom.json"
    js.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS).encode())
    csv = tmp_path / "bom.csv"
    csv.write_bytes(
        b"\xef\xbb\xbfprompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in RECORDS).encode()
    )
    for path in (jsonl, js, csv):
        assert load_records([str(path)]).column_names == ["prompt", "completion"], path
        assert load_records([str(path)])[0] == RECORDS[0]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    lines = {
        ".jsonl": [json.dumps(RECORDS[0]), json.dumps(RECORDS[1]), '{"prompt": "caf\xe9", "completion": "x"}'],
        ".json": ["[", json.dumps(RECORDS[0]) + ",", '{"prompt": "caf\xe9", "completion": "x"}', "]"],
        ".csv": ["prompt,completion", "a,b", "caf\xe9,x"],
    }[suffix]
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    line = {".jsonl": 3, ".json": 3, ".csv": 3}[suffix]
    with pytest.raises(InputError, match=f"{path}:{line}: not UTF-8 text \\(byte 0xe9"):
        load_records([str(path)])


def test_a_template_or_config_file_that_is_not_utf8_is_one_line(tmp_path, tiny_tokenizer):
    from rlkit.config import load_yaml_config
    from rlkit.data.templates import resolve_template

    jinja = tmp_path / "t.jinja"
    jinja.write_bytes(b"{{ messages }}\n\xff\n")
    with pytest.raises(InputError, match=f"{jinja}:2: not UTF-8"):
        resolve_template(str(jinja), tiny_tokenizer)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_bytes(b"lr: 0.1\nname: \xe9\n")
    with pytest.raises(InputError, match=f"{yaml_file}:2: not UTF-8"):
        load_yaml_config(yaml_file)
