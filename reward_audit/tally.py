"""The reconciliation pass behind ``compare``: columnar, streamed by iteration window, in
bounded memory. numpy / pyarrow; no Ray, no per-row Python.

Per window of iterations (about ``window_rows`` raw rows):

1. ``read_window`` (window.py) — the window's raw rows, reported values and training
   batches as integer-coded arrays;
2. ``_truth`` — per (episode, agent): counted sum (every reward minus those paid before or
   with the agent's first observation), pre-observation sum, final-chunk sum, module (the
   last non-null one), first chunk; per episode: chunks, done, phase;
3. ``_close`` — episodes that finished or were reported are closed; the raw and batch rows
   of the others are carried into the next window (episodes span neighbouring iterations);
4. ``values.match`` — every value RLlib should have reported for the closed episodes (of
   the kinds it reported at all for that episode) against what it did report: truth beside
   each reported value, expected values it never reported, reported episodes with no raw
   rows; and the training batches' values of finished train episodes (learning.py);
5. ``reduce.reduce_window`` — per key: counts and sums; the wrong values with the largest
   differences (at most ``explain_limit`` per key) and their episodes' per-agent features;
   excluded rewards; unreported episodes; what each iteration's dashboard value covers
   (the window models live in dashboard.py).

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

from .learning import LearningStream
from .reduce import largest_wrong, reduce_window
from .schema import Phase
from .store import Run
from .values import match
from .recorder import rounding_bound
from .window import KeyMap, LeftOut, Window, factorize, read_window

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
    batch_runner_rows: dict = field(default_factory=dict)  # runner id -> batch rows read (after de-duplication)
    clipped_truth: int = 0  # learning values whose truth is Σ clip(r) (RLlib clipped before the batch)


# --------------------------------------------------------------------------- the pass


def tally(
    run: Run, *, atol: float | None, rtol: float | None, window_rows: int | None, explain_limit: int, progress: Progress | None = None, keep_rows: bool = False,
    left_out: LeftOut | None = None, unbatched: set[str] | frozenset = frozenset(),
) -> Tally:
    # Arrow's default pool (mimalloc / jemalloc) keeps freed window buffers mapped; the
    # system allocator returns them, so peak RSS stays one window's worth. Restored after.
    pool = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        return _tally_run(run, atol, rtol, window_rows, explain_limit, progress, keep_rows, left_out, unbatched)
    finally:
        pa.set_memory_pool(pool)


def _tally_run(
    run: Run, atol: float | None, rtol: float | None, window_rows: int | None, explain_limit: int, progress: Progress | None, keep_rows: bool, left_out: LeftOut | None,
    unbatched: set[str] | frozenset,
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
    ctx.learning = LearningStream(run, unbatched)
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
        match(w, ctx)
        reduce_window(w, ctx, out, a, b)
    out.windows = len(windows)
    out.batch_runner_rows = ctx.learning.runner_rows
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
    strings = lambda codes, dictionary: _strings(codes, dictionary, keep)  # noqa: E731
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


def _strings(codes: np.ndarray, dictionary: np.ndarray, keep: np.ndarray) -> pa.Array:
    """The ``keep`` rows of an integer-coded string column as plain strings (a filtered
    dictionary column would drag every id ever read into the next window)."""
    return pa.array(np.append(np.asarray(dictionary, dtype=object), None)[codes[keep]], pa.string())


def _carry_batch(w: Window, keep: np.ndarray) -> pa.Table | None:
    """The batch rows of episodes still open, as a ``batch_rewards`` table."""
    if not keep.any():
        return None

    strings = lambda codes, dictionary: _strings(codes, dictionary, keep)  # noqa: E731
    return pa.table(
        {
            "phase": pa.array([Phase.TRAIN.value] * int(keep.sum()), pa.string()),
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


__all__ = ["LateData", "Progress", "Tally", "largest_wrong", "plan", "tally"]
