"""chat: piped prompts give one JSON line each (greedy, deterministic); the terminal mode is a real REPL."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

from rlkit.data.templates import resolve_template
from rlkit.errors import InputError
from rlkit.models.inference import load_causal_lm_for_inference
from rlkit.models.load import load_tokenizer, resolve_source
from rlkit.tools.chat import ChatConfig, ChatSession, run_piped

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "TERM": "dumb"}
LINES = [
    "hello there",
    json.dumps({"prompt": "What is 2 + 2?"}),
    json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    source = resolve_source(str(tiny_model_dir))
    tokenizer = load_tokenizer(source)
    return load_causal_lm_for_inference(source), tokenizer, resolve_template(None, tokenizer)


def _piped(loaded, text: str, **options) -> list[dict]:
    model, tokenizer, template = loaded
    out = io.StringIO()
    run_piped(ChatConfig(model="tiny", max_new_tokens=6, **options), model, tokenizer, template, io.StringIO(text), out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_piped_cli_writes_one_json_line_per_prompt(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "rlkit", "chat", str(tiny_model_dir), "--max-new-tokens", "6", "--batch-size", "2"],
        input="\n".join(LINES[:1] + [""] + LINES[1:]) + "\n",
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 3  # the blank line is skipped
    assert [r["prompt"] for r in records] == ["hello there", "What is 2 + 2?", [{"role": "user", "content": "hi"}]]
    for record in records:
        assert isinstance(record["completion"], str)
        assert record["temperature"] == 0.0 and record["max_new_tokens"] == 6  # greedy by default when piped


def test_greedy_is_deterministic_and_independent_of_batching(loaded):
    text = "\n".join(LINES) + "\n"
    first = _piped(loaded, text, batch_size=3)
    assert first == _piped(loaded, text, batch_size=3)
    assert [r["completion"] for r in first] == [r["completion"] for r in _piped(loaded, text, batch_size=1)]


def test_seeded_sampling_with_n_is_reproducible(loaded):
    text = "hello\nWhat is 2 + 2?\n"
    first = _piped(loaded, text, n=3, temperature=1.0, seed=7)
    assert len(first) == 6 and [r["sample"] for r in first] == [0, 1, 2, 0, 1, 2]
    assert first == _piped(loaded, text, n=3, temperature=1.0, seed=7)
    assert [r["completion"] for r in first] != [
        r["completion"] for r in _piped(loaded, text, n=3, temperature=1.0, seed=8)
    ]


def test_bad_lines_name_the_line(loaded):
    with pytest.raises(InputError, match="stdin line 2"):
        _piped(loaded, 'fine\n{"prompt": \n')
    with pytest.raises(InputError, match="stdin line 1: a JSON line needs"):
        _piped(loaded, '{"question": "x"}\n')


def test_reply_streams_in_pieces_and_keeps_history(loaded):
    model, tokenizer, template = loaded
    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    session = ChatSession(
        ChatConfig(model="tiny", max_new_tokens=12, temperature=0.0), model, tokenizer, template, Recorder()
    )
    answer = session.reply("hello")
    assert len([w for w in writes if w.strip()]) >= 2  # written as generated, not once at the end
    assert session.history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": answer}]


def test_interactive_session_in_a_pseudo_terminal(tmp_path, tiny_model_dir):
    """Streams a reply (text shows while it is still being generated), Ctrl-C stops it but not
    the program, the history is kept, and /save, /reset and /exit do what they say."""
    pexpect = pytest.importorskip("pexpect")
    saved, cleared = tmp_path / "conv.json", tmp_path / "after-reset.json"
    child = pexpect.spawn(
        sys.executable,
        # greedy, this random model never says EOS: a reply of 100000 tokens is still running when Ctrl-C comes
        [
            "-m",
            "rlkit",
            "chat",
            str(tiny_model_dir),
            "--max-new-tokens",
            "100000",
            "--temperature",
            "0",
            "--system",
            "Be brief.",
        ],
        env=ENV,
        encoding="utf-8",
        timeout=120,
        cwd=str(REPO),
        dimensions=(40, 200),
    )
    try:
        child.expect("you>")
        child.sendline("hello")
        child.expect("model>")
        child.expect(r"\S{3,}", timeout=30)  # words on screen while generation goes on
        time.sleep(0.5)
        child.sendintr()
        child.expect(r"\(stopped\)", timeout=30)
        child.expect("you>")
        child.sendline(f"/save {saved}")
        child.expect("saved 2 message")
        child.expect("you>")
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect("you>")
        child.sendline(f"/save {cleared}")
        child.expect("saved 0 message")
        child.expect("you>")
        child.sendline("/temperature 2")
        child.expect("unknown command")
        child.expect("you>")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    conversation = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in conversation] == ["system", "user", "assistant"]
    assert conversation[0]["content"] == "Be brief." and conversation[1]["content"] == "hello"
    assert len(conversation[2]["content"]) > 0  # what was shown before Ctrl-C is kept
    assert json.loads(cleared.read_text())["messages"] == [{"role": "system", "content": "Be brief."}]
