"""Issue 10 on real Ray 2.60 runs: the live audit in every ``train()`` result (Tune's
result.json, TensorBoard, a Tune stopper), and the callback composing with the user's own
callbacks in every documented form.
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import struct

import pytest

ray = pytest.importorskip("ray", reason="end-to-end tests need ray[rllib]; `make test` installs it")

from helpers import new_stack_ppo_config, old_stack_ppo_config  # noqa: E402
from ray.rllib.callbacks.callbacks import RLlibCallback  # noqa: E402

import reward_audit  # noqa: E402
from reward_audit import RewardAuditCallback, compare  # noqa: E402
from reward_audit.envs import ScaledRewardsEnv, map_by_id  # noqa: E402
from reward_audit.results import flatten  # noqa: E402

pytestmark = pytest.mark.rllib

ENV = {"agents": [0, 1], "episode_len": 30, "random_rewards": True}


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_instance):  # one Ray for the whole module (tests/conftest.py)
    yield


def tune_run(tmp_path, config, stop):
    from ray import tune
    from ray.rllib.algorithms.ppo import PPO
    from ray.tune import RunConfig

    tuner = tune.Tuner(PPO, param_space=config, run_config=RunConfig(storage_path=str(tmp_path), name="exp", stop=stop, verbose=0))
    [result] = list(tuner.fit())
    assert result.error is None
    return result


def result_rows(trial_dir):
    with open(os.path.join(trial_dir, "result.json")) as f:
        return [flatten(json.loads(line)) for line in f if line.strip()]


def tensorboard_tags(trial_dir) -> set[str]:
    """Scalar tags in the trial's TensorBoard event files (TFRecord framing, protobuf Event)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for file in glob.glob(os.path.join(trial_dir, "events.out.tfevents.*")):
        with open(file, "rb") as f:
            data = f.read()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            tags.update(v.tag for v in event.summary.value)
            i += 12 + n + 4
    return tags


# --------------------------------------------------------------------------- the live audit


def test_tune_result_json_and_tensorboard_show_the_truth_beside_rllib(tmp_path):
    config = new_stack_ppo_config(ScaledRewardsEnv, ENV, ["p_0", "p_1"], map_by_id, "unused").callbacks(RewardAuditCallback)
    result = tune_run(tmp_path, config, {"training_iteration": 2})
    rows = result_rows(result.path)
    assert len(rows) == 2
    for row in rows:
        assert row["reward_audit/failing"] == 0 and row["reward_audit/verified_episodes"] > 0
        truth = {k[len("reward_audit/truth/"):]: v for k, v in row.items() if k.startswith("reward_audit/truth/")}
        assert {"env_runners/module_episode_returns_mean/p_0", "env_runners/agent_episode_returns_mean/1", "env_runners/episode_return_mean"} <= set(truth)
        for path, value in truth.items():  # on a run RLlib gets right, the truth is RLlib's curve
            assert value == pytest.approx(row[path], rel=1e-9), path
    assert rows[1]["reward_audit/verified_episodes"] > rows[0]["reward_audit/verified_episodes"]
    tags = tensorboard_tags(result.path)
    assert "ray/tune/reward_audit/failing" in tags
    assert "ray/tune/reward_audit/truth/env_runners/module_episode_returns_mean/p_1" in tags


def test_a_tune_stopper_ends_a_leaking_run_at_its_first_iteration(tmp_path):
    leak = RewardAuditCallback.configured(inject_fault="leak")
    config = new_stack_ppo_config(ScaledRewardsEnv, ENV, ["p_0", "p_1"], map_by_id, "unused").callbacks(leak)
    result = tune_run(tmp_path, config, {"reward_audit/failing": 1, "training_iteration": 4})
    assert result.metrics["training_iteration"] == 1
    assert result.metrics["reward_audit"]["failing"] >= 1


def test_old_stack_truth_and_one_warning_for_a_leak(tmp_path, caplog):
    algo = old_stack_ppo_config(ScaledRewardsEnv, ENV, ["p_0", "p_1"], map_by_id, str(tmp_path / "old")).build_algo()
    try:
        for _ in range(3):  # the driver's history grows over iterations
            row = flatten(algo.train())
            assert row["reward_audit/failing"] == 0
            truth = {k[len("reward_audit/truth/"):]: v for k, v in row.items() if k.startswith("reward_audit/truth/")}
            assert "env_runners/policy_reward_mean/p_1" in truth
            for path, value in truth.items():
                assert value == pytest.approx(row[path], rel=1e-9), path
    finally:
        algo.stop()
    leak = RewardAuditCallback.configured(inject_fault="leak")
    algo = new_stack_ppo_config(ScaledRewardsEnv, ENV, ["p_0", "p_1"], map_by_id, str(tmp_path / "leak"), callback=leak).build_algo()
    caplog.set_level(logging.WARNING, logger="reward_audit")
    try:
        first = algo.train()["reward_audit"]
        algo.train()
    finally:
        algo.stop()
    assert first["failing"] >= 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "reward_audit" and "wrong reward attribution" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "RLlib reported" in warnings[0] and "where the env paid" in warnings[0] and "reward-audit compare" in warnings[0]


# --------------------------------------------------------------------------- composition

CALLS: collections.Counter = collections.Counter()


class Mine(RLlibCallback):
    """A user's own callback (the local env runner runs in this process: a counter works)."""

    def on_episode_end(self, **kwargs):
        CALLS["episode_end"] += 1

    def on_train_result(self, *, result, **kwargs):
        CALLS["train_result"] += 1
        result["mine"] = 1


def forms(out):
    audit = RewardAuditCallback.writing_to(out)

    class AuditFirst(RewardAuditCallback, Mine):
        OUTPUT = out

    from ray.rllib.algorithms.callbacks import make_multi_callbacks

    return {
        "list (new stack)": ("new", lambda c: c.callbacks(callbacks_class=[Mine, audit])),
        "subclass RewardAuditCallback first": ("new", lambda c: c.callbacks(AuditFirst)),
        "add_to keeps the user's (new stack)": ("new", lambda c: reward_audit.add_to(c.callbacks(Mine), out)),
        "make_multi_callbacks (old stack)": ("old", lambda c: c.callbacks(make_multi_callbacks([Mine, audit]))),
        "add_to keeps the user's (old stack)": ("old", lambda c: reward_audit.add_to(c.callbacks(Mine), out)),
        "subclass, old stack": ("old", lambda c: c.callbacks(AuditFirst)),
    }


@pytest.mark.parametrize("form", list(forms("x")))
def test_the_users_callback_still_fires(tmp_path, form):
    out = str(tmp_path / "out")
    stack, compose = forms(out)[form]
    make = new_stack_ppo_config if stack == "new" else old_stack_ppo_config
    config = compose(make(ScaledRewardsEnv, ENV, ["p_0", "p_1"], map_by_id, out))
    CALLS.clear()
    algo = config.build_algo()
    try:
        result = algo.train()
    finally:
        algo.stop()
    assert CALLS["episode_end"] > 0 and CALLS["train_result"] == 1, CALLS
    assert result["mine"] == 1 and result["reward_audit"]["verified_episodes"] > 0
    assert compare(out).ok


def test_add_to_never_adds_the_audit_twice(tmp_path):
    config = new_stack_ppo_config(ScaledRewardsEnv, ENV, ["p_0", "p_1"], map_by_id, str(tmp_path / "out"))
    assert reward_audit.add_to(config).callbacks_class is config.callbacks_class
