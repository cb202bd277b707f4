"""``RewardAuditCallback``: the only RLlib-facing class users touch.

    from reward_audit import RewardAuditCallback
    config = PPOConfig().environment(MyEnv).multi_agent(...).callbacks(RewardAuditCallback)

It is thin: every hook hands its arguments to the capture adapter (``capture/``, which owns
every piece of Ray knowledge) and to the driver-side collector (``collector.py``, which owns
where the data goes). It never raises into training: a failure inside reward_audit is
logged loudly (``logging.getLogger("reward_audit")``, ERROR with traceback), counted in the
run's manifest (``capture_failures`` on env runners, ``driver_failures`` on the driver),
and training continues.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

try:  # Ray 2.40+: the callback base class of both API stacks
    from ray.rllib.callbacks.callbacks import RLlibCallback as _Base
except ImportError:  # Ray 2.1x
    from ray.rllib.algorithms.callbacks import DefaultCallbacks as _Base

from .capture import detect
from .capture.base import RECORDER_ATTR, Adapter, drain_runner, runner_in
from .collector import Collector
from .errors import UnsupportedRayError
from .schema import Phase

logger = logging.getLogger("reward_audit")


def _never_raise(hook: Callable) -> Callable:
    """Our part of a hook never raises into training; then the next class's hook in the MRO
    runs (``super()``), so ``class Mine(RewardAuditCallback, TheirCallback)`` keeps theirs."""

    @functools.wraps(hook)
    def guarded(self: "RewardAuditCallback", *args: Any, **kwargs: Any) -> None:
        if not self._disabled:
            try:
                hook(self, *args, **kwargs)
            except Exception:
                runner = runner_in(kwargs)
                recorder = getattr(runner, RECORDER_ATTR, None) if runner is not None else None
                if recorder is not None:
                    recorder.failures += 1
                else:
                    self._failures += 1
                    try:
                        if self._collector is not None:
                            self._collector.failed()
                    except Exception:
                        pass
                logger.exception("reward_audit: %s failed; training continues but this run's audit may be incomplete", hook.__name__)
        parent = getattr(super(RewardAuditCallback, self), hook.__name__, None)
        if parent is not None:
            parent(*args, **kwargs)

    return guarded


class RewardAuditCallback(_Base):
    """Records the env's raw per-agent rewards and RLlib's reported returns to Parquet.

    After training, ``reward-audit compare <trial dir>`` prints, per phase, module and agent::

        phase  kind    key  episodes  truth    reported  diff  verdict
        train  module  p0   12        30.000   30.000    0     CLEAN
    """

    #: Base folder or URI for the audit data; set through ``writing_to`` / ``configured``.
    OUTPUT: str | None = None
    #: Self-test only: ``"leak"``, ``"drop"`` or ``"mismatch"`` corrupts RLlib's metrics;
    #: ``"signal"`` moves one agent's rewards into another module's training data.
    INJECT_FAULT: str | None = None

    @classmethod
    def configured(cls, output: str | None = None, *, inject_fault: str | None = None) -> type["RewardAuditCallback"]:
        """A subclass with options baked in as class attributes.

        ``output``: base folder or ``pyarrow.fs`` URI. ``inject_fault``: deliberately corrupt
        RLlib's per-episode metrics like Ray 2.12 (``"leak"``) or 2.53 (``"drop"``) did, to
        prove a pipeline catches it (see ``capture/inject.py``). Built at runtime with a
        local qualified name, so cloudpickle ships it to remote actors by value.
        """
        attrs = {"OUTPUT": None if output is None else str(output), "INJECT_FAULT": inject_fault, "__module__": cls.__module__}
        configured = type(cls.__name__, (cls,), attrs)
        configured.__qualname__ = f"{cls.__qualname__}.configured.<locals>.{cls.__name__}"
        return configured

    @classmethod
    def writing_to(cls, path_or_uri: str) -> type["RewardAuditCallback"]:
        """A subclass that writes under ``path_or_uri`` (local path or ``pyarrow.fs`` URI)."""
        return cls.configured(path_or_uri, inject_fault=cls.INJECT_FAULT)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._adapter: Adapter | None = None
        self._collector: Collector | None = None
        self._disabled = False
        self._failures = 0

    # ------------------------------------------------------------------ helpers

    def _adapter_for(self, config: Any) -> Adapter | None:
        if self._adapter is None:
            try:
                self._adapter = detect(config)
            except UnsupportedRayError as e:
                logger.error("reward_audit: %s; nothing will be recorded", e)
                self._disabled = True
                return None
        return self._adapter

    def _runner_recorder(self, kwargs: dict) -> Any:
        runner = runner_in(kwargs)
        adapter = self._adapter_for(runner.config)
        return adapter, (adapter.recorder_for(runner) if adapter else None)

    # ------------------------------------------------------------------ driver hooks

    @_never_raise
    def on_algorithm_init(self, *, algorithm: Any, **kwargs: Any) -> None:
        adapter = self._adapter_for(algorithm.config)
        if adapter is not None:
            self._collector = Collector(adapter, algorithm, self.OUTPUT, {"injected_fault": self.INJECT_FAULT})

    @_never_raise
    def on_train_result(self, *, algorithm: Any, result: dict, **kwargs: Any) -> None:
        if self._collector is None:  # e.g. restored from a checkpoint without on_algorithm_init
            self.on_algorithm_init(algorithm=algorithm)
        if self._collector is None:
            # Nowhere to write (logged above): drain anyway so runners never grow without bound.
            if self._adapter is not None:
                dropped = sum(
                    len(r["raw_rewards"]) for group, _ in self._adapter.runner_groups(algorithm) for r in self._adapter.foreach_runner(group, drain_runner) if r
                )
                logger.error("reward_audit: no output folder; dropped %d raw reward rows of iteration %s", dropped, result.get("training_iteration"))
            return
        iteration = self._collector.next_iteration(self._adapter.training_iteration(algorithm, result))
        self._collector.collect(algorithm, iteration, (Phase.TRAIN, Phase.EVALUATION))
        self._collector.record_result(result, iteration)

    @_never_raise
    def on_evaluate_end(self, *, algorithm: Any, **kwargs: Any) -> None:
        if self._collector is not None:
            # Inside train() this is the iteration whose result will carry the evaluation.
            self._collector.collect(algorithm, self._collector.iteration + 1, (Phase.EVALUATION,))

    # ------------------------------------------------------------------ runner hooks

    def _env_created(self, kwargs: dict) -> None:
        runner = runner_in(kwargs)
        adapter = self._adapter_for(runner.config)
        if adapter is not None:
            adapter.on_env(kwargs)
            if self.INJECT_FAULT:  # not supported on the old stack: raises, and the guard logs it
                adapter.install_fault(runner, self.INJECT_FAULT)

    @_never_raise
    def on_environment_created(self, **kwargs: Any) -> None:
        self._env_created(kwargs)

    @_never_raise
    def on_sub_environment_created(self, **kwargs: Any) -> None:
        self._env_created(kwargs)

    def _episode_hook(self, kwargs: dict, action: str) -> None:
        adapter, recorder = self._runner_recorder(kwargs)
        if recorder is not None:
            adapter.on_episode(kwargs, action)

    @_never_raise
    def on_episode_created(self, **kwargs: Any) -> None:
        self._episode_hook(kwargs, "begin")

    @_never_raise
    def on_episode_start(self, **kwargs: Any) -> None:
        self._episode_hook(kwargs, "begin")

    @_never_raise
    def on_episode_step(self, **kwargs: Any) -> None:
        self._episode_hook(kwargs, "step")

    @_never_raise
    def on_episode_end(self, **kwargs: Any) -> None:
        self._episode_hook(kwargs, "end")

    @_never_raise
    def on_sample_end(self, **kwargs: Any) -> None:
        adapter, recorder = self._runner_recorder(kwargs)
        if recorder is not None:
            if recorder.phase == Phase.TRAIN.value:  # only training data is audited (phase `learning`)
                try:
                    adapter.batch_ends(recorder, kwargs.get("samples"))
                except Exception:  # the raw rows below must still be cut
                    recorder.failures += 1
                    logger.exception("reward_audit: could not read the rewards of this sample() call's training data")
            adapter.sample_ends(recorder)


def add_to(config: Any, output: str | None = None, *, inject_fault: str | None = None) -> Any:
    """``config`` with the audit added to the callbacks it already has (never replacing
    them, never added twice): the list form on the new stack (Ray 2.40+), else
    ``make_multi_callbacks``. ``output`` / ``inject_fault`` as in ``configured``.

        config = reward_audit.add_to(PPOConfig().environment(...).callbacks(MyCallback))
    """
    from .capture import with_audit_callback

    callback = RewardAuditCallback if output is None and inject_fault is None else RewardAuditCallback.configured(output, inject_fault=inject_fault)
    return with_audit_callback(config, callback)

