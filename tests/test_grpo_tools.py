"""`rlkit grpo --tools/--env`: multi-turn episodes, token-exact, every fault an answer, resumable.

Tiny random models almost never write a valid tool call, so most tests script the policy: its
`generate` is replaced by one that answers each episode's turn from a script (what the model
"samples"), keyed by how many tool turns the episode already holds. The resume test keeps the
real sampler and only rewrites some first turns into calls, so the seeds still decide everything.
"""

from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import DEMO_DATA, SMOLLM2, dequantized_smollm2, interrupted_after, run_cli

from rlkit.data.templates import shipped_template
from rlkit.training.plots import select_panels

PROMPTS = DEMO_DATA / "grpo_prompts.jsonl"
TOOL_TURN = "<|im_start|>tool"
ADD_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
END = "<|im_end|></s>"  # how chatml-tools ends a turn with the tiny tokenizer's EOS (</s>)


def add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def script_generate(monkeypatch, tokenizer, turns: list[str], by_row=None) -> None:
    """Every `generate` call answers each row with `turns[k]` (or `by_row(text, k)`), k being how many
    tool turns the row's ids already hold, encoded as the model would have sampled it, right-padded."""
    from transformers import LlamaForCausalLM

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **kwargs):
        rows = []
        for row, seen in zip(input_ids.tolist(), attention_mask.bool().tolist()):
            text = tokenizer.decode([t for t, s in zip(row, seen) if s])  # what the mask lets a model see
            k = text.count(TOOL_TURN)
            reply = by_row(text, k) if by_row else turns[min(k, len(turns) - 1)]
            rows.append(tokenizer(reply, add_special_tokens=False)["input_ids"][:max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    monkeypatch.setattr(LlamaForCausalLM, "generate", generate)


def _inputs(model_dir: Path, conversations, functions):
    """What `sample_episodes` reads, for the tiny model with chatml-tools and `functions` as tools."""
    from accelerate import Accelerator

    from rlkit.agents.setup import Agents
    from rlkit.agents.toolset import tools_of
    from rlkit.data.prompts import PromptRows
    from rlkit.data.templates import resolve_template
    from rlkit.models.load import load_causal_lm, load_tokenizer, resolve_source
    from rlkit.recipes.ppo import PolicyValue
    from rlkit.training.rollout import RolloutInputs

    source = resolve_source(str(model_dir))
    tok = load_tokenizer(source)
    template = resolve_template("chatml-tools", tok)
    agents = Agents(tools_of(functions), None, template, None, 5.0)
    prompts = PromptRows(conversations, [{"answer": 7} for _ in conversations], True)
    _, encoded = agents.encode_prompts(tok, prompts, 10_000)
    run = SimpleNamespace(accelerator=Accelerator(cpu=True), run_dir=None)
    wrapper = PolicyValue(load_causal_lm(source).eval(), None, None)
    return RolloutInputs(run.accelerator, tok, prompts, encoded, run), wrapper, agents


def _sampling(max_new_tokens=64, chunk=2, seed=None):
    from rlkit.training.rollout import RolloutSampling

    return RolloutSampling(max_new_tokens, 1.0, 1.0, None, chunk=chunk, shared_prompts=True, seed=seed)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


USER_MODULE = "grpo_tools_user"


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """A user's tools, rewards and environments importable as `grpo_tools_user:NAME` from the working
    directory, and `tools.jinja`: chatml-tools without its prose (the tiny tokenizer spends a token
    per character or two, and the tiny model has 1024 positions)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / f"{USER_MODULE}.py").write_text(USER_SOURCE)
    source = shipped_template("chatml-tools")
    start, end = source.index("{{- '# Tools"), source.index("{%- endif -%}", source.index("{{- '# Tools"))
    compact = (
        "{{- '# Tools\\n<tools>' -}}{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
        "{{- '\\n</tools><|im_end|>\\n' -}}\n"
    )
    (tmp_path / "tools.jinja").write_text(source[:start] + compact + source[end:])
    yield tmp_path
    sys.modules.pop(USER_MODULE, None)


USER_SOURCE = textwrap.dedent(
    '''
    import sys, time

    def act(m: str) -> str:
        """Acts.

        Args:
            m: How.
        """
        if m == "boom":
            raise ValueError("boom")
        if m == "slow":
            time.sleep(3)
        if m == "chatty":
            print("tool says hi")
            return "read " + repr(sys.stdin.read())
        return m

    def add(a: int, b: int) -> int:
        """Adds.

        Args:
            a: One.
            b: Two.
        """
        return a + b

    def says_seven(completions, **kwargs):
        return [1.0 if "It is 7" in c else 0.0 for c in completions]

    class Broken:
        def reset(self, **row):
            raise ValueError("no task here")

        def get_reward(self):
            return 0.0

    class Guess:
        """The episode's task is the row's `answer`; the reward says whether add() found it."""

        def reset(self, answer, **row):
            self.answer, self.found = answer, False
            return " (use add)"

        def add(self, a: int, b: int) -> int:
            """Adds.

            Args:
                a: One.
                b: Two.
            """
            self.found = a + b == self.answer
            return a + b

        def get_reward(self):
            return float(self.found)
    '''
)


def _grpo(model_dir: Path, out: Path, *options: str) -> list[str]:
    """`rlkit grpo` on the tiny model with the compact tools template and a small rollout."""
    return [
        "grpo", str(model_dir), str(PROMPTS), "-o", str(out), "--template", "tools.jinja", "--max-steps", "1",
        "--batch-size", "4", "--grad-accum", "2", "--num-generations", "4", "--precision", "fp32",
        "--sample-every", "1", "--num-samples", "8", *options,
    ]  # fmt: skip


# ---- the episode stage ---------------------------------------------------------------------------


def test_a_two_round_episode_is_token_exact_and_masked_against_a_hand_built_transcript(tiny_model_dir, monkeypatch):
    from rlkit.agents.transcript import prompt_ids
    from rlkit.training.episodes import sample_episodes

    conversations = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Say seven."}]]
    inputs, wrapper, agents = _inputs(tiny_model_dir, conversations, [add])
    tok = inputs.tokenizer

    def by_row(text, k):  # row 0: two rounds (a call, then two calls), then the answer; row 1 answers at once
        if "Say seven" in text:
            return "Seven." + END
        return [ADD_CALL + END, "Both.\n" + ADD_CALL + "\n" + ADD_CALL + END, "It is 7." + END][min(k, 2)]

    script_generate(monkeypatch, tok, [], by_row)
    samples = sample_episodes(inputs, wrapper, [0, 1], 0, _sampling(400), agents)

    tool_turn = "\n<|im_start|>tool\n7<|im_end|>\n"
    sampled = [ADD_CALL + END, "Both.\n" + ADD_CALL + "\n" + ADD_CALL + END, "It is 7." + END]
    appended = [tool_turn + "<|im_start|>assistant\n", tool_turn + tool_turn[1:] + "<|im_start|>assistant\n"]
    pieces = [(sampled[0], 1), (appended[0], 0), (sampled[1], 1), (appended[1], 0), (sampled[2], 1)]
    ids = [i for text, _ in pieces for i in _ids(tok, text)]
    mask = [m for text, m in pieces for _ in _ids(tok, text)]
    # the hand-built transcript, token for token: the prompt (with the tools shown), then the episode
    assert samples.query_ids[0][samples.query_mask[0].bool()].tolist() == prompt_ids(
        tok, agents.template, conversations[0], agents.schemas
    )
    assert tok.decode(ids) == "".join(text for text, _ in pieces)
    width = samples.responses.shape[1]
    assert width == len(ids)
    assert samples.responses[0].tolist() == ids and samples.response_mask[0].tolist() == mask
    short = _ids(tok, "Seven." + END)
    assert samples.responses[1].tolist() == short + [tok.pad_token_id] * (width - len(short))
    assert samples.response_mask[1].tolist() == [1] * len(short) + [0] * (width - len(short))
    assert samples.completion_ids == [ids, short]  # TRL's multi-turn completion_ids: tool tokens included
    assert samples.has_eos.tolist() == [True, True] and samples.turns == [3, 1]
    assert samples.completions[0] == (
        '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>\n[tool add] 7\n'
        'Both.\n<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>\n[tool add] 7\n[tool add] 7\n'
        "It is 7."
    )
    assert samples.completions[1] == "Seven."
    assert samples.tool_counts.total("ok", "add") == 3


def test_budget_and_max_turns_end_episodes(tiny_model_dir, monkeypatch):
    from rlkit.training.episodes import sample_episodes

    conversations = [[{"role": "user", "content": "What is 3 + 4?"}]]
    inputs, wrapper, agents = _inputs(tiny_model_dir, conversations, [add])
    tok = inputs.tokenizer
    script_generate(monkeypatch, tok, [ADD_CALL + END])  # calls add forever
    call = len(_ids(tok, ADD_CALL + END))
    stopped = sample_episodes(inputs, wrapper, [0], 0, _sampling(400), replace(agents, max_turns=2))
    assert stopped.turns == [3] and stopped.stopped_by_max_turns == [True] and stopped.has_eos.tolist() == [True]
    assert stopped.tool_counts.calls == 2  # the third turn's call is left unanswered
    # budget: room for the first call and its tool turn, not for the second tool turn
    budget = 2 * call + len(_ids(tok, "\n<|im_start|>tool\n7<|im_end|>\n<|im_start|>assistant\n")) + 1
    cut = sample_episodes(inputs, wrapper, [0], 0, _sampling(budget), agents)
    assert cut.turns == [2] and cut.has_eos.tolist() == [False] and cut.stopped_by_max_turns == [False]
    assert cut.response_mask.sum().item() == 2 * call and cut.responses.shape[1] < budget  # results dropped
    assert cut.completions[0].count("[tool add] 7") == 1
    # the budget ends a turn in its middle
    mid = sample_episodes(inputs, wrapper, [0], 0, _sampling(call - 2), agents)
    assert mid.turns == [1] and mid.has_eos.tolist() == [False] and mid.responses.shape[1] == call - 2


def test_episodes_without_calls_sample_what_sample_samples(tiny_model_dir):
    """Tools shown but never called (the random tiny model writes no <tool_call>): the episode stage's
    first turn is `sample`'s generation, same shared-prompt prefill, same seeds, same tokens."""
    from rlkit.training.episodes import sample_episodes
    from rlkit.training.rollout import sample

    conversations = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Name a color."}]]
    inputs, wrapper, agents = _inputs(tiny_model_dir, conversations, [add])
    how = _sampling(12, chunk=4, seed=lambda step, start: 1234 + step * 10 + start)
    rows = [0, 0, 1, 1, 0, 0, 1, 1]
    single, episodes = sample(inputs, wrapper, rows, 3, how), sample_episodes(inputs, wrapper, rows, 3, how, agents)
    assert episodes.turns == [1] * 8
    width = episodes.responses.shape[1]
    assert torch.equal(single.response_mask[:, :width], episodes.response_mask)
    assert torch.equal(
        single.responses[:, :width] * episodes.response_mask, episodes.responses * episodes.response_mask
    )
    assert single.completion_ids == episodes.completion_ids and single.completions == episodes.completions
    assert torch.equal(single.has_eos, episodes.has_eos)


# ---- the command ---------------------------------------------------------------------------------


def _call(name: str, arguments: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def _summary(out: Path) -> dict:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if "reward/mean" in line][-1]


def test_every_tool_fault_is_answered_and_counted_and_stdout_carries_only_out(
    tiny_model_dir, user_code, tmp_path, monkeypatch
):
    from transformers import AutoTokenizer

    calls = [
        _call("act", {"m": "boom"}),  # raises
        _call("act", {"m": "slow"}),  # runs past --tool-timeout
        _call("act", {"m": "chatty"}),  # prints, reads stdin
        _call("search", {"q": "x"}),  # no such tool
        "<tool_call>{oops}</tool_call>",  # not JSON
    ]
    script_generate(
        monkeypatch, AutoTokenizer.from_pretrained(tiny_model_dir), ["\n".join(calls) + END, "It is 7." + END]
    )
    out = tmp_path / "out"
    options = ["--tools", f"{USER_MODULE}:act", "--tool-timeout", "0.2", "--reward", f"{USER_MODULE}:says_seven"]
    result = run_cli(*_grpo(tiny_model_dir, out, *options, "--max-new-tokens", "700", "--max-length", "1000"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out}\n"  # nothing a tool printed
    assert "tool says hi" in result.stderr
    m = _summary(out)
    per_episode = {"errors": 1, "timeouts": 1, "unknown_tools": 1, "bad_calls": 1}
    assert {k: m[f"tools/{k}"] for k in per_episode} == {k: 8 * v for k, v in per_episode.items()}
    assert m["tools/calls"] == 40 and m["tools/call_frequency"] == 5 and m["tools/failure_frequency"] == 0.8
    assert m["tools/act/calls"] == 24 and m["tools/act/call_frequency"] == 3 and m["tools/act/timeouts"] == 8
    assert m["tools/turns/mean"] == 2 and m["tools/frac_stopped_by_max_turns"] == 0
    assert m["rewards/says_seven/mean"] == 1 and m["frac_truncated"] == 0
    panels = {p.title: p.labels for p in select_panels(m)}  # the curves draw them
    assert panels["tool calls per episode"] == ("tools/call_frequency", "act")
    assert "model turns per episode" in panels and "tool failures, max-turns stops (fraction)" in panels
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    transcript = rows[0]["completion"]
    for line in (
        "[tool act] {'error': 'boom'}",
        "[tool act] {'error': 'Tool act timed out after 0.2 seconds.'}",
        "[tool act] read ''",
        "[tool search] {'error': 'Tool search not found.'}",
        "[tool] {'error': 'the tool call is not valid JSON",
    ):
        assert line in transcript, transcript
    assert transcript.endswith("\nIt is 7.")
    card = (out / "README.md").read_text()
    assert f"`{USER_MODULE}:act`" in card and "tool rounds" in card


def test_an_environment_resets_per_episode_and_scores_it_with_get_reward(
    tiny_model_dir, user_code, tmp_path, monkeypatch
):
    from transformers import AutoTokenizer

    script_generate(monkeypatch, AutoTokenizer.from_pretrained(tiny_model_dir), [ADD_CALL + END, "It is 7." + END])
    out = tmp_path / "out"
    result = run_cli(
        *_grpo(tiny_model_dir, out, "--env", f"{USER_MODULE}:Guess", "--max-new-tokens", "200", "--max-length", "600")
    )
    assert result.returncode == 0, result.stderr
    m = _summary(out)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(row["prompt"].endswith(" (use add)") for row in rows)  # reset's text, appended to the prompt
    answers = {r["prompt"]: r["answer"] for r in map(json.loads, PROMPTS.read_text().splitlines())}
    # add(3, 4) found the task's answer exactly where it was 7
    assert [row["Guess"] for row in rows] == [float(answers[row["prompt"][: -len(" (use add)")]] == 7) for row in rows]
    assert m["tools/add/calls"] == 8 and "rewards/Guess/mean" in m
    assert f"`{USER_MODULE}:Guess.get_reward` (weight 1)" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "options,code,expected",
    [
        (["--env", f"{USER_MODULE}:Broken"], 1, ["Broken.reset() for row", "ValueError('no task here')"]),
        (["--tools", f"{USER_MODULE}:act", "--template", "chatml"], 2, ["does not render tool schemas"]),
        (["--tools", f"{USER_MODULE}:nope"], 2, [f"--tools {USER_MODULE}:nope", "no function 'nope'"]),
        (["--env", f"{USER_MODULE}:add"], 2, ["not a class"]),
        (["--max-turns", "2"], 2, ["--max-turns 2", "--tools or --env"]),
    ],
)
def test_bad_tools_and_environments_end_in_one_line(
    tiny_model_dir, user_code, tmp_path, monkeypatch, options, code, expected
):
    """Exit 2 before any weights load for what the options say; exit 1 for an environment that fails
    while the run runs (its reset raises), naming the row and the class."""
    import rlkit.training.run as run_module

    if code == 2:

        def no_weights(*args, **kwargs):
            raise AssertionError("weights loaded before the options were refused")

        monkeypatch.setattr(run_module.TrainingRun, "load_policy", no_weights)
    out = tmp_path / "out"
    result = run_cli(*_grpo(tiny_model_dir, out, "--reward", f"{USER_MODULE}:says_seven", *options))
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(e in lines[0] for e in expected), result.stderr
    assert result.stdout == "" and not out.exists()


def test_resume_with_tools_is_bit_identical(tiny_model_dir, user_code, tmp_path, monkeypatch):
    """The real sampler, seeded per chunk and turn; a first turn whose first sampled token is even is
    rewritten into a call of add (so episodes of one and of two turns mix, decided by the seeds)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    from rlkit.recipes.grpo import run_grpo
    from rlkit.recipes.grpo_config import GRPOConfig

    tok, real = AutoTokenizer.from_pretrained(tiny_model_dir), LlamaForCausalLM.generate
    call = tok(ADD_CALL + END, add_special_tokens=False)["input_ids"]
    first_turns = []

    def generate(self, input_ids, **kwargs):
        out = real(self, input_ids=input_ids, **kwargs)
        rows = []
        for prompt, new in zip(input_ids.tolist(), out[:, input_ids.shape[1] :].tolist()):
            if TOOL_TURN not in tok.decode(prompt):
                first_turns.append(new[0] % 2 == 0)
                new = call if new[0] % 2 == 0 else new
            rows.append(new)
        width = max(map(len, rows))
        padded = [r + [kwargs["pad_token_id"]] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(padded, device=input_ids.device)], dim=1)

    monkeypatch.setattr(LlamaForCausalLM, "generate", generate)

    def config(out: Path, **overrides) -> GRPOConfig:
        return GRPOConfig(
            model=str(tiny_model_dir), data=[str(PROMPTS)], output=str(out), reward=[f"{USER_MODULE}:says_seven"],
            tools=[f"{USER_MODULE}:add"], template="tools.jinja", max_steps=3, save_every=1, batch_size=4,
            grad_accum=2, num_generations=4, max_new_tokens=96, max_length=400, sample_every=0, precision="fp32",
            log_every=100, lr=1e-2, lora=False, num_iterations=2, beta=0.1, **overrides,
        )  # fmt: skip

    whole = tmp_path / "whole"
    run_grpo(config(whole))
    assert any(first_turns) and not all(first_turns)  # both kinds of episode ran
    assert _summary(whole)["tools/calls"] > 0

    out = tmp_path / "resumed"
    interrupted_after(monkeypatch, run_grpo, config(out), "step-0000002", 2)
    run_grpo(config(out, resume=True))

    expected, got = load_file(str(whole / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(expected[name], got[name]) for name in expected)

    def steady(d: Path) -> list[dict]:  # timings differ run to run; nothing else may
        records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in m.items() if "time" not in k and "per_s" not in k} for m in records]

    assert steady(whole) == steady(out)


SCRIPTED_FIRST_TURNS = textwrap.dedent(
    '''
    """Imported by --tools in every process: the real sampler, with each first turn whose first sampled
    token is even rewritten into a call of add (what the seeds sampled decides which)."""
    import os

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    _tok = AutoTokenizer.from_pretrained(os.environ["SCRIPTED_MODEL"])
    _call = _tok(%r, add_special_tokens=False)["input_ids"]
    _real = LlamaForCausalLM.generate


    def _generate(self, input_ids, **kwargs):
        out = _real(self, input_ids=input_ids, **kwargs)
        rows = []
        for prompt, new in zip(input_ids.tolist(), out[:, input_ids.shape[1] :].tolist()):
            first = "<|im_start|>tool" not in _tok.decode(prompt)
            rows.append(_call if first and new[0] %% 2 == 0 else new)
        width = max(map(len, rows))
        padded = [r + [kwargs["pad_token_id"]] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(padded, device=input_ids.device)], dim=1)


    LlamaForCausalLM.generate = _generate


    def add(a: int, b: int) -> int:
        """Adds.

        Args:
            a: One.
            b: Two.
        """
        return a + b
    '''
    % (ADD_CALL + END)
)


def test_two_processes_log_what_one_process_logs_with_tools(tiny_model_dir, user_code, tmp_path):
    """Episodes of one and two turns, their later turns batched by chunk: split over two gloo
    processes, the same rollouts, tool counts and losses as one process with the same global batch."""
    import os
    import socket
    import subprocess
    import sys

    (tmp_path / "scripted_first_turns.py").write_text(SCRIPTED_FIRST_TURNS)
    common = [
        "grpo", str(tiny_model_dir), str(PROMPTS), "--template", "tools.jinja", "--tools", "scripted_first_turns:add",
        "--reward", f"{USER_MODULE}:says_seven", "--max-steps", "2", "--batch-size", "2",
        "--generation-batch-size", "4", "--num-generations", "4", "--max-new-tokens", "96", "--max-length", "400",
        "--sample-every", "0", "--beta", "0.1", "--num-iterations", "2", "--lr", "1e-2", "--full", "--precision", "fp32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCRIPTED_MODEL": str(tiny_model_dir), "PYTHONPATH": str(tmp_path)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = {
        "one": [sys.executable, "-m", "rlkit", *common, "--grad-accum", "4"],
        "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "-m", "rlkit", *common, "--grad-accum", "2"],
    }  # fmt: skip
    for name, command in runs.items():
        result = subprocess.run(
            [*command, "-o", str(tmp_path / name)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
    a, b = (
        [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in runs
    )
    assert len(a) == len(b) == 4
    assert sum(m.get("tools/calls", 0) for m in a) > 0 and any(m.get("tools/turns/min") == 1 for m in a)
    for x, y in zip(a, b):
        for key in (
            "loss",
            "kl",
            "reward/mean",
            "advantage/std",
            "tools/calls",
            "tools/turns/mean",
            "completion_length/mean",
        ):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)


ANSWER_LETTERS = textwrap.dedent(
    '''

    def answer_letters(completions, **kwargs):
        """The share of ASCII letters and spaces in what the policy wrote after the tool's result (all
        of it where it made no call)."""
        scores = []
        for c in completions:
            text = c.rsplit("[tool add]", 1)[-1].split("\\n", 1)[-1] if "[tool add]" in c else c
            scores.append(sum(ch.isascii() and (ch.isalpha() or ch == " ") for ch in text) / max(len(text), 1))
        return scores
    '''
)


def test_the_reward_rises_through_tool_episodes(tiny_model_dir, user_code, tmp_path):
    """Training through multi-turn episodes: some first turns are a scripted call of add (the real
    sampler, rewritten as the seeds decide), the tool turn is appended with mask 0, the policy goes on
    after it; a rule-based reward on what the policy wrote after the tool's result (the share of
    letters, as test_grpo's efficacy test) rises within 20 steps, with tool calls made throughout."""
    import os
    import subprocess
    import sys

    tests = Path(__file__).parent
    (tmp_path / "scripted_first_turns.py").write_text(SCRIPTED_FIRST_TURNS + ANSWER_LETTERS)
    out = tmp_path / "rises"
    command = [
        sys.executable, "-m", "rlkit", "grpo", str(tiny_model_dir), str(PROMPTS), "-o", str(out),
        "--template", "tools.jinja", "--tools", "scripted_first_turns:add", "--max-turns", "1",
        "--reward", "scripted_first_turns:answer_letters", "--max-steps", "20", "--batch-size", "8", "--grad-accum", "2",
        "--num-generations", "8", "--max-new-tokens", "128", "--max-length", "600", "--sample-every", "0",
        "--lr", "1e-2", "--full", "--precision", "fp32",
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SCRIPTED_MODEL": str(tiny_model_dir),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(tests)]),
    }
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summaries = [m for m in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()) if "reward/mean" in m]  # fmt: skip
    rewards = [m["reward/mean"] for m in summaries]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.05, rewards
    assert all(m["tools/calls"] > 0 for m in summaries[:5]), [m["tools/calls"] for m in summaries]


def _right_answers(model: Path, out: Path) -> list[bool]:
    """Whether each greedy answer to the held-out sums, the calculator offered, is formatted and right."""
    from rlkit.demo import task

    result = run_cli(
        "eval", str(model), "--prompts", str(DEMO_DATA / "eval_arithmetic.jsonl"), "--reward",
        "rlkit.demo.task:reward", "--tools", "rlkit.demo.tools:calculator", "--max-turns", "2",
        "--max-new-tokens", "64", "--batch-size", "48", "--output-dir", str(out), timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    examples = json.loads((out / "report.json").read_text())["examples"]
    values = task.target_values([e["prompt"] for e in examples], [e["completion"] for e in examples])
    return [bool(v) for v in values["right answer"]]


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_file(), reason="needs the demo model (`make demo-model`)")
def test_efficacy_smollm2_learns_to_use_the_calculator(tmp_path):
    """SmolLM2-135M, SFT on sft_tools.jsonl (the calculator offered wherever there is arithmetic, called
    in half those answers), then GRPO with the calculator and the demo's calculator_reward, as the
    demo's stages run them: right answers to the 47 held-out sums rise to at least 80%, with a 95%
    interval that excludes zero."""
    from rlkit.demo.report import newcombe_paired

    base = dequantized_smollm2(tmp_path / "base")
    sft, grpo = tmp_path / "sft", tmp_path / "grpo"
    result = run_cli(
        "sft", str(base), str(DEMO_DATA / "sft_tools.jsonl"), "-o", str(sft), "--template", "smollm2-tools",
        "--max-length", "384", "--max-steps", "16", "--batch-size", "4", "--lr", "5e-4", "--warmup-steps", "2",
        timeout=3600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    before = _right_answers(sft, tmp_path / "eval-sft")
    result = run_cli(
        "grpo", str(sft), str(PROMPTS), "-o", str(grpo), "--reward", "rlkit.demo.task:calculator_reward",
        "--tools", "rlkit.demo.tools:calculator", "--max-turns", "2", "--max-length", "384", "--max-steps", "6",
        "--batch-size", "32", "--num-generations", "8", "--max-new-tokens", "64", "--temperature", "0.5",
        "--lr", "3e-4", timeout=3600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    after = _right_answers(grpo, tmp_path / "eval-grpo")
    change = newcombe_paired(before, after)
    assert change.after >= 0.8 and change.low > 0, change
