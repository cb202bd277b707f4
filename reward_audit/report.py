"""Rendering an ``Audit``: a short terminal table (one line per finding, ``verbose`` adds
the evidence), JSON for machines, and Markdown / self-contained HTML documents (one
section per run). Pure functions returning strings; ``render(fmt, audits)`` picks one.
Every rendering says what fails as one ``Criteria`` decides (``--fail-on``, ``--allow``,
``--phase``, ``--allow-unverified``), the same object that decides the exit code.

Sample terminal output (``reward-audit compare``)::

    == PPO_ScaledRewardsEnv_3f2a (Ray 2.60.0, new API stack, adapter new-stack-2.4x+)
    phase       kind     key       episodes        truth     reported         diff  verdict
    train       module   p0              14           30           30            0  CLEAN
    ...
    3 CLEAN, 1 EXCLUDED — no failures

Every string that comes from the data (agent / module ids, episode and runner ids, paths,
messages that quote them) passes through one escaping helper per output format:
``visible`` (terminal, plot labels), ``md_text`` / ``md_code`` (Markdown), ``html_text``
(HTML); JSON is escaped by ``json.dumps``. An id like ``"a\\n3 CLEAN — no failures"``
is shown as ``a\\n3 CLEAN — no failures`` on one line, never as a forged line.
"""

from __future__ import annotations

import html
import json
from typing import Any, Callable, Iterable, Sequence

from .audit import Audit, Finding, Verdict, plural
from .criteria import Criteria
from .bottom_line import bottom_line

FORMATS = ("text", "json", "md", "html")
PLOTS_HINT = 'Plots need matplotlib: `pip install "reward_audit[report]"`.'

# --------------------------------------------------------------------------- escaping, one helper per format


def visible(text: object) -> str:
    """Terminal text and plot labels: every control or invisible character (newline, tab,
    ESC, bidi overrides, non-ASCII spaces) shown as its Python escape (``\\n``, ``\\x1b``,
    ``\\u202e``), so data can never start a line, move the cursor or recolour the terminal."""
    s = str(text)
    return s if s.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


_MD = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", **{c: "\\" + c for c in "\\`*[]|~"}})


def md_text(text: object) -> str:
    """Markdown prose and table cells: one line (``visible``), HTML characters as entities,
    Markdown punctuation (pipes, backticks, ``*``, links) backslash-escaped. ``_`` is left
    alone: GitHub never emphasises inside a word, and ``policy_reward_mean`` stays readable."""
    return visible(text).translate(_MD)


def md_code(text: object) -> str:
    """An id as Markdown code: a plain code span when nothing in it is special, else an
    HTML ``<code>`` element with escaped content (a code span cannot hold a pipe inside a
    table, and would show ``<script>`` raw in the file)."""
    s = visible(text)
    return f"<code>{md_text(s)}</code>" if any(c in s for c in '`|<>&"') else f"`{s}`"


def html_text(text: object) -> str:
    """HTML text and attribute values (quotes escaped too), control characters visible."""
    return html.escape(visible(text))


# --------------------------------------------------------------------------- terminal and JSON


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x + 0.0:.6g}"  # + 0.0: never "-0"


def _header_text(audit: Audit) -> str:
    m = audit.manifest
    fault = f" [SELF-TEST: fault {m['injected_fault']!r} injected]" if m.get("injected_fault") else ""
    return f"{audit.name} (Ray {m.get('ray_version', '?')}, {m.get('api_stack', '?')} API stack, adapter {m.get('adapter', '?')}){fault} — {audit.path}"


def _header(audit: Audit) -> str:
    return f"== {_header_text(audit)}"


def _summary(audit: Audit, criteria: Criteria | None = None) -> str:
    """``5 CLEAN, 4 LEAK — 4 failing``: counts per verdict (most severe last, as the enum
    lists them), then what fails under ``criteria``, and what it lets pass."""
    criteria = criteria or Criteria()
    order = [v.value for v in Verdict]
    counts = sorted(audit.counts().items(), key=lambda kv: order.index(kv[0]))
    summary = ", ".join(f"{n} {v}" for v, n in counts)
    failing = criteria.failing(audit)
    state = f"{len(failing)} failing" if failing else "no failures"
    ignored = criteria.ignored(audit)
    unchecked = sum(not criteria.checks(f.phase) for f in ignored)
    if ignored:
        why = [f"{len(ignored) - unchecked} allowed"] * (len(ignored) > unchecked) + [f"{unchecked} in phases not checked"] * (unchecked > 0)
        state += f" ({' and '.join(why)})"
    unverified = criteria.unverified(audit)
    if any(u.failing for u in unverified):
        state += ", NOTHING VERIFIED — fails; `--allow-unverified` accepts it"
    elif unverified:
        state += ", NOTHING VERIFIED" + (" (allowed by --allow-unverified)" if criteria.allow_unverified else " in phases not checked")
    return f"{summary or 'no findings'} — {state}"


def _primary(series: Iterable) -> list:
    """Dashboard series without RLlib's duplicate copies (Ray 2.12's ``sampler_results/``)."""
    return [d for d in series if "sampler_results/" not in d.path]


def render_table(findings: Iterable[Finding]) -> list[str]:
    rows = [("phase", "kind", "key", "episodes", "truth", "reported", "diff", "verdict")]
    for f in findings:
        rows.append((visible(f.phase), visible(f.kind), visible(f.key), str(f.episodes), _num(f.truth), _num(f.reported), _num(f.difference), f.verdict.value))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {3, 4, 5, 6}
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def render_text(audit: Audit, *, verbose: bool = False, criteria: Criteria | None = None) -> str:
    """The terminal rendering. Each entry of ``lines`` is one line: ``visible`` makes sure
    no id, path or message in it can break it into two."""
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
                    f"           episode {e.episode_id} (runner {e.runner_id},{who} {plural(e.chunks, 'chunk')}): truth {e.truth:.6g}, "
                    f"reported {e.reported:.6g}, diff {e.difference:+.6g} — {e.explanation}"
                )
    off = [d for d in audit.dashboard if d.wrong_iterations or d.unreconstructable]
    if off:
        lines.append("")
        lines.append("dashboards (the train() result / Tune / TensorBoard, rebuilt from the truth):")
        shown = off if verbose else [d for d in _primary(off) if "_mean" in d.path]
        lines += [f"  {d.summary()}" for d in shown]
        if len(shown) < len(off):
            lines.append(f"  (+{len(off) - len(shown)} more series off: min/max and duplicate copies; `--verbose` lists them)")
    elif audit.dashboard:
        lines.append(f"dashboards: all {len(audit.dashboard)} recorded series match the truth")
    lines += [f"note: {n}" for n in audit.notes]
    if notable and not verbose and any(f.evidence for f in notable):
        lines.append("(`--verbose` shows the episodes that prove each finding)")
    unverified = (criteria or Criteria()).unverified(audit)
    if unverified:
        lines.append("")
        lines += [f"{'UNVERIFIED':<10} {u.reason}" for u in unverified]
    line = bottom_line(audit)
    if line:
        lines.append(line)
    lines.append(_summary(audit, criteria))
    return "\n".join(visible(line) for line in lines)


def to_document(audits: Audit | Sequence[Audit], *, criteria: Criteria | None = None) -> dict[str, Any]:
    """The JSON document of ``--format json`` as a dict: ``ok`` (the exit code is 0 exactly
    when it is true), verdict ``counts`` over every run, the ``tool`` that made it, the
    ``criteria`` that decided what fails, and one object per run (``Audit.to_dict``) whose
    findings and ``nothing_verified`` reasons carry a ``failing`` flag."""
    from . import __version__

    audits = _as_list(audits)
    criteria = criteria or Criteria()
    runs = [a.to_dict(criteria) for a in audits]
    counts: dict[str, int] = {}
    for run in runs:
        for verdict, n in run["counts"].items():
            counts[verdict] = counts.get(verdict, 0) + n
    return {
        "ok": all(run["ok"] for run in runs),
        "counts": {v.value: counts[v.value] for v in Verdict if v.value in counts},
        "tool": {"name": "reward_audit", "version": __version__},
        "criteria": criteria.to_dict(),
        "runs": runs,
    }


def render_json(audits: Audit | Sequence[Audit], *, criteria: Criteria | None = None) -> str:
    """``to_document`` as one JSON document (no NaN literals: a non-finite number is ``null``)."""
    return json.dumps(to_document(audits, criteria=criteria), indent=2, allow_nan=False)


# --------------------------------------------------------------------------- documents

_MEANING = {
    "mean_of_episode_sums": "mean, over the episodes in RLlib's window, of a per-episode sum (for a module: over all its agents in that episode)",
    "mean_of_agent_episodes": "mean over (agent, episode) entries: a policy shared by k agents shows the per-agent mean, not the per-episode sum",
    "min_of_episode_sums": "minimum over the window's episodes",
    "max_of_episode_sums": "maximum over the window's episodes",
}
_WINDOWS = {
    "per_call_window": "each env runner keeps the last ceil(S / num_env_runners) episodes per key; every get_metrics() call reduces and clears them; "
    "an iteration shows the mean of the per-(runner, call) means — no smoothing across iterations",
    "driver_history": "the driver keeps the episode history; an iteration covers the last max(S, new episodes) episodes; "
    "evaluation covers only that evaluation's episodes",
}


def meaning_lines(audit: Audit, *, text: Callable[[object], str] = str, code: Callable[[object], str] = lambda s: f"`{s}`") -> list[str]:
    """What each reported number means for this run's Ray version and API stack (from the
    adapter's declarations recorded in the manifest). ``text`` / ``code`` format the
    manifest's values (prose / code) for a document format; the default is plain text."""
    m = audit.manifest
    S = m.get("metrics_num_episodes_for_smoothing")
    lines = [
        f"Ray {text(m.get('ray_version'))} ({text(m.get('api_stack'))} API stack), captured by adapter {code(m.get('adapter'))}.",
        f"Per-episode values: the sum over the whole episode of the rewards RLlib counts for the agent "
        f"({code('agent')}, {code('policy')} rows) or for every agent mapped to the module in that episode ({code('module')}); "
        "rewards paid before or with an agent's first observation are never counted (EXCLUDED).",
    ]
    model = m.get("smoothing_model")
    if model in _WINDOWS:
        lines.append(f"Which episodes one iteration's value covers (S = {text(S)}): {_WINDOWS[model]}.")
    for pattern, semantics in sorted((m.get("iteration_semantics") or {}).items()):
        lines.append(f"{code(pattern + '…')}: {_MEANING.get(semantics) or text(semantics)}.")
    return lines


MAX_OFF_PLOTS = 12  # series that are off, worst first
MAX_OVERVIEW_PLOTS = 4  # series that match, for orientation (episode return first)


def plotted_series(audit: Audit) -> tuple[list, int]:
    """The dashboard series a report plots — every mean series that is off (at most
    ``MAX_OFF_PLOTS``, the largest differences first) plus a bounded overview of series that
    match — and how many series are off but not plotted. A 20-policy league gets at most
    16 plots, not 40+."""
    means = [d for d in _primary(audit.dashboard) if "mean" in d.path]
    off = [d for d in means if d.wrong_iterations or d.unreconstructable]
    off.sort(key=lambda d: -float(d.table["difference"].abs().max()) if d.wrong_iterations else 0.0)
    fine = sorted((d for d in means if d not in off), key=lambda d: (d.phase != "train", d.kind != "episode", d.path))
    return off[:MAX_OFF_PLOTS] + fine[:MAX_OVERVIEW_PLOTS], max(0, len(off) - MAX_OFF_PLOTS)


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or ``None`` when matplotlib is not installed:
    plots are optional (the ``report`` extra), the HTML report then has tables only."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plots(audit: Audit) -> list[tuple[str, str]]:
    """(title, base64 PNG) per dashboard series of a module / policy / agent mean. Titles
    hold ids: shown ``visible`` and never parsed as mathtext (``$`` in an id is just ``$``)."""
    import base64
    import io

    plt = _pyplot()
    if plt is None:
        return []
    from matplotlib.ticker import MaxNLocator

    out = []
    for d in plotted_series(audit)[0]:
        t = d.table
        fig, ax = plt.subplots(figsize=(5.6, 2.6), dpi=90)
        ax.plot(t["iteration"], t["displayed"], "o-", color="tab:red", label="shown by RLlib")
        ax.plot(t["iteration"], t["expected"], "s--", color="tab:green", label="truth (same window)")
        ax.fill_between(t["iteration"], t["low"], t["high"], color="tab:green", alpha=0.12, label="truth range this iteration")
        ax.set_xlabel("training iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("return")
        ax.set_title(visible(f"{d.phase}: {d.path}"), fontsize=9, parse_math=False, usetex=False)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        out.append((f"{d.phase} {d.path}", base64.b64encode(buf.getvalue()).decode()))
    return out


def _as_list(audits: Audit | Sequence[Audit]) -> list[Audit]:
    return [audits] if isinstance(audits, Audit) else list(audits)


def _markdown_section(audit: Audit, criteria: Criteria) -> list[str]:
    lines = [f"## reward_audit: {md_text(audit.name)}", "", f"Run {md_text(_header_text(audit))}", "", f"**{md_text(_summary(audit, criteria))}**", ""]
    line = bottom_line(audit)
    lines += [f"> **Bottom line:** {md_text(line)}", ""] if line else []
    unverified = criteria.unverified(audit)
    lines += [f"- UNVERIFIED: {md_text(u.reason)}" for u in unverified] + ([""] if unverified else [])
    lines += ["| phase | kind | key | episodes | truth | reported | diff | verdict |", "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for f in audit.findings:
        lines.append(
            f"| {md_text(f.phase)} | {md_text(f.kind)} | {md_code(f.key)} | {f.episodes} | {_num(f.truth)} | {_num(f.reported)} | {_num(f.difference)} | **{f.verdict.value}** |"
        )
    notable = [f for f in audit.findings if f.verdict != Verdict.CLEAN]
    if notable:
        lines += ["", "### Findings", ""]
        for f in notable:
            lines.append(f"- **{f.verdict.value}** {md_text(f.phase)} {md_text(f.kind)} {md_code(f.key)}: {md_text(f.message)}")
            if f.attribution:
                lines.append(f"  - attribution: {md_text(f.attribution)}")
            for e in f.evidence[:3]:
                lines.append(
                    f"  - episode {md_code(e.episode_id)} ({plural(e.chunks, 'chunk')}): truth {e.truth:.6g}, reported {e.reported:.6g} — {md_text(e.explanation)}"
                )
    off = [d for d in audit.dashboard if d.wrong_iterations or d.unreconstructable]
    lines += ["", "### Dashboards", ""]
    lines += [f"- {md_text(d.summary())}" for d in off] or [f"- all {len(audit.dashboard)} recorded series match the truth"]
    if audit.notes:
        lines += ["", "### Notes", ""] + [f"- {md_text(n)}" for n in audit.notes]
    lines += ["", "### What the numbers mean", ""] + [f"- {x}" for x in meaning_lines(audit, text=md_text, code=md_code)]
    return lines


def render_markdown(audits: Audit | Sequence[Audit], *, criteria: Criteria | None = None) -> str:
    """One Markdown document for an issue tracker: a section (``## reward_audit: <run>``)
    per audited run, after a short index when there are several."""
    audits = _as_list(audits)
    criteria = criteria or Criteria()
    lines = []
    if len(audits) > 1:
        lines += [f"# reward_audit: {len(audits)} runs", ""]
        lines += [f"- {md_text(a.name)}: {md_text(_summary(a, criteria))}" for a in audits] + [""]
    for i, audit in enumerate(audits):
        lines += ([""] if i else []) + _markdown_section(audit, criteria)
    return "\n".join(lines) + "\n"


def _html_section(audit: Audit, index: int, criteria: Criteria, plots: bool) -> str:
    """One run's section; ``plots=False`` (notebooks, or no matplotlib): tables and lists only."""
    esc = html_text
    rows = "".join(
        f"<tr><td>{esc(f.phase)}</td><td>{esc(f.kind)}</td><td><code>{esc(f.key)}</code></td><td class=n>{f.episodes}</td>"
        f"<td class=n>{_num(f.truth)}</td><td class=n>{_num(f.reported)}</td><td class=n>{_num(f.difference)}</td>"
        f"<td style='color:{f.verdict.data.color};font-weight:bold'>{f.verdict.value}</td></tr>"
        for f in audit.findings
    )
    findings = ""
    for f in (f for f in audit.findings if f.verdict != Verdict.CLEAN):
        ev = "".join(
            f"<tr><td><code>{esc(e.episode_id)}</code></td><td>{esc(e.runner_id)}</td><td class=n>{e.chunks}</td><td class=n>{e.truth:.6g}</td>"
            f"<td class=n>{e.reported:.6g}</td><td class=n>{e.difference:+.6g}</td><td>{esc(e.explanation)}</td></tr>"
            for e in f.evidence
        )
        findings += f"<h4>{f.verdict.value} — {esc(f.phase)} {esc(f.kind)} <code>{esc(f.key)}</code></h4><p>{esc(f.message)}</p>"
        if f.attribution:
            findings += f"<p><b>Attribution:</b> {esc(f.attribution)}</p>"
        if ev:
            findings += "<table><tr><th>episode</th><th>runner</th><th>chunks</th><th>truth</th><th>reported</th><th>diff</th><th>explanation</th></tr>" + ev + "</table>"
    figures = "".join(f"<figure><img alt='{esc(t)}' src='data:image/png;base64,{b}'><figcaption>{esc(t)}</figcaption></figure>" for t, b in _plots(audit)) if plots else ""
    off_series = [d for d in audit.dashboard if d.wrong_iterations or d.unreconstructable]
    hidden = plotted_series(audit)[1] if plots else 0
    dash = "".join(f"<li>{esc(d.summary())}</li>" for d in off_series)
    dash += f"<li>{len(audit.dashboard) - len(off_series)} other recorded series match the truth</li>" if len(audit.dashboard) > len(off_series) else ""
    if hidden:
        dash += f"<li>{hidden} more series are off but not plotted (listed above)</li>"
    meaning = "".join(f"<li>{x}</li>" for x in meaning_lines(audit, text=esc, code=lambda s: f"<code>{esc(s)}</code>"))
    unverified = "".join(f"<li>UNVERIFIED: {esc(u.reason)}</li>" for u in criteria.unverified(audit))
    notes = "".join(f"<li>{esc(n)}</li>" for n in audit.notes)
    line = bottom_line(audit)
    bottom = f"\n<p class=bottom-line><b>Bottom line:</b> {esc(line)}</p>" if line else ""
    return f"""<section id="run-{index}">
<h2>{esc(audit.name)}</h2>
<p>{esc(_header_text(audit))}</p>
<p><b>{esc(_summary(audit, criteria))}</b></p>{bottom}{f"<ul>{unverified}</ul>" if unverified else ""}
<h3>Verdicts</h3>
<table><tr><th>phase</th><th>kind</th><th>key</th><th>episodes</th><th>truth</th><th>reported</th><th>diff</th><th>verdict</th></tr>{rows}</table>
<h3>Dashboards: shown vs. truth per iteration</h3>{figures if audit.dashboard else "<p>No dashboard series were recorded.</p>"}<ul>{dash}</ul>
<h3>Findings and example episodes</h3>{findings or "<p>None.</p>"}
{f"<h3>Notes</h3><ul>{notes}</ul>" if notes else ""}
<h3>What the numbers mean</h3><ul>{meaning}</ul>
</section>
"""


def render_html(audits: Audit | Sequence[Audit], *, criteria: Criteria | None = None) -> str:
    """One self-contained HTML page (plots inlined as PNG; no network needed) with a
    section per audited run, after an index linking them when there are several. Without
    matplotlib: the same page without plots, and one line saying how to get them."""
    audits = _as_list(audits)
    criteria = criteria or Criteria()
    plots = _pyplot() is not None
    esc = html_text
    title = audits[0].name if len(audits) == 1 else f"{len(audits)} runs"
    index = ""
    if len(audits) > 1:
        items = "".join(f"<li><a href='#run-{i}'>{esc(a.name)}</a>: {esc(_summary(a, criteria))}</li>" for i, a in enumerate(audits))
        index = f"<ul>{items}</ul>\n"
    if not plots and any(a.dashboard for a in audits):
        index += f"<p class=hint>{esc(PLOTS_HINT)}</p>\n"
    sections = "".join(_html_section(a, i, criteria, plots) for i, a in enumerate(audits))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>reward_audit: {esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
figure {{ display: inline-block; margin: 0.5em; }} figcaption {{ font-size: 0.8em; color: #555; }}
section {{ border-top: 2px solid #888; margin-top: 2em; }} p.hint {{ color: #8a6d00; }}
p.bottom-line {{ border-left: 4px solid #888; padding: 0.3em 0.8em; background: #f4f4f4; }}
</style></head><body>
<h1>reward_audit: {esc(title)}</h1>
{index}{sections}</body></html>
"""


def html_fragment(audit: Audit, *, criteria: Criteria | None = None) -> str:
    """One run's HTML section without plots and without a page around it (Jupyter's
    ``Audit._repr_html_``): fast, and every id escaped as in the report."""
    return f"<div class='reward-audit'>{_html_section(audit, 0, criteria or Criteria(), plots=False)}</div>"


def render(fmt: str, audits: Audit | Sequence[Audit], *, criteria: Criteria | None = None, verbose: bool = False) -> str:
    """``fmt`` (one of ``FORMATS``) -> the document, ending with a newline. ``verbose``:
    the terminal table with the episodes behind each finding."""
    audits = _as_list(audits)
    if fmt == "text":
        return "\n\n".join(render_text(a, verbose=verbose, criteria=criteria) for a in audits) + "\n"
    if fmt == "json":
        return render_json(audits, criteria=criteria) + "\n"
    if fmt == "md":
        return render_markdown(audits, criteria=criteria)
    if fmt == "html":
        return render_html(audits, criteria=criteria)
    raise ValueError(f"{fmt!r}: not an output format; use one of {', '.join(FORMATS)}")
