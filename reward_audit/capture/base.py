"""What every capture adapter shares: the raw-reward tap, the runner's recorder, the
driver-side collection, output-dir resolution and the manifest. Version ``if``s do not
live here: an adapter overrides the method whose behaviour differs.
"""

from __future__ import annotations

import datetime as _dt
import logging
from typing import Any, Callable

from .. import __version__
from ..recorder import RunnerRecorder
from ..results import match
from ..schema import MANIFEST_NAME, SCHEMA_VERSION, TOOL_NAME, Kind, Phase

logger = logging.getLogger("reward_audit")

RECORDER_ATTR = "_reward_audit_recorder"


# --------------------------------------------------------------------------- the tap


class _TapTarget:
    """Where a tapped env reports to; updated (not re-wrapped) when RLlib re-creates the runner's env list."""

    __slots__ = ("recorder", "env_index")

    def __init__(self, recorder: RunnerRecorder, env_index: int):
        self.recorder = recorder
        self.env_index = env_index


def install_tap(env: Any, recorder: RunnerRecorder, env_index: int) -> None:
    """Wrap ``env.step`` / ``env.reset`` as instance attributes on the object RLlib steps.

    The user's own wrappers (reward shaping) are outside ``env`` and so part of the truth,
    as they are for RLlib. A tap never raises: a failure is logged and the env's own
    result is returned unchanged.
    """
    target = env.__dict__.get("_reward_audit_tap")
    if target is not None:
        target.recorder, target.env_index = recorder, env_index
        return
    target = _TapTarget(recorder, env_index)
    original_step, original_reset = env.step, env.reset

    def step(*args: Any, **kwargs: Any) -> Any:
        result = original_step(*args, **kwargs)
        try:
            # (obs, rewards, terminateds, truncateds, infos): the done flags release held rewards.
            target.recorder.tap_step(target.env_index, *(result[:4] if len(result) == 5 else result[:2]))
        except Exception:
            target.recorder.failures += 1
            logger.exception("reward_audit: the reward tap failed on env %d; this step's rewards are NOT recorded", target.env_index)
        return result

    def reset(*args: Any, **kwargs: Any) -> Any:
        result = original_reset(*args, **kwargs)
        try:
            target.recorder.tap_reset(target.env_index, result[0])
        except Exception:
            target.recorder.failures += 1
            logger.exception("reward_audit: the reset tap failed on env %d", target.env_index)
        return result

    env.step = step
    env.reset = reset
    env.__dict__["_reward_audit_tap"] = target


def runner_in(kwargs: dict) -> Any:
    """The env runner a runner-side hook was called for: ``env_runner`` (new stack) or
    ``worker`` (old stack's ``RolloutWorker``)."""
    return kwargs.get("env_runner") or kwargs.get("worker")


def drain_runner(runner: Any) -> dict | None:
    """Run on every env runner (``foreach_env_runner``): hand over and forget its rows."""
    recorder = getattr(runner, RECORDER_ATTR, None)
    return None if recorder is None else recorder.drain()


def _qualname(fn: Any) -> str | None:
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


class Adapter:
    """The interface every capture adapter implements (see ``capture/__init__.py``)."""

    name = "base"
    api_stack = "new"
    # (path prefix or exact path, kind, semantics); a prefix ending in "/" takes the key after it.
    iteration_paths: tuple[tuple[str, Kind, str], ...] = ()

    # ------------------------------------------------------------- runner side

    def runner_phase_and_index(self, runner: Any) -> tuple[Phase, int]:
        config = runner.config
        phase = Phase.EVALUATION if getattr(config, "in_evaluation", False) else Phase.TRAIN
        return phase, int(getattr(runner, "worker_index", 0) or 0)

    def recorder_for(self, runner: Any) -> RunnerRecorder:
        recorder = getattr(runner, RECORDER_ATTR, None)
        if recorder is None:
            phase, index = self.runner_phase_and_index(runner)
            recorder = RunnerRecorder(phase, index, self.mapping_of)
            setattr(runner, RECORDER_ATTR, recorder)
        return recorder

    def mapping_of(self, episode: Any) -> dict:
        raise NotImplementedError

    def episode_id(self, episode: Any, recorder: RunnerRecorder) -> str:
        raise NotImplementedError

    def on_env(self, kwargs: dict) -> RunnerRecorder | None:
        """``on_environment_created`` / ``on_sub_environment_created``: install taps and capture."""
        raise NotImplementedError

    def on_episode(self, kwargs: dict, action: str) -> None:
        """``on_episode_created`` / ``_start`` (``begin``), ``on_episode_step`` (``step``),
        ``on_episode_end`` (``end``): attribute the tapped rewards to the episode."""
        recorder = self.recorder_for(runner_in(kwargs))
        episode, env_index = kwargs["episode"], int(kwargs.get("env_index") or 0)
        if not self.is_episode(episode):
            return
        episode_id = self.episode_id(episode, recorder)
        if action == "begin":
            recorder.episode_begins(episode_id, env_index, episode)
        elif action == "step":
            recorder.episode_step(episode_id, env_index, episode)
        else:
            recorder.episode_ends(episode_id, env_index, episode)
            self.reported_at_episode_end(recorder, episode)

    def is_episode(self, episode: Any) -> bool:
        """False for what a hook passes instead of an episode (old stack: a sub-env's exception)."""
        return True

    def reported_at_episode_end(self, recorder: RunnerRecorder, episode: Any) -> None:
        """Old stack only: RLlib's per-episode values are read in ``on_episode_end``."""

    def sample_ends(self, recorder: RunnerRecorder) -> None:
        """``on_sample_end``: cut the episodes touched in this ``sample()`` call into chunk rows."""
        recorder.sample_ends()

    def batch_ends(self, recorder: RunnerRecorder, samples: Any) -> None:
        """``on_sample_end``: record per (episode, agent, module) the rewards in ``samples``,
        the data this ``sample()`` call hands to training (``batch_rewards``)."""

    def install_fault(self, runner: Any, fault: str) -> None:
        """Self-test: corrupt RLlib's per-episode metrics on ``runner`` (``capture/inject.py``)."""
        raise NotImplementedError(f"fault injection is not available for the {self.name} adapter")

    # ------------------------------------------------------------- driver side

    def runner_groups(self, algorithm: Any) -> list[tuple[Any, Phase]]:
        """(train, evaluation) runner groups: ``env_runner_group`` / ``eval_env_runner_group``
        (2.4x+) or ``workers`` / ``evaluation_workers`` (2.1x). Looked up in the instance's
        own attributes: on 2.4x+ ``workers`` is a deprecated property that raises or warns."""
        own = vars(algorithm)
        names = ("env_runner_group", "eval_env_runner_group") if "env_runner_group" in own else ("workers", "evaluation_workers")
        return [(own[name], phase) for name, phase in zip(names, (Phase.TRAIN, Phase.EVALUATION)) if own.get(name) is not None]

    def foreach_runner(self, group: Any, fn: Callable[[Any], Any]) -> list:
        if hasattr(group, "foreach_env_runner"):  # EnvRunnerGroup (2.4x+)
            return group.foreach_env_runner(fn, local_env_runner=True)
        # WorkerSet (2.1x): healthy_only defaults to False there; a dead worker would raise.
        return group.foreach_worker(fn, local_worker=True, healthy_only=True)

    def trial_dir(self, algorithm: Any) -> tuple[str, Any] | None:
        """``(path, pyarrow filesystem)`` of Tune's trial dir (``algorithm._storage``, Ray
        2.7+), or None outside Tune. (``algorithm.logdir`` is a scratch dir under Tune.)"""
        storage = getattr(algorithm, "_storage", None)
        path = getattr(storage, "trial_fs_path", None) if storage is not None else None
        return (str(path).rstrip("/"), storage.storage_filesystem) if path else None

    def log_dir(self, algorithm: Any) -> str:
        return algorithm.logdir

    def training_iteration(self, algorithm: Any, result: dict | None = None) -> int:
        """RLlib's ``training_iteration`` of ``result``, else the algorithm's count so far."""
        if result is not None and "training_iteration" in result:
            return int(result["training_iteration"])
        return int(algorithm.iteration)

    def config_summary(self, config: Any) -> dict[str, Any]:
        raise NotImplementedError

    def manifest(self, algorithm: Any) -> dict[str, Any]:
        import ray

        config = algorithm.config
        env = getattr(config, "env", None)
        return {
            "tool": TOOL_NAME,
            "schema_version": SCHEMA_VERSION,
            "reward_audit_version": __version__,
            "ray_version": ray.__version__,
            "api_stack": self.api_stack,
            "adapter": self.name,
            "algorithm": type(algorithm).__name__,
            "env": env if isinstance(env, str) or env is None else _qualname(env),
            "policies": sorted(str(p) for p in (getattr(config, "policies", None) or {})),
            "policies_to_train": None
            if getattr(config, "policies_to_train", None) is None or callable(config.policies_to_train)
            else sorted(str(p) for p in config.policies_to_train),
            "policy_mapping_fn": _qualname(getattr(config, "policy_mapping_fn", None)),
            "metrics_num_episodes_for_smoothing": getattr(config, "metrics_num_episodes_for_smoothing", None),
            "evaluation_interval": getattr(config, "evaluation_interval", None),
            "iteration_semantics": {p: s for p, _, s in self.iteration_paths},
            "iteration_paths": [[p, k.value, s] for p, k, s in self.iteration_paths],
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **self.config_summary(config),
        }

    def iteration_rows(self, result: dict, iteration: int) -> list[dict]:
        """The dashboard numbers of one ``train()`` result (what Tune / TensorBoard show)."""
        return match(result, iteration, self.iteration_paths)


__all__ = ["Adapter", "install_tap", "drain_runner", "runner_in", "MANIFEST_NAME", "RECORDER_ATTR"]
