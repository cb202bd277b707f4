"""The result types of an audit: ``Verdict``, ``Evidence``, ``Finding``, ``Audit``. What
makes one fail (``Criteria``) is in criteria.py; its one-line answer in bottom_line.py.

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
from typing import TYPE_CHECKING, Any, Callable, Iterable

import pandas as pd

if TYPE_CHECKING:
    from .criteria import Criteria


@dataclass(frozen=True)
class _VerdictData:
    failing: bool  # makes the exit code 1 by default
    severity: int  # 0 = worst; a finding's order among several for one key
    meaning: str  # one line, rendered into docs/verdicts.md and the README's table
    color: str  # in the HTML report


class Verdict(str, enum.Enum):
    """What a finding says. Each verdict carries its own data (``failing``, ``warning``,
    ``severity``, ``meaning``, ``color``); every module reads it from here."""

    CLEAN = "CLEAN"
    LEAK = "LEAK"
    DROP = "DROP"
    MISMATCH = "MISMATCH"
    EXCLUDED = "EXCLUDED"
    INCOMPLETE = "INCOMPLETE"
    UNVERIFIED = "UNVERIFIED"

    @property
    def data(self) -> _VerdictData:
        return _DATA[self]

    @property
    def failing(self) -> bool:
        return self.data.failing

    @property
    def warning(self) -> bool:
        return self is not Verdict.CLEAN and not self.failing

    @property
    def severity(self) -> int:
        return self.data.severity

    @property
    def meaning(self) -> str:
        return self.data.meaning

    @property
    def is_failure(self) -> bool:  # the name earlier versions used
        return self.failing


_DATA = {
    Verdict.LEAK: _VerdictData(True, 0, "the reported value includes rewards of agents not mapped to this module / agent (the excess is other agents' rewards)", "#b00020"),
    Verdict.DROP: _VerdictData(True, 1, "the reported value misses rewards of its own agents", "#b00020"),
    Verdict.MISMATCH: _VerdictData(True, 2, "disagrees, and no combination of agents' rewards explains it (or one that adds some agents' rewards and misses others'; or a non-finite value)", "#b00020"),
    Verdict.UNVERIFIED: _VerdictData(False, 3, "not enough data to judge this key; the message says why (a run or phase where nothing at all could be verified fails)", "#8a6d00"),
    Verdict.INCOMPLETE: _VerdictData(False, 4, "episodes with raw rewards but no report (cut by a reset, unfinished at the end), or rows lost on the way to the run folder (a crashed runner, a lost hand-over, a deleted part, a full buffer): named, never judged", "#8a6d00"),
    Verdict.EXCLUDED: _VerdictData(False, 5, "rewards paid before / with an agent's first observation, which RLlib by design never counts (shown with amounts)", "#8a6d00"),
    Verdict.CLEAN: _VerdictData(False, 6, "every checked episode agrees (float rounding only)", "#1b7f3b"),
}
FAILURES = frozenset(v for v in Verdict if v.failing)
SEVERITY = sorted(Verdict, key=lambda v: v.severity)


def verdict_table() -> str:
    """The verdict table of docs/verdicts.md (generated from the enum)."""
    lines = ["| verdict | fails? | meaning |", "| --- | --- | --- |"]
    lines += [f"| {v.value} | {'yes' if v.failing else ('no' if v is Verdict.CLEAN else 'warning')} | {v.meaning} |" for v in SEVERITY]
    return "\n".join(lines)


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
        """JSON-safe: a non-finite number becomes ``null`` (the explanation names it)."""
        out = {**self.__dict__, "verdict": self.verdict.value}
        for name in ("truth", "reported", "difference"):
            out[name] = _json_number(out[name])
        return out


@dataclass(frozen=True, repr=False)
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

    def __repr__(self) -> str:
        """One line; the message, counts and evidence are in ``str()`` / ``to_dict()``."""
        numbers = "".join(f", {name} {_short(getattr(self, name))}" for name in ("truth", "reported", "difference") if getattr(self, name) is not None)
        return f"<Finding {self.phase} {self.kind} {self.key!r}: {self.verdict.value}, {plural(self.episodes, 'episode')}{numbers}, {plural(len(self.evidence), 'evidence row')}>"

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


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 episode``, ``2 episodes``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _json_number(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def _short(x: float) -> str:
    return f"{x + 0.0:.6g}"


_MOVED = {"Criteria", "Unverified", "parse_allow", "parse_fail_on", "PHASES", "KINDS"}  # now in criteria.py


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from . import criteria

        return getattr(criteria, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True, eq=False, repr=False)
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
    nothing_verified: tuple[str, ...] = ()  # "nothing verified: …why", per run or phase: fails unless allowed

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
        return [f for f in self.findings if f.verdict.warning]

    def passes(
        self, fail_on: Iterable[Verdict | str] = FAILURES, *, allow_unverified: bool = False, allow: Iterable[str] = (), phases: Iterable[str] | None = None
    ) -> bool:
        """No failing finding, and (unless ``allow_unverified``) something was verified; see
        ``Criteria`` for ``allow`` and ``phases``."""
        from .criteria import Criteria

        return Criteria(fail_on=fail_on, allow=allow, phases=phases, allow_unverified=allow_unverified).passes(self)

    @property
    def ok(self) -> bool:
        """Fail closed: a run where nothing could be verified is not ok."""
        return self.passes()

    def counts(self) -> dict[str, int]:
        """Findings per verdict, in the enum's order (CLEAN first)."""
        verdicts = [f.verdict for f in self.findings]
        return {v.value: verdicts.count(v) for v in Verdict if v in verdicts}

    def to_frame(self) -> pd.DataFrame:
        rows = [{k: v for k, v in f.to_dict().items() if k != "evidence"} for f in self.findings]
        return pd.DataFrame(rows, columns=["phase", "kind", "key", "verdict", "episodes", "truth", "reported", "difference", "message", "counts"])

    def dashboard_frame(self) -> pd.DataFrame:
        """Every rebuilt dashboard series in one long table, one row per (series, iteration):

        ``phase, path, kind, key, iteration, displayed`` (what RLlib showed), ``rebuilt``
        (RLlib's own per-episode values through the window model: proves the model),
        ``expected`` (the truth through the same window), ``low, high`` (the truth's range
        over the iteration's episodes), ``difference`` (displayed − expected), ``model_ok``,
        ``agrees`` and ``status``: ``match``, ``off`` (the dashboard was wrong) or
        ``bounded`` (the model could not rebuild RLlib's number; only ``low..high`` holds).
        """
        columns = ["phase", "path", "kind", "key", "iteration", "displayed", "rebuilt", "expected", "low", "high", "difference", "model_ok", "agrees", "status"]
        frames = [d.table.assign(phase=d.phase, path=d.path, kind=d.kind, key=d.key) for d in self.dashboard]
        if not frames:
            return pd.DataFrame(columns=columns)
        out = pd.concat(frames, ignore_index=True)
        out["status"] = "match"
        out.loc[out["model_ok"] & ~out["agrees"], "status"] = "off"
        out.loc[~out["model_ok"], "status"] = "bounded"
        return out[columns]

    def to_dict(self, criteria: Criteria | None = None) -> dict[str, Any]:
        """JSON-safe: the run's object in ``reward-audit compare --format json`` (its
        ``runs`` list). ``ok`` and each finding's ``failing`` follow ``criteria`` (default:
        fail on LEAK / DROP / MISMATCH, and when nothing could be verified)."""
        from .bottom_line import BottomLine
        from .criteria import Criteria

        criteria = criteria or Criteria()
        m = self.manifest
        line = BottomLine.of(self)
        return {
            "run": self.path,
            "name": self.name,
            "ray_version": m.get("ray_version"),
            "api_stack": m.get("api_stack"),
            "adapter": m.get("adapter"),
            "injected_fault": m.get("injected_fault"),
            "ok": criteria.passes(self),
            "counts": self.counts(),
            "bottom_line": line and line.to_dict(criteria),  # bottom_line.py; null without training batches
            "findings": [{**f.to_dict(), "failing": criteria.fails(f)} for f in self.findings],
            "nothing_verified": [u.to_dict() for u in criteria.unverified(self)],
            "dashboards": [
                {
                    "phase": d.phase,
                    "path": d.path,
                    "kind": d.kind,
                    "key": d.key,
                    "iterations": len(d.table),
                    "wrong_iterations": d.wrong_iterations,
                    "first_wrong": d.first_wrong,
                    "unreconstructable_iterations": d.unreconstructable,
                    "summary": d.summary(),
                }
                for d in self.dashboard
            ],
            "notes": list(self.notes),
        }

    # ----------------------------------------------------------------------- notebooks

    def __repr__(self) -> str:
        """One line: ``<Audit PPO_trial_0: 5 CLEAN, 4 LEAK — ok=False>``; with training batches
        recorded, ``<Audit …: 6 CLEAN, 1 LEAK, 1 DROP; metrics: CLEAN · training batches: LEAK — ok=False>``."""
        from .bottom_line import BottomLine

        counts = ", ".join(f"{n} {v}" for v, n in self.counts().items())
        line = BottomLine.of(self)
        head = f"; {line.head}" if line else ""
        return f"<Audit {self.name!r}: {counts or 'no findings'}{', nothing verified' if self.nothing_verified else ''}{head} — ok={self.ok}>"

    def _repr_html_(self) -> str:
        """Jupyter: the report's section for this run, without plots (``render_html`` has them)."""
        from .report import html_fragment

        return html_fragment(self)
