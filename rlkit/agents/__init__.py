"""Tools and environments for multi-turn GRPO episodes (issue #28), in TRL's conventions.

The building blocks a sampler calls, one job each:

- `toolset`: `--tools module:function` -> `Toolset` (the functions by name, and the JSON schemas
  `apply_chat_template(..., tools=)` shows the model);
- `environment`: `--env module:Class` -> `EnvironmentPool` (one instance per concurrent episode,
  reset with the row's columns; its public methods are the episode's tools; optional `get_reward`);
- `calls`: the `<tool_call>{...}</tool_call>` blocks of a completion -> `ToolCall`s;
- `execution`: one call against the tools -> `ToolOutcome` (the text the model reads back), with a
  timeout, stdout kept clean and stdin empty; `ToolCounts` for the metrics log;
- `transcript`: the token ids appended after the model's sampled turn (tool turns and the next
  generation prompt, never a re-encoding of sampled ids), the template check, the loss mask;
- `turn`: all of the above for one round of one episode;
- `setup`: a run's `--tools` / `--env` -> `Agents`, loaded and checked (template included) before
  any weights load.

The sampler that runs episodes with them is `rlkit.training.episodes`.
"""
