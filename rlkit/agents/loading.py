"""`module:name` specs of user code (`--tools`, `--env`) -> the object they name.

The same rule as `--reward module:function` (`rlkit.scoring.FunctionReward`): the module is
imported with the working directory on the path (a tools.py next to the data, as users expect),
what it prints on import goes to stderr, and anything it raises on import is one line naming the
spec. FunctionReward does its import inline with `--reward`'s wording, so only its one-line
exception description (`rlkit.scoring._described`) is shared here.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from rlkit.agents.quarantine import quarantined
from rlkit.errors import InputError
from rlkit.scoring import _described


def import_object(spec: str, option: str, what: str) -> Any:
    """The object `spec` ("module:name") names; `what` ("function", "class") is for the messages."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise InputError(f"{option} {spec!r}: expected module:{what}, e.g. tools:multiply")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        with quarantined():
            module = importlib.import_module(module_name)
    except (Exception, SystemExit) as err:  # the user's module may fail in any way on import
        raise InputError(f"{option} {spec}: cannot import {module_name!r} ({_described(err)}); is it on PYTHONPATH?")
    found = getattr(module, name, None)
    if found is None:
        raise InputError(f"{option} {spec}: {module_name} has no {what} {name!r}")
    return found
