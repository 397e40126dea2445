"""Generation with tools outside training (`eval --tools`, piped `chat --tools`): grpo's episode sampler.

There is one multi-turn sampler, `rlkit.training.episodes.sample_episodes`: every episode of a
chunk advancing one turn per `generate` call, each tool turn appended token-exactly after the
model's sampled ids, `--max-new-tokens` the whole episode's budget and `--max-turns` capping its
tool rounds. Eval and chat run that sampler itself rather than a second loop, so a model is used
and measured under the rules it was trained under, reward functions get the same `completions`
and `completion_ids`, and the report has the same `tools/` metrics as grpo's log.

What the sampler reads of a training run is supplied here for one process and a plain model:
`OneProcess` stands for the accelerator (the model's device; no autocast: the weights' own dtype,
as eval's single-turn generation) and `Generator` for the policy wrapper (a LoRA adapter is folded
in for generation as in training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlkit.agents.setup import Agents
from rlkit.agents.transcript import Conversation, prompt_ids
from rlkit.data.prompts import PromptRows
from rlkit.models.modes import model_device
from rlkit.tools.generation import GeneratedReply, SamplingConfig
from rlkit.training.episodes import EpisodeSamples, episode_metrics, sample_episodes
from rlkit.training.rollout import RolloutInputs, RolloutSampling


@dataclass(frozen=True)
class OneProcess:
    """The accelerator's part the rollout stages read, for generation in one process."""

    device: torch.device
    num_processes: int = 1

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        yield


@dataclass(frozen=True)
class Generator:
    """The policy wrapper's part the sampler reads: the model that generates."""

    policy: torch.nn.Module


@dataclass(frozen=True)
class ToolEpisodes:
    """Episodes with tools, one per row asked for, and grpo's `tools/` metrics of them (timings
    left out: eval's report is the same on every run)."""

    samples: EpisodeSamples
    metrics: dict[str, float]

    def replies(self) -> list[GeneratedReply]:
        """Each episode as eval scores a generation: the prompt's ids, every id after it (tool turns
        included, TRL's multi-turn `completion_ids`) with the mask of those the model sampled, and
        the transcript (`[tool NAME] result` lines between the turns), as grpo's reward functions get it."""
        s = self.samples
        return [
            GeneratedReply(
                s.query_ids[row][s.query_mask[row].bool()].tolist(),
                list(ids),
                s.completions[row],
                mask=s.response_mask[row, : len(ids)].tolist(),
            )
            for row, ids in enumerate(s.completion_ids)
        ]

    def messages(self, row: int) -> Conversation:
        """The whole conversation of an episode: its prompt, then its turns and tool results."""
        return [*self.samples.conversations[row], *self.samples.exchanges[row]]


def generate_with_tools(
    model: Any,
    tokenizer: Any,
    agents: Agents,
    prompts: PromptRows,
    sampling: SamplingConfig,
    n: int = 1,
    seed: int | None = None,
) -> ToolEpisodes:
    """`n` episodes per prompt (prompt-major order), `sampling.batch_size` advancing together; the
    chunk of rows from `start` sampled with `seed + start` (None: the running generator)."""
    model.eval()
    encoded = [prompt_ids(tokenizer, agents.template, c, agents.schemas) for c in prompts.conversations]
    inputs = RolloutInputs(OneProcess(model_device(model)), tokenizer, prompts, encoded, None)
    how = RolloutSampling(
        sampling.max_new_tokens,
        sampling.temperature,
        sampling.top_p,
        None,
        chunk=sampling.batch_size,
        seed=None if seed is None else (lambda _step, start: seed + start),
    )
    rows: Sequence[int] = [i for i in range(len(encoded)) for _ in range(n)]
    samples = sample_episodes(inputs, Generator(model), list(rows), 0, how, agents)
    metrics = episode_metrics(inputs, samples, agents.tool_names)
    return ToolEpisodes(samples, {k: v for k, v in metrics.items() if not k.startswith("time/")})
