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
import math
import os
import uuid
from dataclasses import dataclass, field
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
        folder, name = final.rsplit("/", 1)
        self._ensure_dir(folder)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as stream:
            write(stream)
        self.fs.move(tmp, final)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        self._atomic_write(f"{self.path}/{schema.MANIFEST_NAME}", lambda s: s.write(data))

    def write_rows(self, table: str, rows: list[dict[str, Any]], tag: str) -> str | None:
        """Write ``rows`` as one part file of ``table``; returns its path (None if no rows)."""
        if not rows:
            return None
        arrow = pa.Table.from_pylist(rows, schema=schema.TABLES[table])
        arrow = arrow.replace_schema_metadata({_VERSION_KEY: str(schema.SCHEMA_VERSION).encode()})
        final = f"{self.path}/{table}/part-{tag}-{uuid.uuid4().hex[:8]}.parquet"
        self._atomic_write(final, lambda s: pq.write_table(arrow, s, compression="zstd"))
        return final


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Run:
    """One loaded run folder: the manifest and the three tables as DataFrames."""

    path: str
    manifest: dict[str, Any]
    raw: pd.DataFrame
    reported: pd.DataFrame
    iterations: pd.DataFrame
    files: dict[str, list[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """A short display name: the trial folder holding the audit folder."""
        parent = os.path.dirname(self.path.rstrip("/"))
        return os.path.basename(parent) or self.path


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
    if version != schema.SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{file}: schema version {version!r}, this reward_audit reads version {schema.SCHEMA_VERSION}; "
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


def _read_table(fs: pafs.FileSystem, path: str, name: str) -> tuple[pd.DataFrame, list[str]]:
    expected = schema.TABLES[name]
    files = _part_files(fs, f"{path}/{name}")
    tables = []
    for file in files:
        try:
            with fs.open_input_file(file) as f:
                table = pq.read_table(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise CorruptRunError(
                f"{file}: unreadable Parquet ({str(e).splitlines()[0]}); the file is damaged — "
                "delete it to audit the rest (its rows will be missing), or re-record the run"
            ) from e
        version = (table.schema.metadata or {}).get(_VERSION_KEY)
        if version != str(schema.SCHEMA_VERSION).encode():
            shown = version.decode() if version else "none"
            raise SchemaVersionError(
                f"{file}: schema version {shown}, this reward_audit reads version {schema.SCHEMA_VERSION}; "
                "use the reward_audit version that wrote the run"
            )
        missing = [f.name for f in expected if f.name not in table.column_names]
        if missing:
            raise SchemaVersionError(f"{file}: missing columns {missing}; the file does not match schema {schema.SCHEMA_VERSION}")
        tables.append(table.select(expected.names).cast(expected))
    table = pa.concat_tables(tables) if tables else expected.empty_table()
    return table.to_pandas(), files


def _check_finite(df: pd.DataFrame, files: list[str], columns: Iterable[str], what: str) -> None:
    for column in columns:
        bad = df[~df[column].map(lambda v: isinstance(v, float) and math.isfinite(v))]
        if len(bad):
            row = bad.iloc[0]
            raise InvalidDataError(
                f"{files[0] if len(files) == 1 else os.path.dirname(files[0])}: {len(bad)} {what} with non-finite "
                f"`{column}` (first: episode {row['episode_id']}, value {row[column]}); "
                "the env returned NaN/inf rewards, which no return can be checked against — fix the env's `step()`"
            )


def _load(fs: pafs.FileSystem, path: str) -> Run:
    manifest = _read_manifest(fs, path)
    raw, raw_files = _read_table(fs, path, "raw_rewards")
    reported, rep_files = _read_table(fs, path, "reported_episodes")
    iterations, it_files = _read_table(fs, path, "reported_iterations")
    if raw_files:
        _check_finite(raw, raw_files, ["reward", "pre_obs_reward"], "raw reward rows")
    return Run(
        path=path,
        manifest=manifest,
        raw=raw,
        reported=reported,
        iterations=iterations,
        files={"raw_rewards": raw_files, "reported_episodes": rep_files, "reported_iterations": it_files},
    )


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
