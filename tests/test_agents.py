"""Tools and environments for multi-turn GRPO (rlkit.agents): TRL's conventions, every fault a
one-line answer, and episodes whose tokens are the sampled ids plus template-rendered tool turns."""

from __future__ import annotations

import importlib
import io
import os
import sys
import textwrap
import threading
import time

import pytest
from conftest import build_tokenizer

from rlkit.agents.calls import BadToolCall, ToolCall, parse_turn
from rlkit.agents.environment import load_environment, with_observation
from rlkit.agents.execution import ToolCounts, execute, execute_all
from rlkit.agents.toolset import Toolset, load_tools, tools_of
from rlkit.agents.transcript import (
    EpisodeTokens,
    check_tool_template,
    prompt_text,
    tool_turn_ids,
    tool_turn_text,
)
from rlkit.agents.turn import tool_round
from rlkit.data.formats import Format
from rlkit.data.templates import ChatTemplate, render, render_segments, shipped_template
from rlkit.errors import InputError, RunError

CHATML_TOOLS = ChatTemplate("chatml-tools", shipped_template("chatml-tools"))


def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


def divide(a: float, b: float) -> float:
    """Divides a by b.

    Args:
        a: The dividend.
        b: The divisor.
    """
    return a / b


MULTIPLY_SCHEMA = {
    "type": "function",
    "function": {
        "name": "multiply",
        "description": "Multiplies two integers.",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "description": "The first integer."},
                "b": {"type": "integer", "description": "The second integer."},
            },
            "required": ["a", "b"],
        },
        "return": {"type": "integer", "description": "The product of the two integers."},
    },
}


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a user's module into the working directory, as `module:name` specs find them; forgotten after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    names = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def smol_tokenizer():
    """The tiny tokenizer with SmolLM2-Instruct's EOS: <|im_end|> ends a turn and stops sampling."""
    tokenizer = build_tokenizer()
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- tools ---------------------------------------------------------------------------------------


def test_a_typed_documented_function_is_described_as_transformers_describes_it():
    tools = tools_of([multiply, divide])
    assert tools.names == ("multiply", "divide")
    assert tools.schemas[0] == MULTIPLY_SCHEMA
    assert tools.get("divide").function is divide and tools.get("nope") is None


def test_tools_load_from_specs_and_an_indescribable_function_is_refused_with_what_to_add(user_module, capfd):
    user_module(
        "agent_tools",
        '''
        print("imported")  # on stderr, not stdout

        def add(a: int, b: int) -> int:
            """Adds two integers.

            Args:
                a: The first.
                b: The second.
            """
            return a + b

        def undocumented(a: int) -> int:
            return a

        def unhinted(a):
            """Echoes.

            Args:
                a: Anything.
            """
            return a

        class Game:
            pass
        ''',
    )
    tools = load_tools(["agent_tools:add"])
    assert tools.names == ("add",) and tools.get("add").source == "agent_tools:add"
    assert capfd.readouterr().out == ""
    refusals = {
        "agent_tools:undocumented": ["--tools agent_tools:undocumented", "docstring", "Args:"],
        "agent_tools:unhinted": ["--tools agent_tools:unhinted", "type hint"],
        "agent_tools:Game": ["is a class", "--env"],
        "agent_tools:missing": ["has no function 'missing'"],
        "agent_tools": ["expected module:function"],
        "no_such_module:f": ["cannot import 'no_such_module'"],
    }
    for spec, expected in refusals.items():
        with pytest.raises(InputError) as err:
            load_tools([spec])
        message = str(err.value)
        assert "\n" not in message and all(part in message for part in expected), message


def test_two_tools_of_one_name_are_refused():
    with pytest.raises(InputError, match="two tools are named 'multiply'"):
        tools_of([multiply]).merged(tools_of([multiply]))


# ---- tool calls ----------------------------------------------------------------------------------


def test_tool_calls_are_read_from_hermes_blocks():
    text = (
        'Let me compute.\n<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call>\n'
        '<tool_call>{"name": "divide", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>'
        '<tool_call>{"name": "now"}</tool_call>'
    )
    turn = parse_turn(text)
    assert turn.content == "Let me compute."
    assert turn.calls == (ToolCall("multiply", {"a": 3, "b": 4}), ToolCall("divide", {"a": 1, "b": 2}), ToolCall("now"))
    assert turn.as_message()["tool_calls"][0] == {
        "type": "function",
        "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}},
    }
    assert parse_turn("The answer is 12.").calls == ()
    assert "tool_calls" not in parse_turn("The answer is 12.").as_message()


@pytest.mark.parametrize(
    "block, reason",
    [
        ("<tool_call>{'name': 'multiply'}</tool_call>", "not valid JSON"),
        ("<tool_call>[1, 2]</tool_call>", "must be a JSON object"),
        ('<tool_call>{"arguments": {}}</tool_call>', 'no "name"'),
        ('<tool_call>{"name": "multiply", "arguments": [3, 4]}</tool_call>', '"arguments" of multiply'),
        ('<tool_call>{"name": "multiply", "arguments": {"a": 3', "missing its closing </tool_call>"),
    ],
)
def test_a_garbled_call_is_a_bad_call_with_a_reason_for_the_model(block, reason):
    (call,) = parse_turn("Calling. " + block).calls
    assert isinstance(call, BadToolCall) and reason in call.reason


# ---- executing calls -----------------------------------------------------------------------------


def _slow(release: threading.Event):
    def slow(seconds: float) -> str:
        """Waits.

        Args:
            seconds: How long.
        """
        release.wait(seconds)
        print("late print from an abandoned tool")
        return "done"

    return slow


def _abandoned_tools_finish() -> None:
    """Wait for tool threads a timeout abandoned (released by the test) to end, so none prints into the next test."""
    deadline = time.monotonic() + 10
    while any(t.name.startswith("rlkit-tool-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_each_way_a_call_can_fail_is_an_answer_to_the_model():
    def boom() -> str:
        """Fails."""
        raise ValueError("boom")

    def leave() -> str:
        """Exits."""
        sys.exit(3)

    async def add(a: int, b: int) -> int:
        """Adds, asynchronously.

        Args:
            a: The first.
            b: The second.
        """
        return a + b

    release = threading.Event()
    tools = tools_of([multiply, boom, leave, add, _slow(release)])
    try:
        start = time.monotonic()
        outcomes = execute_all(
            [
                ToolCall("multiply", {"a": 3, "b": 4}),
                ToolCall("add", {"a": 1, "b": 2}),
                ToolCall("boom"),
                ToolCall("leave"),
                ToolCall("slow", {"seconds": 30}),
                ToolCall("search", {"q": "x"}),
                ToolCall("multiply", {"a": 3, "c": 4}),
                parse_turn("<tool_call>{oops}</tool_call>").calls[0],
            ],
            tools,
            timeout=0.3,
        )
        assert time.monotonic() - start < 10
    finally:
        release.set()
        _abandoned_tools_finish()
    got = [(o.kind, o.text) for o in outcomes]
    assert got[:6] == [
        ("ok", "12"),
        ("ok", "3"),
        ("error", "{'error': 'boom'}"),
        ("error", "{'error': '3'}"),
        ("timeout", "{'error': 'Tool slow timed out after 0.3 seconds.'}"),
        ("unknown_tool", "{'error': 'Tool search not found.'}"),
    ]
    assert got[6][0] == "bad_call" and "multiply: missing a required argument: 'b'" in got[6][1]
    assert got[7][0] == "bad_call" and "not valid JSON" in got[7][1] and outcomes[7].name == ""
    assert outcomes[0].as_message() == {"role": "tool", "name": "multiply", "content": "12"}

    counts = ToolCounts().add(outcomes)
    assert (counts.calls, counts.failures) == (8, 6)
    metrics = counts.metrics(episodes=4)
    assert metrics["tools/call_frequency"] == 2.0 and metrics["tools/failure_frequency"] == 0.75
    assert metrics["tools/timeouts"] == 1 and metrics["tools/unknown_tools"] == 1 and metrics["tools/bad_calls"] == 2
    assert metrics["tools/multiply/calls"] == 2 and metrics["tools/slow/timeouts"] == 1
    assert not any("search" in key for key in metrics)  # invented names are no metrics
    assert (counts + counts).calls == 16


def test_what_a_tool_prints_stays_off_stdout_even_after_it_is_abandoned(capfd):
    def chatty(x: int) -> int:
        """Prints.

        Args:
            x: A number.
        """
        print("tool says hi")
        return x

    release = threading.Event()
    tools = tools_of([chatty, _slow(release)])
    assert execute(ToolCall("chatty", {"x": 1}), tools).text == "1"
    assert execute(ToolCall("slow", {"seconds": 30}), tools, timeout=0.1).kind == "timeout"
    release.set()  # the abandoned tool wakes up and prints after its call has been answered
    _abandoned_tools_finish()
    print("the run's own line")
    captured = capfd.readouterr()
    assert captured.out == "the run's own line\n"
    assert "tool says hi" in captured.err and "late print from an abandoned tool" in captured.err
    assert not type(sys.stdout).__name__ == "_Routed"  # streams put back once the last tool thread ended


def test_a_tool_reading_stdin_does_not_hang(monkeypatch):
    read_end, write_end = os.pipe()  # nothing is ever written: reading this stdin would block forever
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(os.fdopen(read_end, "rb")))

    def ask(question: str) -> str:
        """Asks the user.

        Args:
            question: What to ask.
        """
        return input(question)

    def slurp() -> str:
        """Reads all of stdin."""
        return f"read {sys.stdin.read()!r}"

    try:
        asked = execute(ToolCall("ask", {"question": "name? "}), tools_of([ask, slurp]), timeout=5)
        slurped = execute(ToolCall("slurp"), tools_of([ask, slurp]), timeout=5)
    finally:
        os.close(write_end)
    assert asked.kind == "error" and "EOF" in asked.text
    assert (slurped.kind, slurped.text) == ("ok", "read ''")


# ---- environments --------------------------------------------------------------------------------

ENVIRONMENTS = '''
import sys

class Counter:
    built = 0

    def __init__(self):
        type(self).built += 1
        self.counter = 0

    def reset(self, target, **kwargs):
        print("resetting")  # stderr, not stdout
        self.counter, self.target, self.columns = 0, target, dict(kwargs, target=target)
        return f" Reach {target}."

    def get_reward(self) -> float:
        return float(self.counter == self.target)

    def increment(self, step: int) -> int:
        """Increments the counter.

        Args:
            step: Value to add to the counter.
        """
        self.counter += step
        return self.counter

    def _helper(self):
        return None

class Silent(Counter):
    def reset(self, **kwargs):
        self.counter = 0

    def get_reward(self):
        return None

class BadReset(Counter):
    def reset(self, target, **kwargs):
        if target == 4:
            raise ValueError("no such target")

class StrictReset(Counter):
    def reset(self, target):
        pass

class ExitOnBuild:
    def __init__(self):
        sys.exit(2)

    def reset(self, **kwargs):
        pass

class SecondBuildFails(Counter):
    def __init__(self):
        if SecondBuildFails.built:
            raise RuntimeError("out of sandboxes")
        super().__init__()

class NoReset:
    def act(self, x: int) -> int:
        """Acts.

        Args:
            x: A number.
        """
        return x

class UndocumentedTool(Counter):
    def peek(self):
        return self.counter

class BadReward(Counter):
    def get_reward(self):
        return "high"

def not_a_class():
    pass
'''


def test_environment_pool_resets_with_row_columns_and_exposes_public_methods_as_tools(user_module, capfd):
    user_module("agent_envs", ENVIRONMENTS)
    pool = load_environment("agent_envs:Counter")
    assert pool.toolset.names == ("increment",)  # not reset, get_reward or _helper
    assert pool.toolset.schemas[0]["function"]["parameters"]["properties"]["step"]["type"] == "integer"
    rows = [{"prompt": [{"role": "user", "content": "Count."}], "target": 3}, {"prompt": "Count.", "target": 1}]
    first = pool.start(rows, indices=[10, 11])
    assert [e.row for e in first] == [10, 11] and [e.observation for e in first] == [" Reach 3.", " Reach 1."]
    assert first[0].environment.columns == {"prompt": rows[0]["prompt"], "target": 3}  # every column, TRL's reset(**x)
    assert with_observation(rows[0]["prompt"], first[0].observation) == [{"role": "user", "content": "Count. Reach 3."}]
    assert rows[0]["prompt"][0]["content"] == "Count."  # the row is left as it was
    assert with_observation("Count.", " Reach 1.") == "Count. Reach 1." and with_observation("x", None) == "x"

    for _ in range(3):
        assert execute(ToolCall("increment", {"step": 1}), first[0].tools).text in {"1", "2", "3"}
    assert execute(ToolCall("increment", {"step": 1}), first[1].tools).text == "1"  # its own instance
    assert [pool.reward(e) for e in first] == [1.0, 1.0]

    second = pool.start(rows[:1] * 3)  # instances are reused, and built only when a batch needs more
    assert second[0].environment is first[0].environment and second[0].environment.counter == 0
    module = sys.modules["agent_envs"]
    assert module.Counter.built == 3
    assert capfd.readouterr().out == ""

    silent = load_environment("agent_envs:Silent")
    (episode,) = silent.start([{"prompt": "Go."}])
    assert episode.observation is None and silent.reward(episode) is None


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("agent_envs:BadReset", ["--env agent_envs:BadReset", "BadReset.reset() for row 1", "no such target"]),
        ("agent_envs:StrictReset", ["StrictReset.reset() for row 0", "prompt", "**kwargs"]),
        ("agent_envs:ExitOnBuild", ["ExitOnBuild()", "SystemExit(2)"]),
        ("agent_envs:SecondBuildFails", ["SecondBuildFails() for row 1", "out of sandboxes"]),
        ("agent_envs:BadReward", ["BadReward.get_reward() returned 'high' for row 0"]),
    ],
)
def test_environment_code_that_fails_is_one_run_error_naming_the_class_and_row(user_module, spec, expected):
    user_module("agent_envs", ENVIRONMENTS)
    with pytest.raises(RunError) as err:
        pool = load_environment(spec)
        episodes = pool.start([{"prompt": "Go.", "target": 3}, {"prompt": "Go.", "target": 4}])
        pool.reward(episodes[0])
    message = str(err.value)
    assert "\n" not in message and all(part in message for part in expected), message


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("agent_envs:NoReset", "has no reset method"),
        ("agent_envs:UndocumentedTool", "(UndocumentedTool.peek)"),
        ("agent_envs:not_a_class", "not a class"),
    ],
)
def test_an_environment_that_cannot_be_used_is_refused_before_it_runs(user_module, spec, expected):
    user_module("agent_envs", ENVIRONMENTS)
    with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_environment(spec)


# ---- token-exact tool turns ----------------------------------------------------------------------


def test_a_two_turn_episode_is_the_sampled_ids_plus_the_templates_tool_turn(smol_tokenizer):
    tok, tools = smol_tokenizer, tools_of([multiply])
    check_tool_template(tok, CHATML_TOOLS, tools.schemas)
    conversation = [{"role": "user", "content": "What is 3 times 4?"}]
    prompt_ids = _ids(tok, prompt_text(tok, CHATML_TOOLS, conversation, tools.schemas))
    # what the model samples (its ids through the EOS the sampler stops at), never re-encoded
    first = _ids(tok, '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>')
    round_ = tool_round(tok.decode(first, skip_special_tokens=True), conversation, tools, tok, CHATML_TOOLS)
    assert [(o.kind, o.text) for o in round_.outcomes] == [("ok", "12")]
    assert tok.decode(round_.appended_ids) == "\n<|im_start|>tool\n12<|im_end|>\n<|im_start|>assistant\n"
    final = _ids(tok, "It is 12.<|im_end|>")
    episode = EpisodeTokens().sampled(first).appended(round_.appended_ids).sampled(final)

    whole = [*conversation, *round_.messages, {"role": "assistant", "content": "It is 12."}]
    rendered = render(tok, CHATML_TOOLS, whole, tools=tools.schemas)
    assert prompt_ids + list(episode.ids) == _ids(tok, rendered.rstrip())  # token for token, the template's episode
    assert episode.mask == (1,) * len(first) + (0,) * len(round_.appended_ids) + (1,) * len(final)
    assert tool_round("It is 12.", conversation, tools, tok, CHATML_TOOLS) is None  # no call: the episode is over


def test_episode_tokens_are_what_sft_trains_on_for_the_same_conversation(tiny_tokenizer):
    """With an EOS that is not the template's end of turn (</s> after <|im_end|>), the appended part
    starts after the template's end of turn, as render_segments splits SFT turns: an episode of two
    tool rounds (two calls in the second) is SFT's tokenisation, its mask SFT's labels."""
    tok, tools = tiny_tokenizer, tools_of([multiply, divide])
    conversation = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Compute."}]
    turns = [
        '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|></s>',
        'Now both.\n<tool_call>\n{"name": "divide", "arguments": {"a": 1, "b": 0}}\n</tool_call>\n'
        '<tool_call>\n{"name": "multiply", "arguments": {"a": 2, "b": 5}}\n</tool_call><|im_end|></s>',
        "12, and 10.<|im_end|></s>",
    ]
    pieces = []
    for text in turns[:2]:
        sampled = _ids(tok, text)
        round_ = tool_round(tok.decode(sampled, skip_special_tokens=True), conversation, tools, tok, CHATML_TOOLS)
        pieces += [(sampled, True), (list(round_.appended_ids), False)]
        conversation = [*conversation, *round_.messages]
    assert [o.text for o in round_.outcomes] == ["{'error': 'division by zero'}", "10"]
    pieces.append((_ids(tok, turns[2]), True))
    episode = EpisodeTokens.of(pieces)

    whole = [*conversation, {"role": "assistant", "content": "12, and 10."}]
    segments = render_segments(tok, CHATML_TOOLS, whole)  # SFT's split (no tools in its system turn)
    prompt = _ids(tok, prompt_text(tok, CHATML_TOOLS, whole[:2]))
    sft_ids = [i for text, _ in segments for i in _ids(tok, text)]
    sft_mask = [int(trained) for text, trained in segments for _ in _ids(tok, text)]
    # SFT keeps the trailing "\n" after the last turn; the episode ends at the last sampled EOS
    assert sft_ids[: len(prompt) + len(episode)] == prompt + list(episode.ids)
    assert sft_mask[len(prompt) : len(prompt) + len(episode)] == list(episode.mask)


def test_an_sft_file_with_tools_trains_on_the_episodes_tokens_and_mask(tmp_path, tiny_tokenizer):
    """TRL's tool-calling SFT layout (a `tools` column of schemas, `tool_calls` on assistant turns,
    `tool` turns) read from JSONL: the rows are the very ids a `--tools` episode of the same
    conversation has after its prompt (the schemas shown), the labels its mask; two records with
    different tools keep their schemas exactly (no other tool's keys added as nulls)."""
    from conftest import write_jsonl

    from rlkit.agents.transcript import prompt_ids
    from rlkit.data.prepare import DataOptions, build_sft_data
    from rlkit.data.tokenize import IGNORE

    tok, tools = tiny_tokenizer, tools_of([multiply])
    conversation = [{"role": "user", "content": "What is 3 times 4?"}]
    sampled = _ids(tok, '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|></s>')
    round_ = tool_round(tok.decode(sampled, skip_special_tokens=True), conversation, tools, tok, CHATML_TOOLS)
    final = _ids(tok, "It is 12.<|im_end|></s>")
    episode = EpisodeTokens().sampled(sampled).appended(round_.appended_ids).sampled(final)
    prompt = prompt_ids(tok, CHATML_TOOLS, conversation, tools.schemas)  # BOS included, as SFT rows have it
    record = {
        "tools": tools.schemas,
        "messages": [
            *conversation,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}],
            },
            {"role": "tool", "name": "multiply", "content": "12"},
            {"role": "assistant", "content": "It is 12."},
        ],
    }
    other = {"tools": tools_of([divide]).schemas, "messages": [*conversation, {"role": "assistant", "content": "12."}]}
    path = write_jsonl(tmp_path / "calls.jsonl", [record, other])
    rows = build_sft_data(DataOptions(sources=[str(path)], template="chatml-tools", packing=False), tok, "tiny").train
    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    assert ids[: len(prompt) + len(episode)] == prompt + list(episode.ids)
    trained = [int(label != IGNORE) for label in labels]
    assert trained[: len(prompt)] == [0] * len(prompt)
    assert trained[len(prompt) : len(prompt) + len(episode)] == list(episode.mask)
    divide_prompt = prompt_ids(tok, CHATML_TOOLS, conversation, tools_of([divide]).schemas)
    assert rows[1]["input_ids"][: len(divide_prompt)] == divide_prompt


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda r: r["messages"][0].update(tool_calls=[{"name": "multiply"}]), "only assistant turns call tools"),
        (lambda r: r["messages"][1].update(tool_calls=[{"arguments": {}}]), "tool call 1 is"),
        (lambda r: r["messages"][1].update(tool_calls=[{"name": "m", "arguments": [3]}]), "write a JSON object"),
        (lambda r: r["messages"][1].update(tool_calls=[{"name": "m", "arguments": "{3"}]), "is not valid JSON"),
        (lambda r: r.update(tools=[{"description": "no name"}]), "tool 1 in 'tools' has no name"),
        (lambda r: r.update(tools={"name": "m"}), "'tools' must be a list"),
    ],
)
def test_bad_tool_fields_in_sft_data_are_refused_with_the_record(tmp_path, tiny_tokenizer, change, expected):
    from conftest import write_jsonl

    from rlkit.data.prepare import DataOptions, build_sft_data

    record = {
        "tools": tools_of([multiply]).schemas,
        "messages": [
            {"role": "user", "content": "3 x 4?"},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "multiply", "arguments": {"a": 3, "b": 4}}]},
            {"role": "tool", "content": "12"},
            {"role": "assistant", "content": "12."},
        ],
    }
    change(record)
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(InputError, match=f"{path} record 1") as err:
        build_sft_data(DataOptions(sources=[str(path)], template="chatml-tools"), tiny_tokenizer, "tiny")
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_tool_calls_need_a_template_that_writes_them(tmp_path, tiny_tokenizer):
    from conftest import write_jsonl

    from rlkit.data.prepare import DataOptions, build_sft_data

    calls = [{"name": "multiply", "arguments": {"a": 3, "b": 4}}]
    messages = [{"role": "user", "content": "3 x 4?"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    for record, expected in (
        ({"messages": messages}, "assistant tool_calls"),
        (
            {
                "tools": tools_of([multiply]).schemas,
                "messages": messages[:1] + [{"role": "assistant", "content": "12."}],
            },
            "tool schemas",
        ),
    ):
        path = write_jsonl(tmp_path / "r.jsonl", [record])
        with pytest.raises(InputError, match=f"template 'chatml' does not render {expected}"):
            build_sft_data(DataOptions(sources=[str(path)], template="chatml"), tiny_tokenizer, "tiny")


def test_preference_and_unpaired_records_show_their_tools_column(tiny_tokenizer):
    """DPO/KTO data with a `tools` column (a chosen answer that calls the tool, a rejected one that
    does not) is tokenized as SFT tokenizes it: the prompt is the episode's prompt with the schemas,
    the call turn is trained, the tool turn is not."""
    from rlkit.agents.transcript import prompt_ids
    from rlkit.data.pairs import tokenize_pairs
    from rlkit.data.tokenize import IGNORE
    from rlkit.data.unpaired import tokenize_unpaired

    tok, tools = tiny_tokenizer, tools_of([multiply])
    question = [{"role": "user", "content": "What is 3 times 4?"}]
    call = {"role": "assistant", "content": "", "tool_calls": [{"name": "multiply", "arguments": {"a": 3, "b": 4}}]}
    chosen = [call, {"role": "tool", "content": "12"}, {"role": "assistant", "content": "It is 12."}]
    record = {"tools": tools.schemas, "prompt": question, "chosen": chosen, "rejected": "It is 11."}
    (row,), _ = tokenize_pairs([record], tok, CHATML_TOOLS, 1000)
    expected_prompt = prompt_ids(tok, CHATML_TOOLS, question, tools.schemas)
    chosen_ids, chosen_labels = row["chosen_input_ids"], row["chosen_labels"]
    assert row["prompt_input_ids"] == expected_prompt  # the schemas shown, as a --tools episode shows them
    assert tok.decode(chosen_ids).count("<|im_start|>tool") == 1
    trained = tok.decode([i for i, label in zip(chosen_ids, chosen_labels) if label != IGNORE])
    assert "<tool_call>" in trained and "It is 12." in trained and "<|im_start|>tool" not in trained
    unpaired = {"tools": tools.schemas, "prompt": question, "completion": chosen, "label": True}
    (kto_row,), _ = tokenize_unpaired([unpaired], Format.UNPAIRED, tok, CHATML_TOOLS, 1000)
    assert kto_row["prompt_input_ids"] == expected_prompt and kto_row["label"] is True


def test_templates_that_cannot_append_tool_turns_are_refused(tiny_tokenizer):
    check_tool_template(tiny_tokenizer, CHATML_TOOLS)  # the shipped one passes
    source = CHATML_TOOLS.source
    strips_earlier_turns = ChatTemplate(
        "last-three", source.replace("for message in messages -%}", "for message in messages[-3:] -%}")
    )
    assert strips_earlier_turns.source != source
    hides_results = ChatTemplate(
        "no-results",
        source.replace("{{- message['content'] -}}", "{{- message['content'] if message['role'] != 'tool' else '' -}}"),
    )
    refusals = {
        strips_earlier_turns: "renders earlier turns differently",
        ChatTemplate("chatml", shipped_template("chatml")): "does not render",
        hides_results: "does not show tool results",
    }
    for template, expected in refusals.items():
        with pytest.raises(InputError) as err:
            check_tool_template(tiny_tokenizer, template)
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    conversation = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "", "tool_calls": [ToolCall("multiply", {"a": 1, "b": 2}).as_message()]},
    ]
    with pytest.raises(RunError, match="rendered this episode's earlier turns differently"):
        tool_turn_text(
            tiny_tokenizer, strips_earlier_turns, conversation, [{"role": "tool", "name": "multiply", "content": "2"}]
        )
    assert tool_turn_ids(
        tiny_tokenizer, CHATML_TOOLS, conversation, [{"role": "tool", "name": "multiply", "content": "2"}]
    )


def test_chatml_tools_renders_a_conversation_without_tools_exactly_as_chatml(tiny_tokenizer):
    chatml = ChatTemplate("chatml", shipped_template("chatml"))
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
    ]
    for generation_prompt in (False, True):
        assert render(tiny_tokenizer, CHATML_TOOLS, conversation, generation_prompt) == render(
            tiny_tokenizer, chatml, conversation, generation_prompt
        )
    with_tools = prompt_text(tiny_tokenizer, CHATML_TOOLS, conversation, [MULTIPLY_SCHEMA])
    assert with_tools.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n") and "<tools>\n{" in with_tools
    assert Toolset().schemas == []


# SmolLM2-135M-Instruct's shipped chat template (tokenizer_config.json), verbatim.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_smollm2_tools_renders_a_conversation_without_tools_exactly_as_smollm2_and_appends_tool_turns(
    tiny_tokenizer,
):
    """What the demo's pipeline relies on: switching its template to smollm2-tools changes no prompt
    that offers no tools (SmolLM2's default system prompt included), and with tools the schemas follow
    that prompt in the same system turn and every tool turn is a pure suffix (check_tool_template)."""
    smollm2 = ChatTemplate("smollm2", SMOLLM2_TEMPLATE)
    ours = ChatTemplate("smollm2-tools", shipped_template("smollm2-tools"))
    for conversation in (
        CONVERSATION_WITHOUT_SYSTEM,
        [{"role": "system", "content": "Be brief."}, *CONVERSATION_WITHOUT_SYSTEM],
    ):
        for generation_prompt in (False, True):
            assert render(tiny_tokenizer, ours, conversation, generation_prompt) == render(
                tiny_tokenizer, smollm2, conversation, generation_prompt
            )
    check_tool_template(tiny_tokenizer, ours, [MULTIPLY_SCHEMA])
    with_tools = prompt_text(tiny_tokenizer, ours, CONVERSATION_WITHOUT_SYSTEM[:1], [MULTIPLY_SCHEMA])
    assert with_tools.startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\n\n"
        "You may call these tools:\n<tools>\n"
    )
    assert with_tools.count("<|im_start|>system") == 1 and '"name": "multiply"' in with_tools


CONVERSATION_WITHOUT_SYSTEM = [
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye?"},
]
