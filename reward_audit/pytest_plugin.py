"""pytest plugin (registered under ``pytest11``): a fixture that trains a config with the
callback and audits it, options for what fails, and a terminal summary.

    def test_my_league_attribution(reward_audit_run):
        audit = reward_audit_run(my_config(), iterations=3)   # fails on LEAK / DROP / MISMATCH
        assert audit.ok

Options — what fails, the same ``criteria.Criteria`` as the CLI's ``--fail-on`` / ``--allow`` /
``--phase`` / ``--allow-unverified``, parsed by the same code:

    pytest --reward-audit-phase learning                      # only the training batches fail
    pytest --reward-audit-allow learning:module:p1            # a finding that does not fail (repeatable)
    pytest --reward-audit-fail-on leak,drop,mismatch,excluded
    pytest --reward-audit-strict                               # also fail on EXCLUDED and UNVERIFIED

``reward_audit_run(config, allow=[...], phases=[...])`` adds allowed findings / limits the
phases for one test. ``--reward-audit-keep DIR`` keeps the recorded runs there (default:
pytest's tmp dirs); a bad value stops pytest at start-up with the fix, as the CLI exits 2.
The logic lives in ``testing.py``; this module only wires it into pytest. pytest loads it at
start-up in every project where reward_audit is installed, so it imports nothing of its own
until the fixture runs (pandas, pyarrow and the audit load on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import pytest

if TYPE_CHECKING:
    from .audit import Audit
    from .criteria import Criteria

_AUDITS_KEY = pytest.StashKey[list]()  # (nodeid, audit, criteria) per reward_audit_run call
_CRITERIA_KEY = pytest.StashKey["Criteria"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reward_audit", "reward attribution audits (reward_audit)")
    group.addoption("--reward-audit-strict", action="store_true", default=False, help="Also fail on EXCLUDED and UNVERIFIED findings.")
    group.addoption(
        "--reward-audit-fail-on", default=None, metavar="VERDICTS",
        help="Verdicts that fail a test, comma-separated (default: leak,drop,mismatch); as `reward-audit compare --fail-on`.",
    )
    group.addoption(
        "--reward-audit-allow", action="append", default=[], metavar="[PHASE:]KIND:KEY",
        help="A finding that does not fail (repeatable), e.g. `module:frozen_snapshot` or `learning:module:p1`; as `--allow`.",
    )
    group.addoption(
        "--reward-audit-phase", action="append", default=[], metavar="PHASE",
        help="Fail only on this phase (repeatable: train, evaluation, learning); as `--phase`.",
    )
    group.addoption(
        "--reward-audit-allow-unverified", action="store_true", default=False, help="Do not fail a run in which nothing could be verified."
    )
    group.addoption("--reward-audit-keep", default=None, metavar="DIR", help="Keep recorded runs under DIR instead of pytest's tmp dirs.")


def _criteria(config: pytest.Config) -> Criteria:
    """The command line's ``Criteria`` (built once); a bad value is a ``pytest.UsageError``."""
    if _CRITERIA_KEY not in config.stash:
        from .audit import FAILURES, Verdict
        from .criteria import Criteria, parse_fail_on

        text = config.getoption("--reward-audit-fail-on")
        phases = config.getoption("--reward-audit-phase")
        try:
            fail_on = FAILURES if text is None else parse_fail_on(text, "--reward-audit-fail-on")
            if config.getoption("--reward-audit-strict"):
                fail_on = fail_on | {Verdict.EXCLUDED, Verdict.UNVERIFIED}
            config.stash[_CRITERIA_KEY] = Criteria(
                fail_on=fail_on,
                allow=config.getoption("--reward-audit-allow"),
                phases=phases or None,
                allow_unverified=config.getoption("--reward-audit-allow-unverified"),
            )
        except ValueError as e:
            raise pytest.UsageError(f"reward_audit: {e}") from None
    return config.stash[_CRITERIA_KEY]


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_AUDITS_KEY] = []
    given = config.getoption("--reward-audit-fail-on", None) is not None or config.getoption("--reward-audit-allow", None) or config.getoption("--reward-audit-phase", None)
    if given:  # validate now (a bad value stops pytest before any test); else nothing is imported
        _criteria(config)


@pytest.fixture
def reward_audit_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Audit]:
    """Train ``config`` for ``iterations`` with RewardAuditCallback, audit it, and assert no
    failing verdict under the command line's options (``check=False`` to only get the
    ``Audit``). ``allow`` adds allowed findings, ``phases`` replaces the checked phases, for
    this call only; other keyword arguments go to ``RewardAuditCallback.configured``."""
    import dataclasses

    from . import testing

    keep = request.config.getoption("--reward-audit-keep")
    base = _criteria(request.config)

    def run(
        config: Any, iterations: int = 3, *, check: bool = True, allow: Iterable[str] = (), phases: Iterable[str] | None = None, **options: Any
    ) -> Audit:
        import os

        criteria = dataclasses.replace(base, allow=(*base.allow, *allow), phases=base.phases if phases is None else phases)
        folder = os.path.join(keep, request.node.name) if keep else str(tmp_path_factory.mktemp("reward_audit"))
        audit = testing.train_and_audit(config, iterations, folder, **options)
        request.config.stash[_AUDITS_KEY].append((request.node.nodeid, audit, criteria))
        if check:
            testing.assert_no_leakage(audit, fail_on=criteria.fail_on, allow=criteria.allow, phases=criteria.phases, allow_unverified=criteria.allow_unverified)
        return audit

    return run


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """One line per audited test: ok / FAILING under the criteria it was checked with, the
    counts, the bottom line (metrics vs. training batches) when recorded, and the run folder."""
    audits = config.stash.get(_AUDITS_KEY, [])
    if not audits:
        return
    from .bottom_line import BottomLine
    from .report import visible

    terminalreporter.section("reward_audit")
    for nodeid, audit, criteria in audits:
        counts = ", ".join(f"{n} {v}" for v, n in sorted(audit.counts().items()))
        state = "ok" if criteria.passes(audit) else "FAILING"
        line = BottomLine.of(audit)
        terminalreporter.write_line(f"{nodeid}: {state} ({counts}){'; ' + line.head if line else ''} — {visible(audit.path)}")
    for entry in _criteria(config).unused_allow([a for _, a, _ in audits]):
        terminalreporter.write_line(f"warning: `--reward-audit-allow {visible(entry)}` names no finding (a typo, or a bug fixed since?)")
