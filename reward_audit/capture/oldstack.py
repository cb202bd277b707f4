"""Capture adapter: RLlib's old API stack (``RolloutWorker`` + ``EnvRunnerV2`` / ``EpisodeV2``),
Ray 2.10 – 2.60. The default stack on Ray 2.12; on 2.4x+ selected with
``.api_stack(enable_rl_module_and_learner=False, enable_env_runner_and_connector_v2=False)``.

Arithmetic (for the rounding bound, docs/verdicts.md): ``EpisodeV2`` adds each reward to
``agent_rewards[(agent, policy)]`` and ``total_reward`` with ``+=`` (episode_v2.py:234-235 in 2.60
and 2.12), in the rewards' own type.

Change log — what the numbers meant, per Ray version (line numbers: 2.60 / 2.12 installed
source; the logic is identical in 2.12, 2.53 and 2.60):

* per-episode values (``EnvRunnerV2`` / ``EpisodeV2`` since Ray PR #25922, the default with
  connectors): ``EpisodeV2.agent_rewards`` (``{(agent_id, policy_id): return}``,
  original agent-id type) and ``EpisodeV2.total_reward`` are summed in
  ``add_action_reward_done_next_obs`` (``evaluation/episode_v2.py:235`` / ``:234``).
  ``EnvRunnerV2._handle_done_episode`` copies exactly these two into ``RolloutMetrics``
  (``evaluation/env_runner_v2.py:416`` / ``:434``) *before* ``end_episode()`` fires
  ``on_episode_end`` (``:828`` / ``:846``), so we read them there and they are the numbers
  the driver summarizes. Never chunked (an ``EpisodeV2`` lives across ``sample()`` calls):
  ``metrics_call`` is -1.
* counted rewards: the reward that arrives with an agent's first observation goes to
  ``add_init_obs`` and is dropped (``env_runner_v2.py:628`` / ``:646``); an agent whose first
  observation comes with ``done`` is skipped (``:534`` / ``:552``); rewards of agents
  without an observation are held in ``_MultiAgentEnvState.last_rewards`` and released with
  their next observation or at episode end (2.60 ``env/multi_agent_env.py:725-755``). So the
  values are ``episode_sum_counted`` (docs/ray_versions.md), on every version. All versions
  clean on every scenario tried, shared policies included (docs/ray_versions.md).
* reward clipping: with ``clip_rewards`` (``True`` -> sign, a float -> limit) or an Atari env
  (Ray PR #31092), the agent connector ``ClipRewardAgentConnector`` rewrites the reward
  *before* it reaches ``agent_rewards`` (2.60 ``connectors/util.py:41-58``), so every
  reported return, and the dashboards, are sums of clipped rewards (seen on 2.60:
  ``episode_reward_mean`` 60.0 where the env paid 315.4 per episode). RLlib documents
  clipping as a postprocessing step; the dashboards do not show what the env paid. The tap
  then also sums the clipped counted rewards (``reward_clipped``), and the audit shows each
  such value as MISMATCH, explained per episode as "reported = Σ clip(r)". Quirk: an
  ``int`` ``clip_rewards`` (e.g. ``1``) clips nothing.
* episode ids: ``EpisodeV2.episode_id = random.randrange(1e18)`` from Python's global
  ``random`` (``episode_v2.py:48`` / ``:47``); with ``config.seed`` every worker re-seeds it,
  so ids repeat across runs and after an actor restart. We key episodes by
  ``<runner_id>:<episode_id>`` (the runner id holds a uuid per incarnation).
* mapping: the ``(agent, policy)`` keys of ``agent_rewards``, then the private
  ``EpisodeV2._agent_to_policy`` for agents without a counted reward, read only.
  ``episode.policy_for()`` is never called: it would force the mapping fn.
* hook order (2.60 ``env_runner_v2.py:322-386``, ``:787-875``): ``poll()``, then per env index
  ``on_episode_start`` (first obs, after reset) or ``on_episode_step`` (also on the final
  step); when done ``on_episode_end``, ``on_episode_created`` (new episode), ``try_reset``,
  ``on_episode_start``; then actions are sent, i.e. ``env.step()`` runs *after* the step's
  hooks. At ``on_sample_end`` (``rollout_worker.py:684`` / ``:723``; kwargs ``worker``,
  ``samples``) each env has therefore taken one step RLlib has not processed yet: its
  rewards enter ``agent_rewards`` and the batch in the *next* ``sample()`` call. We keep
  that step pending (``sample_ends``), so a chunk is exactly the steps RLlib processed in
  one ``sample()`` call, and an episode whose final ``env.step()`` ran just before
  ``on_sample_end`` still gets its ``episode_done`` row with ``on_episode_end`` (filing it
  in the earlier chunk left such episodes without any done row: seen with
  ``episode_len=17``, ``rollout_fragment_length=16``).
* dashboards (``evaluation/metrics.py`` ``summarize_episodes``): ``policy_reward_mean/<pid>``
  is the mean over (agent, episode) entries, so a policy shared by k agents shows the
  per-agent mean (``metrics.py:183`` / ``:191``); ``episode_reward_*`` over episodes. Smoothed
  on the driver over the last ``max(S, n_new)`` episodes (S =
  ``metrics_num_episodes_for_smoothing``); evaluation summarizes one ``evaluate()`` call.
  Keys: 2.12 top level and again under ``sampler_results/``; 2.53/2.60 under
  ``env_runners/``, with ``episode_return_*`` as an alias of ``episode_reward_*``.
  Quirk (2.12 – 2.60, Ray issue #46412): remote evaluation runners are sampled
  asynchronously and, once enough results are in, one request is left in flight; the next
  ``evaluate()`` drops its result as stale but counts it toward ``evaluation_duration``. Its
  episode is reported by its runner, so we capture it, but no dashboard ever shows it, and
  evaluation shows fewer episodes than ``evaluation_duration`` (1 instead of 2, seen).
* raw rewards: ``on_sub_environment_created`` gets the object ``MultiAgentEnvWrapper.envs[i]``
  steps; ``i`` = ``env_context.vector_index`` (the ``env_index`` kwarg is never passed). It
  fires again for a restarted sub-env (``restart_failed_sub_environments``): we tap the new
  object. With ``remote_worker_envs=True`` RLlib steps Ray actors we cannot tap, and the
  hook fires only for the local ``RolloutWorker.env``, which is never stepped
  (``MultiAgentEnv.to_base_env`` builds ``RemoteBaseEnv`` without ``worker``, so its
  per-actor hook call is skipped; seen on 2.60, same code in 2.12); it passes an
  ``ActorHandle`` only when the env creator itself returns actors. Either way we tap
  nothing and the run is UNVERIFIED for raw rewards. (2.60 also refuses an env *class* with
  ``remote_worker_envs``: it checks the version of the ``gym`` package; register a creator.)
* driver: 2.12 ``algorithm.workers`` / ``algorithm.evaluation_workers`` (``WorkerSet``,
  ``foreach_worker(fn, local_worker=True)``); 2.4x+ ``algorithm.env_runner_group`` /
  ``eval_env_runner_group`` (``foreach_env_runner``; ``algorithm.workers`` raises there).
* not supported: Ray 2.1x with ``enable_connectors=False`` (the legacy ``_env_runner``
  sampler counts the rewards that come with the first observation, and fires
  ``on_episode_end`` before it copies ``agent_rewards``); ``detect()`` refuses it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..recorder import RunnerRecorder, _bits, clip_function
from ..schema import IterationSemantics as S
from ..schema import Kind
from .base import Adapter, install_tap, runner_in

logger = logging.getLogger("reward_audit")


def _paths(prefix: str) -> tuple[tuple[str, Kind, str], ...]:
    return (
        (f"{prefix}policy_reward_mean/", Kind.POLICY, S.MEAN_OF_AGENT_EPISODES.value),
        (f"{prefix}policy_reward_min/", Kind.POLICY, S.MIN_OF_AGENT_EPISODES.value),
        (f"{prefix}policy_reward_max/", Kind.POLICY, S.MAX_OF_AGENT_EPISODES.value),
        (f"{prefix}episode_reward_mean", Kind.EPISODE, S.MEAN_OF_EPISODE_SUMS.value),
        (f"{prefix}episode_reward_min", Kind.EPISODE, S.MIN_OF_EPISODE_SUMS.value),
        (f"{prefix}episode_reward_max", Kind.EPISODE, S.MAX_OF_EPISODE_SUMS.value),
    )


# Ray 2.4x – 2.60: under env_runners/ (+ the episode_return_* alias).
PATHS_ENV_RUNNERS = _paths("env_runners/") + (
    ("env_runners/episode_return_mean", Kind.EPISODE, S.MEAN_OF_EPISODE_SUMS.value),
    ("env_runners/episode_return_min", Kind.EPISODE, S.MIN_OF_EPISODE_SUMS.value),
    ("env_runners/episode_return_max", Kind.EPISODE, S.MAX_OF_EPISODE_SUMS.value),
)
# Ray 2.1x: top level, and the same numbers again under sampler_results/.
PATHS_2_1X = _paths("") + _paths("sampler_results/")


def _clip_setting(config: Any) -> Any:
    """What RLlib's ``ClipRewardAgentConnector`` does to rewards (``connectors/util.py``):
    ``True`` (or an Atari env with ``clip_rewards`` unset) -> sign, a float -> that limit,
    else nothing. Reads ``_is_atari`` instead of the ``is_atari`` property, which may build
    the env."""
    clip = getattr(config, "clip_rewards", None)
    if clip is None and getattr(config, "_is_atari", None):
        clip = True
    return clip if (clip is True or type(clip) is float) else None


class OldStackAdapter(Adapter):
    name = "old-stack"
    api_stack = "old"

    def __init__(self, ray_version: str = "2.60.0"):
        from . import _version_tuple

        self.ray_version = _version_tuple(ray_version)
        if self.ray_version >= (2, 40):
            self.iteration_paths = PATHS_ENV_RUNNERS
        elif self.ray_version < (2, 13):
            self.iteration_paths = PATHS_2_1X
        else:  # not verified in between: match both key sets
            self.iteration_paths = PATHS_2_1X + PATHS_ENV_RUNNERS
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # ------------------------------------------------------------- runner side

    def mapping_of(self, episode: Any) -> dict:
        mapping: dict = {}
        # list(): agent_rewards is a defaultdict; iterate a copy and never index it.
        for aid, pid in list(episode.agent_rewards.keys()):
            mapping.setdefault(aid, pid)
        # Agents mapped but without a counted reward yet (private; read, never forced).
        for aid, pid in dict(getattr(episode, "_agent_to_policy", None) or {}).items():
            mapping.setdefault(aid, pid)
        return mapping

    def is_episode(self, episode: Any) -> bool:
        return not isinstance(episode, Exception)  # a faulty sub-env (``restart_failed_sub_environments``)

    def episode_id(self, episode: Any, recorder: RunnerRecorder) -> str:
        return f"{recorder.runner_id}:{episode.episode_id}"

    def on_env(self, kwargs: dict) -> RunnerRecorder | None:
        import ray

        worker, sub_env = kwargs["worker"], kwargs["sub_environment"]
        recorder = self.recorder_for(worker)
        context = kwargs.get("env_context")
        index = getattr(context, "vector_index", None)
        if index is None:
            index = kwargs.get("env_index") or 0
        remote_envs = bool(getattr(getattr(worker, "config", None), "remote_worker_envs", False))
        if remote_envs or isinstance(sub_env, ray.actor.ActorHandle):
            self._warn_once(
                "remote_env",
                "reward_audit: env runner %s steps its sub-environments as Ray actors "
                "(`remote_worker_envs=True`); their rewards cannot be tapped, so this run is "
                "UNVERIFIED for raw rewards. Fix: set `remote_worker_envs=False`",
                recorder.runner_id,
            )
            return recorder
        recorder.clip = clip_function(_clip_setting(getattr(worker, "config", None)))
        install_tap(sub_env, recorder, int(index))
        return recorder

    def reported_at_episode_end(self, recorder: RunnerRecorder, episode: Any) -> None:
        config = getattr(getattr(episode, "worker", None), "config", None)
        if config is not None and _clip_setting(config) is not None:
            self._warn_once(
                "clip",
                "reward_audit: `clip_rewards` is on (or the env is Atari): RLlib counts clipped rewards, so "
                "its reported returns and dashboards are not what the env paid; the audit will show it "
                "(MISMATCH, reported = Σ clip(r))",
            )
        policies = {(aid, pid): float(value) for (aid, pid), value in list(episode.agent_rewards.items())}
        recorder.reported_episode(
            self.episode_id(episode, recorder),
            float(episode.total_reward),
            agents=None,
            modules=None,
            policies=policies,
            metrics_call=-1,
        )

    def on_episode(self, kwargs: dict, action: str) -> None:
        super().on_episode(kwargs, action)
        episode = kwargs["episode"]
        if action == "step" or not self.is_episode(episode):
            return
        # Keep a reference to the episode's {agent id: agent_index} (private, read only; filled
        # by ``EpisodeV2.agent_index()``) to name the agents of the batch's `agent_index` column.
        recorder = self.recorder_for(runner_in(kwargs))
        agents = getattr(episode, "_agent_to_index", None)
        if agents is not None:
            recorder.agent_indices[self.episode_id(episode, recorder)] = [agents, action == "end"]

    def batch_ends(self, recorder: RunnerRecorder, samples: Any) -> None:
        """``samples`` is the ``MultiAgentBatch`` (or ``SampleBatch``) ``sample()`` returns
        (2.60 ``rollout_worker.py:682-684``): per policy, one row per agent step with
        ``rewards``, ``eps_id`` and ``agent_index`` (``env_runner_v2.py:545, 594, 770``:
        ``episode.agent_index(agent_id)``). Grouped per (eps_id, agent_index) with numpy; the
        agent is named from the episode's index map, else recorded as ``#<agent_index>``.

        The same code in 2.12 and 2.53 (line numbers 2.12 / 2.53 / 2.60):
        ``on_sample_end(worker=self, samples=batch)`` right after ``concat_samples``
        (``rollout_worker.py:721-723`` / ``:706-708`` / ``:682-684``); the ``agent_index``
        column (``env_runner_v2.py:563, 612, 788`` / ``:545, 594, 770`` / same); the index map
        (``episode_v2.py:87, 144-158`` / ``:88, 145-159`` / same); float32 rewards
        (``collectors/agent_collector.py:30``, all three). Verified by real runs on 2.12.0,
        2.53.0 and 2.60.0 (``tests/versions/``): ``learning`` CLEAN, shared policies included."""
        batches = getattr(samples, "policy_batches", None)
        if batches is None:
            batches = {} if samples is None else {"default_policy": samples}
        sums = []
        for pid, batch in batches.items():
            if not len(batch) or "rewards" not in batch or "eps_id" not in batch or "agent_index" not in batch:
                continue
            keys = np.stack([np.asarray(batch["eps_id"], np.int64), np.asarray(batch["agent_index"], np.int64)], axis=1)
            pairs, inverse = np.unique(keys, axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
            rewards = np.asarray(batch["rewards"])
            bits = _bits(rewards)
            total = np.bincount(inverse, weights=rewards.astype(np.float64, copy=False), minlength=len(pairs))
            count = np.bincount(inverse, minlength=len(pairs))
            for (eps, index), r, n in zip(pairs.tolist(), total.tolist(), count.tolist()):
                episode_id = f"{recorder.runner_id}:{eps}"
                known = recorder.agent_indices.get(episode_id)
                names = {i: a for a, i in known[0].items()} if known else {}
                sums.append((episode_id, names.get(index, f"#{index}"), pid, r, n, bits))
        recorder.batch_rewards(sums)
        for episode_id in [e for e, (_, ended) in recorder.agent_indices.items() if ended]:
            del recorder.agent_indices[episode_id]

    def sample_ends(self, recorder: RunnerRecorder) -> None:
        # The step each env took after RLlib's last poll belongs to the next sample() call
        # (module docstring): hold it back from this call's chunk rows.
        recorder.sample_ends(hold_pending=True)

    # ------------------------------------------------------------- driver side

    def config_summary(self, config: Any) -> dict[str, Any]:
        def first(*names: str) -> Any:
            for name in names:
                value = getattr(config, name, None)
                if value is not None:
                    return value
            return None

        return {
            "rollout_fragment_length": config.rollout_fragment_length,
            "batch_mode": getattr(config, "batch_mode", None),
            "num_env_runners": first("num_env_runners", "num_rollout_workers"),
            "num_envs_per_env_runner": first("num_envs_per_env_runner", "num_envs_per_worker"),
            "remote_worker_envs": getattr(config, "remote_worker_envs", None),
            "clip_rewards": getattr(config, "clip_rewards", None),
            "evaluation_num_env_runners": first("evaluation_num_env_runners", "evaluation_num_workers"),
            "evaluation_duration": getattr(config, "evaluation_duration", None),
            "evaluation_duration_unit": getattr(config, "evaluation_duration_unit", None),
            "evaluation_parallel_to_training": getattr(config, "evaluation_parallel_to_training", None),
            # Driver history: the last max(S, n_new) episodes; evaluation: that evaluate() call's.
            "smoothing_model": "driver_history",
        }
