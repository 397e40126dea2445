"""Wall time from typing `rlkit --help` (or `rlkit dpo --help`, `rlkit --version`) to the prompt.

Help must not wait for torch: the command modules import only their option dataclasses and load
the run function's module when the command runs (tests/test_cli.py checks the imports; this
measures the time). Each command line runs N times as a fresh process, through the installed
`rlkit` entry point as a user would; the table gives the median and the fastest run, in seconds,
and the CPU time of the median run. The target is 0.5 s on the project's 2-core CI machine.

    python bench/cli_startup.py            # 15 runs of each
    python bench/cli_startup.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (["--help"], ["dpo", "--help"], ["--version"])


def _rlkit() -> str:
    """The console script beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("rlkit")
    found = str(beside) if beside.exists() else shutil.which("rlkit")
    if found is None:
        sys.exit("no `rlkit` entry point: run `make setup` (or pip install -e .) first")
    return found


def _time(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, of the child) of one run."""
    before = os.times()
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="runs of each command line (default 15)")
    args = parser.parse_args()
    rlkit = _rlkit()
    print(f"{os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.1f}; {args.runs} runs each.\n")
    print("| command | median wall s | fastest wall s | CPU s (median run) |")
    print("|---|---|---|---|")
    for command in COMMANDS:
        _time([rlkit, *command])  # warm the page cache once
        runs = sorted(_time([rlkit, *command]) for _ in range(args.runs))
        median = runs[len(runs) // 2]
        fastest = min(wall for wall, _ in runs)
        print(
            f"| `rlkit {' '.join(command)}` | {statistics.median(w for w, _ in runs):.2f} | {fastest:.2f} | {median[1]:.2f} |"
        )


if __name__ == "__main__":
    main()
