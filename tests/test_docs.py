"""Docs that describe code are generated; these fail when they are stale or incomplete."""

from __future__ import annotations

import os

import pytest

from reward_audit.cli import main
from reward_audit.docsgen import DOCS, generated


@pytest.mark.parametrize("name", sorted(generated()))
def test_generated_docs_are_current(name):
    with open(os.path.join(DOCS, name)) as f:
        assert f.read() == generated()[name], f"docs/{name} is stale: run `python -m reward_audit.docsgen`"


def test_every_command_and_option_is_documented():
    text = open(os.path.join(DOCS, "cli.md")).read()
    for name, command in main.commands.items():
        assert f"## `reward-audit {name}`" in text
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-"):
                    assert opt in text, f"{name} {opt} is not in docs/cli.md"


def test_readme_commands_exist():
    readme = open(os.path.join(DOCS, "..", "README.md")).read()
    assert "make demo" in readme and "make test" in readme
    for name in main.commands:
        if f"reward-audit {name}" in readme:
            assert name in main.commands
