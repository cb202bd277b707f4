"""Fuzzing the run folder: hypothesis damages copies of real and synthetic runs (truncate,
flip bytes, retype or drop a column, NaN / inf, duplicate, delete, link, rename, edit the
manifest, bad ``chunk_seq`` / ``iteration``, empty files, zero-row parts) and sends each
through ``compare``, ``compare --json`` and ``report -o r.html``.

Every input must end with exit 0, 1 or 2; exit 2 with exactly one ``Error: `` line on
stderr; never a traceback (``REWARD_AUDIT_DEBUG=1`` is set, so an unexpected exception
escapes the CLI's last-resort handler and fails the test); ``--json`` output parses;
``report`` exits as ``compare``. On top of that:

* damaged truth (a raw reward of a reported episode changed, or made NaN / inf) is never
  exit 0;
* a conflicting copy of a part (same rows, other values) is exit 2;
* damage that keeps the data (an identical copy or an inside link under another part name,
  stray files the reader skips, an extra zero-row part) changes no verdict.

Reproducible: ``derandomize=True``. The number of inputs tried is printed at the end of the
module (``fuzz: N inputs``). Run longer locally, or with other inputs than CI's::

    REWARD_AUDIT_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py
    REWARD_AUDIT_FUZZ_RANDOM=1 pytest tests/test_fuzz.py --hypothesis-seed=7
"""

from __future__ import annotations

import collections
import enum
import glob
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reward_audit.cli import main
from reward_audit.synthetic import generate_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = sorted(glob.glob(os.path.join(ROOT, "fixtures", "runs", "*", "reward_audit")))
EXAMPLES = int(os.environ.get("REWARD_AUDIT_FUZZ_EXAMPLES", "40"))
TABLES = ("raw_rewards", "reported_episodes", "reported_iterations", "drains", "batch_rewards")

TRIED: collections.Counter = collections.Counter()  # inputs per fuzz test, printed by the last test
STARTED = time.monotonic()

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("REWARD_AUDIT_FUZZ_RANDOM"),  # CI: the same inputs every run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------- base runs


class Base:
    """A base run: where, its exit code and verdicts, the reported episodes
    (``(runner_id, episode_id)``) whose values are compared. Shown by name only."""

    def __init__(self, name: str, trial: str, exit_code: int, verdicts: tuple, reported: frozenset):
        self.name, self.trial, self.exit_code, self.verdicts, self.reported = name, trial, exit_code, verdicts, reported

    def __repr__(self) -> str:
        return f"Base({self.name!r}, exit {self.exit_code})"



def _findings(stdout: str) -> list[dict]:
    """Every finding of a `--format json` document (one document, a section per run)."""
    return [f for run in json.loads(stdout)["runs"] for f in run["findings"]]

def _verdicts(stdout: str) -> tuple:
    return tuple(sorted((d["phase"], d["kind"], d["key"], d["verdict"], d["episodes"]) for d in _findings(stdout)))


def _reported(run: str) -> frozenset:
    out = set()
    for file in glob.glob(f"{run}/reported_episodes/*.parquet"):
        t = pq.read_table(file, columns=["runner_id", "episode_id", "semantics"]).to_pylist()
        out |= {(r["runner_id"], r["episode_id"]) for r in t if r["semantics"] == "episode_sum_counted"}
    return frozenset(out)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> list[Base]:
    """Built once: a tiny synthetic run (clean), the recorded fixtures (LEAK, DROP), and a
    run written by the real recorder and collector (with ``drains/``)."""
    from test_handover import recorded

    root = tmp_path_factory.mktemp("fuzz_bases")
    generate_run(str(root / "synthetic"), iterations=2, episodes_per_iteration=4, agents=2, modules=2, runners=2, max_chunks=2)
    trials = {"synthetic": str(root / "synthetic")}
    for run in FIXTURES:
        name = os.path.basename(os.path.dirname(run))
        shutil.copytree(run, root / name / "reward_audit")
        trials[name] = str(root / name)
    (root / "handover").mkdir()
    trials["handover"] = os.path.dirname(recorded(root / "handover"))
    out = []
    for name, trial in trials.items():
        result = CliRunner().invoke(main, ["compare", trial, "--json"])
        assert result.exit_code in (0, 1), result.output
        out.append(Base(name, trial, result.exit_code, _verdicts(result.stdout), _reported(f"{trial}/reward_audit")))
    assert {b.exit_code for b in out} == {0, 1}  # a clean base and failing ones
    return out


# --------------------------------------------------------------------------- mutations


class Effect(enum.Enum):
    KEEPS = "keeps the data"  # no verdict may change
    TRUTH = "changes the truth"  # never exit 0
    CONFLICT = "conflicting copy"  # exit 2
    DAMAGE = "anything else"  # only the generic oracle


@dataclass
class Target:
    run: str  # the damaged copy's reward_audit/ folder
    tmp: str  # scratch space outside the trial folder
    base: Base


def _files(run: str) -> list[str]:
    """The run's regular files (links not followed: a mutation may have made loops)."""
    return sorted(os.path.join(folder, f) for folder, _, files in os.walk(run) for f in files if not os.path.islink(os.path.join(folder, f)))


def _parts(run: str, table: str | None = None) -> list[str]:
    tables = [table] if table else TABLES
    return [f for f in _files(run) if f.endswith(".parquet") and os.path.basename(os.path.dirname(f)) in tables and os.path.dirname(os.path.dirname(f)) == run]


def _pick(data, items: list):
    return data.draw(st.sampled_from(items)) if items else None


def _read(file: str) -> pa.Table | None:
    try:
        return pq.read_table(file)
    except (pa.ArrowException, OSError):
        return None


def _write(table: pa.Table, file: str) -> None:
    pq.write_table(table, file)  # keeps the schema metadata (the schema version) of `table`


def _copy_name(file: str, suffix: str) -> str:
    """A new part name next to ``file`` (numbered when the name is taken)."""
    name, n = file[: -len(".parquet")] + f"-{suffix}", 0
    while os.path.lexists(f"{name}{n or ''}.parquet"):
        n += 1
    return f"{name}{n or ''}.parquet"


def _link(target: str, path: str) -> None:
    """``path -> target``, unless ``path`` exists already (a mutation drawn twice)."""
    if not os.path.lexists(path):
        os.symlink(target, path)


def truncate(data, t: Target) -> Effect:
    file = _pick(data, _files(t.run))
    if file:
        size = os.path.getsize(file)
        os.truncate(file, data.draw(st.integers(0, max(size - 1, 0))))
    return Effect.DAMAGE


def flip_bytes(data, t: Target) -> Effect:
    file = _pick(data, _files(t.run))
    if file:
        with open(file, "r+b") as f:
            buf = bytearray(f.read())
            for _ in range(data.draw(st.integers(1, 8))):
                if buf:
                    i = data.draw(st.integers(0, len(buf) - 1))
                    buf[i] ^= data.draw(st.integers(1, 255))
            f.seek(0)
            f.write(buf)
    return Effect.DAMAGE


def _cast(column: pa.ChunkedArray, to: pa.DataType) -> pa.ChunkedArray:
    try:
        return column.cast(to, safe=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.nulls(len(column), to) if len(column) else pa.chunked_array([], to)


RETYPES: dict[str, Callable[[pa.Table, str], pa.Table]] = {
    "string": lambda t, c: t.set_column(t.schema.get_field_index(c), c, _cast(t[c], pa.string())),
    "int64": lambda t, c: t.set_column(t.schema.get_field_index(c), c, _cast(t[c], pa.int64())),
    "int8": lambda t, c: t.set_column(t.schema.get_field_index(c), c, _cast(t[c], pa.int8())),
    "float32": lambda t, c: t.set_column(t.schema.get_field_index(c), c, _cast(t[c], pa.float32())),
    "float64": lambda t, c: t.set_column(t.schema.get_field_index(c), c, _cast(t[c], pa.float64())),
    "bool": lambda t, c: t.set_column(t.schema.get_field_index(c), c, _cast(t[c], pa.bool_())),
    "null": lambda t, c: t.set_column(t.schema.get_field_index(c), c, pa.nulls(t.num_rows, t[c].type)),
    "drop": lambda t, c: t.drop_columns([c]),
    "rename": lambda t, c: t.rename_columns([n + "_x" if n == c else n for n in t.column_names]),
    "dictionary": lambda t, c: t.set_column(t.schema.get_field_index(c), c, pc.dictionary_encode(t[c])),
}


def retype_column(data, t: Target) -> Effect:
    file = _pick(data, _parts(t.run))
    table = _read(file) if file else None
    if table is None:
        return Effect.DAMAGE
    column = data.draw(st.sampled_from(table.column_names))
    _write(RETYPES[data.draw(st.sampled_from(sorted(RETYPES)))](table, column), file)
    return Effect.DAMAGE


def _set_rows(table: pa.Table, column: str, rows: list[int], value) -> pa.Table:
    values = table[column].to_pylist()
    for i in rows:
        values[i] = value(values[i])
    return table.set_column(table.schema.get_field_index(column), table.schema.field(column), pa.array(values, table[column].type))


def _rows(data, table: pa.Table) -> list[int]:
    first = data.draw(st.integers(0, table.num_rows - 1))
    return list(range(first, data.draw(st.integers(first + 1, table.num_rows))))


def non_finite(data, t: Target) -> Effect:
    """NaN / inf into `reward` or `pre_obs_reward` (raw) or `value` (reported)."""
    file = _pick(data, _parts(t.run, "raw_rewards") + _parts(t.run, "reported_episodes") + _parts(t.run, "reported_iterations"))
    table = _read(file) if file else None
    if table is None or not table.num_rows:
        return Effect.DAMAGE
    column = "value" if "value" in table.column_names else data.draw(st.sampled_from(["reward", "pre_obs_reward"]))
    bad = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    _write(_set_rows(table, column, _rows(data, table), lambda v: bad), file)
    return Effect.TRUTH if column == "reward" else Effect.DAMAGE  # pre_obs_reward: NaN is refused too, but is not the truth itself


def shift_rewards(data, t: Target) -> Effect:
    """Add a constant to some raw rewards: the truth no longer matches what was reported."""
    file = _pick(data, _parts(t.run, "raw_rewards"))
    table = _read(file) if file else None
    if table is None or not table.num_rows:
        return Effect.KEEPS
    rows = _rows(data, table)
    delta = data.draw(st.floats(0.5, 1e6)) * data.draw(st.sampled_from([1, -1]))
    _write(_set_rows(table, "reward", rows, lambda v: v + delta), file)
    runners, episodes = table["runner_id"].to_pylist(), table["episode_id"].to_pylist()
    return Effect.TRUTH if any((runners[i], episodes[i]) in t.base.reported for i in rows) else Effect.DAMAGE


def duplicate(data, t: Target) -> Effect:
    """An identical copy of a part under another name: counted once, with a note."""
    file = _pick(data, _parts(t.run))
    if file:
        shutil.copyfile(file, _copy_name(file, data.draw(st.sampled_from(["copy", "0", "zz", "é"]))))
    return Effect.KEEPS


def conflicting_copy(data, t: Target) -> Effect:
    """A copy of a part whose values differ: contradictory data, exit 2."""
    file = _pick(data, _parts(t.run, "raw_rewards") + _parts(t.run, "reported_episodes"))
    table = _read(file) if file else None
    if table is None or not table.num_rows:
        return Effect.DAMAGE
    column = "reward" if "reward" in table.column_names else "value"
    rows = _rows(data, table)
    _write(_set_rows(table, column, rows, lambda v: v + 1.0), _copy_name(file, "other"))
    if column == "value":  # only values the audit compares are de-duplicated
        semantics = table["semantics"].to_pylist()
        return Effect.CONFLICT if any(semantics[i] == "episode_sum_counted" for i in rows) else Effect.DAMAGE
    return Effect.CONFLICT


def delete(data, t: Target) -> Effect:
    file = _pick(data, _files(t.run))
    if file:
        os.unlink(file)
    return Effect.DAMAGE


def rename(data, t: Target) -> Effect:
    """A part renamed so that readers skip it (not .parquet, hidden): its rows are gone."""
    file = _pick(data, _parts(t.run))
    if file:
        folder, name = os.path.split(file)
        new = data.draw(st.sampled_from([f".{name}", f"{name}.bak", name[: -len(".parquet")], f".{name}.1234abcd.tmp", name.upper()]))
        os.rename(file, os.path.join(folder, new))
    return Effect.DAMAGE


def stray_files(data, t: Target) -> Effect:
    """Files and folders the reader must skip: hidden, temporary, other suffixes, a zero-row part."""
    table = data.draw(st.sampled_from(TABLES))
    folder = os.path.join(t.run, table)
    os.makedirs(folder, exist_ok=True)
    kind = data.draw(st.sampled_from(["hidden", "tmp", "txt", "zero-rows", "folder.parquet", "readme"]))
    if kind == "hidden":
        with open(os.path.join(folder, ".part-x.parquet"), "wb") as f:
            f.write(b"not parquet")
    elif kind == "tmp":
        with open(os.path.join(folder, ".part-000009-x.parquet.0123abcd.tmp"), "wb") as f:
            f.write(b"PAR1")
    elif kind == "txt":
        with open(os.path.join(folder, "notes.txt"), "w") as f:
            f.write("hello")
    elif kind == "zero-rows":
        from reward_audit import schema
        from reward_audit.store import write_part

        with open(os.path.join(folder, "part-000001-empty.parquet"), "wb") as f:
            write_part(table, schema.TABLES[table].empty_table(), f)
    elif kind == "folder.parquet":
        os.makedirs(os.path.join(folder, "part-000009-folder.parquet"), exist_ok=True)
    else:
        with open(os.path.join(t.run, "README"), "w") as f:
            f.write("x")
    return Effect.KEEPS


def empty_file(data, t: Target) -> Effect:
    """A file (manifest or part) cut to zero bytes, or a zero-row part in place of one."""
    file = _pick(data, _files(t.run))
    if not file:
        return Effect.DAMAGE
    table = _read(file) if file.endswith(".parquet") else None
    if table is not None and data.draw(st.booleans()):
        _write(table.slice(0, 0), file)
    else:
        open(file, "wb").close()
    return Effect.DAMAGE


def inside_link(data, t: Target) -> Effect:
    """Links that lead nowhere new: another part name for a part, loops, the manifest kept
    elsewhere in the run folder."""
    kind = data.draw(st.sampled_from(["part", "loops", "manifest"]))
    parts = _parts(t.run)
    if kind == "part" and parts:  # read as an identical copy
        file = _pick(data, parts)
        _link(os.path.basename(file), _copy_name(file, "link"))
    elif kind == "loops":
        _link(".", os.path.join(t.run, "loop"))
        _link("..", os.path.join(os.path.dirname(t.run), "up"))
        _link(os.path.dirname(t.run), os.path.join(t.run, "trial"))
    elif kind == "manifest":
        manifest = os.path.join(t.run, "run.json")
        if os.path.isfile(manifest) and not os.path.islink(manifest):
            where = os.path.join(t.run, "raw_rewards", "manifest.json")
            os.makedirs(os.path.dirname(where), exist_ok=True)
            shutil.move(manifest, where)
            _link(os.path.relpath(where, t.run), manifest)
    return Effect.KEEPS


def symlink(data, t: Target) -> Effect:
    """Links the reader refuses or skips: out of the run, dangling, to themselves, to folders."""
    kind = data.draw(st.sampled_from(["part-out", "table-out", "manifest-out", "dangling", "self", "up-dir", "dir-as-part"]))
    parts = _parts(t.run)
    if kind == "part-out" and parts:
        file = _pick(data, parts)
        outside = os.path.join(t.tmp, "outside-" + os.path.basename(file))
        shutil.move(file, outside)
        _link(outside, file)
    elif kind == "table-out":
        table = data.draw(st.sampled_from(TABLES))
        folder = os.path.join(t.run, table)
        outside = os.path.join(t.tmp, "outside-" + table)
        if os.path.isdir(folder) and not os.path.islink(folder):
            shutil.move(folder, outside)
            _link(outside, folder)
    elif kind == "manifest-out":
        manifest = os.path.join(t.run, "run.json")
        if os.path.isfile(manifest) and not os.path.islink(manifest):
            shutil.move(manifest, os.path.join(t.tmp, "outside-run.json"))
            _link(os.path.join(t.tmp, "outside-run.json"), manifest)
    elif kind == "dangling":
        _link(os.path.join(t.tmp, "nowhere"), os.path.join(t.run, data.draw(st.sampled_from(TABLES)) + "-gone.parquet"))
        folder = os.path.join(t.run, "raw_rewards")
        if os.path.isdir(folder) and not os.path.islink(folder):
            _link(os.path.join(t.tmp, "nowhere"), os.path.join(folder, "part-000009-gone.parquet"))
    elif kind == "self":
        folder = os.path.join(t.run, data.draw(st.sampled_from(TABLES)))
        if os.path.isdir(folder) and not os.path.islink(folder):
            _link("part-loop.parquet", os.path.join(folder, "part-loop.parquet"))
    elif kind == "up-dir":
        folder = os.path.join(t.run, data.draw(st.sampled_from(TABLES)))
        if os.path.isdir(folder) and not os.path.islink(folder):
            _link("..", os.path.join(folder, "up.parquet"))
    elif kind == "dir-as-part":
        folder = os.path.join(t.run, "raw_rewards")
        if os.path.isdir(folder) and not os.path.islink(folder):
            _link(os.path.join(t.run, "reported_episodes"), os.path.join(folder, "part-000009-dir.parquet"))
    return Effect.DAMAGE


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def edit_manifest(data, t: Target) -> Effect:
    """Hand-edited run.json: the schema version, the tool, huge strings, any JSON, not JSON."""
    file = os.path.join(t.run, "run.json")
    try:
        with open(file) as f:
            manifest = json.load(f)
    except (OSError, ValueError, RecursionError):
        return Effect.DAMAGE
    if not isinstance(manifest, dict):
        return Effect.DAMAGE
    kind = data.draw(st.sampled_from(["schema_version", "tool", "huge", "field", "drop", "not-a-dict", "bytes", "nan", "deep"]))
    text = None
    if kind == "schema_version":
        version = data.draw(st.sampled_from([True, False, "3", 99, 0, -1, 3.0, None, [3], 2**80, "missing"]))
        if version == "missing":
            del manifest["schema_version"]
        else:
            manifest["schema_version"] = version
    elif kind == "tool":
        manifest["tool"] = data.draw(st.sampled_from(["other", "", None, 1, "REWARD_AUDIT"]))
    elif kind == "huge":
        key = data.draw(st.sampled_from(sorted(manifest) + ["new_field"]))
        manifest[key] = data.draw(st.sampled_from(["x" * 100_000, "\n" * 1000, "\x1b[31m" * 100, "\ud800" * 3]))
    elif kind == "field":
        key = data.draw(st.sampled_from(sorted(manifest) + ["segments", "policies", "iteration_semantics", "iteration_paths"]))
        if key in ("tool", "schema_version"):
            return Effect.DAMAGE
        manifest[key] = data.draw(JSON_VALUES)
    elif kind == "drop":
        manifest.pop(data.draw(st.sampled_from(sorted(manifest))))
    elif kind == "not-a-dict":
        text = json.dumps(data.draw(st.sampled_from([[], [manifest], 3, "reward_audit", None, True])))
    elif kind == "bytes":
        with open(file, "wb") as f:
            f.write(data.draw(st.sampled_from([b"\xff\xfe{}", b"\xef\xbb\xbf" + json.dumps(manifest).encode(), b"{" * 100_000, b"\x00" * 10])))
        return Effect.DAMAGE
    elif kind == "nan":
        text = json.dumps(manifest)[:-1] + ', "metrics_num_episodes_for_smoothing": NaN, "evaluation_interval": Infinity}'
    else:
        text = json.dumps(manifest)[:-1] + ', "x": ' + "[" * 50_000 + "]" * 50_000 + "}"  # deeper than json's recursion limit
    with open(file, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text if text is not None else json.dumps(manifest))
    return Effect.DAMAGE


def bad_numbers(data, t: Target) -> Effect:
    """`chunk_seq` negative or repeated; `iteration`, `metrics_call`, `drain_seq` out of range."""
    file = _pick(data, _parts(t.run))
    table = _read(file) if file else None
    if table is None or not table.num_rows:
        return Effect.DAMAGE
    columns = [c for c in ("chunk_seq", "iteration", "metrics_call", "drain_seq", "raw_rows", "worker_index", "n_rewards") if c in table.column_names]
    column = data.draw(st.sampled_from(columns))
    value = data.draw(st.sampled_from([-1, 0, 1, 2**31 - 1, 2**62, -(2**63), 2**63 - 1]))
    bits = table[column].type.bit_width
    if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
        value = 2 ** (bits - 1) - 1
    table = _set_rows(table, column, _rows(data, table), lambda v: value)
    _write(table, file)
    return Effect.DAMAGE


MUTATIONS = {
    "truncate": truncate,
    "flip_bytes": flip_bytes,
    "retype_column": retype_column,
    "non_finite": non_finite,
    "shift_rewards": shift_rewards,
    "duplicate": duplicate,
    "conflicting_copy": conflicting_copy,
    "delete": delete,
    "rename": rename,
    "stray_files": stray_files,
    "empty_file": empty_file,
    "symlink": symlink,
    "inside_link": inside_link,
    "edit_manifest": edit_manifest,
    "bad_numbers": bad_numbers,
}


# --------------------------------------------------------------------------- the oracle


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    verdicts: tuple | None  # from --json, when it audited


def _invoke(runner: CliRunner, args: list[str]):
    """Run the CLI; fail on a warning a user would see on stderr (RuntimeWarning & co.;
    deprecation warnings are hidden outside ``__main__``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner.invoke(main, args)
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert not shown, f"{args[0]}: warnings on stderr: {[f'{w.filename}:{w.lineno}: {w.message}' for w in shown]}"
    return result


def _check(result, what: str) -> None:
    """Exit 0 / 1 / 2, no escaped exception, no traceback; exit 2: one `Error: ` line."""
    shown = f"{what}: exit {result.exit_code}\nstdout: {result.stdout[:2000]}\nstderr: {result.stderr[:2000]}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{what}: an exception escaped the CLI") from result.exception
    assert result.exit_code in (0, 1, 2), shown
    assert "Traceback" not in result.stdout and "Traceback" not in result.stderr, shown
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), shown
        assert "could not audit" not in lines[0], shown  # the CLI's last resort: an unexpected exception


def audit(trial: str, tmp: str, fmt: str = "html") -> Outcome:
    """The three commands on one folder. ``fmt`` of the report: HTML (plots, slow) where the
    damage is anything, Markdown (same audit, same exit code) where it is only values."""
    runner = CliRunner(env={"REWARD_AUDIT_DEBUG": "1"})  # an unexpected exception escapes, with its traceback
    text = _invoke(runner, ["compare", trial])
    _check(text, "compare")
    as_json = _invoke(runner, ["compare", trial, "--json"])
    _check(as_json, "compare --json")
    verdicts = _verdicts(as_json.stdout) if as_json.exit_code != 2 else None
    out = os.path.join(tmp, f"r.{fmt}")
    report = _invoke(runner, ["report", trial, "-o", out, "--force", "--format", fmt])
    _check(report, "report")
    assert text.exit_code == as_json.exit_code == report.exit_code, (text.output, as_json.output, report.output)
    if report.exit_code != 2:
        with open(out, encoding="utf-8") as f:
            assert f.read().rstrip().endswith("</html>" if fmt == "html" else "")
    return Outcome(text.exit_code, verdicts)


def damaged(data, base: Base, names: list[str], fmt: str = "html") -> tuple[Outcome, list[Effect]]:
    """Copy ``base``, apply the named mutations (their targets drawn from ``data``), audit."""
    with tempfile.TemporaryDirectory() as tmp:
        trial = os.path.join(tmp, "trial")
        shutil.copytree(base.trial, trial, symlinks=True)
        target = Target(os.path.join(trial, "reward_audit"), tmp, base)
        effects = [MUTATIONS[name](data, target) for name in names]
        return audit(trial, tmp, fmt), effects


# --------------------------------------------------------------------------- the fuzz tests


@FUZZ
@given(data=st.data())
def test_any_damage_ends_in_exit_0_1_or_2_and_one_line(bases, data):
    base = data.draw(st.sampled_from(bases), label="base")
    names = data.draw(st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=3), label="mutations")
    TRIED["any damage"] += 1
    outcome, effects = damaged(data, base, names)
    if all(e is Effect.KEEPS for e in effects):
        assert outcome.exit_code == base.exit_code
    others = [e for e in effects if e is not Effect.KEEPS]
    if len(others) == 1 and others[0] is Effect.TRUTH:
        assert outcome.exit_code != 0, "CLEAN on damaged truth"
    if len(others) == 1 and others[0] is Effect.CONFLICT:
        assert outcome.exit_code == 2


@settings(FUZZ, max_examples=max(EXAMPLES * 2 // 3, 10))
@given(data=st.data())
def test_damaged_truth_is_never_clean(bases, data):
    """One change of values (rewards shifted or made NaN / inf, a conflicting copy), before
    or after harmless copies: never exit 0 when a reported episode's truth changed; exit 2
    for a conflicting copy. (One change only: two shifts could cancel out.)"""
    base = data.draw(st.sampled_from(bases), label="base")
    change = data.draw(st.sampled_from(["shift_rewards", "non_finite", "conflicting_copy"]), label="change")
    harmless = data.draw(st.lists(st.sampled_from(["duplicate", "stray_files", "inside_link"]), max_size=2), label="harmless")
    names = harmless.copy()
    names.insert(data.draw(st.integers(0, len(harmless)), label="at"), change)
    TRIED["damaged truth"] += 1
    outcome, effects = damaged(data, base, names, "md")
    if Effect.TRUTH in effects:
        assert outcome.exit_code != 0, "CLEAN on damaged truth"
    if Effect.CONFLICT in effects:
        assert outcome.exit_code == 2
    if set(effects) == {Effect.KEEPS}:
        assert (outcome.exit_code, outcome.verdicts) == (base.exit_code, base.verdicts)


@settings(FUZZ, max_examples=max(EXAMPLES // 2, 10))
@given(data=st.data())
def test_copies_and_stray_files_change_no_verdict(bases, data):
    """Identical copies (a second name, an inside link), skipped files, a zero-row part."""
    base = data.draw(st.sampled_from(bases), label="base")
    names = data.draw(st.lists(st.sampled_from(["duplicate", "stray_files", "inside_link"]), min_size=1, max_size=3), label="mutations")
    TRIED["copies"] += 1
    outcome, effects = damaged(data, base, names, "md")
    assert set(effects) == {Effect.KEEPS}
    assert (outcome.exit_code, outcome.verdicts) == (base.exit_code, base.verdicts)


# --------------------------------------------------------------------------- what the fuzzer found


def _synthetic(tmp_path) -> str:
    generate_run(str(tmp_path / "trial"), iterations=2, episodes_per_iteration=4, agents=2, modules=2, runners=2, max_chunks=2)
    return str(tmp_path / "trial")


def test_a_deleted_raw_part_gives_valid_json(tmp_path):
    """Was: `compare --json` exit 2, "could not audit (ValueError: Out of range float values are
    not JSON compliant: nan)" — a module's evidence row carried pandas' NaN as its agent id."""
    trial = _synthetic(tmp_path)
    [first] = glob.glob(f"{trial}/reward_audit/raw_rewards/part-000001-*.parquet")
    os.unlink(first)
    result = CliRunner().invoke(main, ["compare", trial, "--json"])
    assert result.exit_code == 1, result.output
    modules = [d for d in _findings(result.stdout) if d["kind"] == "module" and d["evidence"]]
    assert modules and all(e["agent_id"] is None for d in modules for e in d["evidence"])


@pytest.mark.parametrize("chunk_seq", [2**32, 2**62, 2**63 - 1])
def test_a_huge_chunk_seq_is_one_error_line(tmp_path, chunk_seq):
    """Was: exit 2, "could not audit (ValueError: 'list' argument must have no negative
    elements)" — the packed (episode, chunk) keys of the tally overflowed int64."""
    trial = _synthetic(tmp_path)
    [file] = glob.glob(f"{trial}/reward_audit/raw_rewards/part-000001-*.parquet")
    table = pq.read_table(file)
    _write(_set_rows(table, "chunk_seq", [0], lambda v: chunk_seq), file)
    result = CliRunner().invoke(main, ["compare", trial])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"Error: {file}: `chunk_seq` {chunk_seq} (episode {table['episode_id'][0]}), expected 0 to 2^32 − 1 (a runner's `sample()` call number); "
        "the file was not written by reward_audit — re-record the run"
    ]


def test_a_column_name_that_is_not_utf8_is_one_error_line(tmp_path):
    """Was: exit 2, "could not audit (UnicodeDecodeError: ...)" — a flipped byte in a part's
    footer made a column name invalid UTF-8, which pyarrow raises as UnicodeDecodeError."""
    trial = _synthetic(tmp_path)
    [file] = glob.glob(f"{trial}/reward_audit/raw_rewards/part-000001-*.parquet")
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(data.replace(b"agent_id_type", b"agent_id_typ\xe5"))
    result = CliRunner().invoke(main, ["compare", trial])
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: {file}: unreadable Parquet (") and line.endswith(
        "the file is damaged — delete it to audit the rest (its rows will be missing), or re-record the run"
    )


def test_a_nan_reported_value_is_a_mismatch_without_numpy_warnings(tmp_path):
    """Was: exit 1 and eight lines of `RuntimeWarning: invalid value encountered in minimum`
    (dashboard.py) on stderr."""
    trial = _synthetic(tmp_path)
    [file] = glob.glob(f"{trial}/reward_audit/reported_episodes/part-000002-*.parquet")
    _write(_set_rows(pq.read_table(file), "value", [0], lambda v: math.nan), file)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = CliRunner().invoke(main, ["compare", trial])
    assert result.exit_code == 1, result.output
    assert result.stderr == "" and "MISMATCH" in result.stdout


@pytest.mark.parametrize("table, column", [("raw_rewards", "chunk_seq"), ("raw_rewards", "runner_id"), ("reported_episodes", "metrics_call"), ("drains", "drain_seq")])
def test_nulls_in_a_required_column_are_one_error_line(tmp_path, table, column):
    """Was: exit 2, "could not audit (ValueError: 'list' argument must have no negative
    elements)" for a null runner_id, and a RuntimeWarning plus a garbage chunk number for a
    null chunk_seq: nulls in a non-nullable column were read as data."""
    from test_handover import recorded

    folder = recorded(tmp_path)
    [file] = sorted(glob.glob(f"{folder}/{table}/part-000001-*.parquet"))[:1]
    data = pq.read_table(file)
    _write(data.set_column(data.schema.get_field_index(column), column, pa.nulls(data.num_rows, data[column].type)), file)
    result = CliRunner().invoke(main, ["compare", folder])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"Error: {file}: column `{column}` has {data.num_rows} null values, expected none; the file was not written by reward_audit, re-record the run"
    ]


@pytest.mark.parametrize("table", ["raw_rewards", "reported_episodes", "reported_iterations"])
def test_invalid_utf8_in_a_string_column_is_one_error_line(tmp_path, table):
    """Was: exit 2, "could not audit (ArrowException: Unknown error: Wrapping \ufffdpisode
    failed)" — a flipped byte in a dictionary page made a string invalid UTF-8."""
    trial = _synthetic(tmp_path)
    [file] = glob.glob(f"{trial}/reward_audit/{table}/part-000001-*.parquet")
    data = pq.read_table(file)
    column = "path" if table == "reported_iterations" else "episode_id"
    value = data[column][0].as_py().encode()
    pq.write_table(data, file, compression="none", write_statistics=False)  # the strings as plain bytes in the file
    with open(file, "rb") as f:
        raw = f.read()
    with open(file, "wb") as f:
        f.write(raw.replace(value, b"\xe5" + value[1:]))
    result = CliRunner().invoke(main, ["compare", trial])
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: {file}: unreadable Parquet (") and "Invalid UTF8" in line and line.endswith("or re-record the run")


def test_zz_inputs_tried(capsys):
    """Says how many inputs the fuzz tests tried (shown without ``-s``)."""
    with capsys.disabled():
        total = sum(TRIED.values())
        print(f"\nfuzz: {total} inputs ({', '.join(f'{k}: {n}' for k, n in TRIED.items())}), each through compare, compare --json and report, "
              f"in {time.monotonic() - STARTED:.0f} s; REWARD_AUDIT_FUZZ_EXAMPLES={EXAMPLES}")
