"""Modules bound at import but executed on first use, so that option modules can import the losses.

Why: `rlkit dpo --help` reads the loss records from `rlkit.losses.preference`; importing torch
there would cost seconds before a word of help appears. The losses name `torch.…` in their
bodies only, so torch runs the first time a loss is computed, not when its record is read.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """`name` as a module whose code runs on first attribute access (the module itself if already imported)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
