"""Config dataclasses are the single source of truth for every command's options.

A field declared with `opt(...)` or `arg(...)` becomes a typer option or argument with its help
text and default (CleanRL-style: one documented field, one flag). Values are merged in the
order defaults < `--config FILE.yaml` < command-line flags, so a YAML file can hold a whole
recipe and a flag can still override one value of it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import types
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
import yaml

from rlkit.data.text import read_utf8
from rlkit.errors import InputError

T = TypeVar("T")

CONFIG_HELP = "YAML file of option: value; flags override it."  # every command's --config

# The help panels of the shared options, in the order `--help` shows them after the command's own.
COMMAND_PANEL = "Options"
PANELS = (
    "Inputs and outputs",
    "Data",
    "Model and LoRA",
    "Reference",
    "Optimisation",
    "Speed and memory",
    "Logging and checkpoints",
)


def opt(
    default: Any,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    choices: tuple[str, ...] = (),
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    below: float | None = None,
    finite: bool = True,
    panel: str | None = None,
) -> Any:
    """A config field exposed as `--name` (or the given flag declarations).

    `panel` (one of PANELS) groups the flag in `--help`; without one, a field redefined from a
    base class keeps the base's panel and any other goes to the command's own panel (`Options`).

    The field also declares which values it accepts, once, so `resolve_config` refuses a bad
    value the same way whether it came from a flag or from `--config`: `choices`, an inclusive
    `min`/`max`, an exclusive `above`/`below`, and for a float `finite` (NaN and inf refused).
    """
    factory = None
    if isinstance(default, (list, dict)):
        factory, default = (lambda d=default: type(d)(d)), dataclasses.MISSING
    bounds = {"min": min, "max": max, "above": above, "below": below}
    if panel is not None and panel not in PANELS:
        raise ValueError(f"panel {panel!r}: expected one of {', '.join(PANELS)}")
    metadata = {"help": help, "flags": flags, "choices": choices, "finite": finite, "panel": panel, **bounds}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def arg(help: str, *, metavar: str, default: Any = None) -> Any:
    """A positional config field (MODEL, DATA...). It may also come from the YAML config."""
    metadata = {"help": help, "positional": True, "metavar": metavar}
    if isinstance(default, list):
        return dataclasses.field(default_factory=list, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def default_text(f: dataclasses.Field) -> str | None:
    """An option's default as `--help` and the docs show it (`False`, `a,b`), or None when it has none."""
    default = _default_of(f)
    if default is None or default == []:
        return None
    return ",".join(map(str, default)) if isinstance(default, list) else str(default)


def field_panels(cls: type) -> dict[str, str]:
    """The help panel of each option of `cls`: its own, else that of the base-class field it
    redefines, else the command's own panel."""
    panels: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        declared = inspect.get_annotations(klass)
        for f in dataclasses.fields(klass):
            if f.name in declared and not f.metadata.get("positional"):
                panels[f.name] = f.metadata.get("panel") or panels.get(f.name, COMMAND_PANEL)
    return panels


def option_flags(f: dataclasses.Field, base: Any) -> list[str]:
    """The flag declarations of an option field: its own, else `--name`; a bool as `--name/--no-name`."""
    flags = list(f.metadata["flags"]) or ["--" + f.name.replace("_", "-")]
    if base is bool and "/" not in flags[0]:
        flags = [f"{flags[0]}/--no-{flags[0][2:]}"] + flags[1:]
    return flags


def _typer_parameter(f: dataclasses.Field, tp: Any, panel: str | None) -> inspect.Parameter:
    """Typer's view of one field. Typer always receives None as the default, so `resolve_config`
    can tell a flag given from one left out; the real default is written into the help instead
    (plain, `[default: False]`, where typer would print a string default as `(False)`)."""
    from rich.markup import escape  # typer's help is rich markup: a `[word]` in a help text would vanish

    meta = f.metadata
    base = _unwrap_optional(tp)
    is_list = typing.get_origin(base) is list
    if meta.get("positional"):
        info = typer.Argument(None, help=escape(meta["help"]), metavar=meta["metavar"], show_default=False)
        annotation = Optional[list[str]] if is_list else Optional[str]
    else:
        flags = option_flags(f, base)
        shown = default_text(f)
        help = escape(meta["help"]) + (f" [dim]\\[default: {escape(shown)}][/dim]" if shown is not None else "")
        # a switch needs no type column: --flag/--no-flag says it all
        kwargs: dict[str, Any] = {"help": help, "show_default": False, "rich_help_panel": panel}
        if base is bool:
            kwargs["metavar"] = ""
        info = typer.Option(None, *flags, **kwargs)
        annotation = Optional[list[str]] if is_list else Optional[base]  # a list option may be repeated
        if meta["choices"]:  # typer shows an Enum's values as the allowed choices
            annotation = Optional[Enum(f"{f.name}_choices", {c: c for c in meta["choices"]})]  # type: ignore[misc]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Turn a YAML or comma-separated CLI value into the field's type, or explain why not.

    `name` is how the error line names the option: its flag, or the YAML file and key."""
    base = _unwrap_optional(tp)
    if value is None:
        return None
    if isinstance(value, Enum):
        value = value.value
    try:
        if typing.get_origin(base) is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if base in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # YAML `true` is not the number 1
        if base in (int, float, str) and isinstance(value, (list, dict)):
            raise ValueError(value)  # str({"a": 1}) would pass for a value
        if base is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)  # int(2.5) would quietly train with 2
            return int(value)
        if base in (int, float, str):
            return base(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{name}: cannot read {value!r} as {getattr(base, '__name__', base)}")
    return value


def flag_name(f: dataclasses.Field) -> str:
    """The long flag a user types for `f` (`--lora` for `--lora/--full`), or its metavar if positional."""
    if f.metadata.get("positional"):
        return f.metadata["metavar"]
    for flag in f.metadata.get("flags") or ():
        if flag.startswith("--"):
            return flag.split("/")[0]
    return "--" + f.name.replace("_", "-")


def accepted_range(meta: Any) -> str:
    """`>= 1`, `> 0`, `in [0, 0.5)`: the bounds a field declares, as a user reads them."""
    low = f"{meta['min']:g}" if meta.get("min") is not None else None
    low_open = meta.get("above") is not None
    low = f"{meta['above']:g}" if low_open else low
    high_open = meta.get("below") is not None
    high = f"{meta['below']:g}" if high_open else (f"{meta['max']:g}" if meta.get("max") is not None else None)
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def value_problem(value: Any, meta: Any) -> str | None:
    """Why `value` breaks its field's declaration (choices, finiteness, bounds), or None if it does not."""
    if value is None or isinstance(value, bool):
        return None
    choices = meta.get("choices") or ()
    if choices and value not in choices:
        return f"expected one of {', '.join(choices)}"
    if not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and meta.get("finite", True) and not math.isfinite(value):
        return f"must be a finite number{' ' + accepted_range(meta) if accepted_range(meta) else ''}"
    low, above, high, below = (meta.get(k) for k in ("min", "above", "max", "below"))
    if (
        (low is not None and value < low)
        or (above is not None and not value > above)
        or (high is not None and value > high)
        or (below is not None and not value < below)
    ):
        return f"must be {accepted_range(meta)}"
    return None


def _checked(f: dataclasses.Field, value: Any, config_file: Optional[Path]) -> Any:
    """`value` if its field accepts it; else one line naming the option (and the YAML file it came from)."""
    problem = value_problem(value, f.metadata)
    if problem is None:
        return value
    if config_file is not None:
        raise InputError(f"--config {config_file}: {f.name} = {value!r} ({flag_name(f)}): {problem}")
    raise InputError(f"{flag_name(f)} {value!r}: {problem}")


def check_config(config: Any) -> None:
    """Hold a config built in code (not through `resolve_config`) to its fields' declarations."""
    for f in dataclasses.fields(config):
        _checked(f, getattr(config, f.name), None)


def load_yaml_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(read_utf8(path)) or {}
    except yaml.YAMLError as err:
        raise InputError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})")
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_config(cls: type[T], cli_values: dict[str, Any], config_file: Optional[Path]) -> T:
    """Merge defaults, the YAML file and the flags actually given into one `cls` instance."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    merged: dict[str, Any] = {}
    if config_file is not None:
        for key, value in load_yaml_config(config_file).items():
            if key in ("command", "performance"):  # written by rlkit into OUT/rlkit_config.yaml: re-used as is
                continue
            if key not in fields:
                known = ", ".join(sorted(fields))
                raise InputError(f"--config {config_file}: unknown option {key!r} (known: {known})")
            coerced = _coerce(f"--config {config_file}: {key}", value, hints[key])
            merged[key] = _checked(fields[key], coerced, config_file)
    for key, value in cli_values.items():
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        if isinstance(value, (list, tuple)):  # a repeated option (--tags a,b --tags c) splits like one comma list
            value = list(value) if fields[key].metadata.get("positional") else ",".join(map(str, value))
        coerced = _coerce(flag_name(fields[key]), value, hints[key])
        merged[key] = _checked(fields[key], coerced, None)
    for name, f in fields.items():
        meta = f.metadata
        if meta.get("positional") and not merged.get(name) and _default_of(f) in (None, []):
            raise InputError(f"missing argument {meta['metavar']} (give it on the command line or in --config)")
    return cls(**merged)


def config_to_dict(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _load(run: Callable[[T], Any] | str) -> Callable[[T], Any]:
    """The run function itself, or the one named `module:function`, imported only now: a command's
    module (torch, transformers) loads when the command runs, never for `--help`."""
    if not isinstance(run, str):
        return run
    module, _, name = run.partition(":")
    return getattr(importlib.import_module(module), name)


def command_from_config(cls: type[T], run: Callable[[T], Any] | str, doc: str) -> Callable[..., Any]:
    """Build the function typer turns into a command: one parameter per config field.

    `run` is the function, or its `module:function` name so that building the command (for
    `--help`) imports nothing heavy. When the command runs, its options are resolved and checked
    first, then a config's `threads` field is applied (rlkit.performance), the libraries are
    quieted, and only then is the run function's module imported."""
    hints = typing.get_type_hints(cls)
    panels = field_panels(cls)
    rank = {name: i for i, name in enumerate((COMMAND_PANEL, *PANELS))}
    fields = sorted(  # arguments keep their order; options are grouped by panel in `--help`
        dataclasses.fields(cls),  # type: ignore[arg-type]
        key=lambda f: -1 if f.metadata.get("positional") else rank[panels[f.name]],
    )
    params = [_typer_parameter(f, hints[f.name], panels.get(f.name)) for f in fields]
    params.append(
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                None,
                "--config",
                help=CONFIG_HELP,
                show_default=False,
                rich_help_panel=PANELS[0],
            ),
            annotation=Optional[Path],
        )
    )

    def command(**kwargs: Any) -> Any:
        config_file = kwargs.pop("config", None)
        config = resolve_config(cls, kwargs, config_file)  # a bad flag is refused before anything heavy loads
        if hasattr(config, "threads"):
            from rlkit.performance import use_threads

            use_threads(config.threads)  # type: ignore[attr-defined]
        from rlkit.console import quiet_libraries
        from rlkit.training.options import bitsandbytes_only_when_used

        with bitsandbytes_only_when_used(config):
            quiet_libraries()  # imports transformers and datasets
            return _load(run)(config)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    command.__name__ = cls.__name__
    command.config_class = cls  # type: ignore[attr-defined]  # for generated docs
    return command
