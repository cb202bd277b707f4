"""Run folders that fight back: link loops, links out of a run, unreadable names, damaged
manifests, wrongly typed columns. Each row of the issue's table is a test here; see
docs/run_folders.md for the rules they pin down."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from reward_audit import store
from reward_audit.cli import main
from reward_audit.store import find_runs
from synth import SynthRun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_UTF8 = os.fsdecode(b"caf\xe9")  # Latin-1 bytes: not valid UTF-8


def clean_run(folder, **manifest) -> str:
    run = SynthRun()
    run.episode("e1", [{0: 1.0, 1: 10.0}, {0: 2.0, 1: 20.0}], {0: "p0", 1: "p1"})
    run.report("e1", "module", 3.0, module="p0")
    run.report("e1", "module", 30.0, module="p1")
    return run.write(str(folder), **manifest)


def compare(path, *args: str):
    return CliRunner().invoke(main, ["compare", str(path), *args])


def audited(result) -> list[str]:
    """The run paths an audit printed (one `== name (...) — path` header per run)."""
    return [line.rsplit(" — ", 1)[1] for line in result.output.splitlines() if line.startswith("== ")]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "reward_audit" and r.levelno == logging.WARNING]


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def part(run_dir, table: str = "raw_rewards") -> str:
    [name] = os.listdir(os.path.join(run_dir, table))
    return os.path.join(run_dir, table, name)


# --------------------------------------------------------------------------- row 1: link loops


@pytest.mark.parametrize("links", [["loop -> ."], ["loop -> .", "trial/up -> .."], ["alias -> trial", "trial/reward_audit/self -> ."]])
def test_loop_links_audit_the_run_once(tmp_path, caplog, links):
    exp = tmp_path / "exp"
    clean_run(exp / "trial" / "reward_audit")
    for link in links:
        name, target = link.split(" -> ")
        os.symlink(target, exp / name)
    assert find_runs(str(exp)) == [str(exp / "trial" / "reward_audit")]
    result = compare(exp)
    assert result.exit_code == 0, result.output
    assert audited(result) == [str(exp / "trial" / "reward_audit")]
    assert warnings_of(caplog) == []  # links into the folder lead nowhere new: nothing to say


def test_loop_links_finish_in_a_subprocess(tmp_path):
    """The issue's worst case ran for over 60 s; now it is one quick audit (generous guard)."""
    exp = tmp_path / "exp"
    clean_run(exp / "trial" / "reward_audit")
    os.symlink(".", exp / "loop")
    os.symlink("..", exp / "trial" / "up")
    done = subprocess.run([sys.executable, "-m", "reward_audit.cli", "compare", str(exp)], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n== ") + done.stdout.startswith("== ") == 1


def test_the_same_real_folder_is_audited_once(tmp_path):
    clean_run(tmp_path / "exp" / "trial" / "reward_audit")
    os.symlink(tmp_path / "exp", tmp_path / "link_to_exp")  # the given path may be a link
    assert len(find_runs(str(tmp_path / "link_to_exp"))) == 1


def test_a_link_out_of_the_given_folder_is_reported_not_followed(tmp_path, caplog):
    clean_run(tmp_path / "exp" / "trial" / "reward_audit")
    clean_run(tmp_path / "elsewhere" / "other" / "reward_audit")
    os.symlink(tmp_path / "elsewhere" / "other", tmp_path / "exp" / "other")
    result = compare(tmp_path / "exp")
    assert result.exit_code == 0, result.output
    assert audited(result) == [str(tmp_path / "exp" / "trial" / "reward_audit")]
    [warning] = warnings_of(caplog)
    assert warning.startswith(f"warning: {tmp_path / 'exp' / 'other'}: skipped (a link to {tmp_path / 'elsewhere' / 'other'}, outside ")
    assert f"pass `{tmp_path / 'elsewhere' / 'other'}` to audit it)" in warning


def test_runs_deeper_than_the_depth_limit_are_not_found(tmp_path):
    clean_run(tmp_path / "a" / "b" / "c" / "reward_audit")  # 4 levels below tmp_path: found
    clean_run(tmp_path / "a" / "b" / "c" / "d" / "reward_audit")  # 5: not
    assert find_runs(str(tmp_path)) == [str(tmp_path / "a" / "b" / "c" / "reward_audit")]
    assert store.MAX_DEPTH == 4


# --------------------------------------------------------------------------- row 2: a part linked to another run


def _link_part(run_dir, outside) -> str:
    link = part(run_dir)
    os.replace(link, outside / "stolen.parquet")
    os.symlink(outside / "stolen.parquet", link)
    return link


def _link_table(run_dir, outside) -> str:
    link = os.path.join(run_dir, "reported_episodes")
    os.replace(link, outside / "reported_episodes")
    os.symlink(outside / "reported_episodes", link)
    return link


def _link_manifest(run_dir, outside) -> str:
    link = os.path.join(run_dir, "run.json")
    os.replace(link, outside / "run.json")
    os.symlink(outside / "run.json", link)
    return link


@pytest.mark.parametrize("link", [_link_part, _link_table, _link_manifest])
def test_a_link_out_of_the_run_folder_is_refused(tmp_path, link):
    run_dir = clean_run(tmp_path / "trial" / "reward_audit")
    (tmp_path / "other_run").mkdir()
    path = link(run_dir, tmp_path / "other_run")
    line = one_error_line(compare(tmp_path / "trial"))
    assert line.startswith(f"Error: {path}: a link to {tmp_path / 'other_run'}")
    assert f"outside the run folder {tmp_path / 'trial' / 'reward_audit'}; copy the file into the run folder or remove the link (`rm {path} && cp -r " in line


def test_a_link_inside_the_run_folder_is_read(tmp_path):
    run_dir = clean_run(tmp_path / "trial" / "reward_audit")
    file = part(run_dir)
    os.makedirs(os.path.join(run_dir, "archive"))
    os.replace(file, os.path.join(run_dir, "archive", "raw.parquet"))
    os.symlink(os.path.join("..", "archive", "raw.parquet"), file)
    result = compare(tmp_path / "trial")
    assert result.exit_code == 0, result.output


def test_a_dangling_part_link_is_refused(tmp_path):
    run_dir = clean_run(tmp_path / "trial" / "reward_audit")
    file = part(run_dir)
    os.replace(file, os.path.join(run_dir, "gone.parquet"))
    os.symlink(os.path.join("..", "missing.parquet"), file)
    assert one_error_line(compare(tmp_path / "trial")) == f"Error: {file}: a link to a file that does not exist; remove the link (`rm {file}`)"


# --------------------------------------------------------------------------- row 3: what cannot be read is skipped


def test_a_stray_file_with_a_non_utf8_name_is_ignored(tmp_path, caplog):
    clean_run(tmp_path / "exp" / "trial" / "reward_audit")
    open(os.path.join(str(tmp_path / "exp"), NOT_UTF8), "w").close()
    result = compare(tmp_path / "exp")
    assert result.exit_code == 0, result.output
    assert warnings_of(caplog) == []  # a file is never a run: nothing was skipped


def test_a_folder_with_a_non_utf8_name_is_skipped_with_one_warning(tmp_path, caplog):
    clean_run(tmp_path / "exp" / "trial" / "reward_audit")
    shutil.copytree(clean_run(tmp_path / "x" / "reward_audit"), os.path.join(str(tmp_path / "exp"), NOT_UTF8, "reward_audit"))  # pyarrow cannot write there
    result = compare(tmp_path / "exp")
    assert result.exit_code == 0, result.output
    assert audited(result) == [str(tmp_path / "exp" / "trial" / "reward_audit")]
    assert warnings_of(caplog) == [f"warning: {tmp_path / 'exp'}/caf\\xe9: skipped (the name is not valid UTF-8; rename the folder to audit what it holds)"]


def test_the_warning_is_one_line_on_stderr(tmp_path):
    clean_run(tmp_path / "exp" / "trial" / "reward_audit")
    os.makedirs(os.path.join(str(tmp_path / "exp"), NOT_UTF8))
    done = subprocess.run([sys.executable, "-m", "reward_audit.cli", "compare", str(tmp_path / "exp")], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"warning: {tmp_path / 'exp'}/caf\\xe9: skipped (the name is not valid UTF-8; rename the folder to audit what it holds)"]


@pytest.mark.parametrize("code", [errno.EACCES, errno.ENAMETOOLONG])
def test_a_folder_that_cannot_be_listed_is_skipped_with_one_warning(tmp_path, caplog, monkeypatch, code):
    clean_run(tmp_path / "exp" / "trial" / "reward_audit")
    (tmp_path / "exp" / "locked").mkdir()
    scandir = os.scandir

    def failing(path):
        if str(path).endswith("locked"):
            raise OSError(code, os.strerror(code), str(path))
        return scandir(path)

    monkeypatch.setattr(store.os, "scandir", failing)  # tests run as root: chmod would not stop us
    result = compare(tmp_path / "exp")
    assert result.exit_code == 0, result.output
    assert warnings_of(caplog) == [f"warning: {tmp_path / 'exp' / 'locked'}: skipped ({os.strerror(code)})"]


def test_a_deep_unrelated_subtree_next_to_a_trial(tmp_path, caplog):
    """Deeper than PATH_MAX: the old recursive listing died with ENAMETOOLONG."""
    clean_run(tmp_path / "exp" / "trial" / "reward_audit")
    fd = os.open(tmp_path / "exp", os.O_RDONLY)
    try:
        for _ in range(30):  # 30 x 200 characters
            os.mkdir("d" * 200, dir_fd=fd)
            inner = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    result = compare(tmp_path / "exp")
    assert result.exit_code == 0, result.output
    assert audited(result) == [str(tmp_path / "exp" / "trial" / "reward_audit")] and warnings_of(caplog) == []


def test_a_part_with_a_non_utf8_name_is_refused(tmp_path):
    run_dir = clean_run(tmp_path / "trial" / "reward_audit")
    os.replace(part(run_dir), os.path.join(run_dir, "raw_rewards", NOT_UTF8 + ".parquet"))
    line = one_error_line(compare(tmp_path / "trial"))
    assert line.startswith(f"Error: {run_dir}/raw_rewards/caf\\xe9.parquet: the file name is not valid UTF-8")


# --------------------------------------------------------------------------- row 4: manifest fields, column types, --fail-on


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("schema_version", True, "schema version true, this reward_audit reads versions 1, 2, 3"),
        ("schema_version", "2", 'schema version "2", this reward_audit reads versions 1, 2, 3'),
        ("schema_version", 2.0, "schema version 2.0, this reward_audit reads versions 1, 2, 3"),
        ("metrics_num_episodes_for_smoothing", -5, "`metrics_num_episodes_for_smoothing` is -5, expected a positive integer or null"),
        ("metrics_num_episodes_for_smoothing", 0, "`metrics_num_episodes_for_smoothing` is 0, expected a positive integer or null"),
        ("metrics_num_episodes_for_smoothing", True, "`metrics_num_episodes_for_smoothing` is true, expected a positive integer or null"),
        ("evaluation_interval", 1.5, "`evaluation_interval` is 1.5, expected an integer ≥ 0 or null"),
        ("num_env_runners", "2", '`num_env_runners` is "2", expected an integer ≥ 0 or null'),
        ("api_stack", "newest", '`api_stack` is "newest", expected `new` or `old`'),
        ("smoothing_model", "ewma", '`smoothing_model` is "ewma", expected `per_call_window`, `driver_history` or null'),
        ("async_metrics", "false", '`async_metrics` is "false", expected true, false or null'),
        ("capture_failures", "3", '`capture_failures` is "3", expected an integer ≥ 0'),
        ("driver_failures", -1, "`driver_failures` is -1, expected an integer ≥ 0"),
        ("segments", "restored", '`segments` is "restored", expected a list of segments'),
        ("segments", [{"first_iteration": 0, "reason": "start"}], "expected a list of segments (`first_iteration` a positive integer"),
        ("segments", [{"first_iteration": 1, "reason": "rebooted"}], "reason` start / restored / reopened)"),
        ("iteration_semantics", {"env_runners/episode_return_mean": "median"}, '"median"}, expected an object of path pattern -> one of mean_of_episode_sums,'),
        ("iteration_paths", [["env_runners/episode_return_mean", "team", "mean_of_episode_sums"]], "..., expected a list of [pattern, kind (agent, module, policy, episode), semantics"),
    ],
)
def test_manifest_fields_are_checked(tmp_path, field, value, expected):
    run_dir = clean_run(tmp_path / "trial" / "reward_audit")
    file = os.path.join(run_dir, "run.json")
    manifest = json.load(open(file))
    json.dump({**manifest, field: value}, open(file, "w"))
    line = one_error_line(compare(tmp_path / "trial"))
    assert line.startswith(f"Error: {file}: ") and expected in line


def test_null_and_absent_optional_fields_are_accepted(tmp_path):
    run_dir = clean_run(tmp_path / "trial" / "reward_audit", metrics_num_episodes_for_smoothing=None, evaluation_interval=0, async_metrics=None)
    assert compare(os.path.dirname(run_dir)).exit_code == 0


def test_an_oversize_manifest_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "MANIFEST_MAX_BYTES", 1 << 20)  # the same rule, a smaller file to write
    run_dir = clean_run(tmp_path / "trial" / "reward_audit")
    file = os.path.join(run_dir, "run.json")
    json.dump({**json.load(open(file)), "padding": "x" * (1 << 20)}, open(file, "w"))
    line = one_error_line(compare(tmp_path / "trial"))
    assert line == f"Error: {file}: more than 1 MiB, a manifest is a few KiB; the file is not a reward_audit manifest, re-record the run"


def _retype(file: str, column: str, type_: pa.DataType) -> None:
    table = pq.read_table(file)
    i = table.schema.get_field_index(column)
    table = table.set_column(i, pa.field(column, type_), table.column(column).cast(type_))
    pq.write_table(table, file)  # keeps the schema-version metadata


@pytest.mark.parametrize(
    "table, column, type_",
    [
        ("raw_rewards", "reward", pa.string()),  # rewards stored as text
        ("raw_rewards", "reward", pa.float32()),  # rounded: not the rewards the env paid
        ("raw_rewards", "n_rewards", pa.int64()),  # could hold values int32 cannot
        ("raw_rewards", "iteration", pa.uint64()),
        ("raw_rewards", "episode_done", pa.int8()),
        ("reported_episodes", "value", pa.string()),
        ("raw_rewards", "chunk_seq", pa.float64()),
    ],
)
def test_column_types_are_strict_and_the_error_names_the_file(tmp_path, table, column, type_):
    run_dir = clean_run(tmp_path / "trial" / "reward_audit")
    file = part(run_dir, table)
    _retype(file, column, type_)
    expected = store.schema.TABLES[table].field(column).type
    line = one_error_line(compare(tmp_path / "trial"))
    assert line == f"Error: {file}: column `{column}` is {type_}, expected {expected}; the file was not written by reward_audit, re-record the run"


@pytest.mark.parametrize(
    "table, column, type_",
    [
        ("raw_rewards", "agent_id", pa.dictionary(pa.int32(), pa.string())),  # dictionary-encoded strings
        ("raw_rewards", "iteration", pa.int32()),  # narrower integers read without loss
        ("raw_rewards", "n_rewards", pa.uint16()),
        ("reported_episodes", "metrics_call", pa.int8()),
    ],
)
def test_lossless_types_are_read(tmp_path, table, column, type_):
    run_dir = clean_run(tmp_path / "trial" / "reward_audit")
    _retype(part(run_dir, table), column, type_)
    result = compare(tmp_path / "trial")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("value", ["", ",", " , ,"])
def test_fail_on_needs_a_verdict(tmp_path, value):
    result = compare(clean_run(tmp_path / "trial" / "reward_audit"), "--fail-on", value)
    assert result.exit_code == 2
    assert f"{value!r}: name at least one verdict, e.g. `--fail-on leak,drop,mismatch`" in result.output
