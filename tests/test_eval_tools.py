"""`rlkit eval --prompts --reward --tools`: episodes as grpo's, scored as grpo scores them, tool metrics.

The model is scripted as in test_grpo_tools (its tools module, compact template and
`script_generate` are shared): a question's first turn calls the calculator with the question's
expression, the next states the tool's result; other prompts are answered at once.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run_cli, write_jsonl
from test_chat_tools import FAULTS
from test_grpo_tools import END, USER_MODULE, _call, script_generate, user_code  # noqa: F401 (the fixture, used below)

from rlkit.models.load import load_tokenizer, resolve_source

PROMPTS = [
    {"prompt": "What is 3 + 4?", "answer": 7},
    {"prompt": "What is 6 * 7?", "answer": 42},
    {"prompt": "Say hi.", "answer": 0},
]
LENGTHS = '''

def lengths(completions, completion_ids, **kwargs):
    """The ids a reward function gets: every id after the prompt, tool turns included."""
    return [float(len(ids)) for ids in completion_ids]
'''


pytestmark = pytest.mark.usefixtures("user_code")  # the tools module and the compact template, in the cwd


def calculating(text: str, k: int) -> str:
    """The scripted model: a question -> a calculator call, then the last tool result as the answer."""
    question = re.search(r"What is (.+?)\?", text)
    if question is None:
        return "hi" + END
    if k == 0:
        return _call("calculator", {"expression": question[1]}) + END
    result = re.findall(r"<\|im_start\|>tool\n(.*?)<\|im_end\|>", text)[-1]
    return f"The answer is {result}." + END


def _eval(model_dir, tmp_path, *options: str, prompts=PROMPTS):
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    return run_cli(
        "eval", str(model_dir), "--prompts", str(data), "--template", "tools.jinja", "--max-new-tokens", "200",
        "--tools", "rlkit.demo.tools:calculator", "--output-dir", str(tmp_path / "report"), *options,
    )  # fmt: skip


def _tokenizer(model_dir):
    return load_tokenizer(resolve_source(str(model_dir)))


def test_episodes_are_scored_on_the_transcript_and_the_report_has_tool_metrics(tiny_model_dir, tmp_path, monkeypatch):
    script_generate(monkeypatch, _tokenizer(tiny_model_dir), [], calculating)
    result = _eval(tiny_model_dir, tmp_path, "--reward", "rlkit.demo.task:arithmetic_reward")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)  # ONE JSON object on stdout
    assert metrics["score_mean"] == pytest.approx(2 / 3)  # both sums right through the calculator; "hi" is not 0
    assert metrics["tools/calls"] == 2 and metrics["tools/call_frequency"] == pytest.approx(2 / 3)
    assert metrics["tools/calculator/calls"] == 2 and metrics["tools/failure_frequency"] == 0
    assert metrics["tools/errors"] == metrics["tools/timeouts"] == 0
    assert metrics["tools/turns/mean"] == pytest.approx(5 / 3) and metrics["tools/turns/max"] == 2
    assert metrics["settings"]["tools"] == ["rlkit.demo.tools:calculator"]
    assert not any(key.startswith("time/") for key in metrics)
    examples = json.loads((tmp_path / "report" / "report.json").read_text())["examples"]
    call = _call("calculator", {"expression": "3 + 4"})
    assert examples[0]["completion"] == f"{call}\n[tool calculator] 7\nThe answer is 7."
    assert examples[0]["turns"] == 2 and examples[2]["turns"] == 1
    assert examples[0]["messages"][1:] == [
        {"role": "tool", "name": "calculator", "content": "7"},
        {"role": "assistant", "content": "The answer is 7."},
    ]
    assert [e["score"] for e in examples] == [1.0, 1.0, 0.0]


def test_reward_functions_get_grpos_completion_ids(tiny_model_dir, tmp_path, monkeypatch):
    """`completion_ids` are the whole episode after the prompt (TRL's multi-turn convention), the
    model's ids as sampled and the tool turn's as the template renders it."""
    tokenizer = _tokenizer(tiny_model_dir)
    (tmp_path / f"{USER_MODULE}.py").write_text((tmp_path / f"{USER_MODULE}.py").read_text() + LENGTHS)
    script_generate(monkeypatch, tokenizer, [], calculating)
    result = _eval(tiny_model_dir, tmp_path, "--reward", f"{USER_MODULE}:lengths", prompts=PROMPTS[:1])
    assert result.returncode == 0, result.stderr
    example = json.loads((tmp_path / "report" / "report.json").read_text())["examples"][0]
    pieces = [
        _call("calculator", {"expression": "3 + 4"}) + END,
        "\n<|im_start|>tool\n7<|im_end|>\n<|im_start|>assistant\n",
        "The answer is 7." + END,
    ]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in pieces]
    assert example["score"] == example["length_tokens"] == sum(map(len, ids))
    assert json.loads(result.stdout)["tools/appended_tokens/mean"] == len(ids[1])  # mask 0: not the model's


def test_every_fault_is_answered_counted_and_kept_off_stdout(tiny_model_dir, tmp_path, monkeypatch):
    script_generate(monkeypatch, _tokenizer(tiny_model_dir), ["\n".join(FAULTS) + END, "Done." + END])
    result = _eval(
        tiny_model_dir, tmp_path, "--tools", f"{USER_MODULE}:act", "--tool-timeout", "0.2", "--max-new-tokens", "700",
        "--reward", "rlkit.demo.task:arithmetic_reward", prompts=PROMPTS[:1],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1  # the JSON object, nothing the tool printed
    metrics = json.loads(result.stdout)
    assert "tool says hi" in result.stderr
    expected = {"calls": 5, "errors": 1, "timeouts": 1, "unknown_tools": 1, "bad_calls": 1}
    assert {k: metrics[f"tools/{k}"] for k in expected} == expected
    assert metrics["tools/act/timeouts"] == 1 and metrics["tools/failure_frequency"] == pytest.approx(0.8)


def test_a_baseline_answers_with_the_same_tools(tiny_model_dir, tmp_path, monkeypatch):
    script_generate(monkeypatch, _tokenizer(tiny_model_dir), [], calculating)
    result = _eval(
        tiny_model_dir, tmp_path, "--reward", "rlkit.demo.task:arithmetic_reward", "--baseline", str(tiny_model_dir)
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["win_rate"] == 0.5 and metrics["baseline_score_mean"] == metrics["score_mean"]
    assert metrics["baseline_tools/call_frequency"] == metrics["tools/call_frequency"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "options,expected",
    [
        (["--template", "chatml"], "does not render tool schemas"),
        (["--max-turns", "0"], "--max-turns"),
    ],
)
def test_bad_tool_options_are_refused_before_weights_load(tiny_model_dir, tmp_path, monkeypatch, options, expected):
    import rlkit.evaluation.run as run_module

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the options were refused")

    monkeypatch.setattr(run_module, "load_causal_lm_for_inference", no_weights)
    result = _eval(tiny_model_dir, tmp_path, "--reward", "rlkit.demo.task:arithmetic_reward", *options)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert result.stdout == "" and not (tmp_path / "report").exists()


def test_tools_belong_to_generation(tmp_path):
    from rlkit.errors import InputError
    from rlkit.evaluation.config import EvalConfig, question

    completions = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(InputError, match="--tools runs the model's tool calls while it generates"):
        question(EvalConfig(completions=str(completions), reward="m:f", tools=["rlkit.demo.tools:calculator"]))
    with pytest.raises(InputError, match="--max-turns 2 caps tool-calling rounds"):
        question(EvalConfig(model="m", prompts=str(completions), reward="m:f", max_turns=2))


def test_the_kl_of_an_episode_counts_only_the_models_tokens(tiny_model_dir):
    """A tool turn's ids (mask 0) are not the model's: its log-prob sums over the sampled ids only."""
    from transformers import AutoModelForCausalLM

    from rlkit.evaluation.generation import completion_logps
    from rlkit.tools.generation import GeneratedReply

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompt, completion, mask = [0, 5, 6, 7], [8, 9, 10, 11, 12, 1], [1, 1, 0, 0, 1, 1]
    got = completion_logps(model, [GeneratedReply(prompt, completion, "", mask=mask)], 2, 4)[0]
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([prompt + completion])).logits[0].double(), -1)
    expected = sum(float(logps[len(prompt) + t - 1, token]) for t, (token, m) in enumerate(zip(completion, mask)) if m)
    assert got == pytest.approx(expected, abs=1e-4)
