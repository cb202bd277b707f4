"""Version scenarios marked only for an explicit ``-m``: a test marked ``ray212`` runs only when
the ``-m`` expression names ``ray212`` (``make test-versions`` runs ``pytest -m ray212`` in
the Ray 2.12 virtualenv). Without it, such tests are deselected, not skipped and not failed,
so a plain ``pytest`` in another Ray's environment never trains on the wrong Ray.
"""

from __future__ import annotations

import pytest

EXPLICIT_ONLY = ("ray212",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = config.getoption("markexpr", default="") or ""
    keep, drop = [], []
    for item in items:
        marks = [m for m in EXPLICIT_ONLY if item.get_closest_marker(m) is not None]
        (drop if marks and not any(m in markexpr for m in marks) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
