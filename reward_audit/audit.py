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
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pandas as pd

from .schema import Kind, Phase


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


# --------------------------------------------------------------------------- what fails

PHASES = tuple(p.value for p in Phase)
KINDS = tuple(k.value for k in Kind)
_PHASE_REASON = re.compile(r"nothing verified in phase (\S+?):")


def parse_allow(entry: str) -> tuple[str | None, str, str]:
    """``"phase:kind:key"`` or ``"kind:key"`` -> ``(phase or None, kind, key)``. A key may
    hold colons: the first field is a phase only when it names one (phases and kinds are
    disjoint), so ``"module:a:b"`` is module ``a:b`` in every phase."""
    parts = entry.split(":", 2)
    if len(parts) == 3 and parts[0] in PHASES and parts[1] in KINDS and parts[2]:
        return parts[0], parts[1], parts[2]
    kind, _, key = entry.partition(":")
    if kind in KINDS and key:
        return None, kind, key
    raise ValueError(
        f"{entry!r}: an allowed finding is `kind:key` or `phase:kind:key`, e.g. `module:frozen_snapshot` or "
        f"`train:policy:p1` (kinds: {', '.join(KINDS)}; phases: {', '.join(PHASES)})"
    )


def _names(entry: tuple[str | None, str, str], finding: Finding) -> bool:
    phase, kind, key = entry
    return (phase is None or phase == finding.phase) and (kind, key) == (finding.kind, finding.key)


def _reason_phase(reason: str) -> str | None:
    """The phase a ``nothing_verified`` reason is about; ``None``: the whole run."""
    m = _PHASE_REASON.match(reason)
    return m.group(1) if m else None


@dataclass(frozen=True)
class Unverified:
    """A run or phase in which nothing could be verified, and whether it fails under a ``Criteria``."""

    reason: str
    phase: str | None  # None: the whole run
    failing: bool

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "reason": self.reason, "failing": self.failing}


@dataclass(frozen=True)
class Criteria:
    """What makes an audit fail. One object decides the CLI's exit code and its ``--fail-on``,
    ``--allow``, ``--phase``, ``--allow-unverified``, ``assert_no_leakage(fail_on=, allow=,
    phases=, allow_unverified=)``, the ``ok`` / ``failing`` fields of the JSON and the
    summary line of every rendering — so they always agree.

    * A finding fails when its verdict is in ``fail_on``, its phase is checked (``phases``;
      ``None``: every phase) and no ``allow`` entry (``"kind:key"`` or
      ``"phase:kind:key"``) names it.
    * Fail closed: a run, or a checked phase, where nothing could be verified fails unless
      ``allow_unverified`` — including a phase asked for in ``phases`` that the run has no
      finding in (``phases=["evaluation"]`` on a run without evaluation checks nothing).

        >>> Criteria(allow=["module:frozen"], phases=["train"]).passes(audit)
    """

    fail_on: frozenset[Verdict] = FAILURES
    allow: tuple[str, ...] = ()
    phases: tuple[str, ...] | None = None
    allow_unverified: bool = False

    def __post_init__(self) -> None:  # accept any iterables and verdict names in any case
        allow = (self.allow,) if isinstance(self.allow, str) else tuple(self.allow)
        phases = None if self.phases is None else ((self.phases,) if isinstance(self.phases, str) else tuple(self.phases))
        for phase in phases or ():
            if phase not in PHASES:
                raise ValueError(f"{phase!r}: not a phase; use one of {', '.join(PHASES)}")
        object.__setattr__(self, "fail_on", frozenset(Verdict(v.upper()) if isinstance(v, str) else Verdict(v) for v in self.fail_on))
        object.__setattr__(self, "allow", allow)
        object.__setattr__(self, "phases", phases)
        object.__setattr__(self, "_allowed", tuple(parse_allow(a) for a in allow))

    def checks(self, phase: str) -> bool:
        return self.phases is None or phase in self.phases

    def allows(self, finding: Finding) -> bool:
        return any(_names(entry, finding) for entry in self._allowed)

    def fails(self, finding: Finding) -> bool:
        return finding.verdict in self.fail_on and self.checks(finding.phase) and not self.allows(finding)

    def failing(self, audit: Audit) -> list[Finding]:
        return [f for f in audit.findings if self.fails(f)]

    def ignored(self, audit: Audit) -> list[Finding]:
        """Findings with a failing verdict that do not fail: allowed, or outside ``phases``."""
        return [f for f in audit.findings if f.verdict in self.fail_on and not self.fails(f)]

    def unverified(self, audit: Audit) -> list[Unverified]:
        """Every reason nothing could be verified (the run's own, and a checked phase the run
        has no finding in), each with whether it fails."""
        out = [Unverified(r, p, not self.allow_unverified and (p is None or self.checks(p))) for r in audit.nothing_verified for p in [_reason_phase(r)]]
        if audit.findings or not audit.nothing_verified:  # an empty run already says so, once
            seen = {f.phase for f in audit.findings} | {u.phase for u in out}
            for phase in self.phases or ():
                if phase not in seen:
                    why = f"nothing verified in phase {phase}: the run recorded nothing in this phase, and the check was limited to it"
                    out.append(Unverified(why, phase, not self.allow_unverified))
        return out

    def passes(self, audit: Audit) -> bool:
        return not self.failing(audit) and not any(u.failing for u in self.unverified(audit))

    def unused_allow(self, audits: Iterable[Audit]) -> list[str]:
        """``allow`` entries that name no finding of ``audits`` (a typo, or a fixed bug)."""
        findings = [f for a in audits for f in a.findings]
        return [text for text, entry in zip(self.allow, self._allowed) if not any(_names(entry, f) for f in findings)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "fail_on": sorted(v.value for v in self.fail_on),
            "allow": list(self.allow),
            "phases": None if self.phases is None else list(self.phases),
            "allow_unverified": self.allow_unverified,
        }


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
        criteria = criteria or Criteria()
        m = self.manifest
        return {
            "run": self.path,
            "name": self.name,
            "ray_version": m.get("ray_version"),
            "api_stack": m.get("api_stack"),
            "adapter": m.get("adapter"),
            "injected_fault": m.get("injected_fault"),
            "ok": criteria.passes(self),
            "counts": self.counts(),
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
        """One line: ``<Audit PPO_trial_0: 5 CLEAN, 4 LEAK — ok=False>``."""
        counts = ", ".join(f"{n} {v}" for v, n in self.counts().items())
        return f"<Audit {self.name!r}: {counts or 'no findings'}{', nothing verified' if self.nothing_verified else ''} — ok={self.ok}>"

    def _repr_html_(self) -> str:
        """Jupyter: the report's section for this run, without plots (``render_html`` has them)."""
        from .report import html_fragment

        return html_fragment(self)
