"""Audit what the dashboards showed: rebuild every recorded per-iteration number (the
``train()`` result, i.e. Tune's result.json and TensorBoard) from the per-episode values,
twice — once from RLlib's own per-episode values (to prove our window model reproduces
RLlib exactly) and once from the truth (what the dashboard should have shown).

Window models (RLLIB_NOTES §6), chosen by the manifest's ``smoothing_model``:

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

from reward_audit.results import manifest_paths, read_tune_results, same_number, tune_result_file
from reward_audit.schema import IterationSemantics, Kind

_REDUCERS = {
    IterationSemantics.MEAN_OF_EPISODE_SUMS.value: np.mean,
    IterationSemantics.MEAN_OF_AGENT_EPISODES.value: np.mean,
    IterationSemantics.MIN_OF_AGENT_EPISODES.value: np.min,
    IterationSemantics.MAX_OF_AGENT_EPISODES.value: np.max,
    IterationSemantics.MIN_OF_EPISODE_SUMS.value: np.min,
    IterationSemantics.MAX_OF_EPISODE_SUMS.value: np.max,
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


def _window(rows: pd.DataFrame, model: str, iteration: int, window: int, evaluation: bool, discard_last_call: bool = False) -> pd.DataFrame | list[pd.DataFrame]:
    """The per-episode rows one iteration's displayed value covers: one frame per
    (runner, get_metrics call) for ``per_call_window``, else one frame."""
    if model == "per_call_window":
        now = rows[rows["iteration"] == iteration]
        if discard_last_call:
            # The driver never reads each remote runner's last sample()+get_metrics() of an
            # evaluation round (manifest `evaluation_discards_last_call`, see capture/newstack.py).
            last = now.groupby("runner_id")["metrics_call"].transform("max")
            now = now[now["metrics_call"] != last]
        return [g.tail(window) for _, g in now.groupby(["runner_id", "metrics_call"], sort=False)]
    if evaluation:
        return rows[rows["iteration"] == iteration]
    upto = rows[rows["iteration"] <= iteration]
    episodes = upto.drop_duplicates(["runner_id", "episode_id"])
    n_new = int((episodes["iteration"] == iteration).sum())
    keep = episodes.tail(max(window, n_new))[["runner_id", "episode_id"]]
    return upto.merge(keep, on=["runner_id", "episode_id"])


def _reduce(window: pd.DataFrame | list[pd.DataFrame], column: str, model: str, reducer) -> float:
    if model == "per_call_window":
        # Each (runner, call) reduces its window; the driver merges means by nan-mean and
        # min/max by min/max.
        per_call = [float(reducer(g[column].to_numpy())) for g in window if len(g)]
        merge = reducer if reducer in (np.min, np.max) else np.mean
        return float(merge(per_call)) if per_call else math.nan
    values = window[column].to_numpy()
    return float(reducer(values)) if len(values) else math.nan


def _select(episodes: pd.DataFrame, kind: str, key: str | None) -> pd.DataFrame:
    e = episodes[episodes["kind"] == kind]
    if kind == Kind.AGENT.value:
        return e[e["agent_id"] == key]
    if kind in (Kind.MODULE.value, Kind.POLICY.value):
        return e[e["module_id"] == key]
    return e


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


def audit_dashboard(run, episodes: pd.DataFrame, *, atol: float = 1e-6, rtol: float = 1e-5, iterations: pd.DataFrame | None = None) -> list[DashboardSeries]:
    """Rebuild each recorded dashboard series; ``episodes`` is ``compare(run).episodes``."""
    manifest = run.manifest
    model = manifest.get("smoothing_model")
    iterations = run.iterations if iterations is None else iterations
    if model not in ("per_call_window", "driver_history") or iterations.empty or episodes.empty:
        return []
    S = int(manifest.get("metrics_num_episodes_for_smoothing") or 100)
    order = run.reported.reset_index().rename(columns={"index": "order"})
    meta = order[["runner_id", "episode_id", "kind", "agent_id", "module_id", "metrics_call", "iteration", "order"]]
    eps = episodes[~episodes["missing_report"]].drop(columns=["metrics_call", "iteration"], errors="ignore").merge(meta, on=["runner_id", "episode_id", "kind", "agent_id", "module_id"])
    eps = eps.sort_values("order")
    series = []
    for (phase, path, kind, key, semantics), rows in iterations.groupby(["phase", "path", "kind", "key", "semantics"], dropna=False, sort=False):
        reducer = _REDUCERS.get(semantics)
        if reducer is None:
            continue
        key = None if isinstance(key, float) and math.isnan(key) else key
        selected = _select(eps[eps["phase"] == phase], kind, key)
        evaluation = phase == "evaluation"
        runners = manifest.get("evaluation_num_env_runners") if evaluation else manifest.get("num_env_runners")
        window = S if model == "driver_history" else max(1, math.ceil(S / max(int(runners or 0), 1)))
        discard = evaluation and bool(manifest.get("evaluation_discards_last_call"))
        out: list[dict] = []
        for r in rows.sort_values("iteration").itertuples(index=False):
            it = int(r.iteration)
            now = selected.loc[selected["iteration"] == it, "truth"]
            if evaluation and not len(now) and out:
                # No evaluation in this iteration: RLlib keeps showing the last evaluation's values.
                rebuilt, expected, low, high = out[-1]["rebuilt"], out[-1]["expected"], out[-1]["low"], out[-1]["high"]
            else:
                covered = _window(selected, model, it, window, evaluation, discard)
                rebuilt = _reduce(covered, "reported", model, reducer)
                expected = _reduce(covered, "truth", model, reducer)
                low, high = (float(now.min()), float(now.max())) if len(now) else (math.nan, math.nan)
            displayed = float(r.value)
            both_nan = math.isnan(displayed) and math.isnan(rebuilt)
            model_ok = both_nan or (not math.isnan(rebuilt) and abs(displayed - rebuilt) <= atol + rtol * abs(displayed))
            agrees = (math.isnan(displayed) and math.isnan(expected)) or (
                not math.isnan(expected) and abs(displayed - expected) <= atol + rtol * max(abs(displayed), abs(expected))
            )
            out.append(
                {
                    "iteration": it,
                    "displayed": displayed,
                    "rebuilt": rebuilt,
                    "expected": expected,
                    "difference": displayed - expected,
                    "model_ok": bool(model_ok),
                    "agrees": bool(agrees),
                    "low": low,
                    "high": high,
                }
            )
        series.append(DashboardSeries(phase, path, kind, key, pd.DataFrame(out)))
    return series
