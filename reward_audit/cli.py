"""The ``reward-audit`` command: a thin click layer over the library.

Exit codes: 0 no failing verdict, 1 a failing verdict (LEAK / DROP / MISMATCH by default;
``--fail-on``), 2 unusable input (one line on stderr naming the path and the fix).

Every command that audits takes the same flags: what fails (``check_options``: one
``criteria.Criteria``, the object ``assert_no_leakage`` uses too) and the output
(``--format text|json|md|html``, one ``report.render`` for all). The exit code is 0
exactly when the JSON document's ``ok`` is true.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import tempfile
import uuid
from typing import Any, Callable

import click

from .audit import FAILURES, Verdict
from .criteria import PHASES, Criteria, parse_allow, parse_fail_on
from .compare import compare
from .errors import RewardAuditError
from .report import FORMATS, render, visible
from .store import find_runs, load_runs

EXIT_OK, EXIT_FINDINGS, EXIT_BAD_INPUT = 0, 1, 2


def _parse_fail_on(ctx: click.Context, param: click.Parameter, value: str) -> frozenset[Verdict]:
    try:  # `--fail-on ''` would make every audit pass: it says which verdicts instead
        return parse_fail_on(value)
    except ValueError as e:
        raise click.BadParameter(str(e))


def _parse_allow(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    for entry in value:
        try:
            parse_allow(entry)
        except ValueError as e:
            raise click.BadParameter(str(e))
    return value


def check_options(fn: Callable) -> Callable:
    """What makes the exit code 1, shared by every command that audits: ``--fail-on``,
    ``--allow``, ``--phase``, ``--allow-unverified`` (given to the command as one
    ``criteria``, a ``criteria.Criteria``) and the tolerances ``--atol`` / ``--rtol``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, fail_on: frozenset[Verdict], allow: tuple[str, ...], phases: tuple[str, ...], allow_unverified: bool, **kwargs: Any) -> Any:
        return fn(*args, criteria=Criteria(fail_on=fail_on, allow=allow, phases=phases or None, allow_unverified=allow_unverified), **kwargs)

    wrapper = click.option(
        "--allow-unverified",
        is_flag=True,
        help="Exit 0 even when nothing could be verified in a run or checked phase (by default that fails: a CLEAN must mean checked and equal).",
    )(wrapper)
    wrapper = click.option(
        "--phase", "phases", multiple=True, type=click.Choice(PHASES),
        help="Check only this phase (repeatable); other phases are shown but never fail. A phase the run has nothing in fails as unverified.",
    )(wrapper)
    wrapper = click.option(
        "--allow", multiple=True, callback=_parse_allow, metavar="[PHASE:]KIND:KEY",
        help="A finding that does not fail (repeatable), e.g. `--allow module:frozen_snapshot` or `--allow train:policy:p1`; as `assert_no_leakage(allow=...)`.",
    )(wrapper)
    wrapper = click.option(
        "--fail-on",
        default=",".join(sorted(v.value.lower() for v in FAILURES)),
        show_default=True,
        callback=_parse_fail_on,
        help="Verdicts that make the exit code 1 (e.g. `leak,drop,mismatch,excluded`).",
    )(wrapper)
    return tolerance_options(wrapper)


def output_options(fn: Callable) -> Callable:
    """``--format`` / ``--json`` / ``--verbose`` for a command that prints its audit; the
    command receives ``fmt`` (one of ``report.FORMATS``) and ``verbose``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, fmt: str | None, as_json: bool, **kwargs: Any) -> Any:
        if as_json and fmt not in (None, "json"):
            raise click.UsageError(f"`--json` means `--format json`; pass one of `--json` and `--format {fmt}`")
        return fn(*args, fmt="json" if as_json else fmt or "text", **kwargs)

    wrapper = click.option("--verbose", "-v", is_flag=True, help="Show the episodes (ids, truth, reported, attribution) behind each finding (text format).")(wrapper)
    wrapper = click.option("--json", "as_json", is_flag=True, help="Same as `--format json`.")(wrapper)
    wrapper = click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default=None,
        help="text (default): the table; json: one JSON document (`ok`, counts, a `failing` flag per finding); md / html: the report, on stdout.",
    )(wrapper)
    return wrapper


def _tolerance(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise click.BadParameter(f"{value!r}: a tolerance is a finite number ≥ 0")
    return value


def tolerance_options(fn: Callable) -> Callable:
    """``--atol`` / ``--rtol``: explicit overrides of the exact rounding bound."""
    fn = click.option(
        "--atol", type=float, default=None, callback=_tolerance,
        help="Absolute tolerance per episode value (default: the worst-case rounding of RLlib's own arithmetic on that value's rewards).",
    )(fn)
    fn = click.option(
        "--rtol", type=float, default=None, callback=_tolerance,
        help="Relative tolerance per episode value, with --atol (default: the exact rounding bound, see docs/verdicts.md).",
    )(fn)
    return fn


def _one_line_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RewardAuditError as e:
            click.echo(f"Error: {visible(e)}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except Exception as e:  # never a traceback for the user; keep it one line
            if os.environ.get("REWARD_AUDIT_DEBUG"):
                raise
            where = visible(kwargs.get("path") or kwargs.get("out") or "the run")
            first = visible(str(e).splitlines()[0]) if str(e) else ""
            click.echo(
                f"Error: {where}: could not audit ({type(e).__name__}: {first}); "
                "rerun with `REWARD_AUDIT_DEBUG=1` for the traceback and report it",
                err=True,
            )
            sys.exit(EXIT_BAD_INPUT)

    return wrapper


def _progress(enabled: bool) -> Callable[[str, float], None] | None:
    """Progress on stderr, only when stderr is a terminal (never in pipes or JSON)."""
    if not enabled or not sys.stderr.isatty():
        return None

    def show(what: str, fraction: float) -> None:
        click.echo(f"\r\x1b[Kreward-audit: {fraction:4.0%} {what}", err=True, nl=False)

    return show


def audit_all(path: str, atol: float | None, rtol: float | None, progress: bool = True) -> list:
    runs = load_runs(path)
    show = _progress(progress)
    audits = []
    for i, run in enumerate(runs):
        step = None
        if show:
            def step(what: str, fraction: float, i: int = i, name: str = run.name) -> None:
                show(f"{visible(name)}: {what}" if len(runs) > 1 else what, (i + fraction) / len(runs))
        audits.append(compare(run, atol=atol, rtol=rtol, progress=step))
    if show:
        click.echo("\r\x1b[K", err=True, nl=False)
    return audits


def _warn_unused_allow(criteria: Criteria, audits: list) -> None:
    for entry in criteria.unused_allow(audits):
        click.echo(f"warning: `--allow {visible(entry)}` names no finding (a typo, or a bug fixed since?)", err=True)


def _audit_and_print(path: str, fmt: str, verbose: bool, criteria: Criteria, atol: float | None, rtol: float | None) -> int:
    audits = audit_all(path, atol, rtol, progress=fmt == "text")
    _warn_unused_allow(criteria, audits)
    click.echo(render(fmt, audits, criteria=criteria, verbose=verbose), nl=False)
    return EXIT_OK if all(criteria.passes(a) for a in audits) else EXIT_FINDINGS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reward_audit")
def main() -> None:
    """Audit per-agent reward attribution of Ray RLlib runs recorded with RewardAuditCallback."""
    # A terminal whose encoding cannot show a character (latin-1, say) gets `\u2014`, not a crash;
    # where the locale says ASCII (`LC_ALL=C`) click already writes UTF-8.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


@main.command("compare")
@click.argument("path")
@output_options
@check_options
@_one_line_errors
def compare_cmd(path: str, fmt: str, verbose: bool, criteria: Criteria, atol: float | None, rtol: float | None) -> None:
    """Reconcile the env's raw rewards with RLlib's reported returns.

    PATH is an audit folder, a trial dir that holds one, or a Tune experiment dir (each
    trial is audited). Exit 0: no failing verdict; 1: a failing verdict, or nothing could be
    verified (`--allow-unverified` to accept that); 2: bad input.
    """
    sys.exit(_audit_and_print(path, fmt, verbose, criteria, atol, rtol))


@main.command("report")
@click.argument("path")
@click.option(
    "-o", "--output", "output", default=None,
    help="File to write (default: report.html / report.md in the current folder); `-o -` writes to stdout. "
    "Never an existing file (unless --force), a symlink, or a path inside an audited `reward_audit/` folder.",
)
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists (it is replaced atomically).")
@click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default="html", show_default=True,
    help="Self-contained HTML with plots (tables only without matplotlib), Markdown for an issue tracker, or compare's text (with the evidence) / JSON.",
)
@check_options
@_one_line_errors
def report_cmd(path: str, output: str | None, force: bool, fmt: str, criteria: Criteria, atol: float | None, rtol: float | None) -> None:
    """Write a report: verdicts, attribution, example episodes, and per module the
    dashboard value vs. the truth over iterations (plots). Several trials (a Tune
    experiment dir) give one document with a section per trial.

    Exit codes as `compare`: 0 no failing verdict; 1 a failing verdict (`--fail-on`), or
    nothing could be verified (`--allow-unverified`); 2 bad input or an output path it
    refuses. The file is written in UTF-8 whatever the locale, all at once (a temporary
    file renamed into place)."""
    output = output or f"report.{_EXTENSIONS[fmt]}"
    if output != "-":
        _check_output(output, path, force)
    audits = audit_all(path, atol, rtol, progress=output != "-")
    _warn_unused_allow(criteria, audits)
    text = render(fmt, audits, criteria=criteria, verbose=True)
    failing = sum(len(criteria.failing(a)) for a in audits)
    if output == "-":
        click.echo(text, nl=False)
    else:
        _write_atomically(output, text)
        click.echo(f"wrote {visible(output)} ({len(audits)} run{'s' if len(audits) > 1 else ''}, {failing} failing findings)")
    sys.exit(EXIT_OK if all(criteria.passes(a) for a in audits) else EXIT_FINDINGS)


_EXTENSIONS = {"html": "html", "md": "md", "text": "txt", "json": "json"}


def _check_output(output: str, path: str, force: bool) -> None:
    """Refuse an output path that could destroy data: a symlink (its target would be
    written), anything inside an audited run folder (its manifest or part files), an
    existing file without ``--force``."""
    if os.path.islink(output):
        raise RewardAuditError(f"{output}: is a symlink; `report` never writes through one, pass the real file with `-o`")
    target = os.path.realpath(output)
    for run in find_runs(path) if "://" not in path else []:
        folder = os.path.realpath(run)
        if os.path.commonpath([target, folder]) == folder:
            raise RewardAuditError(f"{output}: is inside the audited run folder {run}; pass a path outside it with `-o`, e.g. `-o report.html`")
    if os.path.isdir(target):
        raise RewardAuditError(f"{output}: is a folder; pass a file name with `-o`, e.g. `-o {os.path.join(output, 'report.html')}`")
    if os.path.lexists(output) and not force:
        raise RewardAuditError(f"{output}: already exists; pass `--force` to overwrite it, or another file with `-o`")


def _write_atomically(output: str, text: str) -> None:
    """UTF-8, to a temporary file in the target folder renamed over ``output``: readers
    and a failed write never see half a report."""
    folder, name = os.path.split(os.path.abspath(output))
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, output)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
    except OSError as e:
        raise RewardAuditError(f"{output}: cannot write the report ({e.strerror}); pass a writable path with `-o`") from e


@main.command("demo")
@click.option("--iterations", default=4, show_default=True, help="PPO training iterations.")
@click.option("--out", "out", default=None, help="Where to record (default: a new temporary folder).")
@click.option(
    "--inject",
    type=click.Choice(["leak", "drop", "mismatch", "signal"]),
    default=None,
    help="Self-test: corrupt RLlib's per-episode metrics like Ray 2.12 (leak) or 2.53 (drop) did, or (signal) move one agent's rewards into another module's training data; the audit must catch it.",
)
@output_options
@check_options
@_one_line_errors
def demo_cmd(iterations: int, out: str | None, inject: str | None, fmt: str, verbose: bool, criteria: Criteria, atol: float | None, rtol: float | None) -> None:
    """Train a tiny multi-agent PPO run with the callback, then compare it (the same output
    and exit codes as `compare`; with `--format json|md|html` the progress line goes to stderr)."""
    from .demo import run_demo

    out = out or tempfile.mkdtemp(prefix="reward_audit_demo_")
    layout = "agents 0, 1, 2 paid 1, 10, 100 per step, one shared module" if inject == "drop" else "agents 0, 1 paid 1 and 10 per step"
    fault = f", INJECTING fault {inject!r}" if inject else ""
    click.echo(f"training {iterations} PPO iterations on ScaledRewardsEnv ({layout}){fault}, recording to {out} ...", err=fmt != "text")
    run_demo(out, iterations=iterations, inject=inject)
    sys.exit(_audit_and_print(out, fmt, verbose, criteria, atol, rtol))


@main.command("compact")
@click.argument("path")
@_one_line_errors
def compact_cmd(path: str) -> None:
    """Merge a run's small part files into few large ones (atomic, idempotent).

    A long run leaves one part per iteration per table; after `compact` a 1,000-iteration
    run has a handful. Verdicts do not change; an interrupted `compact` is finished by the
    next one, and readers never count a row twice meanwhile."""
    from .compact import compact_run

    for table, (before, after) in compact_run(path).items():
        click.echo(f"{table}: {before} parts -> {after}")


@main.command("schema")
def schema_cmd() -> None:
    """Print the run-folder schema (Markdown; the source of docs/schema.md)."""
    from .schema import schema_markdown

    click.echo(schema_markdown(), nl=False)


@main.command("doctor")
@click.argument("path", required=False)
@click.option("--ray-version", default=None, help="Judge this Ray version (default: the run folder's, else the installed one).")
@_one_line_errors
def doctor_cmd(path: str | None, ray_version: str | None) -> None:
    """Which known RLlib reporting problems a setup is exposed to, without training.

    PATH (optional): a Tune trial dir, its params.json / result.json, or a reward_audit
    run folder; without it, the installed Ray version alone. One line per known problem
    (docs/known_bugs.md) and what to run to check. Exit 0; 2 on an unreadable PATH."""
    from .doctor import doctor

    click.echo("\n".join(doctor(path, ray_version)))


if __name__ == "__main__":  # pragma: no cover
    main()
