"""attribution: per-episode explanations and the least-squares fit across episodes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from reward_audit.attribution import explain, feature_row, fit


def feats(**agents):
    return pd.DataFrame({a: {"earlier": e, "final": f} for a, (e, f) in agents.items()}).T


def test_explain_leak_drop_mismatch():
    f = feats(a=(16.0, 14.0), b=(160.0, 140.0))
    assert explain(160.0, f, {"a"}, 1e-9)[0] == "LEAK"
    verdict, text = explain(-14.0, f, {"a"}, 1e-9)
    assert verdict == "DROP" and "agent a's final-chunk rewards (14)" in text
    assert explain(0.5, f, {"a"}, 1e-9)[0] == "MISMATCH"


def test_explain_reports_ambiguity():
    # a's earlier and final chunks are both 10: a missing 10 could be either.
    f = feats(a=(10.0, 10.0), b=(3.0, 5.0))
    verdict, text = explain(-10.0, f, {"a"}, 1e-9)
    assert verdict == "DROP"
    assert "equally explained by 1 other combination" in text


def test_explain_prefers_a_clean_story_in_a_zero_sum_game():
    # RLlib lost a's terminal +1 (connect four, ray-project/ray#44677): "− a's final chunk" and
    # "+ b's final chunk (−1)" are the same number; the DROP is named, the shortfall listed.
    f = feats(a=(0.0, 1.0), b=(0.0, -1.0))
    verdict, text = explain(-1.0, f, {"a"}, 1e-9)
    assert verdict == "DROP" and text.startswith("reported = truth − agent a's final-chunk rewards (1)")
    assert "equally explained by 1 other combination(s), e.g. + agent b's final-chunk rewards (-1) (a shortfall" in text
    # a's −1 lost: "+ b's +1" would be a LEAK; the DROP of a's own reward is named first.
    f = feats(a=(0.0, -1.0), b=(0.0, 1.0))
    verdict, text = explain(1.0, f, {"a"}, 1e-9)
    assert verdict == "DROP" and "e.g. + agent b's final-chunk rewards (+1)" in text


def simulate(pattern, n=40, seed=0):
    """Episodes with random per-chunk rewards for agents a (own) and b (other)."""
    rng = np.random.default_rng(seed)
    rows, reported = [], []
    for _ in range(n):
        ae, af, be, bf = rng.uniform(1, 100, 4)
        rows.append(feature_row(feats(a=(ae, af), b=(be, bf)), {"a"}))
        reported.append(pattern(ae, af, be, bf))
    return np.array(reported), rows


def test_fit_rederives_the_2_12_leak():
    reported, rows = simulate(lambda ae, af, be, bf: ae + af + be)  # + other's earlier chunks
    model = fit(reported, rows)
    coef = dict(model.terms)
    assert coef["agent a earlier chunks (own)"] == pytest.approx(1.0)
    assert coef["agent a final chunks (own)"] == pytest.approx(1.0)
    assert coef["agent b earlier chunks (other)"] == pytest.approx(1.0)
    assert "agent b final chunks (other)" not in coef
    assert model.r2 == pytest.approx(1.0) and not model.unseparable
    assert "1.00 × agent b earlier chunks (other)" in model.formula()


def test_fit_rederives_the_2_53_drop():
    rows, reported = [], []
    rng = np.random.default_rng(1)
    for _ in range(30):
        v = rng.uniform(1, 100, 6)
        rows.append(feature_row(feats(a=(v[0], v[1]), b=(v[2], v[3]), c=(v[4], v[5])), {"a", "b", "c"}))
        reported.append(v[0] + v[2] + v[4] + v[5])  # only c's final chunk survives
    coef = dict(fit(np.array(reported), rows).terms)
    assert "agent a final chunks (own)" not in coef and "agent b final chunks (own)" not in coef
    assert coef["agent c final chunks (own)"] == pytest.approx(1.0)


def test_fit_says_when_collinear_agents_cannot_be_separated():
    # Constant rewards: agent b always earns 10x agent a, so a and b are indistinguishable.
    rows = [feature_row(feats(a=(k, 30 - k), b=(10 * k, 10 * (30 - k))), {"a"}) for k in (16.0, 14.0, 12.0)]
    reported = np.array([30 + 10 * 16, 30 + 10 * 14, 30 + 10 * 12])
    model = fit(reported, rows)
    assert model.unseparable
    assert "cannot separate" in model.formula()


def test_a_leaked_term_brings_its_own_rounding():
    """Ray 2.12's chunk leak, summed in floats the way RLlib does it: the policy value of agent
    a is a's final chunk + a's earlier chunk + b's earlier chunk (b paid 10x as much). The row's
    tolerance bounds the rounding of a's own sum only; the leaked sum of b's rewards rounds on
    its own, so a match must allow for it too (a flaky MISMATCH on real 2.12 runs before)."""
    from reward_audit.recorder import rounding_bound

    rng = np.random.default_rng(7)
    beyond_row_tol = 0
    for _ in range(500):
        a_early, a_final = rng.uniform(0.5, 1.5, 8), rng.uniform(0.5, 1.5, 4)
        b_early, b_final = 10 * rng.uniform(0.5, 1.5, 8), 10 * rng.uniform(0.5, 1.5, 4)
        chunk = lambda r: float(sum(r.tolist()))  # one reward after the other, as RLlib adds them # noqa: E731
        reported = chunk(a_final) + chunk(a_early) + chunk(b_early)
        truth = math.fsum(np.concatenate([a_early, a_final]).tolist())
        tol = float(rounding_bound(12, truth, 53, 2, 1))
        b_bound = float(rounding_bound(12, math.fsum(np.concatenate([b_early, b_final]).tolist()), 53, 2, 1))
        earlier_b = math.fsum(b_early.tolist())
        f = {"a": (math.fsum(a_early.tolist()), math.fsum(a_final.tolist()), tol), "b": (earlier_b, math.fsum(b_final.tolist()), b_bound)}
        diff = reported - truth
        beyond_row_tol += abs(diff - earlier_b) > tol
        verdict, text = explain(diff, f, {"a"}, tol)
        assert verdict == "LEAK" and text.startswith("reported = truth + agent b's earlier-chunk rewards"), (diff, text)
    assert beyond_row_tol > 0  # the rounding this test is about did occur
