"""The example queries in docs/querying.md run against a real run folder and give the
numbers the audit gives."""

from __future__ import annotations

import os
import re

import pytest

from reward_audit import compare
from reward_audit.synthetic import generate_run

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "querying.md")


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", open(DOC).read(), flags=re.S)


def test_there_are_two_examples():
    assert len(blocks()) == 2


@pytest.mark.parametrize("index", [0, 1])
def test_example_query_runs(tmp_path, index):
    run = generate_run(str(tmp_path), iterations=4, episodes_per_iteration=16, inject="leak", inject_every=2)
    scope: dict = {"RUN": run.path}
    exec(compile(blocks()[index], f"docs/querying.md example {index + 1}", "exec"), scope)
    if index == 0:  # the leak shows up where the audit finds it: only module p0 reports more
        worst = scope["worst"].set_index("module_id")
        assert worst.loc["p0", "mean_excess"] > 1 and worst.drop("p0")["mean_excess"].abs().max() < 1e-6
        assert [f.key for f in compare(str(tmp_path)).failures()] == ["p0"]
    else:
        table = scope["per_iteration"]
        assert set(table.column_names) == {"iteration", "agent_id", "reward_sum"} and table.num_rows == 4 * 8
