"""Version adapters: how, for a given Ray version and API stack, to tap the env's raw
rewards and capture RLlib's per-episode returns. All version ``if``s live in ``detect()``.

| Ray | API stack | adapter |
| --- | --- | --- |
| 2.4x – 2.60 | new (``MultiAgentEnvRunner``) | ``newstack.NewStackAdapter`` |
| 2.10 – 2.3x | experimental new (``_enable_new_api_stack=True`` + ``env_runner_cls=MultiAgentEnvRunner``; verified on 2.12 only) | ``experimental.ExperimentalNewStackAdapter`` |
| 2.10 – 2.60 | old (``RolloutWorker`` + ``EnvRunnerV2``; verified on 2.12, 2.53 and 2.60) | ``oldstack.OldStackAdapter`` |

Other families (the 2.1x old stack with ``enable_connectors=False``, i.e. the legacy
sampler; Ray < 2.10) raise ``UnsupportedRayError`` from ``detect()``; the callback then logs the reason once and
records nothing, so training is never affected.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedRayError
from .base import Adapter


def _version_tuple(version: str) -> tuple[int, int]:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def uses_new_stack(config: Any) -> bool:
    flag = getattr(config, "enable_env_runner_and_connector_v2", None)
    if flag is None:  # Ray 2.1x: the env runner class decides how episodes are sampled;
        # `_enable_new_api_stack=True` alone still samples with the old RolloutWorker.
        flag = getattr(config, "uses_new_env_runners", None)
        if flag is None:
            flag = getattr(config, "_enable_new_api_stack", False)
    return bool(flag)


def detect(config: Any, ray_version: str | None = None) -> Adapter:
    """Pick the capture adapter for the installed Ray and the config's API stack."""
    if ray_version is None:
        import ray

        ray_version = ray.__version__
    major_minor = _version_tuple(ray_version)
    new_stack = uses_new_stack(config)
    if new_stack and major_minor >= (2, 40):
        from .newstack import NewStackAdapter

        return NewStackAdapter()
    if new_stack and (2, 10) <= major_minor < (2, 40):
        from .experimental import ExperimentalNewStackAdapter

        return ExperimentalNewStackAdapter()
    if not new_stack and major_minor >= (2, 10):
        # 2.4x+ deprecate the flag (DEPRECATED_VALUE): only an explicit False is the legacy sampler.
        if getattr(config, "enable_connectors", True) is False:
            raise UnsupportedRayError(
                f"Ray {ray_version} old API stack with `enable_connectors=False` (the legacy sampler) has no "
                "reward_audit capture adapter: its reported returns also count the rewards that come with an "
                "agent's first observation. Fix: remove `enable_connectors=False` from the config"
            )
        from .oldstack import OldStackAdapter

        return OldStackAdapter(ray_version)
    stack = "new" if new_stack else "old"
    raise UnsupportedRayError(
        f"Ray {ray_version} with the {stack} API stack has no reward_audit capture adapter yet; "
        "supported: Ray >= 2.10 on either API stack"
    )


def with_audit_callback(config: Any, callback: type) -> Any:
    """``config`` with ``callback`` added to its callbacks (kept, not replaced)."""
    from ray.rllib.algorithms.callbacks import DefaultCallbacks

    existing = getattr(config, "callbacks_class", None)
    if existing is None or existing is DefaultCallbacks:
        return config.callbacks(callback)
    present = existing if isinstance(existing, (list, tuple)) else [existing]
    if any(isinstance(c, type) and issubclass(c, _audit_class()) for c in present):
        return config  # already recording: never twice
    if isinstance(existing, (list, tuple)):  # new stack on Ray >= 2.40 takes a list
        return config.callbacks(callbacks_class=[*existing, callback])
    if uses_new_stack(config) and _version_tuple(__import__("ray").__version__) >= (2, 40):
        return config.callbacks(callbacks_class=[existing, callback])
    from ray.rllib.algorithms.callbacks import make_multi_callbacks

    return config.callbacks(make_multi_callbacks([existing, callback]))


def _audit_class() -> type:
    from ..callback import RewardAuditCallback

    return RewardAuditCallback


__all__ = ["Adapter", "detect", "uses_new_stack", "with_audit_callback"]
