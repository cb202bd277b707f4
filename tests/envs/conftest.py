"""``tests/envs/``: real games under tiny PPO runs (``make test-envs``). Needs the ``envs``
extra (PettingZoo, OpenSpiel, mpe2); without it every test here is skipped with the command
that installs it, so ``pytest`` in the plain test venv stays green and says why."""

from __future__ import annotations

import importlib.util

import pytest

MISSING = [m for m in ("pettingzoo", "pyspiel", "mpe2") if importlib.util.find_spec(m) is None]


def pytest_collection_modifyitems(config, items):
    if not MISSING:
        return
    skip = pytest.mark.skip(reason=f"needs the envs extra ({', '.join(MISSING)} missing): run `make test-envs`")
    for item in items:
        if "tests/envs/" in item.nodeid.replace("\\", "/"):
            item.add_marker(skip)
