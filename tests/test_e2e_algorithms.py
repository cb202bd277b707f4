"""End to end on the installed Ray, new API stack, beyond PPO (issue 8): APPO and IMPALA
sample asynchronously — an iteration's dashboard shows the get_metrics() calls that reached
the driver before its training step, so calls reward_audit collects at the end of train()
may appear in the next iteration — and DQN samples off-policy. Every one is CLEAN on a
multi-agent env and every dashboard iteration is rebuilt exactly (none "bounded only");
a leak injected into APPO's metrics is caught."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="end-to-end tests need ray[rllib]; `make test` installs it")

from reward_audit import RewardAuditCallback, Verdict, compare  # noqa: E402
from reward_audit.envs import ScaledRewardsEnv, map_by_id  # noqa: E402

pytestmark = pytest.mark.rllib

RAY = tuple(int(part) for part in ray.__version__.split(".")[:2])
if RAY < (2, 40):
    pytest.skip("the 2.4x+ new API stack spelling", allow_module_level=True)


def config_for(algo: str, out: str, **callback_options):
    from ray.rllib.algorithms.appo import APPOConfig
    from ray.rllib.algorithms.dqn import DQNConfig
    from ray.rllib.algorithms.impala import IMPALAConfig
    from ray.rllib.algorithms.ppo import PPOConfig

    cls = {"PPO": PPOConfig, "APPO": APPOConfig, "IMPALA": IMPALAConfig, "DQN": DQNConfig}[algo]
    config = (
        cls()
        .environment(ScaledRewardsEnv, env_config={"agents": [0, 1], "episode_len": 30, "random_rewards": True}, disable_env_checking=True)
        .multi_agent(policies={"p_0", "p_1"}, policy_mapping_fn=map_by_id)
        .env_runners(num_env_runners=1, rollout_fragment_length=16)
        .learners(num_learners=0)
        .rl_module(model_config={"fcnet_hiddens": [8]})
        .callbacks(RewardAuditCallback.configured(out, **callback_options))
    )
    if algo == "DQN":  # multi-agent needs the multi-agent replay buffer
        return config.training(
            train_batch_size_per_learner=32,
            num_steps_sampled_before_learning_starts=32,
            replay_buffer_config={"type": "MultiAgentEpisodeReplayBuffer", "capacity": 5000},
        )
    if algo == "PPO":
        return config.training(train_batch_size_per_learner=64, minibatch_size=32, num_epochs=1)
    return config.training(train_batch_size_per_learner=64)


def train(config, iterations: int) -> None:
    algo = config.build_algo()
    try:
        for _ in range(iterations):
            algo.train()
    finally:
        algo.stop()


@pytest.mark.parametrize("algo", ["PPO", "APPO", "IMPALA", "DQN"])
def test_clean_and_every_dashboard_iteration_rebuilt(ray_instance, tmp_path, algo):
    out = str(tmp_path / "out")
    train(config_for(algo, out), 3)
    audit = compare(out)
    assert audit.ok, [str(f) for f in audit.findings]
    assert {f.verdict for f in audit.findings} <= {Verdict.CLEAN, Verdict.INCOMPLETE}
    means = [d for d in audit.dashboard if "mean" in d.path]
    assert means and all(not d.unreconstructable and not d.wrong_iterations for d in means), [d.summary() for d in means]
    assert audit.manifest["async_metrics"] is (algo in ("APPO", "IMPALA"))
    if algo in ("APPO", "IMPALA"):
        assert any("asynchronous sampling" in n for n in audit.notes)


def test_a_leak_in_appo_metrics_is_caught(ray_instance, tmp_path):
    out = str(tmp_path / "out")
    train(config_for("APPO", out, inject_fault="leak"), 3)
    audit = compare(out)
    assert Verdict.LEAK in {f.verdict for f in audit.failures()}
