"""Stage 1 for agents: multi-turn episodes with tools or an environment, a rollout's episodes sampled together.

`sample_episodes` is `rlkit.training.rollout.sample` for runs with `--tools` / `--env`, and returns
the same record (`EpisodeSamples` is a `Samples` with the episodes' own numbers beside), so the
forward, the scoring and the estimators downstream run unchanged on it:

- turn 1 is `sample`'s generation: per chunk of `RolloutSampling.chunk` rows, LoRA merged, each
  distinct prompt prefilled once (`shared_prefix`), sampled with the chunk's seed;
- every later turn samples, for the chunk's episodes still running (finished ones leave the batch),
  from prompt + the episode so far, left-padded, with a seed of (the chunk's seed, the turn): so two
  processes sample what one does and a resumed run what the uninterrupted one did;
- an episode grows by its sampled ids, kept as sampled (loss mask 1), and after a turn that called
  tools by the ids of the tool turn the template renders (`rlkit.agents.turn.tool_round`, mask 0);
  sampled ids are decoded only to read the calls, never re-encoded;
- an episode ends at a turn without tool calls; at a turn with calls once `--max-turns` rounds have
  run (the calls go unanswered, and the episode counts as stopped by the limit); or when the token
  budget, `--max-new-tokens` for the whole episode (sampled and appended tokens, TRL's
  `max_completion_length`), runs out: in the middle of a turn, or with no room left for a round's
  tool turn and one more token (the round's results are dropped, as TRL rolls them back). Both
  budget ends count as truncated (`has_eos` False): the episode did not finish.

The response of a row is the episode's ids, right-padded; `completion_ids` all of them (TRL passes
reward functions the whole multi-turn completion, tool tokens included: they run through the last
sampled token, where the mask ends); `completions` the transcript, each turn's text with each tool
result on a line of its own, `[tool NAME] result`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from rlkit.agents.calls import parse_turn
from rlkit.agents.environment import with_observation
from rlkit.agents.execution import ToolCounts
from rlkit.agents.setup import Agents
from rlkit.agents.toolset import Toolset
from rlkit.agents.transcript import Conversation, EpisodeTokens, prompt_ids
from rlkit.agents.turn import tool_round
from rlkit.models.merged_lora import lora_merged_for_generation
from rlkit.tools.generation import left_pad
from rlkit.training.rollout import RolloutInputs, RolloutSampling, Samples, generate_rows

#: Turn t > 0 of a chunk is sampled with the chunk's seed + t x this (far from the seeds of other chunks and steps).
TURN_SEED_STRIDE = 1_000_000_007


@dataclass(frozen=True)
class EpisodeSamples(Samples):
    """`Samples` of multi-turn episodes and, per episode, the model's turns and whether `--max-turns`
    stopped it; this process's tool outcomes, and the seconds its tools ran; and each episode's
    `exchanges`: its messages after the prompt (what `chat` and `eval` show of an episode)."""

    turns: list[int]
    stopped_by_max_turns: list[bool]
    tool_counts: ToolCounts
    tool_s: float
    exchanges: tuple[Conversation, ...] = ()


class _Episode:
    """One episode while it is sampled (it lives only inside `sample_episodes`, which reads it out)."""

    def __init__(self, prompt_ids: list[int], prompt: Conversation, tools: Toolset):
        self.prompt_ids, self.prompt = prompt_ids, prompt  # the prompt as the model reads it (observation in)
        self.conversation = prompt  # and the rounds so far: what tool turns render after
        self.tools = tools
        self.tokens = EpisodeTokens()
        self.transcript: list[str] = []
        self.turns = self.rounds = 0
        self.done = self.finished = self.stopped_by_max_turns = False
        self.counts = ToolCounts()
        self.tool_s = 0.0

    @property
    def exchange(self) -> Conversation:
        """The finished episode's messages after the prompt, in TRL's shape: every round's assistant
        turn (its calls as `tool_calls`) and tool results, then the last turn (with its calls where
        they went unanswered, as written where it was cut short)."""
        last = self.transcript[-1]  # once done, the last turn's text (tool lines follow only a round that goes on)
        parsed = parse_turn(last)
        final = parsed.as_message() if parsed.good_calls else {"role": "assistant", "content": last}
        return [*self.conversation[len(self.prompt) :], final]


def sample_episodes(
    inputs: RolloutInputs,
    wrapper: torch.nn.Module,
    indices: list[int],
    rl_step: int,
    how: RolloutSampling,
    agents: Agents,
) -> EpisodeSamples:
    """An episode per row (see the module doc), every running episode of a chunk advancing one turn per
    `generate` call."""
    acc, tok = inputs.accelerator, inputs.tokenizer
    t0 = time.time()
    episodes = _start(inputs, indices, agents)
    with lora_merged_for_generation(wrapper.policy) as generator:
        for start in range(0, len(episodes), how.chunk):
            seed = how.seed(rl_step, start) if how.seed is not None else None
            running, turn = episodes[start : start + how.chunk], 0
            while running:
                for episode, (ids, ended) in zip(running, _turn(generator, running, turn, seed, how, inputs)):
                    _advance(episode, ids, ended, agents, how.max_new_tokens, tok)
                running, turn = [e for e in running if not e.done], turn + 1
    pad, device = tok.pad_token_id, acc.device
    query_ids, query_mask = left_pad([e.prompt_ids for e in episodes], pad)
    responses, response_mask = _right_padded(episodes, pad)
    return EpisodeSamples(
        indices,
        [e.prompt for e in episodes],
        query_ids.to(device),
        query_mask.to(device),
        responses.to(device),
        response_mask.to(device),
        torch.tensor([e.finished for e in episodes], device=device),
        [list(e.tokens.ids) for e in episodes],
        ["\n".join(e.transcript) for e in episodes],
        time.time() - t0,
        [e.turns for e in episodes],
        [e.stopped_by_max_turns for e in episodes],
        sum((e.counts for e in episodes), ToolCounts()),
        sum(e.tool_s for e in episodes),
        tuple(e.exchange for e in episodes),
    )


def _start(inputs: RolloutInputs, indices: list[int], agents: Agents) -> list[_Episode]:
    """An episode per row: its prompt, and with --env its instance reset with the row's columns (TRL
    passes the whole example, `prompt` included) and the prompt with `reset`'s text appended."""
    rows = inputs.prompts
    prompts = [rows.conversations[i] for i in indices]
    if agents.environment is None:
        return [_Episode(inputs.prompt_ids[i], prompt, agents.tools) for i, prompt in zip(indices, prompts)]
    columns = [
        {**rows.columns[i], "prompt": prompt if rows.conversational else prompt[-1]["content"]}
        for i, prompt in zip(indices, prompts)
    ]
    episodes = []
    for i, prompt, env in zip(indices, prompts, agents.environment.start(columns, indices)):
        ids = inputs.prompt_ids[i]
        if env.observation is not None:
            prompt = with_observation(prompt, env.observation)
            ids = prompt_ids(inputs.tokenizer, agents.template, prompt, agents.schemas)
        episodes.append(_Episode(ids, prompt, agents.tools.merged(env.tools)))
    return episodes


def _turn(
    generator: torch.nn.Module,
    running: list[_Episode],
    turn: int,
    seed: int | None,
    how: RolloutSampling,
    inputs: RolloutInputs,
) -> list[tuple[list[int], bool]]:
    """One turn of every running episode, in one `generate` call: each one's sampled ids through its
    first EOS and within its budget, and whether it reached the EOS."""
    acc, tok = inputs.accelerator, inputs.tokenizer
    ids, mask = left_pad([e.prompt_ids + list(e.tokens.ids) for e in running], tok.pad_token_id)
    ids, mask = ids.to(acc.device), mask.to(acc.device)
    room = [how.max_new_tokens - len(e.tokens) for e in running]
    turn_seed = None if seed is None else seed + turn * TURN_SEED_STRIDE
    shared = how.shared_prompts and turn == 0  # each distinct prompt's prefill once, as `sample` does
    new = generate_rows(inputs, generator, ids, mask, how, turn_seed, max(room), shared)
    return [_through_eos(row[:limit], tok.eos_token_id) for row, limit in zip(new.tolist(), room)]


def _through_eos(ids: list[int], eos_id: int) -> tuple[list[int], bool]:
    return (ids[: ids.index(eos_id) + 1], True) if eos_id in ids else (ids, False)


def _advance(episode: _Episode, ids: list[int], ended: bool, agents: Agents, budget: int, tok: Any) -> None:
    """The episode after its turn `ids`: done, or grown by the turn's tool round."""
    episode.turns += 1
    episode.tokens = episode.tokens.sampled(ids)
    text = tok.decode([t for t in ids if t != tok.eos_token_id], skip_special_tokens=True)
    episode.transcript.append(text.strip())
    if not ended:  # the budget ran out in the middle of the turn
        episode.done = True
        return
    if agents.max_turns is not None and episode.rounds == agents.max_turns:
        episode.done = episode.finished = True
        episode.stopped_by_max_turns = bool(parse_turn(text).calls)
        return
    t0 = time.time()
    round_ = tool_round(text, episode.conversation, episode.tools, tok, agents.template, agents.timeout)
    episode.tool_s += time.time() - t0
    if round_ is None:  # no call: the model's answer
        episode.done = episode.finished = True
        return
    episode.counts = episode.counts.add(round_.outcomes)
    if len(episode.tokens) + len(round_.appended_ids) >= budget:  # no room for the results and one more token
        episode.done = True
        return
    episode.tokens = episode.tokens.appended(round_.appended_ids)
    episode.conversation = [*episode.conversation, *round_.messages]
    episode.rounds += 1
    episode.transcript += [f"[tool {o.name}] {o.text}" if o.name else f"[tool] {o.text}" for o in round_.outcomes]


def _right_padded(episodes: list[_Episode], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The episodes' ids [B, R] (padded with `pad_id`) and their loss mask (padding 0)."""
    width = max(len(e.tokens) for e in episodes)
    responses = torch.full((len(episodes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(episodes), width), dtype=torch.long)
    for row, episode in enumerate(episodes):
        n = len(episode.tokens)
        responses[row, :n] = torch.tensor(episode.tokens.ids, dtype=torch.long)
        mask[row, :n] = torch.tensor(episode.tokens.mask, dtype=torch.long)
    return responses, mask


# ---- what a step logs ----------------------------------------------------------------------------


def episode_metrics(inputs: RolloutInputs, samples: EpisodeSamples, tool_names: tuple[str, ...]) -> dict[str, float]:
    """The episodes' numbers over every process's rows: the model's turns per episode, tool calls per
    episode (per tool), failures by kind, the share stopped by --max-turns, the tokens appended."""
    device = samples.responses.device
    turns = inputs.gather(torch.tensor(samples.turns, dtype=torch.float32, device=device))
    stopped = inputs.gather(torch.tensor(samples.stopped_by_max_turns, dtype=torch.float32, device=device))
    lengths = torch.tensor([len(ids) for ids in samples.completion_ids], dtype=torch.float32, device=device)
    appended = inputs.gather(lengths - samples.response_mask.sum(1).float())
    slots = ToolCounts.slots(tool_names)
    counts = torch.tensor([samples.tool_counts.counts.get(s, 0) for s in slots], dtype=torch.float64, device=device)
    across = inputs.across()
    counts = across(counts) if across else counts
    metrics = ToolCounts(dict(zip(slots, (round(n) for n in counts.tolist())))).metrics(episodes=len(turns))
    metrics["tools/turns/mean"] = float(turns.mean())
    metrics["tools/turns/min"] = float(turns.min())
    metrics["tools/turns/max"] = float(turns.max())
    metrics["tools/frac_stopped_by_max_turns"] = float(stopped.mean())
    metrics["tools/appended_tokens/mean"] = float(appended.mean())
    metrics["time/tools_s"] = samples.tool_s
    return metrics
