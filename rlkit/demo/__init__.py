"""The shipped demo: a tiny verifiable task and its data for an end-to-end run on CPU.

The task (answer in one short line ending with ``#done``; arithmetic answered as
``The answer is N. #done``) is defined once, in `rlkit.demo.task`, which holds both the
checker (``score``, ``reward``, ``has_target_behaviour``, ``metrics``) and the seeded generator
of the JSONL files in ``rlkit/demo/data/``. See ``rlkit/demo/README.md`` for the design.
"""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
"""Directory of the shipped JSONL files (sft, pairs, pairs_eval, unpaired, prompts, eval_prompts)."""
