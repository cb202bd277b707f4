"""Audit what the dashboards showed: rebuild every recorded per-iteration number (the
``train()`` result, i.e. Tune's result.json and TensorBoard) from the per-episode values,
twice — once from RLlib's own per-episode values (to prove our window model reproduces
RLlib exactly) and once from the truth (what the dashboard should have shown).

Window models (docs/ray_versions.md), chosen by the manifest's ``smoothing_model``:

* ``per_call_window`` (Ray 2.4x – 2.60 new stack): each runner keeps the last
  ``ceil(S / max(num_env_runners, 1))`` values per key and every ``get_metrics()`` call
  reduces and clears them; the iteration's value is the nan-mean of the per-(runner, call)
  means. Nothing carries over between iterations.
* ``driver_history`` (Ray 2.12 and the old stack): the driver keeps the episode history;
  an iteration's value covers the last ``max(S, n_new)`` episodes; evaluation covers only
  that evaluation's episodes.

Where the model does not reproduce RLlib's displayed value from RLlib's own per-episode
values (missing data), the row says so and only bounds the truth (min..max of the truth
over the iteration's episodes) instead of claiming a number.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import InvalidDataError
from .results import manifest_paths, read_tune_results, same_number, tune_result_file
from .schema import IterationSemantics, Kind
from .store import drop_identical

_REDUCERS = {
    IterationSemantics.MEAN_OF_EPISODE_SUMS.value: "mean",
    IterationSemantics.MEAN_OF_AGENT_EPISODES.value: "mean",
    IterationSemantics.MIN_OF_AGENT_EPISODES.value: "min",
    IterationSemantics.MAX_OF_AGENT_EPISODES.value: "max",
    IterationSemantics.MIN_OF_EPISODE_SUMS.value: "min",
    IterationSemantics.MAX_OF_EPISODE_SUMS.value: "max",
}


@dataclass(frozen=True, eq=False)
class DashboardSeries:
    """One dashboard series (phase, metric path) rebuilt per iteration."""

    phase: str
    path: str
    kind: str
    key: str | None
    table: pd.DataFrame  # iteration, displayed, rebuilt, expected, difference, model_ok, low, high

    @property
    def wrong_iterations(self) -> list[int]:
        t = self.table
        return [int(i) for i in t.loc[t["model_ok"] & ~t["agrees"], "iteration"]]

    @property
    def first_wrong(self) -> int | None:
        wrong = self.wrong_iterations
        return wrong[0] if wrong else None

    @property
    def unreconstructable(self) -> list[int]:
        return [int(i) for i in self.table.loc[~self.table["model_ok"], "iteration"]]

    def summary(self) -> str:
        key = f" {self.key}" if self.key is not None else ""
        wrong = self.wrong_iterations
        if wrong:
            t = self.table[self.table["iteration"].isin(wrong)]
            worst = t.loc[t["difference"].abs().idxmax()]
            text = (
                f"{self.phase} {self.path}: off in {len(wrong)}/{len(self.table)} iterations since iteration {wrong[0]} "
                f"(worst: iteration {int(worst['iteration'])} showed {worst['displayed']:.6g}, truth {worst['expected']:.6g})"
            )
        else:
            text = f"{self.phase} {self.path}: matches the truth in all {len(self.table) - len(self.unreconstructable)} reconstructed iterations"
        if self.unreconstructable:
            text += f"; {len(self.unreconstructable)} iterations could not be rebuilt exactly (bounded only)"
        return text.replace(f"{self.path}{key}", self.path)


def dashboard_rows(run) -> tuple[pd.DataFrame, list[str]]:
    """The dashboard numbers to audit, and notes on where they came from.

    The callback records every ``train()`` result; when the trial dir also holds Tune's
    ``result.json`` (what Tune and TensorBoard were fed), its numbers are cross-checked
    against ours, and used instead when the run recorded none.
    """
    iterations, notes = _unique_iterations(run)
    file = tune_result_file(run.path) if "://" not in run.path else None
    if file is None:
        return iterations, notes
    if len(run.manifest.get("segments") or []) > 1:
        notes.append(f"Tune's {file} not cross-checked: the run was restored, so its iteration numbers repeat")
        return iterations, notes
    tune = pd.DataFrame(read_tune_results(file, manifest_paths(run.manifest)))
    if tune.empty:
        return iterations, notes
    if iterations.empty:
        notes.append(f"dashboard numbers read from Tune's {file} (the run recorded none)")
        return tune, notes
    keys = ["phase", "iteration", "path"]
    both = iterations.merge(tune, on=keys, suffixes=("", "_tune"))
    differ = [r for r in both.itertuples(index=False) if not same_number(r.value, r.value_tune)]
    text = f"Tune's {file}: {len(both)} numbers cross-checked with the recorded train() results, {len(differ)} differ"
    if differ:
        r = differ[0]
        text += f" (e.g. iteration {r.iteration} {r.path}: recorded {r.value:.6g}, result.json {r.value_tune:.6g})"
    notes.append(text)
    return iterations, notes


def _unique_iterations(run) -> tuple[pd.DataFrame, list[str]]:
    """``run.iterations`` with identical copies of a row (a part copied) counted once; two
    different numbers for one (phase, iteration, path) are an error naming the files."""
    iterations = run.iterations
    distinct, conflict = drop_identical(iterations, ["phase", "iteration", "path"])
    if conflict is not None:
        files = run.parts.get("reported_iterations", ())
        raise InvalidDataError(
            f"{run.path}/reported_iterations/: iteration {conflict['iteration']} `{conflict['path']}` is recorded twice with different values; "
            f"the folder mixes two runs' files ({len(files)} parts) — keep the original run's files and delete the others"
        )
    n = len(iterations) - len(distinct)
    return distinct, [f"reported_iterations: {n} rows appeared twice, identical copies; each counted once"] if n else []


_COLUMNS = {"mean": ("r_mean", "t_mean"), "min": ("r_min", "t_min"), "max": ("r_max", "t_max")}


def build_dashboard(
    run, windows: pd.DataFrame, iterations: pd.DataFrame, *, atol: float = 1e-6, rtol: float = 1e-5, per_call: pd.DataFrame | None = None
) -> tuple[list[DashboardSeries], list[str]]:
    """Rebuild each recorded dashboard series from ``windows`` — per (phase, kind, key,
    iteration): RLlib's per-episode values and the truth reduced over the episodes the
    window model says the iteration covers (``compare`` computes them while it streams) —
    vectorised over iterations. ``per_call``: with asynchronous sampling (APPO, IMPALA), the
    per-(runner, call) values whose iteration ``async_windows`` finds. Returns the series
    and notes."""
    notes: list[str] = []
    if windows is None or windows.empty or iterations.empty or run.manifest.get("smoothing_model") not in ("per_call_window", "driver_history"):
        return [], notes
    its = iterations.assign(reducer=iterations["semantics"].map(_REDUCERS))
    its = its[its["reducer"].notna()]
    if its.empty:
        return [], notes
    its = its.assign(sel_key=its["key"].where(its["kind"] != Kind.EPISODE.value, None))
    w = windows.assign(sel_key=windows["sel_key"].where(windows["kind"] != Kind.EPISODE.value, None))
    for frame in (its, w):
        frame["sel_key"] = frame["sel_key"].astype(object).where(frame["sel_key"].notna(), "\x00none")
    if per_call is not None and len(per_call) and run.manifest.get("async_metrics"):
        moved, notes = async_windows(per_call, its, atol, rtol)
        keys = ["phase", "kind", "sel_key", "iteration"]
        w = w.drop(columns=[c for c in moved.columns if c not in keys]).merge(moved, on=keys, how="outer") if len(moved) else w
    joined = its.merge(w, on=["phase", "kind", "sel_key", "iteration"], how="left")
    series = []
    for (phase, path, kind, key, semantics), rows in joined.groupby(["phase", "path", "kind", "key", "semantics"], dropna=False, sort=False):
        rows = rows.sort_values("iteration", kind="stable")
        r_col, t_col = _COLUMNS[rows["reducer"].iloc[0]]
        rebuilt, expected = rows[r_col].to_numpy(float), rows[t_col].to_numpy(float)
        low, high = rows["low"].to_numpy(float), rows["high"].to_numpy(float)
        if phase == "evaluation":
            # No evaluation in this iteration: RLlib keeps showing the last evaluation's values.
            frame = pd.DataFrame({"rebuilt": rebuilt, "expected": expected, "low": low, "high": high})
            none = np.isnan(low)
            none[0] = False
            frame[none] = np.nan
            frame = frame.ffill()
            rebuilt, expected, low, high = (frame[c].to_numpy(float) for c in ("rebuilt", "expected", "low", "high"))
        displayed = rows["value"].to_numpy(float)
        with np.errstate(invalid="ignore"):
            model_ok = (np.isnan(displayed) & np.isnan(rebuilt)) | (~np.isnan(rebuilt) & (np.abs(displayed - rebuilt) <= atol + rtol * np.abs(displayed)))
            agrees = (np.isnan(displayed) & np.isnan(expected)) | (
                ~np.isnan(expected) & (np.abs(displayed - expected) <= atol + rtol * np.maximum(np.abs(displayed), np.abs(expected)))
            )
        table = pd.DataFrame(
            {
                "iteration": rows["iteration"].astype(int).to_numpy(),
                "displayed": displayed,
                "rebuilt": rebuilt,
                "expected": expected,
                "difference": displayed - expected,
                "model_ok": model_ok,
                "agrees": agrees,
                "low": low,
                "high": high,
            }
        )
        key = None if isinstance(key, float) and math.isnan(key) else key
        series.append(DashboardSeries(phase, path, kind, key, table))
    return series, notes


ASYNC_SHIFT = 3  # calls per runner an iteration's boundary may sit before our drain's (seen: 0-2)


def async_windows(per_call: pd.DataFrame, its: pd.DataFrame, atol: float, rtol: float) -> tuple[pd.DataFrame, list[str]]:
    """APPO / IMPALA (asynchronous sampling): the driver shows, in iteration i, the
    get_metrics() results that reached it before its training step; calls that finish
    between that and our drain at the end of ``train()`` are collected with iteration i but
    shown in i+1. Which calls is a matter of timing, so it is found, not assumed: per
    iteration and runner, the shown calls are a contiguous run starting after the previous
    iteration's, ending up to ``ASYNC_SHIFT`` calls before the drained ones end; the end that
    reproduces RLlib's displayed value for *every* series at once is taken (none: the drained
    boundary, and the iteration stays "bounded only"). Returns the training windows per
    (phase, kind, key, iteration) and notes (calls the dashboard never showed)."""
    train = per_call[per_call["phase"] == "train"]
    shown = its[its["phase"] == "train"]
    if train.empty or shown.empty:
        return pd.DataFrame(), []
    runners = sorted(train["runner"].unique())
    order = {r: train[train["runner"] == r].groupby("call")["iteration"].min().sort_index() for r in runners}
    calls = {r: order[r].index.to_numpy() for r in runners}
    recorded = {r: order[r].to_numpy() for r in runners}
    # Per (series, runner): call ids in order with their stats, and prefix sums of the means,
    # so a series' value over any call range is O(1) (min / max over the range's slice).
    series: dict[tuple, dict] = {}
    for (kind, sel), g in train.groupby(["kind", "sel_key"], sort=False):
        per_runner = {}
        for r, h in g.groupby("runner", sort=False):
            h = h.sort_values("call")
            per_runner[r] = (
                h["call"].to_numpy(),
                np.concatenate([[0.0], np.cumsum(h["r_mean"].to_numpy())]),
                h["r_min"].to_numpy(),
                h["r_max"].to_numpy(),
            )
        series[(kind, sel)] = per_runner
    targets = {it: g for it, g in shown.groupby("iteration")}
    start = {r: 0 for r in runners}
    assigned: dict[tuple, int] = {}
    moved = unresolved = 0

    def rebuilt(kind: str, sel: str, reducer: str, ranges: dict) -> float:
        total, count, low, high = 0.0, 0, math.inf, -math.inf
        for r, (lo_call, hi_call) in ranges.items():
            entry = series.get((kind, sel), {}).get(r)
            if entry is None or hi_call < lo_call:
                continue
            ids, prefix, mins, maxs = entry
            i, j = np.searchsorted(ids, lo_call), np.searchsorted(ids, hi_call, side="right")
            if j > i:
                total += prefix[j] - prefix[i]
                count += j - i
                low, high = min(low, mins[i:j].min()), max(high, maxs[i:j].max())
        if not count:
            return math.nan
        return {"mean": total / count, "min": low, "max": high}[reducer]

    for it in sorted(targets):
        drained = {r: start[r] + int((recorded[r][start[r]:] <= it).sum()) for r in runners}
        options = [list(range(drained[r], max(start[r], drained[r] - ASYNC_SHIFT) - 1, -1)) for r in runners]
        rows = [row for row in targets[it].itertuples(index=False) if not math.isnan(row.value)]
        choice = None
        for combo in itertools.product(*options):
            ranges = {r: (calls[r][start[r]] if start[r] < len(calls[r]) else math.inf, calls[r][e - 1] if e > start[r] else -math.inf) for r, e in zip(runners, combo)}
            if all(abs(row.value - (got := rebuilt(row.kind, row.sel_key, row.reducer, ranges))) <= atol + rtol * abs(row.value) and not math.isnan(got) for row in rows):
                choice = combo
                break
        if choice is None:
            choice, unresolved = tuple(drained[r] for r in runners), unresolved + 1
        for r, e in zip(runners, choice):
            moved += drained[r] - e
            for c in calls[r][start[r]:e]:
                assigned[(r, c)] = it
            start[r] = e
    train = train.assign(shown=[assigned.get((r, c), -1) for r, c in zip(train["runner"], train["call"])])
    never = train[train["shown"] < 0]
    g = train[train["shown"] >= 0].groupby(["phase", "kind", "sel_key", "shown"], sort=False)
    out = pd.DataFrame(
        {
            "r_mean": g["r_mean"].mean(), "r_min": g["r_min"].min(), "r_max": g["r_max"].max(),
            "t_mean": g["t_mean"].mean(), "t_min": g["t_min"].min(), "t_max": g["t_max"].max(),
        }
    ).reset_index().rename(columns={"shown": "iteration"})
    notes = [
        f"asynchronous sampling: {moved} get_metrics() calls were shown on the dashboard one iteration after reward_audit collected them"
        + (f"; {unresolved} iterations matched no call boundary" if unresolved else "")
    ]
    episodes = never[never["kind"] == Kind.EPISODE.value]["n"].sum() if len(never) else 0
    if len(never):
        notes.append(f"{never[['runner', 'call']].drop_duplicates().shape[0]} get_metrics() calls ({int(episodes)} episodes) were never shown on the dashboard (still in flight when the run stopped)")
    return out, notes


# --------------------------------------------------------------------------- window reductions (compare streams these)


def per_call_windows(g2: np.ndarray, n_series: int, runner: np.ndarray, call: np.ndarray, value: np.ndarray, truth: np.ndarray, evaluation: np.ndarray,
                     train_window: int, eval_window: int, discard_last_eval_call: bool, per_call: list | None = None) -> dict[str, np.ndarray]:
    """``per_call_window`` (Ray 2.4x+ new stack): each runner keeps the last
    ceil(S / runners) values per key and every get_metrics() call reduces and clears them;
    an iteration shows the mean of the per-(runner, call) means (min of mins, max of
    maxes). Inputs are one window's reported values in RLlib's order, ``g2`` numbering their
    (series, iteration); returns per (series, iteration) the reduced reported and true values."""
    G2 = n_series
    n_runners = int(runner.max()) + 1 if len(runner) else 1
    g1, g1_keys = pd.factorize((g2.astype(np.int64) * (n_runners + 1) + runner) * (int(call.max()) - int(call.min()) + 1) + (call - int(call.min())))
    G1 = len(g1_keys)
    order = np.argsort(g1, kind="stable")  # rows are in RLlib's order already
    sizes = np.bincount(g1, minlength=G1)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    from_end = np.empty(len(g1), np.int64)
    from_end[order] = sizes[g1[order]] - 1 - (np.arange(len(g1)) - starts[g1[order]])
    keep = from_end < np.where(evaluation, eval_window, train_window)
    g1_g2 = np.zeros(G1, np.int64)
    g1_g2[g1] = g2
    if discard_last_eval_call and evaluation.any():  # the driver never reads each remote runner's last evaluation call
        rk = g2.astype(np.int64) * (n_runners + 1) + runner
        last = pd.Series(call).groupby(rk).transform("max").to_numpy()
        keep &= ~(evaluation & (call == last))
    g, v, t = g1[keep], value[keep], truth[keep]
    n = np.bincount(g, minlength=G1)
    has = n > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        r_mean, t_mean = np.bincount(g, weights=v, minlength=G1) / n, np.bincount(g, weights=t, minlength=G1) / n
    r_min, r_max, t_min, t_max = np.full(G1, np.inf), np.full(G1, -np.inf), np.full(G1, np.inf), np.full(G1, -np.inf)
    with np.errstate(invalid="ignore"):  # a NaN reported value propagates, without a RuntimeWarning on stderr
        np.minimum.at(r_min, g, v)
        np.maximum.at(r_max, g, v)
        np.minimum.at(t_min, g, t)
        np.maximum.at(t_max, g, t)
    if per_call is not None:  # async sampling: the rebuild re-assigns calls to iterations
        first = np.zeros(G1, np.int64)
        first[g1[::-1]] = np.arange(len(g1))[::-1]
        per_call.append(
            pd.DataFrame({"g2": g1_g2, "runner": runner[first], "call": call[first], "r_mean": r_mean, "r_min": r_min, "r_max": r_max,
                          "t_mean": t_mean, "t_min": t_min, "t_max": t_max, "n": n})[has]
        )
    # Per (series, iteration): mean of the per-call means, min of mins, max of maxes.
    h = g1_g2[has]
    m = np.bincount(h, minlength=G2)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"r_mean": np.bincount(h, weights=r_mean[has], minlength=G2) / m, "t_mean": np.bincount(h, weights=t_mean[has], minlength=G2) / m}
    for name, src, ufunc, init in (("r_min", r_min, np.minimum, np.inf), ("r_max", r_max, np.maximum, -np.inf), ("t_min", t_min, np.minimum, np.inf), ("t_max", t_max, np.maximum, -np.inf)):
        acc = np.full(G2, init)
        with np.errstate(invalid="ignore"):
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


def driver_history_windows(
    frame: pd.DataFrame, hist: pd.DataFrame | None, displayed: pd.DataFrame, S: int, a: int, b: int, fresh: tuple[int, ...] = ()
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``driver_history`` (Ray 2.1x / old stack): an iteration covers the last max(S, new)
    episodes (training), or that iteration's episodes (evaluation). ``frame``: one window's
    reported values with runner and episode ids, in RLlib's order; ``hist``: the last S
    episodes' values per series from earlier windows. Returns the reduced values per
    (series, iteration) of the iterations ``a..b`` the dashboard showed, and the new ``hist``.
    ``fresh``: iterations where a new process took over (a reopened run): its history
    starts empty there."""
    parts = [_reduce(frame[frame["phase"] == "evaluation"], ["phase", "kind", "sel_key", "iteration"])]
    train = frame[frame["phase"] != "evaluation"]
    if hist is not None:
        train = pd.concat([hist, train], ignore_index=True)
    disp = displayed
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
            lo = hi - max(S, int((ep_it == it).sum()))
            start = max((f for f in fresh if f <= it), default=None)
            if start is not None:  # nothing from before the new process
                lo = max(lo, int(np.searchsorted(ep_it >= start, True)) if (ep_it >= start).any() else hi)
            sel_rows = g[(g_pos > lo) & (g_pos <= hi)]
            rows.append(
                {
                    "phase": phase, "kind": kind, "sel_key": sel, "iteration": it,
                    "r_mean": sel_rows["value"].mean(), "r_min": sel_rows["value"].min(), "r_max": sel_rows["value"].max(),
                    "t_mean": sel_rows["truth"].mean(), "t_min": sel_rows["truth"].min(), "t_max": sel_rows["truth"].max(),
                }
            )
        carry.append(g[g_pos > len(first) - S])
    hist = pd.concat(carry, ignore_index=True) if carry else hist
    parts.append(pd.DataFrame(rows))
    return (pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else pd.DataFrame()), hist


def dashboard_frame(dash_calls: list[pd.DataFrame], dash_its: list[pd.DataFrame]) -> pd.DataFrame:
    """Per (phase, kind, key, iteration): RLlib's values and the truth, reduced over what
    the iteration's dashboard value covers, and the truth range of its episodes."""
    calls = [f for f in dash_calls if len(f)]
    its = [f for f in dash_its if len(f)]
    if not calls and not its:
        return pd.DataFrame()
    keys = ["phase", "kind", "sel_key", "iteration"]
    c = pd.concat(calls, ignore_index=True) if calls else pd.DataFrame(columns=keys + ["r_mean", "r_min", "r_max", "t_mean", "t_min", "t_max"])
    i = pd.concat(its, ignore_index=True).groupby(keys, sort=False).agg(low=("low", "min"), high=("high", "max")).reset_index() if its else pd.DataFrame(columns=keys + ["low", "high"])
    merged = c.merge(i, on=keys, how="outer")
    merged["sel_key"] = merged["sel_key"].where(merged["sel_key"] != "\x00none", None)
    return merged
