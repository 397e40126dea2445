"""`--env module:Class` -> an `EnvironmentPool`: TRL's `environment_factory`, one episode per instance.

The conventions a TRL environment is written against, kept so it ports unchanged:

- the class is called with no arguments; instances are pooled, one per concurrent episode, built
  once and reused across steps (an expensive `__init__` is paid once), the pool growing only when a
  batch has more episodes than instances. One instance is built up front, to read its tools;
- every episode starts with `reset(**row)`: every column of the prompt row as a keyword, `prompt`
  included (TRL calls `environment.reset(**x)` on the whole example), so a `reset(self, target,
  **kwargs)` reads its task from the data;
- `reset` returns None, or text appended to the last message of the prompt (`content + text`, no
  separator, as TRL does);
- the tools are the instance's public methods (bound methods, `inspect.getmembers(instance,
  inspect.ismethod)`, names not starting with "_") other than `reset` and `get_reward`, each typed
  and documented like any tool (`toolset.describe`);
- an optional `get_reward()` (no arguments, a float, or None for no opinion; sync or async) is read
  after the episode, from the state the episode left.

The environment's own code failing is the run's failure: a constructor, `reset` or `get_reward`
that raises (SystemExit included) is one `RunError` line naming the class and the row. While that
code runs its prints go to stderr and its stdin is empty.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlkit.agents.loading import import_object
from rlkit.agents.quarantine import quarantined
from rlkit.agents.toolset import Tool, Toolset, describe
from rlkit.errors import InputError, RunError
from rlkit.scoring import _described, _InterruptWatch, _where

RESERVED = ("reset", "get_reward")


@dataclass(frozen=True)
class EnvironmentEpisode:
    """One episode's environment: the instance, its tools (bound to it), and what `reset` returned."""

    row: int
    environment: Any
    tools: Toolset
    observation: str | None


class EnvironmentPool:
    """Instances of one environment class, each reset per episode (see the module's conventions).

    `start(rows)` hands out instances 0..n-1 for a batch of n episodes, so the previous batch's
    episodes (and their `get_reward`) must be done with first."""

    def __init__(self, factory: type, spec: str, option: str = "--env"):
        self.factory, self.spec, self.option = factory, spec, option
        self.name = getattr(factory, "__qualname__", repr(factory))
        probe = self._build("(the first instance, built to read its tools)")
        if not callable(getattr(probe, "reset", None)):
            raise InputError(
                f"{option} {spec}: {self.name} has no reset method; TRL's environments define reset(**kwargs)"
            )
        members = self._call(inspect.getmembers, (probe, inspect.ismethod), {}, f"reading {self.name}'s methods")
        self.method_names = tuple(name for name, _ in members if name not in RESERVED and not name.startswith("_"))
        try:
            self.schemas = {
                name: describe(getattr(probe, name), f"{spec} ({self.name}.{name})", option).schema
                for name in self.method_names
            }
        except InputError as err:  # every public method is a tool, so a helper must be private to stay one
            raise InputError(f"{err} (or, if it is no tool, name it with a leading _)")
        self.has_reward = callable(getattr(probe, "get_reward", None))
        self._instances = [probe]
        self.episodes: list[EnvironmentEpisode] = []  # the batch `start` handed out last

    @property
    def toolset(self) -> Toolset:
        """The environment's tools as the model is shown them (bound to the first instance): their
        schemas go into the prompt, and `Toolset.merged` checks names against standalone tools."""
        return self._tools_of(self._instances[0])

    def start(
        self, rows: Sequence[Mapping[str, Any]], indices: Sequence[int] | None = None
    ) -> list[EnvironmentEpisode]:
        """Reset one instance per row with the row's columns; `indices` number the rows in messages
        (the rows' positions in the data; default 0..n-1)."""
        indices = list(range(len(rows))) if indices is None else list(indices)
        episodes = []
        for slot, (row, index) in enumerate(zip(rows, indices)):
            if slot == len(self._instances):
                self._instances.append(self._build(f"for row {index}"))
            instance = self._instances[slot]
            observation = self._reset(instance, row, index)
            episodes.append(EnvironmentEpisode(index, instance, self._tools_of(instance), observation))
        self.episodes = episodes
        return episodes

    def reward(self, episode: EnvironmentEpisode) -> float | None:
        """The episode's `get_reward()`, or None where the class has none (or it has no opinion)."""
        if not self.has_reward:
            return None
        value = self._call(episode.environment.get_reward, (), {}, f"{self.name}.get_reward() for row {episode.row}")
        if value is None:
            return None
        try:
            return float(value)
        except Exception:
            raise RunError(
                f"{self.option} {self.spec}: {self.name}.get_reward() returned {value!r} for row {episode.row}; "
                "it must return a float or None"
            )

    def _tools_of(self, instance: Any) -> Toolset:
        return Toolset(
            tuple(
                Tool(name, getattr(instance, name), self.schemas[name], f"{self.spec} ({self.name}.{name})")
                for name in self.method_names
            )
        )

    def _build(self, why: str) -> Any:
        return self._call(self.factory, (), {}, f"{self.name}() {why}")

    def _reset(self, instance: Any, row: Mapping[str, Any], index: int) -> str | None:
        what = f"{self.name}.reset() for row {index}"
        try:
            inspect.signature(instance.reset).bind(**row)
        except TypeError as err:
            raise RunError(
                f"{self.option} {self.spec}: {what} cannot take the row's columns ({', '.join(map(str, row))}): {err}; "
                "every column is passed as a keyword, as TRL does: add **kwargs to reset"
            )
        except ValueError:  # no signature to check
            pass
        observation = self._call(instance.reset, (), dict(row), what)
        if observation is not None and not isinstance(observation, str):
            raise RunError(
                f"{self.option} {self.spec}: {what} returned {type(observation).__name__}; "
                "it must return None or text to append to the prompt"
            )
        return observation

    def _call(self, function: Any, args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> Any:
        """The user's code, its failures one line naming `what` (the class, the method and the row)."""
        with _InterruptWatch() as watch:
            try:
                with quarantined():
                    value = function(*args, **kwargs)
                    if inspect.isawaitable(value):  # async get_reward (an LLM judge), as TRL allows
                        value = asyncio.run(_awaited(value))
                    return value
            except BaseException as err:  # the user's code: SystemExit and its own KeyboardInterrupt too
                if isinstance(err, KeyboardInterrupt) and watch.delivered:  # a real Ctrl-C: the user's to act on
                    raise
                raise RunError(f"{self.option} {self.spec}: {what} raised {_described(err)}{_where(err)}") from None


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


class EnvironmentReward:
    """An environment's `get_reward()` as one more reward of the run (an `rlkit.scoring.Reward`, TRL's
    extra reward source of weight 1, named after the class): the scores of the episodes the pool
    started last, in order, read from the state they left. The rows it is called with are those
    episodes' (the rollout scores what it sampled), so their texts are not read, only counted."""

    def __init__(self, pool: EnvironmentPool):
        self.pool = pool

    def __call__(self, conversations: Sequence[Any], completions: Sequence[str]) -> list[float | None]:
        episodes = self.pool.episodes
        if len(episodes) != len(completions):
            raise RunError(
                f"{self.pool.option} {self.pool.spec}: {len(completions)} completions to score but "
                f"{len(episodes)} episodes of {self.pool.name} were run"
            )
        return [self.pool.reward(episode) for episode in episodes]


def load_environment(spec: str, option: str = "--env") -> EnvironmentPool:
    """`module:Class` -> its pool (the class imported, one instance built, its tools described)."""
    factory = import_object(spec, option, "class")
    if not inspect.isclass(factory):
        raise InputError(
            f"{option} {spec}: is a {type(factory).__name__}, not a class; pass the environment class "
            "(a function goes to --tools)"
        )
    return EnvironmentPool(factory, spec, option)


def with_observation(prompt: Any, observation: str | None) -> Any:
    """The prompt with `reset`'s text appended to its last message (a new list; the row is left as it
    was), or to the prompt itself where it is a string; unchanged for None."""
    if observation is None:
        return prompt
    if isinstance(prompt, str):
        return prompt + observation
    last = prompt[-1]
    return [*prompt[:-1], {**last, "content": (last.get("content") or "") + observation}]
