"""`--tools module:function` -> the functions the model may call, and the schemas it is shown.

A tool is a typed Python function with a Google-style docstring, exactly what TRL's `tools=` takes:
its JSON schema comes from `transformers.utils.get_json_schema` (the one `apply_chat_template`
itself uses for callables), so a tool that ports from TRL is described to the model identically.
A function that cannot be described is refused before any weights load, with what to add.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlkit.agents.loading import import_object
from rlkit.errors import InputError


@dataclass(frozen=True)
class Tool:
    """A callable the model may call by `name`; `source` says where it came from (the spec, or
    `Class.method` for an environment's tool), for messages."""

    name: str
    function: Callable[..., Any]
    schema: Mapping[str, Any]
    source: str


@dataclass(frozen=True)
class Toolset:
    """The tools of an episode, in the order their schemas are shown. Names are unique: the model
    calls a tool by name, so two tools of one name (a function and an environment method) would
    make every call to it ambiguous; TRL silently keeps the last, rlkit refuses the pair."""

    tools: tuple[Tool, ...] = ()

    def __post_init__(self) -> None:
        seen: dict[str, Tool] = {}
        for tool in self.tools:
            if tool.name in seen:
                raise InputError(
                    f"two tools are named {tool.name!r} ({seen[tool.name].source} and {tool.source}); "
                    "the model calls tools by name, so rename one"
                )
            seen[tool.name] = tool

    def get(self, name: str) -> Tool | None:
        return next((tool for tool in self.tools if tool.name == name), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(tool.name for tool in self.tools)

    @property
    def schemas(self) -> list[dict[str, Any]]:
        """What `apply_chat_template(..., tools=schemas)` takes (None where there are no tools: some
        templates render tool boilerplate for an empty list, so pass `schemas or None`)."""
        return [dict(tool.schema) for tool in self.tools]

    def merged(self, other: Toolset) -> Toolset:
        """Standalone tools and an environment's, as one set (TRL: `tools + methods`)."""
        return Toolset(self.tools + other.tools)

    def __len__(self) -> int:
        return len(self.tools)


def describe(function: Callable[..., Any], source: str, option: str = "--tools") -> Tool:
    """A `Tool` for `function` with its JSON schema, or an `InputError` saying what to add."""
    from transformers.utils import get_json_schema
    from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException

    try:
        schema = get_json_schema(function)
    except TypeHintParsingException as err:
        raise InputError(
            f"{option} {source}: cannot describe it to the model ({_line(err)}); give every argument a type hint"
        )
    except DocstringParsingException as err:
        raise InputError(
            f"{option} {source}: cannot describe it to the model ({_line(err)}); give it a Google-style docstring: "
            "a description, then `Args:` with one `name: what it is` line per argument"
        )
    except Exception as err:  # anything else get_json_schema trips on (an odd signature, an unsupported hint)
        raise InputError(
            f"{option} {source}: cannot describe it to the model ({_line(err)}); use plain typed arguments "
            "(str, int, float, bool, list[...], dict[...], Literal[...]) and a Google-style docstring"
        )
    return Tool(schema["function"]["name"], function, schema, source)


def load_tools(specs: Iterable[str], option: str = "--tools") -> Toolset:
    """`module:function` specs -> a `Toolset`, each function imported and described."""
    tools = []
    for spec in specs:
        function = import_object(spec, option, "function")
        if inspect.isclass(function) or not callable(function):
            kind = "a class" if inspect.isclass(function) else f"a {type(function).__name__}"
            raise InputError(f"{option} {spec}: is {kind}, not a function (an environment class goes to --env)")
        tools.append(describe(function, spec, option))
    return Toolset(tuple(tools))


def tools_of(functions: Sequence[Callable[..., Any]], source: str = "tools") -> Toolset:
    """A `Toolset` of functions given directly (tests, Python callers)."""
    return Toolset(tuple(describe(f, f"{source}:{getattr(f, '__name__', f)}") for f in functions))


def _line(err: BaseException) -> str:
    return " ".join(str(err).split())
