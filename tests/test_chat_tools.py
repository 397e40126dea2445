"""`rlkit chat --tools`: a reply's calls run, shown or recorded, every fault answered, stdout clean.

Tiny random models almost never write a valid tool call, so the model is scripted as in
test_grpo_tools (whose tools module, compact template and `script_generate` these tests share):
`generate` answers each row from a script keyed by how many tool turns the row already holds.
"""

from __future__ import annotations

import io
import json
import sys

import pytest
from conftest import run_cli
from test_grpo_tools import END, USER_MODULE, _call, script_generate, user_code  # noqa: F401 (the fixture, used below)

from rlkit.agents.setup import load_agents
from rlkit.data.templates import resolve_template
from rlkit.models.inference import load_causal_lm_for_inference
from rlkit.models.load import load_tokenizer, resolve_source
from rlkit.tools.chat import ChatConfig, ChatSession

pytestmark = pytest.mark.usefixtures("user_code")  # the tools module and the compact template, in the cwd


CALC = _call("calculator", {"expression": "25 - 7"})
FAULTS = [  # one call of each fault class, in one turn
    _call("act", {"m": "boom"}),  # raises
    _call("act", {"m": "slow"}),  # runs past --tool-timeout
    _call("act", {"m": "chatty"}),  # prints, reads stdin
    _call("search", {"q": "x"}),  # no such tool
    "<tool_call>{oops}</tool_call>",  # not JSON
]
TOOLS = ["--tools", "rlkit.demo.tools:calculator", "--tools", f"{USER_MODULE}:act", "--template", "tools.jinja"]


def _chat(model_dir, monkeypatch, stdin: str, *options: str):
    """`rlkit chat MODEL ...` in this process with `stdin` piped in."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return run_cli("chat", str(model_dir), *options)


def _tokenizer(model_dir):
    return load_tokenizer(resolve_source(str(model_dir)))


def test_piped_calls_run_and_the_json_line_carries_the_exchange(tiny_model_dir, tmp_path, monkeypatch):
    script_generate(monkeypatch, _tokenizer(tiny_model_dir), [CALC + END, "It is 18." + END])
    lines = "What is 25 - 7?\n" + json.dumps({"messages": [{"role": "user", "content": "And 25 - 7?"}]}) + "\n"
    result = _chat(tiny_model_dir, monkeypatch, lines, *TOOLS, "--max-new-tokens", "300", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2
    first = records[0]
    assert first["prompt"] == "What is 25 - 7?"
    # the transcript, as grpo's reward functions and `eval --tools` read it
    assert first["completion"] == CALC + "\n[tool calculator] 18\nIt is 18."
    assert first["turns"] == 2
    assert first["messages"] == [
        {"role": "user", "content": "What is 25 - 7?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "25 - 7"}}}
            ],
        },
        {"role": "tool", "name": "calculator", "content": "18"},
        {"role": "assistant", "content": "It is 18."},
    ]
    assert records[1]["messages"][0] == {"role": "user", "content": "And 25 - 7?"}
    assert first["tools"] == ["rlkit.demo.tools:calculator", f"{USER_MODULE}:act"] and first["tool_timeout"] == 30
    assert "2 tool call(s), 0 failed" in result.stderr
    # `eval --completions` reads the lines back (the nested messages a column like any other)
    out = tmp_path / "out.jsonl"
    out.write_text(result.stdout.splitlines()[0] + "\n")
    scored = run_cli("eval", "--completions", str(out), "--reward", f"{USER_MODULE}:says_seven")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["completions"] == 1


def test_piped_faults_are_answered_and_stdout_holds_only_the_json_lines(tiny_model_dir, monkeypatch):
    script_generate(monkeypatch, _tokenizer(tiny_model_dir), ["\n".join(FAULTS) + END, "It is 7." + END])
    result = _chat(tiny_model_dir, monkeypatch, "Do it.\n", *TOOLS, "--tool-timeout", "0.2", "--max-new-tokens", "700")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1  # nothing a tool printed
    record = json.loads(lines[0])
    answers = [m["content"] for m in record["messages"] if m["role"] == "tool"]
    assert answers[0] == "{'error': 'boom'}"
    assert answers[1] == "{'error': 'Tool act timed out after 0.2 seconds.'}"
    assert answers[2] == "read ''"  # stdin reads as empty
    assert answers[3] == "{'error': 'Tool search not found.'}"
    assert answers[4].startswith("{'error': 'the tool call is not valid JSON")
    assert record["messages"][-1] == {"role": "assistant", "content": "It is 7."}
    assert "tool says hi" in result.stderr and "5 tool call(s), 4 failed" in result.stderr


def test_max_turns_leaves_the_last_calls_unanswered(tiny_model_dir, monkeypatch):
    script_generate(monkeypatch, _tokenizer(tiny_model_dir), [CALC + END])  # calls forever
    result = _chat(tiny_model_dir, monkeypatch, "Go.\n", *TOOLS, "--max-turns", "2", "--max-new-tokens", "600")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    roles = [m["role"] for m in record["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"] and record["turns"] == 3
    assert record["messages"][-1]["tool_calls"]  # the third turn's call, not run


@pytest.mark.parametrize(
    "options,expected",
    [
        (
            ["--tools", "rlkit.demo.tools:calculator", "--template", "chatml"],
            "does not render tool schemas",
        ),
        (["--tools", f"{USER_MODULE}:nope", "--template", "tools.jinja"], "no function 'nope'"),
        (["--max-turns", "2"], "--max-turns 2 caps tool-calling rounds; give --tools"),
    ],
)
def test_bad_tool_options_end_in_one_line_before_weights_load(tiny_model_dir, monkeypatch, options, expected):
    import rlkit.tools.chat as chat_module

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the options were refused")

    monkeypatch.setattr(chat_module, "load_causal_lm_for_inference", no_weights)
    result = _chat(tiny_model_dir, monkeypatch, "hi\n", *options)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert result.stdout == ""


# ---- on a terminal: the session -------------------------------------------------------------------


@pytest.fixture
def session_parts(tiny_model_dir):
    source = resolve_source(str(tiny_model_dir))
    tokenizer = load_tokenizer(source)
    template = resolve_template("tools.jinja", tokenizer)
    return load_causal_lm_for_inference(source), tokenizer, template


def _session(parts, **options) -> ChatSession:
    model, tokenizer, template = parts
    config = ChatConfig(model="tiny", temperature=0.0, tools=["rlkit.demo.tools:calculator"], **options)
    agents = load_agents(config.tools, None, tokenizer, template, config.max_turns, config.tool_timeout)
    return ChatSession(config, model, tokenizer, template, io.StringIO(), agents)


def test_a_reply_runs_its_calls_shows_them_and_goes_on_from_the_sampled_ids(session_parts, monkeypatch, capsys):
    from transformers import LlamaForCausalLM

    _, tokenizer, _ = session_parts
    script_generate(monkeypatch, tokenizer, [CALC + END, "It is 18." + END])
    scripted, inputs = LlamaForCausalLM.generate, []

    def recording(self, input_ids, **kwargs):
        inputs.append(input_ids[0].tolist())
        return scripted(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", recording)
    session = _session(session_parts, max_new_tokens=300)
    assert session.reply("What is 25 - 7?") == "It is 18."
    assert [m["role"] for m in session.history] == ["user", "assistant", "tool", "assistant"]
    assert session.history[2] == {"role": "tool", "name": "calculator", "content": "18"}
    # the second turn starts from the first turn's ids as sampled, then the tool turn's
    sampled = tokenizer(CALC + END, add_special_tokens=False)["input_ids"]
    tool_turn = tokenizer("\n<|im_start|>tool\n18<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert inputs[1] == inputs[0] + sampled + tool_turn["input_ids"]
    err = capsys.readouterr().err
    assert '[call] calculator {"expression": "25 - 7"}' in err and "[result] 18" in err


def test_a_reply_answers_a_failing_call_and_stops_at_max_turns(session_parts, monkeypatch, capsys):
    _, tokenizer, _ = session_parts
    bad = _call("calculator", {"expression": "2 ** 99"})
    script_generate(monkeypatch, tokenizer, [bad + END])  # calls forever
    session = _session(session_parts, max_new_tokens=400, max_turns=1)
    session.reply("Big?")
    assert [m["role"] for m in session.history] == ["user", "assistant", "tool", "assistant"]
    assert session.history[2]["content"].startswith("{'error': \"only numbers")
    err = capsys.readouterr().err
    assert "[error] {'error'" in err and "--max-turns 1 reached" in err


def test_the_reply_budget_counts_tool_turns(session_parts, monkeypatch, capsys):
    _, tokenizer, _ = session_parts
    script_generate(monkeypatch, tokenizer, [CALC + END])
    call = len(tokenizer(CALC + END, add_special_tokens=False)["input_ids"])
    session = _session(session_parts, max_new_tokens=call + 3)  # the call fits, its tool turn leaves no room
    session.reply("Go.")
    assert [m["role"] for m in session.history] == ["user", "assistant", "tool"]  # run and shown, then stopped
    assert "--max-new-tokens is spent" in capsys.readouterr().err


def test_the_demo_calculator_evaluates_arithmetic_and_nothing_else():
    from rlkit.demo.tools import calculator

    assert [calculator(e) for e in ("25 - 7", "(3 + 4) * 2", "7 / 2", "-3 + 1", "6 / 3")] == [
        "18",
        "14",
        "3.5",
        "-2",
        "2",
    ]
    assert calculator(42) == "42"  # a bare number, as a model may write it
    for expression, reason in [
        ("1 / 0", "division by zero"),
        ("2 ** 99", "only numbers"),
        ('__import__("os").system("true")', "only numbers"),
        ("x + 1", "only numbers"),
        ("3 +", "cannot read"),
        ("1" * 201, "longer than 200"),
    ]:
        with pytest.raises(ValueError, match=reason):
            calculator(expression)


def test_piped_samples_with_tools_are_seeded(tiny_model_dir, monkeypatch):
    """--n samples per prompt through the episode sampler, the same for the same --seed (the random
    tiny model writes no call: every episode is one turn)."""
    options = (*TOOLS, "--n", "2", "--temperature", "1", "--max-new-tokens", "6")
    runs = [_chat(tiny_model_dir, monkeypatch, "hi\nWhat is 2 + 2?\n", *options, "--seed", str(s)) for s in (3, 3, 4)]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr
    first = [json.loads(line) for line in runs[0].stdout.splitlines()]
    assert [(r["prompt"], r["sample"], r["turns"]) for r in first] == [
        ("hi", 0, 1),
        ("hi", 1, 1),
        ("What is 2 + 2?", 0, 1),
        ("What is 2 + 2?", 1, 1),
    ]
    assert runs[0].stdout == runs[1].stdout != runs[2].stdout
