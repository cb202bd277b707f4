"""Dashboard audit on hand-built runs: window models, Tune's result.json fallback and cross-check."""

from __future__ import annotations

import json
import os

from reward_audit import compare
from reward_audit.store import RunWriter
from synth import SynthRun

PATHS = [["env_runners/module_episode_returns_mean/", "module", "mean_of_episode_sums"]]
MANIFEST = {"smoothing_model": "per_call_window", "num_env_runners": 0, "metrics_num_episodes_for_smoothing": 100, "iteration_paths": PATHS}


def two_episodes(trial, reported_p0=(10.0, 20.0)):
    run = SynthRun()
    run.episode("a", [{0: 10.0, 1: 1.0}], {0: "p0", 1: "p1"})
    run.episode("b", [{0: 20.0, 1: 2.0}], {0: "p0", 1: "p1"})
    run.report("a", "module", reported_p0[0], module="p0")
    run.report("b", "module", reported_p0[1], module="p0")
    return run.write(os.path.join(trial, "reward_audit"), **MANIFEST)


def write_result_json(trial, value):
    with open(os.path.join(trial, "result.json"), "w") as f:
        f.write(json.dumps({"training_iteration": 1, "env_runners": {"module_episode_returns_mean": {"p0": value}}}) + "\n")
        f.write('{"training_iteration": 2, "env_runn')  # a line cut by a crash is skipped


def series(audit, path="env_runners/module_episode_returns_mean/p0"):
    [d] = [d for d in audit.dashboard if d.path == path]
    return d


def test_result_json_is_used_when_the_run_recorded_no_dashboard_numbers(tmp_path):
    two_episodes(str(tmp_path))
    write_result_json(str(tmp_path), 15.0)  # mean of 10 and 20: right
    audit = compare(str(tmp_path))
    assert any("read from Tune's" in n for n in audit.notes)
    d = series(audit)
    assert d.table["expected"].tolist() == [15.0] and not d.wrong_iterations and not d.unreconstructable


def test_wrong_dashboard_value_is_reported_with_its_iteration(tmp_path):
    two_episodes(str(tmp_path), reported_p0=(10.0, 80.0))  # RLlib's per-episode values leak
    write_result_json(str(tmp_path), 45.0)  # what it showed: mean of its own values
    audit = compare(str(tmp_path))
    d = series(audit)
    assert d.wrong_iterations == [1] and d.first_wrong == 1
    assert d.table["rebuilt"].tolist() == [45.0] and d.table["expected"].tolist() == [15.0]
    assert "showed 45, truth 15" in d.summary()


def test_value_our_model_cannot_rebuild_is_bounded_not_judged(tmp_path):
    two_episodes(str(tmp_path))
    write_result_json(str(tmp_path), 17.0)  # no window of these episodes gives 17
    d = series(compare(str(tmp_path)))
    assert d.unreconstructable == [1] and d.wrong_iterations == []
    assert (d.table["low"].tolist(), d.table["high"].tolist()) == ([10.0], [20.0])


def test_recorded_numbers_are_cross_checked_with_result_json(tmp_path):
    folder = two_episodes(str(tmp_path))
    RunWriter(folder).write_rows(
        "reported_iterations",
        [{"phase": "train", "iteration": 1, "path": "env_runners/module_episode_returns_mean/p0", "kind": "module", "key": "p0", "value": 15.0, "semantics": "mean_of_episode_sums"}],
        "000001",
    )
    write_result_json(str(tmp_path), 16.0)
    audit = compare(str(tmp_path))
    [note] = audit.notes
    assert "1 numbers cross-checked" in note and "1 differ" in note and "recorded 15, result.json 16" in note
