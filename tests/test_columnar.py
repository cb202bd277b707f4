"""The columnar, streamed compare agrees with the previous row-by-row implementation
(kept verbatim in ``tests/legacy/``) on the recorded fixtures and on generated runs with
injected leaks and drops — verdicts, messages, counts, evidence, attribution, dashboards —
whatever the streaming window; and the store's own guarantees (size, compaction)."""

from __future__ import annotations

import glob
import json
import os
import sys

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "legacy"))

import legacy_compare  # noqa: E402

from reward_audit import Verdict, compare  # noqa: E402
from reward_audit.compact import compact_run  # noqa: E402
from reward_audit.store import load_run  # noqa: E402
from reward_audit.synthetic import generate_run  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "runs")


def _finding_key(f):
    evidence = tuple((e.episode_id, e.runner_id, e.chunks, e.verdict, e.explanation, e.agent_id, round(e.difference, 6)) for e in f.evidence)
    return (f.phase, f.kind, f.key, f.verdict, f.episodes, f.message, f.counts, f.attribution, evidence)


def assert_same(path: str, **kwargs) -> None:
    old = legacy_compare.compare(load_run(path))
    new = compare(path, **kwargs)
    assert [_finding_key(f) for f in new.findings] == [_finding_key(f) for f in old.findings]
    for a, b in zip(new.findings, old.findings):  # numbers: equal up to summation order
        for x, y in ((a.truth, b.truth), (a.reported, b.reported), (a.difference, b.difference)):
            assert (x is None and y is None) or x == pytest.approx(y, rel=1e-12, abs=1e-9)
    assert [d.summary() for d in new.dashboard] == [d.summary() for d in old.dashboard]
    for a, b in zip(new.dashboard, old.dashboard):
        assert a.table["iteration"].tolist() == b.table["iteration"].tolist()
        for column in ("displayed", "rebuilt", "expected", "low", "high"):
            assert a.table[column].to_numpy() == pytest.approx(b.table[column].to_numpy(), rel=1e-12, abs=1e-9, nan_ok=True)
        assert a.table["model_ok"].tolist() == b.table["model_ok"].tolist()
        assert a.table["agrees"].tolist() == b.table["agrees"].tolist()
    # The JSON document differs from the old one only in float rounding.
    new_json, old_json = new.to_dict(), json.loads(json.dumps(old.to_dict(), default=str))
    assert [f["message"] for f in new_json["findings"]] == [f["message"] for f in old_json["findings"]]
    assert new_json["counts"] == old_json["counts"] and new_json["ok"] == old_json["ok"]


@pytest.mark.parametrize("fixture", ["ray212_newstack_leak", "ray253_shared_module_drop"])
def test_fixtures_identical_to_previous_compare(fixture):
    assert_same(os.path.join(FIXTURES, fixture))


@pytest.mark.parametrize("inject", [None, "leak", "drop"])
@pytest.mark.parametrize("window_rows", [None, 200])
def test_generated_runs_identical_to_previous_compare(tmp_path, inject, window_rows):
    # 6 iterations x 24 episodes x 8 agents: episodes span up to 3 iterations, so a
    # 300-row window carries running episodes from window to window.
    # Six agents on two modules: explanations enumerate every agent (beyond six they are
    # grouped, and ties between equally frequent patterns are broken differently).
    generate_run(str(tmp_path), iterations=6, episodes_per_iteration=24, agents=6, modules=2, inject=inject, inject_every=3)
    audit = compare(str(tmp_path), window_rows=window_rows)
    if window_rows:
        assert audit.stats["windows"] >= 4
    assert_same(str(tmp_path), window_rows=window_rows)
    failing = {(f.kind, f.key): f.verdict for f in audit.failures()}
    if inject == "leak":
        assert failing == {("module", "p0"): Verdict.LEAK}
    elif inject == "drop":
        assert failing and set(failing.values()) == {Verdict.DROP} and {k for k, _ in failing} == {"module"}
    else:
        assert failing == {}


def test_explanations_are_bounded_but_every_wrong_value_is_counted(tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module("reward_audit.compare")
    monkeypatch.setattr(module, "EXPLAIN_LIMIT", 5)
    generate_run(str(tmp_path), iterations=4, episodes_per_iteration=40, inject="leak", inject_every=1)
    [leak] = compare(str(tmp_path)).failures()
    old = [f for f in legacy_compare.compare(load_run(str(tmp_path))).findings if f.verdict == Verdict.LEAK][0]
    assert leak.verdict == Verdict.LEAK and leak.counts["wrong"] == old.counts["LEAK"] > 5
    assert leak.counts["LEAK"] == 5 and f"(explained: the 5 largest of {old.counts['LEAK']} wrong values)" in leak.message
    assert [e.episode_id for e in leak.evidence] == [e.episode_id for e in old.evidence]


def test_late_rows_are_audited_in_one_window(tmp_path):
    # One more chunk of an episode written three iterations after the episode was reported:
    # the streamed pass notices and redoes the audit in one window, saying so.
    generate_run(str(tmp_path), iterations=6, episodes_per_iteration=16)
    audit_dir = os.path.join(str(tmp_path), "reward_audit")
    first = sorted(glob.glob(f"{audit_dir}/raw_rewards/*.parquet"))[0]
    table = pq.read_table(first)
    done = table.filter(table["episode_done"]).slice(0, 1)
    late = done.set_column(done.schema.get_field_index("iteration"), "iteration", [[5]])
    late = late.set_column(late.schema.get_field_index("chunk_seq"), "chunk_seq", [[10_000]]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(late, f"{audit_dir}/raw_rewards/part-000005-train-late.parquet")
    audit = compare(str(tmp_path), window_rows=200)
    assert any("audited in one window instead" in n for n in audit.notes)
    one = compare(str(tmp_path), window_rows=None)
    assert [_finding_key(f) for f in audit.findings] == [_finding_key(f) for f in one.findings]
    assert not audit.ok  # the extra chunk adds to the truth: a MISMATCH, found either way


def test_a_late_identical_copy_is_counted_once(tmp_path):
    # The same chunk handed over again three iterations later (a runner drained twice): one
    # window finds the copy, the streamed pass redoes it in one window; counted once, CLEAN.
    generate_run(str(tmp_path), iterations=6, episodes_per_iteration=16)
    audit_dir = os.path.join(str(tmp_path), "reward_audit")
    first = sorted(glob.glob(f"{audit_dir}/raw_rewards/*.parquet"))[0]
    table = pq.read_table(first)
    done = table.filter(table["episode_done"]).slice(0, 1)
    late = done.set_column(done.schema.get_field_index("iteration"), "iteration", [[5]]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(late, f"{audit_dir}/raw_rewards/part-000005-train-late.parquet")
    audit = compare(str(tmp_path), window_rows=200)
    assert audit.ok, [str(f) for f in audit.failures()]
    assert any("raw_rewards: 1 row appeared twice" in n and "part-000005-train-late.parquet" in n for n in audit.notes), audit.notes


def test_raw_rows_cost_at_most_16_bytes_on_disk(tmp_path):
    run = generate_run(str(tmp_path), iterations=10, episodes_per_iteration=2000)
    files = glob.glob(f"{run.path}/raw_rewards/*.parquet")
    size = sum(os.path.getsize(f) for f in files)
    assert run.raw_rows > 250_000 and size / run.raw_rows <= 16


def test_compact_is_atomic_idempotent_and_changes_no_verdict(tmp_path):
    generate_run(str(tmp_path), iterations=12, episodes_per_iteration=16, inject="leak", inject_every=3)
    before = compare(str(tmp_path))
    raw_dir = os.path.join(str(tmp_path), "reward_audit", "raw_rewards")
    n_before = len(os.listdir(raw_dir))
    # An interrupted compaction: the compacted part is in place, its sources not yet deleted.
    sources = sorted(os.listdir(raw_dir))
    stats = compact_run(str(tmp_path))
    assert stats["raw_rewards"] == (n_before, 1) and os.listdir(raw_dir) != sources
    [compacted] = os.listdir(raw_dir)
    for name in sources:  # put the sources back: the reader must not count them twice
        pq.write_table(pq.read_table(os.path.join(raw_dir, compacted)).slice(0, 1), os.path.join(raw_dir, name))
    assert [_finding_key(f) for f in compare(str(tmp_path)).findings] == [_finding_key(f) for f in before.findings]
    assert compact_run(str(tmp_path))["raw_rewards"] == (1, 1)  # finishes the interrupted one
    assert os.listdir(raw_dir) == [compacted]
    after = compare(str(tmp_path))
    assert [_finding_key(f) for f in after.findings] == [_finding_key(f) for f in before.findings]
    assert [d.summary() for d in after.dashboard] == [d.summary() for d in before.dashboard]
    # Streamed over the compacted part's row groups (one per original part), window by window.
    streamed = compare(str(tmp_path), window_rows=100)
    assert streamed.stats["windows"] >= 4
    assert [_finding_key(f) for f in streamed.findings] == [_finding_key(f) for f in before.findings]
    assert [d.summary() for d in streamed.dashboard] == [d.summary() for d in before.dashboard]


def test_episodes_frame_on_demand(tmp_path):
    generate_run(str(tmp_path), iterations=3, episodes_per_iteration=8, inject="leak", inject_every=2)
    audit = compare(str(tmp_path))
    old = legacy_compare.compare(load_run(str(tmp_path))).episodes
    new = audit.episodes
    assert len(new) == len(old)
    assert sorted(new["verdict"].value_counts().items()) == sorted(old["verdict"].value_counts().items())


def test_report_plots_what_is_off_plus_a_bounded_overview(tmp_path):
    from reward_audit.report import MAX_OFF_PLOTS, MAX_OVERVIEW_PLOTS, plotted_series, render_html

    # A 20-module league: 40 agents, 20 modules, module p0 leaks.
    generate_run(str(tmp_path), iterations=3, episodes_per_iteration=16, agents=40, modules=20, inject="leak", inject_every=1)
    audit = compare(str(tmp_path))
    plotted, hidden = plotted_series(audit)
    assert len(audit.dashboard) > 60 and hidden == 0
    off = [d for d in plotted if d.wrong_iterations]
    assert [d.key for d in off] == ["p0"] and len(plotted) == 1 + MAX_OVERVIEW_PLOTS
    assert render_html(audit).count("<img") == len(plotted) <= MAX_OFF_PLOTS + MAX_OVERVIEW_PLOTS
