"""reward_audit: is what RLlib reports per agent / module what the env actually paid?

    config.callbacks(RewardAuditCallback)          # record (needs ray[rllib])
    audit = reward_audit.compare("<trial dir>")    # reconcile (no Ray needed)
    reward_audit.assert_no_leakage("<trial dir>")  # fail a CI build

Only ``RewardAuditCallback`` imports Ray, lazily, so auditing a run folder copied from a
cluster works without Ray installed.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .audit import Audit, Finding, Verdict  # noqa: E402
from .compare import compare  # noqa: E402
from .errors import RewardAuditError  # noqa: E402
from .store import Run, load_run, load_runs  # noqa: E402
from .testing import RewardLeakageError, assert_no_leakage  # noqa: E402

__all__ = [
    "RewardAuditCallback",
    "load_run",
    "load_runs",
    "Run",
    "compare",
    "Audit",
    "Finding",
    "Verdict",
    "assert_no_leakage",
    "RewardLeakageError",
    "RewardAuditError",
]


def __getattr__(name: str) -> Any:
    if name == "RewardAuditCallback":
        from .callback import RewardAuditCallback

        return RewardAuditCallback
    raise AttributeError(f"module 'reward_audit' has no attribute {name!r}")
