"""Chat templates and the one mechanism that decides which tokens carry a label.

A conversation is rendered into alternating segments: text the model reads (system, user,
template markup) and text it must learn to write (each assistant turn, ending with EOS).
Each segment is tokenized on its own, exactly as generation will see it: the prompt is
tokenized alone and the reply is appended token by token, so training and inference agree at
the prompt/completion boundary. The segments come from the template itself, by rendering each
prefix of the conversation, so any Jinja template works without `{% generation %}` markers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rlkit.data.formats import Messages
from rlkit.data.text import read_utf8
from rlkit.errors import InputError

SHIPPED = ("chatml", "chatml-tools", "smollm2-tools", "tulu", "llama-2", "zephyr", "stack-exchange", "raw")


@dataclass(frozen=True)
class ChatTemplate:
    """`name` is what the user asked for ("tokenizer" for the tokenizer's own), `source` the Jinja."""

    name: str
    source: str


def shipped_template(name: str) -> str:
    return resources.files("rlkit.templates").joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def resolve_template(name: str | None, tokenizer: Any, tokenizer_name: str = "the tokenizer") -> ChatTemplate:
    """`--template` value (None, a shipped name, or a .jinja path) -> the template to use."""
    if name is None or name == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(
                f"{tokenizer_name} has no chat template; pass --template with one of "
                f"{', '.join(SHIPPED)} or a path to a .jinja file"
            )
        return ChatTemplate("tokenizer", tokenizer.chat_template)
    if name in SHIPPED:
        return ChatTemplate(name, shipped_template(name))
    path = Path(name)
    if path.is_file():
        return ChatTemplate(str(path), read_utf8(path))
    raise InputError(f"--template {name!r}: not a shipped template ({', '.join(SHIPPED)}) and no such .jinja file")


def render(
    tokenizer: Any,
    template: ChatTemplate,
    messages: Messages,
    add_generation_prompt: bool = False,
    *,
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    """The conversation as the template writes it, with `tools`' schemas shown to the model. Tool
    messages, tool calls and schemas are refused for a template that never mentions them: it would
    drop them silently, and the model would be trained on a conversation it never sees."""
    _check_renders_tools(template, messages, tools)
    try:
        return tokenizer.apply_chat_template(
            list(messages),
            chat_template=template.source,
            tools=list(tools) if tools else None,  # None, not []: some templates render boilerplate for []
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as err:  # jinja raises its own exception types (and templates raise_exception)
        raise InputError(f"template {template.name!r} failed to render a conversation: {_first_line(err)}")


def _check_renders_tools(template: ChatTemplate, messages: Messages, tools: Sequence[dict[str, Any]] | None) -> None:
    needs = [
        ("tool", "a 'tool' role", any(m["role"] == "tool" for m in messages)),
        ("tool_calls", "assistant tool_calls", any(m.get("tool_calls") for m in messages)),
        ("tools", "tool schemas", bool(tools)),
    ]
    for word, what, present in needs:
        if present and word not in template.source:
            raise InputError(
                f"template {template.name!r} does not render {what}, so the model would never see them; "
                "pass a --template that renders them (chatml-tools for ChatML models)"
            )


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def render_segments(
    tokenizer: Any, template: ChatTemplate, messages: Messages, tools: Sequence[dict[str, Any]] | None = None
) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trainable) segments, one per assistant turn.

    The trainable span of assistant turn i is what rendering messages[:i+1] adds to rendering
    messages[:i] with the generation prompt; trailing whitespace stays untrained, and EOS is
    appended when the template does not end the turn with it, so generation learns to stop.
    """
    full = render(tokenizer, template, messages, tools=tools)
    eos = tokenizer.eos_token or ""
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = (
            render(tokenizer, template, messages[:i], add_generation_prompt=True, tools=tools) if i or tools else ""
        )
        through = render(tokenizer, template, messages[: i + 1], tools=tools)
        if not through.startswith(prefix) or not full.startswith(through) or len(prefix) < cursor:
            raise InputError(
                f"template {template.name!r} does not render conversations incrementally, so assistant turns "
                "cannot be located; use a shipped --template"
            )
        reply = through[len(prefix) :].rstrip()
        segments.append((full[cursor : len(prefix)], False))
        if eos and not reply.endswith(eos):
            reply += eos
        segments.append((reply, True))
        cursor = len(prefix) + len(through[len(prefix) :].rstrip())
    segments.append((full[cursor:], False))
    return [(text, trainable) for text, trainable in segments if text]


def prompt_text(
    tokenizer: Any, template: ChatTemplate, messages: Messages, tools: Sequence[dict[str, Any]] | None = None
) -> str:
    """What the model is given at generation time: the conversation (with `tools`' schemas) plus the
    assistant header."""
    return render(tokenizer, template, messages, add_generation_prompt=True, tools=tools)
