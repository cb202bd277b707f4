"""The bottom line of an audit: one answer to each of two questions (docs/learning.md).

* **metrics** — were the numbers RLlib reported right? (phases ``train`` and ``evaluation``)
* **training batches** — were the modules trained on the right rewards? (phase ``learning``)

Every output reads it from here: the text, Markdown and HTML reports print ``text``; the
JSON document carries ``to_dict`` per run (``null`` for a run without training batches)::

    >>> BottomLine.of(audit).to_dict()
    {'metrics': {'phases': ['train', 'evaluation'], 'verdict': 'LEAK', 'wrong': True, 'failing': True},
     'training_batches': {'phases': ['learning'], 'verdict': 'CLEAN', 'wrong': False, 'failing': False},
     'text': 'metrics: LEAK · training batches: CLEAN — the policies were trained on the right rewards; only the reported numbers are wrong'}

``verdict`` and ``wrong`` state what was found (the most severe failing verdict, else CLEAN,
else the most severe warning; ``null`` when the side recorded nothing); ``failing`` says
whether that side fails under the ``Criteria`` of the invocation (``--allow``, ``--phase``,
``--fail-on``), as each finding's ``failing`` flag does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .audit import Finding, Verdict
from .criteria import Criteria
from .schema import Phase

if TYPE_CHECKING:
    from .audit import Audit

__all__ = ["BottomLine", "Side", "bottom_line"]

_ANSWERS = {  # (metrics wrong, training batches wrong) -> the answer; docs/learning.md's table
    (False, False): "the reported numbers and the training data both match what the env paid",
    (True, False): "the policies were trained on the right rewards; only the reported numbers are wrong",
    (False, True): "the policies were trained on wrong rewards, though the reported numbers look right",
    (True, True): "both the reported numbers and the training data are wrong",
}


@dataclass(frozen=True)
class Side:
    """One question's findings: ``metrics`` (train + evaluation) or ``training batches`` (learning)."""

    name: str
    phases: tuple[str, ...]
    findings: tuple[Finding, ...]

    @property
    def verdict(self) -> Verdict | None:
        """The most severe failing verdict, else CLEAN if any key is clean, else the most
        severe warning; ``None`` when nothing was recorded for this side."""
        if not self.findings:
            return None
        verdicts = [f.verdict for f in self.findings]
        failing = [v for v in verdicts if v.failing]
        if failing:
            return min(failing, key=lambda v: v.severity)
        if Verdict.CLEAN in verdicts:
            return Verdict.CLEAN
        return min(verdicts, key=lambda v: v.severity)

    @property
    def wrong(self) -> bool:
        """A failing verdict (LEAK / DROP / MISMATCH) among this side's findings."""
        return any(f.verdict.failing for f in self.findings)

    @property
    def judged(self) -> bool:
        """Known to be right or wrong (not only warnings, not unrecorded)."""
        return self.wrong or self.verdict is Verdict.CLEAN

    def failing(self, criteria: Criteria | None = None) -> bool:
        """A finding of this side fails under ``criteria`` (allowed or unchecked ones do not)."""
        criteria = criteria or Criteria()
        return any(criteria.fails(f) for f in self.findings)

    def label(self) -> str:
        return self.verdict.value if self.verdict else "not recorded"

    def to_dict(self, criteria: Criteria | None = None) -> dict[str, Any]:
        return {"phases": list(self.phases), "verdict": self.verdict and self.verdict.value, "wrong": self.wrong, "failing": self.failing(criteria)}


@dataclass(frozen=True)
class BottomLine:
    metrics: Side
    training_batches: Side

    @classmethod
    def of(cls, audit: Audit) -> BottomLine | None:
        """``None`` for a run without training batches recorded (no ``learning`` finding)."""
        metrics = (Phase.TRAIN.value, Phase.EVALUATION.value)
        learning = (Phase.LEARNING.value,)
        if not any(f.phase in learning for f in audit.findings):
            return None
        return cls(
            Side("metrics", metrics, tuple(f for f in audit.findings if f.phase in metrics)),
            Side("training batches", learning, tuple(f for f in audit.findings if f.phase in learning)),
        )

    @property
    def head(self) -> str:
        """``metrics: LEAK · training batches: CLEAN`` (the Audit's ``repr`` shows this)."""
        return f"{self.metrics.name}: {self.metrics.label()} · {self.training_batches.name}: {self.training_batches.label()}"

    @property
    def text(self) -> str:
        """``head`` and what it means; when one side could not be judged, only what is known."""
        m, t = self.metrics, self.training_batches
        if m.judged and t.judged:
            return f"{self.head} — {_ANSWERS[(m.wrong, t.wrong)]}"
        if t.wrong:
            return f"{self.head} — the policies were trained on wrong rewards"
        if m.wrong:
            return f"{self.head} — the reported numbers are wrong"
        return self.head

    def to_dict(self, criteria: Criteria | None = None) -> dict[str, Any]:
        """The run's ``bottom_line`` in the JSON document."""
        return {"metrics": self.metrics.to_dict(criteria), "training_batches": self.training_batches.to_dict(criteria), "text": self.text}


def bottom_line(audit: Audit) -> str | None:
    """One line on both questions, or None for a run without training batches recorded::

    metrics: LEAK · training batches: CLEAN — the policies were trained on the right rewards; only the reported numbers are wrong
    """
    line = BottomLine.of(audit)
    return line.text if line else None
