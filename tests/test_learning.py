"""The `learning` phase without Ray: ``learning_rows`` turns `batch_rewards` rows into
per-episode values, and ``compare`` judges them against the train truth (learning.py)."""

from __future__ import annotations

import pandas as pd
import pytest
from synth import EVAL_RUNNER, RUNNER, SynthRun

from reward_audit import Verdict, compare
from reward_audit.learning import learning_rows
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


def values(frame: pd.DataFrame) -> dict:
    return {(r.episode_id, r.kind, r.agent_id if r.kind == "agent" else r.module_id): r.value for r in frame.itertuples()}


def test_rows_sum_chunks_per_agent_and_module_of_done_episodes_only():
    rows = learning_rows(
        batch([
            (RUNNER, "e1", 0, "0", "p", 1.0), (RUNNER, "e1", 0, "1", "p", 10.0), (RUNNER, "e1", 1, "0", "p", 2.0),
            (RUNNER, "e2", 1, "0", "p", 5.0),  # still running: partial, not compared
            (EVAL_RUNNER, "e3", 0, "0", "p", 7.0),  # evaluation batches train nothing
        ]),
        {(RUNNER, "e1"), (EVAL_RUNNER, "e3")},
    )
    assert values(rows) == {("e1", "agent", "0"): 3.0, ("e1", "agent", "1"): 10.0, ("e1", "module", "p"): 13.0}
    assert set(rows["phase"]) == {"learning"} and set(rows["metrics_call"]) == {-1}
    assert set(rows["iteration"]) == {2}  # the episode's last batch


def test_agents_known_only_by_index_give_module_rows_only():
    rows = learning_rows(batch([(RUNNER, "e1", 0, "#0", "p0", 1.0), (RUNNER, "e1", 0, "1", "p1", 2.0)]), {(RUNNER, "e1")})
    assert values(rows) == {("e1", "module", "p0"): 1.0, ("e1", "module", "p1"): 2.0}


def test_no_batches_no_rows():
    assert learning_rows(batch([(RUNNER, "e1", 0, "0", "p", 1.0)]), set()).empty


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
