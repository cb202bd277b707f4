"""The pytest plugin's options for what fails, without Ray: pytester runs a user's test
suite whose ``train_and_audit`` is replaced by a hand-written run (tests/synth.py), so the
plugin's own wiring — options -> ``Criteria`` -> ``assert_no_leakage`` and the summary —
is what is tested. tests/test_pytest_plugin.py trains for real.

The run: agents 0 (module p0, paid 1 + 2) and 1 (p1, paid 10 + 20); RLlib reports p0 = 3,
p1 = 30 (the metrics are right). "moved": agent 0's second-chunk 2 went into p1's training
batch, so the learning phase has p0 DROP (3 vs 1), p1 LEAK (30 vs 32), agent 0 DROP, agent 1
LEAK. "right": the batches match (all CLEAN).
"""

from __future__ import annotations

import pytest
import synth  # noqa: F401  (imported here: pytester's in-process runs keep modules loaded before them;
import reward_audit.compare  # noqa: F401  a numpy / pandas imported inside one cannot be imported again)
import reward_audit.bottom_line  # noqa: F401

pytest_plugins = ["pytester"]

CONFTEST = '''
import pytest
import reward_audit.testing
from reward_audit import compare
from synth import SynthRun

BATCHES = {
    "right": [(0, 0, "p0", 1.0), (0, 1, "p1", 10.0), (1, 0, "p0", 2.0), (1, 1, "p1", 20.0)],
    "moved": [(0, 0, "p0", 1.0), (0, 1, "p1", 10.0), (1, 1, "p1", 22.0)],
}

def fake_train_and_audit(config, iterations, folder, **options):
    run = SynthRun()
    run.episode("e1", [{0: 1.0, 1: 10.0}, {0: 2.0, 1: 20.0}], {0: "p0", 1: "p1"})
    run.report("e1", "module", 3.0, module="p0")
    run.report("e1", "module", 30.0, module="p1")
    for chunk, agent, module, reward in BATCHES[config]:
        run.trained("e1", chunk, agent, module, reward)
    return compare(run.write(folder + "/reward_audit"))

@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setattr(reward_audit.testing, "train_and_audit", fake_train_and_audit)
'''

USER_TESTS = '''
def test_moved(reward_audit_run):
    reward_audit_run("moved")

def test_right(reward_audit_run):
    reward_audit_run("right")
'''

ALL_LEARNING = ["learning:module:p0", "learning:module:p1", "learning:agent:0", "learning:agent:1"]


@pytest.fixture
def suite(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_user=USER_TESTS)
    return pytester


def allow(*entries: str) -> list[str]:
    return [a for e in entries for a in ("--reward-audit-allow", e)]


@pytest.mark.parametrize(
    "args, moved_passes",
    [
        ([], False),
        (["--reward-audit-phase", "learning"], False),
        (["--reward-audit-phase", "train"], True),  # the learning findings are not checked
        (allow(*ALL_LEARNING), True),
        (allow("learning:module:p1", "learning:agent:1"), False),  # the DROPs still fail
        (["--reward-audit-fail-on", "leak", *allow("learning:module:p1", "learning:agent:1")], True),
        (["--reward-audit-fail-on", "DROP , leak", *allow("learning:module:p1", "learning:agent:1")], False),
        (allow(*(e.split(":", 1)[1] for e in ALL_LEARNING)), True),  # kind:key: every phase
        (allow("train:module:p0", "train:module:p1", "train:agent:0", "train:agent:1"), False),  # another phase
    ],
)
def test_options_decide_what_fails(suite, args, moved_passes):
    result = suite.runpytest("-p", "no:cacheprovider", "-q", *args)
    result.assert_outcomes(passed=2 if moved_passes else 1, failed=0 if moved_passes else 1)
    state = "ok" if moved_passes else "FAILING"
    result.stdout.fnmatch_lines([f"*test_user.py::test_moved: {state} (2 CLEAN, 2 DROP, 2 LEAK); metrics: CLEAN · training batches: LEAK — *"])


def test_a_checked_phase_with_nothing_recorded_fails_closed(suite):
    args = ["--reward-audit-phase", "train", "--reward-audit-phase", "evaluation"]
    suite.runpytest("-p", "no:cacheprovider", "-q", *args).assert_outcomes(failed=2)
    suite.runpytest("-p", "no:cacheprovider", "-q", *args, "--reward-audit-allow-unverified").assert_outcomes(passed=2)


def test_failure_names_the_learning_findings_that_fail(suite):
    result = suite.runpytest("-p", "no:cacheprovider", "-q", *allow("learning:module:p1", "learning:agent:1"), "-k", "moved")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*RewardLeakageError: reward attribution is wrong: 2 failing finding(s)*",
            "*learning module p0: DROP*",
            "*learning agent 0: DROP*",
            "*metrics: CLEAN · training batches: LEAK — the policies were trained on wrong rewards, though the reported numbers look right*",
            "*— 2 failing (2 allowed)*",
        ]
    )


def test_per_call_allow_and_phases(suite):
    suite.makepyfile(
        test_calls='''
def test_allowed_here(reward_audit_run):
    reward_audit_run("moved", allow=["learning:module:p0", "learning:module:p1", "learning:agent:0"], phases=["learning"])

def test_not_all_allowed(reward_audit_run):
    reward_audit_run("moved", allow=["learning:module:p0", "learning:module:p1", "learning:agent:0"])

def test_train_only(reward_audit_run):
    reward_audit_run("moved", phases=["train"])
'''
    )
    # the command line's allow adds to each call's
    result = suite.runpytest("-p", "no:cacheprovider", "-q", "test_calls.py", *allow("learning:agent:1"))
    result.assert_outcomes(passed=3)
    result = suite.runpytest("-p", "no:cacheprovider", "-q", "test_calls.py")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*test_calls.py::test_allowed_here: FAILING*", "*test_calls.py::test_train_only: ok*"])


def test_unused_allow_is_a_warning(suite):
    result = suite.runpytest("-p", "no:cacheprovider", "-q", *allow("learning:module:typo", *ALL_LEARNING))
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["warning: `--reward-audit-allow learning:module:typo` names no finding (a typo, or a bug fixed since?)"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--reward-audit-allow", "p1"], "*reward_audit: 'p1': an allowed finding is `kind:key` or `phase:kind:key`*"),
        (["--reward-audit-allow", "learnin:module:p1"], "*reward_audit: 'learnin:module:p1': an allowed finding is*"),
        (["--reward-audit-phase", "learn"], "*reward_audit: 'learn': not a phase; use one of train, evaluation, learning*"),
        (["--reward-audit-fail-on", ""], "*reward_audit: '': name at least one verdict, e.g. `--reward-audit-fail-on leak,drop,mismatch`*"),
        (["--reward-audit-fail-on", "leak,leek"], "*reward_audit: 'leak,leek': LEEK is not a verdict; use a comma-separated list of clean, leak*"),
    ],
)
def test_bad_values_stop_pytest_with_the_fix(suite, args, message):
    result = suite.runpytest("-p", "no:cacheprovider", "-q", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_options_are_registered(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        ["*reward attribution audits*", "*--reward-audit-fail-on=VERDICTS*", "*--reward-audit-allow=*", "*--reward-audit-phase=PHASE*"]
    )
