"""One tool round of one episode: the model's turn read, its calls run, the ids to append.

What a multi-turn sampler calls per episode after each generation: a completion with no tool call
ends the episode (None); otherwise the round's assistant and tool messages carry the conversation
on, and `appended_ids` (mask 0) go after the sampled ids before the next generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlkit.agents.calls import parse_turn
from rlkit.agents.execution import DEFAULT_TIMEOUT, ToolOutcome, execute_all
from rlkit.agents.toolset import Toolset
from rlkit.agents.transcript import Conversation, tool_turn_ids
from rlkit.data.templates import ChatTemplate


@dataclass(frozen=True)
class ToolRound:
    """The assistant message (its text and readable calls), how each call went, and the ids to append."""

    assistant: dict[str, Any]
    outcomes: tuple[ToolOutcome, ...]
    appended_ids: tuple[int, ...]

    @property
    def messages(self) -> Conversation:
        """The round's messages, to append to the conversation: the assistant turn, then one tool
        message per call in order (TRL's shape)."""
        return [self.assistant, *(outcome.as_message() for outcome in self.outcomes)]


def tool_round(
    completion: str,
    conversation: Conversation,
    tools: Toolset,
    tokenizer: Any,
    template: ChatTemplate,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> ToolRound | None:
    """The round `completion` (the turn's text, decoded with special tokens skipped) starts, or None
    where it calls no tool. `conversation` is everything before it: the prompt (with `reset`'s
    observation) and the earlier rounds' messages."""
    parsed = parse_turn(completion)
    if not parsed.calls:
        return None
    outcomes = execute_all(parsed.calls, tools, timeout)
    assistant = parsed.as_message()
    results = [outcome.as_message() for outcome in outcomes]
    ids = tool_turn_ids(tokenizer, template, [*conversation, assistant], results, tools.schemas)
    return ToolRound(assistant, outcomes, tuple(ids))
