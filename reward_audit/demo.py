"""``reward-audit demo``: a tiny, real PPO run on a bundled 2-agent env with the callback,
then ``compare``. Needs ``ray[rllib]`` and torch.

Agents 0 and 1 are paid 1 and 10 per step over 30-step episodes; with
``rollout_fragment_length=16`` every episode spans several ``sample()`` chunks, which is
exactly where Ray 2.12 leaked one agent's rewards into the other's module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Iterator

# Loggers whose warnings the demo hides (Ray's own set-up, RLlib's deprecation and API-stack notices).
# reward_audit's own logger ("reward_audit") is not among them.
RAY_LOGGERS = ("ray", "ray.rllib", "ray.tune", "ray.train", "ray.data")


def agent_to_policy(agent_id: Any, episode: Any = None, **kwargs: Any) -> str:
    """Agent 0 -> ``p0``, agent 1 -> ``p1``."""
    return f"p{agent_id}"


def all_to_shared(agent_id: Any, episode: Any = None, **kwargs: Any) -> str:
    """Every agent -> ``shared`` (the layout Ray 2.53's bug needed)."""
    return "shared"


def demo_config(
    output: str,
    *,
    num_env_runners: int = 0,
    evaluation: bool = True,
    env_config: dict | None = None,
    shared: bool = False,
    inject: str | None = None,
) -> Any:
    """The demo's PPO config. ``shared=True``: three agents (paid 1, 10, 100) share one module."""
    from ray.rllib.algorithms.ppo import PPOConfig

    from .callback import RewardAuditCallback
    from .envs import ScaledRewardsEnv

    if shared:
        agents = {"agents": [0, 1, 2], "scales": [1.0, 10.0, 100.0]}
        policies, mapping = {"shared"}, all_to_shared
    else:
        agents = {"agents": [0, 1], "scales": [1.0, 10.0]}
        policies, mapping = {"p0", "p1"}, agent_to_policy
    config = (
        PPOConfig()
        .environment(ScaledRewardsEnv, env_config={**agents, "episode_len": 30, **(env_config or {})})
        .multi_agent(policies=policies, policy_mapping_fn=mapping)
        .env_runners(num_env_runners=num_env_runners, rollout_fragment_length=16, num_envs_per_env_runner=1)
        .training(train_batch_size_per_learner=128, minibatch_size=64, num_epochs=1, lr=1e-4)
        .rl_module(model_config={"fcnet_hiddens": [16]})
        .callbacks(RewardAuditCallback.configured(output, inject_fault=inject))
        .debugging(log_level="ERROR")
    )
    if evaluation:
        config = config.evaluation(evaluation_interval=2, evaluation_duration=2, evaluation_duration_unit="episodes", evaluation_num_env_runners=0)
    return config


@contextlib.contextmanager
def quiet_ray() -> Iterator[None]:
    """Ray's and RLlib's loggers at ERROR and Python warnings (gymnasium, torch) ignored while
    the block runs; both restored after it. Call after ``import ray``, which sets the levels."""
    loggers = [logging.getLogger(name) for name in RAY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def run_demo(output: str, iterations: int = 4, inject: str | None = None) -> str:
    """Train ``iterations`` PPO iterations recording to ``output``; returns the output folder.

    ``inject``: ``"leak"`` / ``"drop"`` / ``"mismatch"`` corrupts RLlib's metrics on purpose
    (self-test); ``"drop"`` uses three agents sharing one module, as the Ray 2.53 bug needed;
    ``"signal"`` moves one agent's rewards into another module's training data instead.
    """
    import ray

    os.makedirs(output, exist_ok=True)
    started = not ray.is_initialized()
    with quiet_ray():
        if started:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            algo = demo_config(output, shared=inject == "drop", inject=inject).build_algo()
            try:
                for _ in range(iterations):
                    algo.train()
            finally:
                algo.stop()
        finally:
            if started:
                ray.shutdown()
    return output
