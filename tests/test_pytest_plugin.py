"""The pytest plugin end to end with pytester: the fixture trains for real, passes a clean
config, fails an injected leak with a readable message, and --reward-audit-strict also
fails on EXCLUDED."""

from __future__ import annotations

import pytest

pytest.importorskip("ray", reason="needs ray[rllib]; `make test` installs it")
pytest_plugins = ["pytester"]
pytestmark = pytest.mark.rllib

CONFTEST = '''
import pytest, ray

@pytest.fixture(scope="session", autouse=True)
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()
'''

USER_TESTS = '''
from ray.rllib.algorithms.callbacks import DefaultCallbacks
from ray.rllib.algorithms.ppo import PPOConfig
from reward_audit.envs import ScaledRewardsEnv, TurnBasedEnv, map_by_id

SEEN = []

class UsersOwnCallback(DefaultCallbacks):
    def on_train_result(self, *, algorithm, result, **kwargs):
        SEEN.append(result["training_iteration"])

def config(env=ScaledRewardsEnv, agents=(0, 1)):
    return (
        PPOConfig()
        .environment(env, env_config={"agents": list(agents), "episode_len": 20})
        .multi_agent(policies={f"p_{a}" for a in agents}, policy_mapping_fn=map_by_id)
        .env_runners(num_env_runners=0, rollout_fragment_length=16)
        .training(train_batch_size_per_learner=64, minibatch_size=32, num_epochs=1)
        .rl_module(model_config={"fcnet_hiddens": [8]})
        .callbacks(UsersOwnCallback)
    )

def test_clean(reward_audit_run):
    audit = reward_audit_run(config(), iterations=2)
    assert audit.ok and SEEN == [1, 2]   # the user's own callback still runs

def test_injected_leak(reward_audit_run):
    reward_audit_run(config(), iterations=2, inject_fault="leak")

def test_turn_based(reward_audit_run):
    reward_audit_run(config(TurnBasedEnv, ("white", "black")), iterations=1)
'''


@pytest.fixture
def suite(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_user=USER_TESTS)
    return pytester


def test_fixture_passes_clean_and_fails_leak_with_readable_message(suite):
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*RewardLeakageError: reward attribution is wrong: * failing finding(s)*",
            "*train module p_0: LEAK*",
            "*agent 1's earlier-chunk rewards*",
        ]
    )
    result.stdout.fnmatch_lines(["*= reward_audit =*", "*test_user.py::test_clean: ok*", "*test_user.py::test_injected_leak: FAILING*"])


def test_strict_also_fails_on_excluded(suite):
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-q", "--reward-audit-strict", "-k", "turn_based")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*EXCLUDED*black*"])


def test_options_are_registered(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*reward attribution audits*", "*--reward-audit-strict*", "*--reward-audit-keep*"])
