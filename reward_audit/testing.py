"""CI assertions: one call in a user's test, a readable failure (PettingZoo's ``api_test``
idea). No pytest import here.

    from reward_audit import assert_no_leakage

    def test_attribution(tmp_path):
        ...train with RewardAuditCallback.writing_to(tmp_path)...
        assert_no_leakage(tmp_path)            # raises RewardLeakageError on LEAK/DROP/MISMATCH
"""

from __future__ import annotations

from typing import Any, Iterable

from .audit import FAILURES, Audit, Verdict
from .criteria import Criteria
from .compare import compare
from .report import render_text, visible
from .store import load_runs


class RewardLeakageError(AssertionError):
    """Raised by ``assert_no_leakage``; carries the audits (``.audits``) and the failing findings."""

    def __init__(self, message: str, audits: list[Audit], findings: list):
        super().__init__(message)
        self.audits = audits
        self.findings = findings


def assert_no_leakage(
    path: str | Audit,
    *,
    phases: Iterable[str] | None = None,
    fail_on: Iterable[str | Verdict] = FAILURES,
    allow: Iterable[str] = (),
    allow_unverified: bool = False,
) -> list[Audit]:
    """Fail unless every run at ``path`` is free of LEAK / DROP / MISMATCH — and had
    something verified: a run or phase where nothing could be checked fails too, unless
    ``allow_unverified``.

    ``phases`` limits the check (e.g. ``["train"]``; a phase the run has nothing in fails
    as unverified); ``allow`` lists ``"phase:kind:key"`` (or ``"kind:key"``) findings to
    ignore, e.g. ``["module:frozen_snapshot"]`` (``ValueError`` for an entry of another
    shape). The same rules as the CLI's ``--phase`` / ``--allow`` (``criteria.Criteria``).
    Returns the audits when they pass.
    """
    criteria = Criteria(fail_on=fail_on, allow=allow, phases=phases, allow_unverified=allow_unverified)  # as the CLI
    audits = [path] if isinstance(path, Audit) else [compare(run) for run in load_runs(str(path))]
    failing = [f for a in audits for f in criteria.failing(a)]
    unverified = [u.reason for a in audits for u in criteria.unverified(a) if u.failing]
    if failing or unverified:
        lines = [f"reward attribution is wrong: {len(failing)} failing finding(s)"] if failing else ["reward attribution could not be checked"]
        lines += [f"  {visible(f)}" for f in failing]
        lines += [f"  {visible(r)} (pass `allow_unverified=True` to accept)" for r in unverified]
        lines.append("")
        lines += [render_text(a, verbose=True, criteria=criteria) for a in audits]
        lines.append("Get the data: `reward_audit.compare(path).episodes` (a DataFrame, one row per episode and key)")
        raise RewardLeakageError("\n".join(lines), audits, failing)
    return audits


def train_and_audit(config: Any, iterations: int, folder: str, **callback_options: Any) -> Audit:
    """Train ``config`` (an ``AlgorithmConfig``) for ``iterations`` with the callback writing
    to ``folder`` (added to the config's callbacks, not replacing them), then audit it."""
    from .callback import RewardAuditCallback
    from .capture import with_audit_callback

    callback = RewardAuditCallback.configured(folder, **callback_options)
    algo = with_audit_callback(config.copy(copy_frozen=False), callback).build_algo()
    try:
        for _ in range(iterations):
            algo.train()
    finally:
        algo.stop()
    [run] = load_runs(folder)
    return compare(run)
