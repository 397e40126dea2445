"""`--tools` and `--env` of a run -> `Agents`: what its episodes need, loaded and checked up front.

Everything here runs from the tokenizer alone, before any weights load, so each way the options can
be wrong costs one line and no minutes: a spec that does not import or cannot be described to the
model, an environment class that cannot be built (the one instance built to read its tools), two
tools of one name, a chat template that cannot append tool turns to sampled tokens
(`transcript.check_tool_template`), and prompts that no longer fit once the tools are shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlkit.agents.environment import EnvironmentPool, load_environment
from rlkit.agents.toolset import Toolset, load_tools
from rlkit.agents.transcript import check_tool_template, prompt_ids
from rlkit.console import warn
from rlkit.data.prompts import PromptRows
from rlkit.data.templates import ChatTemplate


@dataclass(frozen=True)
class Agents:
    """The run's standalone tools, its environment (None without --env), the template tool turns are
    rendered with, the cap on tool rounds per episode (None: only the token budget) and the seconds
    a tool call may take (None: no limit)."""

    tools: Toolset
    environment: EnvironmentPool | None
    template: ChatTemplate
    max_turns: int | None
    timeout: float | None

    @property
    def toolset(self) -> Toolset:
        """Every tool the model is shown: the standalone ones, then the environment's (TRL's order)."""
        return self.tools.merged(self.environment.toolset) if self.environment is not None else self.tools

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return self.toolset.schemas

    @property
    def tool_names(self) -> tuple[str, ...]:
        return tuple(tool.name for tool in self.toolset.tools)

    def encode_prompts(self, tokenizer: Any, prompts: PromptRows, room: int) -> tuple[list[int], list[list[int]]]:
        """The indices and token ids of the prompts of at most `room` tokens once the tools' schemas are
        shown with them (the system turn grows by every schema), warning once about the rest."""
        kept, encoded = [], []
        for index, messages in enumerate(prompts.conversations):
            ids = prompt_ids(tokenizer, self.template, messages, self.schemas)
            if len(ids) <= room:
                kept.append(index)
                encoded.append(ids)
        if len(kept) < len(prompts.conversations):
            warn(
                f"{len(prompts.conversations) - len(kept)} of {len(prompts.conversations)} prompts are longer than "
                f"--max-length - --max-new-tokens ({room} tokens) with the tools' descriptions and were dropped"
            )
        return kept, encoded

    def describe(self) -> str:
        """One line for the log and the model card."""
        parts = []
        if self.tools:
            parts.append("tools " + ", ".join(f"`{tool.source}`" for tool in self.tools.tools))
        if self.environment is not None:
            env = self.environment
            methods = ", ".join(env.method_names) or "none"
            reward = "; its get_reward() a reward of weight 1" if env.has_reward else ""
            parts.append(f"environment `{env.spec}` (tools: {methods}{reward})")
        limit = f"at most {self.max_turns} tool rounds" if self.max_turns is not None else "no limit on tool rounds"
        timeout = f"{self.timeout:g} s per call" if self.timeout is not None else "no time limit per call"
        return f"{'; '.join(parts)}; {limit}, {timeout}; template {self.template.name}"


def load_agents(
    tools: Sequence[str],
    env: str | None,
    tokenizer: Any,
    template: ChatTemplate,
    max_turns: int | None,
    timeout: float | None,
) -> Agents:
    """Import and describe the tools, build the environment's first instance, check the template."""
    agents = Agents(load_tools(tools), load_environment(env) if env else None, template, max_turns, timeout)
    check_tool_template(tokenizer, template, agents.schemas)  # also refuses two tools of one name
    return agents
