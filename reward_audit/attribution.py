"""Explaining one wrong reported value: which agents' rewards, from which chunks, make up
the difference between what RLlib reported and the truth.

For one episode each agent b has two features: its counted rewards in the episode's
*earlier* chunks (E_b) and in its *final* chunk (F_b). A reported value should be
Σ_{own} (E_a + F_a). We look for the simplest combination

    difference = Σ_{b not own} (x_b E_b + y_b F_b) − Σ_{a own} (x_a E_a + y_a F_a),  x, y ∈ {0, 1}

that matches within tolerance. Terms from other agents make it a LEAK; missing terms of
the row's own agents make it a DROP; no combination makes it a MISMATCH. The two shipped
bugs fall out as patterns: Ray 2.12 = +others' earlier chunks, Ray 2.53 = −final chunks of
all but one of the module's agents (docs/ray_versions.md).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

MAX_AGENTS_EXACT = 6  # 4**6 = 4096 combinations; beyond that, agents are grouped


Features = "pd.DataFrame | dict[str, tuple[float, float] | tuple[float, float, float]]"  # agent -> (earlier, final[, bound])


def _as_dict(features: Any) -> dict[str, tuple[float, float, float]]:
    """An episode's features as ``{agent: (earlier, final, bound)}``, where ``bound`` is the
    rounding bound of RLlib's sum of the agent's rewards (``recorder.rounding_bound``; 0 when
    not given). A DataFrame indexed by agent with ``earlier`` / ``final`` (and optionally
    ``bound``) columns is accepted too, and so are ``(earlier, final)`` pairs."""
    if isinstance(features, dict):
        return {a: (v[0], v[1], _finite(v[2]) if len(v) > 2 else 0.0) for a, v in features.items()}
    bounds = features["bound"] if "bound" in features else [0.0] * len(features)
    return {str(a): (float(e), float(f), _finite(b)) for a, e, f, b in zip(features.index, features["earlier"], features["final"], bounds)}


def _finite(bound: Any) -> float:
    """An unknown bound (NaN: Σ|r| was not recorded) adds no tolerance."""
    bound = float(bound)
    return bound if math.isfinite(bound) else 0.0


def _terms(features: Any, own: set[str]) -> list[tuple[str, str, float, float]]:
    """(agent label, part, signed value, rounding bound) candidates; grouped when there are
    many agents. A part's bound is its agent's: a sub-sum rounds no worse than the whole."""
    features = _as_dict(features)
    terms = []
    if len(features) <= MAX_AGENTS_EXACT:
        for agent, (earlier, final, bound) in features.items():
            sign = -1.0 if agent in own else 1.0
            terms.append((agent, "earlier", sign * earlier, bound))
            terms.append((agent, "final", sign * final, bound))
        return terms
    for label, mine, sign in (("own agents", True, -1.0), ("other agents", False, 1.0)):
        parts = [v for a, v in features.items() if (a in own) is mine]
        bound = math.fsum(b for _, _, b in parts)
        terms.append((label, "earlier", sign * math.fsum(e for e, _, _ in parts), bound))
        terms.append((label, "final", sign * math.fsum(f for _, f, _ in parts), bound))
    return terms


def explain(difference: float, features: pd.DataFrame, own: set[str], tol: float) -> tuple[str, str]:
    """Return ``(verdict, explanation)`` for ``reported − truth = difference``: LEAK when the
    excess is other agents' rewards, DROP when own agents' rewards are missing, MISMATCH
    otherwise (including a combination of both, and a shortfall made of other agents'
    negative rewards)."""
    if not math.isfinite(difference):
        return "MISMATCH", f"difference {difference:+.6g}: a non-finite value, which no sum of finite rewards gives"
    terms = [t for t in _terms(features, own) if t[2] != 0.0]
    values = np.array([t[2] for t in terms]) if terms else np.zeros(0)
    bounds = np.array([t[3] for t in terms]) if terms else np.zeros(0)
    best: list[tuple[int, ...]] = []
    # Smallest explanations first; stop at the first size that matches. ``tol`` bounds the
    # rounding of the row's own sum; each term RLlib added (another agent's rewards) brings
    # its own rounding, so a combination matches within ``tol`` + its terms' bounds.
    for size in range(1, len(terms) + 1):
        for combo in itertools.combinations(range(len(terms)), size):
            if abs(values[list(combo)].sum() - difference) <= tol + bounds[list(combo)].sum():
                best.append(combo)
        if best:
            break
        if size >= 4 and len(terms) > 10:  # keep it cheap; larger sums are reported as MISMATCH
            break
    if not best:
        return "MISMATCH", f"difference {difference:+.6g} is not a sum of any agents' earlier/final-chunk rewards"

    def describe(combo: tuple[int, ...]) -> tuple[str, str]:
        combo = tuple(sorted(combo, key=lambda i: (terms[i][0], terms[i][1])))
        leak = [terms[i] for i in combo if (terms[i][0] not in own and terms[i][0] != "own agents")]
        drop = [terms[i] for i in combo if terms[i] not in leak]
        parts = []
        if leak:
            parts.append("+ " + " + ".join(f"agent {a}'s {p}-chunk rewards ({v:+.6g})" for a, p, v, _ in leak))
        if drop:
            parts.append("− " + " − ".join(f"agent {a}'s {p}-chunk rewards ({-v:.6g})" for a, p, v, _ in drop))
        text = "reported = truth " + " ".join(parts)
        if leak and drop:  # some agents' rewards added, others' missing: not one clean story
            return "MISMATCH", text + " (adds other agents' rewards and misses its own)"
        if leak and difference < 0:  # a shortfall is never a leak, even of negative rewards
            return "MISMATCH", text + " (a shortfall: other agents' negative rewards, not called a leak)"
        return ("LEAK" if leak else "DROP"), text

    # Among equally small explanations: DROP, then LEAK, then MISMATCH. In a zero-sum game
    # "− own final chunk" and "+ the other's final chunk" are the same number; that an agent's
    # own reward went missing is the smaller claim (RLlib 2.60 loses terminal rewards across
    # cut(), ray-project/ray#44677), and the alternatives are listed.
    stories = [describe(c) for c in best]
    verdict, text = min(stories, key=lambda s: ("DROP", "LEAK", "MISMATCH").index(s[0]))
    others = {t for _, t in stories} - {text}
    if others:
        text += f"; equally explained by {len(others)} other combination(s), e.g. {sorted(others)[0][len('reported = truth '):]}"
    return verdict, text


# --------------------------------------------------------------------------- across episodes


@dataclass(frozen=True)
class Attribution:
    """Least-squares composition of one key's reported values from the agents' true rewards
    over its affected episodes: ``reported ≈ Σ coefficient × feature``."""

    terms: tuple[tuple[str, float], ...]  # (feature, coefficient), |coefficient| >= 0.01
    r2: float
    max_residual: float
    episodes: int
    unseparable: tuple[tuple[str, ...], ...] = ()  # feature groups the data cannot tell apart
    scale: float = 0.0  # largest |reported| fitted

    def formula(self, name: str = "reported") -> str:
        if not self.terms:
            return f"{name} ≈ 0"
        body = " + ".join(f"{c:.2f} × {f}" for f, c in self.terms).replace("+ -", "− ")
        # A residual at float-rounding level is noise (it changes with summation order): say so.
        residual = "≈ 0 (float rounding)" if self.max_residual <= 1e-9 * max(self.scale, 1.0) else f"{self.max_residual:.3g}"
        text = f"{name} ≈ {body} (R² {self.r2:.4f}, max residual {residual}, {self.episodes} episodes)"
        if self.unseparable:
            groups = "; ".join(" / ".join(g) for g in self.unseparable)
            text += f"; the data cannot separate: {groups} (collinear in these episodes — coefficients among them are not unique)"
        return text


def feature_row(features: Any, own: set[str]) -> dict[str, float]:
    """An episode's features: each agent's earlier / final-chunk counted rewards, labelled
    own (mapped to the key) or other."""
    row = {}
    for agent, (earlier, final, _) in _as_dict(features).items():
        side = "own" if agent in own else "other"
        row[f"agent {agent} earlier chunks ({side})"] = earlier
        row[f"agent {agent} final chunks ({side})"] = final
    return row


def fit(reported: np.ndarray, rows: list[dict[str, float]], tol: float = 1e-9) -> Attribution:
    """Solve ``reported ≈ X β`` (minimum-norm least squares) and say what it cannot separate."""
    X = pd.DataFrame(rows).fillna(0.0)
    X = X.loc[:, (X.abs() > tol).any(axis=0)]
    y = np.asarray(reported, dtype=float)
    if X.shape[1] == 0:
        return Attribution((), 0.0, float(np.abs(y).max()) if len(y) else 0.0, len(y))
    A = X.to_numpy()
    beta, *_ = np.linalg.lstsq(A, y, rcond=None)
    residual = y - A @ beta
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / ss_tot if ss_tot > 0 else (1.0 if np.allclose(residual, 0) else 0.0)
    # Columns involved in the null space cannot be told apart by these episodes.
    _, s, vt = np.linalg.svd(A / np.maximum(np.abs(A).max(axis=0), 1e-300), full_matrices=True)
    rank = int((s > 1e-9 * s.max()).sum()) if len(s) else 0
    groups: list[tuple[str, ...]] = []
    for v in vt[rank:]:
        group = tuple(c for c, w in zip(X.columns, v) if abs(w) > 1e-6)
        if len(group) > 1 and group not in groups:
            groups.append(group)
    terms = tuple((c, float(b)) for c, b in zip(X.columns, beta) if abs(b) >= 0.01)
    return Attribution(terms, r2, float(np.abs(residual).max()), len(y), tuple(groups), float(np.abs(y).max()))
