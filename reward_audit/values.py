"""Step 4 of the reconciliation pass (``tally``): every value of a window's closed episodes
against its truth — RLlib's reported values, the values it should have reported and did
not, and the training batches' values (phase ``learning``, learning.py) — each with the
tolerance of its own arithmetic (``_tolerance``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .learning import learning_values
from .recorder import rounding_bound
from .schema import Phase
from .window import AGENT, EPISODE, KINDS, MODULE, OTHER, POLICY, KeyMap, Window, code_of, factorize

if TYPE_CHECKING:
    from .tally import _Context

_U64 = 2.0**-53


def _combine(w: Window, group: np.ndarray, sel: np.ndarray, n: int, chunks: np.ndarray) -> np.ndarray:
    """The bound of the summed value of several agents' groups (a module's, an episode's)."""
    bits = np.full(n, 53, np.int64)
    if (w.g_bits[sel] != 53).any():
        np.minimum.at(bits, group, w.g_bits[sel])
    return rounding_bound(
        np.bincount(group, weights=w.g_n[sel], minlength=n),
        np.bincount(group, weights=w.g_abs[sel], minlength=n),
        bits,
        chunks,
        np.bincount(group, minlength=n).astype(np.float64),
        unknown=np.bincount(group, weights=w.g_unknown[sel], minlength=n) > 0,
    )


def _tolerance(bound: np.ndarray, truth: np.ndarray, value: np.ndarray, ctx: "_Context") -> np.ndarray:
    """How far a reported value may be from the truth by float rounding alone.

    Explicit ``atol`` / ``rtol``: ``atol + rtol · max(|truth|, |reported|)``. Otherwise the
    worst case of the arithmetic RLlib performs: it adds the value's n rewards one by one
    (per chunk, then chunk returns, then a module's agents) in the rewards' own precision
    (float32 when the env returns float32, else float64), so with m = n + 2·(chunks +
    agents) + 4 additions and unit roundoff u = 2^-bits the error is at most
    γ_m·Σ|r| ≈ m·u·Σ|r| (Higham, *Accuracy and Stability of Numerical Algorithms*, §4.2),
    plus the rounding of our own compensated truth (≤ 2u₆₄|truth|): ``bound`` holds
    1.01·m·u·Σ|r| per value. Values whose Σ|r| was not recorded (schema-1 runs, NaN) fall
    back to ``1e-6 + 1e-5 · max(|truth|, |reported|)``."""
    scale = np.maximum(np.abs(truth), np.abs(value))
    if ctx.atol is not None or ctx.rtol is not None:
        return (ctx.atol or 0.0) + (ctx.rtol or 0.0) * scale
    tol = bound + 4 * _U64 * np.abs(truth)
    unknown = np.isnan(bound)
    if unknown.any():
        tol[unknown] = 1e-6 + 1e-5 * scale[unknown]
        ctx.fallback += int(unknown.sum())
    return tol


def match(w: Window, ctx: "_Context") -> None:
    """Compared values: arrays c_* (reported values with truth, then expected values RLlib
    never reported). Reported values of episodes with no raw rows are orphans."""
    E, na, nm = w.E, max(len(w.agents), 1), len(w.modules) + 1
    live = w.closed & w.has_raw  # compared episodes
    rep_ok = live[w.p_eid]
    w.orphan = ~w.has_raw[w.p_eid]
    idx = np.flatnonzero(rep_ok)
    kind, eid, agent, module = w.p_kind[idx], w.p_eid[idx], w.p_agent[idx], w.p_module[idx]
    # Which kinds RLlib reported for each episode.
    flags = np.zeros((E, 5), bool)
    flags[eid, kind] = True
    # Truth per (episode, agent), per (episode, module), per episode.
    g = w.g_index(np.where(agent >= 0, eid * na + agent, -1))
    g_ok = (g >= 0) & (agent >= 0)
    mg = w.g_module >= 0
    mkeys = w.g_eid[mg] * nm + w.g_module[mg]
    mid, muniq = factorize(mkeys, E * nm)
    msum = np.bincount(mid, weights=w.g_counted[mg], minlength=len(muniq))
    m_index = KeyMap(muniq, E * nm)
    esum = np.bincount(w.g_eid, weights=w.g_counted, minlength=E)
    m_bound = _combine(w, mid, mg, len(muniq), w.ep_chunks[(muniq // nm).astype(np.int64)])
    e_bound = _combine(w, w.g_eid, np.ones(len(w.g_eid), bool), E, w.ep_chunks)
    mclip = np.bincount(mid, weights=w.g_clipped[mg], minlength=len(muniq))
    eclip = np.bincount(w.g_eid, weights=w.g_clipped, minlength=E)
    clipped = np.full(len(idx), np.nan)
    truth = np.zeros(len(idx))
    bound = np.zeros(len(idx))  # the rounding bound of the value's own agents' rewards (none: 0)
    a_rows = kind == AGENT
    truth[a_rows & g_ok] = w.g_counted[g[a_rows & g_ok]]
    bound[a_rows & g_ok] = w.g_bound[g[a_rows & g_ok]]
    clipped[a_rows & g_ok] = w.g_clipped[g[a_rows & g_ok]]
    p_rows = (kind == POLICY) & g_ok
    p_match = p_rows.copy()
    p_match[p_rows] = w.g_module[g[p_rows]] == module[p_rows]
    truth[p_match] = w.g_counted[g[p_match]]
    bound[p_match] = w.g_bound[g[p_match]]
    clipped[p_match] = w.g_clipped[g[p_match]]
    m_rows = kind == MODULE
    mi = m_index(np.where(module[m_rows] >= 0, eid[m_rows] * nm + module[m_rows], -1))
    m_hit = (mi >= 0) & (module[m_rows] >= 0)
    truth[np.flatnonzero(m_rows)[m_hit]] = msum[mi[m_hit]]
    bound[np.flatnonzero(m_rows)[m_hit]] = m_bound[mi[m_hit]]
    clipped[np.flatnonzero(m_rows)[m_hit]] = mclip[mi[m_hit]]
    e_rows = (kind == EPISODE) | (kind == OTHER)
    truth[e_rows] = esum[eid[e_rows]]
    bound[e_rows] = e_bound[eid[e_rows]]
    clipped[e_rows] = eclip[eid[e_rows]]
    # Expected values RLlib never reported (of kinds it reported for that episode).
    def reported(keys: np.ndarray, space: int) -> KeyMap:
        return KeyMap(keys[keys >= 0], space)

    pk = kind == POLICY
    rep_agent = reported(np.where(agent[a_rows] >= 0, eid[a_rows] * na + agent[a_rows], -1), E * na)
    rep_policy = reported(np.where((agent[pk] >= 0) & (module[pk] >= 0), (eid[pk] * na + agent[pk]) * nm + module[pk], -1), E * na * nm)
    rep_module = reported(np.where(module[m_rows] >= 0, eid[m_rows] * nm + module[m_rows], -1), E * nm)
    rep_episode = np.bincount(eid[kind == EPISODE], minlength=E) > 0
    gl = live[w.g_eid]
    miss = []
    sel = gl & flags[w.g_eid, AGENT] & ~rep_agent.has(w.g_eid * na + w.g_agent)
    miss.append((AGENT, w.g_eid[sel], w.g_agent[sel], np.full(sel.sum(), -1), w.g_counted[sel], w.g_bound[sel]))
    sel = gl & mg & flags[w.g_eid, POLICY] & ~rep_policy.has(np.where(mg, (w.g_eid * na + w.g_agent) * nm + w.g_module, -1))
    miss.append((POLICY, w.g_eid[sel], w.g_agent[sel], w.g_module[sel], w.g_counted[sel], w.g_bound[sel]))
    m_eid, m_mod = (muniq // nm).astype(np.int64), (muniq % nm).astype(np.int64)
    sel = live[m_eid] & flags[m_eid, MODULE] & ~rep_module.has(muniq)
    miss.append((MODULE, m_eid[sel], np.full(sel.sum(), -1), m_mod[sel], msum[sel], m_bound[sel]))
    e_all = np.flatnonzero(live & flags[:, EPISODE] & ~rep_episode)
    miss.append((EPISODE, e_all, np.full(len(e_all), -1), np.full(len(e_all), -1), esum[e_all], e_bound[e_all]))
    n_miss = sum(len(x[1]) for x in miss)
    w.c_kind = np.concatenate([kind] + [np.full(len(x[1]), x[0]) for x in miss]).astype(np.int64)
    w.c_kind_name = np.concatenate([w.kind_names[w.p_kind_code[idx]], np.array([KINDS[x[0]] for x in miss for _ in range(len(x[1]))], dtype=object)])
    w.c_kcode = np.concatenate([w.p_kind_code[idx], np.full(n_miss, len(w.kind_names) - 1)])
    w.c_eid = np.concatenate([eid] + [x[1] for x in miss]).astype(np.int64)
    w.c_agent = np.concatenate([agent] + [x[2] for x in miss]).astype(np.int64)
    w.c_module = np.concatenate([module] + [x[3] for x in miss]).astype(np.int64)
    w.c_truth = np.concatenate([truth] + [x[4] for x in miss])
    w.c_value = np.concatenate([w.value[idx], np.zeros(n_miss)])
    w.c_missing = np.concatenate([np.zeros(len(idx), bool), np.ones(n_miss, bool)])
    w.c_ord = np.concatenate([w.ord[idx], np.full(n_miss, np.iinfo(np.int64).max)])
    w.c_call = np.concatenate([w.call[idx], np.full(n_miss, -1)])
    w.c_iteration = np.concatenate([w.p_iteration[idx], np.full(n_miss, -1)])
    w.c_phase = w.ep_phase[w.c_eid]
    bound = np.concatenate([bound] + [x[5] for x in miss])
    w.c_clipped = np.concatenate([clipped, np.full(n_miss, np.nan)])
    w.learned = learning_values(w, ctx.learning, code_of(w.phases, Phase.TRAIN.value)) if ctx.learning else None
    if w.learned is not None:  # phase `learning`: the training batches' values (learning.py)
        v, n = w.learned, len(w.learned.eid)
        w.c_kind = np.concatenate([w.c_kind, v.kind])
        w.c_kind_name = np.concatenate([w.c_kind_name, np.where(v.kind == AGENT, KINDS[AGENT], KINDS[MODULE]).astype(object)])
        w.c_kcode = np.concatenate([w.c_kcode, np.full(n, len(w.kind_names) - 1)])
        w.c_eid = np.concatenate([w.c_eid, v.eid])
        w.c_agent = np.concatenate([w.c_agent, v.agent])
        w.c_module = np.concatenate([w.c_module, v.module])
        w.c_truth = np.concatenate([w.c_truth, v.truth])
        w.c_value = np.concatenate([w.c_value, v.value])
        w.c_missing = np.concatenate([w.c_missing, v.missing])
        w.c_ord = np.concatenate([w.c_ord, np.where(v.missing, np.iinfo(np.int64).max, v.ord)])
        w.c_call = np.concatenate([w.c_call, np.full(n, -1)])
        w.c_iteration = np.concatenate([w.c_iteration, v.iteration])
        w.c_phase = np.concatenate([w.c_phase, np.full(n, w.learning_code)])
        bound = np.concatenate([bound, v.bound])
        w.c_clipped = np.concatenate([w.c_clipped, np.full(n, np.nan)])
    with np.errstate(invalid="ignore", over="ignore"):
        w.c_diff = w.c_value - w.c_truth
        w.c_tol = _tolerance(bound, w.c_truth, w.c_value, ctx)
        w.c_clean = np.isfinite(w.c_value) & np.isfinite(w.c_truth) & (np.abs(w.c_diff) <= w.c_tol)
    # The key a value is about: agent id (agent), module id (module, policy), "return" (episode).
    w.c_sel = np.where(w.c_kind == AGENT, w.c_agent, np.where((w.c_kind == MODULE) | (w.c_kind == POLICY), w.c_module, -1))


