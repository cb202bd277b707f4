"""pytest plugin (registered under ``pytest11``): a fixture that trains a config with the
callback and audits it, a strict option, and a terminal summary.

    def test_my_league_attribution(reward_audit_run):
        audit = reward_audit_run(my_config(), iterations=3)   # fails on LEAK / DROP / MISMATCH
        assert audit.ok

Options: ``--reward-audit-strict`` also fails on EXCLUDED and UNVERIFIED findings;
``--reward-audit-keep DIR`` keeps the recorded runs there (default: pytest's tmp dirs).
The logic lives in ``testing.py``; this module only wires it into pytest. pytest loads it at
start-up in every project where reward_audit is installed, so it imports nothing of its own
until the fixture runs (pandas, pyarrow and the audit load on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:
    from .audit import Audit

_AUDITS_KEY = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reward_audit", "reward attribution audits (reward_audit)")
    group.addoption("--reward-audit-strict", action="store_true", default=False, help="Also fail on EXCLUDED and UNVERIFIED findings.")
    group.addoption("--reward-audit-keep", default=None, metavar="DIR", help="Keep recorded runs under DIR instead of pytest's tmp dirs.")
    group.addoption(
        "--reward-audit-allow-unverified", action="store_true", default=False, help="Do not fail a run in which nothing could be verified."
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_AUDITS_KEY] = []


@pytest.fixture
def reward_audit_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Audit]:
    """Train ``config`` for ``iterations`` with RewardAuditCallback, audit it, and assert no
    failing verdict (``check=False`` to only get the ``Audit``)."""
    from .audit import FAILURES, Verdict
    from .testing import assert_no_leakage, train_and_audit

    strict = request.config.getoption("--reward-audit-strict")
    keep = request.config.getoption("--reward-audit-keep")
    allow_unverified = request.config.getoption("--reward-audit-allow-unverified")
    fail_on = set(FAILURES) | ({Verdict.EXCLUDED, Verdict.UNVERIFIED} if strict else set())

    def run(config: Any, iterations: int = 3, *, check: bool = True, **options: Any) -> Audit:
        import os

        folder = os.path.join(keep, request.node.name) if keep else str(tmp_path_factory.mktemp("reward_audit"))
        audit = train_and_audit(config, iterations, folder, **options)
        request.config.stash[_AUDITS_KEY].append((request.node.nodeid, audit))
        if check:
            assert_no_leakage(audit, fail_on=fail_on, allow_unverified=allow_unverified)
        return audit

    return run


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    from .report import visible

    audits = config.stash.get(_AUDITS_KEY, [])
    if not audits:
        return
    terminalreporter.section("reward_audit")
    for nodeid, audit in audits:
        counts = ", ".join(f"{n} {v}" for v, n in sorted(audit.counts().items()))
        state = "ok" if audit.ok else "FAILING"
        terminalreporter.write_line(f"{nodeid}: {state} ({counts}) — {visible(audit.path)}")
