"""Verdicts that cannot be fooled (issue 8): nothing verified is not a pass, non-finite
values fail, labels mean what they say. Each case on a hand-built or tampered run folder
with its exit code; truth computed here by hand."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from reward_audit import RewardLeakageError, Verdict, assert_no_leakage, compare
from reward_audit.cli import main
from reward_audit.store import RunWriter
from synth import SynthRun, manifest


def cli(*args):
    return CliRunner().invoke(main, list(args))


def finding(audit, phase, kind, key):
    [f] = [f for f in audit.findings if (f.phase, f.kind, f.key) == (phase, kind, key)]
    return f


# --------------------------------------------------------------------------- nothing verified


def only_manifest(folder) -> str:
    RunWriter(str(folder)).write_manifest(manifest())  # training crashed before its first train() returned
    return str(folder)


def test_a_run_with_only_its_manifest_fails(tmp_path):
    path = only_manifest(tmp_path / "trial" / "reward_audit")
    audit = compare(path)
    assert not audit.ok and audit.failures() == []
    assert audit.nothing_verified and "no recorded rows" in audit.nothing_verified[0]
    result = cli("compare", path, "--fail-on", "leak,drop,mismatch,unverified,incomplete")
    assert result.exit_code == 1 and "nothing verified" in result.output and "NOTHING VERIFIED" in result.output
    assert cli("compare", path, "--allow-unverified").exit_code == 0
    doc = json.loads(cli("compare", path, "--json").output)
    [run] = doc["runs"]
    assert (doc["ok"], run["ok"], run["findings"]) == (False, False, [])
    assert [(u["phase"], u["failing"]) for u in run["nothing_verified"]] == [(None, True)] and "no recorded rows" in run["nothing_verified"][0]["reason"]
    allowed = json.loads(cli("compare", path, "--json", "--allow-unverified").output)
    assert allowed["ok"] and [u["failing"] for u in allowed["runs"][0]["nothing_verified"]] == [False]
    with pytest.raises(RewardLeakageError, match="nothing verified"):
        assert_no_leakage(path)
    assert assert_no_leakage(path, allow_unverified=True)


def test_raw_rows_but_no_reported_rows_fail(tmp_path):
    run = SynthRun()
    run.episode("e", [{0: 1.0}], {0: "p0"})
    path = run.write(str(tmp_path))
    audit = compare(path)
    assert not audit.ok and audit.nothing_verified == (
        "nothing verified in phase train: no per-episode values from RLlib were captured in this phase; nothing to compare the raw rewards with",
    )
    assert cli("compare", path).exit_code == 1


def test_only_unverified_findings_fail_but_one_verified_phase_is_not_enough(tmp_path):
    run = SynthRun()
    run.episode("t", [{0: 1.0}], {0: "p0"})
    run.report("t", "agent", 1.0, agent=0)
    run.episode("v", [{0: 2.0}], {0: "p0"}, runner="evaluation/1/bbbbbbbb")  # evaluation: never reported
    audit = compare(run.write(str(tmp_path)))
    assert finding(audit, "train", "agent", "0").verdict == Verdict.CLEAN
    assert audit.nothing_verified == ("nothing verified in phase evaluation: no per-episode values from RLlib were captured in this phase; nothing to compare the raw rewards with",)
    assert not audit.ok and audit.passes(allow_unverified=True)
    assert assert_no_leakage(str(tmp_path), phases=["train"])  # the phase checked was verified


def test_an_empty_experiment_dir_stays_bad_input(tmp_path):
    assert cli("compare", str(tmp_path)).exit_code == 2


def test_a_clean_run_is_verified(tmp_path):
    run = SynthRun()
    run.episode("e", [{0: 1.0}, {0: 2.0}], {0: "p0"})
    run.report("e", "agent", 3.0, agent=0)
    audit = compare(run.write(str(tmp_path)))
    assert audit.ok and audit.nothing_verified == () and audit.stats["verified_episodes"] == 1


# --------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_reported_values_are_mismatch_never_clean_or_zero(tmp_path, value):
    run = SynthRun()
    run.episode("e", [{0: 1.0}], {0: "p0"})
    run.report("e", "agent", value, agent=0)
    audit = compare(run.write(str(tmp_path)))
    f = finding(audit, "train", "agent", "0")
    assert f.verdict == Verdict.MISMATCH and not audit.ok
    assert "non-finite" in f.evidence[0].explanation and f.evidence[0].reported != 0.0
    assert cli("compare", str(tmp_path)).exit_code == 1
    json.loads(cli("compare", str(tmp_path), "--json").output)  # still valid JSON (no NaN literals)


def test_truth_that_overflows_is_mismatch(tmp_path):
    run = SynthRun()
    run.episode("e", [{0: 1.5e308}, {0: 1.5e308}], {0: "p0"})  # each finite; the sum is not
    run.report("e", "agent", 1.7e308, agent=0)
    audit = compare(run.write(str(tmp_path)))
    f = finding(audit, "train", "agent", "0")
    assert f.verdict == Verdict.MISMATCH and "overflows" in f.evidence[0].explanation


# --------------------------------------------------------------------------- labels


def test_majority_pattern_labels_the_finding_and_minorities_are_listed(tmp_path):
    # Five episodes off by an amount no agent's rewards explain (a dropped late reward of +3
    # with rewards that don't sum to 3), one whose difference happens to equal agent b's
    # earlier chunk: the label is MISMATCH (5/6), the coincidental LEAK is listed.
    run = SynthRun()
    for i in range(5):
        run.episode(f"m{i}", [{"a": 1.0 + i, "b": 10.0}, {"a": 2.0, "b": 20.0}], {"a": "pa", "b": "pb"})
        run.report(f"m{i}", "module", 3.0 + i - 3.25, module="pa")
    run.episode("c", [{"a": 1.0, "b": 7.0}, {"a": 2.0, "b": 20.0}], {"a": "pa", "b": "pb"})
    run.report("c", "module", 3.0 + 7.0, module="pa")  # = truth + b's earlier chunk, by coincidence
    f = finding(compare(run.write(str(tmp_path))), "train", "module", "pa")
    assert f.verdict == Verdict.MISMATCH and f.counts == {"MISMATCH": 5, "LEAK": 1}
    assert "MISMATCH in 5/6 episodes" in f.message and "minority: 1 LEAK (1× reported = truth + agent b's earlier-chunk rewards)" in f.message


def test_adding_some_agents_and_missing_others_is_mismatch(tmp_path):
    run = SynthRun()
    run.episode("e", [{"a": 1.0, "b": 10.0}, {"a": 2.0, "b": 30.0}], {"a": "pa", "b": "pb"})
    run.report("e", "module", 3.0 + 10.0 - 1.0, module="pa")  # + b's earlier, − a's earlier
    f = finding(compare(run.write(str(tmp_path))), "train", "module", "pa")
    assert f.verdict == Verdict.MISMATCH
    assert "adds other agents' rewards and misses its own" in f.evidence[0].explanation


def test_a_shortfall_is_never_a_leak(tmp_path):
    run = SynthRun()
    run.episode("e", [{"a": 1.0, "b": -10.0}, {"a": 2.0, "b": -30.0}], {"a": "pa", "b": "pb"})
    run.report("e", "module", 3.0 - 10.0, module="pa")  # b's (negative) earlier chunk added
    f = finding(compare(run.write(str(tmp_path))), "train", "module", "pa")
    assert f.verdict == Verdict.MISMATCH and "a shortfall" in f.evidence[0].explanation


def test_verdict_data_lives_on_the_enum():
    assert {v for v in Verdict if v.failing} == {Verdict.LEAK, Verdict.DROP, Verdict.MISMATCH}
    assert {v for v in Verdict if v.warning} == {Verdict.EXCLUDED, Verdict.INCOMPLETE, Verdict.UNVERIFIED}
    assert sorted(Verdict, key=lambda v: v.severity)[0] == Verdict.LEAK and Verdict.CLEAN.severity == max(v.severity for v in Verdict)


# --------------------------------------------------------------------------- wording (issue 12)


def test_zero_amount_excluded_rewards_are_no_finding_and_words_agree_in_number(tmp_path):
    # A turn-based game pays the second player 0 with its first observation: excluded by
    # RLlib's design, but a reward of 0 hides nothing — no EXCLUDED row.
    from reward_audit.recorder import RunnerRecorder
    from reward_audit.schema import Phase

    rec = RunnerRecorder(Phase.TRAIN, 1, mapping_of=lambda e: {"w": "p", "b": "p"})
    rec.tap_reset(0, {"w": 0})  # only w observes at reset
    rec.tap_step(0, {"b": 0}, {"w": 1.0, "b": 0.0})  # b's first observation comes with a reward of 0
    rec.tap_step(0, {"w": 0}, {"w": 0.0, "b": 2.0})
    rec.episode_ends("e", 0, None, mapping={"w": "p", "b": "p"})
    rec.sample_ends()
    drained = rec.drain()
    assert sum(r["n_pre_obs"] for r in drained["raw_rewards"]) == 1
    writer = RunWriter(str(tmp_path))
    writer.write_manifest(manifest())
    writer.write_rows("raw_rewards", [{**r, "iteration": 1} for r in drained["raw_rewards"]], "000001")
    writer.write_rows(
        "reported_episodes",
        [{"phase": "train", "runner_id": drained["runner_id"], "episode_id": "e", "kind": "agent", "agent_id": a, "module_id": None,
          "value": v, "semantics": "episode_sum_counted", "metrics_call": 0, "iteration": 1} for a, v in (("w", 1.0), ("b", 2.0))],
        "000001",
    )
    audit = compare(str(tmp_path))
    assert [f.verdict for f in audit.findings] == [Verdict.CLEAN, Verdict.CLEAN]
    assert audit.findings[0].message == "1 episode agrees" and audit.findings[0].difference == 0.0
    assert "-0 " not in cli("compare", str(tmp_path)).output
