"""Recorded real runs (fixtures/runs/, see its README.md): audited with no Ray at all, with
numbers checked by hand against the Parquet files."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reward_audit import Verdict, compare, load_run

RUNS = os.path.join(os.path.dirname(__file__), "..", "fixtures", "runs")


# --------------------------------------------------------------------------- Ray 2.53: shared-module DROP
# fixtures/runs/ray253_shared_module_drop: a real Ray 2.53.0 run (fixtures/make_fixtures.py,
# `ray253_shared_module_drop`); agents 0, 1, 2 of ScaledRewardsEnv all on module "shared".
# The numbers below were read by hand from the Parquet files with pyarrow alone:
# train episode 77a9e0ae... was sampled in two chunks (runner sample() calls 13 and 14).
RAY253_DROP = os.path.join(RUNS, "ray253_shared_module_drop")
RAY253_EPISODE = "77a9e0aef1504b358d5faee075093d21"
RAY253_CHUNKS = {  # chunk_seq -> {agent: reward the env paid in that chunk}
    13: {"0": 15.086049650623899, "1": 137.23409759394048, "2": 1554.1863504825594},  # 14 steps
    14: {"0": 17.570257066732026, "1": 147.22085460590142, "2": 1412.0542418977316},  # 16 steps, final
}
RAY253_TRUTH = 3283.351851297489  # sum of all six: what module "shared" earned (= RLlib's episode return)
RAY253_REPORTED = 3118.560739624855  # RLlib 2.53's module value: chunk 13 of all agents + chunk 14 of agent 2 only
RAY253_SHORTFALL = 17.570257066732026 + 147.22085460590142  # agents 0 and 1's final-chunk rewards
RAY253_EVAL_EPISODE = "24e513d73d274e8b8220295ef70a01dc"  # one chunk: the module value is agent 2's return alone
RAY253_EVAL = {"0": 29.055750629239466, "1": 297.9607416449451, "2": 3220.960039976256}


def _parquet_rows(run_dir: str, table: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(run_dir, "reward_audit", table, "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def test_ray253_fixture_numbers_by_hand():
    """The Parquet files alone (no reward_audit code) show RLlib 2.53's arithmetic."""
    raw = [r for r in _parquet_rows(RAY253_DROP, "raw_rewards") if r["episode_id"] == RAY253_EPISODE]
    assert {(r["chunk_seq"], r["agent_id"]): r["reward"] for r in raw} == {(c, a): v for c, agents in RAY253_CHUNKS.items() for a, v in agents.items()}
    assert {r["module_id"] for r in raw} == {"shared"} and {r["pre_obs_reward"] for r in raw} == {0.0}
    assert sorted((r["chunk_seq"], r["n_rewards"], r["episode_done"]) for r in raw if r["agent_id"] == "0") == [(13, 14, False), (14, 16, True)]
    reported = {(r["kind"], r["agent_id"] or r["module_id"]): r["value"] for r in _parquet_rows(RAY253_DROP, "reported_episodes") if r["episode_id"] == RAY253_EPISODE}
    assert reported[("module", "shared")] == RAY253_REPORTED
    assert reported[("episode", None)] == pytest.approx(RAY253_TRUTH, abs=1e-9)
    assert sum(v for agents in RAY253_CHUNKS.values() for v in agents.values()) == pytest.approx(RAY253_TRUTH, abs=1e-9)
    assert RAY253_TRUTH - RAY253_REPORTED == pytest.approx(RAY253_SHORTFALL, abs=1e-9)
    assert sum(RAY253_CHUNKS[13].values()) + RAY253_CHUNKS[14]["2"] == pytest.approx(RAY253_REPORTED, abs=1e-9)
    for agent in "012":  # per-agent values are right
        assert reported[("agent", agent)] == pytest.approx(RAY253_CHUNKS[13][agent] + RAY253_CHUNKS[14][agent], abs=1e-9)
    eval_reported = {(r["kind"], r["agent_id"] or r["module_id"]): r["value"] for r in _parquet_rows(RAY253_DROP, "reported_episodes") if r["episode_id"] == RAY253_EVAL_EPISODE}
    assert eval_reported[("module", "shared")] == RAY253_EVAL["2"]
    assert eval_reported[("episode", None)] == pytest.approx(sum(RAY253_EVAL.values()), abs=1e-9)


def test_ray253_fixture_is_drop_on_the_shared_module():
    audit = compare(RAY253_DROP)
    assert audit.manifest["ray_version"] == "2.53.0" and audit.manifest["api_stack"] == "new"
    by_key = {(f.phase, f.kind, f.key): f for f in audit.findings}
    assert {k for k, f in by_key.items() if f.verdict.is_failure} == {("train", "module", "shared"), ("evaluation", "module", "shared")}
    train, evaluation = by_key[("train", "module", "shared")], by_key[("evaluation", "module", "shared")]
    assert (train.verdict, train.episodes, train.counts) == (Verdict.DROP, 8, {"DROP": 8})
    assert (evaluation.verdict, evaluation.episodes, evaluation.counts) == (Verdict.DROP, 4, {"DROP": 4})
    for phase in ("train", "evaluation"):
        for key in ("0", "1", "2"):
            assert by_key[(phase, "agent", key)].verdict == Verdict.CLEAN
        assert by_key[(phase, "episode", "return")].verdict == Verdict.CLEAN
    [e] = [e for e in train.evidence if e.episode_id == RAY253_EPISODE]
    assert (e.chunks, e.truth, e.reported) == (2, pytest.approx(RAY253_TRUTH, abs=1e-9), RAY253_REPORTED)
    assert e.difference == pytest.approx(-RAY253_SHORTFALL, abs=1e-9)
    for ev in train.evidence + evaluation.evidence:
        assert "agent 0's final-chunk rewards" in ev.explanation and "agent 1's final-chunk rewards" in ev.explanation, ev.explanation
        assert "agent 2" not in ev.explanation and "earlier" not in ev.explanation, ev.explanation


def test_ray253_fixture_tap_matches_the_env_ledger():
    """The env's own count (env_ledger.jsonl, one line per finished episode) equals the tap."""
    from helpers import assert_raw_matches_ledger

    with open(os.path.join(RAY253_DROP, "env_ledger.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 12  # 8 training + 4 evaluation episodes finished
    assert_raw_matches_ledger(load_run(RAY253_DROP), lines)


def test_ray253_fixture_cli_without_ray():
    """`reward-audit compare` on the copied run folder, in a process where Ray cannot be imported."""
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from reward_audit.cli import main\n"
        f"main(['compare', '--verbose', {RAY253_DROP!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "DROP       train module shared: DROP in 8/8 episodes" in proc.stdout
    assert f"episode {RAY253_EPISODE}" in proc.stdout


# --------------------------------------------------------------------------- Ray 2.12: chunk LEAK
# fixtures/runs/ray212_newstack_leak: a real Ray 2.12.0 run on the experimental new API stack
# (fixtures/make_fixtures.py, `ray212_newstack_leak`); ScaledRewardsEnv agents 0, 1 (paid 1 and
# 10 per step x U(0.5, 1.5)), 30-step episodes in 16-step fragments, policies p1..p4 seated per
# episode by map_four_policies_by_episode. Read by hand from the Parquet files with pyarrow:
# train episode db3f736d... ran over three sample() calls of the local runner (chunk_seq 11, 12,
# 13: 12 + 16 + 2 steps); crc32(id) % 10 == 3, so agent 0 sat as p1 and agent 1 as p4.
RAY212_LEAK = os.path.join(RUNS, "ray212_newstack_leak")
RAY212_EPISODE = "db3f736daa464b4ea4af48561da230a1"
RAY212_CHUNKS = {  # chunk_seq -> {agent: reward the env paid in that chunk}
    11: {"0": 10.729686585474395, "1": 135.0741848773245},  # 12 steps
    12: {"0": 16.483276175821505, "1": 148.67421682166108},  # 16 steps
    13: {"0": 1.4393988320785245, "1": 26.062945731070943},  # 2 steps, final
}
RAY212_TRUTH = {"0": 28.652361593374422, "1": 309.81134743005657}  # each agent's own three chunks
RAY212_REPORTED = {("0", "p1"): 312.40076329236, ("1", "p4"): 337.02431019135247}  # RLlib 2.12's RolloutMetrics.agent_rewards
RAY212_EARLIER = {"0": 10.729686585474395 + 16.483276175821505, "1": 135.0741848773245 + 148.67421682166108}  # chunks 11 + 12
RAY212_EVAL_EPISODE = "531abd9ef38342c3a68f55d2e44a7626"  # evaluation: one 30-step chunk, values are right
RAY212_EVAL = {("0", "p1"): 28.520051161140547, ("1", "p2"): 331.98647982301526}


def test_ray212_fixture_numbers_by_hand():
    """The Parquet files alone (no reward_audit code) show RLlib 2.12's arithmetic: each
    policy value = its agent's final chunk + the earlier chunks of *both* agents."""
    raw = [r for r in _parquet_rows(RAY212_LEAK, "raw_rewards") if r["episode_id"] == RAY212_EPISODE]
    assert {(r["chunk_seq"], r["agent_id"]): r["reward"] for r in raw} == {(c, a): v for c, agents in RAY212_CHUNKS.items() for a, v in agents.items()}
    assert {(r["agent_id"], r["module_id"]) for r in raw} == {("0", "p1"), ("1", "p4")}
    assert sorted((r["chunk_seq"], r["n_rewards"], r["episode_done"]) for r in raw if r["agent_id"] == "0") == [(11, 12, False), (12, 16, False), (13, 2, True)]
    assert {r["pre_obs_reward"] for r in raw} == {0.0}
    reported = {(r["kind"], r["agent_id"], r["module_id"]): r["value"] for r in _parquet_rows(RAY212_LEAK, "reported_episodes") if r["episode_id"] == RAY212_EPISODE}
    assert {(a, m): v for (k, a, m), v in reported.items() if k == "policy"} == RAY212_REPORTED
    for agent in "01":
        assert sum(c[agent] for c in RAY212_CHUNKS.values()) == pytest.approx(RAY212_TRUTH[agent], abs=1e-9)
    whole_earlier = RAY212_EARLIER["0"] + RAY212_EARLIER["1"]
    assert RAY212_REPORTED[("0", "p1")] == pytest.approx(RAY212_CHUNKS[13]["0"] + whole_earlier, abs=1e-9)
    assert RAY212_REPORTED[("1", "p4")] == pytest.approx(RAY212_CHUNKS[13]["1"] + whole_earlier, abs=1e-9)
    # The excess is the *other* agent's earlier-chunk rewards: 283.748... for p1, 27.213... for p4.
    assert RAY212_REPORTED[("0", "p1")] - RAY212_TRUTH["0"] == pytest.approx(RAY212_EARLIER["1"], abs=1e-9)
    assert RAY212_REPORTED[("1", "p4")] - RAY212_TRUTH["1"] == pytest.approx(RAY212_EARLIER["0"], abs=1e-9)
    assert reported[("episode", None, None)] == pytest.approx(RAY212_TRUTH["0"] + RAY212_TRUTH["1"], abs=1e-9)  # right
    eval_raw = {(r["agent_id"], r["module_id"]): r["reward"] for r in _parquet_rows(RAY212_LEAK, "raw_rewards") if r["episode_id"] == RAY212_EVAL_EPISODE}
    eval_reported = {(r["agent_id"], r["module_id"]): r["value"] for r in _parquet_rows(RAY212_LEAK, "reported_episodes") if r["episode_id"] == RAY212_EVAL_EPISODE and r["kind"] == "policy"}
    assert eval_raw == eval_reported == RAY212_EVAL


def test_ray212_fixture_leaks():
    audit = compare(RAY212_LEAK)
    assert audit.manifest["ray_version"] == "2.12.0" and audit.manifest["adapter"] == "experimental-new-stack-2.1x"
    by_key = {(f.phase, f.kind, f.key): f for f in audit.findings}
    failing = {k for k, f in by_key.items() if f.verdict.is_failure}
    assert failing == {("train", "policy", p) for p in ("p1", "p2", "p3", "p4")}
    for p in ("p1", "p2", "p3", "p4"):
        f = by_key[("train", "policy", p)]
        assert f.verdict == Verdict.LEAK and f.counts == {"LEAK": f.episodes}
    assert by_key[("train", "episode", "return")].verdict == Verdict.CLEAN
    for key in [k for k in by_key if k[0] == "evaluation" and k[1] in ("policy", "episode")]:
        assert by_key[key].verdict == Verdict.CLEAN, by_key[key]
    assert by_key[("evaluation", "episode", "return")].episodes == 4  # 2 iterations x 2 episodes
    p1, p4 = by_key[("train", "policy", "p1")], by_key[("train", "policy", "p4")]
    [e1] = [e for e in p1.evidence if e.episode_id == RAY212_EPISODE]
    assert (e1.chunks, e1.agent_id, e1.reported) == (3, "0", RAY212_REPORTED[("0", "p1")])
    assert e1.truth == pytest.approx(RAY212_TRUTH["0"], abs=1e-9) and e1.difference == pytest.approx(RAY212_EARLIER["1"], abs=1e-9)
    assert e1.explanation.startswith("reported = truth + agent 1's earlier-chunk rewards (+283.748)"), e1.explanation
    [e4] = [e for e in p4.evidence if e.episode_id == RAY212_EPISODE]
    assert e4.difference == pytest.approx(RAY212_EARLIER["0"], abs=1e-9)
    assert e4.explanation.startswith("reported = truth + agent 0's earlier-chunk rewards (+27.213)"), e4.explanation
    # No single-chunk training episode here (30 steps > 16-step fragments); every wrong value is multi-chunk.
    train = audit.episodes[audit.episodes["phase"] == "train"]
    assert (train["chunks"] >= 2).all()
    assert (audit.episodes.loc[audit.episodes["phase"] == "evaluation", "chunks"] == 1).all()


def test_ray212_fixture_tap_matches_the_env_ledger():
    from helpers import assert_raw_matches_ledger

    with open(os.path.join(RAY212_LEAK, "env_ledger.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 21  # 17 training + 4 evaluation episodes finished
    assert_raw_matches_ledger(load_run(RAY212_LEAK), lines)


# --------------------------------------------------------------------------- Ray 2.12: metrics LEAK, batches CLEAN
# fixtures/runs/ray212_seed_learning: the same Ray 2.12.0 seed scenario, recorded with the
# training batches (fixtures/make_fixtures.py, `ray212_seed_learning`). Read by hand from the
# Parquet files with pyarrow: train episode 189dddfc... ran over three sample() calls of the
# local runner (chunk_seq 3, 4, 5: 4 + 16 + 10 steps); crc32(id) % 10 == 0, so agent 0 sat as
# the frozen p3 and agent 1 as p2. The batch rows of each chunk carry what the env paid that
# agent in that chunk (the last digits of chunk 5's agent 0 differ: np.sum over the batch's 10
# rewards vs the tap's running sum).
RAY212_LEARN = os.path.join(RUNS, "ray212_seed_learning")
LEARN_EPISODE = "189dddfcdc97418f91f4a4ced7703b27"
LEARN_RAW = {  # (chunk_seq, agent) -> reward the env paid (raw_rewards)
    (3, "0"): 3.684246658250431, (3, "1"): 39.70254073935578,
    (4, "0"): 16.379773966527836, (4, "1"): 155.35558936264923,
    (5, "0"): 10.684440264887021, (5, "1"): 93.9135750997229,
}
LEARN_BATCH = {**LEARN_RAW, (5, "0"): 10.684440264887023}  # batch_rewards: what sample() handed to training
LEARN_REPORTED = {("0", "p3"): 225.8065909916703, ("1", "p2"): 309.03572582650617}  # RLlib 2.12's RolloutMetrics.agent_rewards
# Counted by hand over the 17 finished training episodes' raw rows: seats per policy, and the
# mean of each policy's per-episode truth (= the mean of its per-episode batch sums).
LEARN_SEATS = {"p1": 13, "p2": 11, "p3": 4, "p4": 6}
LEARN_TRUTH_MEAN = {"p1": 30.134364766403067, "p2": 298.7928676635655, "p3": 30.768480794419247, "p4": 294.7938123742968}
BOTH_PHASES = "metrics: LEAK · training batches: CLEAN — the policies were trained on the right rewards; only the reported numbers are wrong"


def test_ray212_learning_fixture_numbers_by_hand():
    """The Parquet files alone: the frozen p3's and the trained p2's batches hold exactly
    their own agent's rewards, chunk by chunk; RLlib's reported values hold the other
    agent's earlier chunks on top."""
    raw = [r for r in _parquet_rows(RAY212_LEARN, "raw_rewards") if r["episode_id"] == LEARN_EPISODE]
    assert {(r["chunk_seq"], r["agent_id"]): r["reward"] for r in raw} == LEARN_RAW
    assert {(r["agent_id"], r["module_id"]) for r in raw} == {("0", "p3"), ("1", "p2")} and {r["pre_obs_reward"] for r in raw} == {0.0}
    assert sorted((r["chunk_seq"], r["n_rewards"], r["episode_done"]) for r in raw if r["agent_id"] == "0") == [(3, 4, False), (4, 16, False), (5, 10, True)]
    batch = [r for r in _parquet_rows(RAY212_LEARN, "batch_rewards") if r["episode_id"] == LEARN_EPISODE]
    assert {(r["chunk_seq"], r["agent_id"]): r["reward"] for r in batch} == LEARN_BATCH
    assert {(r["agent_id"], r["module_id"], r["phase"]) for r in batch} == {("0", "p3", "train"), ("1", "p2", "train")}
    assert sorted((r["chunk_seq"], r["n_rewards"]) for r in batch if r["agent_id"] == "1") == [(3, 4), (4, 16), (5, 10)]
    truth = {a: sum(v for (_, agent), v in LEARN_RAW.items() if agent == a) for a in "01"}  # 30.7484..., 288.9717...
    trained_on = {a: sum(v for (_, agent), v in LEARN_BATCH.items() if agent == a) for a in "01"}
    assert trained_on["0"] == pytest.approx(truth["0"], abs=1e-12) and trained_on["1"] == pytest.approx(truth["1"], abs=1e-12)
    reported = {(r["agent_id"], r["module_id"]): r["value"] for r in _parquet_rows(RAY212_LEARN, "reported_episodes") if r["episode_id"] == LEARN_EPISODE and r["kind"] == "policy"}
    assert reported == LEARN_REPORTED
    earlier = {a: LEARN_RAW[(3, a)] + LEARN_RAW[(4, a)] for a in "01"}
    assert LEARN_REPORTED[("0", "p3")] - truth["0"] == pytest.approx(earlier["1"], abs=1e-9)  # +195.058: agent 1's chunks 3, 4
    assert LEARN_REPORTED[("1", "p2")] - truth["1"] == pytest.approx(earlier["0"], abs=1e-9)  # +20.064: agent 0's chunks 3, 4
    # Nothing from evaluation: its samples train nothing.
    assert {r["phase"] for r in _parquet_rows(RAY212_LEARN, "batch_rewards")} == {"train"}


def test_ray212_learning_fixture_metrics_leak_and_batches_are_clean():
    audit = compare(RAY212_LEARN)
    assert audit.manifest["ray_version"] == "2.12.0" and audit.manifest["adapter"] == "experimental-new-stack-2.1x"
    by_key = {(f.phase, f.kind, f.key): f for f in audit.findings}
    assert {k for k, f in by_key.items() if f.verdict.is_failure} == {("train", "policy", p) for p in LEARN_SEATS}
    for p, seats in LEARN_SEATS.items():
        metric, learned = by_key[("train", "policy", p)], by_key[("learning", "module", p)]
        assert (metric.verdict, metric.episodes, metric.counts) == (Verdict.LEAK, seats, {"LEAK": seats})
        assert (learned.verdict, learned.episodes) == (Verdict.CLEAN, seats), str(learned)
        assert learned.truth == pytest.approx(LEARN_TRUTH_MEAN[p], abs=1e-9) and learned.reported == pytest.approx(LEARN_TRUTH_MEAN[p], abs=1e-9)
        assert metric.truth == pytest.approx(LEARN_TRUTH_MEAN[p], abs=1e-9) and metric.reported > metric.truth + 10
    for agent in "01":
        assert (by_key[("learning", "agent", agent)].verdict, by_key[("learning", "agent", agent)].episodes) == (Verdict.CLEAN, 17)
    assert {k for k in by_key if k[0] == "learning"} == {("learning", "module", p) for p in LEARN_SEATS} | {("learning", "agent", a) for a in "01"}
    assert {by_key[k].verdict for k in by_key if k[0] == "evaluation"} == {Verdict.CLEAN}
    [e] = [e for e in by_key[("train", "policy", "p3")].evidence if e.episode_id == LEARN_EPISODE]
    assert (e.chunks, e.reported) == (3, LEARN_REPORTED[("0", "p3")])
    from reward_audit.report import bottom_line

    assert bottom_line(audit) == BOTH_PHASES


def test_ray212_learning_fixture_cli_without_ray():
    """Both phases and the bottom line from `reward-audit compare`, with Ray unimportable."""
    code = "import sys; sys.modules['ray'] = None\nfrom reward_audit.cli import main\n" f"main(['compare', {RAY212_LEARN!r}])\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.split()[:3] == ["train", "policy", "p3"] and line.endswith("LEAK") for line in lines), proc.stdout
    assert any(line.split()[:3] == ["learning", "module", "p3"] and line.endswith("CLEAN") for line in lines), proc.stdout
    assert BOTH_PHASES in lines, proc.stdout


def test_ray212_learning_fixture_tap_matches_the_env_ledger():
    from helpers import assert_raw_matches_ledger

    with open(os.path.join(RAY212_LEARN, "env_ledger.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 21  # 17 training + 4 evaluation episodes finished
    assert_raw_matches_ledger(load_run(RAY212_LEARN), lines)


# ----------------------------------------------------------------- attribution and dashboards


def test_attribution_rederives_both_bugs_from_the_recorded_runs():
    """From data alone: 2.12 = own rewards + the other agent's earlier chunks; 2.53 = every
    agent's earlier chunks + only the last agent's final chunk."""
    a212 = compare(os.path.join(RUNS, "ray212_newstack_leak"))
    p1 = next(f for f in a212.findings if (f.phase, f.kind, f.key) == ("train", "policy", "p1"))
    assert p1.attribution.startswith(
        "reported(policy p1) ≈ 1.00 × agent 0 earlier chunks (own) + 1.00 × agent 0 final chunks (own) + 1.00 × agent 1 earlier chunks (other) (R² 1.0000"
    )
    a253 = compare(os.path.join(RUNS, "ray253_shared_module_drop"))
    shared = next(f for f in a253.findings if (f.phase, f.kind, f.key) == ("train", "module", "shared"))
    assert shared.attribution.startswith(
        "reported(module shared) ≈ 1.00 × agent 0 earlier chunks (own) + 1.00 × agent 1 earlier chunks (own) + 1.00 × agent 2 earlier chunks (own) + 1.00 × agent 2 final chunks (own) (R² 1.0000"
    )


def test_dashboards_of_the_recorded_runs_are_rebuilt_exactly_and_shown_wrong():
    """Our window models reproduce every number RLlib displayed from RLlib's own per-episode
    values, and from the truth show how far off the dashboards were."""
    for name, path, wrong in (
        ("ray212_newstack_leak", "policy_reward_mean/p1", True),
        ("ray253_shared_module_drop", "env_runners/module_episode_returns_mean/shared", True),
        ("ray253_shared_module_drop", "env_runners/agent_episode_returns_mean/0", False),
    ):
        audit = compare(os.path.join(RUNS, name))
        assert audit.dashboard and all(not d.unreconstructable for d in audit.dashboard), name
        [d] = [d for d in audit.dashboard if d.phase == "train" and d.path == path]
        assert bool(d.wrong_iterations) is wrong, (name, path, d.table.to_string())
        if wrong:
            assert d.first_wrong == 1
