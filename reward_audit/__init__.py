"""reward_audit: is what RLlib reports per agent / module what the env actually paid?

    config.callbacks(RewardAuditCallback)          # record (needs ray[rllib])
    audit = reward_audit.compare("<trial dir>")    # reconcile (no Ray needed)
    reward_audit.assert_no_leakage("<trial dir>")  # fail a CI build

Every name below is imported on first use: an env runner that loads the recorder does not
load pandas, the audit or the renderers, and auditing a run folder copied from a cluster
works without Ray installed (only ``RewardAuditCallback`` imports Ray).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "RewardAuditCallback": "callback",
    "add_to": "callback",
    "load_run": "store",
    "load_runs": "store",
    "Run": "store",
    "compare": "compare",
    "Audit": "audit",
    "Finding": "audit",
    "Verdict": "audit",
    "assert_no_leakage": "testing",
    "RewardLeakageError": "testing",
    "RewardAuditError": "errors",
}
__all__ = list(_EXPORTS)


class _Package(types.ModuleType):
    """The package object: resolves the exported names lazily. ``reward_audit.compare`` is
    the function, even after ``import reward_audit.compare`` (which would otherwise bind the
    submodule to that name)."""

    def __getattr__(self, name: str) -> Any:
        if name not in _EXPORTS:
            raise AttributeError(f"module 'reward_audit' has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
