"""Faults on real Ray 2.60 runs (issue 9, issue 8 item 7): an env runner that crashes and is
restarted, ``algo.restore()`` into the same algorithm, a failing driver hook. The audit
says what happened and stays exact where it can.
"""

from __future__ import annotations

import json
import os

import pytest

ray = pytest.importorskip("ray", reason="end-to-end tests need ray[rllib]; `make test` installs it")

from helpers import new_stack_ppo_config, old_stack_ppo_config  # noqa: E402
from reward_audit import Verdict, compare  # noqa: E402
from reward_audit.envs import ScaledRewardsEnv, map_by_id  # noqa: E402

pytestmark = pytest.mark.rllib


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_instance):  # one Ray for the whole module (tests/conftest.py)
    yield


def exact(audit):
    assert audit.dashboard
    for d in audit.dashboard:
        assert not d.unreconstructable and not d.wrong_iterations, (d.path, d.table.to_string())


def test_a_crashed_env_runner_is_said_with_the_iterations_it_lost(tmp_path):
    out = str(tmp_path / "out")
    env_config = {"agents": [0, 1], "episode_len": 30, "crash_once": str(tmp_path / "crashed")}
    config = new_stack_ppo_config(ScaledRewardsEnv, env_config, ["p_0", "p_1"], map_by_id, out, runners=2)
    algo = config.fault_tolerance(restart_failed_env_runners=True).build_algo()
    try:
        for _ in range(4):
            algo.train()
    finally:
        algo.stop()
    assert os.path.exists(tmp_path / "crashed")  # the env did raise in a remote runner
    audit = compare(out)
    assert not audit.failures(), [str(f) for f in audit.failures()]
    restarted = [f for f in audit.findings if f.key.startswith("runner-")]
    assert len(restarted) == 1 and restarted[0].verdict is Verdict.INCOMPLETE
    text = restarted[0].message
    assert text.startswith("runner train/") and " was restarted" in text
    # The crash happened in iteration 1: the runner handed nothing over for it.
    assert "no hand-over in iterations 1" in text or "iterations 1" in text, text
    exact(audit)  # RLlib lost those episodes' metrics too: the dashboards still match


@pytest.mark.parametrize("stack", ["new", "old"])
def test_restore_into_the_same_algorithm_is_a_segment_and_stays_exact(tmp_path, stack):
    out = str(tmp_path / "out")
    make = new_stack_ppo_config if stack == "new" else old_stack_ppo_config
    env_config = {"agents": [0, 1], "episode_len": 30, "random_rewards": True}
    algo = make(ScaledRewardsEnv, env_config, ["p_0", "p_1"], map_by_id, out).build_algo()
    try:
        algo.train()
        algo.train()
        algo.save(str(tmp_path / "ckpt"))
        algo.train()
        algo.train()
        algo.restore(str(tmp_path / "ckpt"))
        assert algo.train()["training_iteration"] == 3  # iterations 3-4 run twice
        algo.train()
    finally:
        algo.stop()
    audit = compare(out)
    assert audit.ok, [str(f) for f in audit.failures()]
    [run_json] = [os.path.join(dp, "run.json") for dp, _, files in os.walk(out) if "run.json" in files]
    with open(run_json) as f:
        segments = json.load(f)["segments"]
    assert [(s["reason"], s["first_iteration"], s["last_iteration"], s["first_training_iteration"], s["last_training_iteration"]) for s in segments] == [
        ("start", 1, 4, 1, 4),
        ("restored", 5, 6, 3, 4),
    ]
    assert any("restored in the same process (`algo.restore()`) at RLlib iteration 3" in n and "iterations 5–6 here are RLlib's 3–4" in n for n in audit.notes), audit.notes
    exact(audit)


def test_a_failing_driver_hook_is_counted_in_the_manifest(tmp_path, monkeypatch):
    from reward_audit.collector import Collector

    original, calls = Collector.record_result, {"n": 0}

    def record_result(self, result, iteration):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected driver failure")
        return original(self, result, iteration)

    monkeypatch.setattr(Collector, "record_result", record_result)
    out = str(tmp_path / "out")
    config = new_stack_ppo_config(ScaledRewardsEnv, {"agents": [0, 1], "episode_len": 30}, ["p_0", "p_1"], map_by_id, out)
    algo = config.build_algo()
    try:
        results = [algo.train() for _ in range(3)]  # training goes on
    finally:
        algo.stop()
    assert results[-1]["training_iteration"] == 3
    [run_json] = [os.path.join(dp, "run.json") for dp, _, files in os.walk(out) if "run.json" in files]
    with open(run_json) as f:
        assert json.load(f)["driver_failures"] == 1
    audit = compare(out)
    [capture] = [f for f in audit.findings if f.key == "capture"]
    assert capture.verdict is Verdict.UNVERIFIED and "1 capture failure (1 on the driver)" in capture.message


def _ttt_seats(agent_id, episode=None, **kwargs):
    """TicTacToe seats drawn per episode: player1 plays main or opponent, player2 the other."""
    import zlib

    flip = zlib.crc32(str(getattr(episode, "id_", "")).encode()) % 2
    return "main" if (agent_id == "player1") != bool(flip) else "opponent"


def test_a_leak_in_a_turn_based_game_is_explained_by_the_chunk_rllib_booked_it_in(tmp_path):
    # RLlib books a reward paid while a player waits (TicTacToe's −0.5 for an occupied field
    # is paid after the move, the player observes again a move later) with that player's next
    # observation, which can be in the next chunk. The recorder books it there too, so each
    # leaked value is exactly the other player's earlier chunks as RLlib cut them. (Before:
    # "difference −2 is not a sum of any agents' earlier/final-chunk rewards".)
    from ray.rllib.examples.envs.classes.multi_agent.tic_tac_toe import TicTacToe

    from reward_audit import RewardAuditCallback

    out = str(tmp_path / "out")
    callback = RewardAuditCallback.configured(out, inject_fault="leak")
    config = new_stack_ppo_config(TicTacToe, {}, ["main", "opponent"], _ttt_seats, out, callback=callback).debugging(seed=0)
    algo = config.build_algo()
    try:
        for _ in range(3):
            algo.train()
    finally:
        algo.stop()
    audit = compare(out, max_evidence=1000)
    wrong = [e for f in audit.findings if f.verdict.failing for e in f.evidence]
    assert len(wrong) >= 5 and {f.verdict for f in audit.findings if f.verdict.failing} == {Verdict.MISMATCH}
    for e in wrong:
        assert "earlier-chunk rewards" in e.explanation and "not a sum" not in e.explanation, e
        assert "misses its own" not in e.explanation, e
    # TicTacToe's earlier chunks hold only penalties: the leak is negative, a shortfall,
    # which the audit names MISMATCH, never LEAK (tests/test_fail_closed.py).
    players = [f for f in audit.findings if f.kind == "agent" and f.verdict.failing]
    assert {f.key for f in players} == {"player1", "player2"}
    for f in players:
        other = "player2" if f.key == "player1" else "player1"
        assert all(f"+ agent {other}'s earlier-chunk rewards" in e.explanation for e in f.evidence), f
