"""Compaction: merge a run's many small part files into few large ones, atomically and
idempotently (``reward-audit compact``)."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pyarrow.parquet as pq

from . import schema
from .store import _PARQUET_OPTIONS, _REPLACES_KEY, _VERSION_KEY, ROW_GROUP_ROWS, Part, Run, RunWriter, _inspect, _live, _part_files, _read_manifest
from .walk import find_runs, resolve_filesystem


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
