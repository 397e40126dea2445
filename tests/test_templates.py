"""Every shipped template (and the tokenizer's own) renders multi-turn chats with the right labels.

The labelled tokens of a conversation must be exactly its assistant replies, each closed by the
template's end of turn and EOS, in order; everything the model only reads carries -100.
"""

from __future__ import annotations

import pytest
from conftest import build_tokenizer

from rlkit.data.formats import Format
from rlkit.data.templates import SHIPPED, prompt_text, resolve_template
from rlkit.data.tokenize import IGNORE, finish_ids, tokenize_sft, wants_bos
from rlkit.errors import InputError

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
CONVERSATION = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three, please?"},
    {"role": "assistant", "content": "Six, of course."},
]
REPLIES = ["Four.", "Six, of course."]

# How each template writes one assistant turn (what must carry labels); None = the tokenizer's own (chatml).
TURN = {
    "chatml": "{reply}<|im_end|></s>",
    "chatml-tools": "{reply}<|im_end|></s>",
    "smollm2-tools": "{reply}<|im_end|></s>",
    "tulu": "{reply}</s>",
    "llama-2": " {reply} </s>",
    "zephyr": "{reply}</s>",
    "stack-exchange": " {reply}</s>",
    "raw": "{reply}</s>",
    None: "{reply}<|im_end|></s>",
}
TEMPLATES = list(SHIPPED) + [None]
assert set(TURN) == set(TEMPLATES), "a new shipped template needs an entry in TURN"


@pytest.fixture(scope="module")
def no_bos_tokenizer():
    return build_tokenizer(with_bos=False)


def _tokenize(tokenizer, name, messages, completion_only=True, max_length=1024):
    template = resolve_template(name, tokenizer)
    examples, stats = tokenize_sft(
        [{"messages": messages}], Format.MESSAGES, tokenizer, template, max_length, completion_only
    )
    assert len(examples) == 1 and stats.examples == 1
    return examples[0]["input_ids"], examples[0]["labels"]


def _labelled_runs(ids, labels):
    """Contiguous runs of labelled tokens, as lists of ids."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, "a label must be the token at its own position (HF convention)"
            current.append(token)
    return runs + ([current] if current else [])


def _users(messages):
    return sum(m["role"] == "user" for m in messages)


@pytest.mark.parametrize("with_system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("name", TEMPLATES, ids=[str(t) for t in TEMPLATES])
def test_assistant_turns_and_only_they_carry_labels(tiny_tokenizer, name, with_system):
    tok = tiny_tokenizer
    messages = ([SYSTEM] if with_system else []) + CONVERSATION
    ids, labels = _tokenize(tok, name, messages)
    assert len(ids) == len(labels)

    runs = _labelled_runs(ids, labels)
    assert [tok.decode(run) for run in runs] == [TURN[name].format(reply=r) for r in REPLIES]

    # Everything the model only reads carries -100, and holds the system and user text.
    unlabelled = tok.decode([t for t, label in zip(ids, labels) if label == IGNORE])
    for message in messages:
        if message["role"] != "assistant":
            assert message["content"] in unlabelled
    for reply in REPLIES:
        assert reply not in unlabelled

    # Exactly one BOS at the start (llama-2 writes one per [INST] block itself, as Meta's format does).
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert labels[0] == IGNORE
    assert ids.count(tok.bos_token_id) == (_users(messages) if name == "llama-2" else 1)

    # One EOS per assistant turn; zephyr ends every message with EOS, and only the assistant ones are trained.
    eos = tok.eos_token_id
    assert ids.count(eos) == (len(messages) if name == "zephyr" else len(REPLIES))
    assert sum(1 for t, label in zip(ids, labels) if t == eos and label != IGNORE) == len(REPLIES)


@pytest.mark.parametrize("name", TEMPLATES, ids=[str(t) for t in TEMPLATES])
def test_first_prompt_matches_what_generation_sees(tiny_tokenizer, name):
    """Training tokens before the first reply are the tokens of the generation prompt."""
    tok = tiny_tokenizer
    ids, labels = _tokenize(tok, name, [SYSTEM] + CONVERSATION)
    first = next(i for i, label in enumerate(labels) if label != IGNORE)
    text = prompt_text(tok, resolve_template(name, tok), [SYSTEM, CONVERSATION[0]])
    expected = tok(text, add_special_tokens=False).input_ids
    if expected[0] != tok.bos_token_id:
        expected = [tok.bos_token_id] + expected
    assert ids[:first] == expected


@pytest.mark.parametrize("name", TEMPLATES, ids=[str(t) for t in TEMPLATES])
def test_tokenizer_without_bos_gets_none_added(no_bos_tokenizer, name):
    tok = no_bos_tokenizer
    assert not wants_bos(tok)
    ids, labels = _tokenize(tok, name, [SYSTEM] + CONVERSATION)
    # Only llama-2 writes BOS itself (in its text); nothing else may add one.
    assert ids.count(tok.bos_token_id) == (_users(CONVERSATION) if name == "llama-2" else 0)
    if name != "llama-2":
        assert ids[0] != tok.bos_token_id
    assert labels[0] == IGNORE
    runs = _labelled_runs(ids, labels)
    assert [tok.decode(run) for run in runs] == [TURN[name].format(reply=r) for r in REPLIES]


@pytest.mark.parametrize("name", TEMPLATES, ids=[str(t) for t in TEMPLATES])
def test_no_completion_only_labels_every_token_but_the_first(tiny_tokenizer, name):
    masked_ids, _ = _tokenize(tiny_tokenizer, name, [SYSTEM] + CONVERSATION)
    ids, labels = _tokenize(tiny_tokenizer, name, [SYSTEM] + CONVERSATION, completion_only=False)
    assert ids == masked_ids
    assert labels[0] == IGNORE
    assert labels[1:] == ids[1:]


def test_text_format_is_trained_whole_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    examples, _ = tokenize_sft([{"text": "Question: Why? Answer: Because."}], Format.TEXT, tok, None, 1024)
    ids, labels = examples[0]["input_ids"], examples[0]["labels"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids.count(tok.bos_token_id) == 1
    assert labels[0] == IGNORE and labels[1:] == ids[1:]
    assert tok.decode(ids[1:]) == "Question: Why? Answer: Because.</s>"


def test_truncation_and_dropping_are_counted(tiny_tokenizer):
    tok = tiny_tokenizer
    template = resolve_template("chatml", tok)
    records = [
        {"prompt": "short?", "completion": "yes."},
        {"prompt": "short?", "completion": "a much longer answer that will not fit in the window " * 3},
        {"prompt": "a prompt so long that the reply starts after the window ends " * 3, "completion": "no."},
    ]
    examples, stats = tokenize_sft(records, Format.PROMPT_COMPLETION, tok, template, 40)
    assert stats.examples == 2 and stats.truncated == 2 and stats.dropped == 1
    assert all(len(e["input_ids"]) <= 40 for e in examples)
    assert stats.tokens == sum(len(e["input_ids"]) for e in examples)
    assert stats.trainable_tokens == sum(sum(label != IGNORE for label in e["labels"]) for e in examples)


def test_jinja_file_as_template(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    path = tmp_path / "mine.jinja"
    path.write_text(
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{{ '### Q: ' + m['content'] + '\\n' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ '### A: ' + m['content'] + eos_token + '\\n' }}"
        "{%- else -%}{{ m['content'] + '\\n' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '### A: ' }}{%- endif -%}"
    )
    template = resolve_template(str(path), tok)
    assert template.name == str(path) and template.source == path.read_text()
    ids, labels = _tokenize(tok, str(path), [SYSTEM] + CONVERSATION)
    assert [tok.decode(run) for run in _labelled_runs(ids, labels)] == [f"{r}</s>" for r in REPLIES]
    assert "### Q: What is two plus two?" in tok.decode(ids)


def test_unknown_template_lists_the_shipped_names(tiny_tokenizer):
    with pytest.raises(InputError) as err:
        resolve_template("no-such-template", tiny_tokenizer)
    message = str(err.value)
    assert "no-such-template" in message
    for name in SHIPPED:
        assert name in message


def test_tokenizer_without_chat_template_needs_template():
    tok = build_tokenizer(chat_template=None)
    assert not tok.chat_template
    with pytest.raises(InputError) as err:
        resolve_template(None, tok, "my-model")
    assert "my-model" in str(err.value) and "--template" in str(err.value)
    for name in SHIPPED:
        assert name in str(err.value)
    assert resolve_template("tulu", tok).name == "tulu"  # an explicit --template works


def test_tokenizers_own_template_is_the_default(tiny_tokenizer):
    template = resolve_template(None, tiny_tokenizer)
    assert template.name == "tokenizer" and template.source == tiny_tokenizer.chat_template
    assert resolve_template("tokenizer", tiny_tokenizer) == template


def test_finish_ids_single_bos_and_unlabelled_first_token():
    bos = 0
    assert finish_ids([5, 6], [5, 6], bos) == ([bos, 5, 6], [IGNORE, 5, 6])
    assert finish_ids([bos, bos, bos, 5], [IGNORE, IGNORE, IGNORE, 5], bos) == ([bos, 5], [IGNORE, 5])
    assert finish_ids([5, 6], [5, 6], None) == ([5, 6], [IGNORE, 6])
    assert finish_ids([], [], None) == ([], [])
