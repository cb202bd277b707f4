"""Reconciliation: the env's raw rewards (truth) against RLlib's per-episode reported
returns, as joins and group-bys over the run's Parquet parts (DuckDB), streamed by
iteration window so memory does not grow with the run's length. No Ray import.

    >>> audit = compare("runs/PPO_trial_0")
    >>> audit.ok, [str(f) for f in audit.failures()]
    (False, ['train module p0: LEAK — LEAK in 6/14 episodes (mean truth 30, reported 230) ...'])

Truth for a reported number is built to mean what the adapter declared it to mean
(``schema.Semantics``): for ``episode_sum_counted`` it is the sum over the episode of the
rewards RLlib counts, i.e. every reward the env paid minus those paid before or with the
agent's first observation, over the agent(s) the row is about.

The steps (each a function below):

1. ``_plan`` — cut the run into iteration windows of about ``window_rows`` raw rows
   (episodes span neighbouring iterations; an episode still running at a window's end is
   carried into the next one as partial sums);
2. per window: ``_truth`` (per episode and agent: counted / pre-obs sums, module, chunks),
   ``_close`` (episodes that finished or were reported), ``_join`` (every value RLlib should
   have reported, joined with what it did report, truth beside it, verdict CLEAN or not),
   ``_accumulate`` (per-key counts and sums, the wrong values with the largest
   differences, excluded rewards, unreported episodes, dashboard windows);
3. ``_findings`` — explanations and attribution for at most ``EXPLAIN_LIMIT`` wrong values
   per finding (largest differences first; every wrong value is still counted), then the
   warnings (EXCLUDED, INCOMPLETE, UNVERIFIED) and the dashboard rebuild.

If data of an episode turns up after the window that closed it (which a run recorded by
``RewardAuditCallback`` never writes), the audit is redone in one window and says so.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import duckdb
import numpy as np
import pandas as pd

from .attribution import explain, feature_row, fit
from .audit import FAILURES, SEVERITY, Audit, Evidence, Finding, Verdict
from .dashboard import build_dashboard, dashboard_rows
from .errors import InvalidDataError
from .schema import Kind, Phase, Semantics
from .store import Part, Run, load_run

__all__ = ["compare", "Audit", "Finding", "Evidence", "Verdict", "FAILURES", "EXPLAIN_LIMIT"]

KIND_ORDER = {Kind.MODULE.value: 0, Kind.POLICY.value: 1, Kind.AGENT.value: 2, Kind.EPISODE.value: 3}
EXPLAIN_LIMIT = 200  # wrong values explained (and fitted) per finding, largest differences first
WINDOW_ROWS = 2_000_000  # raw rows per streaming window
MEMORY_LIMIT = os.environ.get("REWARD_AUDIT_MEMORY_LIMIT", "600MB")  # DuckDB's own buffers; it spills beyond
_COUNTED = Semantics.EPISODE_SUM_COUNTED.value

Progress = Callable[[str, float], None]  # (what, fraction done)


class _LateData(Exception):
    """Rows of an episode arrived after the window that closed it."""


# --------------------------------------------------------------------------- public


def compare(
    run: Run | str,
    *,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    max_evidence: int = 5,
    progress: Progress | None = None,
    window_rows: int = WINDOW_ROWS,
) -> Audit:
    """Reconcile one run. ``run`` is a loaded ``Run`` or a path / URI for ``load_run``."""
    if not isinstance(run, Run):
        run = load_run(run)
    start = time.perf_counter()
    try:
        state = _reconcile(run, atol, rtol, window_rows, progress)
    except _LateData as e:
        state = _reconcile(run, atol, rtol, None, progress)
        state.notes.append(f"{e}; audited in one window instead")
    findings = _findings(run, state, max_evidence)
    if progress:
        progress("dashboards", 0.99)
    iterations, notes = dashboard_rows(run)
    dashboard = build_dashboard(run, state.dash, iterations, atol=atol, rtol=rtol)
    stats = {**state.stats, "seconds": time.perf_counter() - start}
    state.close()
    return Audit(
        run.path,
        run.name,
        run.manifest,
        tuple(findings),
        lambda: episodes_frame(run, atol=atol, rtol=rtol),
        tuple(dashboard),
        tuple(state.notes + notes),
        stats,
    )


def episodes_frame(run: Run | str, *, atol: float = 1e-6, rtol: float = 1e-5) -> pd.DataFrame:
    """Every compared (episode, kind, key) value with its verdict and explanation, as one
    DataFrame (``Audit.episodes``). Holds the whole comparison in memory: for small runs."""
    if not isinstance(run, Run):
        run = load_run(run)
    state = _reconcile(run, atol, rtol, None, None, keep_rows=True)
    table = state.con.execute("SELECT * FROM all_rows ORDER BY ord NULLS LAST, runner_id, episode_id, kind, agent_id, module_id").df()
    feats = state.con.execute("SELECT * FROM all_t ORDER BY runner_id, episode_id, first_chunk, agent_id").df()
    state.close()
    if table.empty:
        return table
    groups = {k: g for k, g in feats.groupby(["runner_id", "episode_id"], sort=False)}
    verdicts, explanations = [], []
    for r in table.itertuples(index=False):
        if r.clean:
            verdicts.append(Verdict.CLEAN.value)
            explanations.append("")
            continue
        verdict, text, _ = _explain_row(r, groups[(r.runner_id, r.episode_id)], atol, rtol)
        verdicts.append(verdict.value)
        explanations.append(text)
    table["verdict"] = verdicts
    table["explanation"] = explanations
    return table.rename(columns={"value": "reported"}).drop(columns=["ord"])


# --------------------------------------------------------------------------- state


@dataclass
class _State:
    con: duckdb.DuckDBPyConnection
    tmp: tempfile.TemporaryDirectory
    windows: int = 0
    notes: list = None  # type: ignore[assignment]
    stats: dict = None  # type: ignore[assignment]
    dash: pd.DataFrame | None = None
    atol: float = 0.0
    rtol: float = 0.0

    def close(self) -> None:
        self.con.close()
        self.tmp.cleanup()


def _connect() -> tuple[duckdb.DuckDBPyConnection, tempfile.TemporaryDirectory]:
    tmp = tempfile.TemporaryDirectory(prefix="reward_audit_")
    # In memory, bounded by ``memory_limit``; DuckDB spills what does not fit to ``tmp``.
    con = duckdb.connect(
        config={"memory_limit": MEMORY_LIMIT, "temp_directory": tmp.name, "preserve_insertion_order": False}
    )
    con.execute("SET enable_progress_bar = false")  # it would write to stdout
    return con, tmp


def _files(parts: list[Part]) -> str:
    return "[" + ", ".join("'" + p.path.replace("'", "''") + "'" for p in parts) + "]"


# --------------------------------------------------------------------------- 1. plan


def _plan(run: Run, window_rows: int | None) -> list[tuple[int, int]]:
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


# --------------------------------------------------------------------------- 2. per window


_SETUP = """
CREATE TABLE open_t (phase VARCHAR, runner_id VARCHAR, episode_id VARCHAR, agent_id VARCHAR, counted DOUBLE,
    pre_obs DOUBLE, n_pre_obs BIGINT, module_id VARCHAR, last_chunk BIGINT, last_counted DOUBLE, first_chunk BIGINT, done BOOLEAN);
CREATE TABLE open_c (runner_id VARCHAR, episode_id VARCHAR, chunks BIGINT);
CREATE TABLE closed (h UBIGINT);
CREATE TABLE acc_key (phase VARCHAR, kind VARCHAR, key VARCHAR, first_ord BIGINT, n_rows BIGINT, s_truth DOUBLE, s_rep DOUBLE,
    n_eps BIGINT, n_clean_eps BIGINT, n_bad BIGINT, unused BIGINT, bad_multi BIGINT, clean_multi BIGINT);
CREATE TABLE bad (phase VARCHAR, kind VARCHAR, key VARCHAR, runner_id VARCHAR, episode_id VARCHAR, agent_id VARCHAR,
    module_id VARCHAR, truth DOUBLE, value DOUBLE, diff DOUBLE, chunks BIGINT, missing_report BOOLEAN, ord BIGINT);
CREATE TABLE bad_t (runner_id VARCHAR, episode_id VARCHAR, agent_id VARCHAR, module_id VARCHAR, earlier DOUBLE, final DOUBLE, first_chunk BIGINT);
CREATE TABLE acc_excl (phase VARCHAR, agent_id VARCHAR, n_eps BIGINT, pre_obs DOUBLE, n_pre_obs BIGINT);
CREATE TABLE acc_unrep (phase VARCHAR, runner_id VARCHAR, episode_id VARCHAR, first_chunk BIGINT, done BOOLEAN, rank BIGINT);
CREATE TABLE acc_unrep_n (phase VARCHAR, done BOOLEAN, n BIGINT);
CREATE TABLE acc_orphan (phase VARCHAR, kind VARCHAR, n_eps BIGINT, example VARCHAR, first_ord BIGINT);
CREATE TABLE acc_unknown (phase VARCHAR, kind VARCHAR, semantics VARCHAR, n BIGINT);
CREATE TABLE acc_phase (phase VARCHAR, reported BOOLEAN, n_eps BIGINT);
CREATE TABLE dash_calls (phase VARCHAR, kind VARCHAR, sel_key VARCHAR, iteration BIGINT, n BIGINT,
    r_mean DOUBLE, r_min DOUBLE, r_max DOUBLE, t_mean DOUBLE, t_min DOUBLE, t_max DOUBLE);
CREATE TABLE dash_its (phase VARCHAR, kind VARCHAR, sel_key VARCHAR, iteration BIGINT, n BIGINT, low DOUBLE, high DOUBLE);
CREATE TABLE hist (phase VARCHAR, kind VARCHAR, sel_key VARCHAR, runner_id VARCHAR, episode_id VARCHAR, iteration BIGINT,
    ord BIGINT, value DOUBLE, truth DOUBLE);
"""


def _reconcile(run: Run, atol: float, rtol: float, window_rows: int | None, progress: Progress | None, keep_rows: bool = False) -> _State:
    con, tmp = _connect()
    state = _State(con, tmp, notes=[], stats={}, atol=atol, rtol=rtol)
    con.execute(_SETUP)
    if keep_rows:
        con.execute("CREATE TABLE all_rows AS SELECT * FROM bad WHERE false")
        con.execute("ALTER TABLE all_rows ADD COLUMN clean BOOLEAN; ALTER TABLE all_rows ADD COLUMN metrics_call BIGINT; ALTER TABLE all_rows ADD COLUMN iteration BIGINT")
        con.execute("CREATE TABLE all_t AS SELECT * FROM bad_t WHERE false")
    rep_parts = list(run.parts.get("reported_episodes", ()))
    con.execute("CREATE TABLE rep_files (filename VARCHAR, idx BIGINT)")
    if rep_parts:
        con.executemany("INSERT INTO rep_files VALUES (?, ?)", [(p.path, i) for i, p in enumerate(rep_parts)])
    manifest = run.manifest
    model = manifest.get("smoothing_model")
    if model == "driver_history":  # the dashboard's iterations: windows cover them even without new episodes
        disp = run.read("reported_iterations").select(["phase", "kind", "key", "iteration"]).to_pandas()
        disp["sel_key"] = disp["key"].where(disp["kind"] != Kind.EPISODE.value, None)
        con.register("disp_df", disp)
        con.execute("CREATE TABLE disp AS SELECT DISTINCT phase, kind, sel_key, iteration FROM disp_df")
    S = int(manifest.get("metrics_num_episodes_for_smoothing") or 100)
    windows = _plan(run, window_rows)
    late = window_rows is not None and len(windows) > 1
    rows_read = 0
    for i, (a, b) in enumerate(windows):
        if progress:
            progress(f"window {i + 1}/{len(windows)} (iterations {a}-{b})", i / max(len(windows), 1))
        raw_parts = [p for p in run.parts.get("raw_rewards", ()) if p.last_iteration >= a and p.first_iteration <= b]
        reps = [p for p in rep_parts if p.last_iteration >= a and p.first_iteration <= b]
        rows_read += _scan(con, run, raw_parts, reps, a, b)
        _truth(con, check_late=late)
        _close(con, last=i == len(windows) - 1)
        _join(con, atol, rtol)
        _accumulate(con, manifest, model, S, keep_rows, a, b)
    state.windows = len(windows)
    state.stats = {"windows": len(windows), "raw_rows": run.rows("raw_rewards"), "reported_rows": run.rows("reported_episodes"), "rows_scanned": rows_read}
    state.dash = _dashboard_frame(con, model, S)
    return state


def _scan(con: duckdb.DuckDBPyConnection, run: Run, raw_parts: list[Part], rep_parts: list[Part], a: int, b: int) -> int:
    """This window's raw rows (``w_raw``) and known-semantics reported rows (``rep``)."""
    raw_cols = "phase, runner_id, episode_id, agent_id, chunk_seq, module_id, reward, pre_obs_reward, n_pre_obs, episode_done"
    rep_cols = "phase, runner_id, episode_id, kind, agent_id, module_id, value, semantics, metrics_call, iteration"
    if run.local:
        raw_src = f"read_parquet({_files(raw_parts)}, filename=true)" if raw_parts else None
        rep_src = f"read_parquet({_files(rep_parts)}, filename=true, file_row_number=true)" if rep_parts else None
    else:  # a pyarrow.fs URI: read with pyarrow, hand DuckDB the Arrow tables
        raw_src = rep_src = None
        if raw_parts:
            con.register("raw_arrow", _with_file_columns(run, "raw_rewards", raw_parts))
            raw_src = "raw_arrow"
        if rep_parts:
            con.register("rep_arrow", _with_file_columns(run, "reported_episodes", rep_parts))
            rep_src = "rep_arrow"
    where = f"WHERE iteration BETWEEN {a} AND {b}"
    if raw_src:
        con.execute(f"CREATE OR REPLACE VIEW w_raw AS SELECT {raw_cols}, filename FROM {raw_src} {where}")
    else:
        con.execute(
            "CREATE OR REPLACE TABLE w_raw (phase VARCHAR, runner_id VARCHAR, episode_id VARCHAR, agent_id VARCHAR, chunk_seq BIGINT, "
            "module_id VARCHAR, reward DOUBLE, pre_obs_reward DOUBLE, n_pre_obs INTEGER, episode_done BOOLEAN, filename VARCHAR)"
        )
    if rep_src:
        con.execute(
            f"INSERT INTO acc_unknown SELECT phase, kind, semantics, count(*) FROM {rep_src} {where} AND semantics <> '{_COUNTED}' GROUP BY ALL;"
            f"CREATE OR REPLACE TABLE rep AS SELECT {rep_cols}, (f.idx << 32) + file_row_number AS ord "
            f"FROM {rep_src} r JOIN rep_files f USING (filename) {where} AND semantics = '{_COUNTED}'"
        )
    else:
        con.execute(
            "CREATE OR REPLACE TABLE rep (phase VARCHAR, runner_id VARCHAR, episode_id VARCHAR, kind VARCHAR, agent_id VARCHAR, "
            "module_id VARCHAR, value DOUBLE, semantics VARCHAR, metrics_call BIGINT, iteration BIGINT, ord BIGINT)"
        )
    con.execute("INSERT INTO acc_phase SELECT DISTINCT phase, true, 0 FROM rep")
    return sum(p.rows for p in raw_parts) + con.execute("SELECT count(*) FROM rep").fetchone()[0]


def _non_finite(con: duckdb.DuckDBPyConnection) -> None:
    file, episode, column, value, n = con.execute(
        "SELECT filename, episode_id, CASE WHEN isfinite(reward) THEN 'pre_obs_reward' ELSE 'reward' END, "
        "CASE WHEN isfinite(reward) THEN pre_obs_reward ELSE reward END, count(*) OVER () "
        "FROM w_raw WHERE NOT (isfinite(reward) AND isfinite(pre_obs_reward)) LIMIT 1"
    ).fetchone()
    raise InvalidDataError(
        f"{file}: {n} raw reward rows with non-finite `{column}` (first: episode {episode}, value {value}); "
        "the env returned NaN/inf rewards, which no return can be checked against — fix the env's `step()`"
    )


def _with_file_columns(run: Run, table: str, parts: list[Part]):
    import pyarrow as pa

    tables = []
    for part in parts:
        t = run.read(table, [part])
        t = t.append_column("filename", pa.array([part.path] * t.num_rows, pa.string()))
        tables.append(t.append_column("file_row_number", pa.array(np.arange(t.num_rows, dtype=np.int64))))
    return pa.concat_tables(tables)


def _truth(con: duckdb.DuckDBPyConnection, check_late: bool) -> None:
    """Per (episode, agent) partial sums of this window, merged with the episodes carried
    over from earlier windows: ``t`` (per agent) and ``ep`` (per episode)."""
    con.execute(
        """
        CREATE OR REPLACE TABLE w_t AS
        SELECT any_value(phase) AS phase, runner_id, episode_id, agent_id,
               fsum(reward - pre_obs_reward) AS counted, fsum(pre_obs_reward) AS pre_obs, sum(n_pre_obs)::BIGINT AS n_pre_obs,
               arg_max(module_id, chunk_seq) AS module_id, max(chunk_seq) AS last_chunk,
               arg_max(reward - pre_obs_reward, chunk_seq) AS last_counted, min(chunk_seq) AS first_chunk,
               bool_or(episode_done) AS done, bit_or(1::UBIGINT << (chunk_seq % 64)::INTEGER) AS chunk_bits,
               count_if(NOT (isfinite(reward) AND isfinite(pre_obs_reward))) AS non_finite
        FROM w_raw GROUP BY runner_id, episode_id, agent_id;
        """
    )
    if con.execute("SELECT sum(non_finite) FROM w_t").fetchone()[0]:
        _non_finite(con)
    # Chunks per episode: the distinct chunk_seq values, from the agents' bitmasks (exact
    # when an episode spans fewer than 64 sample() calls in this window; counted row by
    # row otherwise).
    con.execute(
        """
        CREATE OR REPLACE TABLE w_c AS
        SELECT runner_id, episode_id, bit_count(bit_or(chunk_bits))::BIGINT AS chunks, max(last_chunk) - min(first_chunk) >= 64 AS wide
        FROM w_t GROUP BY runner_id, episode_id;
        """
    )
    if con.execute("SELECT count(*) FROM w_c WHERE wide").fetchone()[0]:
        con.execute(
            """
            UPDATE w_c SET chunks = x.n FROM (
                SELECT runner_id, episode_id, count(DISTINCT chunk_seq) AS n FROM w_raw SEMI JOIN (FROM w_c WHERE wide) USING (runner_id, episode_id) GROUP BY ALL
            ) x WHERE w_c.runner_id = x.runner_id AND w_c.episode_id = x.episode_id
            """
        )
    if con.execute("SELECT count(*) FROM open_c").fetchone()[0]:
        # Episodes carried from the previous window: merge their partial sums with this
        # window's (only theirs; the rest of w_t is already final).
        con.execute(
            """
            CREATE OR REPLACE TABLE carried AS
            SELECT any_value(phase) AS phase, runner_id, episode_id, agent_id, sum(counted) AS counted, sum(pre_obs) AS pre_obs,
                   sum(n_pre_obs)::BIGINT AS n_pre_obs, arg_max(module_id, last_chunk) AS module_id, max(last_chunk) AS last_chunk,
                   arg_max(last_counted, last_chunk) AS last_counted, min(first_chunk) AS first_chunk, bool_or(done) AS done
            FROM (SELECT * FROM w_t SEMI JOIN open_c USING (runner_id, episode_id)
                  UNION ALL BY NAME SELECT * FROM open_t) GROUP BY runner_id, episode_id, agent_id;
            DELETE FROM w_t WHERE (runner_id, episode_id) IN (SELECT (runner_id, episode_id) FROM open_c);
            INSERT INTO w_t BY NAME SELECT * FROM carried;
            CREATE OR REPLACE TABLE carried AS
            SELECT runner_id, episode_id, sum(chunks)::BIGINT AS chunks FROM (
                SELECT runner_id, episode_id, chunks FROM w_c SEMI JOIN open_c USING (runner_id, episode_id)
                UNION ALL SELECT runner_id, episode_id, chunks FROM open_c) GROUP BY ALL;
            DELETE FROM w_c WHERE (runner_id, episode_id) IN (SELECT (runner_id, episode_id) FROM open_c);
            INSERT INTO w_c BY NAME SELECT * FROM carried;
            DROP TABLE carried;
            """
        )
    con.execute("ALTER TABLE w_t RENAME TO t; ALTER TABLE w_c RENAME TO c")
    con.execute(
        """
        CREATE OR REPLACE TABLE ep AS
        SELECT row_number() OVER () AS eid, x.*, c.chunks, r.runner_id IS NOT NULL AS reported
        FROM (SELECT runner_id, episode_id, any_value(phase) AS phase, bool_or(done) AS done, max(last_chunk) AS max_chunk,
                     min(first_chunk) AS first_chunk FROM t GROUP BY runner_id, episode_id) x
        JOIN c USING (runner_id, episode_id)
        LEFT JOIN (SELECT DISTINCT runner_id, episode_id FROM rep) r USING (runner_id, episode_id);
        CREATE OR REPLACE TABLE rk AS SELECT r.*, ep.eid FROM rep r LEFT JOIN ep USING (runner_id, episode_id);
        """
    )
    if check_late:
        late = con.execute(
            "SELECT count(*), any_value(episode_id) FROM (SELECT runner_id, episode_id FROM ep UNION ALL SELECT DISTINCT runner_id, episode_id FROM rk WHERE eid IS NULL) "
            "WHERE hash(runner_id, episode_id) IN (SELECT h FROM closed)"
        ).fetchone()
        if late[0]:
            raise _LateData(f"{late[0]} episodes (e.g. {late[1]}) have rows in a later iteration than the one that closed them")


def _close(con: duckdb.DuckDBPyConnection, last: bool) -> None:
    """Episodes that finished or were reported are closed here; the rest are carried."""
    carry = "false" if last else "NOT (done OR reported)"
    con.execute(
        f"""
        CREATE OR REPLACE TABLE open_t AS SELECT t.* FROM t SEMI JOIN (FROM ep WHERE {carry}) o USING (runner_id, episode_id);
        CREATE OR REPLACE TABLE open_c AS SELECT c.* FROM c SEMI JOIN (FROM ep WHERE {carry}) o USING (runner_id, episode_id);
        DELETE FROM ep WHERE {carry};
        CREATE OR REPLACE TABLE tk AS
            SELECT ep.eid, t.agent_id, t.module_id, t.counted, t.pre_obs, t.n_pre_obs, t.first_chunk,
                   CASE WHEN t.last_chunk = ep.max_chunk THEN t.last_counted ELSE 0.0 END AS final
            FROM t JOIN ep USING (runner_id, episode_id);
        DROP TABLE t; DROP TABLE c;
        INSERT INTO closed SELECT hash(runner_id, episode_id) FROM ep;
        INSERT INTO closed SELECT DISTINCT hash(runner_id, episode_id) FROM rk WHERE eid IS NULL;
        INSERT INTO acc_phase SELECT phase, false, count(*) FROM ep GROUP BY ALL;
        """
    )


def _join(con: duckdb.DuckDBPyConnection, atol: float, rtol: float) -> None:
    """``cmp``: every value RLlib should have reported for the closed, reported episodes
    (of the kinds it reported at all for that episode), outer-joined with what it did
    report, truth beside it. Reported values of episodes with no raw rows: ``orphans``."""
    con.execute(
        f"""
        CREATE OR REPLACE TABLE kinds AS SELECT DISTINCT eid, kind FROM rk WHERE eid IS NOT NULL;
        CREATE OR REPLACE TABLE orphans AS SELECT * FROM rk WHERE eid IS NULL;
        CREATE OR REPLACE TABLE j AS
            SELECT coalesce(x.eid, r.eid) AS eid, 'agent' AS kind, coalesce(x.agent_id, r.agent_id) AS agent_id, NULL::VARCHAR AS module_id,
                   r.eid IS NULL AS missing_report, coalesce(r.value, 0.0) AS value, r.metrics_call, r.iteration, r.ord, coalesce(x.counted, 0.0) AS truth
            FROM (SELECT tk.* FROM tk SEMI JOIN (FROM kinds WHERE kind = 'agent') k USING (eid)) x
            FULL OUTER JOIN (FROM rk WHERE kind = 'agent' AND eid IS NOT NULL) r ON x.eid = r.eid AND x.agent_id = r.agent_id
            UNION ALL
            SELECT coalesce(x.eid, r.eid), 'policy', coalesce(x.agent_id, r.agent_id), coalesce(x.module_id, r.module_id),
                   r.eid IS NULL, coalesce(r.value, 0.0), r.metrics_call, r.iteration, r.ord, coalesce(x.counted, 0.0)
            FROM (SELECT tk.* FROM tk SEMI JOIN (FROM kinds WHERE kind = 'policy') k USING (eid) WHERE module_id IS NOT NULL) x
            FULL OUTER JOIN (FROM rk WHERE kind = 'policy' AND eid IS NOT NULL) r ON x.eid = r.eid AND x.agent_id = r.agent_id AND x.module_id = r.module_id
            UNION ALL
            SELECT coalesce(x.eid, r.eid), 'module', NULL, coalesce(x.module_id, r.module_id),
                   r.eid IS NULL, coalesce(r.value, 0.0), r.metrics_call, r.iteration, r.ord, coalesce(x.s, 0.0)
            FROM (SELECT eid, module_id, fsum(counted) AS s FROM tk SEMI JOIN (FROM kinds WHERE kind = 'module') k USING (eid)
                  WHERE module_id IS NOT NULL GROUP BY eid, module_id) x
            FULL OUTER JOIN (FROM rk WHERE kind = 'module' AND eid IS NOT NULL) r ON x.eid = r.eid AND x.module_id = r.module_id
            UNION ALL
            SELECT coalesce(x.eid, r.eid), coalesce(r.kind, 'episode'), NULL, NULL,
                   r.eid IS NULL, coalesce(r.value, 0.0), r.metrics_call, r.iteration, r.ord, coalesce(x.s, 0.0)
            FROM (SELECT eid, fsum(counted) AS s FROM tk SEMI JOIN (FROM kinds WHERE kind = 'episode') k USING (eid) GROUP BY eid) x
            FULL OUTER JOIN (FROM rk WHERE kind NOT IN ('agent', 'policy', 'module') AND eid IS NOT NULL) r ON x.eid = r.eid;
        CREATE OR REPLACE TABLE cmp AS
            SELECT j.*, e.phase, e.runner_id, e.episode_id, e.chunks, value - truth AS diff,
                   coalesce(isfinite(value) AND isfinite(truth) AND abs(value - truth) <= {atol!r} + {rtol!r} * greatest(abs(truth), abs(value)), false) AS clean,
                   CASE kind WHEN 'agent' THEN agent_id WHEN 'episode' THEN 'return' ELSE module_id END AS key,
                   CASE kind WHEN 'agent' THEN agent_id WHEN 'episode' THEN NULL ELSE module_id END AS sel_key
            FROM j JOIN ep e USING (eid);
        DROP TABLE j; DROP TABLE kinds; DROP TABLE rk;
        """
    )


def _accumulate(con: duckdb.DuckDBPyConnection, manifest: dict, model: str | None, S: int, keep_rows: bool, a: int, b: int) -> None:
    con.execute(
        f"""
        INSERT INTO acc_key
        SELECT phase, kind, key, min(coalesce(ord, 9223372036854775807)), count(*), sum(truth), sum(value),
               count(DISTINCT eid), count(DISTINCT eid) FILTER (WHERE clean),
               count(*) FILTER (WHERE NOT clean), 0,
               count(*) FILTER (WHERE NOT clean AND chunks > 1), count(*) FILTER (WHERE clean AND chunks > 1)
        FROM cmp GROUP BY ALL;
        CREATE OR REPLACE TABLE w_bad AS SELECT * FROM cmp WHERE NOT clean;
        CREATE OR REPLACE TABLE bad AS
            SELECT * FROM (
                SELECT * FROM bad UNION ALL
                SELECT phase, kind, key, runner_id, episode_id, agent_id, module_id, truth, value, diff, chunks, missing_report, ord FROM w_bad)
            QUALIFY row_number() OVER (PARTITION BY phase, kind, key ORDER BY CASE WHEN isnan(diff) THEN 1 ELSE 0 END, abs(diff) DESC, ord NULLS LAST, runner_id, episode_id) <= {EXPLAIN_LIMIT};
        INSERT INTO bad_t
            SELECT e.runner_id, e.episode_id, x.agent_id, x.module_id, x.counted - x.final, x.final, x.first_chunk
            FROM tk x JOIN ep e USING (eid) SEMI JOIN (SELECT DISTINCT eid FROM w_bad) b USING (eid)
            SEMI JOIN (SELECT DISTINCT runner_id, episode_id FROM bad) k USING (runner_id, episode_id);
        DELETE FROM bad_t WHERE (runner_id, episode_id) NOT IN (SELECT (runner_id, episode_id) FROM bad);
        DROP TABLE w_bad;
        INSERT INTO acc_excl SELECT e.phase, x.agent_id, count(*), sum(x.pre_obs), sum(x.n_pre_obs)
            FROM tk x JOIN ep e USING (eid) WHERE x.n_pre_obs > 0 AND e.reported GROUP BY ALL;
        INSERT INTO acc_unrep_n SELECT phase, done, count(*) FROM ep WHERE NOT reported GROUP BY ALL;
        INSERT INTO acc_unrep SELECT phase, runner_id, episode_id, first_chunk, done, 0 FROM ep WHERE NOT reported
            QUALIFY row_number() OVER (PARTITION BY phase, done ORDER BY first_chunk, runner_id, episode_id) <= 3;
        INSERT INTO acc_orphan SELECT phase, kind, count(DISTINCT episode_id), arg_min(episode_id, ord), min(ord) FROM orphans GROUP BY ALL;
        """
    )
    if keep_rows:
        con.execute(
            "INSERT INTO all_rows SELECT phase, kind, key, runner_id, episode_id, agent_id, module_id, truth, value, diff, chunks, missing_report, ord, clean, metrics_call, iteration FROM cmp;"
            "INSERT INTO all_t SELECT e.runner_id, e.episode_id, x.agent_id, x.module_id, x.counted - x.final, x.final, x.first_chunk "
            "FROM tk x JOIN ep e USING (eid) WHERE e.reported"
        )
    # ---- dashboard windows (see dashboard.py for the models)
    con.execute("CREATE OR REPLACE VIEW shown AS SELECT * FROM cmp WHERE NOT missing_report")
    con.execute("INSERT INTO dash_its SELECT phase, kind, sel_key, iteration, count(*), min(truth), max(truth) FROM shown GROUP BY ALL")
    if model == "per_call_window":
        train_runners = int(manifest.get("num_env_runners") or 0)
        eval_runners = int(manifest.get("evaluation_num_env_runners") or 0)
        w_train, w_eval = max(1, math.ceil(S / max(train_runners, 1))), max(1, math.ceil(S / max(eval_runners, 1)))
        discard = bool(manifest.get("evaluation_discards_last_call"))
        con.execute(
            f"""
            INSERT INTO dash_calls
            SELECT phase, kind, sel_key, iteration, count(*), avg(value), min(value), max(value), avg(truth), min(truth), max(truth)
            FROM (
                SELECT *, row_number() OVER (PARTITION BY phase, kind, sel_key, iteration, runner_id, metrics_call ORDER BY ord DESC) AS rn,
                       max(metrics_call) OVER (PARTITION BY phase, kind, sel_key, iteration, runner_id) AS last_call
                FROM shown)
            WHERE rn <= CASE WHEN phase = 'evaluation' THEN {w_eval} ELSE {w_train} END
              AND NOT ({discard} AND phase = 'evaluation' AND metrics_call = last_call)
            GROUP BY phase, kind, sel_key, iteration, runner_id, metrics_call
            """
        )
    elif model == "driver_history":
        _driver_history(con, S, a, b)


def _driver_history(con: duckdb.DuckDBPyConnection, S: int, a: int, b: int) -> None:
    """Ray 2.1x / old stack: an iteration covers the last max(S, new) episodes (training),
    or that iteration's episodes (evaluation). The last S episodes per key carry over."""
    con.execute(
        """
        INSERT INTO dash_calls
        SELECT phase, kind, sel_key, iteration, count(*), avg(value), min(value), max(value), avg(truth), min(truth), max(truth)
        FROM shown WHERE phase = 'evaluation' GROUP BY ALL
        """
    )
    con.execute(
        """
        CREATE OR REPLACE TABLE h AS
        SELECT phase, kind, sel_key, runner_id, episode_id, iteration, ord, value, truth FROM hist
        UNION ALL SELECT phase, kind, sel_key, runner_id, episode_id, iteration, ord, value, truth FROM shown WHERE phase <> 'evaluation';
        CREATE OR REPLACE TABLE h_ep AS
        SELECT phase, kind, sel_key, runner_id, episode_id, min(iteration) AS iteration, min(ord) AS first_ord,
               dense_rank() OVER (PARTITION BY phase, kind, sel_key ORDER BY min(ord), runner_id, episode_id) AS pos
        FROM h GROUP BY phase, kind, sel_key, runner_id, episode_id;
        CREATE OR REPLACE TABLE h_it AS
        WITH its AS (SELECT DISTINCT phase, kind, sel_key, iteration FROM disp WHERE phase <> 'evaluation' AND iteration BETWEEN {a} AND {b})
        SELECT i.phase, i.kind, i.sel_key, i.iteration,
               (SELECT max(pos) FROM h_ep e WHERE e.phase = i.phase AND e.kind = i.kind AND e.sel_key IS NOT DISTINCT FROM i.sel_key AND e.iteration <= i.iteration) AS hi,
               (SELECT count(*) FROM h_ep e WHERE e.phase = i.phase AND e.kind = i.kind AND e.sel_key IS NOT DISTINCT FROM i.sel_key AND e.iteration = i.iteration) AS n_new
        FROM its i;
        INSERT INTO dash_calls
        SELECT i.phase, i.kind, i.sel_key, i.iteration, count(*), avg(h.value), min(h.value), max(h.value), avg(h.truth), min(h.truth), max(h.truth)
        FROM h_it i JOIN h_ep e ON e.phase = i.phase AND e.kind = i.kind AND e.sel_key IS NOT DISTINCT FROM i.sel_key
             AND e.pos > i.hi - greatest({S}, i.n_new) AND e.pos <= i.hi
        JOIN h ON h.phase = e.phase AND h.kind = e.kind AND h.sel_key IS NOT DISTINCT FROM e.sel_key AND h.runner_id = e.runner_id AND h.episode_id = e.episode_id
        GROUP BY ALL;
        CREATE OR REPLACE TABLE hist AS
        SELECT h.* FROM h JOIN (SELECT * FROM h_ep QUALIFY pos > max(pos) OVER (PARTITION BY phase, kind, sel_key) - {S}) e
          ON h.phase = e.phase AND h.kind = e.kind AND h.sel_key IS NOT DISTINCT FROM e.sel_key AND h.runner_id = e.runner_id AND h.episode_id = e.episode_id;
        """.replace("{S}", str(S)).replace("{a}", str(a)).replace("{b}", str(b))
    )


def _dashboard_frame(con: duckdb.DuckDBPyConnection, model: str | None, S: int) -> pd.DataFrame:
    """Per (phase, kind, key, iteration): RLlib's value and the truth rebuilt with the
    window model (mean / min / max), and the truth range of that iteration's episodes."""
    if model not in ("per_call_window", "driver_history"):
        return pd.DataFrame()
    merged = "avg(r_mean) AS r_mean" if model == "per_call_window" else "any_value(r_mean) AS r_mean"
    merged_t = "avg(t_mean) AS t_mean" if model == "per_call_window" else "any_value(t_mean) AS t_mean"
    return con.execute(
        f"""
        SELECT coalesce(c.phase, i.phase) AS phase, coalesce(c.kind, i.kind) AS kind, coalesce(c.sel_key, i.sel_key) AS sel_key,
               coalesce(c.iteration, i.iteration) AS iteration, c.r_mean, c.r_min, c.r_max, c.t_mean, c.t_min, c.t_max, i.low, i.high
        FROM (SELECT phase, kind, sel_key, iteration, {merged}, min(r_min) AS r_min, max(r_max) AS r_max, {merged_t},
                     min(t_min) AS t_min, max(t_max) AS t_max FROM dash_calls GROUP BY ALL) c
        FULL OUTER JOIN (SELECT phase, kind, sel_key, iteration, min(low) AS low, max(high) AS high FROM dash_its GROUP BY ALL) i
          ON c.phase = i.phase AND c.kind = i.kind AND c.sel_key IS NOT DISTINCT FROM i.sel_key AND c.iteration = i.iteration
        """
    ).df()


# --------------------------------------------------------------------------- 3. findings


def _explain_row(r: Any, feats: pd.DataFrame, atol: float, rtol: float) -> tuple[Verdict, str, set]:
    """Verdict and explanation of one wrong value from its episode's per-agent features."""
    mapping = dict(zip(feats["agent_id"], feats["module_id"]))
    if r.kind == Kind.AGENT.value:
        own = {r.agent_id} if r.agent_id in mapping else set()
    elif r.kind == Kind.MODULE.value:
        own = {a for a, m in mapping.items() if m == r.module_id}
    elif r.kind == Kind.POLICY.value:
        own = {r.agent_id} if mapping.get(r.agent_id) == r.module_id else set()
    else:
        own = set(mapping)
    tol = atol + rtol * max(abs(r.truth), abs(r.value)) if math.isfinite(r.value) else math.inf
    verdict, text = explain(r.diff, feats.set_index("agent_id")[["earlier", "final"]], own, float(tol))
    prefix = "RLlib reported no value; " if r.missing_report else ""
    return Verdict(verdict), prefix + text, own


def _findings(run: Run, state: _State, max_evidence: int) -> list[Finding]:
    con = state.con
    findings: list[Finding] = []
    for phase, kind, sem, n in con.execute("SELECT phase, kind, semantics, sum(n)::BIGINT FROM acc_unknown GROUP BY ALL ORDER BY ALL").fetchall():
        findings.append(_unverified(phase, kind, "*", n, f"{n} reported values with semantics `{sem}`, which this reward_audit cannot rebuild; upgrade reward_audit"))
    raw_phases = {p for (p,) in con.execute("SELECT DISTINCT phase FROM acc_phase WHERE NOT reported").fetchall()}
    reported_phases = {p for (p,) in con.execute("SELECT DISTINCT phase FROM acc_phase WHERE reported").fetchall()}
    if not raw_phases:
        findings += [_unverified(p, "run", "raw", 0, "no raw rewards recorded for this phase") for p in sorted(reported_phases)]
        return findings

    keys = con.execute(
        "SELECT phase, kind, key, min(first_ord) AS o, sum(n_rows)::BIGINT, sum(s_truth), sum(s_rep), sum(n_eps)::BIGINT, sum(n_clean_eps)::BIGINT, "
        "sum(n_bad)::BIGINT, 0, sum(bad_multi)::BIGINT, sum(clean_multi)::BIGINT FROM acc_key GROUP BY ALL ORDER BY o, phase, kind, key"
    ).fetchall()
    bad = con.execute("SELECT * FROM bad ORDER BY phase, kind, key, CASE WHEN isnan(diff) THEN 1 ELSE 0 END, abs(diff) DESC, ord NULLS LAST, runner_id, episode_id").df()
    feats = con.execute("SELECT * FROM bad_t ORDER BY runner_id, episode_id, first_chunk, agent_id").df()
    groups = {k: g for k, g in feats.groupby(["runner_id", "episode_id"], sort=False)}
    bad_by_key = {k: g for k, g in bad.groupby(["phase", "kind", "key"], sort=False)}
    for phase, kind, key, _, n_rows, s_truth, s_rep, n_eps, n_clean_eps, n_bad, _, bad_multi, clean_multi in keys:
        truth, reported = s_truth / n_rows, s_rep / n_rows
        rows = bad_by_key.get((phase, kind, key))
        if not n_bad or rows is None:
            findings.append(Finding(phase, kind, str(key), Verdict.CLEAN, n_eps, truth, reported, reported - truth, f"{n_eps} episodes agree", {Verdict.CLEAN.value: n_clean_eps}))
            continue
        findings.append(_failing(phase, kind, str(key), rows, groups, state, max_evidence, n_eps, n_clean_eps, n_bad, bad_multi, clean_multi, truth, reported))

    for phase, kind, n_eps, example, _ in con.execute("SELECT phase, kind, sum(n_eps)::BIGINT, arg_min(example, first_ord), min(first_ord) FROM acc_orphan GROUP BY ALL ORDER BY ALL").fetchall():
        findings.append(_unverified(str(phase), kind, "*", n_eps, f"{n_eps} reported episodes have no raw rewards (the tap never saw them), e.g. {example}"))
    findings += _excluded(con)
    findings += _incomplete(con, reported_phases)
    failures = run.manifest.get("capture_failures") or 0
    if failures:
        findings.append(_unverified("run", "run", "capture", 0, f"{failures} capture failures were logged while recording (see the training log, logger `reward_audit`); values they touched may be missing"))
    for phase in sorted(raw_phases - reported_phases):
        (episodes,) = con.execute("SELECT sum(n_eps)::BIGINT FROM acc_phase WHERE phase = ? AND NOT reported", [phase]).fetchone()
        episodes += con.execute("SELECT count(DISTINCT (runner_id, episode_id)) FROM open_t WHERE phase = ?", [phase]).fetchone()[0]
        why = "no per-episode values from RLlib were captured in this phase; nothing to compare the raw rewards with"
        if run.manifest.get("clip_rewards") not in (None, False):
            why = f"RLlib clips rewards (clip_rewards={run.manifest['clip_rewards']!r}), so its returns are sums of clipped rewards, which chunk sums cannot rebuild; not compared"
        findings.append(_unverified(phase, "run", "reported", int(episodes), why))
    findings.sort(key=lambda f: (f.phase != Phase.TRAIN.value, f.phase, KIND_ORDER.get(f.kind, 9), f.key, SEVERITY.index(f.verdict)))
    return findings


def _failing(
    phase: str, kind: str, key: str, rows: pd.DataFrame, groups: dict, state: _State, max_evidence: int,
    n_eps: int, n_clean_eps: int, n_bad: int, bad_multi: int, clean_multi: int, truth: float, reported: float,
) -> Finding:
    """A key with wrong values: explain the (at most ``EXPLAIN_LIMIT``) largest ones."""
    verdicts, texts, owns = [], [], []
    for r in rows.itertuples(index=False):
        verdict, text, own = _explain_row(r, groups[(r.runner_id, r.episode_id)], state.atol, state.rtol)
        verdicts.append(verdict)
        texts.append(text)
        owns.append(own)
    rows = rows.assign(verdict=[v.value for v in verdicts], explanation=texts, episode=rows["runner_id"] + "|" + rows["episode_id"])
    counts = {Verdict.CLEAN.value: n_clean_eps} if n_clean_eps else {}
    counts.update(rows.groupby("verdict")["episode"].nunique().to_dict())
    worst = next(v for v in SEVERITY if v.value in counts)
    sampled = len(rows) < n_bad
    message = (
        f"{worst.value} in {counts.get(worst.value, 0)}/{n_eps} episodes "
        f"(mean truth {truth:.6g}, reported {reported:.6g}); "
        f"{bad_multi}/{n_bad} wrong values come from multi-chunk episodes, {clean_multi} multi-chunk values are right"
    )
    patterns = rows["explanation"].map(lambda t: re.sub(r"\s*\([^)]*\)", "", t.split(";")[0]))
    # The most frequent pattern; ties go to the one with the largest difference (rows are
    # sorted by |difference|, and value_counts(sort=False) keeps first appearance).
    frequency = patterns.value_counts(sort=False)
    common = frequency.idxmax()
    n_common = int(frequency[common])
    message += f"; in {n_common}/{len(rows)} wrong values: {common}"
    if sampled:
        message += f" (explained: the {len(rows)} largest of {n_bad} wrong values)"
        counts["wrong"] = int(n_bad)
    evidence = tuple(
        Evidence(
            episode_id=r.episode_id,
            runner_id=r.runner_id,
            chunks=int(r.chunks),
            truth=float(r.truth),
            reported=float(r.value),
            difference=float(r.diff),
            verdict=Verdict(r.verdict),
            explanation=r.explanation,
            agent_id=None if kind in (Kind.AGENT.value, Kind.EPISODE.value) else r.agent_id,
        )
        for r in rows.head(max_evidence).itertuples(index=False)
    )
    model = fit(rows["value"].to_numpy(), [feature_row(groups[(r.runner_id, r.episode_id)].set_index("agent_id")[["earlier", "final"]], own) for r, own in zip(rows.itertuples(index=False), owns)])
    return Finding(phase, kind, key, worst, n_eps, truth, reported, reported - truth, message, counts, evidence, model.formula(f"reported({kind} {key})"))


def _unverified(phase: str, kind: str, key: str, episodes: int, why: str) -> Finding:
    return Finding(phase, kind, key, Verdict.UNVERIFIED, episodes, None, None, None, why)


def _excluded(con: duckdb.DuckDBPyConnection) -> list[Finding]:
    """Rewards paid before / with an agent's first observation, in reported episodes."""
    out = []
    for phase, agent, n_eps, total, n in con.execute(
        "SELECT phase, agent_id, sum(n_eps)::BIGINT, sum(pre_obs), sum(n_pre_obs)::BIGINT FROM acc_excl GROUP BY ALL ORDER BY phase, agent_id"
    ).fetchall():
        out.append(
            Finding(
                phase, Kind.AGENT.value, agent, Verdict.EXCLUDED, n_eps, None, None, -total,
                f"{n} rewards totalling {total:.6g} (mean {total / n_eps:.6g} per episode, {n_eps} episodes) were paid before or with "
                "this agent's first observation; RLlib never counts them (by design), so they are left out of the truth",
                {Verdict.EXCLUDED.value: n_eps},
            )
        )
    return out


def _incomplete(con: duckdb.DuckDBPyConnection, reported_phases: set[str]) -> list[Finding]:
    out = []
    counts = con.execute("SELECT phase, sum(n) FILTER (WHERE NOT done)::BIGINT, sum(n) FILTER (WHERE done)::BIGINT FROM acc_unrep_n GROUP BY ALL ORDER BY phase").fetchall()
    for phase, cut, finished in counts:
        cut, finished = cut or 0, finished or 0
        if phase not in reported_phases or not cut + finished:
            continue
        parts = []
        if cut:
            parts.append(f"{cut} never finished (cut by a reset, or still running when the run stopped)")
        if finished:
            examples = [e for (e,) in con.execute("SELECT episode_id FROM acc_unrep WHERE phase = ? AND done ORDER BY first_chunk, runner_id, episode_id LIMIT 3", [phase]).fetchall()]
            parts.append(f"{finished} finished but RLlib reported no value for them (e.g. {', '.join(examples)})")
        out.append(
            Finding(
                phase, Kind.EPISODE.value, "unreported", Verdict.INCOMPLETE, cut + finished, None, None, None,
                f"{cut + finished} episodes have raw rewards but no report: " + "; ".join(parts),
                {"cut": cut, "finished": finished},
            )
        )
    return out
