"""The run store: a crash-safe Parquet writer and ``load_run(path)``, side by side, so the
recorder and the loader agree on one format (``schema.py``).

    >>> writer = RunWriter("/tmp/trial/reward_audit")          # or "s3://bucket/run"
    >>> writer.write_manifest({...})
    >>> writer.write_rows("raw_rewards", rows, tag="000003")   # one part file, atomically
    >>> run = load_run("/tmp/trial")                           # finds reward_audit/ itself
    >>> run.raw.head()                                          # pandas DataFrames

Part files are written under a hidden temporary name and then renamed: a reader sees a
part complete or not at all; a crash leaves at most a ``.tmp`` file, which readers skip.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import schema
from .errors import CorruptRunError, InvalidDataError, RunNotFoundError, SchemaVersionError
from .walk import MAX_DEPTH, _inside, _is_utf8, _shown, find_runs, resolve_filesystem  # noqa: F401  (MAX_DEPTH: re-exported)

_VERSION_KEY = b"reward_audit.schema_version"
logger = logging.getLogger("reward_audit")


# --------------------------------------------------------------------------- writing

# Raw rows are sorted so that an episode's rows sit together: run-length and dictionary
# encoding then store the repeated ids (runner, episode, agent, module) almost for free.
# The reported tables keep their written order: it is RLlib's order, which the
# dashboard rebuild needs.
RAW_SORT_KEYS = ["iteration", "phase", "runner_id", "episode_id", "chunk_seq", "agent_id"]
ROW_GROUP_ROWS = 1 << 20
# Every part, written fresh or compacted: dictionary-encoded, zstd, statistics on `iteration`.
_PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": True, "dictionary_pagesize_limit": 64 << 20, "write_statistics": ["iteration"]}


def write_part(table: str, arrow: pa.Table, sink: Any) -> None:
    """Write one part of ``table``: raw rows sorted (``RAW_SORT_KEYS``), dictionary-encoded,
    zstd, row-group statistics on ``iteration`` (readers skip what a window does not need),
    the schema version in the Arrow metadata. About 12 bytes per raw agent-chunk row."""
    arrow = arrow.select(schema.TABLES[table].names).cast(schema.TABLES[table])
    if table == "raw_rewards":
        arrow = arrow.sort_by([(k, "ascending") for k in RAW_SORT_KEYS])
    arrow = arrow.replace_schema_metadata({_VERSION_KEY: str(schema.SCHEMA_VERSION).encode()})
    pq.write_table(arrow, sink, compression_level=3, row_group_size=ROW_GROUP_ROWS, **_PARQUET_OPTIONS)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunWriter:
    """Writes one run folder. Cheap to pickle (holds only the location)."""

    def __init__(self, path_or_uri: str, filesystem: pafs.FileSystem | None = None):
        if filesystem is None:
            filesystem, path = resolve_filesystem(path_or_uri)
        else:
            path = str(path_or_uri)
        self.fs = filesystem
        self.path = path.rstrip("/")
        self.location = str(path_or_uri)
        self._made: set[str] = set()

    def _ensure_dir(self, path: str) -> None:
        if path not in self._made:
            self.fs.create_dir(path, recursive=True)
            self._made.add(path)

    def _atomic_write(self, final: str, write: Any) -> None:
        """Write under a hidden temporary name, then rename into place. Locally the file and
        its folder are fsync'ed, so after a crash a part is complete or absent, never empty."""
        folder, name = final.rsplit("/", 1)
        self._ensure_dir(folder)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        if not isinstance(self.fs, pafs.LocalFileSystem):
            with self.fs.open_output_stream(tmp) as stream:
                write(stream)
            self.fs.move(tmp, final)
            return
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_dir(folder)

    def claim(self) -> bool:
        """Create the run folder atomically: True if this writer created it, False if it
        already existed (another driver, or an earlier segment of the same run). Object
        stores have no atomic create: there it is True unless a manifest is already there."""
        parent = self.path.rsplit("/", 1)[0]
        if not isinstance(self.fs, pafs.LocalFileSystem):
            taken = self.fs.get_file_info(f"{self.path}/{schema.MANIFEST_NAME}").type == pafs.FileType.File
            self.fs.create_dir(self.path, recursive=True)
            return not taken
        os.makedirs(parent, exist_ok=True)
        try:
            os.mkdir(self.path)
        except FileExistsError:
            return False
        self._made.add(self.path)
        return True

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest already in this folder (a reopened run), or None."""
        try:
            with self.fs.open_input_stream(f"{self.path}/{schema.MANIFEST_NAME}") as stream:
                manifest = json.loads(stream.read().decode())
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) and manifest.get("tool") == schema.TOOL_NAME else None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        self._atomic_write(f"{self.path}/{schema.MANIFEST_NAME}", lambda s: s.write(data))

    def write_rows(self, table: str, rows: list[dict[str, Any]], tag: str) -> str | None:
        """Write ``rows`` as one part file of ``table``; returns its path (None if no rows)."""
        if not rows:
            return None
        return self.write_table(table, pa.Table.from_pylist(rows, schema=schema.TABLES[table]), tag)

    def write_table(self, table: str, arrow: pa.Table, tag: str) -> str | None:
        """Write an Arrow table of ``table``'s schema as one part file (see ``write_part``)."""
        if not arrow.num_rows:
            return None
        final = f"{self.path}/{table}/part-{tag}-{uuid.uuid4().hex[:8]}.parquet"
        self._atomic_write(final, lambda s: write_part(table, arrow, s))
        return final


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Part:
    """One Parquet part file: its path, rows and the iterations its row groups hold."""

    path: str
    rows: int
    first_iteration: int
    last_iteration: int
    replaces: tuple[str, ...] = ()  # part names a compacted part stands for
    groups: tuple[tuple[int, int, int], ...] = ()  # per row group: (first iteration, last iteration, rows)
    version: int = schema.SCHEMA_VERSION


@dataclass(frozen=True, eq=False)
class Run:
    """One run folder: the manifest and its validated part files. The tables are read
    only when asked for (``raw``, ``reported``, ``iterations`` as pandas DataFrames, fine
    for small runs); ``compare`` streams the parts instead."""

    path: str
    manifest: dict[str, Any]
    parts: dict[str, tuple[Part, ...]] = field(default_factory=dict)
    filesystem: pafs.FileSystem = field(default_factory=pafs.LocalFileSystem, repr=False)

    @property
    def name(self) -> str:
        """A short display name: the trial folder holding the audit folder."""
        parent = os.path.dirname(self.path.rstrip("/"))
        return os.path.basename(parent) or self.path

    @property
    def files(self) -> dict[str, list[str]]:
        return {name: [p.path for p in parts] for name, parts in self.parts.items()}

    @property
    def local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def rows(self, table: str) -> int:
        return sum(p.rows for p in self.parts.get(table, ()))

    def read(self, table: str, parts: Iterable[Part] | None = None) -> pa.Table:
        """The Arrow table of ``table`` (all parts, or the given ones), in the canonical schema."""
        expected = schema.TABLES[table]
        tables = []
        for part in self.parts.get(table, ()) if parts is None else parts:
            try:
                with self.filesystem.open_input_file(part.path) as f:
                    data = pq.read_table(f)
                data.validate(full=True)  # a damaged page can hold invalid UTF-8
                check_required(table, data, part.path)
                for column in expected.names:  # schema-1 parts: the columns added since are null
                    if column not in data.column_names:
                        data = data.append_column(column, pa.nulls(data.num_rows, expected.field(column).type))
                tables.append(data.select(expected.names).cast(expected))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
                raise CorruptRunError(f"{part.path}: unreadable Parquet ({str(e).splitlines()[0]}); {DAMAGED_FIX}") from e
        return pa.concat_tables(tables) if tables else expected.empty_table()

    @cached_property
    def raw(self) -> pd.DataFrame:
        return self.read("raw_rewards").to_pandas()

    @cached_property
    def reported(self) -> pd.DataFrame:
        return self.read("reported_episodes").to_pandas()

    @cached_property
    def iterations(self) -> pd.DataFrame:
        return self.read("reported_iterations").to_pandas()


def check_required(table: str, data: pa.Table, file: str) -> None:
    """Refuse nulls in a column the schema declares non-nullable (``_inspect`` checks types
    from the footer; nulls show only in the data)."""
    for f in schema.TABLES[table]:
        if not f.nullable and f.name in data.column_names and data.column(f.name).null_count:
            raise InvalidDataError(
                f"{file}: column `{f.name}` has {data.column(f.name).null_count} null values, expected none; "
                "the file was not written by reward_audit, re-record the run"
            )


def drop_identical(frame: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, pd.Series | None]:
    """Rows that appear twice under one key (a part copied, a runner drained twice):
    ``(frame with identical copies counted once, None)``, or ``(frame, a row)`` whose key
    holds different values — contradictory data the caller names in its error."""
    if frame.empty or not frame.duplicated(keys).any():
        return frame, None
    hashable = frame.apply(lambda c: c.map(lambda x: tuple(x) if isinstance(x, (list, np.ndarray)) else x)) if (frame.dtypes == object).any() else frame
    distinct = hashable.drop_duplicates()
    if distinct.duplicated(keys).any():
        return frame, distinct[distinct.duplicated(keys, keep=False)].iloc[0]
    return frame.loc[distinct.index].reset_index(drop=True), None


DAMAGED_FIX = "the file is damaged — delete it to audit the rest (its rows will be missing), or re-record the run"
_REPLACES_KEY = b"reward_audit.replaces"


MANIFEST_MAX_BYTES = 16 << 20  # a manifest is a few KiB; more is not one of ours


# --------------------------------------------------------------------------- validating a run


def _refuse_outside_link(run: str, path: str) -> None:
    """Local runs: a manifest, table folder or part must lie in its run folder (a link may
    point elsewhere inside it); data from another folder is never merged in silently."""
    real_run = os.path.realpath(run)
    if _inside(real_run, path):
        return
    link, target = _shown(path), _shown(os.path.realpath(path))
    raise InvalidDataError(
        f"{link}: a link to {target}, outside the run folder {_shown(run)}; copy the file into the run folder or remove "
        f"the link (`rm {shlex.quote(link)} && cp -r {shlex.quote(target)} {shlex.quote(link)}`, or `rm {shlex.quote(link)}`)"
    )


def _nullable(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and v >= low  # not bool: True == 1 in Python


_ITERATION_SEMANTICS = [s.value for s in schema.IterationSemantics]
_KINDS = [k.value for k in schema.Kind]


def _iteration_path(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) and v[1] in _KINDS and v[2] in _ITERATION_SEMANTICS


# What readers rely on, per manifest field (when present): (expected, check).
def _segment(s: Any) -> bool:
    """One entry of the manifest's ``segments`` (see ``collector.py``)."""
    if not isinstance(s, dict) or s.get("reason") not in ("start", "restored", "reopened") or not _int_at_least(1)(s.get("first_iteration")):
        return False
    optional = ("last_iteration", "first_training_iteration", "last_training_iteration")
    return all(_nullable(_int_at_least(0))(s.get(k)) for k in optional)


MANIFEST_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "api_stack": ("`new` or `old`", lambda v: v in ("new", "old")),
    "metrics_num_episodes_for_smoothing": ("a positive integer or null", _nullable(_int_at_least(1))),
    "evaluation_interval": ("an integer ≥ 0 or null (0 and null: no evaluation)", _nullable(_int_at_least(0))),
    "num_env_runners": ("an integer ≥ 0 or null", _nullable(_int_at_least(0))),
    "evaluation_num_env_runners": ("an integer ≥ 0 or null", _nullable(_int_at_least(0))),
    "num_envs_per_env_runner": ("a positive integer or null", _nullable(_int_at_least(1))),
    "smoothing_model": ("`per_call_window`, `driver_history` or null", lambda v: v in (None, "per_call_window", "driver_history")),
    "async_metrics": ("true, false or null", lambda v: v in (None, True, False) and type(v) is not int),
    "evaluation_discards_last_call": ("true, false or null", lambda v: v in (None, True, False) and type(v) is not int),
    "capture_failures": ("an integer ≥ 0", _int_at_least(0)),
    "driver_failures": ("an integer ≥ 0", _int_at_least(0)),
    "segments": ("a list of segments (`first_iteration` a positive integer, `reason` start / restored / reopened)", lambda v: isinstance(v, list) and all(_segment(s) for s in v)),
    "iteration_semantics": (
        f"an object of path pattern -> one of {', '.join(_ITERATION_SEMANTICS)}",
        lambda v: isinstance(v, dict) and all(s in _ITERATION_SEMANTICS for s in v.values()),
    ),
    "iteration_paths": (
        f"a list of [pattern, kind ({', '.join(_KINDS)}), semantics ({', '.join(_ITERATION_SEMANTICS)})]",
        lambda v: isinstance(v, list) and all(_iteration_path(p) for p in v),
    ),
}


def _read_manifest(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """The run's ``run.json``, checked: at most ``MANIFEST_MAX_BYTES``, our tool, a readable
    schema version (an int, not ``true``), and every field of ``MANIFEST_CHECKS``."""
    file = f"{path}/{schema.MANIFEST_NAME}"
    if isinstance(fs, pafs.LocalFileSystem):
        _refuse_outside_link(path, file)
    try:
        with fs.open_input_stream(file) as stream:
            data = stream.read(MANIFEST_MAX_BYTES + 1)
    except OSError as e:
        raise CorruptRunError(f"{file}: cannot be read ({str(e).splitlines()[0]}); check its permissions (`ls -l {shlex.quote(file)}`)") from e
    if len(data) > MANIFEST_MAX_BYTES:
        raise CorruptRunError(
            f"{file}: more than {MANIFEST_MAX_BYTES >> 20} MiB, a manifest is a few KiB; the file is not a reward_audit manifest, re-record the run"
        )
    try:
        manifest = json.loads(data.decode())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptRunError(f"{file}: not valid JSON ({type(e).__name__}); the run's manifest is damaged, re-record the run") from e
    if not isinstance(manifest, dict) or manifest.get("tool") != schema.TOOL_NAME:
        raise RunNotFoundError(
            f"{file}: not a reward_audit manifest (written by another tool?); "
            "pass a folder recorded with `config.callbacks(RewardAuditCallback)`"
        )
    version = manifest.get("schema_version")
    if type(version) is not int or version not in schema.READABLE_SCHEMA_VERSIONS:
        wrote = manifest.get("reward_audit_version")
        raise SchemaVersionError(
            f"{file}: schema version {_brief(version)}, this reward_audit reads versions {', '.join(map(str, schema.READABLE_SCHEMA_VERSIONS))}; "
            f"install the reward_audit that wrote it (`pip install reward_audit=={wrote if isinstance(wrote, str) else '?'}`)"
        )
    wrong = [f"`{key}` is {_brief(manifest[key])}, expected {expected}" for key, (expected, ok) in MANIFEST_CHECKS.items() if key in manifest and not ok(manifest[key])]
    if wrong:
        raise InvalidDataError(
            f"{file}: {'; '.join(wrong)}; the manifest is damaged or hand-edited — re-record the run "
            "(or, if a newer reward_audit wrote it, `pip install -U reward_audit`)"
        )
    return manifest


def _brief(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _part_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    """A table's part files (``*.parquet``; hidden temporary files skipped). Local runs: a
    table folder or part that is a link out of the run folder is refused, a part whose name
    is not UTF-8 too (it could not be read, and a run is never audited with rows missing)."""
    if not isinstance(fs, pafs.LocalFileSystem):
        selector = pafs.FileSelector(folder, recursive=False, allow_not_found=True)
        return sorted(
            e.path
            for e in fs.get_file_info(selector)
            if e.type == pafs.FileType.File and e.base_name.endswith(".parquet") and not e.base_name.startswith(".")
        )
    if not os.path.isdir(folder):
        return []
    run = os.path.dirname(folder)
    _refuse_outside_link(run, folder)
    files = []
    with os.scandir(folder) as listing:
        for entry in listing:
            if not entry.name.endswith(".parquet") or entry.name.startswith("."):
                continue
            if not _is_utf8(entry.name):
                raise InvalidDataError(
                    f"{_shown(entry.path)}: the file name is not valid UTF-8, so the part cannot be read; "
                    "rename it to the name it was written with (`part-<iteration>-<id>.parquet`)"
                )
            if entry.is_symlink():
                _refuse_outside_link(run, entry.path)
                if not os.path.exists(entry.path):
                    raise CorruptRunError(f"{entry.path}: a link to a file that does not exist; remove the link (`rm {shlex.quote(entry.path)}`)")
            if entry.is_file():
                files.append(entry.path)
    return sorted(files)


def _lossless(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Whether a stored column type reads as ``expected`` without loss: the same type,
    dictionary-encoded strings, or a narrower integer (int8 for int32, uint16 for int32)."""
    if actual == expected:
        return True
    if pa.types.is_dictionary(actual):
        return pa.types.is_string(expected) and actual.value_type == expected
    if pa.types.is_integer(actual) and pa.types.is_signed_integer(expected):
        signed = pa.types.is_signed_integer(actual)
        return actual.bit_width <= expected.bit_width if signed else actual.bit_width < expected.bit_width
    return False


def _inspect(fs: pafs.FileSystem, file: str, name: str) -> Part:
    """Validate one part from its footer alone (schema version, columns, types)."""
    expected = schema.TABLES[name]
    try:
        with fs.open_input_file(file) as f:
            meta = pq.ParquetFile(f).metadata
            arrow_schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # a column name that is not UTF-8: a damaged footer
        raise CorruptRunError(f"{file}: unreadable Parquet ({str(e).splitlines()[0]}); {DAMAGED_FIX}") from e
    version = (arrow_schema.metadata or {}).get(_VERSION_KEY)
    if version not in {str(v).encode() for v in schema.READABLE_SCHEMA_VERSIONS}:
        shown = version.decode(errors="replace") if version else "none"
        raise SchemaVersionError(
            f"{file}: schema version {shown}, this reward_audit reads versions {', '.join(map(str, schema.READABLE_SCHEMA_VERSIONS))}; "
            "use the reward_audit version that wrote the run"
        )
    optional = schema.optional_columns(name, int(version))
    missing = [f.name for f in expected if f.name not in arrow_schema.names and f.name not in optional]
    if missing:
        raise SchemaVersionError(f"{file}: missing columns {missing}; the file does not match schema {schema.SCHEMA_VERSION}")
    for f in expected:
        if f.name in arrow_schema.names and not _lossless(arrow_schema.field(f.name).type, f.type):
            raise InvalidDataError(
                f"{file}: column `{f.name}` is {arrow_schema.field(f.name).type}, expected {f.type}; "
                "the file was not written by reward_audit, re-record the run"
            )
    groups = _row_groups(meta, arrow_schema.get_field_index("iteration"))
    lo, hi = (min(g[0] for g in groups), max(g[1] for g in groups)) if groups else (0, -1)
    return Part(file, meta.num_rows, lo, hi, _replaces(file, arrow_schema), groups, int(version))


def _replaces(file: str, arrow_schema: pa.Schema) -> tuple[str, ...]:
    """The part names a compacted part stands for (its metadata: a JSON list of names)."""
    raw = (arrow_schema.metadata or {}).get(_REPLACES_KEY)
    if not raw:
        return ()
    try:
        names = json.loads(raw)
    except (ValueError, RecursionError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CorruptRunError(f"{file}: its `{_REPLACES_KEY.decode()}` metadata is not a list of part names; {DAMAGED_FIX}")
    return tuple(names)


def _row_groups(meta: pq.FileMetaData, column: int) -> tuple[tuple[int, int, int], ...]:
    """Per row group: the iterations it holds (from its statistics; unknown: all) and rows."""
    groups = []
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        stats = group.column(column).statistics
        if stats is None or not stats.has_min_max:
            groups.append((-(2**62), 2**62, group.num_rows))
        else:
            groups.append((int(stats.min), int(stats.max), group.num_rows))
    return tuple(groups)


def _parts(fs: pafs.FileSystem, path: str, name: str) -> tuple[Part, ...]:
    return _live([_inspect(fs, file, name) for file in _part_files(fs, f"{path}/{name}")])


def _live(parts: list[Part]) -> tuple[Part, ...]:
    """A compacted part stands for the parts it lists; if compaction stopped before it
    deleted them, they are still here: read the compacted one only."""
    replaced = {r for p in parts for r in p.replaces}
    return tuple(p for p in parts if os.path.basename(p.path) not in replaced)


def _load(fs: pafs.FileSystem, path: str) -> Run:
    manifest = _read_manifest(fs, path)
    parts = {name: _parts(fs, path, name) for name in schema.TABLES}
    return Run(path=path, manifest=manifest, parts=parts, filesystem=fs)


def load_run(path_or_uri: str) -> Run:
    """Load one audit folder (or the single one inside a trial dir)."""
    runs = find_runs(path_or_uri)
    if len(runs) > 1:
        raise RunNotFoundError(
            f"{path_or_uri}: holds {len(runs)} runs; pass one of them, e.g. `{runs[0]}`, or use `load_runs`"
        )
    fs, _ = resolve_filesystem(path_or_uri)
    return _load(fs, runs[0])


def load_runs(path_or_uri: str) -> list[Run]:
    """Every run at or below ``path_or_uri`` (e.g. each trial of a Tune experiment)."""
    fs, _ = resolve_filesystem(path_or_uri)
    return [_load(fs, path) for path in find_runs(path_or_uri)]
