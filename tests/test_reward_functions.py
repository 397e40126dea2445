"""Reward functions: called the way TRL's GRPOTrainer calls them, and never ending rlkit uncleanly.

The calling rule (`rlkit.scoring.FunctionReward`) is tested in process on the functions below;
the CLI runs check what only a process shows: the exit code, the one `error:` line, stdout
holding only OUT's path, OUT absent after a failure, the checkpoint a failed run names.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import DEMO_DATA, run_cli, write_jsonl

from rlkit.errors import RunError
from rlkit.scoring import FunctionReward, RewardBatch

TESTS = Path(__file__).parent
THIS = "test_reward_functions"
CHAT = [[{"role": "user", "content": "What is 2 + 2?"}], [{"role": "user", "content": "Name a river."}]]


# ---- functions as users write them ----------------------------------------------------------


def accuracy_reward(completions, solution, **kwargs):
    """TRL's accuracy_reward shape: conversational completions, the `solution` column."""
    return [float(c[0]["content"].strip() == s) for c, s in zip(completions, solution)]


def think_format_reward(completions, **kwargs):
    """TRL's think_format_reward shape: reads completion[0]["content"]."""
    return [1.0 if re.match(r"^<think>.*?</think>", c[0]["content"], re.S) else 0.0 for c in completions]


def repetition(completion_ids, **kwargs):
    """trl.rewards' repetition / overlong penalties take only the token ids."""
    return [-float(len(ids) - len(set(ids))) for ids in completion_ids]


SEEN: list[dict] = []


def everything(prompts, completions, completion_ids, **kwargs):
    SEEN.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs})
    return [1.0] * len(completions)


def rlkit_form(prompts, completions):
    return [float(len(p) + len(c)) for p, c in zip(prompts, completions)]


def rlkit_with_answer(prompts, completions, answer, **_):
    return [float(c == str(a)) for c, a in zip(completions, answer)]


def odd_names(p, c, /):
    return [float(len(x) + 10 * len(y)) for x, y in zip(p, c)]


def odd_names_keywordable(p, c):
    return [float(len(y)) for y in c]


def maybe(completions, **kwargs):
    return [None if c == "?" else 1.0 for c in completions]


def exits(completions, **kwargs):
    sys.exit(3)


def interrupts(completions, **kwargs):
    raise KeyboardInterrupt


class Custom(BaseException):
    pass


def custom(completions, **kwargs):
    raise Custom("odd")


def noisy(completions, **kwargs):
    print("junk")
    return [0.0] * len(completions)


def ctrl_c(completions, **kwargs):
    """A Ctrl-C that arrives while the function runs (a real signal, not the code's own raise)."""
    signal.raise_signal(signal.SIGINT)
    return [0.0] * len(completions)


@pytest.fixture
def load(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    return lambda name: FunctionReward(f"{THIS}:{name}")


# ---- the calling rule -------------------------------------------------------------------------


def test_trl_signatures_on_conversational_prompts(load):
    batch = RewardBatch(CHAT, ["4", "<think>hm</think> Nile"], True, [[5, 6, 6, 1], [7, 8]], {"solution": ["4", "x"]})
    assert load("accuracy_reward").score(batch) == [1.0, 0.0]
    assert load("think_format_reward").score(batch) == [0.0, 1.0]
    assert load("repetition").score(batch) == [-1.0, 0.0]
    SEEN.clear()
    load("everything").score(batch)
    (seen,) = SEEN
    assert seen["prompts"] == CHAT  # the message lists
    assert seen["completions"] == [
        [{"role": "assistant", "content": "4"}],
        [{"role": "assistant", "content": "<think>hm</think> Nile"}],
    ]
    assert seen["completion_ids"] == [[5, 6, 6, 1], [7, 8]] and seen["solution"] == ["4", "x"]
    assert sorted(seen) == ["completion_ids", "completions", "prompts", "solution"]  # no trainer_state & co.


def test_string_prompts_give_strings(load):
    batch = RewardBatch(CHAT, ["4", "Nile"], False, [[1], [2]], {"answer": [4, 5]})
    SEEN.clear()
    load("everything").score(batch)
    assert SEEN[0]["prompts"] == ["What is 2 + 2?", "Name a river."] and SEEN[0]["completions"] == ["4", "Nile"]
    # rlkit's documented forms keep working (the demo's rewards take string prompts)
    assert load("rlkit_form").score(batch) == [15.0, 17.0]
    assert load("rlkit_with_answer").score(batch) == [1.0, 0.0]
    # no parameter named like TRL's and no **kwargs: (prompts, completions) positionally
    assert load("odd_names").score(batch) == [24.0, 53.0]
    assert load("odd_names_keywordable").score(batch) == [1.0, 4.0]
    assert load("odd_names")(CHAT, ["4", "Nile"]) == [24.0, 53.0]  # the plain Reward call


def test_demo_rewards_get_strings(monkeypatch):
    from rlkit.data.prompts import load_prompt_rows

    rows = load_prompt_rows([str(DEMO_DATA / "grpo_prompts.jsonl")], None)
    assert not rows.conversational
    batch = RewardBatch(rows.conversations[:2], ["18", "no"], False, None, rows.keyword_columns([0, 1]))
    for name in ("reward", "equation_reward", "arithmetic_reward"):
        scores = FunctionReward(f"rlkit.demo.task:{name}").score(batch)
        assert len(scores) == 2 and all(isinstance(s, float) for s in scores)


def test_prompt_style_is_carried_from_the_data(tmp_path):
    from rlkit.data.prompts import load_prompt_rows
    from rlkit.evaluation.data import read_completions

    strings = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "hi", "solution": "1"}])
    chats = write_jsonl(tmp_path / "c.jsonl", [{"prompt": CHAT[0], "solution": "1"}])
    messages = write_jsonl(
        tmp_path / "m.jsonl", [{"messages": [*CHAT[0], {"role": "assistant", "content": "4"}], "solution": "1"}]
    )
    assert not load_prompt_rows([str(strings)], None).conversational
    assert load_prompt_rows([str(chats)], None).conversational
    rows = load_prompt_rows([str(messages)], None)
    assert rows.conversational and rows.conversations == [CHAT[0]] and rows.columns == [{"solution": "1"}]
    done = write_jsonl(tmp_path / "d.jsonl", [{"prompt": CHAT[0], "completion": "4", "solution": "4"}])
    _, prompts, completions = read_completions(str(done), None, 0)
    assert prompts.conversational and prompts.keyword_columns([0]) == {"solution": ["4"]} and completions == ["4"]


def test_none_scores_and_what_is_missing(load):
    batch = RewardBatch(CHAT, ["?", "x"])
    assert load("maybe").score(batch, allow_none=True) == [None, 1.0]  # grpo: no opinion
    with pytest.raises(RunError, match="returned non-numbers"):
        load("maybe").score(batch)  # ppo and eval need a number
    with pytest.raises(RunError, match=rf"--reward {THIS}:accuracy_reward needs solution, which nothing passes"):
        load("accuracy_reward").score(batch)
    with pytest.raises(RunError, match="needs completion_ids"):  # eval --completions samples no ids
        load("repetition").score(batch)


@pytest.mark.parametrize(
    ("name", "shown"),
    [("exits", "SystemExit(3)"), ("interrupts", "KeyboardInterrupt()"), ("custom", "Custom('odd')")],
)
def test_whatever_a_function_raises_is_one_run_error(load, name, shown):
    with pytest.raises(RunError) as caught:
        load(name).score(RewardBatch(CHAT, ["a", "b"]))
    message = str(caught.value)
    assert message.startswith(f"--reward {THIS}:{name} raised {shown} at ") and "test_reward_functions.py:" in message
    assert "\n" not in message


def test_a_real_ctrl_c_is_not_the_functions_fault(load):
    from rlkit.training.engine import _StopRequest

    reward = load("ctrl_c")
    # Python's own handler, as a terminal gives it: a job started in the background with `&` (nohup, a
    # CI runner's shell) inherits SIGINT ignored, and _StopRequest rightly restores what it found
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # during training the first Ctrl-C only asks the engine to checkpoint and stop: the call completes
        with _StopRequest() as stop:
            assert reward.score(RewardBatch(CHAT, ["a", "b"])) == [0.0, 0.0]
            assert stop.requested
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # a second one interrupts
        # with Python's handler (eval; a second Ctrl-C in training) it interrupts, as a KeyboardInterrupt
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            reward.score(RewardBatch(CHAT, ["a", "b"]))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_what_a_function_prints_goes_to_stderr(load, capsys):
    load("noisy").score(RewardBatch(CHAT, ["a", "b"]))
    captured = capsys.readouterr()
    assert captured.out == "" and "junk" in captured.err


# ---- CLI runs -------------------------------------------------------------------------------

REWARDS = """
import json, os, sys

def accuracy_reward(completions, solution, **kwargs):
    with open("seen.jsonl", "a") as f:
        f.write(json.dumps({"completions": completions, "ids": kwargs["completion_ids"], "prompts": kwargs["prompts"]}) + "\\n")
    return [float(c[0]["content"].strip() == s) for c, s in zip(completions, solution)]

def repetition(completion_ids, **kwargs):
    return [-float(len(ids) - len(set(ids))) for ids in completion_ids]

def solved(completions, solution, **kwargs):
    print("junk")  # not on eval's stdout, which is JSON
    return [float(c[0]["content"] == s) for c, s in zip(completions, solution)]

CALLS = []

def second_call_fails(completions, **kwargs):
    CALLS.append(1)
    if len(CALLS) == 2 and not os.environ.get("FIXED"):
        sys.exit(3)
    return [float(len(c[0]["content"])) for c in completions]
"""

FAST = ("--batch-size", "4", "--num-generations", "2", "--max-new-tokens", "8", "--precision", "fp32")


def _setup(tmp_path: Path) -> Path:
    """The reward module and conversational prompts with a `solution` column, in tmp_path (the cwd)."""
    (tmp_path / "rewards_mod.py").write_text(textwrap.dedent(REWARDS))
    prompts = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "solution": str(i + 1)} for i in range(8)]
    return write_jsonl(tmp_path / "prompts.jsonl", prompts)


def _grpo(model: Path, data: Path, out: Path, *rewards: str, extra: tuple[str, ...] = (), env=None):
    """A tiny grpo run in the data's dir; `rewards_mod:` names the module written there, `THIS:` this file's."""
    flags = [a for r in rewards for a in ("--reward", r)]
    return run_cli(
        "grpo", str(model), str(data), "-o", str(out), *flags, *FAST, *extra,
        cwd=data.parent, env={"PYTHONPATH": str(TESTS), **(env or {})},
    )  # fmt: skip


def _one_error(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


def test_trl_reward_functions_train_a_grpo_run(tiny_model_dir, tmp_path):
    data = _setup(tmp_path)
    out = tmp_path / "out"
    result = _grpo(
        tiny_model_dir, data, out, "rewards_mod:accuracy_reward", "rewards_mod:repetition", extra=("--max-steps", "1")
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out}\n" and (out / "adapter_config.json").is_file()
    (seen,) = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert all(c[0]["role"] == "assistant" for c in seen["completions"])
    assert all(p[0]["content"].startswith("What is") for p in seen["prompts"])
    assert len(seen["ids"]) == 4 and all(1 <= len(ids) <= 8 for ids in seen["ids"])


@pytest.mark.parametrize(
    ("function", "shown"),
    [("exits", "SystemExit(3)"), ("interrupts", "KeyboardInterrupt()"), ("custom", "Custom('odd')")],
)
def test_a_reward_that_exits_or_raises_ends_the_run_with_one_line(tiny_model_dir, tmp_path, function, shown):
    data = _setup(tmp_path)
    out = tmp_path / "out"
    result = _grpo(tiny_model_dir, data, out, f"{THIS}:{function}", extra=("--max-steps", "1"))
    assert result.returncode == 1, result.stderr
    line = _one_error(result.stderr)
    assert f"--reward {THIS}:{function} raised {shown} at " in line and f"{THIS}.py:" in line, line
    assert result.stdout == "" and not out.exists()


def test_a_reward_that_prints_leaves_stdout_to_the_output_path(tiny_model_dir, tmp_path):
    data = _setup(tmp_path)
    out = tmp_path / "out"
    result = _grpo(tiny_model_dir, data, out, f"{THIS}:noisy", extra=("--max-steps", "1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out}\n" and "junk" in result.stderr


def test_a_failure_names_the_last_checkpoint_and_resume_goes_on(tiny_model_dir, tmp_path):
    data = _setup(tmp_path)
    out = tmp_path / "out"
    steps = ("--max-steps", "2", "--save-every", "1")
    result = _grpo(tiny_model_dir, data, out, "rewards_mod:second_call_fails", extra=steps)
    assert result.returncode == 1, result.stderr
    line = _one_error(result.stderr)
    checkpoint = Path(f"{out}.partial") / "checkpoints" / "step-0000001"
    assert (
        "second_call_fails raised SystemExit(3)" in line
        and f"run again with --resume (the last complete checkpoint is {checkpoint})" in line
    ), line
    assert checkpoint.is_dir() and not out.exists()
    resumed = _grpo(
        tiny_model_dir, data, out, "rewards_mod:second_call_fails", extra=(*steps, "--resume"), env={"FIXED": "1"}
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and resumed.stdout == f"{out}\n"


def test_eval_calls_a_trl_reward_the_same_way(tmp_path):
    _setup(tmp_path)
    done = write_jsonl(
        tmp_path / "done.jsonl",
        [
            {"prompt": CHAT[0], "completion": "4", "solution": "4"},
            {"prompt": CHAT[1], "completion": "x", "solution": "y"},
        ],
    )
    result = run_cli("eval", "--completions", str(done), "--reward", "rewards_mod:solved", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["score_mean"] == 0.5
    # --completions has no token ids: a function that needs them is refused with one line
    result = run_cli("eval", "--completions", str(done), "--reward", "rewards_mod:repetition", cwd=tmp_path)
    assert result.returncode == 1 and "needs completion_ids" in _one_error(result.stderr)
