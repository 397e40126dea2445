"""What a distilled student kept of its teacher: each demo target in the base model's, the
teacher's and the student's greedy answers to the held-out prompts, and the student's change
over the base with a 95% interval.

`python -m rlkit.demo.transfer EVAL_DIR` reads ``EVAL_DIR/teacher/report.json`` (``rlkit eval
TEACHER ... --baseline BASE``: the teacher's answers and the base model's) and
``EVAL_DIR/student/report.json`` (``rlkit eval STUDENT ...``, the same prompts and settings), and
prints a markdown table on stdout; ``--md FILE`` writes it there too. The numbers are recomputed
from the answers with the task's checker (`rlkit.demo.task.TARGETS`), and the interval is the
paired one of the demo's report (`rlkit.demo.report.newcombe_paired`): the base and the student
answer the same prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from rlkit.demo.report import PairedDiff, newcombe_paired
from rlkit.demo.task import TARGETS, target_values


@dataclass(frozen=True)
class TransferRow:
    """One target: its rate in the teacher's answers, and the student's change over the base."""

    target: str
    teacher: float
    change: PairedDiff

    @property
    def recovered(self) -> float | None:
        """The share of the teacher's lead over the base that the student has (None: no lead)."""
        lead = self.teacher - self.change.before
        return self.change.diff / lead if lead > 0 else None


def _answers(report: Path, key: str) -> tuple[list[str], list[str]]:
    examples = json.loads(report.read_text())["examples"]
    return [e["prompt"] for e in examples], [e[key] for e in examples]


def transfer_rows(eval_dir: Path) -> list[TransferRow]:
    """A row per target, from the teacher's eval (with the base as its baseline) and the student's."""
    teacher_report, student_report = eval_dir / "teacher" / "report.json", eval_dir / "student" / "report.json"
    for path in (teacher_report, student_report):
        if not path.is_file():
            raise SystemExit(f"{path}: missing (rlkit eval ... --output-dir {path.parent})")
    prompts, teacher = _answers(teacher_report, "completion")
    base_prompts, base = _answers(teacher_report, "baseline_completion")
    student_prompts, student = _answers(student_report, "completion")
    if not prompts == base_prompts == student_prompts:
        raise SystemExit(f"{eval_dir}: the teacher's and the student's evals answered different prompts")
    values = {name: target_values(prompts, texts) for name, texts in (("base", base), ("teacher", teacher), ("student", student))}  # fmt: skip
    rows = []
    for target in TARGETS:
        measured = [i for i, v in enumerate(values["base"][target.name]) if v is not None]
        b = [bool(values["base"][target.name][i]) for i in measured]
        t = [bool(values["teacher"][target.name][i]) for i in measured]
        s = [bool(values["student"][target.name][i]) for i in measured]
        rows.append(TransferRow(target.name, sum(t) / max(len(t), 1), newcombe_paired(b, s)))
    return rows


def transfer_table(rows: list[TransferRow]) -> str:
    lines = [
        "| target | n | base | teacher | student | student - base (pp) | 95% interval (pp) | of the teacher's lead |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r.change
        recovered = "-" if r.recovered is None else f"{100 * r.recovered:.0f}%"
        lines.append(
            f"| {r.target} | {c.n} | {100 * c.before:.0f}% | {100 * r.teacher:.0f}% | {100 * c.after:.0f}% | "
            f"{100 * c.diff:+.0f} | [{100 * c.low:+.0f}, {100 * c.high:+.0f}] | {recovered} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir", type=Path, help="the dir holding teacher/ and student/ (rlkit eval --output-dir)")
    parser.add_argument("--md", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    table = transfer_table(transfer_rows(args.eval_dir))
    print(table)
    if args.md:
        args.md.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
