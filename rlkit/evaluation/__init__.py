"""`rlkit eval`: the questions a user asks after training, one JSON object of metrics each.

- `pairs`: reward-model accuracy, or a DPO/KTO policy's implicit-reward accuracy, on pairs;
- `generation`: generate from prompts, score, KL to a reference, win rate against a baseline;
- `completions`: score completions already made (`rlkit chat M < prompts > out.jsonl`);
- `sft`: loss and perplexity on a dataset.

Each module answers one question; `run` picks the question from the flags and reports.
"""
