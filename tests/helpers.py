"""Shared by the per-Ray-version end-to-end tests (``tests/versions/``): a tiny PPO config
on the new API stack (Ray 2.4x – 2.60 spelling), training, the env's own ledger against
the tap, and the CLI through click's ``CliRunner``.

Imports Ray lazily, so importing this module never needs Ray.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any

from click.testing import CliRunner

from reward_audit.cli import main


def _with_evaluation(config: Any, evaluation: bool, runners: int, episodes: int) -> Any:
    """Evaluation every iteration over ``episodes`` whole episodes (2.4x+ spelling)."""
    if not evaluation:
        return config
    return config.evaluation(
        evaluation_interval=1,
        evaluation_duration=episodes,
        evaluation_duration_unit="episodes",
        evaluation_num_env_runners=runners,
    )


def new_stack_ppo_config(env: Any, env_config: dict, policies: list[str], mapping: Any, out: str, *, runners: int = 0, envs: int = 1, fragment: int = 16, evaluation: bool = False, eval_episodes: int = 2, callback: Any = None) -> Any:
    """PPO on the new API stack (2.4x+ method names), recording to ``out``; tiny and CPU-only."""
    from ray.rllib.algorithms.ppo import PPOConfig

    from reward_audit import RewardAuditCallback

    config = (
        PPOConfig()
        .environment(env, env_config=env_config, disable_env_checking=True)
        .multi_agent(policies=set(policies), policy_mapping_fn=mapping)
        .env_runners(num_env_runners=runners, num_envs_per_env_runner=envs, rollout_fragment_length=fragment)
        .training(train_batch_size_per_learner=128, minibatch_size=64, num_epochs=1)
        .rl_module(model_config={"fcnet_hiddens": [8]})
        .callbacks((callback or RewardAuditCallback).writing_to(out))
    )
    return _with_evaluation(config, evaluation, runners, eval_episodes)


def old_stack_ppo_config(env: Any, env_config: dict, policies: list[str], mapping: Any, out: str, *, runners: int = 0, envs: int = 1, fragment: int = 16, evaluation: bool = False, eval_episodes: int = 2, callback: Any = None) -> Any:
    """The same run on the old API stack (RolloutWorker), Ray 2.53 / 2.60 spelling."""
    from ray.rllib.algorithms.ppo import PPOConfig

    from reward_audit import RewardAuditCallback

    config = (
        PPOConfig()
        .api_stack(enable_rl_module_and_learner=False, enable_env_runner_and_connector_v2=False)
        .environment(env, env_config=env_config, disable_env_checking=True)
        .multi_agent(policies=set(policies), policy_mapping_fn=mapping)
        .env_runners(num_env_runners=runners, num_envs_per_env_runner=envs, rollout_fragment_length=fragment)
        .training(train_batch_size=128, minibatch_size=64, num_epochs=1, model={"fcnet_hiddens": [8]})
        .callbacks((callback or RewardAuditCallback).writing_to(out))
    )
    return _with_evaluation(config, evaluation, runners, eval_episodes)


def record_scaled_rewards(base: Any, policies: list[str], mapping: Any, *, agents: tuple | list = (0, 1, 2), iterations: int = 2, build: Any = new_stack_ppo_config) -> tuple[str, list[dict]]:
    """The version scenarios: ``ScaledRewardsEnv`` with random rewards, 30-step episodes cut
    into 16-step fragments, evaluation of 2 whole episodes per iteration; trains
    ``iterations`` tiny PPO iterations and returns ``(run folder, the env's ledger lines)``."""
    from reward_audit.envs import ScaledRewardsEnv

    out, led = os.path.join(str(base), "trial"), os.path.join(str(base), "ledger")
    os.makedirs(led)
    env_config = {"agents": list(agents), "episode_len": 30, "random_rewards": True, "ledger_dir": led}
    train(build(ScaledRewardsEnv, env_config, policies, mapping, out, fragment=16, evaluation=True), iterations)
    return out, ledger(led)


def train(config: Any, iterations: int) -> list[dict]:
    """Build (``build_algo`` where it exists, else ``build``), train, always stop."""
    algo = config.build_algo() if hasattr(config, "build_algo") else config.build()
    try:
        return [algo.train() for _ in range(iterations)]
    finally:
        algo.stop()


def ledger(folder: str) -> list[dict]:
    """Every finished episode the env itself counted (``env_config["ledger_dir"]``)."""
    lines: list[dict] = []
    for file in glob.glob(os.path.join(folder, "ledger-*.jsonl")):
        with open(file) as f:
            lines += [json.loads(line) for line in f]
    return lines


def assert_raw_matches_ledger(run: Any, ledger_lines: list[dict], rel: float = 1e-9, subset: bool = False) -> None:
    """Per finished episode and agent, the tap's sums equal the env's own count (as multisets:
    the env cannot know RLlib's episode ids, but random rewards make every episode unique).
    Sums are matched to ``rel`` relative precision: the tap and the env add the same floats in
    different groupings (per chunk vs. per step), so the last bits may differ. ``subset``:
    only require every recorded episode to be in the ledger (a runner that kept sampling
    after the last collection has ledger lines that were never drained)."""
    raw = run.raw[run.raw.groupby(["runner_id", "episode_id"])["episode_done"].transform("any")]
    sums = raw.groupby(["runner_id", "episode_id", "agent_id"])[["reward", "pre_obs_reward"]].sum()
    recorded = [
        {a: (r, p) for (_, _, a), (r, p) in g.iterrows()} for _, g in sums.groupby(level=[0, 1])
    ]
    expected = [{a: (r, line["pre_obs"].get(a, 0.0)) for a, r in line["sums"].items()} for line in ledger_lines]
    if not expected:
        raise AssertionError("the env's ledger holds no finished episode; nothing to check the tap against")

    def same(x: dict, y: dict) -> bool:
        return x.keys() == y.keys() and all(
            math.isclose(x[a][i], y[a][i], rel_tol=rel, abs_tol=rel) for a in x for i in (0, 1)
        )

    unmatched = list(recorded)
    missing = []
    for episode in expected:
        match = next((i for i, r in enumerate(unmatched) if same(r, episode)), None)
        if match is None:
            missing.append(episode)
        else:
            unmatched.pop(match)
    if unmatched or (missing and not subset):
        raise AssertionError(f"tap vs env ledger: only recorded {unmatched}; only in the ledger {missing}")


def cli_compare(path: str, *args: str) -> tuple[int, str]:
    """``reward-audit compare PATH ARGS...`` through click's CliRunner: ``(exit code, output)``."""
    result = CliRunner().invoke(main, ["compare", str(path), *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def cli_findings(path: str) -> tuple[int, dict[tuple[str, str, str], dict]]:
    """``reward-audit compare --json PATH``: ``(exit code, {(phase, kind, key): finding})``."""
    code, output = cli_compare(path, "--format", "json")
    doc = json.loads(output)
    assert doc["ok"] == (code == 0), (code, doc["ok"])
    return code, {(f["phase"], f["kind"], f["key"]): f for run in doc["runs"] for f in run["findings"]}


def assert_shared_policy_clean_on_the_old_stack(out: str, ray_version: str, ledger_lines: list[dict]) -> None:
    """One policy ``shared`` for agents 0, 1, 2 on the old stack: metrics and training
    batches CLEAN in both phases, the batches float32 with every agent named, the raw rows
    equal to the env's ledger."""
    from reward_audit import compare, load_run
    from reward_audit.report import bottom_line

    code, findings = cli_findings(out)
    assert code == 0, findings
    assert findings[("train", "policy", "shared")]["verdict"] == "CLEAN" and findings[("evaluation", "policy", "shared")]["verdict"] == "CLEAN"
    for key in [("module", "shared"), ("agent", "0"), ("agent", "1"), ("agent", "2")]:
        f = findings[("learning", *key)]
        assert f["verdict"] == "CLEAN" and f["episodes"] >= 4, f
    assert bottom_line(compare(out)).startswith("metrics: CLEAN · training batches: CLEAN — ")
    run = load_run(out)
    assert run.manifest["api_stack"] == "old" and run.manifest["ray_version"].startswith(ray_version), run.manifest["ray_version"]
    batch = run.read("batch_rewards").to_pandas()
    assert set(batch["reward_bits"]) == {24} and set(batch["agent_id"]) == {"0", "1", "2"}  # float32, every agent named
    assert_raw_matches_ledger(run, ledger_lines)


# ----------------------------------------------------------------- Ray 2.1x experimental new stack


def experimental_stack_ppo_config(env: Any, env_config: dict, policies: list[str], mapping: Any, out: str, *, policies_to_train: list[str] | None = None, fragment: int = 16, train_batch_size: int = 256, evaluation: dict | None = None, callback: Any = None) -> Any:
    """PPO on Ray 2.12's experimental new API stack (2.1x method names: ``experimental``,
    ``rollouts``, ``sgd_minibatch_size``), one local env runner, recording to ``out``.

    ``train_batch_size=256``: smaller batches with frozen modules crashed 2.12's learner
    (RLLIB_NOTES §1). ``evaluation``: keyword arguments for ``config.evaluation``.
    """
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.env.multi_agent_env_runner import MultiAgentEnvRunner

    from reward_audit import RewardAuditCallback

    config = (
        PPOConfig()
        .experimental(_enable_new_api_stack=True)
        .framework("torch")
        .environment(env, env_config=env_config, disable_env_checking=True)
        .rollouts(env_runner_cls=MultiAgentEnvRunner, num_rollout_workers=0, rollout_fragment_length=fragment)
        .training(train_batch_size=train_batch_size, sgd_minibatch_size=64, num_sgd_iter=1, model={"fcnet_hiddens": [8]})
        .multi_agent(policies=set(policies), policy_mapping_fn=mapping, policies_to_train=policies_to_train)
        .callbacks((callback or RewardAuditCallback).writing_to(out))
    )
    if evaluation:
        config = config.evaluation(**evaluation)
    return config


# ----------------------------------------------------------------- turn-based episodes cut by sample()


def record_turn_based(base: Any, final_obs: str, *, build: Any = new_stack_ppo_config, iterations: int = 3, train_fn: Any = None) -> tuple[str, list[dict]]:
    """``TurnBasedEnv`` (white, black alternate; every step pays the mover and the waiting
    player) with 17-move episodes in 16-step fragments: the cuts fall at every position of
    an episode in turn, so some final chunks hold 1 or 2 moves. ``final_obs="none"``: the
    last step observes nobody, as RLlib's ``OpenSpielEnv``. Returns ``(run folder, ledger)``."""
    from reward_audit.envs import TurnBasedEnv, map_by_id

    out, led = os.path.join(str(base), "trial"), os.path.join(str(base), "ledger")
    os.makedirs(led)
    env_config = {"episode_len": 17, "random_rewards": True, "ledger_dir": led, "final_obs": final_obs}
    (train_fn or train)(build(TurnBasedEnv, env_config, ["p_white", "p_black"], map_by_id, out, fragment=16), iterations)
    return out, ledger(led)


def per_agent_episode_sums(run: Any) -> Any:
    """Per finished train (episode, agent): the counted truth, the batch sum, RLlib's reported
    agent value, the final chunk's counted rewards and whether the batch has a row in the
    episode's final chunk — from the Parquet rows alone."""
    import pandas as pd

    raw = run.raw[run.raw["phase"] == "train"]
    raw = raw[raw.groupby("episode_id")["episode_done"].transform("any")]
    raw = raw.assign(counted=raw["reward"] - raw["pre_obs_reward"])
    final_seq = raw.groupby("episode_id")["chunk_seq"].transform("max")
    raw = raw.assign(final=raw["counted"].where(raw["chunk_seq"] == final_seq, 0.0), final_seq=final_seq)
    sums = raw.groupby(["episode_id", "agent_id"]).agg(truth=("counted", "sum"), final=("final", "sum"), final_seq=("final_seq", "max"))
    batch = run.read("batch_rewards").to_pandas()
    sums["batch"] = batch.groupby(["episode_id", "agent_id"])["reward"].sum().reindex(sums.index).fillna(0.0)
    last_batch_seq = batch.groupby(["episode_id", "agent_id"])["chunk_seq"].max().reindex(sums.index)
    sums["batch_in_final_chunk"] = last_batch_seq == sums["final_seq"]
    reported = run.reported[(run.reported["phase"] == "train") & (run.reported["kind"] == "agent")]
    sums["reported"] = reported.set_index(["episode_id", "agent_id"])["value"].reindex(sums.index)
    return pd.DataFrame(sums)


def assert_lost_across_cut_in_metrics_and_batches(out: str) -> None:
    """Ray 2.53 / 2.60, ``record_turn_based(final_obs="none")``: the rewards RLlib loses across a
    cut are missing from its metrics and from its training batches alike — phases ``train`` and
    ``learning`` DROP on the same episodes with the same values, and per finished episode and
    agent the batch sum equals RLlib's reported value; a lost agent has no batch row in the
    episode's final chunk, and what is missing is exactly that chunk's rewards."""
    from reward_audit import compare, load_run
    from reward_audit.report import bottom_line

    audit = compare(out, max_evidence=1000)
    by = {(f.phase, f.kind, f.key): f for f in audit.findings if not f.verdict.warning}  # black also has EXCLUDED (move 1)
    for kind, key in [("agent", "white"), ("agent", "black"), ("module", "p_white"), ("module", "p_black")]:
        train, learning = by[("train", kind, key)], by[("learning", kind, key)]
        if train.verdict.value != "DROP" or learning.verdict.value != "DROP":
            raise AssertionError(f"expected DROP in both phases: {train} / {learning}")
        trained_on = {e.episode_id: e.reported for e in learning.evidence if e.verdict.failing}
        reported = {e.episode_id: e.reported for e in train.evidence if e.verdict.failing}
        if trained_on.keys() != reported.keys() or any(abs(trained_on[k] - reported[k]) > 1e-9 for k in reported):
            raise AssertionError(f"{kind} {key}: trained on {trained_on}, reported {reported}")
    line = bottom_line(audit) or ""
    if not line.startswith("metrics: DROP · training batches: DROP"):
        raise AssertionError(line)
    if not any(n.startswith("matches a known RLlib bug: turn-based episodes cut by `sample()`") and n.endswith("affects training too") for n in audit.notes):
        raise AssertionError(f"the known-bug note is missing: {audit.notes}")
    sums = per_agent_episode_sums(load_run(out))
    gap = (sums["batch"] - sums["reported"]).abs().max()
    if not gap < 1e-9:
        raise AssertionError(f"batch and reported differ by up to {gap}:\n{sums}")
    lost = sums[(sums["truth"] - sums["batch"]).abs() > 1e-9]
    episodes = sums.index.get_level_values("episode_id").nunique()
    if not 1 <= lost.index.get_level_values("episode_id").nunique() < episodes:
        raise AssertionError(f"expected some (not all) of {episodes} episodes to lose rewards:\n{lost}")
    if lost["batch_in_final_chunk"].any() or ((lost["truth"] - lost["batch"]) - lost["final"]).abs().max() > 1e-9:
        raise AssertionError(f"the missing rewards are not the agents' final chunks:\n{lost}")
