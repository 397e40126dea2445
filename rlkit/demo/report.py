"""The demo's verdict: did each stage move its own target, and by how much, with what certainty.

`python -m rlkit.demo.report EVAL_DIR` reads ``EVAL_DIR/<stage>/report.json`` for each stage that
examples/demo.sh evaluated (``rlkit eval STAGE_ADAPTER --prompts eval_prompts.jsonl --output-dir``;
the first stage's eval also has ``--baseline`` the starting model; a stage whose target is measured
with the model asked differently, GRPO's with the calculator offered, reads its "before" from an eval
of its own, ``ppo+tools``: `Target.before`) and prints a markdown table
on stdout: for every stage, its target (`rlkit.demo.task.TARGETS`) in the answers of the model
it started from and of the model it made, the difference with a 95% interval, and the KL of its
answers to the starting model. ``--md`` and ``--png`` also write that as report.md (with every
target for every model, and the wall time per stage when ``--times`` is given) and a chart.

Every number is recomputed from the per-example greedy completions with the task's checker:
the targets are yes/no per held-out prompt, and "before" and "after" answer the same prompts,
so the difference is a paired difference of proportions. Its interval is Newcombe's hybrid
score interval for paired data (method 10 of Newcombe 1998, built from the two Wilson
intervals and the correlation of the pairs): unlike the Wald interval it stays inside [-1, 1]
and keeps its coverage at 0% or 100%, which is where a stage's target starts and ends.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from rlkit.demo.task import TARGETS, Target, target_values

STAGES = tuple(t.stage for t in TARGETS)  # pipeline order; stages not evaluated are skipped
START = "start"
# every eval the report reads, in pipeline order: a stage's own "before" eval just ahead of it
MODELS = tuple(name for t in TARGETS for name in ((t.before,) if t.before else ()) + (t.stage,))
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n (Wilson 1927)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class PairedDiff:
    """after - before over the same items, and its 95% interval."""

    n: int
    before: float
    after: float
    diff: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def newcombe_paired(before: list[bool], after: list[bool], z: float = Z95) -> PairedDiff:
    """Paired difference of proportions with Newcombe's (1998) method-10 interval.

    With a = both true, b = before only, c = after only, d = neither (n in all), the
    difference is θ = p_A − p_B = (c − b)/n. With (l, u) each proportion's Wilson interval and
    φ = (ad − bc)/√((a+b)(c+d)(a+c)(b+d)) (0 when a margin is empty):

        L = θ − √((p_A − l_A)² − 2φ(p_A − l_A)(u_B − p_B) + (u_B − p_B)²)
        U = θ + √((u_A − p_A)² − 2φ(u_A − p_A)(p_B − l_B) + (p_B − l_B)²)

    When no pair changed (b = c = 0) φ is 1 and the interval shrinks towards 0 itself: it
    never excludes zero then, which is the only use the demo makes of it.
    """
    if len(before) != len(after):
        raise ValueError(f"{len(before)} before but {len(after)} after")
    n = len(before)
    a = sum(x and y for x, y in zip(before, after))
    b = sum(x and not y for x, y in zip(before, after))
    c = sum(y and not x for x, y in zip(before, after))
    d = n - a - b - c
    if n == 0:
        return PairedDiff(0, 0.0, 0.0, 0.0, -1.0, 1.0)
    p_a, p_b = (a + c) / n, (a + b) / n
    (l_a, u_a), (l_b, u_b) = wilson(a + c, n, z), wilson(a + b, n, z)
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(denominator) if denominator else 0.0
    theta = p_a - p_b
    low = theta - math.sqrt(max(0.0, (p_a - l_a) ** 2 - 2 * phi * (p_a - l_a) * (u_b - p_b) + (u_b - p_b) ** 2))
    high = theta + math.sqrt(max(0.0, (u_a - p_a) ** 2 - 2 * phi * (u_a - p_a) * (p_b - l_b) + (p_b - l_b) ** 2))
    return PairedDiff(n, p_b, p_a, theta, max(-1.0, low), min(1.0, high))


@dataclass(frozen=True)
class Answers:
    """One model's greedy answers to the held-out prompts, and their KL to the starting model."""

    prompts: list[str]
    texts: list[str]
    kl: float | None


def load_answers(eval_dir: Path) -> dict[str, Answers]:
    """{model: answers}, the start first (the baseline of the first stage's eval), then each stage."""
    reports = {
        s: json.loads((eval_dir / s / "report.json").read_text())
        for s in MODELS
        if (eval_dir / s / "report.json").is_file()
    }
    with_baseline = [r for r in reports.values() if r["examples"] and "baseline_completion" in r["examples"][0]]
    if not with_baseline:
        raise SystemExit(f"{eval_dir}: no stage was evaluated with --baseline (the starting model)")
    first = with_baseline[0]["examples"]
    answers = {START: Answers([e["prompt"] for e in first], [e["baseline_completion"] for e in first], 0.0)}
    for stage, report in reports.items():
        examples = report["examples"]
        answers[stage] = Answers(
            [e["prompt"] for e in examples], [e["completion"] for e in examples], report["metrics"].get("kl_mean")
        )
    return answers


@dataclass(frozen=True)
class StageRow:
    """One stage's own target, measured on the model before it and on the model it made."""

    target: Target
    before_model: str
    result: PairedDiff
    kl: float | None


def _values(a: Answers) -> dict[str, list[bool | None]]:
    return target_values(a.prompts, a.texts)


def stage_rows(answers: dict[str, Answers]) -> list[StageRow]:
    """A row for every evaluated stage whose predecessor was evaluated too."""
    rows = []
    order = [START, *STAGES]
    for target in TARGETS:
        before = target.before or order[order.index(target.stage) - 1]
        if target.stage not in answers or before not in answers:
            continue
        if answers[before].prompts != answers[target.stage].prompts:
            raise SystemExit(f"{before} and {target.stage} were evaluated on different prompts")
        b, a = _values(answers[before])[target.name], _values(answers[target.stage])[target.name]
        kept = [(x, y) for x, y in zip(b, a) if x is not None and y is not None]
        result = newcombe_paired([bool(x) for x, _ in kept], [bool(y) for _, y in kept])
        rows.append(StageRow(target, before, result, answers[target.stage].kl))
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _pp(x: float) -> str:
    return f"{100 * x:+.0f}"


def stage_line(row: StageRow) -> str:
    """One stage's verdict in a line, for the progress log."""
    res = row.result
    kl = "" if row.kl is None else f", KL to start {row.kl:.1f}"
    return (
        f"{row.target.stage}: {row.target.name} {_pct(res.before)} -> {_pct(res.after)} "
        f"({_pp(res.diff)} pp, 95% [{_pp(res.low)}, {_pp(res.high)}]; n={res.n}{kl})"
    )


def model_line(name: str, answers: dict[str, Answers], rows: list[StageRow]) -> str:
    """The progress log's line after an eval: a stage's verdict, or for a stage's own "before" eval
    (the PPO model with the calculator offered) the target it will be measured against."""
    verdict = next((stage_line(r) for r in rows if r.target.stage == name), None)
    if verdict is not None or name not in answers:
        return verdict or f"{name}: not evaluated"
    values = _values(answers[name])
    parts = []
    for t in TARGETS:
        if t.before == name:
            measured = [bool(v) for v in values[t.name] if v is not None]
            parts.append(
                f"{t.name} {_pct(sum(measured) / max(len(measured), 1))} (n={len(measured)}), where {t.stage} starts"
            )
    return f"{name}: " + "; ".join(parts)


def stage_table(rows: list[StageRow]) -> str:
    """The headline table: each stage's own target before and after it."""
    lines = [
        "| stage | its target | n | before | after | change (pp) | 95% interval (pp) | KL to start |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        res = r.result
        mark = "" if res.excludes_zero else " (includes 0)"
        kl = "-" if r.kl is None else f"{r.kl:.1f}"
        lines.append(
            f"| {r.target.stage} | {r.target.name} | {res.n} | {_pct(res.before)} | {_pct(res.after)} "
            f"| {_pp(res.diff)} | [{_pp(res.low)}, {_pp(res.high)}]{mark} | {kl} |"
        )
    return "\n".join(lines)


def matrix_table(answers: dict[str, Answers]) -> str:
    """Every target in every model's answers: what each stage kept of the earlier ones."""
    lines = [
        "| model | " + " | ".join(t.name for t in TARGETS) + " |",
        "|---|" + "---:|" * len(TARGETS),
    ]
    for name, a in answers.items():
        values = _values(a)
        cells = []
        for t in TARGETS:
            measured = [bool(v) for v in values[t.name] if v is not None]
            cells.append(_pct(sum(measured) / len(measured)) if measured else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legend(answers: dict[str, Answers]) -> str:
    n = len(answers[START].prompts)
    rules = "; ".join(f"{t.name}: {t.rule}" for t in TARGETS)
    return (
        f"{n} held-out prompts, greedy answers, each checked by rlkit.demo.task ({rules}). "
        "Before = the model the stage started from"
        + "".join(f" ({t.stage}: its {t.before} eval)" for t in TARGETS if t.before)
        + "; change in percentage points with Newcombe's paired "
        "95% interval; KL: mean summed log-ratio of the stage's answers to the starting model (nats)."
    )


def read_times(path: Path) -> list[tuple[str, int]]:
    """(stage, seconds) lines that examples/demo.sh writes: ``NAME SECONDS`` per line."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            name, seconds = line.split()
            out.append((name, int(seconds)))
    return out


def markdown(answers: dict[str, Answers], rows: list[StageRow], times: list[tuple[str, int]] | None) -> str:
    parts = [
        "# rlkit demo: what each stage taught",
        "",
        stage_table(rows),
        "",
        legend(answers),
        "",
        "## Every target in every model",
        "",
        matrix_table(answers),
    ]
    if times:
        total = sum(s for _, s in times)
        parts += ["", "## Wall time", "", "| stage | seconds |", "|---|---:|"]
        parts += [f"| {name} | {seconds} |" for name, seconds in times] + [f"| total | {total} |"]
    return "\n".join(parts) + "\n"


def plot(rows: list[StageRow], path: Path) -> Path:
    """Each stage's target before and after it, with Wilson 95% intervals, one panel per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(rows), 1), figsize=(2.4 * max(len(rows), 1) + 1, 3.2), sharey=True)
    axes = [axes] if len(rows) <= 1 else list(axes)
    for ax, r in zip(axes, rows):
        res = r.result
        for x, (p, colour) in enumerate(((res.before, "tab:gray"), (res.after, "tab:blue"))):
            low, high = wilson(round(p * res.n), res.n)
            ax.bar(x, p, color=colour, width=0.6)
            ax.errorbar(
                x, p, yerr=[[max(0.0, p - low)], [max(0.0, high - p)]], color="black", capsize=4
            )  # float rounding
        ax.set_xticks([0, 1], [r.before_model, r.target.stage])
        ax.set_title(
            f"{r.target.stage}: {r.target.name}\n{_pp(res.diff)} pp [{_pp(res.low)}, {_pp(res.high)}]", fontsize=9
        )
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("share of held-out answers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir", type=Path, help="the dir holding one `rlkit eval --output-dir` per stage")
    parser.add_argument("--md", type=Path, help="also write the full report (markdown) here")
    parser.add_argument("--png", type=Path, help="also write the chart of every stage's target here")
    parser.add_argument("--times", type=Path, help="NAME SECONDS lines: the wall time per stage, for --md")
    parser.add_argument(
        "--stage",
        choices=MODELS,
        help="instead of the tables, print this stage's verdict (or this eval's targets) in a line",
    )
    args = parser.parse_args(argv)
    answers = load_answers(args.eval_dir)
    rows = stage_rows(answers)
    if args.stage:
        print(model_line(args.stage, answers, rows))
        return 0
    print(stage_table(rows))
    print()
    print(matrix_table(answers))
    if args.md:
        times = read_times(args.times) if args.times and args.times.is_file() else None
        args.md.write_text(markdown(answers, rows, times))
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
