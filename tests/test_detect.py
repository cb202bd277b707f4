"""capture.detect(): which adapter records a given Ray version and API stack (no Ray needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from reward_audit.capture import detect, uses_new_stack
from reward_audit.capture.experimental import ExperimentalNewStackAdapter
from reward_audit.capture.newstack import NewStackAdapter
from reward_audit.errors import UnsupportedRayError

# Ray 2.1x configs have no `enable_env_runner_and_connector_v2`; the env runner class decides.
RAY212_NEW = SimpleNamespace(_enable_new_api_stack=True, uses_new_env_runners=True)  # + env_runner_cls=MultiAgentEnvRunner
RAY212_HYBRID = SimpleNamespace(_enable_new_api_stack=True, uses_new_env_runners=False)  # RLModules, RolloutWorker sampling
RAY260_NEW = SimpleNamespace(enable_env_runner_and_connector_v2=True)


@pytest.mark.parametrize(
    "version, config, adapter",
    [
        ("2.12.0", RAY212_NEW, ExperimentalNewStackAdapter),
        ("2.10.0", RAY212_NEW, ExperimentalNewStackAdapter),
        ("2.39.1", RAY212_NEW, ExperimentalNewStackAdapter),
        ("2.40.0", RAY260_NEW, NewStackAdapter),
        ("2.60.0", RAY260_NEW, NewStackAdapter),
    ],
)
def test_new_stack_routing(version, config, adapter):
    assert type(detect(config, version)) is adapter


def test_ray212_new_api_stack_flag_alone_samples_with_the_old_stack():
    assert uses_new_stack(RAY212_NEW) is True
    assert uses_new_stack(RAY212_HYBRID) is False
    assert not isinstance(detect(RAY212_HYBRID, "2.12.0"), ExperimentalNewStackAdapter)


def test_new_stack_before_2_10_is_unsupported():
    with pytest.raises(UnsupportedRayError, match="Ray 2.9.3 with the new API stack"):
        detect(RAY212_NEW, "2.9.3")
