"""The demo's before/after table, from the `rlkit eval` reports that examples/demo.sh writes.

`python -m rlkit.demo.report EVAL_DIR` reads ``EVAL_DIR/<stage>/report.json`` for each stage that
was evaluated (``rlkit eval POLICY --prompts ... --reward rlkit.demo.task:reward --output-dir``)
and prints one markdown table on stdout, one row per model, the starting model first. The
starting model's answers are the ``--baseline`` of the last stage's eval: the same prompts and
greedy settings as every stage's own.

Each row is recomputed from the per-example completions with the task's checker
(`rlkit.demo.task.metrics`), since the target-behaviour rate is not an eval metric; the win
rate against the start is computed for every stage the way eval computes it (ties count 1/2).
The reward-model column comes from ``EVAL_DIR/rm_scores/report.json``: ``rlkit eval
--completions`` over the file that ``--rm-input`` writes (every model's completions, in table
order), so the RM scores exactly the answers the other columns score.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from rlkit.demo.task import metrics, reward

STAGES = ("sft", "dpo", "kto", "ppo")  # table order after the start; stages not evaluated are skipped
START = "start"


class Answers:
    """One model's greedy answers to the held-out prompts, and what eval measured about them."""

    def __init__(
        self, prompts: list[str], texts: list[str], eval_metrics: dict[str, Any], length: float | None, kl: float | None
    ):
        self.prompts, self.texts, self.eval_metrics, self.length, self.kl = prompts, texts, eval_metrics, length, kl


def load_answers(eval_dir: Path) -> dict[str, Answers]:
    """{model: answers}, the start first, then each evaluated stage in pipeline order."""
    reports = {
        s: json.loads((eval_dir / s / "report.json").read_text())
        for s in STAGES
        if (eval_dir / s / "report.json").is_file()
    }
    with_baseline = [s for s, r in reports.items() if r["examples"] and "baseline_completion" in r["examples"][0]]
    if not with_baseline:
        raise SystemExit(f"{eval_dir}: no stage was evaluated with --baseline (the starting model)")
    last = reports[with_baseline[-1]]
    answers = {
        START: Answers(
            [e["prompt"] for e in last["examples"]],
            [e["baseline_completion"] for e in last["examples"]],
            {},
            last["metrics"].get("baseline_mean_length_tokens"),
            0.0,
        )
    }
    for stage, report in reports.items():
        examples = report["examples"]
        answers[stage] = Answers(
            [e["prompt"] for e in examples],
            [e["completion"] for e in examples],
            report["metrics"],
            report["metrics"].get("mean_length_tokens"),
            report["metrics"].get("kl_mean"),
        )
    return answers


def write_rm_input(eval_dir: Path, target: Path) -> Path:
    """Every model's (prompt, completion) rows in table order, for `rlkit eval --completions`."""
    with target.open("w") as handle:
        for answers in load_answers(eval_dir).values():
            for prompt, text in zip(answers.prompts, answers.texts):
                handle.write(json.dumps({"prompt": prompt, "completion": text}) + "\n")
    return target


def rm_means(eval_dir: Path, answers: dict[str, Answers]) -> dict[str, float]:
    """Mean reward-model score per model (empty when the RM eval is missing or does not line up)."""
    path = eval_dir / "rm_scores" / "report.json"
    if not path.is_file():
        return {}
    scores = [e["score"] for e in json.loads(path.read_text())["examples"]]
    if len(scores) != sum(len(a.texts) for a in answers.values()):
        return {}
    means, at = {}, 0
    for name, a in answers.items():
        means[name] = statistics.fmean(scores[at : at + len(a.texts)])
        at += len(a.texts)
    return means


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(eval_dir: Path) -> str:
    answers = load_answers(eval_dir)
    rm = rm_means(eval_dir, answers)
    start = answers[START]
    start_scores = reward(start.prompts, start.texts)
    lines = [
        "| model | `#done` format | task score | arithmetic right | win rate vs start | RM score | tokens/answer | KL to start |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in answers.items():
        m = metrics(a.prompts, a.texts)
        scores = reward(a.prompts, a.texts)
        win = (
            None
            if name == START
            else statistics.fmean(1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(scores, start_scores))
        )
        label = "start (the .gguf)" if name == START else ("ppo = merged" if name == "ppo" else name)
        lines.append(
            f"| {label} | {m['target_rate']:.0%} | {m['mean_score']:.2f} | {m['arithmetic_accuracy']:.0%} | {_cell(win, '.2f')} "
            f"| {_cell(rm.get(name), '+.2f')} | {_cell(a.length, '.1f')} | {_cell(a.kl, '.1f')} |"
        )
    lines += [
        "",
        f"{len(start.prompts)} held-out prompts, greedy. `#done` format: the task's target behaviour (one line, 3-20 words, "
        "on topic, ending with #done); task score: rlkit.demo.task:reward in [0, 1]; RM score: the train-rm model; "
        "KL: summed log-ratio of each answer to the starting model (nats).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir", type=Path, help="the dir holding one `rlkit eval --output-dir` per stage")
    parser.add_argument(
        "--rm-input",
        type=Path,
        help="instead of the table, write every model's completions here (for `rlkit eval --completions`)",
    )
    args = parser.parse_args(argv)
    print(write_rm_input(args.eval_dir, args.rm_input) if args.rm_input else table(args.eval_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
