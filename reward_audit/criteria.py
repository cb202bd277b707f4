"""What makes an audit fail: ``Criteria`` (``fail_on``, ``allow``, ``phases``,
``allow_unverified``), and the parsing of its options from text — one place for the CLI's
``--fail-on`` / ``--allow`` / ``--phase`` / ``--allow-unverified``, the pytest plugin's
``--reward-audit-*`` options and ``assert_no_leakage(...)``, so they always agree.

    >>> Criteria(fail_on=parse_fail_on("leak,drop"), allow=["learning:module:p1"], phases=["learning"])
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from .audit import FAILURES, Finding, Verdict
from .schema import Kind, Phase

if TYPE_CHECKING:
    from .audit import Audit

__all__ = ["Criteria", "Unverified", "parse_allow", "parse_fail_on", "PHASES", "KINDS"]

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


def parse_fail_on(text: str, option: str = "--fail-on") -> frozenset[Verdict]:
    """``"leak,drop"`` (any case, commas, spaces) -> the verdicts; ``ValueError`` with the
    fix (naming ``option``) for an empty list — it would make every audit pass — or an
    unknown verdict."""
    names = [v.strip().upper() for v in text.split(",") if v.strip()]
    if not names:
        raise ValueError(f"{text!r}: name at least one verdict, e.g. `{option} leak,drop,mismatch`")
    unknown = [n for n in names if n not in Verdict.__members__]
    if unknown:
        raise ValueError(f"{text!r}: {', '.join(unknown)} is not a verdict; use a comma-separated list of {', '.join(v.value.lower() for v in Verdict)}")
    return frozenset(Verdict(n) for n in names)


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

    def __post_init__(self) -> None:
        """Accept any iterables, and verdicts by name in any case (``"leak,drop"`` too); a
        ``ValueError`` that says the fix for an unknown verdict, phase or ``allow`` entry."""
        allow = (self.allow,) if isinstance(self.allow, str) else tuple(self.allow)
        phases = None if self.phases is None else ((self.phases,) if isinstance(self.phases, str) else tuple(self.phases))
        for phase in phases or ():
            if phase not in PHASES:
                raise ValueError(f"{phase!r}: not a phase; use one of {', '.join(PHASES)}")
        fail_on = [self.fail_on] if isinstance(self.fail_on, str) else self.fail_on  # "leak,drop" as the CLI takes it
        object.__setattr__(self, "fail_on", frozenset(x for v in fail_on for x in (parse_fail_on(v) if isinstance(v, str) else [Verdict(v)])))
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
