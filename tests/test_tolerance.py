"""An exact tolerance (issue 8): each value may differ from the truth only by the worst-case
rounding of the float arithmetic RLlib performs on its rewards — so a leak far below any
relative tolerance is found, and a cancelling sum that loses digits in RLlib's order is not a
false alarm. Raw rows come from the real recorder (compensated sums, Σ|r|, precision);
reported values are summed the way RLlib sums them (one by one, per chunk, in the rewards'
dtype)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reward_audit import Verdict, compare
from reward_audit.recorder import RunnerRecorder
from reward_audit.schema import Phase
from reward_audit.store import RunWriter
from synth import manifest


def rllib_sum(values) -> float:
    """RLlib's episode return: ``sum()`` one by one, in the rewards' own dtype."""
    if not len(values):
        return 0.0
    total = values[0] * 0
    for v in values:
        total = total + v
    return float(total)


def record(folder, episodes: dict[str, dict[str, list[list]]], mapping: dict[str, str], reported: dict[tuple[str, str], float]) -> str:
    """``episodes[eid][agent]`` = the rewards of each chunk; ``reported[(eid, module)]``."""
    rec = RunnerRecorder(Phase.TRAIN, 1, mapping_of=lambda e: mapping)
    for eid, agents in episodes.items():
        n_chunks = len(next(iter(agents.values())))
        rec.tap_reset(0, {a: 0 for a in agents})
        for c in range(n_chunks):
            for step in range(max(len(chunks[c]) for chunks in agents.values())):
                rewards = {a: chunks[c][step] for a, chunks in agents.items() if step < len(chunks[c])}
                rec.tap_step(0, {a: 0 for a in agents}, rewards)
                rec.episode_step(eid, 0, None)
            if c == n_chunks - 1:
                rec.episode_ends(eid, 0, None, mapping=mapping)
            rec.sample_ends()
    drained = rec.drain()
    writer = RunWriter(str(folder))
    writer.write_manifest(manifest())
    writer.write_rows("raw_rewards", [{**r, "iteration": 1} for r in drained["raw_rewards"]], "000001")
    rows = [
        {"phase": "train", "runner_id": drained["runner_id"], "episode_id": eid, "kind": "module", "agent_id": None, "module_id": m,
         "value": v, "semantics": "episode_sum_counted", "metrics_call": 0, "iteration": 1}
        for (eid, m), v in reported.items()
    ]
    writer.write_rows("reported_episodes", rows, "000001")
    return str(folder)


def module_return(agents: dict[str, list[list]], mapping, module) -> float:
    """What RLlib reports for a module: per agent, per chunk summed in order, chunks added."""
    total = 0.0
    for a, chunks in agents.items():
        if mapping[a] == module:
            total += sum(rllib_sum(c) for c in chunks)
    return total


def verdict(path: str, module: str = "pa") -> Verdict:
    [f] = [f for f in compare(path).findings if (f.kind, f.key) == ("module", module)]
    return f.verdict


MAPPING = {"a": "pa", "b": "pb"}


def test_a_small_leak_in_a_large_return_is_a_leak(tmp_path):
    # Agent b earns 0.009 in an episode where pa's return is 1,000: far below rtol=1e-5,
    # far above float rounding.
    episodes = {"e": {"a": [[100.0] * 10], "b": [[0.009]]}}
    path = record(tmp_path, episodes, MAPPING, {("e", "pa"): 1000.0 + 0.009, ("e", "pb"): 0.009})
    assert verdict(path) == Verdict.LEAK
    assert compare(path, atol=1e-6, rtol=1e-5).ok  # what the old default tolerance let through


def test_a_whole_return_leaked_into_rewards_of_1e12_is_a_leak(tmp_path):
    episodes = {"e": {"a": [[1e12, 1e12], [1e12]], "b": [[2500.0], [2500.0]]}}
    truth_a = module_return(episodes["e"], MAPPING, "pa")
    path = record(tmp_path, episodes, MAPPING, {("e", "pa"): truth_a + 5000.0, ("e", "pb"): 5000.0})
    assert verdict(path) == Verdict.LEAK


def test_cancelling_rewards_summed_in_rllibs_order_are_clean(tmp_path):
    # ±1e12 rewards that cancel to -24.24: summed one by one, RLlib loses digits; that is
    # rounding, not a finding.
    rng = np.random.default_rng(0)
    big = rng.uniform(1e11, 1e12, 20)
    rewards = [x for b in big for x in (b, -b + rng.uniform(-2, 2))]
    rewards.append(-24.24 - float(np.sum(np.array(rewards, dtype=np.longdouble))))
    episodes = {"e": {"a": [rewards], "b": [[1.0]]}}
    reported = module_return(episodes["e"], MAPPING, "pa")
    import math

    assert abs(reported - math.fsum(rewards)) > 1e-6  # RLlib's order really does lose digits here
    path = record(tmp_path, episodes, MAPPING, {("e", "pa"): reported, ("e", "pb"): 1.0})
    assert verdict(path) == Verdict.CLEAN


def test_many_tiny_rewards_are_clean(tmp_path):
    episodes = {"e": {"a": [[1e-9] * 100_000], "b": [[1.0]]}}
    path = record(tmp_path, episodes, MAPPING, {("e", "pa"): module_return(episodes["e"], MAPPING, "pa"), ("e", "pb"): 1.0})
    assert verdict(path) == Verdict.CLEAN


def test_float32_rewards_summed_in_float32_are_clean(tmp_path):
    rewards = [np.float32(v) for v in np.random.default_rng(1).uniform(0, 1000, 3000)]
    episodes = {"e": {"a": [rewards], "b": [[np.float32(1.0)]]}}
    reported = module_return(episodes["e"], MAPPING, "pa")
    assert abs(reported - float(np.sum(np.array(rewards, dtype=np.float64)))) > 1e-3  # float32 accumulation error
    path = record(tmp_path, episodes, MAPPING, {("e", "pa"): reported, ("e", "pb"): 1.0})
    assert verdict(path) == Verdict.CLEAN


magnitudes = st.sampled_from([1e-9, 1e-3, 1.0, 1e3, 1e9, 1e12])


@st.composite
def episode(draw):
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    def rewards(n):
        scale = draw(magnitudes)
        return [dtype(draw(st.floats(-1, 1, allow_nan=False, allow_infinity=False)) * scale) for _ in range(n)]
    a = [rewards(draw(st.integers(1, 40))) for _ in range(draw(st.integers(1, 3)))]
    b = [rewards(draw(st.integers(1, 5))) for _ in a]
    return {"a": a, "b": b}


def _bound(ep: dict, reported: float) -> float:
    """The documented bound for module pa: 1.01·m·u·Σ|r| + 4·u₆₄·|truth|, m = n + 2·(chunks + agents) + 4."""
    n = sum(len(c) for c in ep["a"])
    bits = 24 if isinstance(ep["a"][0][0], np.float32) else 53
    return 1.01 * (n + 2 * (len(ep["a"]) + 1) + 4) * 2.0**-bits * sum(abs(float(x)) for c in ep["a"] for x in c) + 4 * 2.0**-53 * abs(reported)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ep=episode(), fault=st.sampled_from(["none", "leak", "drop"]), k=st.floats(2.0, 10.0))
def test_faults_just_above_the_bound_are_found_and_no_fault_is_clean(tmp_path_factory, ep, fault, k):
    """Agent b earns k × the rounding bound of pa's return (k in 2..10) and leaks into pa: a
    failing verdict, always. A drop of a's last chunk above the bound: failing. An exact
    RLlib-order sum never fails, at any magnitude or precision."""
    folder = tmp_path_factory.mktemp("tol")
    truth_order = module_return(ep, MAPPING, "pa")
    bound = _bound(ep, truth_order)
    dtype = type(ep["a"][0][0])
    reported = truth_order
    if fault == "leak":
        if bound == 0.0:
            return
        ep = {"a": ep["a"], "b": [[dtype(k * bound)]] + [[] for _ in ep["a"][1:]]}
        if float(ep["b"][0][0]) <= bound:  # underflowed in the rewards' own type: no leak to find
            return
        reported += float(ep["b"][0][0])
    elif fault == "drop":
        a_last = sum(float(x) for x in ep["a"][-1])
        if abs(a_last) <= 2 * bound or len(ep["a"]) < 2:
            return
        reported -= a_last
    pb = module_return(ep, MAPPING, "pb")
    path = record(folder, {"e": ep}, MAPPING, {("e", "pa"): reported, ("e", "pb"): pb})
    got = verdict(path)
    if fault == "none":
        assert got == Verdict.CLEAN
    else:
        assert got.failing, (fault, got)


@pytest.mark.parametrize("override", [("--atol", "nan"), ("--rtol", "-1"), ("--atol", "inf")])
def test_tolerance_overrides_must_be_finite_and_non_negative(tmp_path, override):
    from click.testing import CliRunner

    from reward_audit.cli import main

    path = record(tmp_path, {"e": {"a": [[1.0]], "b": [[1.0]]}}, MAPPING, {("e", "pa"): 1.0, ("e", "pb"): 1.0})
    result = CliRunner().invoke(main, ["compare", path, *override])
    assert result.exit_code == 2 and "a tolerance is a finite number ≥ 0" in result.output
