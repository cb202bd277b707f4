"""The run store: atomic parts, pyarrow.fs URIs, finding runs below a folder."""

from __future__ import annotations

import os

import pytest

from reward_audit import compare, load_run, load_runs
from reward_audit.errors import RunNotFoundError
from reward_audit.store import RunWriter
from synth import SynthRun, manifest


def test_uri_round_trip(tmp_path):
    uri = f"file://{tmp_path}/bucket/trial/reward_audit"
    writer = RunWriter(uri)
    writer.write_manifest(manifest())
    run = SynthRun()
    run.episode("e", [{0: 1.0}], {0: "p0"})
    run.report("e", "agent", 1.0, agent=0)
    writer.write_rows("raw_rewards", run.raw, "000001")
    writer.write_rows("reported_episodes", run.reported, "000001")
    loaded = load_run(f"file://{tmp_path}/bucket/trial")
    assert len(loaded.raw) == 1 and compare(loaded).ok


def test_parts_are_renamed_into_place_and_temp_files_ignored(tmp_path):
    writer = RunWriter(str(tmp_path))
    writer.write_manifest(manifest())
    run = SynthRun()
    run.episode("e", [{0: 1.0}], {0: "p0"})
    path = writer.write_rows("raw_rewards", run.raw, "000001")
    assert os.path.basename(path).startswith("part-000001-") and path.endswith(".parquet")
    assert not [f for f in os.listdir(tmp_path / "raw_rewards") if f.endswith(".tmp")]
    # A crash mid-write leaves a hidden temp file: readers skip it.
    (tmp_path / "raw_rewards" / ".part-000002-x.parquet.ab12.tmp").write_bytes(b"PAR1 half a file")
    assert len(load_run(str(tmp_path)).raw) == 1
    assert writer.write_rows("raw_rewards", [], "000003") is None


def test_several_runs_below_a_folder(tmp_path):
    for trial in ("a", "b"):
        SynthRun().write(str(tmp_path / "exp" / trial / "reward_audit"))
    assert [os.path.basename(os.path.dirname(r.path)) for r in load_runs(str(tmp_path / "exp"))] == ["a", "b"]
    with pytest.raises(RunNotFoundError, match="holds 2 runs"):
        load_run(str(tmp_path / "exp"))
