"""Preference pairs: tokenised as SFT and generation see them, counted, and batched padding-free."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DEMO_DATA, build_tokenizer, run_cli, write_jsonl

from rlkit.data.formats import Format
from rlkit.data.pairs import collate_pairs, describe_pair_data, last_token_index, pair_sequences, tokenize_pairs
from rlkit.data.prepare import DataOptions, build_data, load_packed, prepare_pair_data, prepare_sft_data
from rlkit.data.templates import SHIPPED, prompt_text, resolve_template
from rlkit.data.tokenize import IGNORE, tokenize_sft
from rlkit.errors import InputError


def rlkit(*args: str, env: dict | None = None):
    """`rlkit ...` in a subprocess, one intra-op thread: tiny models gain nothing from more, and on
    a shared CPU, spinning OpenMP threads of parallel test runs slow each other down ~20x."""
    return run_cli(*args, env={"OMP_NUM_THREADS": "1", **(env or {})})


PAIR = {"prompt": "What is 2 + 3?", "chosen": "The answer is 5. #done", "rejected": "I think it is 6."}


def _pairs(tokenizer, records, template=None, max_length=1024):
    return tokenize_pairs(records, tokenizer, resolve_template(template, tokenizer), max_length)


@pytest.mark.parametrize("name", list(SHIPPED) + [None])
def test_prompt_plus_completion_is_the_sft_tokenisation(tiny_tokenizer, name):
    """DPO sees exactly the tokens and labels SFT trains on for prompt + chosen."""
    rows, stats = _pairs(tiny_tokenizer, [PAIR], name)
    assert stats.pairs == 1 and stats.dropped == stats.truncated == 0
    row = rows[0]
    template = resolve_template(name, tiny_tokenizer)
    for side in ("chosen", "rejected"):
        sft, _ = tokenize_sft(
            [{"prompt": PAIR["prompt"], "completion": PAIR[side]}],
            Format.PROMPT_COMPLETION,
            tiny_tokenizer,
            template,
            1024,
        )
        ids = row["prompt_input_ids"] + row[f"{side}_input_ids"]
        labels = [IGNORE] * len(row["prompt_input_ids"]) + row[f"{side}_labels"]
        n = len(ids)
        assert sft[0]["input_ids"][:n] == ids  # SFT may keep trailing markup after EOS; no label there
        assert sft[0]["labels"][:n] == labels and all(label == IGNORE for label in sft[0]["labels"][n:])
    # the prompt is what generation is given: the rendered prompt plus the assistant header, one BOS
    text = prompt_text(tiny_tokenizer, template, [{"role": "user", "content": PAIR["prompt"]}])
    assert tiny_tokenizer.decode(row["prompt_input_ids"]).replace("<s>", "", 1) == text.replace("<s>", "", 1)
    assert (
        row["prompt_input_ids"][0] == tiny_tokenizer.bos_token_id
        and row["prompt_input_ids"].count(tiny_tokenizer.bos_token_id) == 1
    )
    assert tiny_tokenizer.decode(row["chosen_input_ids"]).endswith("</s>")


def test_implicit_prompt_and_message_forms_tokenise_alike(tiny_tokenizer):
    user = {"role": "user", "content": PAIR["prompt"]}
    forms = [
        PAIR,
        {"chosen": PAIR["prompt"] + " " + PAIR["chosen"], "rejected": PAIR["prompt"] + " " + PAIR["rejected"]},
        {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": PAIR["chosen"]}],
            "rejected": [{"role": "assistant", "content": PAIR["rejected"]}],
        },
        {
            "chosen": [user, {"role": "assistant", "content": PAIR["chosen"]}],
            "rejected": [user, {"role": "assistant", "content": PAIR["rejected"]}],
        },
    ]
    explicit = _pairs(tiny_tokenizer, [forms[0]])[0][0]
    for form in forms[2:]:
        assert _pairs(tiny_tokenizer, [form])[0][0] == explicit
    implicit_text = _pairs(tiny_tokenizer, [forms[1]])[0][0]  # the prompt keeps its trailing space
    assert implicit_text["chosen_input_ids"] == explicit["chosen_input_ids"]


def test_multi_turn_prompt_completion_starts_after_the_generation_prompt(tiny_tokenizer):
    prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2 + 3?"},
    ]
    record = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "5 #done"}],
        "rejected": [{"role": "assistant", "content": "six"}],
    }
    row = _pairs(tiny_tokenizer, [record])[0][0]
    template = resolve_template(None, tiny_tokenizer)
    assert tiny_tokenizer.decode(row["prompt_input_ids"]) == "<s>" + prompt_text(tiny_tokenizer, template, prompt)
    assert tiny_tokenizer.decode(row["chosen_input_ids"]) == "5 #done<|im_end|></s>"
    assert tiny_tokenizer.decode(row["rejected_input_ids"]) == "six<|im_end|></s>"


def test_truncation_and_long_prompts_are_counted(tiny_tokenizer):
    long_prompt = "word " * 80
    records = [PAIR, {**PAIR, "chosen": "The answer is five, " * 20}, {**PAIR, "prompt": long_prompt}]
    rows, stats = _pairs(tiny_tokenizer, records, max_length=40)
    assert stats.pairs == 2 and stats.truncated == 1 and stats.dropped == 1 and stats.dropped_records == [3]
    for row in rows:
        for side in ("chosen", "rejected"):
            assert len(row["prompt_input_ids"]) + len(row[f"{side}_input_ids"]) <= 40


def test_all_dropped_is_an_input_error_and_drops_are_reported(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR, {**PAIR, "prompt": "word " * 80}])
    data = build_data(DataOptions(sources=[str(path)], max_length=40, kind="pairs"), tiny_tokenizer, "tiny")
    _, warnings = describe_pair_data(data.metadata)
    assert (
        len(warnings) == 1
        and "dropped 1 pair" in warnings[0]
        and "record 2" in warnings[0]
        and "--max-length 40" in warnings[0]
    )
    with pytest.raises(InputError, match="every pair was dropped"):
        build_data(DataOptions(sources=[str(path)], max_length=8, kind="pairs"), tiny_tokenizer, "tiny")


def test_margin_column_travels_to_the_batch(tmp_path, tiny_tokenizer):
    rows, _ = _pairs(tiny_tokenizer, [{**PAIR, "margin": 2.5}, {**PAIR, "margin": 0.5}])
    assert collate_pairs(rows, tiny_tokenizer.pad_token_id)["margin"].tolist() == [2.5, 0.5]
    with pytest.raises(InputError, match="margin"):
        _pairs(tiny_tokenizer, [{**PAIR, "margin": 1.0}, {**PAIR, "margin": None}])


def test_non_pair_data_is_refused_with_the_column_hint(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(InputError, match="preference pairs needed.*--columns"):
        prepare_pair_data(DataOptions(sources=[str(path)]), tiny_tokenizer, "tiny")


@pytest.mark.parametrize("capacity", [None, 10_000, 1])
def test_padding_free_layout(tiny_tokenizer, capacity):
    records = [json.loads(line) for line in (DEMO_DATA / "pairs.jsonl").read_text().splitlines()[:5]]
    rows, _ = _pairs(tiny_tokenizer, records)
    batch = collate_pairs(rows, tiny_tokenizer.pad_token_id, capacity=capacity)
    padded = collate_pairs(rows, tiny_tokenizer.pad_token_id, padding_free=False)
    sequences = pair_sequences(rows)
    longest = max(len(ids) for ids, _ in sequences)
    assert padded["input_ids"].shape == (10, longest)
    if capacity == 10_000:
        assert batch["input_ids"].shape[0] == 1  # everything end to end in one row
    else:
        assert batch["input_ids"].shape[1] == longest  # rows as wide as the longest sequence
    assert batch["input_ids"].numel() <= padded["input_ids"].numel()
    assert batch["num_tokens"] == padded["num_tokens"] == sum(len(ids) for ids, _ in sequences)
    for layout in (batch, padded):
        for k, (ids, labels) in enumerate(sequences):
            where = layout["seq_index"] == k
            assert layout["input_ids"][where].tolist() == ids
            assert layout["labels"][where].tolist() == labels
            assert layout["position_ids"][where].tolist() == list(range(len(ids)))
            assert labels[0] == IGNORE  # a sequence's first token is never scored
        assert (layout["labels"][layout["seq_index"] < 0] == IGNORE).all()
    # sequence k < B is pair k's chosen, B + k its rejected
    assert sequences[0][0] == rows[0]["prompt_input_ids"] + rows[0]["chosen_input_ids"]
    assert sequences[5][0] == rows[0]["prompt_input_ids"] + rows[0]["rejected_input_ids"]


def test_last_token_index_skips_padding_like_the_hf_head():
    ids = torch.tensor([[5, 6, 7, 2, 8, 2, 2, 0]])
    seq = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]])
    assert last_token_index(ids, seq, pad_id=2, num_sequences=2).tolist() == [2, 4]
    assert last_token_index(ids, seq, pad_id=None, num_sequences=2).tolist() == [3, 6]
    all_pad = torch.tensor([[2, 2]])
    assert last_token_index(all_pad, torch.tensor([[0, 0]]), pad_id=2, num_sequences=1).tolist() == [1]


@pytest.mark.process_boundary
def test_pack_prepares_pairs_that_only_pair_commands_accept(tmp_path, tiny_model_dir, tiny_tokenizer):
    out = tmp_path / "packed"
    result = rlkit(
        "pack",
        str(DEMO_DATA / "pairs.jsonl"),
        "--tokenizer",
        str(tiny_model_dir),
        "-o",
        str(out),
        "--eval-data",
        str(DEMO_DATA / "pairs_eval.jsonl"),
        "--show",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "chosen" in result.stderr and "pairs" in result.stderr
    data = load_packed(str(out), tiny_tokenizer, "tiny", kind="pairs")
    n_train, n_eval = (len((DEMO_DATA / f).read_text().splitlines()) for f in ("pairs.jsonl", "pairs_eval.jsonl"))
    assert data.metadata["kind"] == "pairs" and len(data.train) == n_train and len(data.eval) == n_eval
    again = prepare_pair_data(DataOptions(sources=[str(out)]), tiny_tokenizer, "tiny")
    assert again.train[0] == data.train[0] and again.directory == out
    with pytest.raises(InputError, match="holds preference pairs.*--kind sft"):
        prepare_sft_data(DataOptions(sources=[str(out)]), tiny_tokenizer, "tiny")
    # --kind sft keeps the SFT path for preference data (prompt + chosen)
    sft_out = tmp_path / "sft-packed"
    result = rlkit(
        "pack", str(DEMO_DATA / "pairs.jsonl"), "--tokenizer", str(tiny_model_dir), "-o", str(sft_out), "--kind", "sft"
    )
    assert result.returncode == 0, result.stderr
    assert load_packed(str(sft_out), tiny_tokenizer, "tiny", kind="sft").metadata["kind"] == "sft"
    with pytest.raises(InputError, match="holds SFT rows.*--kind pairs"):
        prepare_pair_data(DataOptions(sources=[str(sft_out)]), tiny_tokenizer, "tiny")


def test_raw_pairs_are_cached_once(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR] * 4)
    first = prepare_pair_data(DataOptions(sources=[str(path)]), tiny_tokenizer, "tiny")
    second = prepare_pair_data(DataOptions(sources=[str(path)]), tiny_tokenizer, "tiny")
    assert first.directory is not None and first.directory == second.directory
    sft = prepare_sft_data(DataOptions(sources=[str(path)]), tiny_tokenizer, "tiny")
    assert sft.directory != first.directory and sft.metadata["kind"] == "sft"


def test_tokenizer_without_bos(tiny_tokenizer):
    tokenizer = build_tokenizer(with_bos=False)
    row = _pairs(tokenizer, [PAIR])[0][0]
    assert tokenizer.bos_token_id not in row["prompt_input_ids"]
    sequences = pair_sequences([row])
    assert all(labels[0] == IGNORE for _, labels in sequences)
