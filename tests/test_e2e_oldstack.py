"""End to end on the installed Ray's OLD API stack (``RolloutWorker`` + ``EnvRunnerV2``):
on Ray 2.4x – 2.60 selected with ``.api_stack(enable_rl_module_and_learner=False,
enable_env_runner_and_connector_v2=False)``, on Ray 2.1x the default. The module spells the
config for either, so it also runs in another Ray's virtualenv:
``PYTHONPATH=. /tmp/venv212/bin/python -m pytest tests/test_e2e_oldstack.py``.

Tiny real PPO runs with the callback, then compare: zero false positives on the scenarios
RLlib gets right, raw-capture fidelity against the env's own ledger, and the dashboard
numbers rebuilt from the captured per-episode values. Plus, without training: the old-stack
hook order replayed, the reported-value and clipping rules, and ``detect()``.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="end-to-end tests need ray[rllib]; `make test` installs it")

from ray.rllib.algorithms.ppo import PPOConfig  # noqa: E402
from ray.rllib.policy.policy import PolicySpec  # noqa: E402

from helpers import assert_raw_matches_ledger, ledger  # noqa: E402  (tests/helpers.py)
from reward_audit import RewardAuditCallback, Verdict, compare, load_run  # noqa: E402
from reward_audit.capture import detect  # noqa: E402
from reward_audit.capture.base import install_tap  # noqa: E402
from reward_audit.capture.oldstack import OldStackAdapter  # noqa: E402
from reward_audit.envs import ScaledRewardsEnv, TurnBasedEnv, map_all_shared, map_by_id  # noqa: E402
from reward_audit.errors import UnsupportedRayError  # noqa: E402
from reward_audit.recorder import RunnerRecorder  # noqa: E402
from reward_audit.schema import Phase  # noqa: E402

pytestmark = pytest.mark.rllib

RAY = tuple(int(part) for part in ray.__version__.split(".")[:2])
SPELLING_24X = RAY >= (2, 40)  # env_runners(), api_stack(), build_algo(), results under env_runners/
RESULTS = "env_runners/" if SPELLING_24X else ""  # where the old-stack episode numbers sit


def old_stack_config(env, env_config, policies, mapping, out, *, runners=0, envs=1, fragment=16, evaluation=False, remote_envs=False, callback=None):
    # Old stack: train_batch_size (not _per_learner) and model= (not rl_module).
    if SPELLING_24X:
        config = (
            PPOConfig()
            .api_stack(enable_rl_module_and_learner=False, enable_env_runner_and_connector_v2=False)
            .multi_agent(policies=set(policies), policy_mapping_fn=mapping)
            .env_runners(num_env_runners=runners, num_envs_per_env_runner=envs, rollout_fragment_length=fragment, remote_worker_envs=remote_envs)
            .training(train_batch_size=128, minibatch_size=64, num_epochs=1, model={"fcnet_hiddens": [8]})
        )
        eval_runners = {"evaluation_num_env_runners": runners}
    else:  # Ray 2.1x: the envs' spaces are per agent (2.4x style), so give them per policy.
        spec = PolicySpec(observation_space=gym.spaces.Box(0.0, 1.0, (2,), np.float32), action_space=gym.spaces.Discrete(2))
        config = (
            PPOConfig()
            .framework("torch")
            .multi_agent(policies={p: spec for p in policies}, policy_mapping_fn=mapping)
            .rollouts(num_rollout_workers=runners, num_envs_per_worker=envs, rollout_fragment_length=fragment, remote_worker_envs=remote_envs)
            .training(train_batch_size=128, sgd_minibatch_size=64, num_sgd_iter=1, model={"fcnet_hiddens": [8]})
        )
        eval_runners = {"evaluation_num_workers": runners}
    config = config.environment(env, env_config=env_config, disable_env_checking=True).callbacks((callback or RewardAuditCallback).writing_to(out))
    if evaluation:
        config = config.evaluation(evaluation_interval=1, evaluation_duration=2, evaluation_duration_unit="episodes", **eval_runners)
    return config


def runner_results(result):
    """The old-stack episode numbers of a ``train()`` (or its ``evaluation``) result."""
    return result["env_runners"] if SPELLING_24X else result


def train(config, iterations):
    algo = config.build_algo() if hasattr(config, "build_algo") else config.build()
    try:
        return [algo.train() for _ in range(iterations)]
    finally:
        algo.stop()


def assert_old_stack_bookkeeping(run):
    """Every reported episode has raw rows that end it, under a runner-scoped id."""
    done = run.raw.groupby(["runner_id", "episode_id"])["episode_done"].any()
    reported = run.reported.drop_duplicates(["runner_id", "episode_id"]).set_index(["runner_id", "episode_id"]).index
    assert len(reported) > 0
    assert done.reindex(reported, fill_value=False).all(), "a reported episode has no episode_done row"
    assert (run.reported["metrics_call"] == -1).all()
    assert set(run.reported["kind"]) == {"policy", "episode"}
    ids = pd.concat([run.raw[["runner_id", "episode_id"]], run.reported[["runner_id", "episode_id"]]])
    assert all(e.startswith(f"{r}:") for r, e in zip(ids["runner_id"], ids["episode_id"]))


def assert_dashboard_rebuilt(run, results, *, remote_evaluation=False):
    """The train() result's old-stack numbers are rebuilt from the captured per-episode values:
    ``policy_reward_mean/<p>`` is the mean over (agent, episode) entries, ``episode_reward_mean``
    over episodes; train keeps all episodes so far (fewer than S=100), evaluation only that
    iteration's. Also checked against the truth.

    ``remote_evaluation``: RLlib samples remote eval runners asynchronously and, once enough
    results are in, leaves one request in flight; the next evaluate() discards its result as
    stale but counts it toward ``evaluation_duration`` (Ray issue #46412). That episode is
    reported by its runner (so captured) but never shown: check only that every shown
    evaluation episode is a captured, clean one."""
    audit = compare(run)
    t = audit.episodes
    assert len(run.reported) and sum(len(runner_results(r)["policy_reward_mean"]) for r in results) > 0
    for i, result in enumerate(results, start=1):
        evaluation = runner_results(result["evaluation"]) if "evaluation" in result else None
        for phase, block in (("train", runner_results(result)), ("evaluation", evaluation)):
            if not block:
                continue
            if phase == "evaluation" and remote_evaluation:
                captured = t[(t["phase"] == phase) & (t["kind"] == "episode")]
                assert captured["clean"].all()
                for shown in block["hist_stats"]["episode_reward"]:
                    assert np.isclose(captured["reported"], shown, rtol=1e-9, atol=0).any(), shown
                continue
            rows = t[(t["phase"] == phase) & ((t["iteration"] <= i) if phase == "train" else (t["iteration"] == i))]
            for pid, shown in block["policy_reward_mean"].items():
                entries = rows[(rows["kind"] == "policy") & (rows["module_id"] == pid)]
                assert shown == pytest.approx(entries["reported"].mean()) == pytest.approx(entries["truth"].mean())
            episodes = rows[rows["kind"] == "episode"]
            assert block["episode_reward_mean"] == pytest.approx(episodes["reported"].mean()) == pytest.approx(episodes["truth"].mean())
            assert block.get("episode_return_mean", block["episode_reward_mean"]) == block["episode_reward_mean"]


def only_clean_or_warnings(audit, allowed=(Verdict.CLEAN, Verdict.INCOMPLETE)):
    bad = [str(f) for f in audit.findings if f.verdict not in allowed]
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- real runs


def test_simultaneous_scales_multichunk_two_envs_with_evaluation(ray_instance, tmp_path):
    out, led = str(tmp_path / "out"), str(tmp_path / "ledger")
    os.makedirs(led)
    env_config = {"agents": [0, 1], "scales": [1.0, 1000.0], "episode_len": 30, "random_rewards": True, "ledger_dir": led}
    results = train(old_stack_config(ScaledRewardsEnv, env_config, ["p_0", "p_1"], map_by_id, out, envs=2, evaluation=True), 3)
    run = load_run(out)
    audit = compare(run)
    only_clean_or_warnings(audit)
    m = run.manifest
    assert (m["api_stack"], m["adapter"], m["num_envs_per_env_runner"], m["smoothing_model"]) == ("old", "old-stack", 2, "driver_history")
    assert m["iteration_semantics"][f"{RESULTS}policy_reward_mean/"] == "mean_of_agent_episodes"
    assert {"train", "evaluation"} <= set(run.raw["phase"])
    assert set(run.raw["env_index"]) == {0, 1}
    assert set(run.raw["agent_id_type"]) == {"int"}
    # Episodes of 30 steps, fragments of 16 steps per env: most episodes span several chunks.
    multi = audit.episodes[(audit.episodes["phase"] == "train") & (audit.episodes["chunks"] > 1)]
    assert multi["episode_id"].nunique() >= 3
    keys = {(f.phase, f.kind, f.key) for f in audit.findings if f.verdict == Verdict.CLEAN}
    assert {("train", "policy", "p_0"), ("train", "policy", "p_1"), ("train", "episode", "return"), ("evaluation", "policy", "p_1")} <= keys
    p1 = next(f for f in audit.findings if (f.phase, f.kind, f.key) == ("train", "policy", "p_1"))
    assert 15000 < p1.truth < 45000  # 30 steps x 1000 x U(0.5, 1.5)
    assert_raw_matches_ledger(run, ledger(led))
    assert_old_stack_bookkeeping(run)
    assert_dashboard_rebuilt(run, results)
    paths = set(run.iterations["path"])
    assert {f"{RESULTS}policy_reward_mean/p_1", f"{RESULTS}policy_reward_max/p_0", f"{RESULTS}episode_reward_mean"} <= paths
    assert f"evaluation/{RESULTS}policy_reward_mean/p_0" in paths
    assert ("env_runners/episode_return_mean" if SPELLING_24X else "sampler_results/policy_reward_mean/p_1") in paths


class BatchSpy(RewardAuditCallback):
    """Also sums, per (episode, sample() call, agent), the rewards in RLlib's own sample batch."""

    batches: dict = defaultdict(float)

    def on_sample_end(self, **kwargs):
        super().on_sample_end(**kwargs)
        worker, samples = kwargs["worker"], kwargs["samples"]
        recorder = worker._reward_audit_recorder
        for pid, batch in samples.policy_batches.items():  # policy p_<agent> (map_by_id)
            for eps_id, reward in zip(batch["eps_id"], batch["rewards"]):
                BatchSpy.batches[(f"{recorder.runner_id}:{int(eps_id)}", recorder.sample_seq - 1, pid[len("p_"):])] += float(reward)


def test_final_step_just_before_sample_end_is_filed_with_rllibs_next_sample(ray_instance, tmp_path):
    """17-step episodes, 16-step fragments, one env: some episodes take their final
    ``env.step()`` after RLlib cut the batch. RLlib processes that step in the next
    ``sample()`` call, so must the recorder: the chunk rows equal the rewards in RLlib's own
    sample batches, and every finished episode has its ``episode_done`` row."""
    out = str(tmp_path / "out")
    BatchSpy.batches.clear()
    env_config = {"agents": [0, 1], "scales": [1.0, 1000.0], "episode_len": 17, "random_rewards": True}
    train(old_stack_config(ScaledRewardsEnv, env_config, ["p_0", "p_1"], map_by_id, out, callback=BatchSpy), 2)
    run = load_run(out)
    only_clean_or_warnings(compare(run))
    assert_old_stack_bookkeeping(run)
    raw = run.raw.assign(counted=run.raw["reward"] - run.raw["pre_obs_reward"])
    ours = raw.groupby(["episode_id", "chunk_seq", "agent_id"])["counted"].sum().to_dict()
    assert len(ours) > 20
    assert set(ours) == set(BatchSpy.batches)
    assert all(ours[k] == pytest.approx(v) for k, v in BatchSpy.batches.items())
    # ... and the case happened: an episode ended with a one-step chunk of its own.
    steps = raw.groupby(["episode_id", "chunk_seq"])["n_rewards"].max()
    last = raw[raw["episode_done"]].groupby("episode_id")["chunk_seq"].max()
    assert any(steps[(e, c)] == 1 for e, c in last.items())


def test_turn_based_string_ids_pre_observation_rewards(ray_instance, tmp_path):
    out, led = str(tmp_path / "out"), str(tmp_path / "ledger")
    os.makedirs(led)
    env_config = {"agents": ["white", "black"], "episode_len": 20, "random_rewards": True, "ledger_dir": led}
    results = train(old_stack_config(TurnBasedEnv, env_config, ["p_white", "p_black"], map_by_id, out), 2)
    run = load_run(out)
    audit = compare(run)
    only_clean_or_warnings(audit, (Verdict.CLEAN, Verdict.INCOMPLETE, Verdict.EXCLUDED))
    assert set(run.raw["agent_id_type"]) == {"str"}
    [excluded] = [f for f in audit.findings if f.verdict == Verdict.EXCLUDED]
    # black's reward on move 1 arrives with its first observation: add_init_obs drops it.
    assert (excluded.phase, excluded.key) == ("train", "black")
    black = run.raw[run.raw["agent_id"] == "black"]
    assert (black.groupby("episode_id")["n_pre_obs"].sum() == 1).all()
    assert_raw_matches_ledger(run, ledger(led))
    assert_old_stack_bookkeeping(run)
    assert_dashboard_rebuilt(run, results)
    policy = next(f for f in audit.findings if (f.kind, f.key) == ("policy", "p_black"))
    assert policy.verdict == Verdict.CLEAN and policy.episodes >= 5


def test_three_agents_share_one_policy(ray_instance, tmp_path):
    out = str(tmp_path / "out")
    env_config = {"agents": [0, 1, 2], "scales": [1.0, 10.0, 100.0], "episode_len": 30}
    results = train(old_stack_config(ScaledRewardsEnv, env_config, ["shared"], map_all_shared, out), 2)
    run = load_run(out)
    audit = compare(run)
    only_clean_or_warnings(audit)
    # One (agent, policy) entry per agent and episode: three per episode, summed nowhere.
    policy = run.reported[run.reported["kind"] == "policy"]
    assert policy.groupby("episode_id")["agent_id"].apply(lambda ids: sorted(ids) == ["0", "1", "2"]).all()
    shared = next(f for f in audit.findings if (f.kind, f.key) == ("policy", "shared"))
    assert shared.truth == pytest.approx(30 * 111.0 / 3) and shared.reported == pytest.approx(30 * 111.0 / 3)
    episode = next(f for f in audit.findings if (f.kind, f.key) == ("episode", "return"))
    assert episode.reported == pytest.approx(30 * 111.0)
    # The dashboard shows the per-agent mean for a shared policy (mean_of_agent_episodes).
    assert runner_results(results[-1])["policy_reward_mean"]["shared"] == pytest.approx(30 * 111.0 / 3)
    assert_dashboard_rebuilt(run, results)
    assert_old_stack_bookkeeping(run)


def test_remote_env_runner_with_remote_evaluation_and_seed(ray_instance, tmp_path):
    out, led = str(tmp_path / "out"), str(tmp_path / "ledger")
    os.makedirs(led)
    env_config = {"agents": [0, 1], "scales": [1.0, 10.0], "episode_len": 30, "random_rewards": True, "ledger_dir": led}
    # With a seed every worker re-seeds Python's `random`, so old-stack episode ids repeat
    # across runs; ours are runner-scoped.
    config = old_stack_config(ScaledRewardsEnv, env_config, ["p_0", "p_1"], map_by_id, out, runners=1, evaluation=True).debugging(seed=7)
    results = train(config, 2)
    run = load_run(out)
    audit = compare(run)
    only_clean_or_warnings(audit)
    assert set(run.raw["worker_index"]) == {1}  # the driver's local workers never step their envs
    assert {"train", "evaluation"} <= set(run.raw["phase"])
    assert run.manifest["num_env_runners"] == 1 and run.manifest["evaluation_num_env_runners"] == 1
    assert_raw_matches_ledger(run, ledger(led))
    assert_old_stack_bookkeeping(run)
    assert_dashboard_rebuilt(run, results, remote_evaluation=True)


def test_remote_worker_envs_cannot_be_tapped_and_say_unverified(ray_instance, tmp_path, caplog):
    from ray import tune

    # RLlib 2.60 refuses an env *class* with remote_worker_envs (it checks the `gym` package,
    # which is not installed); a registered creator works.
    tune.register_env("reward_audit_scaled_remote", lambda config: ScaledRewardsEnv(config))
    out = str(tmp_path / "out")
    config = old_stack_config("reward_audit_scaled_remote", {"agents": [0, 1], "episode_len": 30}, ["p_0", "p_1"], map_by_id, out, envs=2, remote_envs=True)
    with caplog.at_level(logging.WARNING, logger="reward_audit"):
        results = train(config, 1)
    assert results[-1]["training_iteration"] == 1
    assert any("remote_worker_envs=True" in r.getMessage() and "UNVERIFIED" in r.getMessage() for r in caplog.records)
    audit = compare(out)
    assert not audit.failures()
    assert [(f.verdict, f.key) for f in audit.findings] == [(Verdict.UNVERIFIED, "raw")]


# ----------------------------------------------------------------------------- no training


class FakeEpisode:
    """What the adapter reads from an ``EpisodeV2``."""

    def __init__(self, episode_id, mapping):
        self.episode_id = episode_id
        self._agent_to_policy = dict(mapping)
        self.agent_rewards = defaultdict(float)
        self.total_reward = 0.0
        self.worker = None


class SteppedEnv:
    def reset(self, **kwargs):
        return {0: 0, 1: 0}, {}

    def step(self, actions):
        return {0: 0, 1: 0}, {0: 1.0, 1: 10.0}, {"__all__": False}, {"__all__": False}, {}


def replay(events):
    """Drive a tapped env, the recorder and the adapter in the order ``EnvRunnerV2`` calls
    them (the callback's ``_episode_hook`` / ``on_sample_end``), one env index."""
    adapter = OldStackAdapter("2.60.0")
    recorder = RunnerRecorder(Phase.TRAIN, 0, adapter.mapping_of)
    env = SteppedEnv()
    install_tap(env, recorder, 0)
    episodes = {}
    for event, *arg in events:
        if event in ("created", "start", "step_hook", "end"):
            episode = episodes.setdefault(arg[0], FakeEpisode(arg[0], {0: "p0", 1: "p1"}))
            episode_id = adapter.episode_id(episode, recorder)
            if event == "step_hook":
                recorder.episode_step(episode_id, 0, episode)
            elif event == "end":
                recorder.episode_ends(episode_id, 0, episode)
                adapter.reported_at_episode_end(recorder, episode)
            else:
                recorder.episode_begins(episode_id, 0, episode)
        elif event == "reset":
            env.reset()
        elif event == "step":
            env.step({})
        else:
            adapter.sample_ends(recorder)
    df = pd.DataFrame(recorder.drain()["raw_rewards"])
    df["episode"] = df["episode_id"].str.rsplit(":", n=1).str[1]
    return df


# EnvRunnerV2.step(): poll (reset on first use), hooks for the polled obs, then send_actions
# (env.step). The batch is cut inside a step() and yielded after its send_actions, so at
# on_sample_end the env is one step ahead of the hooks. e1 has 3 steps; its final step runs
# just before the first on_sample_end; the next poll sees done: step hook, end, created e2,
# reset, start e2.
OLD_STACK = [
    ("reset",), ("created", "e1"), ("start", "e1"), ("step",),
    ("step_hook", "e1"), ("step",),
    ("step_hook", "e1"), ("step",), ("sample_end",),
    ("step_hook", "e1"), ("end", "e1"), ("created", "e2"), ("reset",), ("start", "e2"), ("step",),
    ("step_hook", "e2"), ("step",), ("sample_end",),
]


def test_old_stack_hook_order_files_each_step_with_the_sample_that_processes_it():
    df = replay(OLD_STACK)
    e1 = df[df["episode"] == "e1"].set_index(["chunk_seq", "agent_id"])
    # Steps 1, 2 in chunk 0; step 3 (taken before the first on_sample_end, processed after
    # it) in chunk 1, together with the end of the episode.
    assert e1.loc[(0, "0"), "n_rewards"] == 2 and e1.loc[(1, "0"), "n_rewards"] == 1
    assert e1.loc[(1, "1"), "reward"] == 10.0 and bool(e1.loc[(1, "1"), "episode_done"])
    assert not e1.loc[(0, "0"), "episode_done"]
    e2 = df[df["episode"] == "e2"]
    assert e2["n_rewards"].tolist() == [1, 1]  # step 2 of e2 is still pending: next sample()
    assert not e2["episode_done"].any()
    assert set(df["module_id"]) == {"p0", "p1"}


def test_reported_values_are_agent_rewards_and_total():
    adapter = OldStackAdapter("2.60.0")
    recorder = RunnerRecorder(Phase.TRAIN, 0, adapter.mapping_of)
    episode = FakeEpisode(123, {0: "p_0", 1: "p_1", 2: "p_1"})
    episode.agent_rewards.update({(0, "p_0"): 3.0, (1, "p_1"): 30.0})  # agent 2: never a counted reward
    episode.total_reward = 33.0
    assert adapter.mapping_of(episode) == {0: "p_0", 1: "p_1", 2: "p_1"}
    adapter.reported_at_episode_end(recorder, episode)
    rows = {(r["kind"], r["agent_id"], r["module_id"]): r["value"] for r in recorder.drain()["reported_episodes"]}
    assert rows == {("episode", None, None): 33.0, ("policy", "0", "p_0"): 3.0, ("policy", "1", "p_1"): 30.0}
    assert dict(episode.agent_rewards) == {(0, "p_0"): 3.0, (1, "p_1"): 30.0}  # the defaultdict was not grown


def test_clip_setting_is_read_like_rllib_and_values_are_still_recorded():
    from reward_audit.capture.oldstack import _clip_setting

    adapter = OldStackAdapter("2.60.0")
    recorder = RunnerRecorder(Phase.TRAIN, 0, adapter.mapping_of)
    for clip, atari, setting in ((True, None, True), (5.0, None, 5.0), (None, None, None), (1, None, None), (None, True, True), (False, True, None)):
        config = SimpleNamespace(clip_rewards=clip, _is_atari=atari)
        assert _clip_setting(config) == setting, (clip, atari)  # an int clips nothing; Atari clips by sign
        episode = FakeEpisode(1, {0: "p"})
        episode.agent_rewards[(0, "p")] = 7.0
        episode.worker = SimpleNamespace(config=config)
        adapter.reported_at_episode_end(recorder, episode)
        assert recorder.drain()["reported_episodes"], clip  # recorded: the audit shows what clipping did


@pytest.mark.parametrize(("clip", "per_step"), [(True, {0: 1.0, 1: 1.0}), (2.5, {0: 1.0, 1: 2.5})])
def test_clip_rewards_on_the_old_stack_is_a_failing_explained_finding(ray_instance, tmp_path, clip, per_step):
    # The env pays 1 and 10 per step; RLlib's ClipRewardAgentConnector rewrites them before
    # EpisodeV2 counts them, so every reported return is a sum of clipped rewards.
    out = str(tmp_path / "out")
    env_config = {"agents": [0, 1], "scales": [1.0, 10.0], "episode_len": 10}
    config = old_stack_config(ScaledRewardsEnv, env_config, ["p_0", "p_1"], map_by_id, out).environment(clip_rewards=clip)
    train(config, 1)
    audit = compare(out)
    for key, paid in (("p_0", 1.0), ("p_1", 10.0)):
        f = next(f for f in audit.findings if (f.phase, f.kind, f.key) == ("train", "policy", key))
        clipped = per_step[int(key[-1])]
        assert f.truth == pytest.approx(10 * paid) and f.reported == pytest.approx(10 * clipped)
        if clipped == paid:  # agent 0's reward of 1 is unchanged by clip_rewards=2.5... and sign(1) = 1
            assert f.verdict == Verdict.CLEAN
            continue
        assert f.verdict == Verdict.MISMATCH and f.counts[Verdict.MISMATCH.value] == f.episodes
        assert f"in {f.counts['MISMATCH']}/{f.counts['MISMATCH']} wrong values: reported = Σ clip" in f.message
        assert all("RLlib clipped the env's rewards" in e.explanation for e in f.evidence)
    assert not audit.ok


def test_clip_rewards_on_the_new_stack_reports_what_the_env_paid(ray_instance, tmp_path):
    # On the new stack clipping happens in the learner connector, after the metrics: CLEAN.
    from helpers import new_stack_ppo_config

    out = str(tmp_path / "out")
    env_config = {"agents": [0, 1], "scales": [1.0, 10.0], "episode_len": 10}
    if not SPELLING_24X:
        pytest.skip("the 2.4x+ new stack only")
    train(new_stack_ppo_config(ScaledRewardsEnv, env_config, ["p_0", "p_1"], map_by_id, out).environment(clip_rewards=True), 1)
    audit = compare(out)
    assert audit.ok, [str(f) for f in audit.findings]
    p1 = next(f for f in audit.findings if (f.phase, f.kind, f.key) == ("train", "module", "p_1"))
    assert p1.truth == pytest.approx(100.0) and p1.reported == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("config", "version", "expected"),
    [
        (SimpleNamespace(enable_env_runner_and_connector_v2=False, enable_connectors=-1), "2.60.0", "env_runners/policy_reward_mean/"),
        (SimpleNamespace(enable_env_runner_and_connector_v2=False), "2.53.1", "env_runners/policy_reward_mean/"),
        (SimpleNamespace(_enable_new_api_stack=False, enable_connectors=True), "2.12.0", "policy_reward_mean/"),
    ],
)
def test_detect_picks_the_old_stack_adapter(config, version, expected):
    adapter = detect(config, version)
    assert isinstance(adapter, OldStackAdapter) and adapter.api_stack == "old"
    assert expected in {p for p, _, _ in adapter.iteration_paths}


def test_detect_refuses_the_legacy_sampler():
    with pytest.raises(UnsupportedRayError, match="enable_connectors=False"):
        detect(SimpleNamespace(_enable_new_api_stack=False, enable_connectors=False), "2.12.0")


def test_ray_212_result_keys():
    """Ray 2.12 puts the old-stack numbers at the top level and again under sampler_results/."""
    adapter = OldStackAdapter("2.12.0")
    block = {"episode_reward_mean": 330.0, "episode_reward_min": 320.0, "policy_reward_mean": {"p0": 30.0, "p1": 300.0}, "hist_stats": {"episode_reward": [330.0]}}
    result = {**block, "sampler_results": dict(block), "evaluation": {**block, "sampler_results": dict(block)}, "info": {"learner": {"p0": {"policy_reward_mean": 1.0}}}}
    rows = pd.DataFrame(adapter.iteration_rows(result, 4))
    assert len(rows) == 2 * 2 * 4  # phases x (top, sampler_results) x (mean, min, p0, p1)
    p1 = rows[rows["path"] == "evaluation/sampler_results/policy_reward_mean/p1"].iloc[0]
    assert (p1["phase"], p1["kind"], p1["key"], p1["value"], p1["semantics"]) == ("evaluation", "policy", "p1", 300.0, "mean_of_agent_episodes")
    assert np.isnan(rows[rows["kind"] == "episode"]["key"].astype(float)).all()
