"""Version adapters: how, for a given Ray version and API stack, to tap the env's raw
rewards and capture RLlib's per-episode returns. All version ``if``s live in ``detect()``.

| Ray | API stack | adapter |
| --- | --- | --- |
| 2.4x – 2.60 | new (``MultiAgentEnvRunner``) | ``newstack.NewStackAdapter`` |

Other families (the 2.1x experimental new stack, the old RolloutWorker stack) raise
``UnsupportedRayError`` from ``detect()``; the callback then logs the reason once and
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
    if flag is None:  # Ray 2.1x
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
    stack = "new" if new_stack else "old"
    raise UnsupportedRayError(
        f"Ray {ray_version} with the {stack} API stack has no reward_audit capture adapter yet; "
        "supported: Ray >= 2.40 on the new API stack"
    )


__all__ = ["Adapter", "detect", "uses_new_stack"]
