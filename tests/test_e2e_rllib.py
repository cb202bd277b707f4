"""End to end on the installed Ray (new API stack): tiny real PPO runs with the callback,
then compare. Zero false positives on the scenarios RLlib gets right, and raw-capture
fidelity against the env's own ledger, episode by episode.
"""

from __future__ import annotations

import logging
import re
import os

import pytest

ray = pytest.importorskip("ray", reason="end-to-end tests need ray[rllib]; `make test` installs it")

from helpers import assert_raw_matches_ledger, ledger, new_stack_ppo_config  # noqa: E402  (tests/helpers.py)
from reward_audit import RewardAuditCallback, Verdict, compare, load_run  # noqa: E402
from reward_audit.envs import ScaledRewardsEnv, TurnBasedEnv, map_all_shared, map_by_id  # noqa: E402

pytestmark = pytest.mark.rllib


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_instance):  # one Ray for the whole module (tests/conftest.py)
    yield


def base_config(env, env_config, policies, mapping, out, **kwargs):
    return new_stack_ppo_config(env, env_config, policies, mapping, out, **kwargs)


def train(config, iterations):
    algo = config.build_algo()
    try:
        results = [algo.train() for _ in range(iterations)]
    finally:
        algo.stop()
    return results


def assert_dashboards_match(audit):
    """Every recorded dashboard number is reproduced from RLlib's per-episode values by our
    window model (to float tolerance) and equals what the truth gives."""
    assert len(audit.dashboard) >= 5
    for d in audit.dashboard:
        assert not d.unreconstructable, (d.path, d.table.to_string())
        assert not d.wrong_iterations, (d.path, d.table.to_string())


def only_clean_or_warnings(audit, allowed=(Verdict.CLEAN, Verdict.INCOMPLETE)):
    bad = [str(f) for f in audit.findings if f.verdict not in allowed]
    assert not bad, "\n".join(bad)


def test_simultaneous_scales_multichunk_two_envs_with_evaluation(tmp_path):
    out, led = str(tmp_path / "out"), str(tmp_path / "ledger")
    os.makedirs(led)
    env_config = {"agents": [0, 1], "scales": [1.0, 1000.0], "episode_len": 30, "random_rewards": True, "ledger_dir": led}
    config = base_config(ScaledRewardsEnv, env_config, ["p_0", "p_1"], map_by_id, out, envs=2, evaluation=True)
    train(config, 3)
    run = load_run(out)
    audit = compare(run)
    only_clean_or_warnings(audit)
    assert run.manifest["api_stack"] == "new" and run.manifest["num_envs_per_env_runner"] == 2
    assert {"train", "evaluation"} <= set(run.raw["phase"])
    assert set(run.raw["env_index"]) == {0, 1}
    assert set(run.raw["agent_id_type"]) == {"int"}
    # Episodes of 30 steps, fragments of 16 steps per env: most episodes span several chunks.
    multi = audit.episodes[(audit.episodes["phase"] == "train") & (audit.episodes["chunks"] > 1)]
    assert multi["episode_id"].nunique() >= 3
    keys = {(f.phase, f.kind, f.key) for f in audit.findings if f.verdict == Verdict.CLEAN}
    assert {("train", "module", "p_0"), ("train", "module", "p_1"), ("train", "agent", "0"), ("evaluation", "module", "p_1")} <= keys
    p1 = next(f for f in audit.findings if (f.phase, f.kind, f.key) == ("train", "module", "p_1"))
    assert 15000 < p1.truth < 45000  # 30 steps x 1000 x U(0.5, 1.5)
    assert_raw_matches_ledger(run, ledger(led))
    # The dashboard numbers were recorded too.
    assert_dashboards_match(audit)
    paths = set(run.iterations["path"])
    assert "env_runners/module_episode_returns_mean/p_1" in paths
    assert "evaluation/env_runners/agent_episode_returns_mean/0" in paths


def test_turn_based_string_ids_pre_observation_rewards(tmp_path):
    out, led = str(tmp_path / "out"), str(tmp_path / "ledger")
    os.makedirs(led)
    env_config = {"agents": ["white", "black"], "episode_len": 20, "random_rewards": True, "ledger_dir": led}
    config = base_config(TurnBasedEnv, env_config, ["p_white", "p_black"], map_by_id, out)
    train(config, 2)
    run = load_run(out)
    audit = compare(run)
    only_clean_or_warnings(audit, (Verdict.CLEAN, Verdict.INCOMPLETE, Verdict.EXCLUDED))
    assert set(run.raw["agent_id_type"]) == {"str"}
    [excluded] = [f for f in audit.findings if f.verdict == Verdict.EXCLUDED]
    # black's reward on move 1 arrives with its first observation: RLlib never counts it.
    assert (excluded.phase, excluded.key) == ("train", "black")
    black = run.raw[run.raw["agent_id"] == "black"]
    assert (black.groupby("episode_id")["n_pre_obs"].sum() == 1).all()
    assert_raw_matches_ledger(run, ledger(led))
    module = next(f for f in audit.findings if (f.kind, f.key) == ("module", "p_black"))
    assert module.verdict == Verdict.CLEAN and module.episodes >= 5


def test_three_agents_share_one_module(tmp_path):
    out = str(tmp_path / "out")
    env_config = {"agents": [0, 1, 2], "scales": [1.0, 10.0, 100.0], "episode_len": 30}
    config = base_config(ScaledRewardsEnv, env_config, ["shared"], map_all_shared, out)
    train(config, 2)
    audit = compare(out)
    only_clean_or_warnings(audit)
    shared = next(f for f in audit.findings if (f.kind, f.key) == ("module", "shared"))
    assert shared.truth == pytest.approx(30 * 111.0)
    assert shared.reported == pytest.approx(30 * 111.0)


def test_remote_env_runner_with_remote_evaluation(tmp_path):
    out, led = str(tmp_path / "out"), str(tmp_path / "ledger")
    os.makedirs(led)
    env_config = {"agents": [0, 1], "scales": [1.0, 10.0], "episode_len": 30, "random_rewards": True, "ledger_dir": led}
    config = base_config(ScaledRewardsEnv, env_config, ["p_0", "p_1"], map_by_id, out, runners=1, evaluation=True)
    train(config, 2)
    run = load_run(out)
    audit = compare(run)
    only_clean_or_warnings(audit)
    assert set(run.raw["worker_index"]) == {1}  # remote runners only
    assert {"train", "evaluation"} <= set(run.raw["phase"])
    assert_raw_matches_ledger(run, ledger(led))
    assert_dashboards_match(audit)


class FailingCallback(RewardAuditCallback):
    """A recorder that breaks: every episode step hook raises inside reward_audit."""

    def _episode_hook(self, kwargs, action):
        if action == "step":
            raise RuntimeError("injected recorder failure")
        super()._episode_hook(kwargs, action)


def test_recorder_failure_does_not_stop_training(tmp_path, caplog):
    out = str(tmp_path / "out")
    env_config = {"agents": [0, 1], "episode_len": 30}
    config = base_config(ScaledRewardsEnv, env_config, ["p_0", "p_1"], map_by_id, out, callback=FailingCallback)
    with caplog.at_level(logging.ERROR, logger="reward_audit"):
        results = train(config, 2)
    assert results[-1]["training_iteration"] == 2
    assert any("injected recorder failure" in (r.exc_text or "") or "on_episode_step failed" in r.getMessage() for r in caplog.records)
    run = load_run(out)
    assert run.manifest["capture_failures"] > 0
    audit = compare(run)
    assert any(f.verdict == Verdict.UNVERIFIED and f.key == "capture" for f in audit.findings)


def test_default_location_under_tune_is_the_trial_dir(tmp_path):
    from ray import tune

    try:
        from ray.tune import RunConfig
    except ImportError:  # older Ray
        from ray.air import RunConfig
    from ray.rllib.algorithms.ppo import PPO

    env_config = {"agents": [0, 1], "episode_len": 30}
    config = base_config(ScaledRewardsEnv, env_config, ["p_0", "p_1"], map_by_id, "unused").callbacks(RewardAuditCallback)
    tuner = tune.Tuner(
        PPO,
        param_space=config,
        run_config=RunConfig(storage_path=str(tmp_path), name="exp", stop={"training_iteration": 2}, verbose=0),
    )
    [result] = list(tuner.fit())
    assert result.error is None
    trial_dir = result.path
    assert os.path.isfile(os.path.join(trial_dir, "reward_audit", "run.json"))
    assert os.path.isfile(os.path.join(trial_dir, "result.json"))
    run = load_run(trial_dir)
    assert run.manifest["output_source"] == "trial dir"
    assert run.iterations["iteration"].max() == 2
    # What Tune wrote to result.json is exactly what the callback recorded.
    [note] = compare(run).notes
    checked = int(re.search(r"(\d+) numbers cross-checked", note).group(1))
    assert "result.json" in note and checked >= 10 and note.endswith(", 0 differ")
    # The experiment dir works too (one section per trial).
    from click.testing import CliRunner

    from reward_audit.cli import main

    cli = CliRunner().invoke(main, ["compare", str(tmp_path / "exp")])
    assert cli.exit_code == 0, cli.output
    assert f"== {os.path.basename(trial_dir)}" in cli.output


def test_env_var_overrides_and_default_is_logdir(tmp_path, monkeypatch):
    env_config = {"agents": [0, 1], "episode_len": 30}
    monkeypatch.setenv("REWARD_AUDIT_DIR", str(tmp_path / "ci"))
    config = base_config(ScaledRewardsEnv, env_config, ["p_0", "p_1"], map_by_id, str(tmp_path / "explicit"))
    train(config, 1)
    assert load_run(str(tmp_path / "ci")).manifest["output_source"] == "$REWARD_AUDIT_DIR"
    assert not os.path.exists(tmp_path / "explicit")
    # A second run into the same base folder gets its own sub-folder: runs never mix.
    train(config, 1)
    from reward_audit import load_runs

    assert len(load_runs(str(tmp_path / "ci"))) == 2

    monkeypatch.delenv("REWARD_AUDIT_DIR")
    import shutil

    algo = base_config(ScaledRewardsEnv, env_config, ["p_0", "p_1"], map_by_id, "x").callbacks(RewardAuditCallback).build_algo()
    try:
        algo.train()
        assert load_run(algo.logdir).manifest["output_source"] == "algorithm.logdir"
    finally:
        algo.stop()
        shutil.rmtree(algo.logdir, ignore_errors=True)


def test_per_episode_mapping_is_recorded_per_episode(tmp_path):
    from reward_audit.envs import map_seats_by_episode

    out = str(tmp_path / "out")
    env_config = {"agents": [0, 1], "scales": [1.0, 10.0], "episode_len": 30}
    config = base_config(ScaledRewardsEnv, env_config, ["main", "snapshot"], map_seats_by_episode, out)
    train(config, 2)
    run = load_run(out)
    audit = compare(run)
    only_clean_or_warnings(audit)
    seats = run.raw.drop_duplicates(["episode_id", "agent_id"]).pivot(index="episode_id", columns="agent_id", values="module_id")
    # Both seatings occur, and within an episode the two agents hold different modules.
    assert (seats["0"] != seats["1"]).all()
    assert set(seats["0"]) == {"main", "snapshot"}
    main = next(f for f in audit.findings if (f.phase, f.kind, f.key) == ("train", "module", "main"))
    # main's truth mixes 30 (agent 0) and 300 (agent 1) episodes.
    assert 30 < main.truth < 300


def test_unwritable_output_is_logged_and_training_continues(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    env_config = {"agents": [0, 1], "episode_len": 30}
    config = base_config(ScaledRewardsEnv, env_config, ["p_0", "p_1"], map_by_id, str(blocker / "sub"))
    with caplog.at_level(logging.ERROR, logger="reward_audit"):
        results = train(config, 2)
    assert results[-1]["training_iteration"] == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("on_algorithm_init failed" in m for m in messages)
    assert any("no output folder; dropped" in m and "rows of iteration 2" in m for m in messages)
