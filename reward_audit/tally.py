"""The reconciliation pass behind ``compare``: columnar, streamed by iteration window, in
bounded memory. Pure numpy / pyarrow; no Ray, no per-row Python.

Per window of iterations (about ``window_rows`` raw rows):

1. ``_read`` — the window's raw and reported rows, string ids read as Parquet dictionaries
   and unified into one integer code space (episode, runner, agent, module), so every
   group-by below is ``np.bincount`` over dense integers;
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
   rewards; unreported episodes; the dashboard windows (``_dashboard_calls``,
   ``_driver_history``).

Memory holds one window (plus the carried running episodes and the bounded tallies), so
peak RSS does not grow with the run's length. If data of an episode turns up after the
window that closed it (a run recorded by ``RewardAuditCallback`` never writes that),
``LateData`` is raised and ``compare`` redoes the run in one window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import CorruptRunError, InvalidDataError
from . import schema
from .schema import Kind, Semantics
from .store import Part, Run

KINDS = [Kind.AGENT.value, Kind.MODULE.value, Kind.POLICY.value, Kind.EPISODE.value]  # codes 0..3; 4 = any other kind
AGENT, MODULE, POLICY, EPISODE, OTHER = range(5)
RAW_COLUMNS = ["phase", "runner_id", "episode_id", "agent_id", "chunk_seq", "module_id", "reward", "pre_obs_reward", "n_pre_obs", "episode_done", "iteration"]
REP_COLUMNS = ["phase", "runner_id", "episode_id", "kind", "agent_id", "module_id", "value", "semantics", "metrics_call", "iteration"]
_STRINGS = {"phase", "runner_id", "episode_id", "agent_id", "module_id", "kind", "semantics"}
_DICT = pa.dictionary(pa.int32(), pa.string())
_CANONICAL = {f.name: f.type for table in (schema.RAW_REWARDS, schema.REPORTED_EPISODES) for f in table}

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
    rows: list = field(default_factory=list)  # every compared value (keep_rows only)
    windows: int = 0
    rows_read: int = 0


# --------------------------------------------------------------------------- the pass


def tally(run: Run, *, atol: float, rtol: float, window_rows: int | None, explain_limit: int, progress: Progress | None = None, keep_rows: bool = False) -> Tally:
    # Arrow's default pool (mimalloc / jemalloc) keeps freed window buffers mapped; the
    # system allocator returns them, so peak RSS stays one window's worth. Restored after.
    pool = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        return _tally_run(run, atol, rtol, window_rows, explain_limit, progress, keep_rows)
    finally:
        pa.set_memory_pool(pool)


def _tally_run(run: Run, atol: float, rtol: float, window_rows: int | None, explain_limit: int, progress: Progress | None, keep_rows: bool) -> Tally:
    out = Tally()
    m = run.manifest
    ctx = _Context(
        atol=atol,
        rtol=rtol,
        explain_limit=explain_limit,
        keep_rows=keep_rows,
        model=m.get("smoothing_model"),
        S=int(m.get("metrics_num_episodes_for_smoothing") or 100),
        train_window=max(1, math.ceil(int(m.get("metrics_num_episodes_for_smoothing") or 100) / max(int(m.get("num_env_runners") or 0), 1))),
        eval_window=max(1, math.ceil(int(m.get("metrics_num_episodes_for_smoothing") or 100) / max(int(m.get("evaluation_num_env_runners") or 0), 1))),
        discard=bool(m.get("evaluation_discards_last_call")),
    )
    if ctx.model == "driver_history":
        ctx.displayed = run.read("reported_iterations").select(["phase", "kind", "key", "iteration"]).to_pandas().drop_duplicates()
    rep_parts = list(run.parts.get("reported_episodes", ()))
    ctx.rep_index = {p.path: i for i, p in enumerate(rep_parts)}
    windows = plan(run, window_rows)
    check_late = window_rows is not None and len(windows) > 1
    carried: pa.Table | None = None
    for i, (a, b) in enumerate(windows):
        if progress:
            progress(f"window {i + 1}/{len(windows)} (iterations {a}-{b})", i / max(len(windows), 1))
        raw_parts = [p for p in run.parts.get("raw_rewards", ()) if p.last_iteration >= a and p.first_iteration <= b]
        reps = [p for p in rep_parts if p.last_iteration >= a and p.first_iteration <= b]
        w = _read(run, raw_parts, reps, a, b, carried, ctx, out)
        _truth(w)
        carried = _close(w, last=i == len(windows) - 1, check_late=check_late, ctx=ctx)
        _match(w, ctx)
        _tally(w, ctx, out, a, b)
    out.windows = len(windows)
    return out


def plan(run: Run, window_rows: int | None) -> list[tuple[int, int]]:
    """Iteration windows ``[(first, last), ...]`` of about ``window_rows`` raw rows each."""
    parts = [p for name in ("raw_rewards", "reported_episodes") for p in run.parts.get(name, ())]
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
    atol: float
    rtol: float
    explain_limit: int
    keep_rows: bool
    model: str | None
    S: int
    train_window: int
    eval_window: int
    discard: bool
    displayed: pd.DataFrame | None = None
    rep_index: dict = field(default_factory=dict)
    closed: list = field(default_factory=list)  # uint64 hashes of closed (runner, episode)
    hist: pd.DataFrame | None = None  # driver_history: the last S episodes' rows per series


class _Window:
    """One window's arrays (all integer-coded); attributes are filled step by step."""

    def __getattr__(self, name: str) -> Any:  # pragma: no cover - a missing step is a bug
        raise AttributeError(name)


# --------------------------------------------------------------------------- dense integer keys

_DENSE_LIMIT = 1 << 27  # key spaces up to this size use arrays, not hash tables


def factorize(keys: np.ndarray, space: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, uniques)`` of non-negative integer ``keys < space``: an O(n) array pass when
    the key space is small enough (the usual case: dense dictionary codes), else hashing."""
    keys = np.asarray(keys, dtype=np.int64)
    if 0 < space <= min(max(1 << 22, 16 * len(keys)), 4 * _DENSE_LIMIT):
        present = np.zeros(space, bool)
        present[keys] = True
        rank = np.cumsum(present, dtype=np.int64) - 1
        return rank[keys], np.flatnonzero(present)
    codes, uniques = pd.factorize(keys)
    return codes.astype(np.int64), np.asarray(uniques, dtype=np.int64)


class KeyMap:
    """Integer key -> a position in ``uniques`` (-1 if absent), by array when dense.
    ``uniques`` may repeat keys when only membership (``has``) is asked."""

    def __init__(self, uniques: np.ndarray, space: int):
        self.space = space
        self.empty = len(uniques) == 0
        if 0 < space <= min(max(1 << 22, 16 * len(uniques)), 4 * _DENSE_LIMIT):
            self.table = np.full(space, -1, np.int64)
            self.table[uniques] = np.arange(len(uniques))
            self.index = None
        else:
            self.table, self.index = None, pd.Index(pd.unique(np.asarray(uniques, dtype=np.int64)))

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64)
        if self.empty:
            return np.full(len(keys), -1, np.int64)
        if self.table is None:
            return self.index.get_indexer(keys) if len(keys) else np.zeros(0, np.int64)
        out = np.full(len(keys), -1, np.int64)
        ok = (keys >= 0) & (keys < self.space)
        out[ok] = self.table[keys[ok]]
        return out

    def has(self, keys: np.ndarray) -> np.ndarray:
        return self(keys) >= 0


# --------------------------------------------------------------------------- 1. read


def _read_parts(run: Run, parts: list[Part], columns: list[str], a: int, b: int, with_ord: dict | None) -> tuple[pa.Table, np.ndarray, list[str]]:
    tables, files, file_of = [], [], []
    strings = [c for c in columns if c in _STRINGS]
    for part in parts:
        # Only the row groups that hold iterations of this window (a compacted part has one
        # row group per original part).
        offsets = np.concatenate([[0], np.cumsum([g[2] for g in part.groups])]).astype(np.int64)
        wanted = [i for i, g in enumerate(part.groups) if g[1] >= a and g[0] <= b]
        try:
            with run.filesystem.open_input_file(part.path) as f:
                if len(wanted) == len(part.groups):
                    t = pq.read_table(f, columns=columns, read_dictionary=strings)
                else:
                    t = pq.ParquetFile(f, read_dictionary=strings).read_row_groups(wanted, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise CorruptRunError(f"{part.path}: unreadable Parquet ({str(e).splitlines()[0]}); the file is damaged — delete it to audit the rest, or re-record the run") from e
        rownum = None
        if len(wanted) < len(part.groups):  # row numbers within the file
            rownum = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in wanted]) if wanted else np.zeros(0, np.int64)
        if any(part.groups[i][0] < a or part.groups[i][1] > b for i in wanted):
            it = t.column("iteration")
            mask = pc.and_(pc.greater_equal(it, a), pc.less_equal(it, b)).to_numpy(zero_copy_only=False)
            if with_ord is not None:
                rownum = (np.arange(t.num_rows) if rownum is None else rownum)[mask]
            t = t.filter(pa.array(mask))
        if with_ord is not None:
            n = t.num_rows
            base = np.int64(with_ord[part.path]) << np.int64(32)
            order = base + (np.arange(n, dtype=np.int64) if rownum is None else rownum.astype(np.int64))
            t = t.append_column("ord", pa.array(order, pa.int64()))
        typed = _typed(t.schema)
        tables.append(t if t.schema.equals(typed) else t.cast(typed))
        file_of.append(np.full(t.num_rows, len(files), dtype=np.int32))
        files.append(part.path)
    if not tables:
        return None, np.zeros(0, np.int32), files  # type: ignore[return-value]
    return pa.concat_tables(tables), np.concatenate(file_of), files


def _typed(schema: pa.Schema) -> pa.Schema:
    """Dictionary-encoded strings, the schema's own integer widths (a no-op for parts
    reward_audit wrote), float64 values: one type per column."""
    fields = []
    for f in schema:
        if f.name in _STRINGS:
            fields.append(pa.field(f.name, _DICT))
        elif pa.types.is_integer(f.type):
            fields.append(pa.field(f.name, _CANONICAL.get(f.name, pa.int64())))
        elif pa.types.is_floating(f.type):
            fields.append(pa.field(f.name, pa.float64()))
        else:
            fields.append(f)
    return pa.schema(fields)


def _codes(*columns: pa.ChunkedArray | None) -> tuple[list[np.ndarray], np.ndarray]:
    """Integer codes (-1 for null) of string columns in one shared code space, and the
    dictionary (object array) they index."""
    chunks, lengths = [], []
    for col in columns:
        col_chunks = [] if col is None else [c if pa.types.is_dictionary(c.type) else c.dictionary_encode() for c in col.chunks]
        col_chunks = [c.cast(_DICT) for c in col_chunks]
        chunks += col_chunks
        lengths.append(len(col_chunks))
    if not chunks:
        return [np.zeros(0, np.int64) for _ in columns], np.zeros(0, dtype=object)
    unified = pa.chunked_array(chunks, type=_DICT).unify_dictionaries()
    dictionary = unified.chunk(0).dictionary.to_numpy(zero_copy_only=False)
    codes = [pc.fill_null(c.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64) for c in unified.chunks]
    out, i = [], 0
    for n in lengths:
        out.append(np.concatenate(codes[i : i + n]) if n else np.zeros(0, np.int64))
        i += n
    return out, dictionary


def _read(run: Run, raw_parts: list[Part], rep_parts: list[Part], a: int, b: int, carried: pa.Table | None, ctx: _Context, out: Tally) -> _Window:
    w = _Window()
    raw, w.raw_file, w.raw_files = _read_parts(run, raw_parts, RAW_COLUMNS, a, b, None)
    if carried is not None and carried.num_rows:
        carried_files = carried.column("file").to_numpy(zero_copy_only=False)
        carried = carried.drop_columns(["file"]).cast(_typed(carried.drop_columns(["file"]).schema))
        offset = len(w.raw_files)
        names = sorted(set(carried_files))
        w.raw_files += names
        w.raw_file = np.concatenate([w.raw_file, offset + np.searchsorted(names, carried_files)]).astype(np.int32)
        raw = carried if raw is None else pa.concat_tables([raw, carried.cast(raw.schema)])
    rep, _, w.rep_files = _read_parts(run, rep_parts, REP_COLUMNS, a, b, ctx.rep_index)
    out.rows_read += (raw.num_rows if raw is not None else 0) + (rep.num_rows if rep is not None else 0)
    if rep is not None:  # values this reward_audit cannot rebuild are counted, not compared
        (codes,), values = _codes(rep.column("semantics"))
        known = pa.array(values[codes] == Semantics.EPISODE_SUM_COUNTED.value) if len(codes) else pa.array([], pa.bool_())
        other = rep.filter(pc.invert(known))
        if other.num_rows:
            for (phase, kind, s), n in other.select(["phase", "kind", "semantics"]).to_pandas().astype(str).value_counts(sort=False).items():
                out.unknown[(phase, kind, s)] = out.unknown.get((phase, kind, s), 0) + int(n)
        rep = rep.filter(known)
    nraw = raw.num_rows if raw is not None else 0
    nrep = rep.num_rows if rep is not None else 0
    col = lambda t, name: None if t is None else t.column(name)  # noqa: E731
    (w.r_runner, w.p_runner), w.runners = _codes(col(raw, "runner_id"), col(rep, "runner_id"))
    (w.r_episode, w.p_episode), w.episodes = _codes(col(raw, "episode_id"), col(rep, "episode_id"))
    (w.r_agent, w.p_agent), w.agents = _codes(col(raw, "agent_id"), col(rep, "agent_id"))
    (w.r_module, w.p_module), w.modules = _codes(col(raw, "module_id"), col(rep, "module_id"))
    (w.r_phase, w.p_phase), w.phases = _codes(col(raw, "phase"), col(rep, "phase"))
    (w.p_kind_code,), kinds = _codes(col(rep, "kind"))
    kind_map = np.array([KINDS.index(k) if k in KINDS else OTHER for k in kinds] + [OTHER], dtype=np.int64)
    w.p_kind = kind_map[w.p_kind_code] if nrep else np.zeros(0, np.int64)
    w.kind_names = np.array(list(kinds) + ["?"], dtype=object)
    w.p_kind_name = w.p_kind_code
    num = lambda t, name, dtype: np.zeros(0, dtype) if t is None else t.column(name).to_numpy().astype(dtype, copy=False)  # noqa: E731
    w.chunk = num(raw, "chunk_seq", np.int64)
    w.reward = num(raw, "reward", np.float64)
    w.pre = num(raw, "pre_obs_reward", np.float64)
    w.npre = num(raw, "n_pre_obs", np.int64)
    w.done = num(raw, "episode_done", bool)
    w.r_iteration = num(raw, "iteration", np.int64)
    w.value = num(rep, "value", np.float64)
    w.call = num(rep, "metrics_call", np.int64)
    w.p_iteration = num(rep, "iteration", np.int64)
    w.ord = num(rep, "ord", np.int64)
    bad = ~(np.isfinite(w.reward) & np.isfinite(w.pre))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        column, value = ("reward", w.reward[i]) if not np.isfinite(w.reward[i]) else ("pre_obs_reward", w.pre[i])
        raise InvalidDataError(
            f"{w.raw_files[w.raw_file[i]]}: {int(bad.sum())} raw reward rows with non-finite `{column}` (first: episode {w.episodes[w.r_episode[i]]}, "
            f"value {value}); the env returned NaN/inf rewards, which no return can be checked against — fix the env's `step()`"
        )
    # Episodes: (runner, episode id) pairs, raw and reported, numbered 0..E-1.
    nr = max(len(w.runners), 1)
    keys = np.concatenate([w.r_episode * nr + w.r_runner, w.p_episode * nr + w.p_runner])
    eid, uniques = factorize(keys, max(len(w.episodes), 1) * nr)
    w.E = len(uniques)
    w.r_eid, w.p_eid = eid[:nraw], eid[nraw:]
    w.ep_runner = (uniques % nr).astype(np.int64)
    w.ep_episode = (uniques // nr).astype(np.int64)
    return w


# --------------------------------------------------------------------------- 2. truth


def _truth(w: _Window) -> None:
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


def _close(w: _Window, last: bool, check_late: bool, ctx: _Context) -> pa.Table | None:
    """Close what finished or was reported; return the raw rows of the rest."""
    E = w.E
    w.reported = np.bincount(w.p_eid, minlength=E) > 0
    closed = np.ones(E, bool) if last else (w.ep_done | w.reported)
    # (runner, episode) identity across windows, as 64-bit hashes of the two strings.
    h_runner = pd.util.hash_array(np.asarray(w.runners, dtype=object)) if len(w.runners) else np.zeros(0, np.uint64)
    h_episode = pd.util.hash_array(np.asarray(w.episodes, dtype=object)) if len(w.episodes) else np.zeros(0, np.uint64)
    hashes = h_runner[w.ep_runner] ^ (h_episode[w.ep_episode] * np.uint64(1000003))
    if check_late and ctx.closed:
        late = np.zeros(len(hashes), bool)
        for seen in ctx.closed:  # one sorted array per earlier window
            pos = np.minimum(np.searchsorted(seen, hashes), len(seen) - 1)
            late |= seen[pos] == hashes
        if late.any():
            raise LateData(f"{int(late.sum())} episodes (e.g. {w.episodes[w.ep_episode[np.flatnonzero(late)[0]]]}) have rows in a later iteration than the one that closed them")
    if check_late and closed.any():
        ctx.closed.append(np.sort(hashes[closed]))
    w.closed = closed
    if last or closed.all() or not len(w.r_eid):
        return None
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
            "n_pre_obs": pa.array(w.npre[keep].astype(np.int32)),
            "episode_done": pa.array(w.done[keep]),
            "iteration": pa.array(w.r_iteration[keep], pa.int64()),
            "file": pa.array(np.asarray(w.raw_files, dtype=object)[w.raw_file[keep]].astype(str)),
        }
    )


# --------------------------------------------------------------------------- 4. match


def _match(w: _Window, ctx: _Context) -> None:
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
    truth = np.zeros(len(idx))
    a_rows = kind == AGENT
    truth[a_rows & g_ok] = w.g_counted[g[a_rows & g_ok]]
    p_rows = (kind == POLICY) & g_ok
    p_match = p_rows.copy()
    p_match[p_rows] = w.g_module[g[p_rows]] == module[p_rows]
    truth[p_match] = w.g_counted[g[p_match]]
    m_rows = kind == MODULE
    mi = m_index(np.where(module[m_rows] >= 0, eid[m_rows] * nm + module[m_rows], -1))
    truth[np.flatnonzero(m_rows)[(mi >= 0) & (module[m_rows] >= 0)]] = msum[mi[(mi >= 0) & (module[m_rows] >= 0)]]
    e_rows = (kind == EPISODE) | (kind == OTHER)
    truth[e_rows] = esum[eid[e_rows]]
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
    miss.append((AGENT, w.g_eid[sel], w.g_agent[sel], np.full(sel.sum(), -1), w.g_counted[sel]))
    sel = gl & mg & flags[w.g_eid, POLICY] & ~rep_policy.has(np.where(mg, (w.g_eid * na + w.g_agent) * nm + w.g_module, -1))
    miss.append((POLICY, w.g_eid[sel], w.g_agent[sel], w.g_module[sel], w.g_counted[sel]))
    m_eid, m_mod = (muniq // nm).astype(np.int64), (muniq % nm).astype(np.int64)
    sel = live[m_eid] & flags[m_eid, MODULE] & ~rep_module.has(muniq)
    miss.append((MODULE, m_eid[sel], np.full(sel.sum(), -1), m_mod[sel], msum[sel]))
    e_all = np.flatnonzero(live & flags[:, EPISODE] & ~rep_episode)
    miss.append((EPISODE, e_all, np.full(len(e_all), -1), np.full(len(e_all), -1), esum[e_all]))
    n_miss = sum(len(x[1]) for x in miss)
    w.c_kind = np.concatenate([kind] + [np.full(len(x[1]), x[0]) for x in miss]).astype(np.int64)
    w.c_kind_name = np.concatenate([w.kind_names[w.p_kind_name[idx]], np.array([KINDS[x[0]] for x in miss for _ in range(len(x[1]))], dtype=object)])
    w.c_kcode = np.concatenate([w.p_kind_name[idx], np.full(n_miss, len(w.kind_names) - 1)])
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
    with np.errstate(invalid="ignore", over="ignore"):
        w.c_diff = w.c_value - w.c_truth
        w.c_clean = np.isfinite(w.c_value) & np.isfinite(w.c_truth) & (np.abs(w.c_diff) <= ctx.atol + ctx.rtol * np.maximum(np.abs(w.c_truth), np.abs(w.c_value)))
    # The key a value is about: agent id (agent), module id (module, policy), "return" (episode).
    w.c_sel = np.where(w.c_kind == AGENT, w.c_agent, np.where((w.c_kind == MODULE) | (w.c_kind == POLICY), w.c_module, -1))


# --------------------------------------------------------------------------- 5. tally


def _names(w: _Window, kind: np.ndarray, sel: np.ndarray) -> np.ndarray:
    agents = np.append(w.agents, None).astype(object)
    modules = np.append(w.modules, None).astype(object)
    out = np.full(len(sel), "return", dtype=object)
    is_agent, is_module = kind == AGENT, (kind == MODULE) | (kind == POLICY)
    out[is_agent] = agents[sel[is_agent]]
    out[is_module] = modules[sel[is_module]]
    return out


def _tally(w: _Window, ctx: _Context, out: Tally, a: int, b: int) -> None:
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
    for p in np.unique(w.ep_phase[w.closed & w.has_raw]):
        name = w.phases[p]
        out.raw_phases[name] = out.raw_phases.get(name, 0) + int(((w.ep_phase == p) & w.closed & w.has_raw).sum())
    out.reported_phases |= {w.phases[p] for p in np.unique(w.p_phase)}
    _dashboard(w, ctx, out, a, b)


def _frame(w: _Window, rows: np.ndarray, keys: np.ndarray, phases: np.ndarray) -> pd.DataFrame:
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
            "chunks": w.ep_chunks[e],
            "missing_report": w.c_missing[rows],
            "ord": np.where(w.c_missing[rows], np.nan, w.c_ord[rows].astype(float)),
            "clean": w.c_clean[rows],
            "metrics_call": np.where(w.c_missing[rows], np.nan, w.c_call[rows]),
            "iteration": np.where(w.c_missing[rows], np.nan, w.c_iteration[rows]),
        }
    )


def _features(w: _Window, episodes: np.ndarray) -> pd.DataFrame:
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
            "first_chunk": w.g_first[sel],
        }
    )


def _wrong(w: _Window, ctx: _Context, out: Tally, k: np.ndarray, names: np.ndarray, phases: np.ndarray) -> None:
    """Keep, per key, the ``explain_limit`` wrong values with the largest differences."""
    bad = np.flatnonzero(~w.c_clean)
    if not len(bad):
        return
    frame = _frame(w, bad, names[k[bad]], phases)
    frame["nan"] = np.isnan(frame["diff"]).astype(int)
    frame["abs"] = -frame["diff"].abs()
    frame = frame.sort_values(["phase", "kind", "key", "nan", "abs", "ord", "runner_id", "episode_id"], na_position="last", kind="stable")
    frame = frame.groupby(["phase", "kind", "key"], sort=False, dropna=False).head(ctx.explain_limit).drop(columns=["nan", "abs"])
    out.bad.append(frame)
    keep = np.zeros(w.E, bool)
    keep[w.c_eid[bad]] = True
    wanted = set(zip(frame["runner_id"], frame["episode_id"]))
    feats = _features(w, keep)
    out.features.append(feats[[x in wanted for x in zip(feats["runner_id"], feats["episode_id"])]])
    # Bound what is kept across windows.
    if sum(len(f) for f in out.bad) > 4 * ctx.explain_limit * max(len(out.keys), 1):
        merged = pd.concat(out.bad, ignore_index=True)
        merged["nan"] = np.isnan(merged["diff"]).astype(int)
        merged["abs"] = -merged["diff"].abs()
        merged = merged.sort_values(["phase", "kind", "key", "nan", "abs", "ord", "runner_id", "episode_id"], na_position="last", kind="stable")
        out.bad = [merged.groupby(["phase", "kind", "key"], sort=False, dropna=False).head(ctx.explain_limit).drop(columns=["nan", "abs"])]
        wanted = set(zip(out.bad[0]["runner_id"], out.bad[0]["episode_id"]))
        feats = pd.concat(out.features, ignore_index=True)
        out.features = [feats[[x in wanted for x in zip(feats["runner_id"], feats["episode_id"])]]]


def _excluded(w: _Window, out: Tally) -> None:
    sel = (w.g_npre > 0) & w.closed[w.g_eid] & w.has_raw[w.g_eid] & w.reported[w.g_eid]
    if not sel.any():
        return
    frame = pd.DataFrame({"phase": w.phases[w.ep_phase[w.g_eid[sel]]], "agent": w.agents[w.g_agent[sel]], "pre": w.g_pre[sel], "n": w.g_npre[sel]})
    for (phase, agent), g in frame.groupby(["phase", "agent"]):
        prev = out.excluded.setdefault((phase, agent), [0, 0.0, 0])
        prev[0] += len(g)
        prev[1] += float(g["pre"].sum())
        prev[2] += int(g["n"].sum())


def _unreported(w: _Window, out: Tally) -> None:
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


def _orphans(w: _Window, out: Tally) -> None:
    sel = np.flatnonzero(w.orphan)
    if not len(sel):
        return
    frame = pd.DataFrame({"phase": w.phases[w.p_phase[sel]], "kind": w.kind_names[w.p_kind_name[sel]], "episode": w.episodes[w.p_episode[sel]], "ord": w.ord[sel]})
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


# --------------------------------------------------------------------------- dashboards


def _dashboard(w: _Window, ctx: _Context, out: Tally, a: int, b: int) -> None:
    """What each iteration's dashboard value covers, reduced (see dashboard.py)."""
    if ctx.model not in ("per_call_window", "driver_history") or not len(w.c_eid):
        return
    shown = np.flatnonzero(~w.c_missing)  # reported values, in RLlib's order (ord)
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
        calls = _per_call(w, ctx, shown, g2, G2)
        out.dash_calls.append(label.assign(**calls))
    else:
        frame = label.iloc[g2].reset_index(drop=True).assign(
            runner=w.ep_runner[w.c_eid[shown]], call=w.c_call[shown], ord=w.c_ord[shown], value=value, truth=truth
        )
        out.dash_calls.append(_driver_history(frame, w, ctx, a, b))


def _per_call(w: _Window, ctx: _Context, shown: np.ndarray, g2: np.ndarray, G2: int) -> dict:
    """Ray 2.4x+ new stack: each runner keeps the last ceil(S / runners) values per key
    and every get_metrics() call reduces and clears them; the iteration shows the mean of
    the per-(runner, call) means (min of mins, max of maxes)."""
    runner, call = w.ep_runner[w.c_eid[shown]], w.c_call[shown]
    g1, g1_keys = pd.factorize((g2.astype(np.int64) * (len(w.runners) + 1) + runner) * (int(call.max()) - int(call.min()) + 1) + (call - int(call.min())))
    G1 = len(g1_keys)
    order = np.argsort(g1, kind="stable")  # rows are in RLlib's order already
    sizes = np.bincount(g1, minlength=G1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    from_end = np.empty(len(g1), np.int64)
    from_end[order] = sizes[g1[order]] - 1 - (np.arange(len(g1)) - starts[g1[order]])
    evaluation = np.asarray(w.phases, dtype=object)[w.c_phase[shown]] == "evaluation" if len(w.phases) else np.zeros(len(g1), bool)
    keep = from_end < np.where(evaluation, ctx.eval_window, ctx.train_window)
    g1_g2 = np.zeros(G1, np.int64)
    g1_g2[g1] = g2
    if ctx.discard and evaluation.any():  # the driver never reads each remote runner's last evaluation call
        rk = g2.astype(np.int64) * (len(w.runners) + 1) + runner
        last = pd.Series(call).groupby(rk).transform("max").to_numpy()
        keep &= ~(evaluation & (call == last))
    g, v, t = g1[keep], w.c_value[shown][keep], w.c_truth[shown][keep]
    n = np.bincount(g, minlength=G1)
    has = n > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        r_mean, t_mean = np.bincount(g, weights=v, minlength=G1) / n, np.bincount(g, weights=t, minlength=G1) / n
    r_min, r_max, t_min, t_max = np.full(G1, np.inf), np.full(G1, -np.inf), np.full(G1, np.inf), np.full(G1, -np.inf)
    np.minimum.at(r_min, g, v)
    np.maximum.at(r_max, g, v)
    np.minimum.at(t_min, g, t)
    np.maximum.at(t_max, g, t)
    # Per (series, iteration): mean of the per-call means, min of mins, max of maxes.
    h = g1_g2[has]
    m = np.bincount(h, minlength=G2)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"r_mean": np.bincount(h, weights=r_mean[has], minlength=G2) / m, "t_mean": np.bincount(h, weights=t_mean[has], minlength=G2) / m}
    for name, src, ufunc, init in (("r_min", r_min, np.minimum, np.inf), ("r_max", r_max, np.maximum, -np.inf), ("t_min", t_min, np.minimum, np.inf), ("t_max", t_max, np.maximum, -np.inf)):
        acc = np.full(G2, init)
        ufunc.at(acc, h, src[has])
        out[name] = np.where(m > 0, acc, np.nan)
    return out


def _reduce(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    g = frame.groupby(by, sort=False)
    return pd.DataFrame(
        {
            "r_mean": g["value"].mean(),
            "r_min": g["value"].min(),
            "r_max": g["value"].max(),
            "t_mean": g["truth"].mean(),
            "t_min": g["truth"].min(),
            "t_max": g["truth"].max(),
        }
    ).reset_index()


def _driver_history(frame: pd.DataFrame, w: _Window, ctx: _Context, a: int, b: int) -> pd.DataFrame:
    """Ray 2.1x / old stack: an iteration covers the last max(S, new) episodes (training),
    or that iteration's episodes (evaluation). The last S episodes per key carry over."""
    parts = [_reduce(frame[frame["phase"] == "evaluation"], ["phase", "kind", "sel_key", "iteration"])]
    train = frame[frame["phase"] != "evaluation"].assign(runner=lambda f: w.runners[f["runner"].to_numpy()])
    train = train.assign(episode=w.episodes[w.ep_episode[w.c_eid[~w.c_missing]][(frame["phase"] != "evaluation").to_numpy()]])
    if ctx.hist is not None:
        train = pd.concat([ctx.hist, train], ignore_index=True)
    disp = ctx.displayed
    disp = disp[(disp["phase"] != "evaluation") & (disp["iteration"] >= a) & (disp["iteration"] <= b)]
    disp = disp.assign(sel_key=disp["key"].where(disp["kind"] != Kind.EPISODE.value, None))
    disp["sel_key"] = disp["sel_key"].astype(object).where(disp["sel_key"].notna(), "\x00none")
    rows, carry = [], []
    for (phase, kind, sel), g in train.groupby(["phase", "kind", "sel_key"], sort=False):
        g = g.sort_values("ord", kind="stable")
        first = g.drop_duplicates(["runner", "episode"])
        pos = pd.Series(np.arange(1, len(first) + 1), index=pd.MultiIndex.from_frame(first[["runner", "episode"]]))
        g_pos = pos.reindex(pd.MultiIndex.from_frame(g[["runner", "episode"]])).to_numpy()
        ep_it = first["iteration"].to_numpy()
        want = disp[(disp["phase"] == phase) & (disp["kind"] == kind) & (disp["sel_key"] == sel)]["iteration"].unique()
        for it in sorted(want):
            upto = ep_it <= it
            if not upto.any():
                continue
            hi = int(np.arange(1, len(first) + 1)[upto].max())
            lo = hi - max(ctx.S, int((ep_it == it).sum()))
            sel_rows = g[(g_pos > lo) & (g_pos <= hi)]
            rows.append(
                {
                    "phase": phase, "kind": kind, "sel_key": sel, "iteration": it,
                    "r_mean": sel_rows["value"].mean(), "r_min": sel_rows["value"].min(), "r_max": sel_rows["value"].max(),
                    "t_mean": sel_rows["truth"].mean(), "t_min": sel_rows["truth"].min(), "t_max": sel_rows["truth"].max(),
                }
            )
        carry.append(g[g_pos > len(first) - ctx.S])
    ctx.hist = pd.concat(carry, ignore_index=True) if carry else ctx.hist
    parts.append(pd.DataFrame(rows))
    return pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else pd.DataFrame()


def dashboard_frame(out: Tally) -> pd.DataFrame:
    """Per (phase, kind, key, iteration): RLlib's values and the truth, reduced over what
    the iteration's dashboard value covers, and the truth range of its episodes."""
    calls = [f for f in out.dash_calls if len(f)]
    its = [f for f in out.dash_its if len(f)]
    if not calls and not its:
        return pd.DataFrame()
    keys = ["phase", "kind", "sel_key", "iteration"]
    c = pd.concat(calls, ignore_index=True) if calls else pd.DataFrame(columns=keys + ["r_mean", "r_min", "r_max", "t_mean", "t_min", "t_max"])
    i = pd.concat(its, ignore_index=True).groupby(keys, sort=False).agg(low=("low", "min"), high=("high", "max")).reset_index() if its else pd.DataFrame(columns=keys + ["low", "high"])
    merged = c.merge(i, on=keys, how="outer")
    merged["sel_key"] = merged["sel_key"].where(merged["sel_key"] != "\x00none", None)
    return merged
