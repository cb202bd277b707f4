"""RunnerRecorder: rewards reach the right episode and chunk under each hook order."""

from __future__ import annotations

import pandas as pd
import pytest

from reward_audit.capture.base import install_tap
from reward_audit.recorder import RunnerRecorder
from reward_audit.schema import Phase


class FakeEpisode:
    def __init__(self, episode_id, mapping):
        self.id_ = episode_id
        self.mapping = mapping


def recorder():
    return RunnerRecorder(Phase.TRAIN, 0, mapping_of=lambda ep: ep.mapping)


def rows(rec):
    return pd.DataFrame(rec.drain()["raw_rewards"])


def test_turn_based_pre_observation_rewards():
    rec = recorder()
    ep = FakeEpisode("e", {"w": "p", "b": "p"})
    rec.episode_begins("e", 0, ep)
    rec.tap_reset(0, {"w": 1})
    rec.tap_step(0, {"b": 1}, {"w": 1.0, "b": -0.5})  # b paid with its first obs -> pre-obs
    rec.episode_step("e", 0, ep)
    rec.tap_step(0, {"w": 1}, {"b": 1.0, "w": -0.5})
    rec.episode_ends("e", 0, ep)
    rec.sample_ends()
    df = rows(rec).set_index("agent_id")
    assert df.loc["b", "reward"] == 0.5 and df.loc["b", "pre_obs_reward"] == -0.5 and df.loc["b", "n_pre_obs"] == 1
    assert df.loc["w", "reward"] == 0.5 and df.loc["w", "pre_obs_reward"] == 0.0
    assert set(df["module_id"]) == {"p"}
    assert df["episode_done"].all()


def chunk_rows(steps, cut_after):
    """Replay ``(obs, rewards, terminateds)`` steps of episode "e" (reset observes ``w``),
    ending ``sample()`` after the steps listed in ``cut_after``: ``{(chunk, agent): reward}``."""
    rec = recorder()
    ep = FakeEpisode("e", {"w": "pw", "b": "pb"})
    rec.episode_begins("e", 0, ep)
    rec.tap_reset(0, {"w": 0})
    for i, (obs, rewards, terminateds) in enumerate(steps):
        rec.tap_step(0, obs, rewards, terminateds, {})
        rec.episode_step("e", 0, ep) if not terminateds.get("__all__") else rec.episode_ends("e", 0, ep)
        if i in cut_after:
            rec.sample_ends()
    rec.sample_ends()
    df = rows(rec)
    return {(int(c), a): r for c, a, r in zip(df["chunk_seq"], df["agent_id"], df["reward"])}


# RLlib books a reward paid while an agent waits (not in that step's observations) with the
# agent's next observation, its own done flag or the episode's end — in a later chunk if a
# sample() ends in between (2.60 MultiAgentEpisode._hanging_rewards_end, cut()). Rows per
# (chunk, agent); every case's per-agent totals are the same: only the chunk moves.
@pytest.mark.parametrize(
    "steps, cut_after, expected",
    [
        pytest.param(  # w is paid -0.5 for its move, then waits; b moves; cut; w observes
            [({"b": 0}, {"w": -0.5}, {}), ({"w": 0}, {"b": 0.0}, {}), ({"b": 0, "w": 0}, {"w": 1.0, "b": -1.0}, {"__all__": True})],
            {0},
            {(1, "w"): 0.5, (1, "b"): -1.0},
            id="waiting-reward-moves-to-the-chunk-of-the-next-observation",
        ),
        pytest.param(
            [({"b": 0}, {"w": -0.5}, {}), ({"w": 0}, {"b": 0.0}, {}), ({"b": 0, "w": 0}, {"w": 1.0, "b": -1.0}, {"__all__": True})],
            {1},
            {(0, "w"): -0.5, (1, "w"): 1.0, (1, "b"): -1.0},
            id="observed-before-the-cut-stays-in-that-chunk",
        ),
        pytest.param(  # w is done on its own (no observation): booked at that step
            [({"b": 0}, {"w": 2.0}, {}), ({"b": 0}, {"w": 3.0}, {"w": True}), ({"b": 0}, {"b": 1.0}, {"__all__": True})],
            {1},
            {(0, "w"): 5.0, (1, "b"): 1.0},
            id="own-done-flag-releases",
        ),
        pytest.param(  # the episode ends while w waits: booked at the end
            [({"b": 0}, {"w": 2.0}, {}), ({"b": 0}, {"b": 1.0}, {})],
            {0},
            {(1, "b"): 1.0},
            id="still-waiting-unbooked-until-observation-or-end",
        ),
    ],
)
def test_rewards_paid_while_waiting_are_booked_with_the_next_observation(steps, cut_after, expected):
    assert chunk_rows(steps, cut_after) == expected


def test_waiting_rewards_go_to_the_episode_that_ends_or_is_reset():
    rec = recorder()
    ep = FakeEpisode("e", {"w": "p", "b": "p"})
    rec.episode_begins("e", 0, ep)
    rec.tap_reset(0, {"w": 0})
    rec.tap_step(0, {"b": 0}, {"w": 2.0, "b": 0.0}, {}, {})
    rec.episode_step("e", 0, ep)
    rec.sample_ends()
    rec.tap_step(0, {"b": 0}, {"w": 3.0}, {}, {"__all__": True})  # truncated while w waits
    rec.episode_ends("e", 0, ep)
    rec.sample_ends()
    new = FakeEpisode("n", {"w": "p", "b": "p"})
    rec.tap_reset(0, {"w": 0})  # nothing waits across a reset
    rec.episode_begins("n", 0, new)
    rec.tap_step(0, {"w": 0}, {"w": 1.0}, {}, {})
    rec.episode_step("n", 0, new)
    rec.sample_ends()
    df = rows(rec)
    got = {(e, int(c), a): r for e, c, a, r in zip(df["episode_id"], df["chunk_seq"], df["agent_id"], df["reward"])}
    assert got == {("e", 0, "b"): 0.0, ("e", 1, "w"): 5.0, ("n", 2, "w"): 1.0}


def test_chunks_follow_sample_calls_and_done_flag():
    rec = recorder()
    ep = FakeEpisode("e", {0: "p0"})
    rec.episode_begins("e", 0, ep)
    rec.tap_reset(0, {0: 1})
    rec.tap_step(0, {0: 1}, {0: 1.0})
    rec.episode_step("e", 0, ep)
    rec.sample_ends()
    rec.tap_step(0, {0: 1}, {0: 2.0})
    rec.episode_step("e", 0, ep)
    rec.episode_ends("e", 0, ep)
    rec.sample_ends()
    df = rows(rec)
    assert list(df["chunk_seq"]) == [0, 1]
    assert list(df["reward"]) == [1.0, 2.0]
    assert list(df["episode_done"]) == [False, True]
    assert list(df["agent_id_type"]) == ["int", "int"]


def test_leftover_rewards_belong_to_the_previous_episode():
    # A new episode is created on an index whose last step was never handed to a hook
    # (evaluation's `break`): the tail belongs to the episode that was running there.
    rec = recorder()
    old, new = FakeEpisode("old", {0: "p"}), FakeEpisode("new", {0: "p"})
    rec.episode_begins("old", 0, old)
    rec.tap_reset(0, {0: 1})
    rec.tap_step(0, {0: 1}, {0: 5.0})
    rec.episode_begins("new", 0, new)
    rec.tap_reset(0, {0: 1})
    rec.tap_step(0, {0: 1}, {0: 7.0})
    rec.episode_step("new", 0, new)
    rec.sample_ends()
    df = rows(rec).set_index("episode_id")
    assert df.loc["old", "reward"] == 5.0 and df.loc["new", "reward"] == 7.0


def test_sample_end_flushes_pending_into_current_episode_per_env():
    rec = recorder()
    a, b = FakeEpisode("a", {0: "p"}), FakeEpisode("b", {0: "p"})
    rec.episode_begins("a", 0, a)
    rec.episode_begins("b", 1, b)
    rec.tap_step(0, {0: 1}, {0: 1.0})
    rec.tap_step(1, {0: 1}, {0: 2.0})
    rec.sample_ends()  # no step hooks ran for the last step
    df = rows(rec).set_index("episode_id")
    assert df.loc["a", "reward"] == 1.0 and df.loc["b", "reward"] == 2.0
    assert df.loc["b", "env_index"] == 1


def test_reported_values_are_zipped_with_stored_ids_in_order():
    rec = recorder()
    rec.metrics_call_begins(["x", "y"])
    rec.reported_episode(None, 3.0, {"0": 1.0, "1": 2.0}, {"p": 3.0})
    rec.reported_episode(None, 4.0, {"0": 4.0}, {"p": 4.0})
    rec.metrics_call_ends()
    rep = pd.DataFrame(rec.drain()["reported_episodes"])
    assert set(rep[rep["episode_id"] == "x"]["value"]) == {1.0, 2.0, 3.0}
    assert set(rep[rep["episode_id"] == "y"]["kind"]) == {"episode", "agent", "module"}
    assert set(rep["metrics_call"]) == {0}
    assert rec.metrics_call == 1 and rec.failures == 0


def test_more_reports_than_stored_episodes_is_counted_not_raised():
    rec = recorder()
    rec.metrics_call_begins([])
    rec.reported_episode(None, 1.0, {}, {})
    rec.metrics_call_ends()
    assert rec.failures == 1


class BrokenRecorder(RunnerRecorder):
    def tap_step(self, *args):
        raise RuntimeError("boom")


class Env:
    def __init__(self):
        self.t = 0

    def reset(self, **kwargs):
        return {0: 0}, {}

    def step(self, actions):
        self.t += 1
        return {0: self.t}, {0: 1.0}, {"__all__": False}, {"__all__": False}, {}


def test_tap_returns_env_result_unchanged_and_never_raises():
    env = Env()
    rec = BrokenRecorder(Phase.TRAIN, 0, mapping_of=lambda ep: {})
    install_tap(env, rec, 0)
    assert env.reset() == ({0: 0}, {})
    assert env.step({0: 1}) == ({0: 1}, {0: 1.0}, {"__all__": False}, {"__all__": False}, {})
    assert rec.failures == 1


def test_retap_updates_target_instead_of_double_counting():
    env = Env()
    first, second = recorder(), recorder()
    install_tap(env, first, 0)
    install_tap(env, second, 3)
    env.reset()
    env.step({0: 1})
    assert first._pending == {}
    # [Σr, n, Σ pre-obs, n pre-obs, compensation, Σ|r|, significand bits, pre-obs compensation, Σ clip(r), its compensation]
    assert second._pending == {3: {0: [1.0, 1, 0.0, 0, 0.0, 1.0, 53, 0.0, 0.0, 0.0]}}


class ScriptedEnv:
    """Turn-based: reset observes only ``w``; each step pays both and observes the other."""

    def __init__(self):
        self.t = 0

    def reset(self, **kwargs):
        self.t = 0
        return {"w": 0}, {}

    def step(self, actions):
        self.t += 1
        obs = {"b": self.t} if self.t % 2 else {"w": self.t}
        return obs, {"w": 1.0 * self.t, "b": 10.0 * self.t}, {"__all__": False}, {"__all__": False}, {}


def replay(events):
    """Drive a tapped env and the recorder in the order RLlib calls them."""
    env, rec = ScriptedEnv(), recorder()
    install_tap(env, rec, 0)
    episodes = {}
    for event, *arg in events:
        if event in ("created", "start", "step_hook", "end"):
            ep = episodes.setdefault(arg[0], FakeEpisode(arg[0], {"w": "pw", "b": "pb"}))
            {"created": rec.episode_begins, "start": rec.episode_begins, "step_hook": rec.episode_step, "end": rec.episode_ends}[event](arg[0], 0, ep)
        elif event == "reset":
            env.reset()
        elif event == "step":
            env.step({})
        else:
            rec.sample_ends()
    return rows(rec).set_index(["episode_id", "agent_id"]).sort_index()


# Ray 2.12 experimental new stack (multi_agent_env_runner.py). Training, _sample_timesteps:
# created, reset, start; on_episode_step also on the final step, then end, then created,
# reset, start of the next (:336-356). Evaluation, _sample_episodes: reset BEFORE created
# (:417-433), and the loop breaks after the last episode's end (:550).
RAY212_TRAIN = [
    ("created", "e1"), ("reset",), ("start", "e1"),
    ("step",), ("step_hook", "e1"), ("step",), ("step_hook", "e1"), ("sample_end",),
    ("step",), ("step_hook", "e1"), ("end", "e1"), ("created", "e2"), ("reset",), ("start", "e2"),
    ("step",), ("step_hook", "e2"), ("sample_end",),
]
RAY212_EVAL = [
    ("reset",), ("created", "e1"), ("start", "e1"),
    ("step",), ("step_hook", "e1"), ("step",), ("step_hook", "e1"), ("step",), ("step_hook", "e1"), ("end", "e1"),
    ("created", "e2"), ("reset",), ("start", "e2"),
    ("step",), ("step_hook", "e2"), ("end", "e2"), ("sample_end",),
]


def test_ray212_training_hook_order():
    df = replay(RAY212_TRAIN)
    sums = df.groupby(level=[0, 1])[["reward", "pre_obs_reward"]].sum()
    # e1: steps 1, 2 in chunk 0; step 3 in chunk 1. b is first observed with step 1's obs,
    # so its step-1 reward is pre-observation; the reset of e2 starts a fresh observed set.
    assert sums.loc[("e1", "w")].tolist() == [6.0, 0.0] and sums.loc[("e1", "b")].tolist() == [60.0, 10.0]
    assert sums.loc[("e2", "b")].tolist() == [10.0, 10.0]
    # w was paid while b held the move: booked with w's next observation (e1: step 2, and
    # at its end for step 3's reward; e2: not yet — w has not observed since).
    assert ("e2", "w") not in sums.index
    e1w = df.loc[df.index == ("e1", "w")]
    assert e1w["chunk_seq"].tolist() == [0, 1] and e1w["episode_done"].tolist() == [False, True]
    assert e1w["reward"].tolist() == [3.0, 3.0]


def test_ray212_evaluation_hook_order_reset_before_created():
    df = replay(RAY212_EVAL)
    sums = df.groupby(level=[0, 1])[["reward", "pre_obs_reward"]].sum()
    assert sums.loc[("e1", "w")].tolist() == [6.0, 0.0] and sums.loc[("e1", "b")].tolist() == [60.0, 10.0]
    # The reset ran before e2 existed: its observed set is still e2's own (only w), so b's
    # first reward in e2 is pre-observation, and nothing of e1 leaked into e2.
    assert sums.loc[("e2", "w")].tolist() == [1.0, 0.0] and sums.loc[("e2", "b")].tolist() == [10.0, 10.0]
    assert df["episode_done"].all() and len(df) == 4  # one chunk per (episode, agent)


def test_sums_are_compensated_and_record_what_bounds_their_rounding():
    import numpy as np

    from reward_audit.recorder import RunnerRecorder
    from reward_audit.schema import Phase

    rec = RunnerRecorder(Phase.TRAIN, 0, mapping_of=lambda e: {0: "p0"})
    rec.tap_reset(0, {0: 0})
    rewards = [1e17, 0.25, -1e17, 0.5, np.float32(0.125)]  # naive float64 summation loses the 0.25 and 0.5
    for r in rewards:
        rec.tap_step(0, {0: 0}, {0: r})
    rec.episode_ends("e", 0, None, mapping={0: "p0"})
    rec.sample_ends()
    [row] = rec.drain()["raw_rewards"]
    assert sum(rewards) != 0.875 and row["reward"] == 0.875  # exact: 0.25 + 0.5 + 0.125
    assert row["n_rewards"] == 5 and row["reward_bits"] == 24  # one float32 reward
    assert row["reward_cancel"] >= 2e17 and (row["reward_cancel"] - 2e17) / 2e17 < 1e-6  # Σ|r| - |Σr|, rounded up


def test_importing_the_recorder_loads_no_pandas_audit_or_report():
    # What an env runner imports (issue 9): the recorder and the capture adapters' base,
    # never the audit, the renderers or pandas.
    import subprocess
    import sys

    code = (
        "import sys, reward_audit.recorder, reward_audit.capture.base\n"
        "loaded = [m for m in ('pandas', 'reward_audit.compare', 'reward_audit.tally', 'reward_audit.report', 'reward_audit.store') if m in sys.modules]\n"
        "print(','.join(loaded))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_the_package_names_resolve_lazily():
    import importlib

    import reward_audit

    module = importlib.import_module("reward_audit.compare")  # binding the submodule must not shadow the function
    assert callable(reward_audit.compare) and reward_audit.compare is module.compare
    assert reward_audit.Verdict.LEAK.value == "LEAK"
