"""The result types of an audit: ``Verdict``, ``Evidence``, ``Finding``, ``Audit``.

    >>> audit = reward_audit.compare("runs/PPO_trial_0")
    >>> audit.ok, [str(f) for f in audit.failures()]
    (False, ['train module p0: LEAK — LEAK in 6/14 episodes (mean truth 30, reported 230) ...'])
    >>> audit.to_frame()           # one row per finding
    >>> audit.episodes             # one row per compared (episode, kind, key); read on demand
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pandas as pd


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
SEVERITY = [Verdict.LEAK, Verdict.DROP, Verdict.MISMATCH, Verdict.UNVERIFIED, Verdict.INCOMPLETE, Verdict.EXCLUDED, Verdict.CLEAN]


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
    """The result of ``compare``: every finding, the rebuilt dashboards, and (read on
    demand, for small runs) the per-episode comparison table ``episodes``."""

    path: str
    name: str
    manifest: dict[str, Any]
    findings: tuple[Finding, ...]
    episodes_loader: Callable[[], pd.DataFrame] | None = field(default=None, repr=False)
    dashboard: tuple = ()  # DashboardSeries: what train()/Tune/TensorBoard showed, rebuilt
    notes: tuple[str, ...] = ()  # where the dashboard numbers came from, Tune cross-check
    stats: dict[str, Any] = field(default_factory=dict)  # rows read, windows, seconds

    @property
    def episodes(self) -> pd.DataFrame:
        """One row per compared (episode, kind, key) with truth, reported, verdict and
        explanation. Built on demand from the run folder (one row per reported value: keep
        it for runs that fit in memory)."""
        cache = self.__dict__.get("_episodes")
        if cache is None:
            cache = self.episodes_loader() if self.episodes_loader is not None else pd.DataFrame()
            object.__setattr__(self, "_episodes", cache)
        return cache

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
