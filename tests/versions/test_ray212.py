"""Ray 2.12, experimental new API stack: reward_audit catches the chunk leak, and nothing else.

In 2.12 ``MultiAgentEnvRunner.get_metrics()`` adds the *whole multi-agent* return of every
earlier chunk of an episode to each (agent, module) value
(``ray/rllib/env/multi_agent_env_runner.py:588-595``), so for an episode sampled over several
``sample()`` calls

    reported(a -> m) = a's final-chunk return + every agent's earlier-chunk returns

(RLLIB_NOTES §5; ``reward_audit/capture/experimental.py``). The episode return is right, and so
is every single-chunk episode.

Scenarios (tiny PPO, one local env runner, rollout_fragment_length 16, train batch 256,
``ScaledRewardsEnv`` agents 0 and 1 paid 1 and 10 per step x U(0.5, 1.5), four policies
p1..p4 seated per episode by ``map_four_policies_by_episode``, only p1 and p2 trained):

a. *seed*: 30-step episodes, so every training episode spans 2-3 fragments (none fits in one);
   evaluation samples 2 whole episodes per iteration on the local evaluation runner
   (``evaluation_duration_unit="episodes"``): training LEAKs, evaluation is CLEAN.
b. *auto evaluation*: ``evaluation_duration="auto"`` + ``evaluation_parallel_to_training`` on
   one remote evaluation runner, which samples >= 100 timesteps per round, so evaluation
   episodes are cut into chunks and LEAK too. 12-step episodes: in training half the episodes
   fit in one 16-step fragment, which shows single-chunk episodes are CLEAN.
c. *old stack*: Ray 2.12's default ``RolloutWorker`` stack, one shared policy: CLEAN throughout.

Phase ``learning`` (docs/learning.md), from the same runs: the chunks ``sample()`` hands to
training carry each agent's own rewards, so ``learning`` is CLEAN beside the leaking metrics.

Selected only by ``-m ray212`` (``tests/versions/conftest.py``), in a Ray 2.12 environment::

    /tmp/venv212/bin/python -m pytest -q -m ray212 tests/versions/test_ray212.py
"""

from __future__ import annotations

import glob
import json
import os
import zlib
from collections import Counter
from types import SimpleNamespace

import pytest

from helpers import assert_raw_matches_ledger, assert_shared_policy_clean_on_the_old_stack, cli_compare, cli_findings, experimental_stack_ppo_config, per_agent_episode_sums, record_turn_based, train
from reward_audit import compare, load_run
from reward_audit.report import bottom_line

pytestmark = pytest.mark.ray212

POLICIES = ["p1", "p2", "p3", "p4"]
FAILING = {"LEAK", "DROP", "MISMATCH"}
OTHER = {"0": "1", "1": "0"}


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    import ray

    if not ray.__version__.startswith("2.12."):
        pytest.fail(f"the ray212 scenarios need Ray 2.12 (installed: {ray.__version__}); run them with /tmp/venv212/bin/python or `make test-versions`")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def record(tmp_path_factory, name: str, *, episode_len: int, evaluation: dict, iterations: int = 3) -> SimpleNamespace:
    from reward_audit.envs import ScaledRewardsEnv, map_four_policies_by_episode

    base = tmp_path_factory.mktemp(name)
    out, led = str(base / "trial"), str(base / "ledger")
    os.makedirs(led)
    env_config = {"agents": [0, 1], "scales": [1.0, 10.0], "episode_len": episode_len, "random_rewards": True, "ledger_dir": led}
    config = experimental_stack_ppo_config(
        ScaledRewardsEnv, env_config, POLICIES, map_four_policies_by_episode, out, policies_to_train=["p1", "p2"], evaluation=evaluation
    )
    results = train(config, iterations)
    return SimpleNamespace(out=out, ledger_dir=led, results=results, run=load_run(out))


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    evaluation = {"evaluation_interval": 1, "evaluation_duration": 2, "evaluation_duration_unit": "episodes", "evaluation_num_workers": 0}
    return record(tmp_path_factory, "seed", episode_len=30, evaluation=evaluation)


@pytest.fixture(scope="module")
def auto_eval(tmp_path_factory):
    evaluation = {"evaluation_interval": 1, "evaluation_duration": "auto", "evaluation_parallel_to_training": True, "evaluation_num_workers": 1}
    return record(tmp_path_factory, "auto_eval", episode_len=12, evaluation=evaluation)


def chunk_features(run):
    """Per (runner, episode, agent): counted rewards in the final chunk and in earlier chunks,
    the number of chunks and the module — straight from the raw Parquet rows."""
    raw = run.raw.assign(counted=run.raw["reward"] - run.raw["pre_obs_reward"])
    last = raw.groupby(["runner_id", "episode_id"])["chunk_seq"].transform("max")
    raw = raw.assign(final=raw["counted"].where(raw["chunk_seq"] == last, 0.0))
    per_agent = raw.groupby(["phase", "runner_id", "episode_id", "agent_id"]).agg(
        counted=("counted", "sum"), final=("final", "sum"), module_id=("module_id", "last"), done=("episode_done", "any")
    )
    per_agent["earlier"] = per_agent["counted"] - per_agent["final"]
    chunks = raw.groupby(["runner_id", "episode_id"])["chunk_seq"].nunique().rename("chunks")
    return per_agent.reset_index().join(chunks, on=["runner_id", "episode_id"])


def ledger_by_pid(folder: str) -> dict[int, list[dict]]:
    lines: dict[int, list[dict]] = {}
    for file in glob.glob(os.path.join(folder, "ledger-*.jsonl")):
        pid = int(os.path.basename(file).split("-")[1])
        with open(file) as f:
            lines.setdefault(pid, []).extend(json.loads(line) for line in f)
    return lines


# --------------------------------------------------------------------------- a. the seed


def test_seed_compare_fails_with_training_leak_and_clean_evaluation(seed):
    code, findings = cli_findings(seed.out)
    assert code == 1
    seated = set(seed.run.raw.loc[seed.run.raw["phase"] == "train", "module_id"])
    assert {"p1", "p2"} <= seated and seated & {"p3", "p4"}, seated  # p3 / p4 took a seat
    failing = {k for k, f in findings.items() if f["verdict"] in FAILING}
    assert failing == {("train", "policy", p) for p in seated}, failing
    episode_ids = set(seed.run.raw["episode_id"]) & set(seed.run.reported["episode_id"])
    for policy in seated:
        f = findings[("train", "policy", policy)]
        assert f["verdict"] == "LEAK" and f["counts"] == {"LEAK": f["episodes"]}, f
        assert f["reported"] > f["truth"]
        assert f["evidence"]
        for e in f["evidence"]:
            assert e["episode_id"] in episode_ids and len(e["episode_id"]) == 32 and e["chunks"] >= 2
            other = OTHER[e["agent_id"]]
            # The excess is exactly the other agent's rewards from the episode's earlier chunks.
            assert e["explanation"].startswith(f"reported = truth + agent {other}'s earlier-chunk rewards ("), e["explanation"]
            assert "equally explained" not in e["explanation"] and "final-chunk" not in e["explanation"], e["explanation"]
    assert findings[("train", "episode", "return")]["verdict"] == "CLEAN"
    # Evaluation, side by side in the same report: whole episodes, all clean.
    evaluated = set(seed.run.raw.loc[seed.run.raw["phase"] == "evaluation", "module_id"])
    assert {"p1", "p2"} <= evaluated
    for policy in evaluated:
        assert findings[("evaluation", "policy", policy)]["verdict"] == "CLEAN", findings[("evaluation", "policy", policy)]
    assert findings[("evaluation", "episode", "return")]["verdict"] == "CLEAN"
    assert findings[("evaluation", "episode", "return")]["episodes"] == 6  # 3 iterations x 2 episodes
    _, text = cli_compare(seed.out)
    lines = text.splitlines()
    assert any(line.split()[:3] == ["train", "policy", "p1"] and line.endswith("LEAK") for line in lines), text
    assert any(line.split()[:3] == ["evaluation", "policy", "p1"] and line.endswith("CLEAN") for line in lines), text


def test_seed_every_training_episode_is_multi_chunk_and_follows_the_212_formula(seed):
    """Independently of compare(): each reported policy value, from the Parquet rows alone."""
    feats = chunk_features(seed.run).set_index(["runner_id", "episode_id", "agent_id"])
    policy = seed.run.reported[seed.run.reported["kind"] == "policy"]
    checked = Counter()
    for r in policy.itertuples():
        ep = feats.loc[(r.runner_id, r.episode_id)]
        own = ep.loc[r.agent_id]
        assert own["module_id"] == r.module_id
        if r.phase == "train":
            # 30-step episodes, 16-step fragments: no training episode fits in one chunk.
            assert own["chunks"] >= 2
            assert r.value == pytest.approx(own["final"] + ep["earlier"].sum(), abs=1e-6)
            assert r.value - own["counted"] == pytest.approx(ep.loc[OTHER[r.agent_id], "earlier"], abs=1e-6)
            assert ep.loc[OTHER[r.agent_id], "earlier"] > 0
        else:
            assert own["chunks"] == 1
            assert r.value == pytest.approx(own["counted"], abs=1e-6)
        checked[r.phase] += 1
    assert checked["train"] >= 2 * 20 and checked["evaluation"] == 2 * 6
    # The recorded seats are the mapping function's, re-derived from the episode ids by hand.
    for (runner, episode, agent), row in feats.iterrows():
        bucket = zlib.crc32(episode.encode()) % 10
        expected = ("p3" if bucket < 3 else "p1") if agent == "0" else ("p4" if 3 <= bucket < 6 else "p2")
        assert row["module_id"] == expected, (episode, agent)


def test_seed_dashboard_numbers_carry_the_leak(seed):
    """``policy_reward_mean/<p>`` (and its ``sampler_results/`` copy) in each train() result is
    the mean of RLlib's per-episode values so far (fewer than S=100 episodes), not the truth;
    ``episode_reward_mean`` is the truth."""
    audit = compare(seed.out)
    train_eps = audit.episodes[(audit.episodes["phase"] == "train") & ~audit.episodes["missing_report"]]
    for result in seed.results:
        upto = train_eps[train_eps["iteration"] <= result["training_iteration"]]
        policy = upto[upto["kind"] == "policy"]
        assert set(result["policy_reward_mean"]) == set(policy["module_id"])
        for p, shown in result["policy_reward_mean"].items():
            mine = policy[policy["module_id"] == p]
            assert shown == pytest.approx(mine["reported"].mean(), rel=1e-9)
            assert result["sampler_results"]["policy_reward_mean"][p] == shown
            assert shown > mine["truth"].mean()
        assert result["episode_reward_mean"] == pytest.approx(upto.loc[upto["kind"] == "episode", "truth"].mean(), rel=1e-9)
    paths = set(seed.run.iterations["path"])
    assert {"policy_reward_mean/p1", "sampler_results/policy_reward_max/p2", "evaluation/policy_reward_mean/p1", "evaluation/sampler_results/episode_reward_mean"} <= paths


def test_seed_tap_matches_the_env_ledger(seed):
    run = seed.run
    assert run.manifest["ray_version"] == "2.12.0" and run.manifest["adapter"] == "experimental-new-stack-2.1x"
    assert run.manifest["rollout_fragment_length"] == 16 and run.manifest["num_rollout_workers"] == 0
    assert set(run.raw["env_index"]) == {0} and set(run.raw["agent_id_type"]) == {"int"}
    assert run.manifest.get("capture_failures") in (None, 0)
    lines = [line for lines in ledger_by_pid(seed.ledger_dir).values() for line in lines]
    assert len(lines) >= 20 + 6
    assert_raw_matches_ledger(run, lines)


def test_seed_training_batches_are_clean_while_the_metrics_leak(seed):
    """Phase ``learning``: what the local train runner's ``sample()`` handed to training
    (``on_sample_end(samples=...)``) carries each agent's own rewards, on every policy's
    module, the frozen p3 / p4 included (their chunks leave the runner like the others)."""
    audit = compare(seed.out)
    learning = {(f.kind, f.key): f for f in audit.findings if f.phase == "learning"}
    seated = set(seed.run.raw.loc[seed.run.raw["phase"] == "train", "module_id"])
    assert {"p3", "p4"} & seated
    assert set(learning) == {("module", p) for p in seated} | {("agent", "0"), ("agent", "1")}, sorted(learning)
    for key, f in learning.items():
        assert f.verdict.value == "CLEAN" and f.episodes > 0, str(f)
    # 3 iterations of 256 steps, 30-step episodes: ~25 done training episodes, each agent in all.
    assert learning[("agent", "0")].episodes >= 20 and learning[("agent", "1")].episodes == learning[("agent", "0")].episodes
    assert {f.verdict.value for f in audit.findings if f.phase == "train" and f.kind == "policy"} == {"LEAK"}
    assert bottom_line(audit) == (
        "metrics: LEAK · training batches: CLEAN — the policies were trained on the right rewards; only the reported numbers are wrong"
    )
    assert audit.manifest.get("capture_failures") in (None, 0)
    batch = seed.run.read("batch_rewards").to_pandas()
    assert set(batch["phase"]) == {"train"} and {"p3", "p4"} & set(batch["module_id"])


def test_seed_one_episode_batch_by_hand(seed):
    """One multi-chunk training episode, from the Parquet rows alone: per agent and chunk
    the batch carries exactly what the env paid (same ``chunk_seq``: the same ``sample()``
    call), while RLlib's reported policy value carries the other agent's earlier chunks."""
    raw = seed.run.raw[seed.run.raw["phase"] == "train"]
    batch = seed.run.read("batch_rewards").to_pandas()
    done = raw.groupby("episode_id").filter(lambda g: g["episode_done"].any() and g["chunk_seq"].nunique() >= 2)
    episode = sorted(set(done["episode_id"]))[0]
    ep_raw = raw[raw["episode_id"] == episode].set_index(["chunk_seq", "agent_id"]).sort_index()
    ep_batch = batch[batch["episode_id"] == episode].set_index(["chunk_seq", "agent_id"]).sort_index()
    assert list(ep_batch.index) == list(ep_raw.index) and len(ep_raw) >= 4
    assert (ep_batch["module_id"] == ep_raw["module_id"]).all()
    assert list(ep_batch["n_rewards"]) == list(ep_raw["n_rewards"])  # simultaneous moves: one reward per step
    for (chunk, agent), r in ep_raw.iterrows():
        assert ep_batch.loc[(chunk, agent), "reward"] == pytest.approx(r["reward"] - r["pre_obs_reward"], abs=1e-9), (chunk, agent)
    reported = seed.run.reported[(seed.run.reported["episode_id"] == episode) & (seed.run.reported["kind"] == "policy")]
    for r in reported.itertuples():
        trained_on = ep_batch.xs(r.agent_id, level="agent_id")["reward"].sum()
        other_earlier = ep_raw.xs(OTHER[r.agent_id], level="agent_id").iloc[:-1]["reward"].sum()
        assert r.value - trained_on == pytest.approx(other_earlier, abs=1e-6) and other_earlier > 0


# --------------------------------------------------------------------------- b. auto evaluation


def test_auto_evaluation_is_chunked_and_leaks(auto_eval):
    code, findings = cli_findings(auto_eval.out)
    assert code == 1
    audit = compare(auto_eval.out)
    policy = audit.episodes[audit.episodes["kind"] == "policy"]
    ev = policy[policy["phase"] == "evaluation"]
    assert (ev["chunks"] > 1).any(), "no evaluation episode spanned two sample() rounds"
    # Every multi-chunk evaluation value leaks; every single-chunk one is right.
    assert set(ev.loc[ev["chunks"] > 1, "verdict"]) == {"LEAK"}
    assert set(ev.loc[ev["chunks"] == 1, "verdict"]) == {"CLEAN"}
    leaking = {k for k, f in findings.items() if k[0] == "evaluation" and f["verdict"] == "LEAK"}
    assert leaking and all(k[1] == "policy" for k in leaking)
    for k in leaking:
        for e in findings[k]["evidence"]:
            assert e["chunks"] >= 2 and e["explanation"].startswith(f"reported = truth + agent {OTHER[e['agent_id']]}'s earlier-chunk rewards ("), e
    assert findings[("evaluation", "episode", "return")]["verdict"] == "CLEAN"
    assert auto_eval.run.manifest["evaluation_duration"] == "auto" and auto_eval.run.manifest["evaluation_num_workers"] == 1
    assert set(auto_eval.run.raw.loc[auto_eval.run.raw["phase"] == "evaluation", "worker_index"]) == {1}  # the remote runner


def test_single_chunk_training_episodes_are_clean(auto_eval):
    """12-step episodes in 16-step fragments: about half fit in one chunk."""
    audit = compare(auto_eval.out)
    tr = audit.episodes[(audit.episodes["phase"] == "train") & (audit.episodes["kind"] == "policy")]
    single, multi = tr[tr["chunks"] == 1], tr[tr["chunks"] > 1]
    assert len(single) >= 10 and len(multi) >= 10
    assert set(single["verdict"]) == {"CLEAN"} and set(multi["verdict"]) == {"LEAK"}
    assert (single["reported"] - single["truth"]).abs().max() < 1e-6


def test_auto_evaluation_training_batches_are_clean(auto_eval):
    """Single- and multi-chunk training episodes alike: the batches are right; the remote
    evaluation runner's samples train nothing and are not recorded."""
    audit = compare(auto_eval.out)
    learning = [f for f in audit.findings if f.phase == "learning"]
    assert {f.kind for f in learning} == {"agent", "module"} and all(f.episodes > 0 for f in learning)
    assert {f.verdict.value for f in learning} == {"CLEAN"}, [str(f) for f in learning]
    assert set(auto_eval.run.read("batch_rewards").to_pandas()["phase"]) == {"train"}
    assert bottom_line(audit).startswith("metrics: LEAK · training batches: CLEAN — ")


def test_auto_evaluation_tap_matches_the_env_ledger(auto_eval):
    """Training (the driver process's env) matches the ledger exactly. The remote evaluation
    runner keeps sampling asynchronously: episodes it finishes after the last collection are
    in its ledger but were never drained, so there every recorded episode must be in the
    ledger, not the other way round."""
    run, by_pid = auto_eval.run, ledger_by_pid(auto_eval.ledger_dir)
    driver = os.getpid()
    assert_raw_matches_ledger(SimpleNamespace(raw=run.raw[run.raw["phase"] == "train"]), by_pid[driver])
    [eval_pid] = set(by_pid) - {driver}
    evaluation = run.raw[run.raw["phase"] == "evaluation"]
    assert evaluation[evaluation["episode_done"]]["episode_id"].nunique() >= 10
    assert_raw_matches_ledger(SimpleNamespace(raw=evaluation), by_pid[eval_pid], subset=True)


# --------------------------------------------------------------------------- c. the old stack


def test_old_stack_shared_policy_is_clean_in_both_phases(tmp_path):
    """Ray 2.12's default stack (``RolloutWorker`` + ``EnvRunnerV2``): three agents on one
    policy, 30-step episodes in 16-step fragments. Metrics and training batches (float32
    rewards, agents named from ``EpisodeV2._agent_to_index``) are both CLEAN. A 5-second run,
    the only 2.12 old-stack scenario, so the old adapter's 2.12 path is covered."""
    from ray.rllib.algorithms.ppo import PPOConfig

    from reward_audit import RewardAuditCallback
    from reward_audit.envs import ScaledRewardsEnv, map_all_shared

    out, led = str(tmp_path / "trial"), str(tmp_path / "ledger")
    os.makedirs(led)
    env_config = {"agents": [0, 1, 2], "episode_len": 30, "random_rewards": True, "ledger_dir": led}
    config = (
        PPOConfig()
        .framework("torch")
        .environment(ScaledRewardsEnv, env_config=env_config, disable_env_checking=True)
        .rollouts(num_rollout_workers=0, rollout_fragment_length=16)
        .training(train_batch_size=128, sgd_minibatch_size=64, num_sgd_iter=1, model={"fcnet_hiddens": [8]})
        .multi_agent(policies={"shared"}, policy_mapping_fn=map_all_shared)
        .evaluation(evaluation_interval=1, evaluation_duration=2, evaluation_duration_unit="episodes", evaluation_num_workers=0)
        .callbacks(RewardAuditCallback.writing_to(out))
    )
    train(config, 2)
    assert_shared_policy_clean_on_the_old_stack(out, "2.12.", [line for lines in ledger_by_pid(led).values() for line in lines])


# --------------------------------------------------------------------------- d. turn-based, cut by sample()


def sample_without_learning(config, iterations: int) -> list[dict]:
    """Train iterations whose ``training_step`` samples as PPO's does
    (2.12 ``ppo.py:417-443``) and learns nothing: 2.12's PPO learner crashes on turn-based
    episodes (``add_one_ts_to_episodes_and_truncate``: ``TypeError: 'NoneType' object is not
    subscriptable``), and what this checks — the chunks ``sample()`` hands to training — is
    complete before the learner sees them."""
    from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
    from ray.rllib.utils.metrics import NUM_AGENT_STEPS_SAMPLED, NUM_ENV_STEPS_SAMPLED

    algo = config.build()

    def training_step() -> dict:
        episodes = synchronous_parallel_sample(
            worker_set=algo.workers, max_env_steps=algo.config.total_train_batch_size, sample_timeout_s=algo.config.sample_timeout_s, _uses_new_env_runners=True
        )
        algo._counters[NUM_ENV_STEPS_SAMPLED] += sum(e.env_steps() for e in episodes)
        algo._counters[NUM_AGENT_STEPS_SAMPLED] += sum(e.agent_steps() for e in episodes)
        return {}

    algo.training_step = training_step
    try:
        return [algo.train() for _ in range(iterations)]
    finally:
        algo.stop()


@pytest.fixture(scope="module")
def turn_based(tmp_path_factory):
    def build(env, env_config, policies, mapping, out, fragment):
        return experimental_stack_ppo_config(env, env_config, policies, mapping, out, fragment=fragment, train_batch_size=128)

    # One iteration: in the second, 2.12's env runner itself fails on these episodes
    # (AssertionError in SingleAgentEpisode.validate, from MultiAgentEpisode.add_env_step).
    out, lines = record_turn_based(tmp_path_factory.mktemp("turn_based"), "none", build=build, iterations=1, train_fn=sample_without_learning)
    return SimpleNamespace(out=out, lines=lines, run=load_run(out))


def test_turn_based_waiting_rewards_reach_the_next_chunks_batch(turn_based):
    """A reward held for the waiting player at a cut is NOT lost on 2.12's experimental stack:
    ``cut()`` copies it into the successor's ``_hanging_rewards_begin``
    (``multi_agent_episode.py:971``), but the successor's constructor also rebuilds
    ``_hanging_actions_end`` / ``_hanging_rewards_end`` from the lookback that ``cut()``
    extends for waiting agents (``:908-919``, ``:1920-1924``, ``:1944``), and
    ``add_env_step`` releases it with the player's next observation (``:492``). So every
    batch chunk carries exactly what the env paid the agent in that chunk (rewards booked
    with the agent's next observation), the final rewards of episodes cut one or two moves
    before their end included — those Ray 2.53 / 2.60 lose when the last step observes
    nobody. Phase ``learning`` is CLEAN; the metrics show the 2.12 chunk leak."""
    audit = compare(turn_based.out)
    learning = {(f.kind, f.key): f for f in audit.findings if f.phase == "learning"}
    assert set(learning) == {("module", "p_white"), ("module", "p_black"), ("agent", "white"), ("agent", "black")}, sorted(learning)
    assert all(f.verdict.value == "CLEAN" and f.episodes >= 5 for f in learning.values()), learning
    assert {f.verdict.value for f in audit.findings if f.phase == "train" and f.kind == "policy"} == {"LEAK"}
    raw = turn_based.run.raw[turn_based.run.raw["phase"] == "train"]
    raw = raw.assign(counted=raw["reward"] - raw["pre_obs_reward"]).set_index(["episode_id", "chunk_seq", "agent_id"])
    batch = turn_based.run.read("batch_rewards").to_pandas().set_index(["episode_id", "chunk_seq", "agent_id"])
    assert sorted(batch.index) == sorted(raw.index)
    assert (batch["reward"] - raw.loc[batch.index, "counted"]).abs().max() < 1e-9
    # The cuts that lose rewards on 2.53 / 2.60 occurred: episodes whose final chunk holds one or two moves.
    done = raw[raw["episode_done"]]
    final_moves = batch.loc[done.index, "n_rewards"].groupby(level="episode_id").sum()
    assert (final_moves <= 2).sum() >= 1, final_moves
    sums = per_agent_episode_sums(turn_based.run)
    assert (sums["truth"] - sums["batch"]).abs().max() < 1e-9


def test_turn_based_tap_matches_the_env_ledger(turn_based):
    assert_raw_matches_ledger(turn_based.run, turn_based.lines, subset=True)
