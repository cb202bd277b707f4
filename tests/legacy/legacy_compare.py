"""Reconciliation: the env's raw rewards (truth) against RLlib's per-episode reported
returns. Pure functions over a loaded ``Run``; no Ray import.

    >>> audit = compare("runs/PPO_trial_0")
    >>> audit.ok, [str(f) for f in audit.failures()]
    (False, ['train module p0: LEAK in 6/14 episodes (truth 30.0, reported 230.0) ...'])
    >>> audit.to_frame()           # one row per finding
    >>> audit.episodes             # one row per compared (episode, kind, key)

Truth for a reported number is built to mean what the adapter declared it to mean
(``schema.Semantics``): for ``episode_sum_counted`` it is the sum over the episode of the
rewards RLlib counts, i.e. every reward the env paid minus those paid before or with the
agent's first observation (RLLIB_NOTES §3), over the agent(s) the row is about.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import numpy as np
import pandas as pd

from reward_audit.attribution import explain, feature_row, fit
from reward_audit.audit import plural
from legacy_dashboard import audit_dashboard, dashboard_rows
from reward_audit.schema import Kind, Phase, Semantics
from reward_audit.store import Run, load_run


class Verdict(str, enum.Enum):
    CLEAN = "CLEAN"
    LEAK = "LEAK"  # reported includes rewards of agents not mapped to it
    DROP = "DROP"  # reported misses rewards of its own agents
    MISMATCH = "MISMATCH"  # disagrees, explained by neither
    EXCLUDED = "EXCLUDED"  # rewards RLlib by design never counts (warning)
    INCOMPLETE = "INCOMPLETE"  # raw rows but no report: cut or unfinished episodes (warning)
    UNVERIFIED = "UNVERIFIED"  # not enough data to judge (warning)

    @property
    def is_failure(self) -> bool:
        return self in FAILURES


FAILURES = frozenset({Verdict.LEAK, Verdict.DROP, Verdict.MISMATCH})
_SEVERITY = [Verdict.LEAK, Verdict.DROP, Verdict.MISMATCH, Verdict.UNVERIFIED, Verdict.INCOMPLETE, Verdict.EXCLUDED, Verdict.CLEAN]
KIND_ORDER = {Kind.MODULE.value: 0, Kind.POLICY.value: 1, Kind.AGENT.value: 2, Kind.EPISODE.value: 3}


@dataclass(frozen=True)
class Evidence:
    """One episode a person can check by hand."""

    episode_id: str
    runner_id: str
    chunks: int
    truth: float
    reported: float
    difference: float
    verdict: Verdict
    explanation: str
    agent_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "verdict": self.verdict.value}


@dataclass(frozen=True)
class Finding:
    """The verdict for one (phase, kind, key): e.g. (train, module, "p0")."""

    phase: str
    kind: str
    key: str
    verdict: Verdict
    episodes: int
    truth: float | None
    reported: float | None
    difference: float | None
    message: str
    counts: dict[str, int] = field(default_factory=dict)
    evidence: tuple[Evidence, ...] = ()
    attribution: str | None = None  # least-squares composition over the affected episodes

    def __str__(self) -> str:
        return f"{self.phase} {self.kind} {self.key}: {self.verdict.value} — {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "kind": self.kind,
            "key": self.key,
            "verdict": self.verdict.value,
            "episodes": self.episodes,
            "truth": _json_number(self.truth),
            "reported": _json_number(self.reported),
            "difference": _json_number(self.difference),
            "message": self.message,
            "counts": dict(self.counts),
            "evidence": [e.to_dict() for e in self.evidence],
            "attribution": self.attribution,
        }


def _json_number(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


@dataclass(frozen=True, eq=False)
class Audit:
    """The result of ``compare``: every finding, plus the per-episode comparison table."""

    path: str
    name: str
    manifest: dict[str, Any]
    findings: tuple[Finding, ...]
    episodes: pd.DataFrame
    dashboard: tuple = ()  # DashboardSeries: what train()/Tune/TensorBoard showed, rebuilt
    notes: tuple[str, ...] = ()  # where the dashboard numbers came from, Tune cross-check

    def failures(self, fail_on: Iterable[Verdict | str] = FAILURES) -> list[Finding]:
        wanted = {Verdict(v.upper()) if isinstance(v, str) else v for v in fail_on}
        return [f for f in self.findings if f.verdict in wanted]

    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict in (Verdict.EXCLUDED, Verdict.INCOMPLETE, Verdict.UNVERIFIED)]

    @property
    def ok(self) -> bool:
        return not self.failures()

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.verdict.value] = out.get(f.verdict.value, 0) + 1
        return out

    def to_frame(self) -> pd.DataFrame:
        rows = [{k: v for k, v in f.to_dict().items() if k != "evidence"} for f in self.findings]
        return pd.DataFrame(rows, columns=["phase", "kind", "key", "verdict", "episodes", "truth", "reported", "difference", "message", "counts"])

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "run": self.path,
            "name": self.name,
            "ray_version": m.get("ray_version"),
            "api_stack": m.get("api_stack"),
            "adapter": m.get("adapter"),
            "ok": self.ok,
            "counts": self.counts(),
            "findings": [f.to_dict() for f in self.findings],
            "notes": list(self.notes),
            "dashboard": [
                {
                    "phase": d.phase,
                    "path": d.path,
                    "kind": d.kind,
                    "key": d.key,
                    "wrong_iterations": d.wrong_iterations,
                    "first_wrong": d.first_wrong,
                    "unreconstructable_iterations": d.unreconstructable,
                    "summary": d.summary(),
                }
                for d in self.dashboard
            ],
        }


# --------------------------------------------------------------------------- truth


def _episode_truth(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per (runner, episode, agent): counted / total / pre-obs sums, mapping, chunks,
    and the attribution features (earlier chunks vs the final chunk)."""
    raw = raw.assign(counted=raw["reward"] - raw["pre_obs_reward"])
    last_chunk = raw.groupby(["runner_id", "episode_id"])["chunk_seq"].transform("max")
    raw = raw.assign(final=np.where(raw["chunk_seq"] == last_chunk, raw["counted"], 0.0))
    raw = raw.sort_values(["chunk_seq", "agent_id"], kind="stable")
    keys = ["phase", "runner_id", "episode_id", "agent_id"]
    per_agent = raw.groupby(keys, sort=False).agg(
        counted=("counted", "sum"),
        total=("reward", "sum"),
        pre_obs=("pre_obs_reward", "sum"),
        n_pre_obs=("n_pre_obs", "sum"),
        final=("final", "sum"),
        module_id=("module_id", "last"),
        done=("episode_done", "any"),
    )
    per_agent["earlier"] = per_agent["counted"] - per_agent["final"]
    chunks = raw.groupby(["runner_id", "episode_id"])["chunk_seq"].nunique().rename("chunks")
    done = raw.groupby(["runner_id", "episode_id"])["episode_done"].any().rename("episode_done")
    per_agent = per_agent.reset_index().join(chunks, on=["runner_id", "episode_id"]).join(done, on=["runner_id", "episode_id"])
    return per_agent


def _expected_rows(truth: pd.DataFrame, reported: pd.DataFrame) -> pd.DataFrame:
    """Every (episode, kind, key) RLlib should have reported, joined with what it did report.
    Kinds are expected only for episodes where RLlib reported that kind at all."""
    ep_keys = ["runner_id", "episode_id"]
    kinds_reported = reported[ep_keys + ["kind"]].drop_duplicates()
    t = truth.merge(kinds_reported, on=ep_keys)
    parts = []
    agent = t[t["kind"] == Kind.AGENT.value]
    parts.append(agent.assign(module_id=None)[ep_keys + ["phase", "kind", "agent_id", "module_id"]])
    module = t[(t["kind"] == Kind.MODULE.value) & t["module_id"].notna()]
    parts.append(module.assign(agent_id=None)[ep_keys + ["phase", "kind", "agent_id", "module_id"]].drop_duplicates())
    policy = t[(t["kind"] == Kind.POLICY.value) & t["module_id"].notna()]
    parts.append(policy[ep_keys + ["phase", "kind", "agent_id", "module_id"]])
    episode = t[t["kind"] == Kind.EPISODE.value]
    parts.append(episode.assign(agent_id=None, module_id=None)[ep_keys + ["phase", "kind", "agent_id", "module_id"]].drop_duplicates())
    expected = pd.concat(parts, ignore_index=True)
    on = ep_keys + ["kind", "agent_id", "module_id"]
    rep = reported.rename(columns={"phase": "reported_phase"})
    merged = expected.merge(rep, on=on, how="outer", indicator=True)
    merged["missing_report"] = merged["_merge"] == "left_only"
    merged["value"] = merged["value"].fillna(0.0)
    # Reported-only rows (no expected key) take the phase of the runner that reported them.
    merged["phase"] = merged["phase"].fillna(merged["reported_phase"])
    return merged.drop(columns=["_merge", "reported_phase"])


def _own_agents(kind: str, agent_id: Any, module_id: Any, mapping: dict[str, Any]) -> set[str]:
    if kind == Kind.AGENT.value:
        return {agent_id} if agent_id in mapping else set()
    if kind == Kind.MODULE.value:
        return {a for a, m in mapping.items() if m == module_id}
    if kind == Kind.POLICY.value:
        return {agent_id} if mapping.get(agent_id) == module_id else set()
    return set(mapping)


# --------------------------------------------------------------------------- compare


def compare(run: Run | str, *, atol: float = 1e-6, rtol: float = 1e-5, max_evidence: int = 5) -> Audit:
    """Reconcile one run. ``run`` is a loaded ``Run`` or a path / URI for ``load_run``."""
    if not isinstance(run, Run):
        run = load_run(run)
    raw, reported = run.raw, run.reported
    findings: list[Finding] = []

    known = reported["semantics"] == Semantics.EPISODE_SUM_COUNTED.value
    for (phase, kind, sem), rows in reported[~known].groupby(["phase", "kind", "semantics"]):
        findings.append(_unverified(phase, kind, "*", len(rows), f"{len(rows)} reported values with semantics `{sem}`, which this reward_audit cannot rebuild; upgrade reward_audit"))
    reported = reported[known]

    if raw.empty:
        table = pd.DataFrame()
        findings += [_unverified(p, "run", "raw", 0, "no raw rewards recorded for this phase") for p in sorted(set(reported["phase"]))]
        return Audit(run.path, run.name, run.manifest, tuple(findings), table)

    truth = _episode_truth(raw)
    mapping = {k: dict(zip(g["agent_id"], g["module_id"])) for k, g in truth.groupby(["runner_id", "episode_id"], sort=False)}
    features = {k: g.set_index("agent_id")[["earlier", "final"]] for k, g in truth.groupby(["runner_id", "episode_id"], sort=False)}
    chunks = truth.drop_duplicates(["runner_id", "episode_id"]).set_index(["runner_id", "episode_id"])["chunks"]
    counted = truth.set_index(["runner_id", "episode_id", "agent_id"])["counted"]

    table = _expected_rows(truth, reported) if not reported.empty else pd.DataFrame(columns=["runner_id", "episode_id", "phase", "kind", "agent_id", "module_id", "value", "missing_report"])
    has_raw = pd.Series([k in mapping for k in zip(table["runner_id"], table["episode_id"])], index=table.index, dtype=bool)
    orphans = table[~has_raw]
    table = table[has_raw].copy()

    truths, owns = [], []
    for r in table.itertuples(index=False):
        key = (r.runner_id, r.episode_id)
        own = _own_agents(r.kind, r.agent_id, r.module_id, mapping[key])
        owns.append(own)
        truths.append(float(sum(counted[(r.runner_id, r.episode_id, a)] for a in own)))
    table["own"] = [tuple(sorted(o)) for o in owns]
    table["truth"] = truths
    table["reported"] = table["value"].astype(float)
    table["difference"] = table["reported"] - table["truth"]
    tol = atol + rtol * np.maximum(table["truth"].abs(), table["reported"].abs())
    table["clean"] = table["difference"].abs() <= tol
    table["chunks"] = [int(chunks[(r, e)]) for r, e in zip(table["runner_id"], table["episode_id"])]

    verdicts, explanations = [], []
    for r, own, t in zip(table.itertuples(index=False), owns, tol):
        if r.clean:
            verdicts.append(Verdict.CLEAN)
            explanations.append("")
            continue
        feats = features[(r.runner_id, r.episode_id)]
        verdict, text = explain(r.difference, feats, own, float(t))
        verdicts.append(Verdict(verdict))
        prefix = "RLlib reported no value; " if r.missing_report else ""
        explanations.append(prefix + text)
    table["verdict"] = [v.value for v in verdicts]
    table["explanation"] = explanations
    table["key"] = np.where(table["kind"].isin([Kind.AGENT.value]), table["agent_id"], table["module_id"])
    table.loc[table["kind"] == Kind.EPISODE.value, "key"] = "return"

    for (phase, kind, key), rows in table.groupby(["phase", "kind", "key"], sort=False):
        finding = _finding(phase, kind, key, rows, max_evidence)
        bad = rows[rows["verdict"] != Verdict.CLEAN.value]
        if len(bad):
            model = fit(
                bad["reported"].to_numpy(),
                [feature_row(features[(r.runner_id, r.episode_id)], set(r.own)) for r in bad.itertuples(index=False)],
            )
            finding = replace(finding, attribution=model.formula(f"reported({kind} {key})"))
        findings.append(finding)

    for (phase, kind), rows in orphans.groupby(["phase", "kind"], dropna=False):
        findings.append(_unverified(str(phase), kind, "*", rows["episode_id"].nunique(), f"{rows['episode_id'].nunique()} reported episodes have no raw rewards (the tap never saw them), e.g. {rows['episode_id'].iloc[0]}"))

    findings += _excluded(truth, table)
    reported_phases = set(reported["phase"])
    findings += _incomplete(truth[truth["phase"].isin(reported_phases)], table, max_evidence)
    failures = run.manifest.get("capture_failures") or 0
    if failures:
        findings.append(_unverified("run", "run", "capture", 0, f"{failures} capture failures were logged while recording (see the training log, logger `reward_audit`); values they touched may be missing"))
    for phase in sorted(set(truth["phase"]) - reported_phases):
        episodes = truth.loc[truth["phase"] == phase, "episode_id"].nunique()
        why = "no per-episode values from RLlib were captured in this phase; nothing to compare the raw rewards with"
        if run.manifest.get("clip_rewards") not in (None, False):
            why = f"RLlib clips rewards (clip_rewards={run.manifest['clip_rewards']!r}), so its returns are sums of clipped rewards, which chunk sums cannot rebuild; not compared"
        findings.append(_unverified(phase, "run", "reported", episodes, why))

    findings.sort(key=lambda f: (f.phase != Phase.TRAIN.value, f.phase, KIND_ORDER.get(f.kind, 9), f.key, _SEVERITY.index(f.verdict)))
    table = table.reset_index(drop=True)
    iterations, notes = dashboard_rows(run)
    dashboard = tuple(audit_dashboard(run, table, atol=atol, rtol=rtol, iterations=iterations))
    return Audit(run.path, run.name, run.manifest, tuple(findings), table, dashboard, tuple(notes))


def _finding(phase: str, kind: str, key: str, rows: pd.DataFrame, max_evidence: int) -> Finding:
    rows = rows.assign(episode=rows["runner_id"] + "|" + rows["episode_id"])
    # Since issue 8 the label and message follow the majority rule: built by the same
    # helper as the columnar compare (this reference checks the numbers, not the wording).
    from reward_audit.compare import summarize

    counts = rows.groupby("verdict")["episode"].nunique().to_dict()
    episodes = rows["episode"].nunique()
    truth, reported = float(rows["truth"].mean()), float(rows["reported"].mean())
    bad = rows[rows["verdict"] != Verdict.CLEAN.value]
    if not len(bad):
        worst = Verdict.CLEAN
        message = f"{plural(episodes, 'episode')} " + ("agrees" if episodes == 1 else "agree")  # issue 12 wording
        evidence: tuple[Evidence, ...] = ()
    else:
        multi = int((bad["chunks"] > 1).sum())
        clean_multi = int(((rows["verdict"] == Verdict.CLEAN.value) & (rows["chunks"] > 1)).sum())
        ordered = bad.reindex(bad["difference"].abs().sort_values(ascending=False).index)
        worst, counts, message = summarize(ordered, episodes, counts.get(Verdict.CLEAN.value, 0), len(bad), multi, clean_multi, truth, reported)
        worst = Verdict(worst.value)
        top = bad.reindex(bad["difference"].abs().sort_values(ascending=False).index).head(max_evidence)
        evidence = tuple(
            Evidence(
                episode_id=r.episode_id,
                runner_id=r.runner_id,
                chunks=int(r.chunks),
                truth=float(r.truth),
                reported=float(r.reported),
                difference=float(r.difference),
                verdict=Verdict(r.verdict),
                explanation=r.explanation,
                agent_id=None if kind in (Kind.AGENT.value, Kind.EPISODE.value) else r.agent_id,
            )
            for r in top.itertuples(index=False)
        )
    difference = 0.0 if worst == Verdict.CLEAN else reported - truth  # issue 12: a CLEAN row shows 0
    return Finding(phase, kind, str(key), worst, episodes, truth, reported, difference, message, counts, evidence)


def _unverified(phase: str, kind: str, key: str, episodes: int, why: str) -> Finding:
    return Finding(phase, kind, key, Verdict.UNVERIFIED, episodes, None, None, None, why)


def _excluded(truth: pd.DataFrame, table: pd.DataFrame) -> list[Finding]:
    """Rewards paid before / with an agent's first observation, in reported episodes."""
    reported_eps = set(zip(table["runner_id"], table["episode_id"])) if len(table) else set()
    t = truth.loc[np.array([k in reported_eps for k in zip(truth["runner_id"], truth["episode_id"])], dtype=bool)]
    t = t[t["n_pre_obs"] > 0]
    out = []
    for (phase, agent), rows in t.groupby(["phase", "agent_id"]):
        n_eps, total, n = rows["episode_id"].nunique(), float(rows["pre_obs"].sum()), int(rows["n_pre_obs"].sum())
        if total == 0.0:  # issue 12: zero-amount excluded rewards are no finding
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


def _incomplete(truth: pd.DataFrame, table: pd.DataFrame, max_evidence: int) -> list[Finding]:
    reported_eps = set(zip(table["runner_id"], table["episode_id"])) if len(table) else set()
    eps = truth.drop_duplicates(["runner_id", "episode_id"])
    eps = eps.loc[np.array([k not in reported_eps for k in zip(eps["runner_id"], eps["episode_id"])], dtype=bool)]
    out = []
    for phase, rows in eps.groupby("phase"):
        cut, finished = rows[~rows["episode_done"]], rows[rows["episode_done"]]
        parts = []
        if len(cut):
            parts.append(f"{len(cut)} never finished (cut by a reset, or still running when the run stopped)")
        if len(finished):
            parts.append(f"{len(finished)} finished but RLlib reported no value for them (e.g. {', '.join(finished['episode_id'].head(3))})")
        out.append(
            Finding(
                phase, Kind.EPISODE.value, "unreported", Verdict.INCOMPLETE, len(rows), None, None, None,
                f"{plural(len(rows), 'episode')} " + ("has" if len(rows) == 1 else "have") + " raw rewards but no report: " + "; ".join(parts),
                {"cut": len(cut), "finished": len(finished)},
            )
        )
    return out
