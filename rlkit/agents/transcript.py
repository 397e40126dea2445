"""Token-exact tool turns: what follows the model's sampled turn, and which tokens it is trained on.

The model's sampled ids are never decoded and re-encoded: text does not round-trip through a
tokenizer (the same text has many tokenisations), and the policy must be trained on the very ids it
sampled, with the log-probs it sampled them at. So an episode grows by appending: after a turn that
called tools (its ids through the end-of-turn token the sampler stopped at), the tool results and the
next generation prompt are appended as ids of their own, computed from the chat template:

    appended = render(conversation + tool messages, generation prompt)[cut:]
    cut      = end of render(conversation) with trailing whitespace stripped

tokenised on their own (`add_special_tokens=False`). `cut` puts what the template writes after the
assistant's end-of-turn token (ChatML's "\\n" after <|im_end|>) in the appended part, which is exactly
how `rlkit.data.templates.render_segments` splits a conversation for SFT (an assistant turn is its
rendering with trailing whitespace stripped, EOS added where the template has none), so a multi-turn
episode is the token sequence SFT trains on for the same conversation, and the appended ids carry
loss mask 0 (`EpisodeTokens`). TRL does the same with a dummy conversation, cutting after the EOS.

This works only for a template that renders a tool turn as a pure suffix: the conversation without
the tool messages must render as a prefix of the one with them (a template that rewrites or drops
earlier turns once more follow, like Qwen3's reasoning stripping, is not), and the assistant's tool
calls must render in the form `calls` reads back. `check_tool_template` refuses any other template
with one line, from the tokenizer alone, before any weights load.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rlkit.agents.calls import CLOSE, OPEN, ToolCall, parse_turn
from rlkit.data.templates import ChatTemplate, render
from rlkit.data.tokenize import IGNORE, finish_ids, wants_bos
from rlkit.errors import InputError, RunError

Conversation = list[dict[str, Any]]
Schemas = Sequence[dict[str, Any]]


def prompt_text(tokenizer: Any, template: ChatTemplate, messages: Conversation, tools: Schemas | None = None) -> str:
    """What the model is given for its first turn: the prompt with the tools and the assistant header
    (tokenise it as any prompt is, `rlkit.data.prompts`, one BOS)."""
    return render(tokenizer, template, messages, add_generation_prompt=True, tools=tools)


def prompt_ids(
    tokenizer: Any, template: ChatTemplate, messages: Conversation, tools: Schemas | None = None
) -> list[int]:
    """`prompt_text`'s token ids, with exactly one leading BOS where the tokenizer wants one: the
    rule every rlkit prompt is tokenised by (`rlkit.data.prompts`), so a prompt with tools starts
    the way training saw prompts start."""
    ids = tokenizer(prompt_text(tokenizer, template, messages, tools), add_special_tokens=False)["input_ids"]
    bos_id = tokenizer.bos_token_id if wants_bos(tokenizer) else None
    return finish_ids(list(ids), [IGNORE] * len(ids), bos_id)[0]


def tool_turn_text(
    tokenizer: Any,
    template: ChatTemplate,
    conversation: Conversation,
    tool_messages: Conversation,
    tools: Schemas | None = None,
) -> str:
    """The text after the model's turn: from its end-of-turn on, through the tool turns and the next
    generation prompt. `conversation` ends with the assistant turn that made the calls."""
    before = render(tokenizer, template, conversation, tools=tools)
    cut = len(before.rstrip())
    after = render(tokenizer, template, [*conversation, *tool_messages], add_generation_prompt=True, tools=tools)
    if not after.startswith(before[:cut]):
        raise RunError(
            f"template {template.name!r} rendered this episode's earlier turns differently once its tool results "
            "followed, so its tool turn cannot be appended to the sampled tokens; use --template chatml-tools"
        )
    return after[cut:]


def tool_turn_ids(
    tokenizer: Any,
    template: ChatTemplate,
    conversation: Conversation,
    tool_messages: Conversation,
    tools: Schemas | None = None,
) -> list[int]:
    """The token ids to append after the model's sampled turn (see the module doc): loss mask 0."""
    text = tool_turn_text(tokenizer, template, conversation, tool_messages, tools)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class EpisodeTokens:
    """An episode's completion, everything after the prompt: `ids`, and `mask` 1 on the tokens the
    model sampled (trained), 0 on those appended for it (tool turns, template markup, the next
    generation prompt). Grows by `sampled` and `appended`, in order."""

    ids: tuple[int, ...] = ()
    mask: tuple[int, ...] = ()

    def sampled(self, ids: Sequence[int]) -> EpisodeTokens:
        return EpisodeTokens(self.ids + tuple(ids), self.mask + (1,) * len(ids))

    def appended(self, ids: Sequence[int]) -> EpisodeTokens:
        return EpisodeTokens(self.ids + tuple(ids), self.mask + (0,) * len(ids))

    @classmethod
    def of(cls, pieces: Iterable[tuple[Sequence[int], bool]]) -> EpisodeTokens:
        """From (ids, sampled?) pieces in order."""
        tokens = cls()
        for ids, sampled in pieces:
            tokens = tokens.sampled(ids) if sampled else tokens.appended(ids)
        return tokens

    def __len__(self) -> int:
        return len(self.ids)


# ---- the template check ------------------------------------------------------------------------

_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_lookup",
        "description": "Looks a probe up.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "What to look up."}},
            "required": ["query"],
        },
    },
}


def _probe_conversation() -> Conversation:
    """Two tool rounds (one call, then two) between a system prompt and a final answer."""

    def call(query: str) -> dict[str, Any]:
        return ToolCall("probe_lookup", {"query": query}).as_message()

    def result(text: str) -> dict[str, Any]:
        return {"role": "tool", "name": "probe_lookup", "content": text}

    return [
        {"role": "system", "content": "You are a probe."},
        {"role": "user", "content": "Probe question?"},
        {"role": "assistant", "content": "", "tool_calls": [call("first probe")]},
        result("first probe result"),
        {"role": "assistant", "content": "Probe thought.", "tool_calls": [call("second probe"), call("third probe")]},
        result("second probe result"),
        result("third probe result"),
        {"role": "assistant", "content": "Probe answer."},
    ]


def check_tool_template(tokenizer: Any, template: ChatTemplate, tools: Schemas | None = None) -> None:
    """Refuse (one `InputError` line) a template episodes with tools cannot use; needs only the tokenizer.

    On a probe conversation of two tool rounds, every assistant turn must render as a pure suffix of
    the conversation before it plus the generation prompt, its tool calls must read back through
    `calls.parse_turn` as the calls they were, and the tool results must render as a pure suffix of
    the assistant turn that asked for them (after its end of turn), each result shown."""
    schemas = list(tools) if tools else [_PROBE_TOOL]
    conversation = _probe_conversation()
    name = template.name
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        header = render(tokenizer, template, conversation[:i], add_generation_prompt=True, tools=schemas)
        through = render(tokenizer, template, conversation[: i + 1], tools=schemas)
        if not through.startswith(header):
            raise InputError(
                f"template {name!r} renders earlier turns differently once another turn follows, so an episode's "
                "turns cannot be appended to its sampled tokens; use --template chatml-tools"
            )
        if "tool_calls" not in message:
            continue
        expected = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
        parsed = parse_turn(through[len(header) :])
        if [(c.name, dict(c.arguments)) for c in parsed.good_calls] != expected or len(parsed.calls) != len(expected):
            raise InputError(
                f'template {name!r} does not render an assistant\'s tool calls as {OPEN}{{"name": ..., '
                f'"arguments": {{...}}}}{CLOSE} blocks, the form rlkit reads tool calls in; use --template chatml-tools'
            )
        end = i + 1
        while end < len(conversation) and conversation[end]["role"] == "tool":
            end += 1
        cut = len(through.rstrip())
        after = render(tokenizer, template, conversation[:end], add_generation_prompt=True, tools=schemas)
        if not after.startswith(through[:cut]):
            raise InputError(
                f"template {name!r} does not render a tool turn as a pure suffix (the conversation before the tool "
                "results renders differently once they follow), so tool turns cannot be appended to sampled tokens; "
                "use --template chatml-tools"
            )
        missing = [m["content"] for m in conversation[i + 1 : end] if m["content"] not in after[cut:]]
        if missing:
            raise InputError(
                f"template {name!r} does not show tool results to the model (a 'tool' message renders as nothing); "
                "use --template chatml-tools"
            )


def _line(err: BaseException) -> str:
    return " ".join(str(err).split())
