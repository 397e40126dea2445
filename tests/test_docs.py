"""Docs cannot drift from the CLI: every command has a page that documents every option."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from conftest import REPO

from rlkit.cli import COMMANDS


@pytest.mark.parametrize("name,module", COMMANDS)
def test_every_option_is_documented(name, module):
    page = REPO / "docs" / f"{name}.md"
    assert page.is_file(), f"docs/{name}.md is missing"
    text = page.read_text()
    config = importlib.import_module(f"rlkit.commands.{module}").command.config_class
    for field in dataclasses.fields(config):
        if field.metadata.get("positional"):
            continue
        flag = (field.metadata.get("flags") or (f"--{field.name.replace('_', '-')}",))[0].split("/")[0]
        assert f"`{flag}`" in text, f"docs/{name}.md does not document {flag}"


def test_help_lists_only_registered_commands():
    from typer.testing import CliRunner

    from rlkit.cli import app

    output = CliRunner().invoke(app, ["--help"]).output
    for name, _ in COMMANDS:
        assert name in output
