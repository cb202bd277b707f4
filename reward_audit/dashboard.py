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

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .results import manifest_paths, read_tune_results, same_number, tune_result_file
from .schema import IterationSemantics, Kind

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
    iterations, notes = run.iterations, []
    file = tune_result_file(run.path) if "://" not in run.path else None
    if file is None:
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


_COLUMNS = {"mean": ("r_mean", "t_mean"), "min": ("r_min", "t_min"), "max": ("r_max", "t_max")}


def build_dashboard(run, windows: pd.DataFrame, iterations: pd.DataFrame, *, atol: float = 1e-6, rtol: float = 1e-5) -> list[DashboardSeries]:
    """Rebuild each recorded dashboard series from ``windows`` — per (phase, kind, key,
    iteration): RLlib's per-episode values and the truth reduced over the episodes the
    window model says the iteration covers (``compare`` computes them while it streams) —
    vectorised over iterations."""
    if windows is None or windows.empty or iterations.empty or run.manifest.get("smoothing_model") not in ("per_call_window", "driver_history"):
        return []
    its = iterations.assign(reducer=iterations["semantics"].map(_REDUCERS))
    its = its[its["reducer"].notna()]
    if its.empty:
        return []
    its = its.assign(sel_key=its["key"].where(its["kind"] != Kind.EPISODE.value, None))
    w = windows.assign(sel_key=windows["sel_key"].where(windows["kind"] != Kind.EPISODE.value, None))
    for frame in (its, w):
        frame["sel_key"] = frame["sel_key"].astype(object).where(frame["sel_key"].notna(), "\x00none")
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
    return series
