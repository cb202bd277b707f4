"""Step 5 of the reconciliation pass (``tally``): a window's compared values reduced into
the run's bounded per-key tallies — counts and sums per (phase, kind, key), the wrong values
with the largest differences and their episodes' per-agent features, excluded rewards,
unreported episodes, orphans, the learning phase's bookkeeping — and what each iteration's
dashboard value covers (the window models live in dashboard.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .dashboard import driver_history_windows, per_call_windows
from .schema import Phase
from .window import AGENT, EPISODE, KINDS, MODULE, OTHER, POLICY, Window, factorize

if TYPE_CHECKING:
    from .tally import Tally, _Context

def _names(w: Window, kind: np.ndarray, sel: np.ndarray) -> np.ndarray:
    agents = np.append(w.agents, None).astype(object)
    modules = np.append(w.modules, None).astype(object)
    out = np.full(len(sel), "return", dtype=object)
    is_agent, is_module = kind == AGENT, (kind == MODULE) | (kind == POLICY)
    out[is_agent] = agents[sel[is_agent]]
    out[is_module] = modules[sel[is_module]]
    return out


def reduce_window(w: Window, ctx: "_Context", out: "Tally", a: int, b: int) -> None:
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


def _wrong(w: Window, ctx: "_Context", out: "Tally", k: np.ndarray, names: np.ndarray, phases: np.ndarray) -> None:
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


def _excluded(w: Window, out: "Tally") -> None:
    sel = (w.g_npre > 0) & w.closed[w.g_eid] & w.has_raw[w.g_eid] & w.reported[w.g_eid]
    if not sel.any():
        return
    frame = pd.DataFrame({"phase": w.phases[w.ep_phase[w.g_eid[sel]]], "agent": w.agents[w.g_agent[sel]], "pre": w.g_pre[sel], "n": w.g_npre[sel]})
    for (phase, agent), g in frame.groupby(["phase", "agent"]):
        prev = out.excluded.setdefault((phase, agent), [0, 0.0, 0])
        prev[0] += len(g)
        prev[1] += float(g["pre"].sum())
        prev[2] += int(g["n"].sum())


def _unreported(w: Window, out: "Tally") -> None:
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


def _orphans(w: Window, out: "Tally") -> None:
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


def _learned(w: Window, out: "Tally") -> None:
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


def _dashboard(w: Window, ctx: "_Context", out: "Tally", a: int, b: int) -> None:
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
