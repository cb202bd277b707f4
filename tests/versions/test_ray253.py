"""Ray 2.53 (new API stack): reward_audit must catch the shared-module bug, and nothing else.

In 2.53 ``MultiAgentEnvRunner.get_metrics()`` builds ``module_episode_returns`` with a dict
comprehension keyed by module id over the final chunk's single-agent episodes
(``ray/rllib/env/multi_agent_env_runner.py:640-646``), so when several agents share a
module only the *last* agent's final-chunk return survives; earlier chunks of all agents
are then added correctly (``:656-660``). Per-agent values and the episode return are right.
RLLIB_NOTES §5: reported(m) = final chunk of one of m's agents + earlier chunks of all.

Phase ``learning`` (docs/learning.md): the bug is in the metrics only; the chunks ``sample()``
hands to training carry every agent's rewards, so ``learning`` is CLEAN beside the DROP.

Run with ``make test-versions`` (its own virtualenv with ``ray[rllib]==2.53.0``) or
``pytest -m ray253 tests/versions/`` in a 2.53 environment.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="needs ray[rllib]==2.53.*; `make test-versions` builds that environment")

from helpers import (  # noqa: E402
    assert_lost_across_cut_in_metrics_and_batches,
    assert_raw_matches_ledger,
    assert_shared_policy_clean_on_the_old_stack,
    cli_compare,
    cli_findings,
    old_stack_ppo_config,
    record_scaled_rewards,
    record_turn_based,
)
from reward_audit import compare, load_run  # noqa: E402
from reward_audit.report import bottom_line  # noqa: E402
from reward_audit.envs import map_all_shared, map_by_id  # noqa: E402

pytestmark = [
    pytest.mark.ray253,
    pytest.mark.rllib,
    pytest.mark.skipif(not ray.__version__.startswith("2.53."), reason=f"Ray 2.53 scenarios; Ray {ray.__version__} is installed"),
]

AGENTS = [0, 1, 2]
# RLlib keeps agents in insertion order (the reset observation's order), so the one
# agent whose final chunk survives in the module value is the last one.
SURVIVOR, DROPPED = "2", ("0", "1")


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    return record_scaled_rewards(tmp_path_factory.mktemp("shared"), ["shared"], map_all_shared, agents=AGENTS)


@pytest.fixture(scope="module")
def separate_run(tmp_path_factory):
    return record_scaled_rewards(tmp_path_factory.mktemp("separate"), ["p_0", "p_1", "p_2"], map_by_id, agents=AGENTS)


# --------------------------------------------------------------------------- a. one shared module


def test_shared_module_is_drop_in_train_and_evaluation(shared_run):
    out, _ = shared_run
    code, findings = cli_findings(out)
    assert code == 1
    for phase in ("train", "evaluation"):
        shared = findings[(phase, "module", "shared")]
        assert shared["verdict"] == "DROP", shared
        # Every episode is wrong: random rewards > 0, so the dropped final chunks are never 0.
        assert shared["counts"] == {"DROP": shared["episodes"]} and shared["episodes"] >= 2
        assert shared["reported"] < shared["truth"]
        assert shared["evidence"]
        for e in shared["evidence"]:
            text = e["explanation"]
            for agent in DROPPED:
                assert f"agent {agent}'s final-chunk rewards" in text, text
            assert f"agent {SURVIVOR}" not in text and "earlier" not in text and "equally explained" not in text, text
    # Training episodes span several fragments; evaluation samples whole episodes (1 chunk),
    # so the evaluation value is exactly the survivor's return.
    assert any(e["chunks"] > 1 for e in findings[("train", "module", "shared")]["evidence"])
    assert all(e["chunks"] == 1 for e in findings[("evaluation", "module", "shared")]["evidence"])


def test_shared_module_per_agent_and_episode_values_are_clean(shared_run):
    out, _ = shared_run
    _, findings = cli_findings(out)
    for phase in ("train", "evaluation"):
        for agent in ["0", "1", "2"]:
            assert findings[(phase, "agent", agent)]["verdict"] == "CLEAN", findings[(phase, "agent", agent)]
        assert findings[(phase, "episode", "return")]["verdict"] == "CLEAN"
    failing = {k for k, f in findings.items() if f["verdict"] in ("LEAK", "DROP", "MISMATCH")}
    assert failing == {("train", "module", "shared"), ("evaluation", "module", "shared")}


def test_shared_module_values_follow_the_253_formula(shared_run):
    """Independently of compare(): from the Parquet tables, every reported module value is
    earlier chunks of all agents + the final chunk of agent 2 only, and every evaluation
    episode really had 3 agents on the one module."""
    out, _ = shared_run
    run = load_run(out)
    raw = run.raw.assign(counted=run.raw["reward"] - run.raw["pre_obs_reward"])
    last = raw.groupby(["runner_id", "episode_id"])["chunk_seq"].transform("max")
    raw = raw.assign(is_final=raw["chunk_seq"] == last)
    module = run.reported[run.reported["kind"] == "module"]
    assert set(module["module_id"]) == {"shared"}
    checked = {"train": 0, "evaluation": 0}
    for r in module.itertuples():
        ep = raw[(raw["runner_id"] == r.runner_id) & (raw["episode_id"] == r.episode_id)]
        assert set(ep["module_id"]) == {"shared"} and set(ep["agent_id"]) == {"0", "1", "2"}
        truth = ep["counted"].sum()
        rllib_253 = ep.loc[~ep["is_final"], "counted"].sum() + ep.loc[ep["is_final"] & (ep["agent_id"] == SURVIVOR), "counted"].sum()
        dropped = ep.loc[ep["is_final"] & ep["agent_id"].isin(DROPPED), "counted"].sum()
        assert r.value == pytest.approx(rllib_253, abs=1e-6)
        assert truth - r.value == pytest.approx(dropped, abs=1e-6) and dropped > 0
        checked[r.phase] += 1
    assert checked["train"] >= 4 and checked["evaluation"] == 4  # 2 evaluations x 2 episodes


def test_shared_module_verbose_output_names_the_dropped_agents(shared_run):
    out, _ = shared_run
    code, text = cli_compare(out, "--verbose")
    assert code == 1
    assert "DROP       train module shared: DROP in" in text
    assert "DROP       evaluation module shared: DROP in" in text
    assert "agent 0's final-chunk rewards" in text and "agent 1's final-chunk rewards" in text


def test_shared_module_training_batches_are_clean(shared_run):
    """Phase ``learning``: the bug is in ``get_metrics()`` only; the chunks ``sample()`` hands
    to training carry every agent's rewards, so the shared module's data sums all three."""
    out, _ = shared_run
    audit = compare(out)
    learning = {(f.kind, f.key): f for f in audit.findings if f.phase == "learning"}
    assert set(learning) == {("module", "shared"), ("agent", "0"), ("agent", "1"), ("agent", "2")}, sorted(learning)
    for f in learning.values():
        assert f.verdict.value == "CLEAN" and f.episodes >= 4, str(f)
    assert bottom_line(audit) == (
        "metrics: DROP · training batches: CLEAN — the policies were trained on the right rewards; only the reported numbers are wrong"
    )


def test_shared_module_one_episode_batch_by_hand(shared_run):
    """One multi-chunk training episode from the Parquet rows alone: per chunk and agent the
    batch holds what the env paid; summed over the episode the module's batches hold all
    three agents' rewards, which RLlib 2.53's reported module value does not."""
    out, _ = shared_run
    run = load_run(out)
    raw, batch = run.raw[run.raw["phase"] == "train"], run.read("batch_rewards").to_pandas()
    module = run.reported[(run.reported["kind"] == "module") & (run.reported["phase"] == "train")]
    multi = raw.groupby("episode_id")["chunk_seq"].nunique()
    episode = sorted(set(module["episode_id"]) & set(multi[multi > 1].index))[0]
    ep_raw = raw[raw["episode_id"] == episode].set_index(["chunk_seq", "agent_id"]).sort_index()
    ep_batch = batch[batch["episode_id"] == episode].set_index(["chunk_seq", "agent_id"]).sort_index()
    assert list(ep_batch.index) == list(ep_raw.index) and set(ep_batch["module_id"]) == {"shared"}
    for key, r in ep_raw.iterrows():
        assert ep_batch.loc[key, "reward"] == pytest.approx(r["reward"] - r["pre_obs_reward"], abs=1e-9), key
    truth = (ep_raw["reward"] - ep_raw["pre_obs_reward"]).sum()
    [reported] = module.loc[module["episode_id"] == episode, "value"]
    assert ep_batch["reward"].sum() == pytest.approx(truth, abs=1e-9) and truth - reported > 1


def test_shared_module_tap_matches_the_env_ledger(shared_run):
    out, lines = shared_run
    run = load_run(out)
    assert run.manifest["ray_version"].startswith("2.53.") and run.manifest["api_stack"] == "new"
    assert_raw_matches_ledger(run, lines)


# --------------------------------------------------------------------------- b. one module per agent


def test_separate_modules_are_clean(separate_run):
    out, lines = separate_run
    code, findings = cli_findings(out)
    assert code == 0, findings
    for phase in ("train", "evaluation"):
        for agent in ["0", "1", "2"]:
            assert findings[(phase, "module", f"p_{agent}")]["verdict"] == "CLEAN"
            assert findings[(phase, "agent", agent)]["verdict"] == "CLEAN"
    assert {f["verdict"] for f in findings.values()} <= {"CLEAN", "INCOMPLETE"}
    for agent in "012":
        assert findings[("learning", "module", f"p_{agent}")]["verdict"] == "CLEAN" and findings[("learning", "module", f"p_{agent}")]["episodes"] > 0
    assert bottom_line(compare(out)).startswith("metrics: CLEAN · training batches: CLEAN — ")
    assert_raw_matches_ledger(load_run(out), lines)


# --------------------------------------------------------------------------- c. the old stack


def test_shared_policy_is_clean_on_the_old_stack(tmp_path):
    """The old stack (``RolloutWorker`` + ``EnvRunnerV2``) has no shared-module bug, and its
    ``MultiAgentBatch`` (float32 rewards, agents named from ``EpisodeV2._agent_to_index``)
    carries every agent's rewards: both phases CLEAN. A 5-second run: the only 2.53
    old-stack scenario, so the old adapter's 2.53 path (metrics and batches) is covered."""
    out, lines = record_scaled_rewards(tmp_path, ["shared"], map_all_shared, agents=AGENTS, build=old_stack_ppo_config)
    assert_shared_policy_clean_on_the_old_stack(out, "2.53.", lines)


# --------------------------------------------------------------------------- turn-based, cut by sample()


def test_waiting_player_reward_lost_across_cut_is_missing_from_training_too(tmp_path):
    """As on Ray 2.60 (``test_ray260.py``): a turn-based episode whose last step observes
    nobody, cut one or two moves before its end, loses the waiting player's final rewards
    in ``MultiAgentEpisode`` (2.53 ``multi_agent_episode.py:903-1010`` ``cut()``, ``:574-583``
    ``add_env_step``) — from the metrics and from the training batch alike."""
    out, lines = record_turn_based(tmp_path, "none")
    assert_lost_across_cut_in_metrics_and_batches(out)
    assert_raw_matches_ledger(load_run(out), lines)
