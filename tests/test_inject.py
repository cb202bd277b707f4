"""Fault-injection self-test on the installed Ray: each injected fault is caught with the
right verdict and attribution; the same run without injection is CLEAN."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="needs ray[rllib]; `make test` installs it")

from click.testing import CliRunner  # noqa: E402

from reward_audit import Verdict, compare  # noqa: E402
from reward_audit.cli import main  # noqa: E402
from reward_audit.demo import demo_config  # noqa: E402

pytestmark = pytest.mark.rllib


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_instance):  # one Ray for the whole module (tests/conftest.py)
    yield


def run(out, *, inject=None, shared=False):
    algo = demo_config(out, evaluation=False, shared=shared, inject=inject).build_algo()
    try:
        for _ in range(2):
            algo.train()
    finally:
        algo.stop()
    return compare(out)


def findings(audit, verdict):
    return {(f.phase, f.kind, f.key): f for f in audit.findings if f.verdict == verdict}


@pytest.mark.parametrize("shared", [False, True])
def test_without_injection_the_run_is_clean(tmp_path, shared):
    audit = run(str(tmp_path), shared=shared)
    assert audit.ok
    assert {f.verdict for f in audit.findings} <= {Verdict.CLEAN, Verdict.INCOMPLETE}
    assert audit.manifest["injected_fault"] is None


def test_injected_leak_is_leak_from_the_other_agents_earlier_chunks(tmp_path):
    audit = run(str(tmp_path), inject="leak")
    leak = findings(audit, Verdict.LEAK)
    assert {("train", "module", "p0"), ("train", "module", "p1"), ("train", "agent", "0"), ("train", "agent", "1")} <= set(leak)
    p0 = leak[("train", "module", "p0")]
    for e in p0.evidence:
        assert e.chunks > 1
        assert "agent 1's earlier-chunk rewards" in e.explanation
        assert e.difference > 0 and e.difference % 10 == pytest.approx(0)  # agent 1 earns 10 per step
    # Single-chunk episodes stay clean under the 2.12 pattern.
    eps = audit.episodes[(audit.episodes["kind"] == "module") & (audit.episodes["chunks"] == 1)]
    assert (eps["verdict"] == "CLEAN").all()
    assert audit.manifest["injected_fault"] == "leak"
    # What the dashboard showed for p0 was wrong from the first iteration on.
    [series] = [d for d in audit.dashboard if d.path == "env_runners/module_episode_returns_mean/p0"]
    assert series.first_wrong == 1 and not series.unreconstructable
    assert (series.table["displayed"] > series.table["expected"] + 100).all()
    # The HTML report plots shown vs. truth per iteration for each module / agent series.
    from reward_audit.report import render_html

    page = render_html(audit)
    assert page.count("data:image/png;base64,") >= 4


def test_injected_drop_names_the_missing_agents(tmp_path):
    audit = run(str(tmp_path), inject="drop", shared=True)
    drop = findings(audit, Verdict.DROP)
    assert set(drop) == {("train", "module", "shared")}
    for e in drop[("train", "module", "shared")].evidence:
        assert e.truth == pytest.approx(30 * 111.0)
        # Agent 2 (the last one) keeps its final chunk; agents 0 and 1 lose theirs.
        assert "agent 0's final-chunk rewards" in e.explanation and "agent 1's final-chunk rewards" in e.explanation
        assert "agent 2" not in e.explanation
    per_agent = [f for f in audit.findings if f.kind == "agent"]
    assert per_agent and all(f.verdict == Verdict.CLEAN for f in per_agent)


def test_injected_mismatch_is_mismatch_and_cli_exits_1(tmp_path):
    audit = run(str(tmp_path), inject="mismatch")
    mismatch = findings(audit, Verdict.MISMATCH)
    assert {("train", "module", "p0"), ("train", "module", "p1")} <= set(mismatch)
    assert mismatch[("train", "module", "p0")].difference == pytest.approx(30 * 0.01 + 0.5)
    result = CliRunner().invoke(main, ["compare", str(tmp_path)])
    assert result.exit_code == 1
    assert "[SELF-TEST: fault 'mismatch' injected]" in result.output


def test_demo_signal_fails_the_learning_phase_only(tmp_path):
    """`reward-audit demo --inject signal`: agent 0's rewards land in module p1's training
    data (capture/inject.py); RLlib's metrics stay right. Exit 1, and the bottom line says so."""
    result = CliRunner().invoke(main, ["demo", "--inject", "signal", "--iterations", "2", "--out", str(tmp_path), "--format", "json"])
    assert result.exit_code == 1, result.output
    audit = compare(str(tmp_path))
    learning = {(f.kind, f.key): f.verdict for f in audit.findings if f.phase == "learning" and f.kind in ("module", "agent")}
    assert learning[("module", "p1")] is Verdict.LEAK and learning[("module", "p0")] is Verdict.DROP, learning
    assert {f.verdict for f in audit.findings if f.phase == "train"} <= {Verdict.CLEAN, Verdict.INCOMPLETE}
    assert audit.manifest["injected_fault"] == "signal"
