"""Capture adapter: RLlib's *experimental* new API stack, Ray 2.10 – 2.3x (``detect()``: < 2.40).

Arithmetic (for the rounding bound, docs/verdicts.md): ``SingleAgentEpisode.get_return()`` is
``sum(self.get_rewards())`` (2.12: single_agent_episode.py:1581); ``get_metrics()`` adds earlier
chunks' returns with ``+=`` (multi_agent_env_runner.py:591-595).

Selected with ``config.experimental(_enable_new_api_stack=True)`` plus
``config.rollouts(env_runner_cls=MultiAgentEnvRunner)``. Only Ray 2.12.0 was verified
(installed source and real runs); the other 2.1x – 2.3x releases are routed here by
``detect()`` on the assumption that they share 2.12's ``MultiAgentEnvRunner`` — a release
that does not will show up as capture failures (``UNVERIFIED``), never as a crash.

Change log — what the numbers mean (line numbers: Ray 2.12.0,
``ray/rllib/env/multi_agent_env_runner.py``):

* per-episode values: ``get_metrics()`` (:573-608) walks ``_done_episodes_for_metrics`` and
  returns one ``RolloutMetrics(episode_length, episode_reward, agent_rewards)`` per done
  episode, in that order, with ``agent_rewards = {(agent_id, module_id): return}`` (agent
  ids keep their type, e.g. ``int``). We wrap ``get_metrics`` on the runner instance,
  snapshot the episode ids before calling it and zip them with the returned list, recording
  kind ``policy`` rows: that list is what the driver's ``summarize_episodes``
  (``evaluation/metrics.py``) turns into ``policy_reward_mean/<pid>`` (one entry per
  (agent, episode)) and ``episode_reward_mean``.
* **the chunk leak (Ray 2.12):** for an episode that spanned several ``sample()`` calls,
  :588-595 adds the *whole multi-agent* return of each earlier chunk (``eps2.get_return()``)
  to every ``(agent, module)`` key, so

      reported(a → m) = a's return in the final chunk
                        + Σ over earlier chunks of the return of *all* agents

  i.e. truth(a) + every other agent's earlier-chunk rewards. ``episode_reward`` is right.
  Single-chunk episodes are right. Reported upstream in ray-project/ray PR #45057
  ("Fix wrong returns in multi agent partially returned episodes", closed unmerged) and
  fixed by PR #45543 ("[RLlib] Fix metrics bug (wrt individual agent returns) in
  `MultiAgentEnvRunner`", merged). Which release first shipped the fix is not verified
  here; 2.53's ``get_metrics`` sums per agent (``agent_episode_returns[...] += return_sa``).
* evaluation: ``evaluation_duration_unit="episodes"`` samples whole episodes through
  ``_sample_episodes`` (:398-568), which never stores earlier chunks, so evaluation is
  clean side by side with a leaking training phase. ``evaluation_duration="auto"`` with
  ``evaluation_parallel_to_training=True`` samples *timesteps* on remote evaluation runners
  (``Algorithm._evaluate_with_auto_duration``, ``algorithms/algorithm.py:1129-1138``): episodes
  are cut into chunks there too and evaluation leaks the same way.
  There the driver counts only the rounds it fetches inside that ``evaluate()`` loop; a
  round fetched later is dropped as stale (``if iter != self.iteration: continue``,
  ``algorithm.py:1187``). Its episodes were reported by ``get_metrics()`` on the runner
  (we record and audit them) but never reach ``evaluation/policy_reward_mean`` (one
  3-iteration run: 66 evaluation episodes recorded, 17 counted by the dashboard).
* dashboards: ``policy_reward_mean/<pid>`` (+ ``_min``/``_max``) and
  ``episode_reward_mean/min/max``, at the top level and again under ``sampler_results/``;
  evaluation under ``evaluation/``. Training values are smoothed on the driver over the last
  ``max(S, n_new)`` episodes (``Algorithm._episode_history``); evaluation summarizes only
  that ``evaluate()`` call's episodes.
* raw rewards: one env per runner, no vectorization (``num_envs_per_worker > 1`` is refused,
  ``algorithms/algorithm_config.py:3871-3880``),
  ``env_index`` is always 0 (:776-784). ``on_environment_created`` receives ``env=self.env``,
  the ``gym.make`` result (an ``OrderEnforcing`` wrapper) whose ``step`` the runner calls
  (:282, :493); we tap that object. Local runners (train and evaluation) always build an env,
  even with remote runners (:58).
* hook order: training (``_sample_timesteps``, :320-360) fires ``on_episode_step`` on the final
  step too, then ``on_episode_end``, ``on_episode_created``, ``env.reset()``,
  ``on_episode_start``; evaluation (``_sample_episodes``, :415-433) resets the env *before*
  ``on_episode_created``. The recorder's rules hold for both: a reset only replaces the
  set of agents observed on that env index (used to classify later rewards), pending rewards
  are always empty at a reset (every step is followed by a step/end hook, and every
  ``sample()`` by ``on_sample_end``), so no reward changes episode; ``tests/test_recorder.py``
  replays both orders.
* mapping: ``MultiAgentEpisode.agent_episodes[aid].module_id`` plus the private
  ``_agent_to_module_mapping`` (``env/multi_agent_episode.py:184``, filled by ``module_for``
  at :992-1012). ``cut()`` carries the module ids into the continuation chunk (:960-962).
* training data (phase ``learning``): ``sample()`` (:93-163) returns what
  ``_sample_timesteps`` (:165-396) or ``_sample_episodes`` (:398-568) built — a list of
  ``MultiAgentEpisode``: the done episodes plus the finalized chunk of the ongoing one
  (``done_episodes_to_return + ongoing_episodes_to_return``, :396) — and hands that same
  list to ``on_sample_end(env_runner=self, samples=samples)`` (:161) before returning it.
  So ``batch_ends`` is the 2.4x+ one: per agent, ``get_rewards()`` of its
  ``SingleAgentEpisode`` (``single_agent_episode.py:985-1054``; no indices = ``ts=0`` to
  the end, the lookback buffer that ``cut()`` copies into the continuation chunk,
  ``multi_agent_episode.py:931-966``, excluded — ``get_return()`` at :1568-1581 sums the
  same), keyed by ``module_id`` (set by ``module_for`` when the agent's single-agent
  episode is made, ``multi_agent_episode.py:322-325``, and carried by ``cut()``, :960-962).
  Rewards of an agent not yet observed wait in ``_hanging_rewards_begin`` (:510, :593)
  and are in no agent's episode — the same pre-observation rule as the metrics.
  ``finalize(drop_zero_len_single_agent_episodes=True)`` (:764-766) drops agents without a
  step in the chunk (no rewards to lose). Not run, read only: at a cut, a reward held for an
  agent waiting for its next observation (``_hanging_rewards_end``) becomes the successor's
  ``_hanging_rewards_begin`` (:971), which ``add_env_step`` never releases (it pops only
  ``_hanging_rewards_end``, :492), so in a turn-based env such a reward would be in no
  chunk's batch (and no metric). The reference scenarios are simultaneous-move (2.12's PPO
  learner failed on a turn-based env's batches, a ``TypeError`` in ``SampleBatch._slice``),
  so that case is unverified. Frozen modules (``policies_to_train``) are
  sampled like the others: their chunks leave the runner too and are audited; whether the
  learner updates them is not what this phase checks.
* driver side: ``algorithm.workers`` / ``algorithm.evaluation_workers`` (``WorkerSet``),
  ``foreach_worker(fn, local_worker=True)`` (``evaluation/worker_set.py:739-793``).
"""

from __future__ import annotations

import logging
from typing import Any

from ..recorder import RunnerRecorder
from .base import Adapter, _qualname, install_tap
from .newstack import NewStackAdapter
from .oldstack import PATHS_2_1X

logger = logging.getLogger("reward_audit")

class ExperimentalNewStackAdapter(Adapter):
    name = "experimental-new-stack-2.1x"
    api_stack = "new"
    # The driver's ``summarize_episodes`` is the old stack's: same keys, top level and the
    # ``sampler_results/`` copies (same numbers, both shown by Tune).
    iteration_paths = PATHS_2_1X

    # ------------------------------------------------------------- runner side

    # Same MultiAgentEpisode API as the 2.4x+ stack (``_agent_to_module_mapping``: 2.12
    # multi_agent_episode.py:184; ``cut()`` keeps ``id_`` and module ids).
    mapping_of = NewStackAdapter.mapping_of
    episode_id = NewStackAdapter.episode_id
    # ``on_sample_end(samples=...)`` gets the same list of MultiAgentEpisode chunks as on
    # 2.4x+ (2.12 multi_agent_env_runner.py:161, :396; see the change log above).
    batch_ends = NewStackAdapter.batch_ends

    def on_env(self, kwargs: dict) -> RunnerRecorder | None:
        runner = kwargs["env_runner"]
        recorder = self.recorder_for(runner)
        env = getattr(runner, "env", None) or kwargs.get("env")
        if env is None or not hasattr(env, "step"):
            raise TypeError(f"expected the runner's env (a gym wrapper around a MultiAgentEnv), got {type(env).__name__}")
        install_tap(env, recorder, 0)  # 2.12: one env per runner, env_index always 0
        self._wrap_metrics(runner, recorder)
        return recorder

    def _wrap_metrics(self, runner: Any, recorder: RunnerRecorder) -> None:
        if runner.__dict__.get("_reward_audit_metrics_wrapped"):
            return
        original_get_metrics = runner.get_metrics

        def get_metrics(*args: Any, **kwargs: Any) -> Any:
            try:
                # RLlib returns one RolloutMetrics per stored episode, in this order.
                ids = [str(e.id_) for e in runner._done_episodes_for_metrics]
            except Exception:
                ids = []
                recorder.failures += 1
                logger.exception("reward_audit: could not read the episodes get_metrics() will report")
            recorder.metrics_call_begins(ids)
            try:
                metrics = original_get_metrics(*args, **kwargs)
            except BaseException:
                recorder.metrics_call_begins([])  # RLlib's own error: nothing was reported
                recorder.metrics_call_ends()
                raise
            try:
                # Zip: `episode_id=None` takes the next snapshotted id; a length mismatch
                # either way is counted and logged by the recorder.
                for m in metrics:
                    recorder.reported_episode(
                        None,
                        m.episode_reward,
                        agents=None,
                        modules=None,
                        policies=dict(m.agent_rewards),  # {(agent_id, module_id): return}
                    )
            except Exception:
                recorder.failures += 1
                logger.exception("reward_audit: could not record RLlib's per-episode returns (get_metrics() returned %s)", type(metrics).__name__)
            finally:
                recorder.metrics_call_ends()
            return metrics

        runner.get_metrics = get_metrics
        runner.__dict__["_reward_audit_metrics_wrapped"] = True

    # ------------------------------------------------------------- driver side

    def config_summary(self, config: Any) -> dict[str, Any]:
        return {
            "env_runner_cls": _qualname(getattr(config, "env_runner_cls", None)),
            "rollout_fragment_length": config.rollout_fragment_length,
            "batch_mode": getattr(config, "batch_mode", None),
            "num_rollout_workers": config.num_rollout_workers,
            "num_envs_per_worker": config.num_envs_per_worker,
            "evaluation_num_workers": getattr(config, "evaluation_num_workers", None),
            "evaluation_duration": getattr(config, "evaluation_duration", None),
            "evaluation_duration_unit": getattr(config, "evaluation_duration_unit", None),
            "evaluation_parallel_to_training": getattr(config, "evaluation_parallel_to_training", None),
            "evaluation_force_reset_envs_before_iteration": getattr(config, "evaluation_force_reset_envs_before_iteration", None),
            # Train: the driver's episode history, last max(S, new episodes); evaluation: that
            # evaluate() call's episodes (reward_audit/dashboard.py rebuilds it).
            "smoothing_model": "driver_history",
        }
