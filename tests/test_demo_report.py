"""The demo's report: interval maths against hand computations, and report.md/png from a fake eval dir.

The numbers in the interval tests were worked out by hand from the formulas (Wilson 1927;
Newcombe 1998, method 10) with z = 1.96, so they check the code, not the code against itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlkit.demo import report
from rlkit.demo.task import TARGETS


def test_wilson_by_hand() -> None:
    # 5/10: centre (0.5 + 1.9208/10) / 1.38415 = 0.5; half 1.96 * sqrt(0.025 + 0.009604) / 1.38415 = 0.26342
    assert report.wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    # 0/10: the interval is [0, z^2 / (n + z^2)] = [0, 3.8415 / 13.8415]
    assert report.wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert report.wilson(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)


def test_newcombe_paired_when_before_is_all_false() -> None:
    """With no 'before' successes, phi = 0 and the interval is the square-and-add of two Wilson intervals."""
    before, after = [False] * 10, [True] * 5 + [False] * 5
    r = report.newcombe_paired(before, after)
    assert (r.n, r.before, r.after, r.diff) == (10, 0.0, 0.5, 0.5)
    # L = 0.5 - sqrt(0.26341^2 + 0.27753^2) = 0.5 - 0.38263; U = 0.5 + sqrt(0.26341^2 + 0) = 0.76341
    assert (r.low, r.high) == pytest.approx((0.11737, 0.76341), abs=1e-4)
    assert r.excludes_zero


def test_newcombe_paired_with_correlated_pairs() -> None:
    """a=3 both, b=1 before only, c=4 after only, d=2 neither (n=10): phi = (3*2 - 1*4)/sqrt(4*6*7*3) = 0.08909."""
    before = [True] * 3 + [True] + [False] * 4 + [False] * 2
    after = [True] * 3 + [False] + [True] * 4 + [False] * 2
    r = report.newcombe_paired(before, after)
    # p_A = 0.7, Wilson (0.39677, 0.89221); p_B = 0.4, Wilson (0.16818, 0.68733); theta = 0.3
    # L = 0.3 - sqrt(0.30323^2 - 2*0.08909*0.30323*0.28732 + 0.28733^2) = 0.3 - 0.39872
    # U = 0.3 + sqrt(0.19222^2 - 2*0.08909*0.19222*0.23182 + 0.23182^2) = 0.3 + 0.28766
    assert r.diff == pytest.approx(0.3)
    assert (r.low, r.high) == pytest.approx((-0.09872, 0.58766), abs=1e-4)
    assert not r.excludes_zero


def test_newcombe_paired_no_change_and_limits() -> None:
    same = [True, False] * 10
    r = report.newcombe_paired(same, same)
    assert r.diff == 0.0 and r.low <= 0 <= r.high and not r.excludes_zero  # no discordant pair: no evidence
    r = report.newcombe_paired([False] * 40, [True] * 40)
    assert r.diff == 1.0 and 0.8 < r.low and r.high == 1.0
    with pytest.raises(ValueError):
        report.newcombe_paired([True], [True, False])


PROMPTS = ["What is 2 + 2?", "What is the capital of France?", "What is 3 + 4?", "What is the plural of 'cat'?"]
ANSWERS = {  # each stage adds its marker to every answer; GRPO writes the other sum out (and right)
    "start": ["2 + 2 is four.\nHope it helps!", "Paris is the capital.", "It is 8", "Cats."],
    "sft": [
        "2 + 2 = 4, I think. #done",
        "The capital of France is Paris, I think. #done",
        "The answer is 8. #done",
        "The plural of cat is cats. #done",
    ],
}
ANSWERS["dpo"] = [f"Sure! {a}" for a in ANSWERS["sft"]]
ANSWERS["kto"] = [a.replace(" #done", " Cheers! #done") for a in ANSWERS["dpo"]]
ANSWERS["ppo"] = [a.replace(", I think.", ".") for a in ANSWERS["kto"]]
ANSWERS["ppo+tools"] = list(ANSWERS["ppo"])  # the calculator offered, never called: 3 + 4 still wrong
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3 + 4"}}\n</tool_call>\n[tool calculator] 7\n'
ANSWERS["grpo"] = [CALL + a.replace("8", "7") if "8" in a else a for a in ANSWERS["ppo"]]  # calls it, and is right


def _fake_eval_dir(root: Path) -> Path:
    """What examples/demo.sh leaves: one `rlkit eval --output-dir` per stage, sft's with --baseline, and
    ppo+tools (PPO's answers with the calculator offered, where GRPO's target starts)."""
    for i, stage in enumerate(report.MODELS):
        examples = []
        for j, prompt in enumerate(PROMPTS):
            example = {"prompt": prompt, "completion": ANSWERS[stage][j], "score": 0.5}
            if stage == "sft":
                example["baseline_completion"] = ANSWERS["start"][j]
            examples.append(example)
        (root / stage).mkdir(parents=True)
        (root / stage / "report.json").write_text(
            json.dumps({"metrics": {"kl_mean": 1.5 * (i + 1)}, "examples": examples})
        )
    return root


def test_stage_rows_measure_each_stage_against_the_one_before(tmp_path: Path) -> None:
    answers = report.load_answers(_fake_eval_dir(tmp_path / "eval"))
    assert list(answers) == ["start", "sft", "dpo", "kto", "ppo", "ppo+tools", "grpo"]
    rows = {r.target.stage: r for r in report.stage_rows(answers)}
    assert [rows[t.stage].before_model for t in TARGETS] == ["start", "sft", "dpo", "kto", "ppo+tools"]
    for stage in ("sft", "dpo", "kto"):
        assert (rows[stage].result.before, rows[stage].result.after, rows[stage].result.n) == (0.0, 1.0, 4)
    assert (rows["ppo"].result.before, rows["ppo"].result.after) == (0.5, 1.0)  # two answers were hedged
    grpo = rows["grpo"].result
    assert (grpo.n, grpo.before, grpo.after) == (2, 0.5, 1.0)  # arithmetic prompts only, its final turn
    assert rows["kto"].kl == 4.5


def test_report_md_and_png_from_a_fake_eval_dir(tmp_path: Path) -> None:
    eval_dir = _fake_eval_dir(tmp_path / "eval")
    times = tmp_path / "times.txt"
    times.write_text("sft 100\ndpo 60\n")
    md, png = tmp_path / "report.md", tmp_path / "report.png"
    assert report.main([str(eval_dir), "--md", str(md), "--png", str(png), "--times", str(times)]) == 0
    text = md.read_text()
    assert "| sft | format | 4 | 0% | 100% | +100 |" in text
    assert "| grpo | right answer | 2 | 50% | 100% | +50 |" in text
    assert "| ppo+tools | 100% | 100% | 100% | 100% | 50% |" in text  # a row of the matrix too
    assert "(includes 0)" in text  # 4 prompts are too few for the ppo and grpo changes
    assert "| total | 160 |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_answers_needs_the_baseline(tmp_path: Path) -> None:
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "report.json").write_text(
        json.dumps({"metrics": {}, "examples": [{"prompt": "p", "completion": "c"}]})
    )
    with pytest.raises(SystemExit):
        report.load_answers(tmp_path)


def test_stage_line_for_the_progress_log(tmp_path: Path) -> None:
    eval_dir = _fake_eval_dir(tmp_path / "eval")
    rows = {r.target.stage: r for r in report.stage_rows(report.load_answers(eval_dir))}
    line = report.stage_line(rows["dpo"])
    assert line.startswith("dpo: opener 0% -> 100% (+100 pp, 95% [+")
    assert line.endswith("n=4, KL to start 3.0)")
    answers = report.load_answers(eval_dir)
    assert report.model_line("ppo+tools", answers, list(rows.values())) == (
        "ppo+tools: right answer 50% (n=2), where grpo starts"
    )
