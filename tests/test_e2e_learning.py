"""End to end on the installed Ray: the `learning` phase (were the modules trained on the
right rewards?) on tiny real PPO runs, both API stacks, with and without injected faults.
Agents 0 and 1 are paid U(0.5, 1.5) x 1 and x 1000 per step, each on its own module;
30-step episodes in 16-step fragments, so most episodes span several `sample()` calls.
"""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="end-to-end tests need ray[rllib]; `make test` installs it")

from helpers import new_stack_ppo_config, old_stack_ppo_config, train  # noqa: E402  (tests/helpers.py)
from reward_audit import RewardAuditCallback, Verdict, compare, load_run  # noqa: E402
from reward_audit.envs import ScaledRewardsEnv, map_by_id  # noqa: E402
from reward_audit.report import bottom_line  # noqa: E402

pytestmark = pytest.mark.rllib

ENV_CONFIG = {"agents": [0, 1], "scales": [1.0, 1000.0], "episode_len": 30, "random_rewards": True}


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_instance):  # one Ray for the whole module (tests/conftest.py)
    yield


def audit_of(tmp_path, build, fault=None):
    out = str(tmp_path / "trial")
    callback = RewardAuditCallback.configured(inject_fault=fault) if fault else None
    train(build(ScaledRewardsEnv, ENV_CONFIG, ["p_0", "p_1"], map_by_id, out, callback=callback), 2)
    run = load_run(out)
    assert run.rows("batch_rewards"), "no training batches recorded"
    return run, compare(run)


def verdicts(audit, phase):
    return {(f.kind, f.key): f.verdict for f in audit.findings if f.phase == phase and f.verdict is not Verdict.INCOMPLETE}


LEARNING_KEYS = {("module", "p_0"), ("module", "p_1"), ("agent", "0"), ("agent", "1")}


def test_new_stack_clean(tmp_path):
    run, audit = audit_of(tmp_path, new_stack_ppo_config)
    learning = verdicts(audit, "learning")
    assert set(learning) == LEARNING_KEYS and set(learning.values()) == {Verdict.CLEAN}, [str(f) for f in audit.findings]
    assert set(verdicts(audit, "train").values()) == {Verdict.CLEAN}
    assert bottom_line(audit).startswith("metrics: CLEAN · training batches: CLEAN — ")
    # every chunk of a done episode was seen: the batches' agent-steps equal the env's
    batch, raw = run.read("batch_rewards").to_pandas(), run.raw[run.raw["phase"] == "train"]
    assert set(batch["phase"]) == {"train"} and set(batch["agent_id"]) == {"0", "1"}
    assert batch["n_rewards"].sum() <= raw["n_rewards"].sum()


def test_new_stack_signal_fault_fails_learning_only(tmp_path):
    _, audit = audit_of(tmp_path, new_stack_ppo_config, fault="signal")
    learning = verdicts(audit, "learning")
    assert learning[("module", "p_1")] is Verdict.LEAK and learning[("module", "p_0")] is Verdict.DROP, [str(f) for f in audit.findings]
    assert set(verdicts(audit, "train").values()) == {Verdict.CLEAN}  # RLlib's metrics keep the true episodes
    assert bottom_line(audit) == (
        "metrics: CLEAN · training batches: LEAK — the policies were trained on wrong rewards, though the reported numbers look right"
    )


def test_new_stack_metrics_leak_trains_on_the_right_rewards(tmp_path):
    _, audit = audit_of(tmp_path, new_stack_ppo_config, fault="leak")
    assert Verdict.LEAK in set(verdicts(audit, "train").values())
    assert set(verdicts(audit, "learning").values()) == {Verdict.CLEAN}
    assert bottom_line(audit) == (
        "metrics: LEAK · training batches: CLEAN — the policies were trained on the right rewards; only the reported numbers are wrong"
    )


def test_old_stack_clean(tmp_path):
    run, audit = audit_of(tmp_path, old_stack_ppo_config)
    learning = verdicts(audit, "learning")
    assert set(learning) == LEARNING_KEYS and set(learning.values()) == {Verdict.CLEAN}, [str(f) for f in audit.findings]
    # agents named from the episode's agent_index map; the batch holds float32 rewards
    batch = run.read("batch_rewards").to_pandas()
    assert set(batch["agent_id"]) == {"0", "1"} and set(batch["module_id"]) == {"p_0", "p_1"}
    assert set(batch["reward_bits"]) == {24}
