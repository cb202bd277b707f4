"""Reconciliation: the env's raw rewards (truth) against RLlib's per-episode reported
returns, columnar and streamed by iteration window (``tally.py``), then explained. No Ray
import.

    >>> audit = compare("runs/PPO_trial_0")
    >>> audit.ok, [str(f) for f in audit.failures()]
    (False, ['train module p0: LEAK — LEAK in 6/14 episodes (mean truth 30, reported 230) ...'])

Truth for a reported number is built to mean what the adapter declared it to mean
(``schema.Semantics``): for ``episode_sum_counted`` it is the sum over the episode of the
rewards RLlib counts, i.e. every reward the env paid minus those paid before or with the
agent's first observation, over the agent(s) the row is about.

The steps:

1. ``tally`` — one streamed pass over the run's Parquet parts (see ``tally.py``): per key
   counts and sums, the wrong values with the largest differences, excluded rewards,
   unreported episodes, the dashboard windows;
2. ``_findings`` — a verdict per key; explanations and attribution for at most
   ``EXPLAIN_LIMIT`` wrong values per finding (largest differences first; every wrong
   value is still counted); then the warnings (EXCLUDED, INCOMPLETE, UNVERIFIED);
3. ``build_dashboard`` — every recorded dashboard series rebuilt per iteration.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import numpy as np
import pandas as pd

from .attribution import explain, feature_row, fit
from .audit import FAILURES, SEVERITY, Audit, Evidence, Finding, Verdict, plural
from .dashboard import build_dashboard, dashboard_frame, dashboard_rows
from .handover import Handover, check_handover
from .known_bugs import with_known_bugs
from .schema import Kind, Phase
from .store import Run, load_run
from .tally import LateData, Progress, Tally, largest_wrong, tally

__all__ = ["compare", "episodes_frame", "Audit", "Finding", "Evidence", "Verdict", "FAILURES", "EXPLAIN_LIMIT"]

KIND_ORDER = {Kind.MODULE.value: 0, Kind.POLICY.value: 1, Kind.AGENT.value: 2, Kind.EPISODE.value: 3}
EXPLAIN_LIMIT = 200  # wrong values explained (and fitted) per finding, largest differences first
WINDOW_ROWS = 500_000  # raw rows per streaming window (peak RSS well under 1 GiB)


# --------------------------------------------------------------------------- public


def compare(
    run: Run | str,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    max_evidence: int = 5,
    progress: Progress | None = None,
    window_rows: int | None = WINDOW_ROWS,
) -> Audit:
    """Reconcile one run. ``run`` is a loaded ``Run`` or a path / URI for ``load_run``.

    ``atol`` / ``rtol``: explicit per-value tolerance ``atol + rtol · max(|truth|, |reported|)``;
    by default each value gets the worst-case rounding of RLlib's own arithmetic on its
    rewards (docs/verdicts.md), so a leak far below any relative tolerance is still found."""
    if not isinstance(run, Run):
        run = load_run(run)
    start = time.perf_counter()
    handover = check_handover(run)
    notes: list[str] = list(handover.notes)
    result = _pass(run, atol, rtol, window_rows, progress, handover, notes)
    # Rare: a part file is gone; leave its runner out (of the learning phase, for batch rows).
    if any([handover.missing_rows(result.runner_rows), handover.missing_batch_rows(result.batch_runner_rows)]):
        result = _pass(run, atol, rtol, window_rows, progress, handover, notes)
    notes += _duplicate_notes(result)
    if result.clipped_truth:
        notes.append(
            f"learning: RLlib clipped the rewards before its training batches (clip_rewards={run.manifest.get('clip_rewards')!r}), as configured; "
            f"the batches were compared with Σ clip(r) of what the env paid ({plural(result.clipped_truth, 'agent episode')})"
        )
    findings = _findings(run, result, max_evidence, atol, rtol, handover.findings)
    if progress:
        progress("dashboards", 0.99)
    iterations, dash_notes = dashboard_rows(run)
    if result.fallback:
        notes.append(
            f"{result.fallback} values were compared with the relative tolerance 1e-6 + 1e-5·|value| (recorded by schema 1, "
            "without per-reward magnitudes); re-record with this reward_audit for the exact rounding bound"
        )
    # Dashboard values are means over windows: compared with a relative tolerance.
    per_call = pd.concat(result.dash_per_call, ignore_index=True) if result.dash_per_call else None
    dashboard, dash_notes2 = build_dashboard(
        run, dashboard_frame(result.dash_calls, result.dash_its), iterations, atol=1e-6 if atol is None else atol, rtol=1e-5 if rtol is None else rtol, per_call=per_call
    )
    notes += dash_notes2
    stats = {
        "windows": result.windows,
        "raw_rows": run.rows("raw_rewards"),
        "reported_rows": run.rows("reported_episodes"),
        "rows_read": result.rows_read,
        "verified_episodes": sum(n for phase, n in result.compared.items() if phase != Phase.LEARNING.value),  # learning re-checks train episodes
        "seconds": time.perf_counter() - start,
    }
    return with_known_bugs(Audit(
        run.path,
        run.name,
        run.manifest,
        tuple(findings),
        lambda: episodes_frame(run, atol=atol, rtol=rtol, handover=handover),
        tuple(dashboard),
        tuple(notes + dash_notes),
        stats,
        tuple(_nothing_verified(run, result, findings)),
    ))


def episodes_frame(run: Run | str, *, atol: float | None = None, rtol: float | None = None, handover: Handover | None = None) -> pd.DataFrame:
    """Every compared (episode, kind, key) value with its verdict and explanation, as one
    DataFrame (``Audit.episodes``). Holds the whole comparison in memory: for small runs.
    ``handover``: what ``compare`` left out (lost hand-overs, dropped episodes, lost batch
    rows), so the frame shows the values the findings count."""
    if not isinstance(run, Run):
        run = load_run(run)
    if handover is None:
        handover = check_handover(run)
    result = tally(run, atol=atol, rtol=rtol, window_rows=None, explain_limit=EXPLAIN_LIMIT, keep_rows=True, left_out=handover.left_out, unbatched=handover.unbatched)
    if not result.rows:
        return pd.DataFrame()
    table = pd.concat(result.rows, ignore_index=True).sort_values(["ord", "runner_id", "episode_id", "kind"], na_position="last", kind="stable")
    feats = pd.concat(result.features, ignore_index=True).drop_duplicates(["runner_id", "episode_id", "agent_id"])
    feats = feats.sort_values(["runner_id", "episode_id", "first_chunk", "agent_id"], kind="stable")
    groups = _episode_features(feats)
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
    return table.rename(columns={"value": "reported"}).drop(columns=["ord"]).reset_index(drop=True)


# --------------------------------------------------------------------------- findings


def _nothing_verified(run: Run, result: Tally, findings: list[Finding]) -> list[str]:
    """Fail closed: why nothing could be verified in this run, or in one of its phases."""
    if not run.rows("raw_rewards") and not run.rows("reported_episodes"):
        return [
            f"nothing verified: {run.path} holds a manifest but no recorded rows — no raw rewards and no reported "
            "values (did training stop before its first `train()` returned?)"
        ]
    out = []
    for phase in sorted(set(result.raw_phases) | set(result.reported_phases)):
        if result.compared.get(phase):
            continue
        why = [f.message for f in findings if f.phase == phase and f.verdict is Verdict.UNVERIFIED]
        if not why and phase not in result.raw_phases:
            why = ["no raw rewards were recorded in this phase"]
        if not why:
            why = [f"none of its {result.raw_phases[phase]} episodes with raw rewards was reported by RLlib"]
        out.append(f"nothing verified in phase {phase}: {why[0]}")
    return out


def _episode_features(feats: pd.DataFrame) -> dict[tuple[str, str], tuple[dict, dict]]:
    """Per (runner, episode): ``({agent: module}, {agent: (earlier, final, rounding bound)})``,
    in the order the episode's agents first appear (first chunk, then id)."""
    out: dict[tuple[str, str], tuple[dict, dict]] = {}
    for runner, episode, agent, module, earlier, final, bound in zip(
        feats["runner_id"], feats["episode_id"], feats["agent_id"], feats["module_id"], feats["earlier"], feats["final"], feats["bound"]
    ):
        mapping, values = out.setdefault((runner, episode), ({}, {}))
        mapping[agent] = module
        values[agent] = (float(earlier), float(final), float(bound))
    return out


def _explain_row(r: Any, feats: tuple[dict, dict], atol: float | None = None, rtol: float | None = None) -> tuple[Verdict, str, set]:
    """Verdict and explanation of one wrong value from its episode's per-agent features."""
    mapping, values = feats
    if r.kind == Kind.AGENT.value:
        own = {r.agent_id} if r.agent_id in mapping else set()
    elif r.kind == Kind.MODULE.value:
        own = {a for a, m in mapping.items() if m == r.module_id}
    elif r.kind == Kind.POLICY.value:
        own = {r.agent_id} if mapping.get(r.agent_id) == r.module_id else set()
    else:
        own = set(mapping)
    prefix = "RLlib reported no value; " if r.missing_report else ""
    if not math.isfinite(r.value):
        return Verdict.MISMATCH, f"RLlib reported {r.value} (a non-finite value; a return is a finite sum of finite rewards)", own
    if not math.isfinite(r.truth):
        return Verdict.MISMATCH, f"the truth overflows float64 ({r.truth}); the env's rewards are too large to sum", own
    clipped = getattr(r, "clipped", math.nan)
    if not r.missing_report and math.isfinite(clipped) and abs(r.value - clipped) <= r.tol:
        return Verdict.MISMATCH, (
            f"reported = Σ clip(r) = {clipped:.6g}: RLlib clipped the env's rewards before counting them (`clip_rewards`), "
            f"so this number is not what the env paid ({r.truth:.6g})"
        ), own
    verdict, text = explain(r.diff, values, own, float(r.tol))
    if r.phase == Phase.LEARNING.value and verdict == "MISMATCH" and text.startswith("difference"):
        text += " — rewards not paid by the env are in the training data (a reward-changing connector on the env runner?)" if r.diff > 0 else (
            " — rewards the env paid are missing from the training data")
    return Verdict(verdict), prefix + text, own


def _pass(run: Run, atol: float | None, rtol: float | None, window_rows: int | None, progress: Progress | None, handover: Handover, notes: list[str]) -> Tally:
    """The streamed pass; if an episode's rows arrive after the window that closed it, once
    more in a single window."""
    try:
        return tally(run, atol=atol, rtol=rtol, window_rows=window_rows, explain_limit=EXPLAIN_LIMIT, progress=progress, left_out=handover.left_out, unbatched=handover.unbatched)
    except LateData as e:
        notes.append(f"{e}; audited in one window instead")
        return tally(run, atol=atol, rtol=rtol, window_rows=None, explain_limit=EXPLAIN_LIMIT, progress=progress, left_out=handover.left_out, unbatched=handover.unbatched)


def _duplicate_notes(result: Tally) -> list[str]:
    return [
        f"{table}: {plural(n, 'row')} appeared twice, identical copies (in {', '.join(sorted(files))}); each counted once"
        for table, (n, files) in sorted(result.duplicates.items())
    ]


def _findings(run: Run, result: Tally, max_evidence: int, atol: float | None, rtol: float | None, handover: list[Finding] = ()) -> list[Finding]:
    findings: list[Finding] = list(handover)
    for (phase, kind, sem), n in sorted(result.unknown.items()):
        findings.append(_unverified(phase, kind, "*", n, f"{n} reported values with semantics `{sem}`, which this reward_audit cannot rebuild; upgrade reward_audit"))
    raw_phases, reported_phases = set(result.raw_phases), set(result.reported_phases)
    if not raw_phases:
        findings += [_unverified(p, "run", "raw", 0, "no raw rewards recorded for this phase") for p in sorted(reported_phases)]
        return findings

    bad = pd.concat(result.bad, ignore_index=True) if result.bad else pd.DataFrame(columns=["phase", "kind", "key", "diff", "ord", "runner_id", "episode_id"])
    bad = largest_wrong(bad, EXPLAIN_LIMIT)
    feats = pd.concat(result.features, ignore_index=True) if result.features else pd.DataFrame(columns=["runner_id", "episode_id", "agent_id", "module_id", "earlier", "final", "bound", "first_chunk"])
    feats = feats.drop_duplicates(["runner_id", "episode_id", "agent_id"]).sort_values(["runner_id", "episode_id", "first_chunk", "agent_id"], kind="stable")
    groups = _episode_features(feats)
    bad_by_key = {k: g for k, g in bad.groupby(["phase", "kind", "key"], sort=False)}
    keys = sorted(result.keys.items(), key=lambda kv: (kv[1][0], kv[0][0], kv[0][1], str(kv[0][2])))
    for (phase, kind, key), st in keys:
        _, n_rows, s_truth, s_rep, n_eps, n_clean_eps, n_bad, bad_multi, clean_multi = st
        n_rows, n_eps, n_clean_eps, n_bad, bad_multi, clean_multi = (int(x) for x in (n_rows, n_eps, n_clean_eps, n_bad, bad_multi, clean_multi))
        truth, reported = s_truth / n_rows, s_rep / n_rows
        rows = bad_by_key.get((phase, kind, key))
        if not n_bad or rows is None:
            # Every value is within its rounding bound: the mean difference shown is 0.
            agree = f"{plural(n_eps, 'episode')} " + ("agrees" if n_eps == 1 else "agree")
            findings.append(Finding(phase, kind, str(key), Verdict.CLEAN, n_eps, truth, reported, 0.0, agree, {Verdict.CLEAN.value: n_clean_eps}))
            continue
        findings.append(_failing(phase, kind, str(key), rows, groups, atol, rtol, max_evidence, n_eps, n_clean_eps, n_bad, bad_multi, clean_multi, truth, reported))

    for (phase, kind), (n_eps, _, example) in sorted(result.orphans.items()):
        what = "episodes with training batches" if phase == Phase.LEARNING.value else "reported episodes"
        findings.append(_unverified(str(phase), kind, "*", n_eps, f"{n_eps} {what} have no raw rewards (the tap never saw them), e.g. {example}"))
    findings += _excluded(result)
    findings += _incomplete(result, reported_phases)
    failures, driver = run.manifest.get("capture_failures") or 0, run.manifest.get("driver_failures") or 0
    if failures or driver:
        where = ", ".join(x for x in (f"{failures} on env runners" if failures else "", f"{driver} on the driver" if driver else "") if x)
        findings.append(_unverified("run", "run", "capture", 0, f"{plural(failures + driver, 'capture failure')} ({where}) were logged while recording (see the training log, logger `reward_audit`); values they touched may be missing"))
    for phase in sorted(raw_phases - reported_phases):
        why = "no per-episode values from RLlib were captured in this phase; nothing to compare the raw rewards with"
        if run.manifest.get("clip_rewards") not in (None, False):
            why = f"RLlib clips rewards (clip_rewards={run.manifest['clip_rewards']!r}), so its returns are sums of clipped rewards, which chunk sums cannot rebuild; not compared"
        findings.append(_unverified(phase, "run", "reported", int(result.raw_phases[phase]), why))
    findings.sort(key=_order)
    return findings


def _order(f: Finding) -> tuple:
    return (f.phase != Phase.TRAIN.value, f.phase, KIND_ORDER.get(f.kind, 9), f.key, f.verdict.severity)


def _pattern(explanation: str) -> str:
    """An explanation without its numbers: what wrong values have in common."""
    return re.sub(r"\s*\([^)]*\)", "", explanation.split(";")[0])


def summarize(
    rows: pd.DataFrame, n_eps: int, n_clean_eps: int, n_bad: int, bad_multi: int, clean_multi: int, truth: float, reported: float
) -> tuple[Verdict, dict[str, int], str]:
    """Label, counts and message of a key with wrong values; ``rows`` are its explained
    wrong values (``verdict``, ``explanation``, ``episode``), largest differences first.

    The label is the verdict of the *most* wrong episodes (ties: the more severe one), so a
    coincidental fit in a minority of episodes does not outrank what explains the rest;
    the minority verdicts are listed with their most frequent pattern."""
    counts = {Verdict.CLEAN.value: n_clean_eps} if n_clean_eps else {}
    by_verdict = rows.groupby("verdict")["episode"].nunique().to_dict()
    counts.update(by_verdict)
    label = min((Verdict(v) for v in by_verdict), key=lambda v: (-by_verdict[v.value], v.severity))
    message = (
        f"{label.value} in {counts[label.value]}/{n_eps} episodes "
        f"(mean truth {truth:.6g}, reported {reported:.6g}); "
        f"{bad_multi}/{n_bad} wrong values come from multi-chunk episodes, {clean_multi} multi-chunk values are right"
    )

    def common(selected: pd.DataFrame) -> tuple[str, int]:
        # The most frequent pattern; ties go to the one with the largest difference (rows
        # are sorted by |difference|, and value_counts(sort=False) keeps first appearance).
        frequency = selected["explanation"].map(_pattern).value_counts(sort=False)
        return frequency.idxmax(), int(frequency.max())

    pattern, n = common(rows[rows["verdict"] == label.value])
    message += f"; in {n}/{len(rows)} wrong values: {pattern}"
    others = [v for v in SEVERITY if v.value in by_verdict and v is not label]
    if others:
        parts = []
        for v in others:
            pattern, n = common(rows[rows["verdict"] == v.value])
            parts.append(f"{by_verdict[v.value]} {v.value} ({n}× {pattern})")
        message += "; minority: " + ", ".join(parts)
    if len(rows) < n_bad:
        message += f" (explained: the {len(rows)} largest of {n_bad} wrong values)"
        counts["wrong"] = int(n_bad)
    return label, counts, message


def _failing(
    phase: str, kind: str, key: str, rows: pd.DataFrame, groups: dict, atol: float | None, rtol: float | None, max_evidence: int,
    n_eps: int, n_clean_eps: int, n_bad: int, bad_multi: int, clean_multi: int, truth: float, reported: float,
) -> Finding:
    """A key with wrong values: explain the (at most ``EXPLAIN_LIMIT``) largest ones."""
    verdicts, texts, owns = [], [], []
    for r in rows.itertuples(index=False):
        verdict, text, own = _explain_row(r, groups[(r.runner_id, r.episode_id)], atol, rtol)
        verdicts.append(verdict)
        texts.append(text)
        owns.append(own)
    rows = rows.assign(verdict=[v.value for v in verdicts], explanation=texts, episode=rows["runner_id"] + "|" + rows["episode_id"])
    label, counts, message = summarize(rows, n_eps, n_clean_eps, n_bad, bad_multi, clean_multi, truth, reported)
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
            agent_id=None if kind in (Kind.AGENT.value, Kind.EPISODE.value) or pd.isna(r.agent_id) else r.agent_id,  # pandas' NaN: no agent
        )
        for r in rows.head(max_evidence).itertuples(index=False)
    )
    # The least-squares composition, over the explained values that are finite.
    finite = [(r, own) for r, own in zip(rows.itertuples(index=False), owns) if math.isfinite(r.value) and math.isfinite(r.truth)]
    attribution = None
    if finite:
        model = fit(np.array([r.value for r, _ in finite]), [feature_row(groups[(r.runner_id, r.episode_id)][1], own) for r, own in finite])
        attribution = model.formula(f"reported({kind} {key})")
    return Finding(phase, kind, key, label, n_eps, truth, reported, reported - truth, message, counts, evidence, attribution)


def _unverified(phase: str, kind: str, key: str, episodes: int, why: str) -> Finding:
    return Finding(phase, kind, key, Verdict.UNVERIFIED, episodes, None, None, None, why)


def _excluded(result: Tally) -> list[Finding]:
    """Rewards paid before / with an agent's first observation, in reported episodes."""
    out = []
    for (phase, agent), (n_eps, total, n) in sorted(result.excluded.items()):
        if total == 0.0 or phase == Phase.LEARNING.value:  # rewards of 0 hide nothing; `learning` repeats `train`
            continue
        out.append(
            Finding(
                phase, Kind.AGENT.value, agent, Verdict.EXCLUDED, n_eps, None, None, -total,
                f"{plural(n, 'reward')} totalling {total:.6g} (mean {total / n_eps:.6g} per episode, {plural(n_eps, 'episode')}) were paid before or with "
                "this agent's first observation; RLlib never counts them (by design), so they are left out of the truth",
                {Verdict.EXCLUDED.value: n_eps},
            )
        )
    return out


def _incomplete(result: Tally, reported_phases: set[str]) -> list[Finding]:
    out = []
    for phase in sorted({p for p, _ in result.unreported}):
        cut, finished = result.unreported.get((phase, False), 0), result.unreported.get((phase, True), 0)
        learning = phase == Phase.LEARNING.value
        if learning:  # only finished episodes are compared; the train phase counts the rest
            cut = 0
        if phase not in reported_phases or not cut + finished:
            continue
        parts = []
        if cut:
            parts.append(f"{cut} never finished (cut by a reset, or still running when the run stopped)")
        if finished:
            examples = sorted(e[2:] for e in result.unreported_examples if e[0] == phase and e[1])[:3]
            what = "no training data was recorded for them" if learning else "RLlib reported no value for them"
            parts.append(f"{finished} finished but {what} (e.g. {', '.join(e[2] for e in examples)})")
        out.append(
            Finding(
                phase, Kind.EPISODE.value, "unreported", Verdict.INCOMPLETE, cut + finished, None, None, None,
                f"{plural(cut + finished, 'episode')} " + ("has" if cut + finished == 1 else "have") + " raw rewards but no report: " + "; ".join(parts),
                {"cut": cut, "finished": finished},
            )
        )
    return out
