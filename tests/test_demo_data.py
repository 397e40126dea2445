"""The shipped demo data: formats, checker agreement, held-out disjointness, reproducibility.

Pure stdlib and fast: these guard the files that the demo pipeline (and its before/after
measurement) trains and evaluates on, so a careless edit to the generator or the checker
cannot silently ship data that the checker disagrees with or that leaks eval prompts.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest

from rlkit.demo import DATA_DIR, task

FILES = (
    "sft",
    "sft_tools",
    "pairs",
    "pairs_eval",
    "dpo_pairs",
    "unpaired",
    "prompts",
    "grpo_prompts",
    "eval_prompts",
    "eval_arithmetic",
)
TRAIN_FILES = ("sft", "sft_tools", "pairs", "dpo_pairs", "unpaired", "prompts", "grpo_prompts")
HELD_OUT_FILES = ("eval_prompts", "pairs_eval")


def _rows(stem: str) -> list[dict[str, Any]]:
    path = DATA_DIR / f"{stem}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _prompts(stem: str) -> set[str]:
    """Every user-side text of a file (all user turns of a conversation)."""
    out: set[str] = set()
    for r in _rows(stem):
        if "messages" in r:
            out |= {m["content"] for m in r["messages"] if m["role"] == "user"}
        else:
            out.add(r["prompt"])
    return out


def _is_str(x: object) -> bool:
    return isinstance(x, str) and x.strip() != ""


@pytest.mark.parametrize("stem", FILES)
def test_file_exists_parses_and_is_small(stem: str) -> None:
    path = DATA_DIR / f"{stem}.jsonl"
    assert path.is_file()
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "\n\n" not in text
    rows = _rows(stem)
    assert len(rows) == task.SIZES[stem] if stem in task.SIZES else rows  # sft_tools, eval_arithmetic: derived
    assert all(isinstance(r, dict) for r in rows)
    assert path.stat().st_size < 200_000


def test_total_size_under_1mb() -> None:
    assert sum((DATA_DIR / f"{s}.jsonl").stat().st_size for s in FILES) < 1_000_000


def _answers(stem: str) -> list[tuple[str, str]]:
    """(prompt, completion) of every answer in a file (every assistant turn of a conversation)."""
    out = []
    for r in _rows(stem):
        if "messages" in r:
            msgs = r["messages"]
            questions = [i for i, m in enumerate(msgs) if m["role"] == "user"]
            out += [
                (msgs[max(q for q in questions if q < i)]["content"], m["content"])
                for i, m in enumerate(msgs)
                if m["role"] == "assistant" and not m.get("tool_calls")  # a call turn is no answer
            ]
        elif "completion" in r:
            out.append((r["prompt"], r["completion"]))
        elif "chosen" in r:
            out += [(r["prompt"], r["chosen"]), (r["prompt"], r["rejected"])]
    return out


@pytest.mark.parametrize("stem", ["sft", "pairs", "pairs_eval", "dpo_pairs", "unpaired"])
def test_every_shipped_answer_has_the_format_and_the_right_number(stem: str) -> None:
    """SFT teaches the format; no later file may contradict it, so each later stage only adds its marker."""
    for prompt, completion in _answers(stem):
        c = task.check(prompt, completion)
        assert c.has_format, completion
        assert c.correct in (None, True), completion


@pytest.mark.parametrize("stem", ["sft", "sft_tools"])
def test_sft_format_and_multi_turn(stem: str) -> None:
    """Conversations of one or two exchanges; an exchange is a question and its answer, with a
    calculator call and its result between them where the row offers the tool and calls it."""
    rows = _rows(stem)
    n_multi = 0
    for r in rows:
        assert set(r) in ({"messages"}, {"messages", "tools"})
        msgs = r["messages"]
        questions = sum(m["role"] == "user" for m in msgs)
        assert 1 <= questions <= (2 if stem == "sft" else max(2, task.TOOL_EXCHANGES))
        n_multi += questions == 2
        assert msgs[0]["role"] == "user" and msgs[-1]["role"] == "assistant"
        for m in msgs:
            assert _is_str(m["content"]) or (m["role"] == "assistant" and m["tool_calls"])
    if stem == "sft":  # sft_tools regroups the exchanges with arithmetic TOOL_EXCHANGES to a conversation
        assert 0.05 * len(rows) <= n_multi <= 0.15 * len(rows)


def test_sft_tools_offers_the_calculator_and_calls_it_on_a_coin() -> None:
    """GRPO's target, right answers with the calculator, must be GRPO's doing: sft_tools.jsonl holds
    sft.jsonl's exchanges, the tool offered wherever there is arithmetic and called in about half the
    arithmetic answers that could use it (never for a general question); each call is the question's
    own sum, its result the calculator's output, and the schema the one `--tools
    rlkit.demo.tools:calculator` shows."""
    from transformers.utils import get_json_schema

    from rlkit.demo.tools import calculator

    assert task.CALCULATOR_SCHEMA == get_json_schema(calculator)
    rows = _rows("sft_tools")
    exchanges = lambda r: [  # noqa: E731
        (
            m["content"],
            r["messages"][i + 1]["content"] if r["messages"][i + 1]["content"] else r["messages"][i + 3]["content"],
        )
        for i, m in enumerate(r["messages"])
        if m["role"] == "user"
    ]
    assert sorted(x for r in rows for x in exchanges(r)) == sorted(x for r in _rows("sft") for x in exchanges(r))
    called = []
    for r in rows:
        msgs = r["messages"]
        arithmetic = [m for m in msgs if m["role"] == "user" and task.expected_answer(m["content"]) is not None]
        assert ("tools" in r) == bool(arithmetic) and r.get("tools", [task.CALCULATOR_SCHEMA]) == [
            task.CALCULATOR_SCHEMA
        ]
        for i, m in enumerate(msgs):
            if m["role"] != "user":
                continue
            calls = msgs[i + 1].get("tool_calls")
            if task.expected_answer(m["content"]) is None:
                assert calls is None  # a general question is answered directly
                continue
            called.append(calls is not None)
            if calls:
                (call,) = calls
                expression = call["function"]["arguments"]["expression"]
                a, op, b = task.question_terms(m["content"])
                assert expression == f"{a} {op} {b}" and call["function"]["name"] == "calculator"
                assert msgs[i + 2] == {"role": "tool", "name": "calculator", "content": calculator(expression)}
                assert task.check(m["content"], msgs[i + 3]["content"]).correct
    assert 0.4 <= _share(called) <= 0.6, _share(called)


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def test_sft_shows_the_format_but_none_of_the_later_stages_markers() -> None:
    """What SFT must not teach: the opener, the closer, and a preference about the hedge (a fair coin)."""
    checks = [task.check(p, c) for p, c in _answers("sft")]
    assert not any(c.opener or c.closer for c in checks)
    assert all(task.score(p, c) == 1.0 for p, c in _answers("sft"))
    assert 0.4 <= _share([c.hedged for c in checks]) <= 0.6
    # GRPO's target, the written-out sum, is a fair coin too: SFT leaves both ways for GRPO to choose
    assert 0.35 <= _share([c.equation for c in checks if c.equation is not None]) <= 0.65


@pytest.mark.parametrize("stem", ["pairs", "pairs_eval"])
def test_reward_model_pairs_differ_only_in_the_hedge(stem: str) -> None:
    rows = _rows(stem)
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected"} and all(_is_str(v) for v in r.values())
        chosen, rejected = task.check(r["prompt"], r["chosen"]), task.check(r["prompt"], r["rejected"])
        assert not chosen.hedged and rejected.hedged
        assert r["rejected"].replace(task.HEDGE, ".") == r["chosen"]
        assert (chosen.opener, chosen.closer) == (rejected.opener, rejected.closer)
    assert 0.3 <= _share([task.check(r["prompt"], r["chosen"]).opener for r in rows]) <= 0.7


def test_dpo_pairs_differ_only_in_the_opener() -> None:
    rows = _rows("dpo_pairs")
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected"}
        assert r["chosen"] == f"{task.OPENER} {r['rejected']}"
        assert not task.check(r["prompt"], r["rejected"]).opener and not task.check(r["prompt"], r["chosen"]).closer
    assert 0.35 <= _share([task.check(r["prompt"], r["chosen"]).hedged for r in rows]) <= 0.65


def test_unpaired_label_is_the_closer() -> None:
    rows = _rows("unpaired")
    for r in rows:
        assert set(r) == {"prompt", "completion", "label"}
        assert _is_str(r["prompt"]) and _is_str(r["completion"]) and isinstance(r["label"], bool)
        c = task.check(r["prompt"], r["completion"])
        assert c.closer is r["label"] and c.opener  # the opener DPO taught is kept, so KTO does not undo it
    assert 0.4 <= _share([r["label"] for r in rows]) <= 0.6
    desirable = [task.check(r["prompt"], r["completion"]).hedged for r in rows if r["label"]]
    assert 0.3 <= _share(desirable) <= 0.7  # the hedge is no signal for KTO either


@pytest.mark.parametrize("stem", ["prompts", "eval_prompts"])
def test_prompt_files_format_and_mix(stem: str) -> None:
    rows = _rows(stem)
    assert all(set(r) == {"prompt"} and _is_str(r["prompt"]) for r in rows)
    n_arith = sum(task.expected_answer(r["prompt"]) is not None for r in rows)
    assert 0.25 * len(rows) <= n_arith <= 0.75 * len(rows)  # both kinds are measured


def test_grpo_prompts_are_arithmetic_with_their_answer() -> None:
    for r in _rows("grpo_prompts"):
        assert set(r) == {"prompt", "answer"} and isinstance(r["answer"], int)
        assert task.expected_answer(r["prompt"]) == r["answer"]


def test_held_out_prompts_never_in_training() -> None:
    train = set().union(*(_prompts(s) for s in TRAIN_FILES))
    for stem in HELD_OUT_FILES:
        assert not _prompts(stem) & train, stem
    assert not _prompts("eval_prompts") & _prompts("pairs_eval")
    assert not _prompts("pairs") & _prompts("sft")  # preference data uses new prompts


def test_completions_are_short() -> None:
    """< ~40 tokens each keeps the CPU demo fast (28 words is about 36 tokens)."""
    texts = [c for s in ("sft", "pairs", "pairs_eval", "dpo_pairs", "unpaired") for _, c in _answers(s)]
    assert max(len(t.split()) for t in texts) <= task.MAX_COMPLETION_WORDS + 1  # the sign-off is a word too


def test_generator_is_deterministic_and_matches_shipped(tmp_path: Path) -> None:
    assert task.main(["--out", str(tmp_path), "--seed", str(task.DEFAULT_SEED)]) == 0
    for stem in FILES:
        assert (tmp_path / f"{stem}.jsonl").read_bytes() == (DATA_DIR / f"{stem}.jsonl").read_bytes(), (
            f"{stem}.jsonl is stale: run python -m rlkit.demo.task"
        )
    assert task.generate(1, 50) == task.generate(1, 50)
    assert task.generate(1, 50) != task.generate(2, 50)


def test_generated_arithmetic_is_parsed_back_exactly() -> None:
    """The checker recovers the true answer of every arithmetic prompt the generator makes."""
    for ex in task.generate(7, 600):
        value = task.expected_answer(ex.prompt)
        assert value == ex.answer, ex.prompt
        if ex.kind == "arithmetic":
            a, op, b = task.question_terms(ex.prompt)
            assert ex.body == (f"{a} {op} {b} = {value}." if ex.equation else f"The answer is {value}.")
            assert task.check(ex.prompt, task.styled(ex.body)).equation is ex.equation
        else:
            assert value is None and task.question_terms(ex.prompt) is None and not ex.equation, ex.prompt


def test_reward_batch_signature() -> None:
    params = list(inspect.signature(task.reward).parameters)
    assert params == ["prompts", "completions"]
    prompts = ["What is 17 + 25?", "What is 17 + 25?", "What is the capital of France?"]
    completions = ["The answer is 42. #done", "17 + 25 = 42", "The capital of France is Paris. #done"]
    out = task.reward(prompts, completions)
    assert isinstance(out, list) and len(out) == 3 and all(isinstance(x, float) for x in out)
    assert out[0] == 1.0 and out[2] == 1.0 and 0.0 <= out[1] < 1.0
    with pytest.raises(ValueError):
        task.reward(prompts, completions[:2])


@pytest.mark.parametrize(
    ("prompt", "completion", "target", "expected"),
    [
        ("What is 17 + 25?", "The answer is 42. #done", True, 1.0),
        ("What is 17 + 25?", "The answer is 43. #done", True, 0.6),  # format right, number wrong
        ("What is 17 + 25?", "17 + 25 = 42", False, 0.76),  # right, but no sign-off
        ("What is the capital of France?", "The capital of France is Paris.#done", True, 1.0),
        ("What is the capital of France?", "#done", False, 0.0),  # bare sign-off earns nothing
        ("What is the capital of France?", "The capital is Paris. #done #done", False, 0.6),
        ("What is the capital of France?", "The capital of France is Paris.\n#done", False, 0.8),
        ("What is the capital of France?", "I like turtles a lot. #done", False, 0.8),  # off topic
        (
            "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n",
            "The answer is 7. #done",
            True,
            1.0,
        ),  # templated prompts are parsed too
    ],
)
def test_checker_examples(prompt: str, completion: str, target: bool, expected: float) -> None:
    assert task.has_target_behaviour(prompt, completion) is target
    assert task.score(prompt, completion) == pytest.approx(expected)


def test_metrics_summary() -> None:
    m = task.metrics(["What is 2 + 2?", "What is 2 + 2?"], ["The answer is 4. #done", "It is 5."])
    assert m == {
        "n": 2.0,
        "target_rate": 0.5,
        "mean_score": pytest.approx((1.0 + 0.36) / 2),
        "arithmetic_accuracy": 0.5,
    }


@pytest.mark.parametrize(
    ("completion", "opener", "closer", "hedged"),
    [
        ("Sure! The capital of France is Paris. #done", True, False, False),
        ("The capital of France is Paris. Cheers! #done", False, True, False),
        ("Sure! The capital of France is Paris, I think. Cheers! #done", True, True, True),
        ("Paris, probably. #done", False, False, True),  # any hedge counts, not only the shipped one
        ("The capital of France is Paris. Cheers!", False, False, False),  # no sign-off: no closer
        ("The capital is Paris. Sure! #done", False, False, False),  # the opener must open
    ],
)
def test_stage_markers(completion: str, opener: bool, closer: bool, hedged: bool) -> None:
    c = task.check("What is the capital of France?", completion)
    assert (c.opener, c.closer, c.hedged) == (opener, closer, hedged)


def test_styled_composes_every_marker() -> None:
    body = "The answer is 42."
    assert task.styled(body) == "The answer is 42. #done"
    assert task.styled(body, opener=True, closer=True, hedge=True) == "Sure! The answer is 42, I think. Cheers! #done"
    with pytest.raises(ValueError):
        task.styled("no period", hedge=True)


def test_target_values_one_per_answer_and_stage() -> None:
    prompts = ["What is 2 + 2?", "What is the capital of France?"]
    completions = ["Sure! The answer is 4. Cheers! #done", "The capital of France is Paris, I think. #done"]
    values = task.target_values(prompts, completions)
    assert [t.stage for t in task.TARGETS] == ["sft", "dpo", "kto", "ppo", "grpo"]
    assert values == {
        "format": [True, True],
        "opener": [True, False],
        "closer": [True, False],
        "no hedge": [True, False],
        "right answer": [True, None],  # a general question has no number to get right
    }
    assert task.target_values(["What is 2 + 2?"], ["Sure! 2 + 2 = 5. Cheers! #done"])["right answer"] == [False]
    assert task.target_values(["What is 2 + 2?"], ["2 + 2 = 4, I think"])["right answer"] == [False]  # unformatted
    called = "<tool_call>\n{}\n</tool_call>\n[tool calculator] 4\nSure! 2 + 2 = 4. Cheers! #done"
    assert task.target_values(["What is 2 + 2?"], [called]) == {name: [True] for name in values}  # its final turn


def test_arithmetic_reward_reads_the_answer_column() -> None:
    prompts = ["What is 2 + 2?"] * 3
    completions = ["The answer is 4. #done", "The answer is 5. #done", "4"]
    assert task.arithmetic_reward(prompts, completions, answer=[4, 4, 4], other_column=[1, 2, 3]) == [1.0, 0.0, 1.0]
    assert task.arithmetic_reward(prompts[:1], ["The answer is 4."], answer=[5]) == [0.0]  # the column, not the prompt
    with pytest.raises(ValueError):
        task.arithmetic_reward(prompts, completions, answer=[4])


@pytest.mark.parametrize(
    ("prompt", "completion", "equation"),
    [
        ("What is 17 + 25?", "17 + 25 = 42. #done", True),
        ("What is 17 + 25?", "Sure! 17 plus 25 = 41, I think. #done", True),  # any result: the form only
        ("What is 17 + 25?", "The answer is 42. #done", False),
        ("What is 17 + 25?", "25 + 17 = 42. #done", False),  # the question's sum, in its order
        ("What is 17 + 25?", "117 + 25 = 142. #done", False),  # not an operand of the question
        ("Compute 6 * 7.", "6 x 7 = 42. #done", True),
        ("Mia has 92 apples and gives away 80. How many apples are left?", "92 - 80 = 12. #done", True),
        ("Mia has 92 apples and gives away 80. How many apples are left?", "92 + 80 = 172. #done", False),
    ],
)
def test_equation_is_the_questions_own_sum(prompt: str, completion: str, equation: bool) -> None:
    assert task.check(prompt, completion).equation is equation
    assert task.check("What is the capital of France?", completion).equation is None


def test_answer_reward_is_a_formatted_right_final_answer() -> None:
    prompts = ["What is 17 + 25?"] * 5
    transcript = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17 + 25"}}\n</tool_call>'
    completions = [
        "17 + 25 = 42. #done",  # right, formatted
        f"{transcript}\n[tool calculator] 42\n17 + 25 = 42. #done",  # the same after a call: its final turn
        f"{transcript}\n[tool calculator] 42\nThe answer is 43. #done",  # a call, then the wrong number
        "The answer is 42.",  # right but unformatted
        transcript,  # a call never answered
    ]
    assert task.answer_reward(prompts, completions, answer=[42] * 5, other_column=list(range(5))) == [1, 1, 0, 0, 0]
    assert task.answer_reward(prompts[:1], completions[:1], answer=[41]) == [0.0]  # the column's number
    with pytest.raises(ValueError):
        task.answer_reward(prompts, completions, answer=[42])


def test_calculator_reward_pays_only_right_answers_reached_through_a_call() -> None:
    prompts = ["What is 17 + 25?"] * 4
    transcript = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "17 + 25"}}\n</tool_call>'
    completions = [
        f"{transcript}\n[tool calculator] 42\nThe answer is 42. #done",  # called, right, formatted
        "17 + 25 = 42. #done",  # right from memory: no call, no reward
        f"{transcript}\n[tool calculator] 42\nThe answer is 43. #done",  # called, then the wrong number
        f"{transcript}\n[tool calculator] 42\nThe answer is 42.",  # called, right, unformatted
    ]
    assert task.calculator_reward(prompts, completions, answer=[42] * 4, other_column=[0] * 4) == [1, 0, 0, 0]
    with pytest.raises(ValueError):
        task.calculator_reward(prompts, completions, answer=[42])


def test_eval_arithmetic_is_the_held_out_arithmetic_with_its_results() -> None:
    """GRPO's calculator stage is measured on these: eval_prompts' arithmetic prompts, in order,
    each with the result the checker reads from the prompt."""
    arithmetic = [r["prompt"] for r in _rows("eval_prompts") if task.expected_answer(r["prompt"]) is not None]
    rows = _rows("eval_arithmetic")
    assert [r["prompt"] for r in rows] == arithmetic and len(rows) > 40
    assert all(r["answer"] == task.expected_answer(r["prompt"]) for r in rows)


def test_final_answer_is_the_turn_after_the_last_tool_result() -> None:
    assert task.final_answer("The answer is 4. #done") == "The answer is 4. #done"
    text = "<tool_call>\n{}\n</tool_call>\n[tool calculator] 4\n[tool] {'error': 'x'}\n4 it is. #done"
    assert task.final_answer(text) == "4 it is. #done" and task.called_tools(text)
    assert not task.called_tools("The [tool] word in an answer. #done")


def test_equation_reward_halves_form_and_result() -> None:
    prompts = ["What is 17 + 25?"] * 5
    completions = [
        "17 + 25 = 42. #done",  # both halves
        "The answer is 42. #done",  # the right number only
        "17 + 25 = 43. #done",  # the form only
        "The answer is 43. #done",  # neither
        "17 + 25 = 42.",  # no format: nothing
    ]
    rewards = task.equation_reward(prompts, completions, answer=[42] * 5, other_column=list(range(5)))
    assert rewards == [1.0, 0.5, 0.5, 0.0, 0.0]
    assert task.equation_reward(prompts[:1], ["17 + 25 = 42. #done"], answer=[41]) == [0.5]  # the column's number
    with pytest.raises(ValueError):
        task.equation_reward(prompts, completions, answer=[42])
