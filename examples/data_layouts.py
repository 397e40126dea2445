"""Rewrite the shipped demo data in the layouts of the public datasets the recipes were made for.

The recipes in examples/*.mk train on these files by default, so their column mappings and
format detection run exactly as they would on the real datasets:

  stack-exchange  pairs (prompt/chosen/rejected) -> lvwerra/stack-exchange-paired columns
                  {"qid", "question", "date", "metadata", "response_j", "response_k"}
  questions       prompts (prompt)               -> {"qid", "question"} (the RL split's questions)
  ultrafeedback   pairs (prompt/chosen/rejected) -> HuggingFaceH4/ultrafeedback_binarized columns
                  {"prompt", "prompt_id", "chosen", "rejected", "messages"}, where chosen,
                  rejected and messages are whole conversations [{role: user}, {role: assistant}]

Usage: python examples/data_layouts.py LAYOUT IN.jsonl OUT.jsonl
The output is written to OUT.jsonl.tmp and renamed, so a Makefile target never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path


def _id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def stack_exchange(record: dict, index: int) -> dict:
    return {
        "qid": index,
        "question": record["prompt"],
        "date": "2023/01/01",
        "metadata": [],
        "response_j": record["chosen"],
        "response_k": record["rejected"],
    }


def questions(record: dict, index: int) -> dict:
    return {"qid": index, "question": record["prompt"]}


def ultrafeedback(record: dict, index: int) -> dict:
    user = {"role": "user", "content": record["prompt"]}
    chosen = [user, {"role": "assistant", "content": record["chosen"]}]
    rejected = [user, {"role": "assistant", "content": record["rejected"]}]
    return {
        "prompt": record["prompt"],
        "prompt_id": _id(record["prompt"]),
        "chosen": chosen,
        "rejected": rejected,
        "messages": chosen,
    }


LAYOUTS = {"stack-exchange": stack_exchange, "questions": questions, "ultrafeedback": ultrafeedback}


def convert(layout: str, source: Path, target: Path) -> int:
    rewrite = LAYOUTS[layout]
    records = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + ".tmp")
    staging.write_text("".join(json.dumps(rewrite(r, i)) + "\n" for i, r in enumerate(records)), encoding="utf-8")
    os.replace(staging, target)
    return len(records)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in LAYOUTS:
        print(f"usage: python {Path(__file__).name} {{{','.join(LAYOUTS)}}} IN.jsonl OUT.jsonl", file=sys.stderr)
        return 2
    count = convert(argv[0], Path(argv[1]), Path(argv[2]))
    print(f"{argv[2]}: {count} records in the {argv[0]} layout", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
