"""compare(): each verdict on a hand-built run, truth computed here by hand."""

from __future__ import annotations

import pytest

from reward_audit import Verdict, compare
from synth import RUNNER, SynthRun


def finding(audit, phase, kind, key):
    """The comparison finding of one key (EXCLUDED is a separate, additional finding)."""
    [f] = [f for f in audit.findings if (f.phase, f.kind, f.key) == (phase, kind, key) and f.verdict != Verdict.EXCLUDED]
    return f


def test_clean_multi_chunk_episodes(tmp_path):
    run = SynthRun()
    run.episode("e1", [{0: 1.5, 1: 10.0}, {0: 2.5, 1: 20.0}, {0: -1.0, 1: 30.0}], {0: "p0", 1: "p1"})
    run.report("e1", "agent", 3.0, agent=0)
    run.report("e1", "agent", 60.0, agent=1)
    run.report("e1", "module", 3.0, module="p0")
    run.report("e1", "module", 60.0, module="p1")
    run.report("e1", "episode", 63.0)
    audit = compare(run.write(str(tmp_path)))
    assert audit.ok
    assert {f.verdict for f in audit.findings} == {Verdict.CLEAN}
    assert finding(audit, "train", "module", "p1").truth == pytest.approx(60.0)
    assert len(audit.episodes) == 5


def test_ray_2_12_chunk_leak_is_leak_with_other_agents_earlier_chunks(tmp_path):
    # Ray 2.12 new stack: reported(a -> m) = a's final chunk + whole return of earlier chunks.
    run = SynthRun()
    run.episode("multi", [{0: 16.0, 1: 160.0}, {0: 14.0, 1: 140.0}], {0: "p0", 1: "p1"})
    run.report("multi", "policy", 14.0 + 16.0 + 160.0, agent=0, module="p0")  # truth 30
    run.report("multi", "policy", 140.0 + 16.0 + 160.0, agent=1, module="p1")  # truth 300
    run.episode("single", [{0: 30.0, 1: 300.0}], {0: "p0", 1: "p1"})
    run.report("single", "policy", 30.0, agent=0, module="p0")
    run.report("single", "policy", 300.0, agent=1, module="p1")
    audit = compare(run.write(str(tmp_path)))
    p0 = finding(audit, "train", "policy", "p0")
    assert p0.verdict == Verdict.LEAK
    assert p0.counts == {"LEAK": 1, "CLEAN": 1}
    [e] = p0.evidence
    assert (e.episode_id, e.truth, e.reported, e.difference, e.chunks) == ("multi", 30.0, 190.0, 160.0, 2)
    assert "agent 1's earlier-chunk rewards (+160)" in e.explanation
    p1 = finding(audit, "train", "policy", "p1")
    assert p1.verdict == Verdict.LEAK and p1.evidence[0].difference == 16.0
    assert "agent 0's earlier-chunk rewards (+16)" in p1.evidence[0].explanation
    assert not audit.ok


def test_ray_2_53_shared_module_overwrite_is_drop(tmp_path):
    # Ray 2.53: reported(m) = final chunk of only the last agent + earlier chunks of all.
    run = SynthRun()
    mapping = {"a": "shared", "b": "shared", "c": "shared"}
    run.episode("e", [{"a": 10.0, "b": 100.0, "c": 1000.0}, {"a": 20.0, "b": 200.0, "c": 2000.0}], mapping)
    run.report("e", "module", 2000.0 + 1110.0, module="shared")  # truth 3330
    for agent, value in {"a": 30.0, "b": 300.0, "c": 3000.0}.items():
        run.report("e", "agent", value, agent=agent)
    audit = compare(run.write(str(tmp_path)))
    f = finding(audit, "train", "module", "shared")
    assert f.verdict == Verdict.DROP
    assert f.evidence[0].difference == -220.0
    assert "agent a's final-chunk rewards (20)" in f.evidence[0].explanation
    assert "agent b's final-chunk rewards (200)" in f.evidence[0].explanation
    assert finding(audit, "train", "agent", "c").verdict == Verdict.CLEAN


def test_unexplained_difference_is_mismatch(tmp_path):
    run = SynthRun()
    run.episode("e", [{0: 1.0, 1: 2.0}], {0: "p0", 1: "p1"})
    run.report("e", "module", 1.123, module="p0")
    audit = compare(run.write(str(tmp_path)))
    f = finding(audit, "train", "module", "p0")
    assert f.verdict == Verdict.MISMATCH
    assert f.difference == pytest.approx(0.123)


def test_agent_missing_from_report_is_drop(tmp_path):
    run = SynthRun()
    run.episode("e", [{0: 5.0, 1: 7.0}], {0: "p0", 1: "p1"})
    run.report("e", "agent", 5.0, agent=0)
    audit = compare(run.write(str(tmp_path)))
    f = finding(audit, "train", "agent", "1")
    assert f.verdict == Verdict.DROP
    assert f.reported == 0.0 and f.truth == 7.0
    assert f.evidence[0].explanation.startswith("RLlib reported no value")


def test_pre_observation_rewards_are_excluded_not_dropped(tmp_path):
    run = SynthRun()
    # black: -0.5 before its first observation (chunk 0), then +1 in each chunk
    run.episode("e", [{"white": 1.0, "black": 0.5}, {"white": 1.0, "black": 1.0}], {"white": "p", "black": "p"}, pre_obs={"black": -0.5})
    run.report("e", "agent", 2.0, agent="white")
    run.report("e", "agent", 2.0, agent="black")  # 0.5 + 1.0 - (-0.5)
    audit = compare(run.write(str(tmp_path)))
    assert audit.ok
    f = finding(audit, "train", "agent", "black")
    assert f.verdict == Verdict.CLEAN
    excluded = [x for x in audit.findings if x.verdict == Verdict.EXCLUDED]
    assert len(excluded) == 1 and excluded[0].key == "black"
    assert "1 reward totalling -0.5 (mean -0.5 per episode, 1 episode)" in excluded[0].message
    assert not Verdict.EXCLUDED.is_failure


def test_unreported_episodes_are_incomplete_and_ghost_reports_unverified(tmp_path):
    run = SynthRun()
    run.episode("ok", [{0: 1.0}], {0: "p0"})
    run.report("ok", "agent", 1.0, agent=0)
    run.episode("cut", [{0: 1.0}], {0: "p0"}, done=False)
    run.episode("finished", [{0: 1.0}], {0: "p0"}, done=True)
    run.report("ghost", "agent", 4.0, agent=0)
    audit = compare(run.write(str(tmp_path)))
    assert audit.ok
    [inc] = [f for f in audit.findings if f.verdict == Verdict.INCOMPLETE]
    assert inc.counts == {"cut": 1, "finished": 1} and inc.episodes == 2
    [unv] = [f for f in audit.findings if f.verdict == Verdict.UNVERIFIED]
    assert "no raw rewards" in unv.message and "ghost" in unv.message
    assert (unv.phase, unv.kind) == ("train", "agent")


def test_phases_are_judged_separately(tmp_path):
    run = SynthRun()
    run.episode("t", [{0: 1.0, 1: 9.0}, {0: 1.0, 1: 9.0}], {0: "p0", 1: "p1"})
    run.report("t", "module", 1.0 + 10.0, module="p0")  # leak in training
    run.episode("v", [{0: 2.0, 1: 18.0}], {0: "p0", 1: "p1"}, runner="evaluation/1/bbbbbbbb")
    run.report("v", "module", 2.0, module="p0", runner="evaluation/1/bbbbbbbb")
    audit = compare(run.write(str(tmp_path)))
    assert finding(audit, "train", "module", "p0").verdict == Verdict.LEAK
    assert finding(audit, "evaluation", "module", "p0").verdict == Verdict.CLEAN


def test_tolerance_accepts_float_rounding_only(tmp_path):
    # 0.1 + 0.2 in float64 is 0.30000000000000004: rounding, CLEAN. 0.30000001 is 1e-8 off:
    # no float sum of two rewards is that far, so by default it fails; an explicit --rtol
    # (the old default 1e-5) accepts it.
    run = SynthRun()
    run.episode("e", [{0: 0.1}, {0: 0.2}], {0: "p0"})
    run.report("e", "agent", 0.1 + 0.2, agent=0)
    assert compare(run.write(str(tmp_path / "a"))).ok
    run2 = SynthRun()
    run2.episode("e", [{0: 0.1}, {0: 0.2}], {0: "p0"})
    run2.report("e", "agent", 0.30000001, agent=0)
    path = run2.write(str(tmp_path / "b"))
    assert not compare(path).ok
    assert compare(path, atol=1e-6, rtol=1e-5).ok


def test_episode_key_is_runner_scoped(tmp_path):
    # Old-stack ids repeat across runners; the same id on two runners is two episodes.
    run = SynthRun()
    run.episode("7", [{0: 1.0}], {0: "p0"}, runner=RUNNER)
    run.episode("7", [{0: 5.0}], {0: "p0"}, runner="train/1/cccccccc")
    run.report("7", "agent", 1.0, agent=0, runner=RUNNER)
    run.report("7", "agent", 5.0, agent=0, runner="train/1/cccccccc")
    audit = compare(run.write(str(tmp_path)))
    assert audit.ok
    assert finding(audit, "train", "agent", "0").episodes == 2


def test_phase_without_any_report_is_unverified_not_incomplete(tmp_path):
    run = SynthRun()
    run.episode("e", [{0: 1.0}], {0: "p0"})
    audit = compare(run.write(str(tmp_path), clip_rewards=True))
    [f] = audit.findings
    assert (f.verdict, f.phase, f.key, f.episodes) == (Verdict.UNVERIFIED, "train", "reported", 1)
    assert "clip_rewards=True" in f.message
