"""rlkit's build backend: setuptools' own, with its notice about editable installs answered here.

rlkit keeps a flat layout in which two top-level folders install inside the package (`commands/`
as `rlkit.commands`, `templates/` as `rlkit.templates`). setuptools installs such a layout in
editable mode through an import hook that maps exactly those package names to their folders —
the right thing — and then says so with an informational warning ("Editable installation ...
Please be careful with folders in your working directory with the same name as your package").
A current pip shows a backend's warnings to the user, so every `pip install -e .` ended with a
boxed notice that asks nothing of anyone: here the folder named like the package in the working
directory is the very source the hook maps to. That one notice, and only during
`build_editable`, is silenced; wheels, sdists and every other warning are setuptools' untouched.
"""

from __future__ import annotations

import warnings
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the PEP 517 hooks, re-exported unchanged)


def build_editable(
    wheel_directory: str, config_settings: dict[str, Any] | None = None, metadata_directory: str | None = None
) -> str:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*Editable installation", category=UserWarning)
        return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
