"""Generate from the held-out demo prompts and score the answers with the task's checker.

`python -m rlkit.demo.generate MODEL [MODEL...]` prints, per model, a few samples and the
target-behaviour rate on stderr, and one JSON line of metrics per model on stdout. The demo
uses it to show before/after on the real model.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # no library progress bars between the tables

import argparse
import json
import sys

from rich.table import Table

from rlkit.console import console, quiet_libraries
from rlkit.data.templates import resolve_template
from rlkit.demo import DATA_DIR
from rlkit.demo.task import metrics
from rlkit.models.load import load_causal_lm, load_tokenizer, resolve_source
from rlkit.tools.generation import SamplingConfig, generate


def evaluate(
    model_name: str, prompts: list[str], template: str | None, max_new_tokens: int, show: int
) -> dict[str, float]:
    source = resolve_source(model_name)
    tokenizer = load_tokenizer(source)
    model = load_causal_lm(source)
    chat_template = resolve_template(template, tokenizer, model_name)
    completions = generate(
        model,
        tokenizer,
        chat_template,
        [[{"role": "user", "content": p}] for p in prompts],
        SamplingConfig(max_new_tokens=max_new_tokens),
    )
    table = Table(title=model_name, show_lines=True)
    table.add_column("prompt")
    table.add_column("completion")
    for prompt, completion in list(zip(prompts, completions))[:show]:
        table.add_row(prompt, completion)
    console.print(table)
    return {"model": model_name, **metrics(prompts, completions)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--prompts", default=str(DATA_DIR / "eval_prompts.jsonl"))
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--template", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--show", type=int, default=4)
    args = parser.parse_args(argv)
    quiet_libraries()
    with open(args.prompts) as handle:
        prompts = [json.loads(line)["prompt"] for line in handle if line.strip()][: args.limit]
    for name in args.models:
        result = evaluate(name, prompts, args.template, args.max_new_tokens, args.show)
        console.print("  ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in result.items()))
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
