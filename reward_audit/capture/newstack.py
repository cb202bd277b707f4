"""Capture adapter: RLlib's new API stack, Ray 2.4x – 2.60 (``MultiAgentEnvRunner``).

Arithmetic (for the rounding bound, docs/verdicts.md): ``SingleAgentEpisode.get_return()`` is
``sum(self.get_rewards())``, one by one in the rewards' own type (float32 stays float32);
``get_metrics()`` adds earlier chunks' and a module's agents' returns with ``+=`` (2.53 / 2.60
source).

Change log — what the numbers meant, per Ray version:

* per-episode values: ``MultiAgentEnvRunner.get_metrics()`` sums each done episode's
  chunks and calls ``_log_episode_metrics(length, ret, sec, agents, modules, agent_steps)``
  once per episode, in the order of ``_done_episodes_for_metrics``. We wrap both on the
  runner instance and zip ids with calls (docs/ray_versions.md). ``agents`` is keyed by
  ``str(agent_id)``; ``modules`` by module id; both are sums over the whole episode of the
  rewards RLlib counts (pre-observation rewards excluded by design, docs/ray_versions.md).
* Ray 2.53: ``modules`` was built with a dict comprehension over ``agent_episodes``, so
  agents sharing a module overwrote each other instead of summing (final chunk of only the
  last agent + earlier chunks of all); ``rllib/env/multi_agent_env_runner.py:640-646`` of
  2.53.0. Reported as ray-project/ray#59860, fixed by #60234 (2.60:
  ``module_episode_returns[m] += ...``). This adapter records 2.53 unchanged: the same
  ``get_metrics()`` / ``_log_episode_metrics(self, length, ret, sec, agents=None,
  modules=None, agent_steps=None)`` signatures (2.53.0 ``:621``, ``:1005``), verified by
  ``tests/versions/test_ray253.py``, which sees the bug as DROP. The bug is in the
  metrics only: the chunks ``sample()`` hands to training (``on_sample_end(samples=...)``,
  ``:243-254``) carry every agent's rewards, and phase ``learning`` is CLEAN there.
* Ray 2.60 (and every version with ``MultiAgentEpisode.cut()``): a reward paid to an agent
  while it waits for its next observation is booked with that observation, possibly in a
  later chunk (``_hanging_rewards_end``; the recorder books it the same way). When a
  ``sample()`` ends while a player waits, ``cut()`` can lose that player's reward — its
  terminal one if the last step observes nobody (OpenSpiel's ``OpenSpielEnv``). RLlib notes
  lost single-agent steps at such cuts in ray-project/ray#44677. The audit shows DROP in
  multi-chunk episodes; ``tests/envs/test_envs.py::test_rllib_loses_terminal_rewards_across_cut``
  reproduces it without reward_audit (docs/tested_environments.md).
* dashboards: ``env_runners/module_episode_returns_mean/<m>``, ``agent_episode_returns_mean/<a>``,
  ``episode_return_mean/min/max``; each runner logs with
  ``window = ceil(S / max(num_env_runners, 1))`` and every ``get_metrics()`` reduces and
  clears it; the driver shows the nan-mean of per-(runner, call) means (no smoothing across
  iterations). ``metrics_call`` records that grouping.
* raw rewards: ``on_environment_created`` gets ``env = runner.env.unwrapped``, a
  ``SyncVectorMultiAgentEnv``; we tap ``env.envs[i]`` and re-tap each time the hook fires
  (a sub-env failure rebuilds the vector env).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..recorder import RunnerRecorder, _bits
from ..schema import IterationSemantics as S
from ..schema import Kind
from .base import Adapter, install_tap

logger = logging.getLogger("reward_audit")


class NewStackAdapter(Adapter):
    name = "new-stack-2.4x+"
    api_stack = "new"
    iteration_paths = (
        ("env_runners/module_episode_returns_mean/", Kind.MODULE, S.MEAN_OF_EPISODE_SUMS.value),
        ("env_runners/agent_episode_returns_mean/", Kind.AGENT, S.MEAN_OF_EPISODE_SUMS.value),
        ("env_runners/episode_return_mean", Kind.EPISODE, S.MEAN_OF_EPISODE_SUMS.value),
        ("env_runners/episode_return_min", Kind.EPISODE, S.MIN_OF_EPISODE_SUMS.value),
        ("env_runners/episode_return_max", Kind.EPISODE, S.MAX_OF_EPISODE_SUMS.value),
    )

    def mapping_of(self, episode: Any) -> dict:
        mapping = {aid: sa.module_id for aid, sa in episode.agent_episodes.items()}
        # Agents mapped but without a single-agent episode yet (private; read, never forced).
        for aid, mid in (getattr(episode, "_agent_to_module_mapping", None) or {}).items():
            mapping.setdefault(aid, mid)
        return mapping

    def episode_id(self, episode: Any, recorder: RunnerRecorder) -> str:
        return str(episode.id_)

    def on_env(self, kwargs: dict) -> RunnerRecorder | None:
        runner = kwargs["env_runner"]
        recorder = self.recorder_for(runner)
        vector_env = kwargs.get("env")
        envs = getattr(vector_env, "envs", None)
        if envs is None:
            raise TypeError(f"expected a SyncVectorMultiAgentEnv with `.envs`, got {type(vector_env).__name__}")
        for index, sub_env in enumerate(envs):
            install_tap(sub_env, recorder, index)
        self._wrap_metrics(runner, recorder)
        return recorder

    def _wrap_metrics(self, runner: Any, recorder: RunnerRecorder) -> None:
        if runner.__dict__.get("_reward_audit_metrics_wrapped"):
            return
        original_get_metrics = runner.get_metrics
        original_log = runner._log_episode_metrics

        def get_metrics(*args: Any, **kwargs: Any) -> Any:
            try:
                recorder.metrics_call_begins(str(e.id_) for e in runner._done_episodes_for_metrics)
            except Exception:
                recorder.failures += 1
                logger.exception("reward_audit: could not read the episodes get_metrics() will report")
            try:
                return original_get_metrics(*args, **kwargs)
            finally:
                recorder.metrics_call_ends()

        def log_episode_metrics(length: Any, ret: Any, sec: Any, agents: Any = None, modules: Any = None, *args: Any, **kwargs: Any) -> Any:
            try:
                recorder.reported_episode(None, ret, dict(agents or {}), dict(modules or {}))
            except Exception:
                recorder.failures += 1
                logger.exception("reward_audit: could not record RLlib's per-episode returns")
            return original_log(length, ret, sec, agents, modules, *args, **kwargs)

        runner.get_metrics = get_metrics
        runner._log_episode_metrics = log_episode_metrics
        runner.__dict__["_reward_audit_metrics_wrapped"] = True

    def batch_ends(self, recorder: RunnerRecorder, samples: Any) -> None:
        """``samples`` is what ``MultiAgentEnvRunner.sample()`` returns (2.60
        ``multi_agent_env_runner.py:291-300``): done episodes and cut chunks of ongoing ones,
        all sharing their episode's ``id_``. Per agent, its chunk's ``get_rewards()`` (no
        lookback) is what the learner connectors turn into the module's training batch.

        Same call in 2.53 (``multi_agent_env_runner.py:243-254``, the list built at
        ``:529-560``; zero-length agent episodes pruned, ``:1067-1070``) and in 2.12's
        experimental stack (``capture/experimental.py``). Verified by real runs on 2.53.0 and
        2.60.0 (``tests/versions/``): ``learning`` CLEAN, also where 2.53's metrics DROP a
        shared module's agents — the batches carry every agent's rewards."""
        sums = []
        for episode in samples or ():
            agent_episodes = getattr(episode, "agent_episodes", None)
            if agent_episodes is None:  # not a MultiAgentEpisode: nothing to attribute
                continue
            episode_id = str(episode.id_)
            for aid, sa in agent_episodes.items():
                rewards = sa.get_rewards()
                if len(rewards):
                    sums.append((episode_id, aid, sa.module_id, float(np.sum(rewards, dtype=np.float64)), len(rewards), _bits(rewards)))
        recorder.batch_rewards(sums)

    def install_fault(self, runner: Any, fault: str) -> None:
        from .inject import install_fault

        install_fault(runner, fault)

    @staticmethod
    def _evaluation_discards_last_call(config: Any) -> bool:
        """Ray 2.53 ``Algorithm._evaluate_with_fixed_duration`` (algorithm.py:2007-2028) samples
        remote evaluation runners with ``foreach_env_runner_async_fetch_ready``, which fetches
        ready results and then sends a new request; the request sent with the last fetch runs
        but its result is dropped in the next evaluation (``iter != self.iteration``). 2.60
        calls ``foreach_env_runner(timeout_seconds=...)`` instead (no extra request)."""
        import ray

        from . import _version_tuple

        fixed = getattr(config, "evaluation_duration", None) != "auto"  # "auto" (algorithm.py:1774-1801) not verified
        return _version_tuple(ray.__version__) < (2, 60) and fixed and bool(getattr(config, "evaluation_num_env_runners", 0))

    def config_summary(self, config: Any) -> dict[str, Any]:
        return {
            "rollout_fragment_length": config.rollout_fragment_length,
            "num_env_runners": config.num_env_runners,
            "num_envs_per_env_runner": config.num_envs_per_env_runner,
            "evaluation_num_env_runners": getattr(config, "evaluation_num_env_runners", None),
            "evaluation_duration": getattr(config, "evaluation_duration", None),
            "evaluation_duration_unit": getattr(config, "evaluation_duration_unit", None),
            "evaluation_parallel_to_training": getattr(config, "evaluation_parallel_to_training", None),
            # nan-mean of per-(runner, get_metrics call) means over the last ceil(S / num_env_runners) episodes
            "smoothing_model": "per_call_window",
            "evaluation_discards_last_call": self._evaluation_discards_last_call(config),
            # APPO / IMPALA sample asynchronously: which get_metrics() calls an iteration
            # shows depends on timing (dashboard.async_windows finds it; seen on 2.60: up to
            # 2 calls per runner collected in iteration i appear in i+1).
            "async_metrics": any(c.__name__ == "IMPALAConfig" for c in type(config).__mro__),
        }
