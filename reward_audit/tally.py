"""The reconciliation pass behind ``compare``: columnar, streamed by iteration window, in
bounded memory. numpy / pyarrow; no Ray, no per-row Python.

Per window of iterations (about ``window_rows`` raw rows):

1. ``read_window`` (window.py) — the window's raw and reported rows as integer-coded arrays;
2. ``_truth`` — per (episode, agent): counted sum (every reward minus those paid before or
   with the agent's first observation), pre-observation sum, final-chunk sum, module (the
   last non-null one), first chunk; per episode: chunks, done, phase;
3. ``_close`` — episodes that finished or were reported are closed; the raw rows of the
   others are carried into the next window (episodes span neighbouring iterations);
4. ``_match`` — every value RLlib should have reported for the closed episodes (of the kinds
   it reported at all for that episode) against what it did report: truth beside each
   reported value, expected values it never reported, reported episodes with no raw rows;
5. ``_tally`` — per key: counts and sums; the wrong values with the largest differences
   (at most ``explain_limit`` per key) and their episodes' per-agent features; excluded
   rewards; unreported episodes; ``_dashboard``: what each iteration's dashboard value
   covers (the window models live in dashboard.py).

Memory holds one window (plus the carried running episodes and the bounded tallies), so
peak RSS does not grow with the run's length. If data of an episode turns up after the
window that closed it (a run recorded by ``RewardAuditCallback`` never writes that),
``LateData`` is raised and ``compare`` redoes the run in one window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from .dashboard import driver_history_windows, per_call_windows
from .learning import LearningStream, match
from .store import Run
from .recorder import rounding_bound
from .schema import Phase
from .window import AGENT, EPISODE, KINDS, MODULE, OTHER, POLICY, KeyMap, LeftOut, Window, factorize, read_window

Progress = Callable[[str, float], None]


class LateData(Exception):
    """Rows of an episode arrived after the window that closed it."""


@dataclass
class Tally:
    """What one pass over a run found; ``compare`` turns it into findings."""

    keys: dict = field(default_factory=dict)  # (phase, kind, key) -> [first_ord, rows, Σtruth, Σreported, episodes, clean episodes, wrong, wrong multi-chunk, clean multi-chunk]
    bad: list = field(default_factory=list)  # DataFrames of wrong values (bounded per key)
    features: list = field(default_factory=list)  # DataFrames: per-agent features of their episodes
    excluded: dict = field(default_factory=dict)  # (phase, agent) -> [episodes, Σpre-obs, n pre-obs]
    unreported: dict = field(default_factory=dict)  # (phase, done) -> episodes
    unreported_examples: list = field(default_factory=list)  # (phase, done, first_chunk, runner, episode)
    orphans: dict = field(default_factory=dict)  # (phase, kind) -> [episodes, first_ord, example]
    unknown: dict = field(default_factory=dict)  # (phase, kind, semantics) -> rows
    raw_phases: dict = field(default_factory=dict)  # phase -> closed episodes
    reported_phases: set = field(default_factory=set)
    dash_calls: list = field(default_factory=list)  # DataFrames per (phase, kind, sel_key, iteration)
    dash_its: list = field(default_factory=list)
    dash_per_call: list = field(default_factory=list)  # async sampling: per (series, runner, get_metrics call)
    rows: list = field(default_factory=list)  # every compared value (keep_rows only)
    compared: dict = field(default_factory=dict)  # phase -> episodes with at least one compared value
    windows: int = 0
    fallback: int = 0  # values compared with the schema-1 relative tolerance (no Σ|r| recorded)
    rows_read: int = 0
    duplicates: dict = field(default_factory=dict)  # table -> [rows dropped, files]: identical copies
    runner_rows: dict = field(default_factory=dict)  # runner id -> raw rows read (after de-duplication)
    clipped_truth: int = 0  # learning values whose truth is Σ clip(r) (RLlib clipped before the batch)


# --------------------------------------------------------------------------- the pass


def tally(
    run: Run, *, atol: float | None, rtol: float | None, window_rows: int | None, explain_limit: int, progress: Progress | None = None, keep_rows: bool = False,
    left_out: LeftOut | None = None,
) -> Tally:
    # Arrow's default pool (mimalloc / jemalloc) keeps freed window buffers mapped; the
    # system allocator returns them, so peak RSS stays one window's worth. Restored after.
    pool = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        return _tally_run(run, atol, rtol, window_rows, explain_limit, progress, keep_rows, left_out)
    finally:
        pa.set_memory_pool(pool)


def _tally_run(
    run: Run, atol: float | None, rtol: float | None, window_rows: int | None, explain_limit: int, progress: Progress | None, keep_rows: bool, left_out: LeftOut | None
) -> Tally:
    out = Tally()
    m = run.manifest
    S = int(m.get("metrics_num_episodes_for_smoothing") or 100)
    ctx = _Context(
        atol=atol,
        rtol=rtol,
        explain_limit=explain_limit,
        keep_rows=keep_rows,
        model=m.get("smoothing_model"),
        S=S,
        train_window=max(1, math.ceil(S / max(int(m.get("num_env_runners") or 0), 1))),
        eval_window=max(1, math.ceil(S / max(int(m.get("evaluation_num_env_runners") or 0), 1))),
        discard=bool(m.get("evaluation_discards_last_call")),
        async_metrics=bool(m.get("async_metrics")),
    )
    ctx.fresh = tuple(int(seg.get("first_iteration") or 0) for seg in (m.get("segments") or [])[1:] if seg.get("reason") == "reopened")
    if ctx.model == "driver_history":
        ctx.displayed = run.read("reported_iterations").select(["phase", "kind", "key", "iteration"]).to_pandas().drop_duplicates()
    rep_parts = list(run.parts.get("reported_episodes", ()))
    ctx.rep_index = {p.path: i for i, p in enumerate(rep_parts)}
    windows = plan(run, window_rows)
    ctx.learning = LearningStream(run)
    check_late = window_rows is not None and len(windows) > 1
    carried: pa.Table | None = None
    carried_batch: pa.Table | None = None
    for i, (a, b) in enumerate(windows):
        if progress:
            progress(f"window {i + 1}/{len(windows)} (iterations {a}-{b})", i / max(len(windows), 1))
        raw_parts = [p for p in run.parts.get("raw_rewards", ()) if p.last_iteration >= a and p.first_iteration <= b]
        reps = [p for p in rep_parts if p.last_iteration >= a and p.first_iteration <= b]
        w = read_window(run, raw_parts, reps, a, b, carried, ctx.rep_index, left_out, ctx.learning or None, carried_batch)
        out.rows_read += w.rows_read
        for runner, n in w.runner_rows.items():
            out.runner_rows[runner] = out.runner_rows.get(runner, 0) + n
        for table, n, files in w.duplicates:
            seen = out.duplicates.setdefault(table, [0, set()])
            seen[0] += n
            seen[1].update(files)
        for k, n in w.unknown.items():
            out.unknown[k] = out.unknown.get(k, 0) + n
        _truth(w)
        carried, carried_batch = _close(w, last=i == len(windows) - 1, check_late=check_late, ctx=ctx)
        _match(w, ctx)
        _tally(w, ctx, out, a, b)
    out.windows = len(windows)
    out.fallback = ctx.fallback
    return out


def plan(run: Run, window_rows: int | None) -> list[tuple[int, int]]:
    """Iteration windows ``[(first, last), ...]`` of about ``window_rows`` raw rows each."""
    parts = [p for name in ("raw_rewards", "reported_episodes", "batch_rewards") for p in run.parts.get(name, ())]
    if not parts:
        return []
    lo, hi = min(p.first_iteration for p in parts), max(p.last_iteration for p in parts)
    if window_rows is None or hi - lo > 10**7:
        return [(lo, hi)]
    per_iteration: dict[int, float] = {}
    for p in run.parts.get("raw_rewards", ()):
        span = p.last_iteration - p.first_iteration + 1
        for it in range(p.first_iteration, p.last_iteration + 1):
            per_iteration[it] = per_iteration.get(it, 0.0) + p.rows / span
    windows, first, rows = [], lo, 0.0
    for it in range(lo, hi + 1):
        rows += per_iteration.get(it, 0.0)
        if rows >= window_rows or it == hi:
            windows.append((first, it))
            first, rows = it + 1, 0.0
    return windows


@dataclass
class _Context:
    atol: float | None
    rtol: float | None
    explain_limit: int
    keep_rows: bool
    model: str | None
    S: int
    train_window: int
    eval_window: int
    discard: bool
    async_metrics: bool = False
    displayed: pd.DataFrame | None = None
    rep_index: dict = field(default_factory=dict)
    closed: list = field(default_factory=list)  # uint64 hashes of closed (runner, episode)
    hist: pd.DataFrame | None = None  # driver_history: the last S episodes' rows per series
    fresh: tuple = ()  # iterations where a new process took over the run (reopened segments)
    learning: LearningStream | None = None  # the run's training batches (phase `learning`)
    fallback: int = 0  # values compared with the schema-1 relative tolerance


# --------------------------------------------------------------------------- 2. truth


def _truth(w: Window) -> None:
    E, na = w.E, max(len(w.agents), 1)
    counted_row = w.reward - w.pre
    w.has_raw = np.bincount(w.r_eid, minlength=E) > 0
    w.ep_done = np.bincount(w.r_eid, weights=w.done, minlength=E) > 0
    w.ep_phase = np.full(E, -1, np.int64)
    w.ep_phase[w.r_eid] = w.r_phase
    w.ep_phase[w.p_eid[w.ep_phase[w.p_eid] < 0]] = w.p_phase[w.ep_phase[w.p_eid] < 0]
    ep_max = np.full(E, np.iinfo(np.int64).min, np.int64)
    np.maximum.at(ep_max, w.r_eid, w.chunk)
    ep_first = np.full(E, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(ep_first, w.r_eid, w.chunk)
    w.ep_first = ep_first
    # Distinct chunks per episode.
    cmin = int(w.chunk.min()) if len(w.chunk) else 0
    rel = w.chunk - ep_first[w.r_eid]
    span = int(rel.max()) + 1 if len(rel) else 1
    _, pairs = factorize(w.r_eid * span + rel, E * span)
    w.ep_chunks = np.bincount(pairs // span, minlength=E)
    # Per (episode, agent) groups.
    g, gkeys = factorize(w.r_eid * na + w.r_agent, E * na)
    G = len(gkeys)
    w.g_eid, w.g_agent = (gkeys // na).astype(np.int64), (gkeys % na).astype(np.int64)
    w.g_counted = np.bincount(g, weights=counted_row, minlength=G)
    # Σ clip(r) where RLlib clips rewards (NaN when any row has none recorded).
    w.g_clipped = np.bincount(g, weights=np.nan_to_num(w.r_clipped), minlength=G).astype(np.float64)
    w.g_clipped[np.bincount(g, weights=np.isnan(w.r_clipped), minlength=G) > 0] = np.nan
    # What bounds the rounding of any float sum of the group's rewards: how many, Σ|r|, the
    # fewest significand bits; unknown (schema-1 rows) where Σ|r| was not recorded.
    unknown_row = np.isnan(w.r_abs)
    w.g_n = np.bincount(g, weights=w.nrew, minlength=G)
    w.g_abs = np.bincount(g, weights=np.where(unknown_row, 0.0, w.r_abs), minlength=G)
    w.g_unknown = np.bincount(g, weights=unknown_row, minlength=G) > 0
    w.g_bits = np.full(G, 53, np.int64)
    if (w.r_bits != 53).any():
        np.minimum.at(w.g_bits, g, w.r_bits)
    w.g_bound = rounding_bound(w.g_n, w.g_abs, w.g_bits, w.ep_chunks[w.g_eid], np.ones(G), unknown=w.g_unknown)
    w.g_pre = np.bincount(g, weights=w.pre, minlength=G)
    w.g_npre = np.bincount(g, weights=w.npre, minlength=G).astype(np.int64)
    w.g_final = np.bincount(g, weights=np.where(w.chunk == ep_max[w.r_eid], counted_row, 0.0), minlength=G)
    g_first = np.full(G, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(g_first, g, w.chunk)
    w.g_first = g_first
    # Module: the last non-null one by chunk (packed as chunk * M + module so max picks it).
    nm = len(w.modules) + 1
    best = np.full(G, -1, np.int64)
    has = w.r_module >= 0
    np.maximum.at(best, g[has], (w.chunk[has] - cmin) * nm + w.r_module[has])
    w.g_module = np.where(best >= 0, best % nm, -1)
    w.g_index = KeyMap(gkeys, E * na)


# --------------------------------------------------------------------------- 3. close


def _close(w: Window, last: bool, check_late: bool, ctx: _Context) -> tuple[pa.Table | None, pa.Table | None]:
    """Close what finished or was reported; return the raw rows and the batch rows of the rest."""
    E = w.E
    w.reported = np.bincount(w.p_eid, minlength=E) > 0
    closed = np.ones(E, bool) if last else (w.ep_done | w.reported)
    if check_late:
        # (runner, episode) identity across windows, as 64-bit hashes of the two strings.
        h_runner = pd.util.hash_array(np.asarray(w.runners, dtype=object)) if len(w.runners) else np.zeros(0, np.uint64)
        h_episode = pd.util.hash_array(np.asarray(w.episodes, dtype=object)) if len(w.episodes) else np.zeros(0, np.uint64)
        hashes = h_runner[w.ep_runner] ^ (h_episode[w.ep_episode] * np.uint64(1000003))
        if ctx.closed:
            seen = ctx.closed[0]  # every earlier window's closed episodes, sorted
            late = seen[np.minimum(np.searchsorted(seen, hashes), len(seen) - 1)] == hashes
            if late.any():
                raise LateData(f"{int(late.sum())} episodes (e.g. {w.episodes[w.ep_episode[np.flatnonzero(late)[0]]]}) have rows in a later iteration than the one that closed them")
        if closed.any():  # merge (timsort: two sorted runs, linear)
            ctx.closed = [np.sort(np.concatenate(ctx.closed + [np.sort(hashes[closed])]), kind="stable")]
    w.closed = closed
    if last or closed.all():
        return None, None
    batch = _carry_batch(w, ~closed[w.b_eid]) if len(w.b_eid) else None
    if not len(w.r_eid):
        return None, batch
    keep = ~closed[w.r_eid]

    def strings(codes: np.ndarray, dictionary: np.ndarray) -> pa.Array:
        return pa.array(np.append(np.asarray(dictionary, dtype=object), None)[codes[keep]], pa.string())

    return pa.table(
        {
            "phase": strings(w.r_phase, w.phases),
            "runner_id": strings(w.r_runner, w.runners),
            "episode_id": strings(w.r_episode, w.episodes),
            "agent_id": strings(w.r_agent, w.agents),
            "chunk_seq": pa.array(w.chunk[keep], pa.int64()),
            "module_id": strings(w.r_module, w.modules),
            "reward": pa.array(w.reward[keep]),
            "pre_obs_reward": pa.array(w.pre[keep]),
            "n_rewards": pa.array(w.nrew[keep].astype(np.int32)),
            "n_pre_obs": pa.array(w.npre[keep].astype(np.int32)),
            "episode_done": pa.array(w.done[keep]),
            "iteration": pa.array(w.r_iteration[keep], pa.int64()),
            "reward_cancel": pa.array((w.r_abs - np.abs(w.reward))[keep].astype(np.float32), from_pandas=True),
            "reward_bits": pa.array(w.r_bits[keep].astype(np.int32)),
            "reward_clipped": pa.array(w.r_clipped[keep], from_pandas=True),
            "file": pa.array(np.asarray(w.raw_files, dtype=object)[w.raw_file[keep]].astype(str)),
        }
    ), batch


def _carry_batch(w: Window, keep: np.ndarray) -> pa.Table | None:
    """The batch rows of episodes still open, as a ``batch_rewards`` table (strings plain:
    a filtered dictionary column would drag every id ever read into the next window)."""
    if not keep.any():
        return None

    def strings(codes: np.ndarray, dictionary: np.ndarray) -> pa.Array:
        return pa.array(np.append(np.asarray(dictionary, dtype=object), None)[codes[keep]], pa.string()).dictionary_encode()

    return pa.table(
        {
            "phase": pa.array([Phase.TRAIN.value] * int(keep.sum()), pa.string()).dictionary_encode(),
            "runner_id": strings(w.b_runner, w.runners),
            "episode_id": strings(w.b_episode, w.episodes),
            "chunk_seq": pa.array(w.b_chunk[keep], pa.int64()),
            "agent_id": strings(w.b_agent, w.agents),
            "module_id": strings(w.b_module, w.modules),
            "reward": pa.array(w.b_reward[keep]),
            "n_rewards": pa.array(w.b_n[keep].astype(np.int32)),
            "reward_bits": pa.array(w.b_bits[keep].astype(np.int32)),
            "iteration": pa.array(w.b_iteration[keep], pa.int64()),
        }
    )


# --------------------------------------------------------------------------- 4. match

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


def _tolerance(bound: np.ndarray, truth: np.ndarray, value: np.ndarray, ctx: _Context) -> np.ndarray:
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


def _match(w: Window, ctx: _Context) -> None:
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
    w.learned = match(w, ctx.learning, _code(w.phases, Phase.TRAIN.value)) if ctx.learning else None
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


# --------------------------------------------------------------------------- 5. tally


def _names(w: Window, kind: np.ndarray, sel: np.ndarray) -> np.ndarray:
    agents = np.append(w.agents, None).astype(object)
    modules = np.append(w.modules, None).astype(object)
    out = np.full(len(sel), "return", dtype=object)
    is_agent, is_module = kind == AGENT, (kind == MODULE) | (kind == POLICY)
    out[is_agent] = agents[sel[is_agent]]
    out[is_module] = modules[sel[is_module]]
    return out


def _tally(w: Window, ctx: _Context, out: Tally, a: int, b: int) -> None:
    n = len(w.c_eid)
    if n:
        # Per key: factorize (phase, kind name, selected key).
        kind_code, kind_names = pd.factorize(w.c_kind_name)
        nk, ns = len(kind_names), max(len(w.agents), len(w.modules)) + 2
        key = (w.c_phase * nk + kind_code) * ns + (w.c_sel + 1)
        k, kuniq = factorize(key, (len(w.phases) * nk + nk) * ns)
        K = len(kuniq)
        multi = w.ep_chunks[w.c_eid] > 1
        stats = np.zeros((K, 9))
        first = np.full(K, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(first, k, w.c_ord)
        stats[:, 0] = first
        stats[:, 1] = np.bincount(k, minlength=K)
        stats[:, 2] = np.bincount(k, weights=w.c_truth, minlength=K)
        stats[:, 3] = np.bincount(k, weights=w.c_value, minlength=K)
        stats[:, 4] = np.bincount(factorize(k * w.E + w.c_eid, K * w.E)[1] // w.E, minlength=K)
        clean = w.c_clean
        stats[:, 5] = np.bincount(factorize(k[clean] * w.E + w.c_eid[clean], K * w.E)[1] // w.E, minlength=K)
        stats[:, 6] = np.bincount(k, weights=~clean, minlength=K)
        stats[:, 7] = np.bincount(k, weights=~clean & multi, minlength=K)
        stats[:, 8] = np.bincount(k, weights=clean & multi, minlength=K)
        phases = np.append(w.phases, None).astype(object)
        sel_of_key = (kuniq % ns) - 1
        kind_of_key = np.array([KINDS.index(x) if x in KINDS else OTHER for x in kind_names])[(kuniq // ns) % nk]
        names = _names(w, kind_of_key, sel_of_key)
        for j in range(K):
            name = (phases[(kuniq[j] // ns) // nk], kind_names[(kuniq[j] // ns) % nk], names[j])
            prev = out.keys.get(name)
            if prev is None:
                out.keys[name] = stats[j].copy()
            else:
                prev[0] = min(prev[0], stats[j, 0])
                prev[1:] += stats[j, 1:]
        _wrong(w, ctx, out, k, names, phases)
        if ctx.keep_rows:
            out.rows.append(_frame(w, np.arange(n), names[k], phases))
            out.features.append(_features(w, np.ones(w.E, bool)))
    _excluded(w, out)
    _unreported(w, out)
    _orphans(w, out)
    if w.learned is not None:
        _learned(w, out)
    for p in np.unique(w.ep_phase[w.closed & w.has_raw]):
        name = w.phases[p]
        out.raw_phases[name] = out.raw_phases.get(name, 0) + int(((w.ep_phase == p) & w.closed & w.has_raw).sum())
    out.reported_phases |= {w.phases[p] for p in np.unique(w.p_phase)}
    compared = w.closed & w.has_raw & w.reported
    for p in np.unique(w.ep_phase[compared]):
        out.compared[w.phases[p]] = out.compared.get(w.phases[p], 0) + int((compared & (w.ep_phase == p)).sum())
    _dashboard(w, ctx, out, a, b)


def _frame(w: Window, rows: np.ndarray, keys: np.ndarray, phases: np.ndarray) -> pd.DataFrame:
    agents = np.append(w.agents, None).astype(object)
    modules = np.append(w.modules, None).astype(object)
    e = w.c_eid[rows]
    return pd.DataFrame(
        {
            "phase": phases[w.c_phase[rows]],
            "kind": w.c_kind_name[rows],
            "key": keys,
            "runner_id": w.runners[w.ep_runner[e]],
            "episode_id": w.episodes[w.ep_episode[e]],
            "agent_id": agents[w.c_agent[rows]],
            "module_id": modules[w.c_module[rows]],
            "truth": w.c_truth[rows],
            "value": w.c_value[rows],
            "diff": w.c_diff[rows],
            "tol": w.c_tol[rows],
            "clipped": w.c_clipped[rows],
            "chunks": w.ep_chunks[e],
            "missing_report": w.c_missing[rows],
            "ord": np.where(w.c_missing[rows], np.nan, w.c_ord[rows].astype(float)),
            "clean": w.c_clean[rows],
            "metrics_call": np.where(w.c_missing[rows], np.nan, w.c_call[rows]),
            "iteration": np.where(w.c_missing[rows], np.nan, w.c_iteration[rows]),
        }
    )


def _features(w: Window, episodes: np.ndarray) -> pd.DataFrame:
    """Per-agent attribution features (earlier / final-chunk counted rewards) of episodes."""
    sel = episodes[w.g_eid]
    modules = np.append(w.modules, None).astype(object)
    e = w.g_eid[sel]
    return pd.DataFrame(
        {
            "runner_id": w.runners[w.ep_runner[e]],
            "episode_id": w.episodes[w.ep_episode[e]],
            "agent_id": w.agents[w.g_agent[sel]],
            "module_id": modules[w.g_module[sel]],
            "earlier": w.g_counted[sel] - w.g_final[sel],
            "final": w.g_final[sel],
            "bound": w.g_bound[sel],
            "first_chunk": w.g_first[sel],
        }
    )


def largest_wrong(frame: pd.DataFrame, limit: int) -> pd.DataFrame:
    """Per key, the ``limit`` wrong values with the largest |difference| (NaN last), ties
    broken by RLlib's reporting order, then runner and episode."""
    order = ["phase", "kind", "key", "nan", "abs", "ord", "runner_id", "episode_id"]
    frame = frame.assign(nan=frame["diff"].isna().astype(int), abs=-frame["diff"].abs()).sort_values(order, na_position="last", kind="stable")
    return frame.groupby(["phase", "kind", "key"], sort=False, dropna=False).head(limit).drop(columns=["nan", "abs"])


def _wrong(w: Window, ctx: _Context, out: Tally, k: np.ndarray, names: np.ndarray, phases: np.ndarray) -> None:
    """Keep, per key, the ``explain_limit`` wrong values with the largest differences."""
    bad = np.flatnonzero(~w.c_clean)
    if not len(bad):
        return
    frame = largest_wrong(_frame(w, bad, names[k[bad]], phases), ctx.explain_limit)
    out.bad.append(frame)
    keep = np.zeros(w.E, bool)
    keep[w.c_eid[bad]] = True
    wanted = set(zip(frame["runner_id"], frame["episode_id"]))
    feats = _features(w, keep)
    out.features.append(feats[[x in wanted for x in zip(feats["runner_id"], feats["episode_id"])]])
    # Bound what is kept across windows.
    if sum(len(f) for f in out.bad) > 4 * ctx.explain_limit * max(len(out.keys), 1):
        out.bad = [largest_wrong(pd.concat(out.bad, ignore_index=True), ctx.explain_limit)]
        wanted = set(zip(out.bad[0]["runner_id"], out.bad[0]["episode_id"]))
        feats = pd.concat(out.features, ignore_index=True)
        out.features = [feats[[x in wanted for x in zip(feats["runner_id"], feats["episode_id"])]]]


def _excluded(w: Window, out: Tally) -> None:
    sel = (w.g_npre > 0) & w.closed[w.g_eid] & w.has_raw[w.g_eid] & w.reported[w.g_eid]
    if not sel.any():
        return
    frame = pd.DataFrame({"phase": w.phases[w.ep_phase[w.g_eid[sel]]], "agent": w.agents[w.g_agent[sel]], "pre": w.g_pre[sel], "n": w.g_npre[sel]})
    for (phase, agent), g in frame.groupby(["phase", "agent"]):
        prev = out.excluded.setdefault((phase, agent), [0, 0.0, 0])
        prev[0] += len(g)
        prev[1] += float(g["pre"].sum())
        prev[2] += int(g["n"].sum())


def _unreported(w: Window, out: Tally) -> None:
    sel = np.flatnonzero(w.closed & w.has_raw & ~w.reported)
    if not len(sel):
        return
    frame = pd.DataFrame(
        {"phase": w.phases[w.ep_phase[sel]], "done": w.ep_done[sel], "first": w.ep_first[sel], "runner": w.runners[w.ep_runner[sel]], "episode": w.episodes[w.ep_episode[sel]]}
    )
    for (phase, done), g in frame.groupby(["phase", "done"]):
        out.unreported[(phase, bool(done))] = out.unreported.get((phase, bool(done)), 0) + len(g)
        for r in g.sort_values(["first", "runner", "episode"]).head(3).itertuples(index=False):
            out.unreported_examples.append((phase, bool(done), int(r.first), r.runner, r.episode))


def _orphans(w: Window, out: Tally) -> None:
    sel = np.flatnonzero(w.orphan)
    if not len(sel):
        return
    frame = pd.DataFrame({"phase": w.phases[w.p_phase[sel]], "kind": w.kind_names[w.p_kind_code[sel]], "episode": w.episodes[w.p_episode[sel]], "ord": w.ord[sel]})
    for (phase, kind), g in frame.groupby(["phase", "kind"]):
        first = g.loc[g["ord"].idxmin()]
        prev = out.orphans.get((phase, kind))
        n = g["episode"].nunique()
        if prev is None:
            out.orphans[(phase, kind)] = [n, int(first["ord"]), first["episode"]]
        else:
            prev[0] += n
            if first["ord"] < prev[1]:
                prev[1], prev[2] = int(first["ord"]), first["episode"]


def _learned(w: Window, out: Tally) -> None:
    """Phase ``learning``'s bookkeeping: compared episodes, finished episodes without any
    training batch, batch rows of episodes without raw rows."""
    v, phase = w.learned, Phase.LEARNING.value
    compared = np.unique(v.eid[~v.missing])
    if len(compared):
        out.compared[phase] = out.compared.get(phase, 0) + len(compared)
        out.reported_phases.add(phase)
    out.clipped_truth += v.clipped
    if len(v.unbatched):
        out.unreported[(phase, True)] = out.unreported.get((phase, True), 0) + len(v.unbatched)
        first = sorted(zip(w.ep_first[v.unbatched].tolist(), w.runners[w.ep_runner[v.unbatched]], w.episodes[w.ep_episode[v.unbatched]]))[:3]
        out.unreported_examples += [(phase, True, f, r, e) for f, r, e in first]
    if len(v.orphans):
        prev = out.orphans.setdefault((phase, "batch"), [0, np.iinfo(np.int64).max, w.episodes[w.ep_episode[v.orphans[0]]]])
        prev[0] += len(v.orphans)


# --------------------------------------------------------------------------- dashboards


def _code(dictionary: np.ndarray, name: str) -> int:
    """The code of ``name`` in a window's dictionary (-2 when absent: matches no code)."""
    hits = np.flatnonzero(np.asarray(dictionary, dtype=object) == name)
    return int(hits[0]) if len(hits) else -2


def _dashboard(w: Window, ctx: _Context, out: Tally, a: int, b: int) -> None:
    """What each iteration's dashboard value covers, reduced (see dashboard.py)."""
    if ctx.model not in ("per_call_window", "driver_history") or not len(w.c_eid):
        return
    # Reported values, in RLlib's order (ord); the learning phase has no dashboard.
    shown = np.flatnonzero(~w.c_missing & (w.c_phase != w.learning_code))
    if not len(shown):
        return
    # Integer series id (phase, kind, key) and (series, iteration) id per shown value.
    kcode = w.c_kcode[shown]
    nk, ns = len(w.kind_names), max(len(w.agents), len(w.modules)) + 2
    sel = np.where(w.c_kind[shown] == EPISODE, -1, w.c_sel[shown])
    series = (w.c_phase[shown] * nk + kcode) * ns + (sel + 1)
    it = w.c_iteration[shown]
    imin = int(it.min())
    g2, g2_keys = pd.factorize(series * (int(it.max()) - imin + 1) + (it - imin))
    G2 = len(g2_keys)
    truth, value = w.c_truth[shown], w.c_value[shown]
    low, high = np.full(G2, np.inf), np.full(G2, -np.inf)
    np.minimum.at(low, g2, truth)
    np.maximum.at(high, g2, truth)
    first = np.zeros(G2, np.int64)
    first[g2[::-1]] = np.arange(len(g2))[::-1]  # a representative row per group
    phases = np.append(w.phases, None).astype(object)
    names = _names(w, w.c_kind[shown][first], sel[first])
    names[w.c_kind[shown][first] == EPISODE] = "\x00none"
    label = pd.DataFrame({"phase": phases[w.c_phase[shown][first]], "kind": w.kind_names[kcode[first]], "sel_key": names, "iteration": it[first]})
    out.dash_its.append(label.assign(low=low, high=high, n=np.bincount(g2, minlength=G2)))
    if ctx.model == "per_call_window":
        evaluation = np.asarray(w.phases, dtype=object)[w.c_phase[shown]] == "evaluation"
        per_call: list | None = [] if ctx.async_metrics else None
        runner_names = np.asarray(w.runners, dtype=object)
        calls = per_call_windows(g2, G2, w.ep_runner[w.c_eid[shown]], w.c_call[shown], value, truth, evaluation, ctx.train_window, ctx.eval_window, ctx.discard, per_call)
        out.dash_calls.append(label.assign(**calls))
        if per_call:
            pc = per_call[0]
            out.dash_per_call.append(label.iloc[pc["g2"].to_numpy()].reset_index(drop=True).assign(**{
                c: pc[c].to_numpy() for c in ("call", "r_mean", "r_min", "r_max", "t_mean", "t_min", "t_max", "n")
            }, runner=runner_names[pc["runner"].to_numpy()]))
    else:
        e = w.c_eid[shown]
        frame = label.iloc[g2].reset_index(drop=True).assign(
            runner=w.runners[w.ep_runner[e]], episode=w.episodes[w.ep_episode[e]], call=w.c_call[shown], ord=w.c_ord[shown], value=value, truth=truth
        )
        reduced, ctx.hist = driver_history_windows(frame, ctx.hist, ctx.displayed, ctx.S, a, b, ctx.fresh)
        out.dash_calls.append(reduced)
