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
import os
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import schema
from .errors import CorruptRunError, InvalidDataError, RunNotFoundError, SchemaVersionError

_VERSION_KEY = b"reward_audit.schema_version"


def resolve_filesystem(path_or_uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path or any ``pyarrow.fs`` URI."""
    if "://" in str(path_or_uri):
        return pafs.FileSystem.from_uri(str(path_or_uri))
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(str(path_or_uri)))


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


DAMAGED_FIX = "the file is damaged — delete it to audit the rest (its rows will be missing), or re-record the run"
_REPLACES_KEY = b"reward_audit.replaces"


def _is_audit_dir(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(f"{path}/{schema.MANIFEST_NAME}").type == pafs.FileType.File


def find_runs(path_or_uri: str, max_depth: int = 4) -> list[str]:
    """Audit folders at, inside, or below ``path_or_uri`` (audit dir, trial dir, experiment dir)."""
    fs, path = resolve_filesystem(path_or_uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise RunNotFoundError(
            f"{path_or_uri}: no such folder; pass the run's trial dir or its `reward_audit/` folder"
        )
    if info.type != pafs.FileType.Directory:
        raise RunNotFoundError(
            f"{path_or_uri}: is a file, not a folder; pass the folder that holds `{schema.MANIFEST_NAME}`"
        )
    if _is_audit_dir(fs, path):
        return [path]
    found = []
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    for entry in fs.get_file_info(selector):
        rel_depth = entry.path[len(path):].count("/")
        if (
            entry.type == pafs.FileType.File
            and entry.base_name == schema.MANIFEST_NAME
            and rel_depth <= max_depth + 1
            and entry.path.rsplit("/", 2)[-2] == schema.AUDIT_DIR_NAME
        ):
            found.append(entry.path.rsplit("/", 1)[0])
    if not found:
        raise RunNotFoundError(
            f"{path_or_uri}: no reward_audit data here (no `{schema.AUDIT_DIR_NAME}/{schema.MANIFEST_NAME}`); "
            "record a run with `config.callbacks(RewardAuditCallback)` first, then pass its trial dir"
        )
    return sorted(found)


def _read_manifest(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    file = f"{path}/{schema.MANIFEST_NAME}"
    try:
        with fs.open_input_stream(file) as stream:
            manifest = json.loads(stream.read().decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptRunError(f"{file}: not valid JSON ({e}); the run's manifest is damaged, re-record the run") from e
    if not isinstance(manifest, dict) or manifest.get("tool") != schema.TOOL_NAME:
        raise RunNotFoundError(
            f"{file}: not a reward_audit manifest (written by another tool?); "
            "pass a folder recorded with `config.callbacks(RewardAuditCallback)`"
        )
    version = manifest.get("schema_version")
    if type(version) is not int or version not in schema.READABLE_SCHEMA_VERSIONS:
        raise SchemaVersionError(
            f"{file}: schema version {version!r}, this reward_audit reads versions {', '.join(map(str, schema.READABLE_SCHEMA_VERSIONS))}; "
            f"install the reward_audit that wrote it (`pip install reward_audit=={manifest.get('reward_audit_version', '?')}`)"
        )
    return manifest


def _part_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    selector = pafs.FileSelector(folder, recursive=False, allow_not_found=True)
    return sorted(
        e.path
        for e in fs.get_file_info(selector)
        if e.type == pafs.FileType.File and e.base_name.endswith(".parquet") and not e.base_name.startswith(".")
    )


def _inspect(fs: pafs.FileSystem, file: str, name: str) -> Part:
    """Validate one part from its footer alone (schema version, columns, types)."""
    expected = schema.TABLES[name]
    try:
        with fs.open_input_file(file) as f:
            meta = pq.ParquetFile(f).metadata
            arrow_schema = meta.schema.to_arrow_schema()
    except (pa.ArrowInvalid, OSError) as e:
        raise CorruptRunError(f"{file}: unreadable Parquet ({str(e).splitlines()[0]}); {DAMAGED_FIX}") from e
    version = (arrow_schema.metadata or {}).get(_VERSION_KEY)
    if version not in {str(v).encode() for v in schema.READABLE_SCHEMA_VERSIONS}:
        shown = version.decode(errors="replace") if version else "none"
        raise SchemaVersionError(
            f"{file}: schema version {shown}, this reward_audit reads versions {', '.join(map(str, schema.READABLE_SCHEMA_VERSIONS))}; "
            "use the reward_audit version that wrote the run"
        )
    optional = schema.V2_RAW_COLUMNS if name == "raw_rewards" and version == b"1" else ()
    missing = [f.name for f in expected if f.name not in arrow_schema.names and f.name not in optional]
    if missing:
        raise SchemaVersionError(f"{file}: missing columns {missing}; the file does not match schema {schema.SCHEMA_VERSION}")
    for f in expected:
        if f.name not in arrow_schema.names:
            continue
        actual = arrow_schema.field(f.name).type
        if actual != f.type and not (pa.types.is_integer(actual) and pa.types.is_integer(f.type)) and not (
            pa.types.is_dictionary(actual) and actual.value_type == f.type
        ):
            raise InvalidDataError(f"{file}: column `{f.name}` is {actual}, expected {f.type}; the file was not written by reward_audit, re-record the run")
    groups = _row_groups(meta, arrow_schema.get_field_index("iteration"))
    lo, hi = (min(g[0] for g in groups), max(g[1] for g in groups)) if groups else (0, -1)
    replaces = (arrow_schema.metadata or {}).get(_REPLACES_KEY)
    return Part(file, meta.num_rows, lo, hi, tuple(json.loads(replaces)) if replaces else (), groups, int(version))


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


# --------------------------------------------------------------------------- compaction

COMPACT_TARGET_ROWS = 4 << 20


def compact_run(path_or_uri: str, target_rows: int = COMPACT_TARGET_ROWS) -> dict[str, tuple[int, int]]:
    """Merge each table's small parts into parts of up to ``target_rows`` rows (one row
    group per source part, so readers still skip by iteration). Returns
    ``{table: (parts before, parts after)}``.

    Atomic and idempotent: a compacted part is written under a temporary name, renamed
    into place, and lists the parts it replaces in its metadata; only then are those
    deleted. A reader that finds both reads the compacted part only, and running
    ``compact_run`` again finishes an interrupted compaction and changes nothing else.
    """
    fs, _ = resolve_filesystem(path_or_uri)
    out = {}
    for run_path in find_runs(path_or_uri):
        run = Run(path=run_path, manifest=_read_manifest(fs, run_path), filesystem=fs)
        writer = RunWriter(run_path, fs)
        for name in schema.TABLES:
            every = [_inspect(fs, f, name) for f in _part_files(fs, f"{run_path}/{name}")]
            parts = list(_live(every))
            for part in every:  # finish an interrupted compaction
                if part not in parts:
                    fs.delete_file(part.path)
            groups: list[list[Part]] = []
            for part in parts:
                if part.rows >= target_rows // 2:
                    groups.append([part])  # already big: leave as is
                elif groups and groups[-1][-1].rows < target_rows // 2 and sum(p.rows for p in groups[-1]) + part.rows <= target_rows:
                    groups[-1].append(part)
                else:
                    groups.append([part])
            after = 0
            for group in groups:
                after += 1
                if len(group) == 1:
                    continue
                first = os.path.basename(group[0].path)[len("part-"):].rsplit("-", 1)[0]
                final = f"{run_path}/{name}/part-{first}-c{len(group)}-{uuid.uuid4().hex[:8]}.parquet"
                replaces = json.dumps([os.path.basename(p.path) for p in group]).encode()
                meta = {_VERSION_KEY: str(schema.SCHEMA_VERSION).encode(), _REPLACES_KEY: replaces}

                def write(sink: Any, group: list[Part] = group, meta: dict = meta) -> None:
                    target = schema.TABLES[name].with_metadata(meta)
                    with pq.ParquetWriter(sink, target, **_PARQUET_OPTIONS) as w:
                        for part in group:  # one row group per source part, in order
                            w.write_table(run.read(name, [part]).replace_schema_metadata(meta), row_group_size=ROW_GROUP_ROWS)

                writer._atomic_write(final, write)
                for part in group:
                    fs.delete_file(part.path)
            b0, a0 = out.get(name, (0, 0))
            out[name] = (b0 + len(parts), a0 + after)
    return out
