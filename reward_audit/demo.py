"""``reward-audit demo``: a tiny, real PPO run on a bundled 2-agent env with the callback,
then ``compare``. Needs ``ray[rllib]`` and torch.

Agents 0 and 1 are paid 1 and 10 per step over 30-step episodes; with
``rollout_fragment_length=16`` every episode spans several ``sample()`` chunks, which is
exactly where Ray 2.12 leaked one agent's rewards into the other's module.
"""

from __future__ import annotations

import os
from typing import Any


def agent_to_policy(agent_id: Any, episode: Any = None, **kwargs: Any) -> str:
    """Agent 0 -> ``p0``, agent 1 -> ``p1``."""
    return f"p{agent_id}"


def demo_config(output: str, *, num_env_runners: int = 0, evaluation: bool = True, env_config: dict | None = None) -> Any:
    from ray.rllib.algorithms.ppo import PPOConfig

    from .callback import RewardAuditCallback
    from .envs import ScaledRewardsEnv

    config = (
        PPOConfig()
        .environment(ScaledRewardsEnv, env_config={"agents": [0, 1], "scales": [1.0, 10.0], "episode_len": 30, **(env_config or {})})
        .multi_agent(policies={"p0", "p1"}, policy_mapping_fn=agent_to_policy)
        .env_runners(num_env_runners=num_env_runners, rollout_fragment_length=16, num_envs_per_env_runner=1)
        .training(train_batch_size_per_learner=128, minibatch_size=64, num_epochs=1, lr=1e-4)
        .rl_module(model_config={"fcnet_hiddens": [16]})
        .callbacks(RewardAuditCallback.writing_to(output))
        .debugging(log_level="ERROR")
    )
    if evaluation:
        config = config.evaluation(evaluation_interval=2, evaluation_duration=2, evaluation_duration_unit="episodes", evaluation_num_env_runners=0)
    return config


def run_demo(output: str, iterations: int = 4) -> str:
    """Train ``iterations`` PPO iterations recording to ``output``; returns the output folder."""
    import ray

    os.makedirs(output, exist_ok=True)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        algo = demo_config(output).build_algo()
        try:
            for _ in range(iterations):
                algo.train()
        finally:
            algo.stop()
    finally:
        if started:
            ray.shutdown()
    return output
