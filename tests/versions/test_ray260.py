"""Ray 2.60: the Ray 2.53 scenarios come out CLEAN (the shared-module bug is fixed:
``module_episode_returns[m] += ...`` sums every agent of the module), and phase ``learning``
(the training batches) is CLEAN on every run here, new and old stack, frozen modules included.

Run with ``make test-versions`` (its own virtualenv with ``ray[rllib]==2.60.0``) or
``pytest -m ray260 tests/versions/`` in a 2.60 environment.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="needs ray[rllib]==2.60.*; `make test-versions` builds that environment")

from helpers import assert_raw_matches_ledger, cli_findings, old_stack_ppo_config, assert_lost_across_cut_in_metrics_and_batches, record_scaled_rewards, record_turn_based  # noqa: E402
from reward_audit import compare, load_run  # noqa: E402
from reward_audit.report import bottom_line  # noqa: E402
from reward_audit.envs import map_all_shared, map_by_id  # noqa: E402

pytestmark = [
    pytest.mark.ray260,
    pytest.mark.rllib,
    pytest.mark.skipif(not ray.__version__.startswith("2.60."), reason=f"Ray 2.60 scenarios; Ray {ray.__version__} is installed"),
]

AGENTS = [0, 1, 2]
FAILING = {"LEAK", "DROP", "MISMATCH"}


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def assert_all_clean(findings, keys):
    failing = {k: f["message"] for k, f in findings.items() if f["verdict"] in FAILING}
    assert not failing, failing
    for key in keys:
        assert findings[key]["verdict"] == "CLEAN", findings[key]


def assert_learning_clean(out, findings, modules, agents):
    """Phase ``learning`` (docs/learning.md): a CLEAN finding with episodes for every module
    and agent that trained, and nothing else; the bottom line says both phases are clean."""
    learning = {(k, key): f for (phase, k, key), f in findings.items() if phase == "learning"}
    assert set(learning) == {("module", m) for m in modules} | {("agent", a) for a in agents}, sorted(learning)
    for f in learning.values():
        assert f["verdict"] == "CLEAN" and f["episodes"] > 0, f
    assert bottom_line(compare(out)) == "metrics: CLEAN · training batches: CLEAN — the reported numbers and the training data both match what the env paid"


def test_shared_module_is_clean_on_the_new_stack(tmp_path):
    out, lines = record_scaled_rewards(tmp_path, ["shared"], map_all_shared, agents=AGENTS)
    code, findings = cli_findings(out)
    assert code == 0, findings
    assert_all_clean(findings, [(p, k, key) for p in ("train", "evaluation") for k, key in [("module", "shared"), ("agent", "0"), ("agent", "1"), ("agent", "2"), ("episode", "return")]])
    run = load_run(out)
    assert run.manifest["ray_version"].startswith("2.60.") and run.manifest["api_stack"] == "new"
    # The scenario does exercise the 2.53 bug's conditions: 3 agents on one module, multi-chunk training episodes.
    train = run.raw[run.raw["phase"] == "train"]
    assert (train.groupby("episode_id")["chunk_seq"].nunique() > 1).any()
    assert set(run.raw["module_id"]) == {"shared"} and (run.raw.groupby("episode_id")["agent_id"].nunique() == 3).all()
    assert_learning_clean(out, findings, ["shared"], "012")
    assert_raw_matches_ledger(run, lines)


def test_separate_modules_are_clean_on_the_new_stack(tmp_path):
    out, lines = record_scaled_rewards(tmp_path, ["p_0", "p_1", "p_2"], map_by_id, agents=AGENTS)
    code, findings = cli_findings(out)
    assert code == 0, findings
    assert_all_clean(findings, [(p, "module", f"p_{a}") for p in ("train", "evaluation") for a in "012"])
    assert_learning_clean(out, findings, ["p_0", "p_1", "p_2"], "012")
    assert_raw_matches_ledger(load_run(out), lines)


def has_old_stack_adapter() -> bool:
    from types import SimpleNamespace

    from reward_audit.capture import detect
    from reward_audit.errors import UnsupportedRayError

    try:
        detect(SimpleNamespace(enable_env_runner_and_connector_v2=False, enable_rl_module_and_learner=False), ray.__version__)
    except UnsupportedRayError:
        return False
    return True


@pytest.mark.skipif(not has_old_stack_adapter(), reason="this reward_audit has no old-stack capture adapter for this Ray")
def test_shared_module_is_clean_on_the_old_stack(tmp_path):
    out, lines = record_scaled_rewards(tmp_path, ["shared"], map_all_shared, agents=AGENTS, build=old_stack_ppo_config)
    code, findings = cli_findings(out)
    assert code == 0, findings
    assert_all_clean(findings, [])
    run = load_run(out)
    assert run.manifest["api_stack"] == "old"
    assert any(f["verdict"] == "CLEAN" and f["phase"] == "train" and f["key"] == "shared" for f in findings.values())
    assert_learning_clean(out, findings, ["shared"], "012")
    assert_raw_matches_ledger(run, lines)


@pytest.mark.parametrize("stack", ["new", "old"])
def test_the_212_seed_scenario_is_clean(tmp_path, stack):
    """Ray 2.12's seed (two agents acting every step, four policies seated per episode, two
    of them frozen, episodes longer than the fragment, evaluation): CLEAN on 2.60."""
    from helpers import new_stack_ppo_config
    from reward_audit.envs import map_four_policies_by_episode

    build = new_stack_ppo_config if stack == "new" else old_stack_ppo_config

    def seed_config(*args, **kwargs):
        return build(*args, **kwargs).multi_agent(policies_to_train=["p1", "p2"])

    policies = ["p1", "p2", "p3", "p4"]
    out, lines = record_scaled_rewards(tmp_path, policies, map_four_policies_by_episode, agents=[0, 1], build=seed_config)
    code, findings = cli_findings(out)
    assert code == 0, findings
    kind = "module" if stack == "new" else "policy"
    assert_all_clean(findings, [("train", kind, "p1"), ("train", kind, "p2")])
    run = load_run(out)
    train = run.raw[run.raw["phase"] == "train"]
    finished = train[train.groupby("episode_id")["episode_done"].transform("any")]
    assert (finished.groupby("episode_id")["chunk_seq"].nunique() > 1).all()  # the leak's condition
    assert {"p3", "p4"} & set(train["module_id"])  # frozen snapshots did take a seat
    seated = set(train["module_id"])
    assert_learning_clean(out, findings, seated, "01")  # frozen p3 / p4 included: their data leaves the runner too
    assert_raw_matches_ledger(run, lines)


# --------------------------------------------------------------------------- turn-based, cut by sample()


@pytest.fixture(scope="module")
def turn_based_no_final_obs(tmp_path_factory):
    return record_turn_based(tmp_path_factory.mktemp("turn_based_none"), "none")


def test_waiting_player_reward_lost_across_cut_is_missing_from_training_too(turn_based_no_final_obs):
    """The OpenSpiel connect four DROP (docs/tested_environments.md), made deterministic:
    when the last step observes nobody and ``sample()`` cut the episode one or two moves
    before its end, ``MultiAgentEpisode.cut()`` does not carry the waiting player over
    (``multi_agent_episode.py:935-1001``) and ``add_env_step`` then discards its final
    reward (``:574-583``). The same chunks are what ``sample()`` hands to training, so the
    reward is missing from the training batch exactly as from the metrics: ``learning``
    DROPs on the same episodes with the same values (docs/learning.md)."""
    out, lines = turn_based_no_final_obs
    assert_lost_across_cut_in_metrics_and_batches(out)
    assert_raw_matches_ledger(load_run(out), lines)


def test_turn_based_with_a_final_observation_is_clean(tmp_path):
    """The control: the same cuts, but the last step observes both players — nothing is lost."""
    out, lines = record_turn_based(tmp_path, "all")
    code, findings = cli_findings(out)
    assert code == 0, {k: f["message"] for k, f in findings.items() if f["verdict"] in FAILING}
    assert_learning_clean(out, findings, ["p_white", "p_black"], ["white", "black"])
