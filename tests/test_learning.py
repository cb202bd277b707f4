"""The `learning` phase without Ray: ``learning_rows`` turns `batch_rewards` rows into
per-episode values, and ``compare`` judges them against the train truth (learning.py)."""

from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from synth import EVAL_RUNNER, RUNNER, SynthRun

from reward_audit import Verdict, compare
from reward_audit.errors import InvalidDataError
from reward_audit.report import bottom_line, render_text
from reward_audit.store import RunWriter


def batch(rows: list[tuple]) -> pd.DataFrame:
    """``(runner, episode, chunk, agent, module, reward)`` -> batch_rewards rows."""
    return pd.DataFrame(
        [
            {"phase": runner.split("/")[0], "runner_id": runner, "episode_id": ep, "chunk_seq": chunk, "agent_id": agent, "module_id": module,
             "reward": reward, "n_rewards": 1, "reward_bits": 53, "iteration": 1 + chunk}
            for runner, ep, chunk, agent, module, reward in rows
        ]
    )


def learning_values(tmp_path, rows: list[tuple], *, running: bool = False) -> pd.DataFrame:
    """Audit a run of e1 (agents 0 -> p and 1 -> p, paid 1 + 2 and 10 over two chunks, done)
    and e2 (agent 0 paid 5, done unless ``running``), trained on ``rows`` (``batch`` tuples);
    the phase-learning values compare() made, one row per (episode, kind, key)."""
    run = SynthRun()
    run.episode("e1", [{0: 1.0, 1: 10.0}, {0: 2.0}], {0: "p", 1: "p"})
    run.episode("e2", [{0: 5.0}], {0: "p"}, done=not running)
    run.report("e1", "module", 13.0, module="p")
    folder = run.write(str(tmp_path / "run"))
    RunWriter(folder).write_rows("batch_rewards", batch(rows).to_dict("records"), "000001")
    frame = compare(folder).episodes
    return frame[frame["phase"] == "learning"]


def values(frame: pd.DataFrame) -> dict:
    return {(r.episode_id, r.kind, r.key): r.reported for r in frame.itertuples()}


def test_values_sum_chunks_per_agent_and_module_of_finished_episodes_only(tmp_path):
    rows = learning_values(
        tmp_path,
        [
            (RUNNER, "e1", 0, "0", "p", 1.0), (RUNNER, "e1", 0, "1", "p", 10.0), (RUNNER, "e1", 1, "0", "p", 2.0),
            (RUNNER, "e2", 2, "0", "p", 5.0),  # still running: partial, not compared
            (EVAL_RUNNER, "e1", 0, "0", "p", 7.0),  # an evaluation runner's batch trains nothing
        ],
        running=True,
    )
    assert values(rows) == {("e1", "agent", "0"): 3.0, ("e1", "agent", "1"): 10.0, ("e1", "module", "p"): 13.0}
    assert set(rows["verdict"]) == {"CLEAN"} and set(rows["metrics_call"].dropna()) == {-1}
    assert dict(zip(rows["kind"] + rows["key"], rows["iteration"])) == {"agent0": 2, "agent1": 1, "modulep": 2}  # the last batch's


def test_agents_known_only_by_index_give_module_values_only(tmp_path):
    rows = learning_values(tmp_path, [(RUNNER, "e1", 0, "#0", "p", 3.0), (RUNNER, "e1", 0, "1", "p", 10.0), (RUNNER, "e2", 2, "0", "p", 5.0)])
    assert values(rows) == {("e1", "module", "p"): 13.0, ("e2", "agent", "0"): 5.0, ("e2", "module", "p"): 5.0}


def test_a_finished_episode_without_batches_is_incomplete_and_an_agent_without_one_is_missing(tmp_path):
    rows = learning_values(tmp_path, [(RUNNER, "e1", 0, "0", "p", 1.0), (RUNNER, "e1", 1, "0", "p", 2.0)])
    assert values(rows) == {("e1", "agent", "0"): 3.0, ("e1", "agent", "1"): 0.0, ("e1", "module", "p"): 3.0}
    assert dict(zip(rows["key"], rows["verdict"])) == {"0": "CLEAN", "1": "DROP", "p": "DROP"}
    assert rows.loc[rows["key"] == "1", "missing_report"].item()


def record(tmp_path, trained: dict[str, dict[str, float]], reported: dict[str, float]) -> str:
    """One 2-chunk episode, agents 0 (module p0) and 1 (p1) paid 1 + 2 and 10 + 20; RLlib
    reported ``reported`` per module and trained on ``trained[chunk][agent]``."""
    run = SynthRun()
    run.episode("e1", [{0: 1.0, 1: 10.0}, {0: 2.0, 1: 20.0}], {0: "p0", 1: "p1"})
    for module, value in reported.items():
        run.report("e1", "module", value, module=module)
    folder = run.write(str(tmp_path / "run"))
    modules = {"0": "p0", "1": "p1"}
    rows = [(RUNNER, "e1", int(c), a, modules[a], r) for c, per in trained.items() for a, r in per.items()]
    RunWriter(folder).write_rows("batch_rewards", batch(rows).assign(iteration=1).to_dict("records"), "000001")
    return folder


def findings(audit) -> dict:
    return {(f.kind, f.key): f.verdict for f in audit.findings if f.phase == "learning"}


@pytest.mark.parametrize(
    "trained, reported, learning, line",
    [
        ({0: {"0": 1.0, "1": 10.0}, 1: {"0": 2.0, "1": 20.0}}, {"p0": 3.0, "p1": 30.0}, {"p0": Verdict.CLEAN, "p1": Verdict.CLEAN},
         "metrics: CLEAN · training batches: CLEAN — the reported numbers and the training data both match what the env paid"),
        # agent 0's second chunk trained module p1: p1 LEAK, p0 DROP; the metrics are right
        ({0: {"0": 1.0, "1": 10.0}, 1: {"1": 22.0}}, {"p0": 3.0, "p1": 30.0}, {"p0": Verdict.DROP, "p1": Verdict.LEAK},
         "metrics: CLEAN · training batches: LEAK — the policies were trained on wrong rewards, though the reported numbers look right"),
        # the metrics leak, the batches are right
        ({0: {"0": 1.0, "1": 10.0}, 1: {"0": 2.0, "1": 20.0}}, {"p0": 3.0, "p1": 31.0}, {"p0": Verdict.CLEAN, "p1": Verdict.CLEAN},
         "metrics: LEAK · training batches: CLEAN — the policies were trained on the right rewards; only the reported numbers are wrong"),
    ],
)
def test_compare_judges_training_batches_against_the_train_truth(tmp_path, trained, reported, learning, line):
    audit = compare(record(tmp_path, trained, reported))
    got = findings(audit)
    assert {k: got[("module", k)] for k in learning} == learning
    assert bottom_line(audit) == line
    assert line in render_text(audit)


def test_run_without_batches_has_no_learning_phase(tmp_path):
    run = SynthRun()
    run.episode("e1", [{0: 1.0}], {0: "p0"})
    run.report("e1", "module", 1.0, module="p0")
    audit = compare(run.write(str(tmp_path / "run")))
    assert not findings(audit) and bottom_line(audit) is None


def test_unbatched_episodes_and_batches_without_raw_rows_are_named(tmp_path):
    run = SynthRun()
    run.episode("e1", [{0: 1.0}], {0: "p0"})
    run.episode("e2", [{0: 2.0}], {0: "p0"})
    folder = run.write(str(tmp_path / "run"))
    RunWriter(folder).write_rows("batch_rewards", batch([(RUNNER, "e1", 0, "0", "p0", 1.0), (RUNNER, "ghost", 0, "0", "p0", 9.0)]).to_dict("records"), "000001")
    found = {(f.kind, f.key): f for f in compare(folder).findings if f.phase == "learning"}
    assert found[("episode", "unreported")].verdict is Verdict.INCOMPLETE and found[("episode", "unreported")].counts == {"cut": 0, "finished": 1}
    assert "no training data was recorded for them (e.g. e2)" in found[("episode", "unreported")].message
    assert found[("batch", "*")].verdict is Verdict.UNVERIFIED and "ghost" in found[("batch", "*")].message


def multi_iteration_run(folder: str, *, leak: bool = False, episodes: int = 40, clip: bool = False) -> str:
    """Episodes of 2 agents (modules p0, p1) cut into 2 chunks sampled in consecutive
    iterations (episode k: chunks in iterations 1 + k // 4 and 2 + k // 4), one part per
    iteration and table, so a small ``window_rows`` streams them over several windows and
    every episode's batch rows span two of them. ``leak``: agent 0's second-chunk rewards
    are in p1's training data instead of p0's. ``clip``: rewards of
    ±2 / ±0.5, recorded as RLlib's old stack does with ``clip_rewards=True`` (Σ sign(r) in
    ``reward_clipped``; the batch holds the clipped rewards)."""
    raw, reported, batch = {}, {}, {}
    for k in range(episodes):
        ep, first = f"e{k:03d}", 1 + k // 4
        paid = {"0": [1.0 + k, 2.0 + k], "1": [10.0 * (k + 1), 20.0 * (k + 1)]}
        if clip:
            paid = {"0": [2.0, -0.5], "1": [0.5, 2.0 if k % 2 else -2.0]}
        for c in (0, 1):
            it = first + c
            for agent, module in (("0", "p0"), ("1", "p1")):
                r = paid[agent][c]
                row = {"phase": "train", "runner_id": RUNNER, "worker_index": 0, "env_index": 0, "episode_id": ep, "chunk_seq": 2 * k + c,
                       "agent_id": agent, "agent_id_type": "str", "module_id": module, "reward": r, "n_rewards": 1, "pre_obs_reward": 0.0,
                       "n_pre_obs": 0, "reward_cancel": 0.0, "reward_bits": 53, "episode_done": c == 1, "iteration": it}
                if clip:
                    row["reward_clipped"] = float(np.sign(r))
                raw.setdefault(it, []).append(row)
                trained = float(np.sign(r)) if clip else r
                batch.setdefault(it, []).append({"phase": "train", "runner_id": RUNNER, "episode_id": ep, "chunk_seq": 2 * k + c, "agent_id": agent,
                                                 "module_id": "p1" if leak and c == 1 else module, "reward": trained, "n_rewards": 1, "reward_bits": 53, "iteration": it})
        for agent, module in (("0", "p0"), ("1", "p1")):
            value = sum(np.sign(paid[agent])) if clip else sum(paid[agent])
            reported.setdefault(first + 1, []).append({"phase": "train", "runner_id": RUNNER, "episode_id": ep, "kind": "module", "agent_id": None, "module_id": module,
                                                       "value": float(value), "semantics": "episode_sum_counted", "metrics_call": first, "iteration": first + 1})
    writer = RunWriter(folder)
    from synth import manifest

    writer.write_manifest(manifest(clip_rewards=True) if clip else manifest())
    for table, rows in (("raw_rewards", raw), ("reported_episodes", reported), ("batch_rewards", batch)):
        for it, part in rows.items():
            writer.write_rows(table, part, f"{it:06d}")
    return folder


def learning_of(audit) -> dict:
    return {(f.kind, f.key): (f.verdict, f.episodes) for f in audit.findings if f.phase == "learning"}


@pytest.mark.parametrize("leak", [False, True])
def test_streamed_windows_judge_like_one_window(tmp_path, leak):
    """Episodes whose batch rows span two windows are summed over both (carried), and the
    verdicts are those of the single-window pass."""
    folder = multi_iteration_run(str(tmp_path / "run"), leak=leak)
    streamed, whole = compare(folder, window_rows=8), compare(folder, window_rows=None)
    assert streamed.stats["windows"] > 4 and whole.stats["windows"] == 1
    expected = {
        ("module", "p0"): Verdict.DROP if leak else Verdict.CLEAN,
        ("module", "p1"): Verdict.LEAK if leak else Verdict.CLEAN,
        ("agent", "0"): Verdict.CLEAN,  # agent 0's rewards are all there, in the wrong module's data
        ("agent", "1"): Verdict.CLEAN,
    }
    for audit in (streamed, whole):
        got = learning_of(audit)
        assert {k: v for k, (v, _) in got.items()} == expected, [str(f) for f in audit.findings]
        assert {n for _, n in got.values()} == {40}  # every episode: 11 iterations, all finished
        assert not [n for n in audit.notes if "one window" in n]  # no late data: streamed for real
    assert learning_of(streamed) == learning_of(whole)
    if leak:  # per episode k, p1 got agent 0's second chunk, 2 + k
        [p1] = [f for f in streamed.findings if f.phase == "learning" and f.key == "p1"]
        assert p1.reported - p1.truth == pytest.approx(np.mean([2.0 + k for k in range(40)]))
        assert all(e.explanation.startswith("reported = truth + agent 0's final-chunk rewards") for e in p1.evidence), p1.evidence


def test_batch_rows_after_their_episode_closed_are_audited_in_one_window(tmp_path):
    folder = multi_iteration_run(str(tmp_path / "run"), episodes=8)
    late = [{"phase": "train", "runner_id": RUNNER, "episode_id": "e000", "chunk_seq": 99, "agent_id": "1", "module_id": "p1", "reward": 5.0,
             "n_rewards": 1, "reward_bits": 53, "iteration": 4}]  # e000 finished in iteration 2
    RunWriter(folder).write_rows("batch_rewards", late, "000004-late")
    audit = compare(folder, window_rows=4)
    assert any("audited in one window instead" in n for n in audit.notes), audit.notes
    [p1] = [f for f in audit.findings if f.phase == "learning" and f.key == "p1"]
    assert p1.verdict is Verdict.MISMATCH and [(e.episode_id, e.reported - e.truth) for e in p1.evidence] == [("e000", 5.0)]  # counted, not lost


def test_clipped_batches_are_compared_with_clipped_rewards(tmp_path):
    audit = compare(multi_iteration_run(str(tmp_path / "run"), clip=True, episodes=8))
    assert {v for v, _ in learning_of(audit).values()} == {Verdict.CLEAN}, [str(f) for f in audit.findings]
    assert any(n.startswith("learning: RLlib clipped the rewards before its training batches (clip_rewards=True)") for n in audit.notes), audit.notes


def test_an_unclipped_batch_in_a_clipping_run_is_not_clean(tmp_path):
    folder = multi_iteration_run(str(tmp_path / "run"), clip=True, episodes=8)
    wrong = [{"phase": "train", "runner_id": RUNNER, "episode_id": "e007", "chunk_seq": 99, "agent_id": "0", "module_id": "p0", "reward": 0.3,
              "n_rewards": 1, "reward_bits": 53, "iteration": 3}]  # e007 runs in iterations 2-3: +0.3 on top of Σ sign(r)
    RunWriter(folder).write_rows("batch_rewards", wrong, "000003-extra")
    [p0] = [f for f in compare(folder).findings if f.phase == "learning" and f.key == "p0"]
    assert p0.verdict is Verdict.MISMATCH and [e.episode_id for e in p0.evidence] == ["e007"]
    assert p0.evidence[0].explanation == (
        "difference +0.3 is not a sum of any agents' earlier/final-chunk rewards — rewards not paid by the env are in the training data "
        "(a reward-changing connector on the env runner?)"
    )


def test_identical_and_conflicting_copies_of_a_batch_part(tmp_path):
    import shutil

    folder = multi_iteration_run(str(tmp_path / "run"), episodes=8)
    part = sorted(glob.glob(f"{folder}/batch_rewards/*.parquet"))[0]
    shutil.copy(part, part.replace(".parquet", "-copy.parquet"))
    audit = compare(folder)
    assert {v for v, _ in learning_of(audit).values()} == {Verdict.CLEAN}
    # iteration 1 holds the first chunks of e000-e003, two agents each
    assert any(n.startswith("batch_rewards: 8 rows appeared twice, identical copies") for n in audit.notes), audit.notes
    os.remove(part.replace(".parquet", "-copy.parquet"))
    rows = pq.read_table(part).to_pylist()
    rows[0]["reward"] += 1.0
    RunWriter(folder).write_rows("batch_rewards", rows, "000001-conflict")
    with pytest.raises(InvalidDataError, match="batch_rewards row .* twice with different values"):
        compare(folder)
