"""Reading one iteration window of a run as integer-coded numpy arrays.

String ids (runner, episode, agent, module, phase, kind) are read as Parquet dictionaries
and unified across the window's raw and reported parts into one code space, so that every
group-by of the reconciliation is an array pass over dense integers (``factorize``,
``KeyMap``) instead of a hash table over strings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import schema
from .errors import CorruptRunError, InvalidDataError
from .schema import Kind, Phase, Semantics
from .store import DAMAGED_FIX, Part, Run, check_required

if TYPE_CHECKING:
    from .learning import LearningStream

KINDS = [Kind.AGENT.value, Kind.MODULE.value, Kind.POLICY.value, Kind.EPISODE.value]  # codes 0..3; 4 = any other kind
AGENT, MODULE, POLICY, EPISODE, OTHER = range(5)
RAW_COLUMNS = ["phase", "runner_id", "episode_id", "agent_id", "chunk_seq", "module_id", "reward", "pre_obs_reward", "n_rewards", "n_pre_obs",
               "episode_done", "iteration", "reward_cancel", "reward_bits", "reward_clipped"]
REP_COLUMNS = ["phase", "runner_id", "episode_id", "kind", "agent_id", "module_id", "value", "semantics", "metrics_call", "iteration"]
_STRINGS = {"phase", "runner_id", "episode_id", "agent_id", "module_id", "kind", "semantics"}
_DICT = pa.dictionary(pa.int32(), pa.string())
MAX_CHUNK_SEQ = 2**32 - 1  # sample() calls per runner; larger values would overflow the packed integer keys of tally
_CANONICAL = {f.name: f.type for table in (schema.RAW_REWARDS, schema.REPORTED_EPISODES) for f in table}


class Window:
    """One window's arrays, every id integer-coded; ``tally`` fills in the rest step by step."""


# --------------------------------------------------------------------------- dense integer keys

_DENSE_LIMIT = 1 << 27  # key spaces up to this size use arrays, not hash tables


def _dense(space: int, n: int) -> bool:
    """Whether ``n`` keys below ``space`` are cheaper as an array than as a hash table."""
    return 0 < space <= min(max(1 << 22, 16 * n), 4 * _DENSE_LIMIT)


def factorize(keys: np.ndarray, space: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, uniques)`` of non-negative integer ``keys < space``: an O(n) array pass when
    the key space is small enough (the usual case: dense dictionary codes), else hashing."""
    keys = np.asarray(keys, dtype=np.int64)
    if _dense(space, len(keys)):
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
        if _dense(space, len(uniques)):
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


def code_of(dictionary: np.ndarray, name: str) -> int:
    """The code of ``name`` in a window's dictionary (-2 when absent: matches no code)."""
    hits = np.flatnonzero(np.asarray(dictionary, dtype=object) == name)
    return int(hits[0]) if len(hits) else -2


# --------------------------------------------------------------------------- 1. read


def read_parts(run: Run, table: str, parts: list[Part], columns: list[str], a: int, b: int, with_ord: dict | None) -> tuple[pa.Table, np.ndarray, list[str]]:
    tables, files, file_of = [], [], []
    strings = [c for c in columns if c in _STRINGS]
    for part in parts:
        # Only the row groups that hold iterations of this window (a compacted part has one
        # row group per original part).
        offsets = np.concatenate([[0], np.cumsum([g[2] for g in part.groups])]).astype(np.int64)
        wanted = [i for i, g in enumerate(part.groups) if g[1] >= a and g[0] <= b]
        # Schema-1 raw parts lack the columns added in schema 2: read as null.
        absent = [c for c in schema.V2_RAW_COLUMNS if c in columns] if part.version == 1 else []
        present = [c for c in columns if c not in absent]
        try:
            with run.filesystem.open_input_file(part.path) as f:
                if len(wanted) == len(part.groups):
                    t = pq.read_table(f, columns=present, read_dictionary=strings)
                else:
                    t = pq.ParquetFile(f, read_dictionary=strings).read_row_groups(wanted, columns=present)
            for c in absent:
                t = t.append_column(c, pa.nulls(t.num_rows, schema.RAW_REWARDS.field(c).type))
            t = t.select(columns + (["ord"] if "ord" in t.column_names else []))
            for c in strings:  # a damaged page can hold invalid UTF-8 or dictionary indices out of range
                t.column(c).validate(full=True)
        except (pa.ArrowInvalid, OSError) as e:
            raise CorruptRunError(f"{part.path}: unreadable Parquet ({str(e).splitlines()[0]}); {DAMAGED_FIX}") from e
        check_required(table, t, part.path)
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
        try:
            tables.append(t if t.schema.equals(typed) else t.cast(typed))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:  # store._inspect admits lossless types only
            raise InvalidDataError(f"{part.path}: a column does not read as its schema type ({str(e).splitlines()[0]}); {DAMAGED_FIX}") from e
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


def codes(*columns: pa.ChunkedArray | None) -> tuple[list[np.ndarray], np.ndarray]:
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


def read_window(
    run: Run, raw_parts: list[Part], rep_parts: list[Part], a: int, b: int, carried: pa.Table | None, rep_index: dict, left_out: "LeftOut | None" = None,
    learning: "LearningStream | None" = None, carried_batch: pa.Table | None = None,
) -> Window:
    """One window's rows, encoded: raw rewards, RLlib's reported values and, with
    ``learning`` (learning.py), the training batches (``b_*`` arrays) in the same codes."""
    w = Window()
    w.unknown = {}
    w.duplicates = []  # (table, rows dropped, files): identical copies, de-duplicated
    raw, w.raw_file, w.raw_files = read_parts(run, "raw_rewards", raw_parts, RAW_COLUMNS, a, b, None)
    fresh_files = len(w.raw_files)  # rows from files read now; carried rows were counted before
    if carried is not None and carried.num_rows:
        carried_files = carried.column("file").to_numpy(zero_copy_only=False)
        carried = carried.drop_columns(["file"]).cast(_typed(carried.drop_columns(["file"]).schema))
        offset = len(w.raw_files)
        names = sorted(set(carried_files))
        w.raw_files += names
        w.raw_file = np.concatenate([w.raw_file, offset + np.searchsorted(names, carried_files)]).astype(np.int32)
        raw = carried if raw is None else pa.concat_tables([raw, carried.cast(raw.schema)])
    rep, w.rep_file, w.rep_files = read_parts(run, "reported_episodes", rep_parts, REP_COLUMNS, a, b, rep_index)
    w.rows_read = (raw.num_rows if raw is not None else 0) + (rep.num_rows if rep is not None else 0)
    if rep is not None:  # values this reward_audit cannot rebuild are counted, not compared
        (sem,), values = codes(rep.column("semantics"))
        known = pa.array(values[sem] == Semantics.EPISODE_SUM_COUNTED.value) if len(sem) else pa.array([], pa.bool_())
        other = rep.filter(pc.invert(known))
        if other.num_rows:
            for (phase, kind, s), n in other.select(["phase", "kind", "semantics"]).to_pandas().astype(str).value_counts(sort=False).items():
                w.unknown[(phase, kind, s)] = w.unknown.get((phase, kind, s), 0) + int(n)
        w.rep_file = w.rep_file[known.to_numpy(zero_copy_only=False)]
        rep = rep.filter(known)
    if left_out:
        raw, w.raw_file = left_out.apply(raw, w.raw_file)
        rep, w.rep_file = left_out.apply(rep, w.rep_file)
    batch = carried_batch if carried_batch is not None and carried_batch.num_rows else None
    if learning:
        fresh, read, notes = learning.batch(a, b, left_out)
        w.rows_read += read
        w.duplicates += notes
        if fresh is not None and fresh.num_rows:
            batch = fresh if batch is None else pa.concat_tables([fresh, batch.cast(fresh.schema)])
    w.batch = batch
    _encode(w, raw, rep)
    keep_raw, note_raw = unique_rows("raw_rewards", [w.r_runner, w.r_episode, w.chunk, w.r_agent], raw, w.raw_file, w.raw_files, RAW_VALUES)
    keep_rep, note_rep = unique_rows("reported_episodes", [w.p_runner, w.p_episode, w.p_kind_code, w.p_agent, w.p_module, w.call], rep, w.rep_file, w.rep_files, REP_VALUES)
    w.duplicates += [n for n in (note_raw, note_rep) if n]
    if keep_raw is not None or keep_rep is not None:  # rare: identical copies, encode again without them
        if keep_raw is not None:
            raw, w.raw_file = raw.filter(pa.array(keep_raw)), w.raw_file[keep_raw]
        if keep_rep is not None:
            rep, w.rep_file = rep.filter(pa.array(keep_rep)), w.rep_file[keep_rep]
        _encode(w, raw, rep)
    fresh = w.raw_file < fresh_files
    w.runner_rows = dict(zip(w.runners, np.bincount(w.r_runner[fresh], minlength=len(w.runners)).tolist())) if fresh.any() else {}
    return w


RAW_VALUES = ["module_id", "reward", "pre_obs_reward", "n_rewards", "n_pre_obs", "episode_done", "reward_cancel", "reward_bits", "reward_clipped"]
REP_VALUES = ["value", "semantics"]


class LeftOut:
    """Rows the audit leaves out: every row of the listed (runner, episode) pairs, or of
    whole runners (their hand-overs were lost, so their episodes cannot be complete)."""

    def __init__(self, runners: set[str], episodes: set[tuple[str, str]]):
        self.runners, self.episodes = runners, episodes

    def __bool__(self) -> bool:
        return bool(self.runners or self.episodes)

    def apply(self, t: pa.Table | None, file_of: np.ndarray) -> tuple[pa.Table | None, np.ndarray]:
        if t is None or not t.num_rows:
            return t, file_of
        runner = t.column("runner_id").cast(pa.string()).to_numpy(zero_copy_only=False)
        episode = t.column("episode_id").cast(pa.string()).to_numpy(zero_copy_only=False)
        drop = np.isin(runner, list(self.runners)) if self.runners else np.zeros(len(runner), bool)
        if self.episodes:
            drop |= np.array([(r, e) in self.episodes for r, e in zip(runner, episode)], bool)
        keep = ~drop
        return t.filter(pa.array(keep)), file_of[keep]


def _may_repeat(key_codes: list[np.ndarray]) -> bool:
    """Whether two rows may share a key: one hash per row and a sort (a hash collision only
    sends the caller to the exact check)."""
    if not len(key_codes) or len(key_codes[0]) < 2:
        return False
    hashed = np.zeros(len(key_codes[0]), np.uint64)
    for i, c in enumerate(key_codes):
        hashed ^= pd.util.hash_array(np.asarray(c, np.int64)) * np.uint64(2 * i + 1)
    ordered = np.sort(hashed)
    return bool((ordered[1:] == ordered[:-1]).any())


def unique_rows(table: str, key_codes: list[np.ndarray], t: pa.Table | None, file_of: np.ndarray, files: list[str], values: list[str]) -> tuple[np.ndarray | None, tuple | None]:
    """``(None, None)`` if every row's key is unique (the usual case: one hash and one sort).
    Else the mask of rows to keep and the note ``(table, rows dropped, files)``: an identical
    copy of a row (a part copied under a second name, a runner drained twice) is dropped and
    noted; two rows with one key and different values are contradictory data, an error
    naming both files."""
    if t is None or not t.num_rows or not _may_repeat(key_codes):
        return None, None
    frame = pd.DataFrame({str(i): c for i, c in enumerate(key_codes)})
    dup = frame.duplicated(keep=False).to_numpy()
    if not dup.any():
        return None, None
    rows = np.flatnonzero(dup)
    sub = t.take(pa.array(rows)).select(values).to_pandas()
    sub.columns = [f"v{i}" for i in range(len(values))]
    sub = pd.concat([frame.iloc[rows].reset_index(drop=True), sub.astype(str)], axis=1)
    sub["row"] = rows
    keys = list(frame.columns)
    distinct = sub.drop_duplicates(keys + [f"v{i}" for i in range(len(values))])
    conflict = distinct[distinct.duplicated(keys, keep=False)]
    if len(conflict):
        one = conflict[(conflict[keys] == conflict[keys].iloc[0]).all(axis=1)]  # the first contradicted key
        first = one["row"].to_numpy()[:2]
        names = sorted({files[file_of[r]] for r in first})
        raise InvalidDataError(
            f"{' and '.join(names)}: the same {table} row ({_describe(t, first[0])}) twice with different values; "
            "the run folder holds contradictory copies — keep the one from the original run and delete the other"
        )
    keep = np.ones(t.num_rows, bool)
    keep[sub.loc[sub.duplicated(keys, keep="first"), "row"].to_numpy()] = False
    return keep, (table, int((~keep).sum()), sorted({files[file_of[r]] for r in rows}))


def _describe(t: pa.Table, row: int) -> str:
    r = t.slice(int(row), 1).to_pylist()[0]
    keys = ("runner_id", "episode_id", "chunk_seq", "agent_id", "kind", "module_id")
    return ", ".join(f"{k} {r[k]}" for k in keys if r.get(k) is not None)


def _encode(w: Window, raw: pa.Table | None, rep: pa.Table | None) -> None:
    nraw = raw.num_rows if raw is not None else 0
    nrep = rep.num_rows if rep is not None else 0
    col = lambda t, name: None if t is None else t.column(name)  # noqa: E731
    batch = w.batch
    nbatch = batch.num_rows if batch is not None else 0
    (w.r_runner, w.p_runner, w.b_runner), w.runners = codes(col(raw, "runner_id"), col(rep, "runner_id"), col(batch, "runner_id"))
    (w.r_episode, w.p_episode, w.b_episode), w.episodes = codes(col(raw, "episode_id"), col(rep, "episode_id"), col(batch, "episode_id"))
    (w.r_agent, w.p_agent, w.b_agent), w.agents = codes(col(raw, "agent_id"), col(rep, "agent_id"), col(batch, "agent_id"))
    (w.r_module, w.p_module, w.b_module), w.modules = codes(col(raw, "module_id"), col(rep, "module_id"), col(batch, "module_id"))
    (w.r_phase, w.p_phase), w.phases = codes(col(raw, "phase"), col(rep, "phase"))
    # Training batches (learning.py) are judged in a phase of their own.
    if nbatch and Phase.LEARNING.value not in set(w.phases):
        w.phases = np.append(np.asarray(w.phases, dtype=object), Phase.LEARNING.value)
    w.learning_code = list(w.phases).index(Phase.LEARNING.value) if nbatch else -2
    (w.p_kind_code,), kinds = codes(col(rep, "kind"))
    kind_map = np.array([KINDS.index(k) if k in KINDS else OTHER for k in kinds] + [OTHER], dtype=np.int64)
    w.p_kind = kind_map[w.p_kind_code] if nrep else np.zeros(0, np.int64)
    w.kind_names = np.array(list(kinds) + ["?"], dtype=object)
    num = lambda t, name, dtype: np.zeros(0, dtype) if t is None else t.column(name).to_numpy().astype(dtype, copy=False)  # noqa: E731
    w.chunk = num(raw, "chunk_seq", np.int64)
    w.reward = num(raw, "reward", np.float64)
    w.pre = num(raw, "pre_obs_reward", np.float64)
    w.npre = num(raw, "n_pre_obs", np.int64)
    w.nrew = num(raw, "n_rewards", np.int64)
    # Σ|r| and significand bits per row (NaN / 53 where the part predates schema 2).
    cancel = np.zeros(0) if raw is None else pc.fill_null(raw.column("reward_cancel").cast(pa.float64()), np.nan).to_numpy()
    w.r_abs = np.abs(w.reward) + cancel  # ≥ Σ|r|
    w.r_clipped = np.zeros(0) if raw is None else pc.fill_null(raw.column("reward_clipped"), np.nan).to_numpy().astype(np.float64)
    w.r_bits = np.zeros(0, np.int64) if raw is None else pc.fill_null(raw.column("reward_bits"), 53).to_numpy().astype(np.int64)
    w.done = num(raw, "episode_done", bool)
    w.r_iteration = num(raw, "iteration", np.int64)
    w.value = num(rep, "value", np.float64)
    w.call = num(rep, "metrics_call", np.int64)
    w.p_iteration = num(rep, "iteration", np.int64)
    w.ord = num(rep, "ord", np.int64)
    w.b_reward = num(batch, "reward", np.float64)
    w.b_n = num(batch, "n_rewards", np.int64)
    w.b_chunk = num(batch, "chunk_seq", np.int64)
    w.b_iteration = num(batch, "iteration", np.int64)
    w.b_bits = np.zeros(0, np.int64) if batch is None else pc.fill_null(batch.column("reward_bits"), 53).to_numpy().astype(np.int64)
    if len(w.chunk) and (w.chunk.min() < 0 or w.chunk.max() > MAX_CHUNK_SEQ):
        i = int(np.argmin(w.chunk)) if w.chunk.min() < 0 else int(np.argmax(w.chunk))
        raise InvalidDataError(
            f"{w.raw_files[w.raw_file[i]]}: `chunk_seq` {w.chunk[i]} (episode {w.episodes[w.r_episode[i]]}), expected 0 to 2^32 − 1 "
            "(a runner's `sample()` call number); the file was not written by reward_audit — re-record the run"
        )
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
    keys = np.concatenate([w.r_episode * nr + w.r_runner, w.p_episode * nr + w.p_runner, w.b_episode * nr + w.b_runner])
    eid, uniques = factorize(keys, max(len(w.episodes), 1) * nr)
    w.E = len(uniques)
    w.r_eid, w.p_eid, w.b_eid = eid[:nraw], eid[nraw : nraw + nrep], eid[nraw + nrep :]
    w.ep_runner = (uniques % nr).astype(np.int64)
    w.ep_episode = (uniques // nr).astype(np.int64)
