"""Rendering an ``Audit``: a short terminal table (one line per finding, ``verbose`` adds
the evidence) and JSON for machines. Pure functions returning strings.

Sample terminal output (``reward-audit compare``)::

    == PPO_ScaledRewardsEnv_3f2a (Ray 2.60.0, new API stack, adapter new-stack-2.4x+)
    phase       kind     key       episodes        truth     reported         diff  verdict
    train       module   p0              14           30           30            0  CLEAN
    ...
    3 CLEAN, 1 EXCLUDED — no failures
"""

from __future__ import annotations

import json
from typing import Iterable

from .compare import Audit, Finding, Verdict


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.6g}"


def _header(audit: Audit) -> str:
    m = audit.manifest
    fault = f" [SELF-TEST: fault {m['injected_fault']!r} injected]" if m.get("injected_fault") else ""
    return f"== {audit.name} (Ray {m.get('ray_version', '?')}, {m.get('api_stack', '?')} API stack, adapter {m.get('adapter', '?')}){fault} — {audit.path}"


def render_table(findings: Iterable[Finding]) -> list[str]:
    rows = [("phase", "kind", "key", "episodes", "truth", "reported", "diff", "verdict")]
    for f in findings:
        rows.append((f.phase, f.kind, f.key, str(f.episodes), _num(f.truth), _num(f.reported), _num(f.difference), f.verdict.value))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {3, 4, 5, 6}
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def render_text(audit: Audit, *, verbose: bool = False, fail_on: Iterable[Verdict] | None = None) -> str:
    lines = [_header(audit)]
    lines += render_table(audit.findings)
    notable = [f for f in audit.findings if f.verdict != Verdict.CLEAN]
    if notable:
        lines.append("")
    for f in notable:
        lines.append(f"{f.verdict.value:<10} {f.phase} {f.kind} {f.key}: {f.message}")
        if verbose and f.attribution:
            lines.append(f"           attribution: {f.attribution}")
        if verbose:
            for e in f.evidence:
                who = f" agent {e.agent_id}," if e.agent_id else ""
                lines.append(
                    f"           episode {e.episode_id} (runner {e.runner_id},{who} {e.chunks} chunks): truth {e.truth:.6g}, "
                    f"reported {e.reported:.6g}, diff {e.difference:+.6g} — {e.explanation}"
                )
    off = [d for d in audit.dashboard if d.wrong_iterations or d.unreconstructable]
    if off:
        lines.append("")
        lines.append("dashboards (the train() result / Tune / TensorBoard, rebuilt from the truth):")
        lines += [f"  {d.summary()}" for d in off]
    elif audit.dashboard:
        lines.append(f"dashboards: all {len(audit.dashboard)} recorded series match the truth")
    if notable and not verbose and any(f.evidence for f in notable):
        lines.append("(`--verbose` shows the episodes that prove each finding)")
    counts = audit.counts()
    summary = ", ".join(f"{n} {v}" for v, n in sorted(counts.items(), key=lambda kv: [x.value for x in Verdict].index(kv[0])))
    failures = audit.failures(fail_on) if fail_on is not None else audit.failures()
    lines.append(f"{summary} — " + (f"{len(failures)} failing" if failures else "no failures"))
    return "\n".join(lines)


def render_json(audits: list[Audit], *, fail_on: Iterable[Verdict] | None = None) -> str:
    """One JSON document: a list of verdict objects, each with its run."""
    out = []
    for audit in audits:
        d = audit.to_dict()
        for f in d["findings"]:
            out.append({"run": d["run"], "name": d["name"], "ray_version": d["ray_version"], "api_stack": d["api_stack"], **f})
    return json.dumps(out, indent=2, allow_nan=False)
